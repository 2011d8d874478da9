//! The limiter's admission rules, on explicit clock nanoseconds: the fast path,
//! parking, the dispatcher's grants and their timing, refunds.

use super::*;
use crate::clock::{Clock, ManualClock};
use crate::limiter::provider::testing::{limiter, queued, MS, S};
use crate::limiter::queue::testing::is_granted;
use crate::limiter::queue::DropReason;

#[test]
fn abandoning_a_ticket_the_grant_reached_first_returns_the_grant_and_counts_no_drop() {
    let l = limiter(60.0, 1, 4);
    let waiting = l.queues.enqueue(Priority::Normal, false).unwrap();
    waiting.abandon(DropReason::Shutdown);
    let granted = l.queues.enqueue(Priority::Normal, false).unwrap();
    assert_eq!(l.dispatch(0), None);
    assert_eq!(l.bucket.tokens(0), 0.0, "the grant took the token");
    granted.abandon(DropReason::Shutdown);
    let c = l.queues.counts();
    assert_eq!((c.enqueued, c.dequeued), (2, 1));
    assert_eq!(
        c.dropped(DropReason::Shutdown),
        1,
        "only the one still waiting"
    );
    assert_eq!(l.dispatch(0), None);
    assert_eq!(
        l.bucket.tokens(0),
        1.0,
        "the unseen grant's token came back"
    );
}

#[test]
fn admit_takes_the_fast_path_when_nobody_waits_and_a_token_is_free() {
    let l = limiter(60.0, 2, 4);
    assert!(matches!(
        l.admit(Priority::Normal, None, 0),
        Decision::Admitted(_)
    ));
    assert!(matches!(
        l.admit(Priority::Low, None, 0),
        Decision::Admitted(_)
    ));
    assert_eq!(l.bucket.tokens(0), 0.0);
    assert!(l.queues.is_empty());
    let mut t = queued(l.admit(Priority::Normal, None, 0));
    assert!(!is_granted(&mut t));
}

#[test]
fn admit_parks_behind_waiters_even_when_a_token_is_free() {
    let l = limiter(60.0, 1, 4);
    assert!(matches!(
        l.admit(Priority::Normal, None, 0),
        Decision::Admitted(_)
    ));
    let mut first = queued(l.admit(Priority::Normal, None, 0));
    // A second later a token is free, but someone waits: no jumping, not even by a
    // higher priority; the dispatcher decides.
    assert_eq!(l.bucket.tokens(S), 1.0);
    let mut high = queued(l.admit(Priority::High, None, S));
    assert_eq!(l.bucket.tokens(S), 1.0, "parking took no token");
    assert_eq!(l.dispatch(S), Some(Duration::from_secs(1)));
    assert!(is_granted(&mut high), "strict priority among the waiters");
    assert!(!is_granted(&mut first));
    assert_eq!(l.dispatch(2 * S), None);
    assert!(is_granted(&mut first));
}

#[test]
fn admit_refuses_at_the_bound_with_those_ahead() {
    let l = limiter(60.0, 1, 2);
    assert!(matches!(
        l.admit(Priority::Normal, None, 0),
        Decision::Admitted(_)
    ));
    let _a = queued(l.admit(Priority::Low, None, 0));
    let _b = queued(l.admit(Priority::Normal, None, 0));
    match l.admit(Priority::Normal, None, 0) {
        Decision::Full(full) => assert_eq!(
            full,
            QueueFull {
                ahead: 1,
                tokens: 0
            }
        ),
        other => panic!("expected Full, got {other:?}"),
    }
}

#[test]
fn a_requeued_request_is_granted_before_new_arrivals_of_its_priority() {
    let l = limiter(60.0, 1, 4);
    assert!(matches!(
        l.admit(Priority::Normal, None, 0),
        Decision::Admitted(_)
    ));
    let mut new = queued(l.admit(Priority::Normal, None, 0));
    let mut retry = l.requeue(Priority::Normal, None, 0).unwrap();
    assert_eq!(l.dispatch(S), Some(Duration::from_secs(1)));
    assert!(is_granted(&mut retry));
    assert!(!is_granted(&mut new));
}

#[test]
fn dispatch_grants_while_tokens_last_and_says_when_the_next_is_due() {
    let l = limiter(60.0, 3, 10);
    let mut tickets: Vec<_> = (0..5)
        .map(|_| l.queues.enqueue(Priority::Normal, false).unwrap())
        .collect();
    assert_eq!(l.dispatch(0), Some(Duration::from_secs(1)));
    let granted = |ts: &mut Vec<Ticket>| ts.iter_mut().map(is_granted).filter(|&g| g).count();
    assert_eq!(granted(&mut tickets), 3);
    assert_eq!(l.dispatch(S - 1), Some(Duration::from_nanos(1)));
    assert_eq!(l.dispatch(S), Some(Duration::from_secs(1)));
    assert_eq!(granted(&mut tickets), 4);
    assert_eq!(l.dispatch(2 * S), None, "the last waiter was granted");
    assert_eq!(granted(&mut tickets), 5);
    assert_eq!(l.dispatch(3 * S), None, "an empty queue needs no wake-up");
}

