//! What answers teach the limiter and how the controller publishes it, on explicit
//! clock nanoseconds: learning from 429s and headers, the window guard, retreat,
//! pauses, admin changes and probes.

use std::time::Duration;

use super::*;
use crate::limiter::guard::{Claim, Margin};
use crate::limiter::learn::Source;
use crate::limiter::pacing::Pacing;
use crate::limiter::provider::testing::{limiter, queued, MS, S};
use crate::limiter::provider::Decision;
use crate::limiter::retreat::{RetreatConfig, RetreatState};
use crate::limiter::signal::Quota;
use crate::priority::Priority;

const W6: Duration = Duration::from_secs(6);

/// 600 RPM on a 6 s window: a ceiling of 60 per window, T = 100 ms; margin 50 ms.
fn paced(capacity: u32) -> Limiter {
    Limiter::with_pacing(
        600.0,
        capacity,
        64,
        RetreatConfig {
            default_pause: Duration::from_millis(100),
            quiet_period: Duration::from_secs(3),
            recovery_interval: Duration::from_secs(1),
            recovery_step: 0.25,
            ..RetreatConfig::default()
        },
        Pacing {
            window: W6,
            margin: Margin {
                fraction: 0.0,
                floor: Duration::from_millis(50),
            },
            probe_interval: Duration::from_secs(60),
        },
        0,
    )
}

/// Admits and stamps one request at `now` on the fast path; its claim.
fn send(l: &Limiter, now: u64) -> Claim {
    match l.admit(Priority::Normal, None, now) {
        Decision::Admitted(g) => {
            l.guard.stamp(g.claim.slot, now);
            g.claim
        }
        other => panic!("expected Admitted at {now}, got {other:?}"),
    }
}

fn refusal(kind: Refusal, retry_after: Option<Duration>) -> Answer {
    Answer {
        ok: false,
        refusal: Some(kind),
        retry_after,
        quota: None,
        token_refusal: None,
    }
}

fn control(l: &Limiter, now: u64) -> Vec<Note> {
    let mut notes = Vec::new();
    l.control(now, &mut |n| notes.push(n));
    notes
}

#[test]
fn a_rate_limit_429_on_the_kth_send_teaches_k_minus_one_and_pauses_for_retry_after() {
    let l = paced(1);
    let mut last = None;
    for k in 0..49u64 {
        last = Some(send(&l, k * 100 * MS));
    }
    let c = last.unwrap();
    assert_eq!(c.count, 49);
    let now = 4_850 * MS;
    l.on_answer(
        now,
        4_800 * MS,
        c.count,
        &refusal(Refusal::RateLimit, Some(Duration::from_secs(2))),
    );
    assert_eq!(
        l.bucket.wait_time(now),
        Duration::from_secs(2),
        "paused at once"
    );
    let notes = control(&l, now);
    assert!(
        notes.iter().any(
            |n| matches!(n, Note::Limit(ch) if ch.to == 48 && ch.source == Source::Learned429)
        ),
        "{notes:?}"
    );
    assert!(notes.iter().any(|n| matches!(
        n,
        Note::Pause {
            reason: PauseReason::RetryAfter,
            ..
        }
    )));
    assert_eq!(l.guard.limit(), 48);
    let (rpm, _) = l.bucket.rate();
    assert!((rpm - 480.0).abs() < 1e-6, "paced at 48 per 6 s: {rpm}");
    let v = l.pacing_view(now);
    assert_eq!(
        (v.learned, v.ceiling, v.source),
        (48, 60, Source::Learned429)
    );
}

#[test]
fn a_429_without_retry_after_pauses_for_the_configured_default() {
    let l = paced(1);
    let c = send(&l, 0);
    l.on_answer(10 * MS, 0, c.count, &refusal(Refusal::RateLimit, None));
    assert_eq!(l.bucket.wait_time(10 * MS), Duration::from_millis(100));
}

