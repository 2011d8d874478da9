//! Loom models of the CAS protocols: the bucket's one-word GCRA state and the queue's
//! bound reservation. Run with
//! `RUSTFLAGS="--cfg sidecar_loom" cargo test --release --lib loom -- --test-threads=1`.
//!
//! The queue models call the real `WaitQueues`: its counters go through `super::sync`
//! (loom atomics), while crossbeam's `SegQueue` and the waiter's state use std atomics.
//! Loom switches threads only at its own atomics, so each `SegQueue` push or pop runs
//! whole; what is explored is every interleaving of the reservation, the depth counters
//! and the release, which is the protocol under test.

use loom::sync::Arc;
use loom::thread;

use super::*;
use crate::limiter::queue::WaitQueues;
use crate::priority::Priority;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const NOW: u64 = 100 * S;

/// Three-thread models with every preemption take minutes; three preemptions cover
/// each thread being interrupted inside its CAS loop, which is what is checked here.
fn model_three_threads(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

fn drain(b: &TokenBucket, now: u64) -> usize {
    let mut n = 0;
    while b.try_acquire(now).is_ok() {
        n += 1;
    }
    n
}

/// `threads` threads each try once at the same instant; returns how many succeeded.
fn race_acquires(capacity: u32, threads: usize) -> usize {
    let b = Arc::new(TokenBucket::new(60.0, capacity));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_acquire(NOW).is_ok())
        })
        .collect();
    let won = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&ok| ok)
        .count();
    assert_eq!(drain(&b, NOW), 0, "nothing left over");
    won
}

#[test]
fn loom_two_threads_share_one_token_exactly_once() {
    loom::model(|| assert_eq!(race_acquires(1, 2), 1));
}

#[test]
fn loom_three_threads_share_two_tokens_exactly_twice() {
    model_three_threads(|| assert_eq!(race_acquires(2, 3), 2));
}

#[test]
fn loom_an_acquire_racing_a_rate_change_admits_no_more_than_was_free() {
    loom::model(|| {
        // One token free at NOW; the rate doubles concurrently.
        let b = Arc::new(TokenBucket::new(60.0, 1));
        let acquirer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_acquire(NOW).is_ok())
        };
        let changer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.set_rate(120.0, 1, NOW))
        };
        let won = usize::from(acquirer.join().unwrap());
        changer.join().unwrap();
        assert_eq!(won, 1, "a free token is taken whichever goes first");
        assert_eq!(drain(&b, NOW), 0, "no second token at the same instant");
        assert_eq!(b.rate(), (120.0, 1));
        // And no more than the new rate allows afterwards: one per 0.5 s at most.
        assert!(drain(&b, NOW + S / 2) <= 1);
    });
}

#[test]
fn loom_after_a_token_taken_during_a_rate_change_the_next_waits_a_full_new_interval() {
    loom::model(|| {
        let b = Arc::new(TokenBucket::new(60.0, 1));
        let acquirer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_acquire(NOW).is_ok())
        };
        let changer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.set_rate(120.0, 1, NOW))
        };
        assert!(acquirer.join().unwrap());
        changer.join().unwrap();
        // Either order leaves the next token at NOW + 0.5 s (new interval, capacity 1).
        assert_eq!(
            drain(&b, NOW + S / 2 - 1),
            0,
            "two admissions closer than T"
        );
    });
}

#[test]
fn loom_an_acquire_racing_a_capacity_growth_takes_no_token_that_was_not_there() {
    loom::model(|| {
        // Drained at NOW: no token free before or after growing the capacity to 2.
        let b = Arc::new(TokenBucket::new(60.0, 1));
        assert!(b.try_acquire(NOW).is_ok());
        let acquirer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_acquire(NOW).is_ok())
        };
        let changer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.set_rate(60.0, 2, NOW))
        };
        let won = acquirer.join().unwrap();
        changer.join().unwrap();
        assert!(!won, "admitted with zero tokens in every linearization");
    });
}