#[test]
fn waiters_that_left_cost_no_token() {
    let l = limiter(60.0, 2, 4);
    drop(l.queues.enqueue(Priority::High, false).unwrap());
    drop(l.queues.enqueue(Priority::Normal, true).unwrap());
    assert_eq!(l.dispatch(0), None);
    assert_eq!(l.bucket.tokens(0), 2.0);
    // With a live waiter behind tombstones, exactly one token is spent on it.
    drop(l.queues.enqueue(Priority::High, false).unwrap());
    let mut live = l.queues.enqueue(Priority::Low, false).unwrap();
    assert_eq!(l.dispatch(0), None);
    assert!(is_granted(&mut live));
    assert_eq!(l.bucket.tokens(0), 1.0);
}

#[test]
fn a_grant_dropped_before_it_was_seen_gives_its_token_back() {
    let l = limiter(60.0, 1, 4);
    let unseen = l.queues.enqueue(Priority::Normal, false).unwrap();
    assert_eq!(l.dispatch(0), None);
    assert_eq!(l.bucket.tokens(0), 0.0, "the grant took the token");
    drop(unseen);
    assert_eq!(l.queues.len(), 0);
    assert_eq!(l.dispatch(0), None);
    assert_eq!(l.bucket.tokens(0), 1.0, "refunded by the next dispatch");
    // Seen (polled ready) or explicitly kept (cancel() == false): nothing to refund.
    let mut seen = l.queues.enqueue(Priority::Normal, false).unwrap();
    let mut kept = l.queues.enqueue(Priority::Normal, false).unwrap();
    assert_eq!(l.dispatch(0), Some(Duration::from_secs(1)));
    assert_eq!(l.dispatch(S), None);
    assert!(is_granted(&mut seen));
    assert!(!kept.cancel(DropReason::ClientGone));
    drop((seen, kept));
    assert_eq!(l.dispatch(S), None);
    assert_eq!(l.bucket.tokens(S), 0.0);
}

/// Cluster mode: a grant its waiter left unseen (its deadline won the race) comes back
/// at the next dispatch, often after the task put the next lease in the pot. Its token
/// is of the lease it was taken from: added to the next lease, it would go out after
/// its own grant stopped counting it in the shared log (one over the provider's limit).
#[test]
fn in_cluster_mode_an_unused_grant_returns_to_its_own_lease_only() {
    use crate::limiter::{LeasePot, Mode, PotLease};
    let pot = std::sync::Arc::new(LeasePot::new());
    pot.set_mode(Mode::Shared);
    let l = limiter(60.0, 10, 4).leased(std::sync::Arc::clone(&pot));
    let lease = |number, tokens, from: u64| PotLease {
        number,
        tokens,
        not_before: from,
        expires: from + 50 * MS,
        covers_until: from + 60 * MS,
    };
    pot.fill(lease(1, 1, 0), 0);
    let unseen = l.queues.enqueue(Priority::Normal, false).unwrap();
    assert_eq!(l.dispatch(0), None);
    assert_eq!(pot.tokens(), 0, "granted lease 1's token");
    drop(unseen);
    pot.fill(lease(2, 1, 60 * MS), 0);
    assert_eq!(l.dispatch(60 * MS), None);
    assert_eq!(
        pot.tokens(),
        1,
        "lease 2 holds its own token only: lease 1's stays spent"
    );
    // Back while its lease is in hand, it is taken again with that lease's number.
    let Decision::Admitted(g) = l.admit(Priority::Normal, None, 60 * MS) else {
        panic!("lease 2's token")
    };
    assert_eq!(g.claim.lease, 2);
    l.refund(g.claim, 61 * MS);
    assert_eq!(pot.tokens(), 1, "given back into lease 2");
    assert_eq!(
        l.bucket.tokens(61 * MS),
        10.0,
        "the local bucket is not touched"
    );
}