#[test]
fn the_window_guard_holds_the_limit_when_the_bucket_would_grant_a_burst() {
    // A bucket that could burst 100: the guard still lets 60 through per window + margin.
    let l = paced(100);
    for _ in 0..60 {
        send(&l, 0);
    }
    assert_eq!(l.guard.in_span(0), 60);
    assert!(l.guard.try_claim(S).is_err(), "window full: {:?}", l.guard);
    let _waiting = queued(l.admit(Priority::Normal, None, 0));
    assert_eq!(
        l.dispatch(S),
        Some(Duration::from_millis(5_050)),
        "the first send leaves at 6.05 s"
    );
    assert_eq!(l.dispatch(6_050 * MS), None, "then the waiter goes");
}

#[test]
fn a_header_limit_is_taken_as_stated_and_a_repeat_changes_nothing() {
    let l = paced(1);
    let c = send(&l, 0);
    let quota = Some(Quota {
        limit_rpm: Some(300),
        remaining: Some(10),
        reset: Some(Duration::from_secs(1)),
        tokens: None,
    });
    let ok = Answer {
        ok: true,
        quota,
        ..Answer::default()
    };
    l.on_answer(MS, 0, c.count, &ok);
    assert!(control(&l, MS)
        .iter()
        .any(|n| matches!(n, Note::Limit(ch) if ch.to == 30 && ch.source == Source::Header)));
    l.on_answer(2 * MS, 0, c.count, &ok);
    assert!(control(&l, 2 * MS).is_empty());
    assert_eq!(l.guard.limit(), 30);
}

#[test]
fn a_spent_quota_pauses_until_its_reset_and_the_pause_is_visible() {
    let l = paced(3);
    let c = send(&l, S);
    let spent = Answer {
        ok: true,
        quota: Some(Quota {
            limit_rpm: None,
            remaining: Some(0),
            reset: Some(Duration::from_secs(6)),
            tokens: None,
        }),
        ..Answer::default()
    };
    l.on_answer(S, S, c.count, &spent);
    assert_eq!(l.bucket.wait_time(S), Duration::from_secs(6));
    assert_eq!(l.pacing_view(S).pause, Some((PauseReason::Quota, 7 * S)));
    assert!(control(&l, S).iter().any(
        |n| matches!(n, Note::Pause { reason: PauseReason::Quota, until, .. } if *until == 7 * S)
    ));
    assert_eq!(l.pacing_view(7 * S).pause, None, "over at its end");
}

#[test]
fn an_overload_refusal_cuts_under_the_learned_limit_and_recovery_stops_at_it() {
    let l = paced(1);
    l.restore(40, 0); // 400 rpm
    let c = send(&l, 0);
    l.on_answer(MS, 0, c.count, &refusal(Refusal::Overload, None));
    control(&l, MS);
    assert!((l.bucket.rate().0 - 200.0).abs() < 1e-6);
    assert_eq!(
        l.guard.limit(),
        40,
        "overload teaches nothing about the limit"
    );
    // Quiet for 3 s, then +0.25 a second: back at 400, never the ceiling's 600.
    for t in 1..20 {
        control(&l, t * S);
    }
    assert!(
        (l.bucket.rate().0 - 400.0).abs() < 1e-6,
        "{:?}",
        l.bucket.rate()
    );
    assert_eq!(l.pacing_view(20 * S).retreat_state, RetreatState::Normal);
}

#[test]
fn set_rate_moves_the_ceiling_and_keeps_what_was_learned_below_it() {
    let l = paced(1);
    l.restore(48, 0);
    l.set_rate(1200.0, 3, 0); // ceiling 120
    assert_eq!(l.guard.limit(), 48, "the learned limit stays");
    assert_eq!(l.bucket.rate().1, 3, "capacity applied");
    let ch = l
        .set_rate(300.0, 3, 0)
        .expect("ceiling below the learned limit");
    assert_eq!((ch.to, l.guard.limit()), (30, 30));
    assert!((l.bucket.rate().0 - 300.0).abs() < 1e-6);
    l.set_rate(1200.0, 3, 0);
    assert_eq!(l.guard.limit(), 30, "what was capped stays capped");
    let ch = l.forget(0).expect("back to the ceiling");
    assert_eq!((ch.to, ch.source), (120, Source::Config));
}