#[test]
fn loom_a_late_acquire_racing_a_rate_change_is_never_admitted_early_after_it() {
    loom::model(|| {
        // 60 RPM (slack 20 ms): the token due at NOW + 1 s is taken 10 ms late while the
        // rate goes to 6000 RPM (slack 2.5 ms). Before the change it is caught up, after
        // it the bucket was full at the change. A view mixing old TAT and new slack (or the
        // reverse) would leave the next token too soon (or too late).
        let b = Arc::new(TokenBucket::new(60.0, 1));
        assert!(b.try_acquire(NOW).is_ok());
        let late = NOW + S + 10 * MS;
        let acquirer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_acquire(late).is_ok())
        };
        let changer = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.set_rate(6000.0, 1, late))
        };
        assert!(acquirer.join().unwrap(), "the token was due");
        changer.join().unwrap();
        assert_eq!(b.rate(), (6000.0, 1));
        // Caught up then converted: 0.01 token left, the next 9.9 ms on; converted
        // then taken: the next one new interval (10 ms) on. Never sooner.
        assert_eq!(drain(&b, late + 9 * MS), 0, "admitted early");
        assert_eq!(drain(&b, late + 10 * MS), 1);
    });
}

// === Queue bound reservation ===

#[test]
fn loom_two_arrivals_at_a_bound_of_one_reserve_exactly_one_slot() {
    loom::model(|| {
        let q = WaitQueues::new(1);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let q = std::sync::Arc::clone(&q);
                thread::spawn(move || {
                    let r = q.enqueue(Priority::Normal, false);
                    let total = q.len();
                    assert!(total <= 1, "bound overshot: {total}");
                    r.ok()
                })
            })
            .collect();
        let tickets: Vec<_> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(tickets.len(), 1);
        assert_eq!(q.counts().depth, [0, 1, 0]);
        drop(tickets);
        assert_eq!(q.len(), 0, "the slot is released on drop");
    });
}

#[test]
fn loom_three_arrivals_at_a_bound_of_two_reserve_exactly_two_slots() {
    model_three_threads(|| {
        let q = WaitQueues::new(2);
        let handles: Vec<_> = [Priority::High, Priority::Normal, Priority::Low]
            .into_iter()
            .map(|p| {
                let q = std::sync::Arc::clone(&q);
                thread::spawn(move || q.enqueue(p, false).ok())
            })
            .collect();
        let tickets: Vec<_> = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(tickets.len(), 2);
        assert_eq!(q.len(), 2);
        drop(tickets);
        assert_eq!(q.counts().total, 0);
        assert_eq!(q.counts().depth, [0; 3]);
    });
}

#[test]
fn loom_a_grant_racing_a_cancel_settles_the_waiter_once() {
    loom::model(|| {
        let q = WaitQueues::new(1);
        // The claim the grant carries, made before the threads start (not under test).
        let margin = crate::limiter::Margin {
            fraction: 0.0,
            floor: std::time::Duration::ZERO,
        };
        let claim =
            crate::limiter::WindowGuard::new(std::time::Duration::from_secs(60), margin, 1, 1)
                .try_claim(0)
                .unwrap();
        let mut ticket = q.enqueue(Priority::Low, false).unwrap();
        let granter = {
            let q = std::sync::Arc::clone(&q);
            thread::spawn(move || q.grant_next(claim).is_ok())
        };
        let canceller =
            thread::spawn(move || ticket.cancel(crate::limiter::DropReason::ClientGone));
        let granted = granter.join().unwrap();
        let cancelled = canceller.join().unwrap();
        assert!(granted != cancelled, "exactly one of grant and cancel wins");
        let c = q.counts();
        assert_eq!((c.total, c.depth), (0, [0; 3]));
        assert_eq!(c.dequeued, u64::from(granted));
        assert_eq!(
            c.abandoned,
            u64::from(cancelled),
            "and the drop counted once"
        );
        assert_eq!(c.enqueued, c.dequeued + c.abandoned);
    });
}
