//! Loom model of the controller protocol: a rate 429 reported by the request path, the
//! dispatcher's control step and an admin rate change, in every interleaving. Run with
//! `RUSTFLAGS="--cfg sidecar_loom" cargo test --release --lib loom -- --test-threads=1`.
//!
//! What is checked is the bug of the atomic retreat this replaced (a 429 between the
//! last recovery step and the switch to `normal` left a cut rate in `normal`): whatever
//! the order, once everything has run, the guard's limit and the bucket's rate are the
//! ones the controller's final state implies, and the 429's lesson is not lost.

use std::time::Duration;

use loom::sync::Arc;
use loom::thread;

use super::*;
use crate::limiter::guard::Margin;
use crate::limiter::pacing::Pacing;
use crate::limiter::retreat::{RetreatConfig, RetreatState};

const S: u64 = 1_000_000_000;

/// 60 RPM on a 6 s window: a ceiling of 6 per window (a small ring for the model).
fn limiter() -> Limiter {
    Limiter::with_pacing(
        60.0,
        1,
        4,
        RetreatConfig::default(),
        Pacing {
            window: Duration::from_secs(6),
            margin: Margin {
                fraction: 0.0,
                floor: Duration::from_millis(10),
            },
            probe_interval: Duration::from_secs(600),
        },
        0,
    )
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(f);
}

fn assert_published(l: &Limiter) {
    let (limit, rpm, capacity) = l.control.lock().targets();
    assert_eq!(l.guard.limit(), limit);
    let (brpm, bcap) = l.bucket.rate();
    assert!(
        (brpm - rpm).abs() / rpm < 1e-6,
        "bucket {brpm} vs state {rpm}"
    );
    assert_eq!(bcap, capacity);
}

#[test]
fn loom_a_429_a_control_step_and_an_admin_change_publish_the_final_state() {
    model(|| {
        let l = Arc::new(limiter());
        // Five sends a second apart (set up before the threads, not under test).
        for k in 0..5 {
            let c = l.guard.try_claim(k * S).unwrap();
            l.guard.stamp(c.slot, k * S);
        }
        let refused = {
            let l = Arc::clone(&l);
            thread::spawn(move || {
                let answer = Answer {
                    ok: false,
                    refusal: Some(Refusal::RateLimit),
                    retry_after: Some(Duration::ZERO),
                    quota: None,
                    token_refusal: None,
                };
                // The 5th send of its window was refused: the limit is 4.
                l.on_answer(4 * S + 1, 4 * S, 5, &answer);
                l.control(4 * S + 1, &mut |_| {});
            })
        };
        let admin = {
            let l = Arc::clone(&l);
            thread::spawn(move || {
                l.set_rate(120.0, 2, 4 * S + 1);
            })
        };
        l.control(S, &mut |_| {});
        refused.join().unwrap();
        admin.join().unwrap();
        // The last control step ran after the 429 was reported: its lesson is in.
        assert_eq!(
            l.pacing_view(S).learned,
            4,
            "the 429's lesson survives the admin change"
        );
        assert_published(&l);
    });
}

#[test]
fn loom_an_overload_refusal_racing_recovery_leaves_no_cut_rate_in_normal() {
    model(|| {
        let l = Arc::new(limiter());
        let overload = Answer {
            ok: false,
            refusal: Some(Refusal::Overload),
            retry_after: Some(Duration::ZERO),
            quota: None,
            token_refusal: None,
        };
        // Retreat, then quiet long enough that the next steps recover.
        l.on_answer(0, 0, 1, &overload);
        l.control(0, &mut |_| {});
        let late = 1_000 * S;
        let refusal = {
            let l = Arc::clone(&l);
            thread::spawn(move || {
                l.on_answer(late, late, 1, &overload);
                l.control(late, &mut |_| {});
            })
        };
        l.control(late, &mut |_| {});
        refusal.join().unwrap();
        let v = l.pacing_view(late);
        assert!(
            v.retreat_state != RetreatState::Normal || v.retreat_factor == 1.0,
            "normal with a cut factor: {v:?}"
        );
        assert_published(&l);
    });
}
