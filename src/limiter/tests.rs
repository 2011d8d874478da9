//! Queue order, bound and cancellation, and the limiter's admission rules, on explicit
//! clock nanoseconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use super::*;
use crate::clock::{Clock, ManualClock};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

impl CountingWaker {
    fn wakes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

fn poll_with(ticket: &mut Ticket, waker: &Waker) -> Poll<()> {
    Pin::new(ticket).poll(&mut Context::from_waker(waker))
}

fn is_granted(ticket: &mut Ticket) -> bool {
    let waker = Waker::from(Arc::new(CountingWaker::default()));
    poll_with(ticket, &waker).is_ready()
}

/// Grants one waiter and returns the label of the ticket that became ready.
fn grant_one(q: &WaitQueues, tickets: &mut Vec<(&'static str, Ticket)>) -> &'static str {
    assert!(q.grant_next(), "someone was waiting");
    let i = tickets
        .iter_mut()
        .position(|(_, t)| is_granted(t))
        .expect("the grant reached a ticket");
    tickets.remove(i).0
}

fn limiter(rpm: f64, capacity: u32, queue_max: usize) -> Limiter {
    Limiter::new(rpm, capacity, queue_max, RetreatConfig::default())
}

fn queued(d: Decision) -> Ticket {
    match d {
        Decision::Queued(t) => t,
        other => panic!("expected Queued, got {other:?}"),
    }
}

// === WaitQueues ===

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
    assert!(!q.grant_next(), "nobody left");
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
        QueueFull { ahead: 1 }
    );
    assert_eq!(
        q.enqueue(Priority::Normal, true).unwrap_err(),
        QueueFull { ahead: 3 }
    );
    assert_eq!(
        q.enqueue(Priority::Low, false).unwrap_err(),
        QueueFull { ahead: 4 }
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
    assert!(q.grant_next());
    assert_eq!(q.len(), 2);
    assert!(
        q.enqueue(Priority::High, false).is_err(),
        "2 is not below 1"
    );
    assert!(q.grant_next());
    assert!(
        q.enqueue(Priority::High, false).is_err(),
        "1 is not below 1"
    );
    assert!(q.grant_next());
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
    assert!(q.grant_next());
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
    assert!(!q.grant_next(), "only tombstones: nothing granted");
}

#[test]
fn a_ticket_resolves_after_its_grant_and_wakes_its_task() {
    let q = WaitQueues::new(1);
    let mut t = q.enqueue(Priority::Normal, false).unwrap();
    let counter = Arc::new(CountingWaker::default());
    let waker = Waker::from(Arc::clone(&counter));
    assert_eq!(poll_with(&mut t, &waker), Poll::Pending);
    assert_eq!(counter.wakes(), 0);
    assert!(q.grant_next());
    assert_eq!(counter.wakes(), 1);
    assert_eq!(poll_with(&mut t, &waker), Poll::Ready(()));
    assert!(!t.cancel(), "granted first: the caller owns the token");
    assert_eq!(q.len(), 0);
}

#[test]
fn cancel_after_a_grant_returns_false_and_moves_no_counter() {
    let q = WaitQueues::new(2);
    let mut t = q.enqueue(Priority::Low, false).unwrap();
    assert!(q.grant_next());
    assert!(!t.cancel());
    assert!(!t.cancel());
    let c = q.counts();
    assert_eq!((c.total, c.depth, c.dequeued), (0, [0; 3], 1));
}

#[test]
fn cancel_before_a_grant_wins_once() {
    let q = WaitQueues::new(2);
    let mut t = q.enqueue(Priority::Low, true).unwrap();
    assert_eq!(t.priority(), Priority::Low);
    assert!(t.cancel());
    assert!(!t.cancel(), "only once");
    assert_eq!(q.len(), 0);
    assert!(!q.grant_next());
    assert!(!is_granted(&mut t));
}

// === Limiter: admission ===

#[test]
fn admit_takes_the_fast_path_when_nobody_waits_and_a_token_is_free() {
    let l = limiter(60.0, 2, 4);
    assert!(matches!(l.admit(Priority::Normal, 0), Decision::Admitted));
    assert!(matches!(l.admit(Priority::Low, 0), Decision::Admitted));
    assert_eq!(l.bucket.tokens(0), 0.0);
    assert!(l.queues.is_empty());
    let mut t = queued(l.admit(Priority::Normal, 0));
    assert!(!is_granted(&mut t));
}

#[test]
fn admit_parks_behind_waiters_even_when_a_token_is_free() {
    let l = limiter(60.0, 1, 4);
    assert!(matches!(l.admit(Priority::Normal, 0), Decision::Admitted));
    let mut first = queued(l.admit(Priority::Normal, 0));
    // A second later a token is free, but someone waits: no jumping, not even by a
    // higher priority; the dispatcher decides.
    assert_eq!(l.bucket.tokens(S), 1.0);
    let mut high = queued(l.admit(Priority::High, S));
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
    assert!(matches!(l.admit(Priority::Normal, 0), Decision::Admitted));
    let _a = queued(l.admit(Priority::Low, 0));
    let _b = queued(l.admit(Priority::Normal, 0));
    match l.admit(Priority::Normal, 0) {
        Decision::Full(full) => assert_eq!(full, QueueFull { ahead: 1 }),
        other => panic!("expected Full, got {other:?}"),
    }
}

#[test]
fn a_requeued_request_is_granted_before_new_arrivals_of_its_priority() {
    let l = limiter(60.0, 1, 4);
    assert!(matches!(l.admit(Priority::Normal, 0), Decision::Admitted));
    let mut new = queued(l.admit(Priority::Normal, 0));
    let mut retry = l.requeue(Priority::Normal).unwrap();
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
    assert!(!kept.cancel());
    drop((seen, kept));
    assert_eq!(l.dispatch(S), None);
    assert_eq!(l.bucket.tokens(S), 0.0);
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
    assert!(matches!(l.admit(Priority::Normal, 0), Decision::Admitted));
    l.refund(0);
    assert!(matches!(l.admit(Priority::Normal, 0), Decision::Admitted));
}

// === Limiter: retreat and pauses ===

#[test]
fn an_upstream_429_halves_the_effective_rate_and_pauses_for_retry_after() {
    let l = limiter(60.0, 1, 4);
    let cut = l.on_upstream_429(10 * S, Some(Duration::from_secs(5)));
    assert_eq!(cut.effective_rpm, Some(30.0));
    assert_eq!(cut.transition.map(|t| t.to), Some(RetreatState::Retreating));
    assert_eq!(l.bucket.rate(), (30.0, 1), "capacity kept");
    assert_eq!(l.bucket.wait_time(10 * S), Duration::from_secs(5));
    assert_eq!(
        l.bucket.try_acquire(15 * S - 1),
        Err(Duration::from_nanos(1))
    );
    assert_eq!(l.bucket.try_acquire(15 * S), Ok(()));
    // Then one token per new interval (2 s).
    assert_eq!(l.bucket.wait_time(15 * S), Duration::from_secs(2));
}

#[test]
fn a_429_without_retry_after_pauses_for_the_configured_default() {
    let l = Limiter::new(
        60.0,
        1,
        4,
        RetreatConfig {
            default_pause: Duration::from_millis(1500),
            ..RetreatConfig::default()
        },
    );
    l.on_upstream_429(0, None);
    assert_eq!(l.bucket.wait_time(0), Duration::from_millis(1500));
}

#[test]
fn a_second_429_in_the_same_burst_pauses_but_does_not_cut_again() {
    let l = limiter(60.0, 1, 4);
    l.on_upstream_429(0, Some(Duration::from_secs(1)));
    let cut = l.on_upstream_429(100 * MS, Some(Duration::from_secs(3)));
    assert_eq!(cut.effective_rpm, None);
    assert_eq!(l.bucket.rate(), (30.0, 1));
    assert_eq!(l.bucket.wait_time(100 * MS), Duration::from_secs(3));
}

#[test]
fn quota_exhausted_pauses_until_the_reset() {
    let l = limiter(60.0, 3, 4);
    l.on_quota_exhausted(S, Duration::from_secs(6));
    assert_eq!(l.bucket.wait_time(S), Duration::from_secs(6));
    assert_eq!(l.bucket.try_acquire(7 * S), Ok(()));
}

#[test]
fn recovery_ticks_apply_the_climbing_rate_to_the_bucket() {
    let l = limiter(100.0, 2, 4);
    l.on_upstream_429(0, Some(Duration::ZERO));
    assert_eq!(l.bucket.rate(), (50.0, 2));
    assert_eq!(l.tick(29 * S), None);
    let t = l.tick(30 * S).expect("quiet period over");
    assert_eq!(t.to, RetreatState::Recovering);
    assert_eq!(
        l.bucket.rate(),
        (50.0, 2),
        "entering recovery changes no rate"
    );
    assert_eq!(l.tick(40 * S), None, "a step is no transition");
    assert_eq!(l.bucket.rate(), (60.0, 2));
    for k in 5..9 {
        l.tick(k * 10 * S);
    }
    let (rpm, _) = l.bucket.rate();
    assert!((rpm - 100.0).abs() < 1e-6, "back at base: {rpm}");
    assert_eq!(l.retreat.state(), RetreatState::Normal);
}

#[test]
fn a_recovery_step_keeps_the_tokens_there_are() {
    let l = limiter(100.0, 2, 4);
    l.on_upstream_429(0, Some(Duration::ZERO));
    l.tick(30 * S);
    // Drain at 40 s, then step: still nothing free.
    while l.bucket.try_acquire(40 * S).is_ok() {}
    l.tick(40 * S);
    assert_eq!(l.bucket.rate(), (60.0, 2));
    assert_eq!(l.bucket.tokens(40 * S), 0.0);
    assert_eq!(l.bucket.wait_time(40 * S), Duration::from_secs(1));
}

#[test]
fn set_rate_follows_the_base_in_normal_and_is_capped_while_retreating() {
    let l = limiter(60.0, 1, 4);
    l.set_rate(120.0, 3, 0);
    assert_eq!(l.bucket.rate(), (120.0, 3));
    l.on_upstream_429(0, Some(Duration::ZERO)); // 60
    l.set_rate(240.0, 3, 0);
    assert_eq!(l.bucket.rate(), (60.0, 3), "a retreat keeps its lower rate");
}

#[test]
fn retry_after_grows_with_the_queue_ahead() {
    let l = limiter(60.0, 1, 4);
    assert_eq!(l.retry_after(0, 0), Duration::from_secs(1));
    assert_eq!(l.retry_after(4, 0), Duration::from_secs(5));
    assert!(l.retry_after(9, 0) > l.retry_after(8, 0));
    // Never sooner than the bucket's own wait (a pause).
    l.bucket.pause_until(30 * S);
    assert_eq!(l.retry_after(2, 0), Duration::from_secs(30));
    // At the retreated rate the drain is slower.
    let l = limiter(60.0, 1, 4);
    l.on_upstream_429(0, Some(Duration::ZERO));
    assert_eq!(l.retry_after(4, 0), Duration::from_secs(10));
}

// === parse_delay ===

#[test]
fn delays_parse_as_seconds_or_go_durations() {
    let ms = Duration::from_millis;
    assert_eq!(parse_delay("2"), Some(ms(2000)));
    assert_eq!(parse_delay(" 1.5 "), Some(ms(1500)));
    assert_eq!(parse_delay("0"), Some(Duration::ZERO));
    assert_eq!(parse_delay("1s"), Some(ms(1000)));
    assert_eq!(parse_delay("6m0s"), Some(ms(360_000)));
    assert_eq!(parse_delay("250ms"), Some(ms(250)));
    assert_eq!(parse_delay("1h2m3s"), Some(ms(3_723_000)));
    assert_eq!(parse_delay("1.5s"), Some(ms(1500)));
}

#[test]
fn garbage_negative_huge_and_http_dates_are_absent() {
    for raw in [
        "soon",
        "-1",
        "-1s",
        "1x",
        "s",
        "1s2",
        "1.2.3s",
        "NaN",
        "inf",
        "86400",
        "24h",
        "Wed, 21 Oct 2015 07:28:00 GMT",
    ] {
        assert_eq!(parse_delay(raw), None, "{raw:?}");
    }
}

#[test]
fn an_empty_value_is_absent() {
    assert_eq!(parse_delay(""), None);
    assert_eq!(parse_delay("   "), None);
}
