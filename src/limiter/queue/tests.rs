//! Queue order, bound, cancellation and refusals, on explicit grants.

use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use super::testing::{answer, is_granted, poll_with, CountingWaker};
use super::*;
use crate::limiter::guard::{Claim, Margin, WindowGuard};

/// A claim from a guard that never binds, for grants in queue-only tests.
fn claim() -> Claim {
    let margin = Margin {
        fraction: 0.0,
        floor: Duration::ZERO,
    };
    WindowGuard::new(Duration::from_secs(60), margin, 1_000_000, 1_000_000)
        .try_claim(0)
        .expect("room")
}

/// Grants one waiter and returns the label of the ticket that became ready.
fn grant_one(q: &WaitQueues, tickets: &mut Vec<(&'static str, Ticket)>) -> &'static str {
    assert!(q.grant_next(claim()).is_ok(), "someone was waiting");
    let i = tickets
        .iter_mut()
        .position(|(_, t)| is_granted(t))
        .expect("the grant reached a ticket");
    tickets.remove(i).0
}

#[test]
fn grants_follow_strict_priority_between_levels_and_fifo_within_one() {
    let q = WaitQueues::new(10);
    let mut tickets = Vec::new();
    for (label, p) in [
        ("low1", Priority::Low),
        ("normal1", Priority::Normal),
        ("high1", Priority::High),
        ("low2", Priority::Low),
        ("normal2", Priority::Normal),
        ("high2", Priority::High),
    ] {
        tickets.push((label, q.enqueue(p, false).unwrap()));
    }
    let order: Vec<_> = (0..6).map(|_| grant_one(&q, &mut tickets)).collect();
    assert_eq!(
        order,
        ["high1", "high2", "normal1", "normal2", "low1", "low2"]
    );
    assert!(q.grant_next(claim()).is_err(), "nobody left");
}

#[test]
fn a_retry_goes_to_the_head_of_its_priority_but_behind_any_higher_one() {
    let q = WaitQueues::new(10);
    let mut tickets = Vec::new();
    for (label, p, front) in [
        ("normal_new", Priority::Normal, false),
        ("normal_retry1", Priority::Normal, true),
        ("low_retry", Priority::Low, true),
        ("high_new", Priority::High, false),
        ("normal_retry2", Priority::Normal, true),
    ] {
        tickets.push((label, q.enqueue(p, front).unwrap()));
    }
    let order: Vec<_> = (0..5).map(|_| grant_one(&q, &mut tickets)).collect();
    assert_eq!(
        order,
        [
            "high_new",
            "normal_retry1",
            "normal_retry2",
            "normal_new",
            "low_retry"
        ]
    );
}

#[test]
fn the_bound_is_never_exceeded_and_a_refusal_counts_those_at_or_above_its_priority() {
    let q = WaitQueues::new(4);
    let _held: Vec<_> = [
        Priority::High,
        Priority::Normal,
        Priority::Normal,
        Priority::Low,
    ]
    .into_iter()
    .map(|p| q.enqueue(p, false).unwrap())
    .collect();
    assert_eq!(q.len(), 4);
    assert_eq!(
        q.enqueue(Priority::High, false).unwrap_err(),
        QueueFull {
            ahead: 1,
            tokens: 0
        }
    );
    assert_eq!(
        q.enqueue(Priority::Normal, true).unwrap_err(),
        QueueFull {
            ahead: 3,
            tokens: 0
        }
    );
    assert_eq!(
        q.enqueue(Priority::Low, false).unwrap_err(),
        QueueFull {
            ahead: 4,
            tokens: 0
        }
    );
    let c = q.counts();
    assert_eq!((c.depth, c.total, c.max, c.enqueued), ([1, 2, 1], 4, 4, 4));
}

#[test]
fn shrinking_the_bound_keeps_everyone_queued_and_refuses_arrivals_until_depth_falls_below() {
    let q = WaitQueues::new(3);
    let mut tickets: Vec<_> = (0..3)
        .map(|_| q.enqueue(Priority::Normal, false).unwrap())
        .collect();
    q.set_max(1);
    assert_eq!(q.len(), 3, "nobody already queued is dropped");
    assert!(q.enqueue(Priority::High, false).is_err());
    assert!(q.grant_next(claim()).is_ok());
    assert_eq!(q.len(), 2);
    assert!(
        q.enqueue(Priority::High, false).is_err(),
        "2 is not below 1"
    );
    assert!(q.grant_next(claim()).is_ok());
    assert!(
        q.enqueue(Priority::High, false).is_err(),
        "1 is not below 1"
    );
    assert!(q.grant_next(claim()).is_ok());
    assert_eq!(q.len(), 0);
    let _t = q.enqueue(Priority::High, false).expect("room again");
    assert!(tickets.iter_mut().all(is_granted));
}

#[test]
fn a_dropped_ticket_frees_its_slot_at_once_and_is_skipped_without_a_grant() {
    let q = WaitQueues::new(2);
    let gone = q.enqueue(Priority::High, false).unwrap();
    let mut stays = q.enqueue(Priority::Normal, false).unwrap();
    assert!(q.enqueue(Priority::Low, false).is_err());
    drop(gone);
    assert_eq!(q.len(), 1);
    assert_eq!(q.counts().depth, [0, 1, 0]);
    let _room = q.enqueue(Priority::Low, false).expect("the slot was freed");
    assert!(q.grant_next(claim()).is_ok());
    assert!(is_granted(&mut stays), "the tombstone was skipped");
    assert_eq!(
        q.counts().dequeued,
        1,
        "the cancelled waiter was not granted"
    );
}

#[test]
fn a_cancelled_queue_drains_to_zero() {
    let q = WaitQueues::new(8);
    for p in Priority::ALL {
        drop(q.enqueue(p, false).unwrap());
        drop(q.enqueue(p, true).unwrap());
    }
    let c = q.counts();
    assert_eq!(
        (c.depth, c.total, c.enqueued, c.dequeued),
        ([0; 3], 0, 6, 0)
    );
    assert!(
        q.grant_next(claim()).is_err(),
        "only tombstones: nothing granted"
    );
}

#[test]
fn a_ticket_resolves_after_its_grant_and_wakes_its_task() {
    let q = WaitQueues::new(1);
    let mut t = q.enqueue(Priority::Normal, false).unwrap();
    let counter = Arc::new(CountingWaker::default());
    let waker = Waker::from(Arc::clone(&counter));
    assert_eq!(poll_with(&mut t, &waker), Poll::Pending);
    assert_eq!(counter.wakes(), 0);
    assert!(q.grant_next(claim()).is_ok());
    assert_eq!(counter.wakes(), 1);
    assert_eq!(poll_with(&mut t, &waker), Poll::Ready(()));
    assert!(
        !t.cancel(DropReason::ClientGone),
        "granted first: the caller owns the token"
    );
    assert_eq!(q.len(), 0);
}

#[test]
fn cancel_after_a_grant_returns_false_and_moves_no_counter() {
    let q = WaitQueues::new(2);
    let mut t = q.enqueue(Priority::Low, false).unwrap();
    assert!(q.grant_next(claim()).is_ok());
    assert!(!t.cancel(DropReason::ClientGone));
    assert!(!t.cancel(DropReason::ClientGone));
    let c = q.counts();
    assert_eq!((c.total, c.depth, c.dequeued), (0, [0; 3], 1));
}

#[test]
fn cancel_before_a_grant_wins_once() {
    let q = WaitQueues::new(2);
    let mut t = q.enqueue(Priority::Low, true).unwrap();
    assert_eq!(t.priority(), Priority::Low);
    assert!(t.cancel(DropReason::ClientGone));
    assert!(!t.cancel(DropReason::ClientGone), "only once");
    assert_eq!(q.len(), 0);
    assert!(q.grant_next(claim()).is_err());
    assert!(!is_granted(&mut t));
}

#[test]
fn the_queue_counts_each_leaving_once_by_priority_and_reason() {
    let q = WaitQueues::new(8);
    let mut high = q.enqueue(Priority::High, false).unwrap();
    let mut low_deadline = q.enqueue(Priority::Low, false).unwrap();
    let mut low_timeout = q.enqueue(Priority::Low, true).unwrap();
    let gone = q.enqueue(Priority::Normal, false).unwrap();
    let stays = q.enqueue(Priority::Normal, false).unwrap();
    assert!(q.grant_next(claim()).is_ok(), "high goes first");
    assert!(is_granted(&mut high));
    assert!(low_deadline.cancel(DropReason::LowPriorityDeadline));
    assert!(low_timeout.cancel(DropReason::Timeout));
    assert!(!low_timeout.cancel(DropReason::Shutdown), "counted once");
    drop(gone);
    drop((high, low_deadline, low_timeout));
    let c = q.counts();
    let f = |p: Priority| c.flow[p as usize];
    assert_eq!(
        (f(Priority::High).enqueued, f(Priority::High).dequeued),
        (1, 1)
    );
    assert_eq!(f(Priority::Normal).enqueued, 2);
    assert_eq!(
        f(Priority::Normal).dropped[DropReason::ClientGone as usize],
        1
    );
    assert_eq!(f(Priority::Low).enqueued, 2);
    assert_eq!(f(Priority::Low).dequeued, 0);
    assert_eq!(
        f(Priority::Low).dropped,
        [0, 1, 1, 0, 0, 0],
        "low_priority_deadline and timeout"
    );
    assert_eq!((c.enqueued, c.dequeued, c.abandoned), (5, 1, 3));
    assert_eq!(c.dropped(DropReason::Shutdown), 0);
    // For each priority: in = out with a token + out without one + still waiting.
    for p in Priority::ALL {
        let fl = f(p);
        assert_eq!(
            fl.enqueued,
            fl.dequeued + fl.dropped_total() + c.depth[p as usize] as u64,
            "{p:?}"
        );
    }
    drop(stays);
    assert_eq!(q.counts().dropped(DropReason::ClientGone), 2);
}

fn tokens(n: u64) -> Option<Cost> {
    Some(Cost {
        prompt: n,
        completion: 0,
    })
}

#[test]
fn a_limit_falling_below_waiters_refuses_each_once_and_keeps_the_others_in_order() {
    let q = WaitQueues::new(8);
    let mut tickets: Vec<_> = [("a", 1), ("big1", 9), ("b", 1), ("c", 5), ("big2", 6)]
        .into_iter()
        .map(|(label, n)| {
            (
                label,
                q.park(Priority::Normal, false, tokens(n), 0).unwrap(),
            )
        })
        .collect();
    let mut free = q.enqueue(Priority::Low, false).unwrap();
    q.stage().refuse_larger_than(5);
    let c = q.counts();
    assert_eq!((c.total, c.dropped(DropReason::TokensTooLarge)), (4, 2));
    assert_eq!(q.waiting_cost(), 7);
    for (label, t) in &mut tickets {
        let want = match *label {
            "big1" => Some(Err(TooLarge {
                limit: 5,
                estimate: 9,
            })),
            "big2" => Some(Err(TooLarge {
                limit: 5,
                estimate: 6,
            })),
            _ => None,
        };
        assert_eq!(answer(t), want, "{label}");
    }
    tickets.retain(|(label, _)| !label.starts_with("big"));
    {
        let mut stage = q.stage();
        assert_eq!(stage.top(1), Some(Priority::Normal));
        assert_eq!(
            stage.len(Priority::Normal),
            1,
            "the look is kept after a sweep"
        );
    }
    let order: Vec<_> = (0..3).map(|_| grant_one(&q, &mut tickets)).collect();
    assert_eq!(order, ["a", "b", "c"]);
    assert!(q.grant_next(claim()).is_ok());
    assert!(
        is_granted(&mut free),
        "a waiter without a cost is never refused"
    );
}

#[test]
fn a_refused_waiter_is_answered_once_and_a_cancel_first_wins_over_a_refusal() {
    let q = WaitQueues::new(4);
    let mut refused = q.park(Priority::High, true, tokens(10), 0).unwrap();
    let mut gone = q.park(Priority::High, false, tokens(10), 0).unwrap();
    assert!(gone.cancel(DropReason::Timeout));
    q.stage().refuse_larger_than(9);
    assert!(
        !refused.cancel(DropReason::ClientGone),
        "the refusal came first"
    );
    assert!(matches!(answer(&mut refused), Some(Err(_))));
    assert_eq!(refused.grant(), None);
    drop((refused, gone));
    let c = q.counts();
    assert_eq!(
        (c.total, c.abandoned, c.dropped(DropReason::TokensTooLarge)),
        (0, 2, 1)
    );
    assert_eq!(q.take_unused_grant(), None, "no grant to give back");
}

#[test]
fn only_a_fall_sweeps_and_a_waiter_parked_after_it_is_refused_when_staged() {
    let q = WaitQueues::new(4);
    q.stage().refuse_larger_than(5);
    // Parked after the fall (a retry skips admission's check): still in its lane.
    let mut late = q.park(Priority::Low, true, tokens(8), 0).unwrap();
    q.stage().refuse_larger_than(5);
    assert_eq!(answer(&mut late), None, "no fall: no sweep");
    assert_eq!(q.stage().top(1), None, "refused as it is staged");
    assert!(matches!(
        answer(&mut late),
        Some(Err(TooLarge {
            limit: 5,
            estimate: 8
        }))
    ));
    // A raise refuses nothing; waiters fit it.
    q.stage().refuse_larger_than(100);
    let mut fits = q.park(Priority::Low, false, tokens(50), 0).unwrap();
    assert!(q.grant_next(claim()).is_ok());
    assert!(is_granted(&mut fits));
}
