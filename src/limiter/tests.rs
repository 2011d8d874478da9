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
    Pin::new(ticket)
        .poll(&mut Context::from_waker(waker))
        .map(|_| ())
}

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

fn is_granted(ticket: &mut Ticket) -> bool {
    let waker = Waker::from(Arc::new(CountingWaker::default()));
    poll_with(ticket, &waker).is_ready()
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
        [0, 1, 1, 0, 0],
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

// === Limiter: admission ===

#[test]
fn admit_takes_the_fast_path_when_nobody_waits_and_a_token_is_free() {
    let l = limiter(60.0, 2, 4);
    assert!(matches!(
        l.admit(Priority::Normal, 0),
        Decision::Admitted(_)
    ));
    assert!(matches!(l.admit(Priority::Low, 0), Decision::Admitted(_)));
    assert_eq!(l.bucket.tokens(0), 0.0);
    assert!(l.queues.is_empty());
    let mut t = queued(l.admit(Priority::Normal, 0));
    assert!(!is_granted(&mut t));
}

#[test]
fn admit_parks_behind_waiters_even_when_a_token_is_free() {
    let l = limiter(60.0, 1, 4);
    assert!(matches!(
        l.admit(Priority::Normal, 0),
        Decision::Admitted(_)
    ));
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
    assert!(matches!(
        l.admit(Priority::Normal, 0),
        Decision::Admitted(_)
    ));
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
    assert!(matches!(
        l.admit(Priority::Normal, 0),
        Decision::Admitted(_)
    ));
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
    assert!(!kept.cancel(DropReason::ClientGone));
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
    let Decision::Admitted(c) = l.admit(Priority::Normal, 0) else {
        panic!("a token was free")
    };
    assert_eq!(l.guard.in_span(0), 1);
    l.refund(c, 0);
    assert_eq!(l.guard.in_span(0), 0, "the window slot is free again");
    assert!(matches!(
        l.admit(Priority::Normal, 0),
        Decision::Admitted(_)
    ));
}

// === Limiter: learning, window guard, retreat and pauses ===

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
    match l.admit(Priority::Normal, now) {
        Decision::Admitted(c) => {
            l.guard.stamp(c.slot, now);
            c
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
    let _waiting = queued(l.admit(Priority::Normal, 0));
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
        l.admit(Priority::Normal, 67 * S)
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
    assert_eq!(l.retry_after(0, 0), Duration::from_secs(1));
    assert_eq!(l.retry_after(4, 0), Duration::from_secs(4));
    assert!(l.retry_after(9, 0) > l.retry_after(8, 0));
    // Past a window's worth (60), the guard spaces sends over 60.3 s: 1.005 s each.
    assert_eq!(l.retry_after(70, 0), Duration::from_millis(70_050));
    // A pause comes first.
    l.bucket.pause_until(30 * S);
    assert_eq!(l.retry_after(2, 0), Duration::from_secs(32));
    // At a learned lower limit the drain is slower: 30 per minute, 2 s each.
    let l = limiter(60.0, 1, 4);
    l.restore(30, 0);
    assert_eq!(l.retry_after(4, 0), Duration::from_secs(8));
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