#[test]
fn a_probe_lifts_the_guard_to_the_ceiling_only_while_requests_wait() {
    let l = paced(1);
    l.restore(30, 0);
    control(&l, 61 * S);
    assert_eq!(l.guard.limit(), 30, "no demand: no probe");
    let _t = queued({
        // Fill the window so the next request waits: demand.
        for k in 0..30u64 {
            send(&l, 61 * S + k * 200 * MS);
        }
        l.admit(Priority::Normal, None, 67 * S)
    });
    let notes = control(&l, 67 * S);
    assert!(
        notes
            .iter()
            .any(|n| matches!(n, Note::Limit(ch) if ch.to == 60 && ch.source == Source::Probe)),
        "{notes:?}"
    );
    assert!(l.pacing_view(67 * S).probing);
}

#[test]
fn retry_after_is_the_drain_time_at_the_rate_paced_now() {
    let l = limiter(60.0, 1, 4);
    assert_eq!(l.retry_after(0, 0, 0), Duration::from_secs(1));
    assert_eq!(l.retry_after(4, 0, 0), Duration::from_secs(4));
    assert!(l.retry_after(9, 0, 0) > l.retry_after(8, 0, 0));
    // Past a window's worth (60), the guard spaces sends over 60.3 s: 1.005 s each.
    assert_eq!(l.retry_after(70, 0, 0), Duration::from_millis(70_050));
    // A pause comes first.
    l.bucket.pause_until(30 * S);
    assert_eq!(l.retry_after(2, 0, 0), Duration::from_secs(32));
    // At a learned lower limit the drain is slower: 30 per minute, 2 s each.
    let l = limiter(60.0, 1, 4);
    l.restore(30, 0);
    assert_eq!(l.retry_after(4, 0, 0), Duration::from_secs(8));
}

#[test]
fn refusals_ticks_and_admin_changes_in_any_order_publish_what_the_final_state_implies() {
    // Every order of: a rate 429, an overload refusal, a recovery tick, two ceiling
    // changes. After each step the bucket and the guard must match the state.
    let steps = [0, 1, 2, 3, 4];
    let mut orders = vec![vec![]];
    for _ in 0..steps.len() {
        orders = orders
            .into_iter()
            .flat_map(|o: Vec<usize>| {
                steps
                    .iter()
                    .filter(|s| !o.contains(s))
                    .map(|s| {
                        let mut n = o.clone();
                        n.push(*s);
                        n
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    assert_eq!(orders.len(), 120);
    for order in orders {
        let l = paced(1);
        let mut now = 0;
        for step in order {
            now += 4 * S;
            match step {
                0 => l.on_answer(
                    now,
                    now,
                    41,
                    &refusal(Refusal::RateLimit, Some(Duration::ZERO)),
                ),
                1 => l.on_answer(
                    now,
                    now,
                    1,
                    &refusal(Refusal::Overload, Some(Duration::ZERO)),
                ),
                2 => {}
                3 => drop(l.set_rate(300.0, 1, now)),
                _ => drop(l.set_rate(900.0, 2, now)),
            }
            control(&l, now);
            let c = l.control.lock();
            let (limit, rpm, capacity) = c.targets();
            assert_eq!(l.guard.limit(), limit);
            let (brpm, bcap) = l.bucket.rate();
            assert!(
                (brpm - rpm).abs() / rpm < 1e-6 && bcap == capacity,
                "{brpm} vs {rpm}"
            );
        }
    }
}