/// Cluster mode: a request written after the time its lease's grant covers (a busy
/// machine between the grant and the write) is reported for the shared log to count it
/// again from its send; one written in time is not.
#[test]
fn in_cluster_mode_a_send_written_after_its_lease_time_is_reported() {
    use crate::limiter::{LeasePot, Mode, Permit, PotLease};
    let pot = std::sync::Arc::new(LeasePot::new());
    pot.set_mode(Mode::Shared);
    let l = limiter(60.0, 10, 4).leased(std::sync::Arc::clone(&pot));
    pot.fill(
        PotLease {
            number: 3,
            tokens: 2,
            not_before: 0,
            expires: 50 * MS,
            covers_until: 60 * MS,
        },
        0,
    );
    for (written, late) in [(60 * MS, None), (90 * MS, Some(90 * MS))] {
        let Decision::Admitted(g) = l.admit(Priority::Normal, None, 40 * MS) else {
            panic!("a token of lease 3")
        };
        let mut p = Permit::new(&l, g);
        p.stamp(written);
        assert_eq!(pot.next_late(), late, "written at {written}");
    }
    // The local bucket's sends (fallback mode) have no lease to be late for.
    pot.set_mode(Mode::Fallback);
    let Decision::Admitted(g) = l.admit(Priority::Normal, None, 40 * MS) else {
        panic!("a token of the local bucket")
    };
    assert_eq!(g.claim.lease, 0);
    Permit::new(&l, g).stamp(10 * S);
    assert_eq!(pot.next_late(), None);
}

/// The dispatcher's loop on a manual clock: it wakes `lateness[k % len]` after each
/// wait `dispatch` asked for, until `end`. Returns the time of every grant.
fn late_dispatcher(l: &Limiter, clock: &ManualClock, lateness: &[Duration], end: u64) -> Vec<u64> {
    let mut grants = Vec::new();
    for late in lateness.iter().cycle() {
        let now = clock.now_nanos();
        if now > end {
            break;
        }
        let before = l.queues.counts().dequeued;
        let wait = l.dispatch(now).expect("waiters remain");
        grants.extend((before..l.queues.counts().dequeued).map(|_| now));
        clock.advance(wait + *late);
    }
    grants
}

/// A limiter at 6000 RPM (T = 10 ms, slack 2.5 ms), burst 1, with `n` parked waiters.
fn saturated(n: usize) -> (Limiter, Vec<Ticket>) {
    let l = limiter(6000.0, 1, n);
    let tickets = (0..n)
        .map(|_| l.queues.enqueue(Priority::Normal, false).unwrap())
        .collect();
    (l, tickets)
}

#[test]
fn a_dispatcher_late_by_less_than_the_slack_still_grants_exactly_n_in_n_intervals() {
    const N: u64 = 1_000;
    let t0 = 1_000 * S;
    let (l, _tickets) = saturated(N as usize + 10);
    let clock = ManualClock::new();
    clock.set(t0);
    let us = Duration::from_micros;
    // Every wake-up late, by varying amounts up to the whole slack.
    let lateness = [us(2_000), us(50), us(1_300), us(2_500), us(700)];
    let grants = late_dispatcher(&l, &clock, &lateness, t0 + N * 10 * MS);
    // The k-th grant is late by its own wake-up only: nothing accumulates.
    for (k, &at) in grants.iter().enumerate().skip(1) {
        let late = lateness[(k - 1) % lateness.len()].as_nanos() as u64;
        assert_eq!(at, t0 + k as u64 * 10 * MS + late, "grant {k}");
    }
    let in_n_intervals = grants.iter().filter(|&&at| at < t0 + N * 10 * MS).count();
    assert_eq!(in_n_intervals as u64, N, "the long-run rate is exact");
}

#[test]
fn a_dispatcher_late_by_more_than_the_slack_loses_its_lateness_as_before() {
    let t0 = 1_000 * S;
    let (l, _tickets) = saturated(200);
    let clock = ManualClock::new();
    clock.set(t0);
    // 3 ms late each time (slack 2.5 ms): every grant one interval after the last.
    let grants = late_dispatcher(&l, &clock, &[Duration::from_millis(3)], t0 + S);
    for (k, &at) in grants.iter().enumerate() {
        assert_eq!(at, t0 + k as u64 * 13 * MS, "grant {k}");
    }
    assert_eq!(grants.len(), 77, "1 s / 13 ms, plus the grant at t0");
}

#[test]
fn a_refund_returns_the_token_to_the_bucket() {
    let l = limiter(60.0, 1, 4);
    let Decision::Admitted(c) = l.admit(Priority::Normal, None, 0) else {
        panic!("a token was free")
    };
    assert_eq!(l.guard.in_span(0), 1);
    l.refund(c.claim, 0);
    assert_eq!(l.guard.in_span(0), 0, "the window slot is free again");
    assert!(matches!(
        l.admit(Priority::Normal, None, 0),
        Decision::Admitted(_)
    ));
}
