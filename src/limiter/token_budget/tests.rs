//! The token budget's rules on explicit clock nanoseconds: reservation against the
//! limit, pending reservations, dating at the send, settlement in both charge models,
//! refunds, expiry with the window, holds; and a multi-thread stress test.

use std::sync::atomic::{AtomicU64 as StdAtomicU64, Ordering as StdOrdering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use super::*;

const S: u64 = 1_000_000_000;
/// A 60 s window with a 1 s margin: sub-windows of 1 s.
const SPAN: u64 = 62 * S;

fn budget(limit: u64) -> TokenBudget {
    TokenBudget::new(limit, SPAN, Duration::from_millis(250))
}

fn cost(prompt: u64, completion: u64) -> Cost {
    Cost { prompt, completion }
}

#[test]
fn reservations_pass_until_the_limit_counting_those_not_yet_sent() {
    let b = budget(1_000);
    let a = b.try_reserve(cost(300, 300), 0).unwrap();
    let _c = b.try_reserve(cost(200, 200), 0).unwrap();
    assert_eq!(b.pending(), 1_000);
    assert!(b.try_reserve(cost(1, 0), 0).is_err(), "pending counts");
    b.send(a, S);
    assert!(b.try_reserve(cost(1, 0), 2 * S).is_err(), "sent counts too");
    assert_eq!(b.view(2 * S).remaining, 0);
}

#[test]
fn a_charge_is_dated_at_its_send_and_leaves_with_its_window() {
    let b = budget(1_000);
    let r = b.try_reserve(cost(600, 400), 0).unwrap();
    // Sent 10 s after it was reserved: it counts from then.
    let sent = b.send(r, 10 * S);
    assert_eq!((sent.at, sent.charged), (10 * S, 1_000));
    assert_eq!(b.charged_in(10 * S + SPAN - 1, SPAN), 1_000);
    assert!(b.try_reserve(cost(1, 0), 10 * S + SPAN - 1).is_err());
    let wait = b.wait_time(cost(1, 0), 10 * S + SPAN - 1);
    assert_eq!(
        wait,
        Duration::from_nanos(S + 1),
        "its sub-window leaves whole"
    );
    assert!(b.try_reserve(cost(1_000, 0), 11 * S + SPAN).is_ok());
}

#[test]
fn a_send_is_never_dated_before_its_reservation() {
    let b = budget(1_000);
    let r = b.try_reserve(cost(10, 0), 5 * S).unwrap();
    assert_eq!(b.send(r, 3 * S).at, 5 * S);
}

#[test]
fn settlement_under_reserved_keeps_the_completion_bound_where_it_was_sent() {
    let b = budget(10_000);
    let r = b.try_reserve(cost(1_000, 2_000), 0).unwrap();
    let mut s = b.send(r, 0);
    let actual = Some(Usage {
        prompt: 1_200,
        completion: 50,
    });
    let settled = b.settle(&mut s, Charge::Reserved, actual, 10 * S);
    assert_eq!(settled, 3_200, "actual prompt + the bound");
    assert_eq!(
        s.at, 0,
        "dated at its send: the provider counted it on arrival"
    );
    assert_eq!(b.charged_in(S, SPAN), 3_200);
    assert_eq!(
        b.charged_in(S + SPAN, SPAN),
        0,
        "gone with its send's sub-window"
    );
}

#[test]
fn settlement_under_actual_gives_unused_tokens_back_and_dates_the_charge_at_the_end() {
    let b = budget(10_000);
    let r = b.try_reserve(cost(1_000, 8_000), 0).unwrap();
    let mut s = b.send(r, 5 * S);
    assert!(b.try_reserve(cost(2_000, 0), 6 * S).is_err());
    let usage = Some(Usage {
        prompt: 900,
        completion: 100,
    });
    // The answer ends at 9.5 s: the provider counts its 1,000 tokens from then.
    assert_eq!(
        b.settle(&mut s, Charge::Actual, usage, 9 * S + S / 2),
        1_000
    );
    assert_eq!(s.at, 9 * S + S / 2);
    let rest = b.try_reserve(cost(9_000, 0), 10 * S).unwrap();
    b.send(rest, 10 * S);
    assert_eq!(b.charged_in(10 * S, SPAN), 10_000);
    // Its send's sub-window (5 s) leaving takes nothing off: it left with the move.
    assert_eq!(
        b.charged_in(6 * S + SPAN, SPAN),
        10_000,
        "counted from its end, not its send"
    );
    assert_eq!(
        b.charged_in(10 * S + SPAN, SPAN),
        9_000,
        "gone with its end's"
    );
}

#[test]
fn an_actual_charge_moved_to_its_end_never_dates_before_its_send() {
    let b = budget(10_000);
    let r = b.try_reserve(cost(100, 100), 0).unwrap();
    let mut s = b.send(r, 5 * S);
    b.settle(&mut s, Charge::Actual, None, 4 * S);
    assert_eq!(
        (s.at, s.charged),
        (5 * S, 200),
        "a stale end: dated at the send"
    );
    assert_eq!(b.charged_in(5 * S, SPAN), 200);
}

#[test]
fn with_no_usage_the_estimate_stays() {
    assert_eq!(Charge::Actual.settled(cost(10, 20), None), 30);
    assert_eq!(Charge::Reserved.settled(cost(10, 20), None), 30);
}

#[test]
fn a_reservation_given_back_unsent_frees_everything_at_once() {
    let b = budget(1_000);
    let r = b.try_reserve(cost(1_000, 0), 0).unwrap();
    assert!(b.try_reserve(cost(1, 0), 0).is_err());
    b.give_back(r);
    assert_eq!(b.pending(), 0);
    assert!(b.try_reserve(cost(1_000, 0), 0).is_ok());
}

#[test]
fn a_reservation_larger_than_the_limit_goes_only_into_an_empty_span() {
    let b = budget(1_000);
    let small = b.try_reserve(cost(1, 0), 0).unwrap();
    assert!(b.try_reserve(cost(5_000, 0), 0).is_err());
    b.give_back(small);
    let big = b.try_reserve(cost(5_000, 0), 0).unwrap();
    b.send(big, 0);
    assert!(b.try_reserve(cost(1, 0), S).is_err());
}

#[test]
fn a_hold_refuses_every_reservation_until_it_ends() {
    let b = budget(1_000);
    b.hold(5 * S);
    assert_eq!(b.try_reserve(cost(1, 0), S), Err(Duration::from_secs(4)));
    assert_eq!(b.wait_time(cost(1, 0), S), Duration::from_secs(4));
    assert!(b.try_reserve(cost(1, 0), 5 * S).is_ok());
}

#[test]
fn only_pending_reservations_in_the_way_wait_the_pending_wait() {
    let b = budget(100);
    let _r = b.try_reserve(cost(100, 0), 0).unwrap();
    assert_eq!(
        b.try_reserve(cost(1, 0), 0),
        Err(Duration::from_millis(250))
    );
}

#[test]
fn a_head_keeps_the_deadline_it_was_first_given_until_another_head_comes() {
    let b = budget(1_000);
    assert_eq!(b.head_deadline(5 * S, 70 * S), 70 * S);
    assert_eq!(
        b.head_deadline(5 * S, 90 * S),
        70 * S,
        "the first one stays"
    );
    assert_eq!(
        b.head_deadline(6 * S, 95 * S),
        95 * S,
        "a new head, a new deadline"
    );
    assert_eq!(b.head_deadline(6 * S, 99 * S), 95 * S);
}

#[test]
fn a_lowered_limit_keeps_the_charges_and_admits_when_they_leave() {
    let b = budget(1_000);
    let r = b.try_reserve(cost(800, 0), 0).unwrap();
    b.send(r, 0);
    b.set_limit(500);
    assert!(b.try_reserve(cost(1, 0), S).is_err());
    assert!(b.try_reserve(cost(500, 0), SPAN + S).is_ok());
}

#[test]
fn extra_charges_the_provider_counted_take_room_now() {
    let b = budget(1_000);
    b.charge_extra(700, 3 * S);
    assert_eq!(b.view(3 * S).remaining, 300);
    assert!(b.try_reserve(cost(301, 0), 3 * S).is_err());
}

/// Threads reserve random costs on a shared clock, send each one (dated at the send)
/// and settle it under one of the two models; a checker records each charge as it
/// settles. No rolling span ever holds more than the limit at admission time, and at
/// the end nothing is pending and every reservation was settled or given back.
#[test]
fn stress_no_span_over_the_limit_and_every_reservation_settled() {
    const THREADS: usize = 4;
    const ROUNDS: usize = 4_000;
    const LIMIT: u64 = 50_000;
    let b = Arc::new(TokenBudget::new(LIMIT, 1_000_000, Duration::from_micros(1)));
    let clock = Arc::new(StdAtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS));
    let log = Arc::new(parking_lot::Mutex::new(Vec::<(u64, u64)>::new()));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (b, clock, start, log) = (b.clone(), clock.clone(), start.clone(), log.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                let (mut admitted, mut settled, mut overlapped) = (0u64, 0u64, 0u64);
                for _ in 0..ROUNDS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let c = cost(rng % 4_000 + 1, (rng >> 20) % 4_000);
                    // The clock moves by a few µs per attempt, shared by all.
                    let now = clock.fetch_add(rng % 700, StdOrdering::Relaxed);
                    let Ok(r) = b.try_reserve(c, now) else {
                        continue;
                    };
                    admitted += 1;
                    std::thread::yield_now();
                    // Another thread's reservation was pending beside this one.
                    overlapped += u64::from(b.pending() > c.total());
                    if rng.is_multiple_of(7) {
                        b.give_back(r);
                        settled += 1;
                        continue;
                    }
                    let sent_at = clock.load(StdOrdering::Relaxed);
                    let mut s = b.send(r, sent_at);
                    let charge = if rng.is_multiple_of(2) {
                        Charge::Actual
                    } else {
                        Charge::Reserved
                    };
                    let usage = Usage {
                        prompt: c.prompt,
                        completion: (rng >> 40) % (c.completion + 1),
                    };
                    // The answer ends at once (later ends are the move's, tested alone).
                    let to = b.settle(&mut s, charge, Some(usage), sent_at);
                    log.lock().push((s.at, to));
                    settled += 1;
                }
                (admitted, settled, overlapped)
            })
        })
        .collect();
    let totals: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let admitted: u64 = totals.iter().map(|t| t.0).sum();
    let settled: u64 = totals.iter().map(|t| t.1).sum();
    assert_eq!(admitted, settled, "every reservation settled exactly once");
    assert!(admitted > 100, "enough were admitted to mean something");
    assert_eq!(b.pending(), 0, "nothing left pending");
    // Settled charges never raise above the estimate here, so every rolling span of
    // dated charges stays within the limit.
    let mut log = log.lock().clone();
    log.sort_unstable();
    let mut lo = 0;
    let mut sum = 0u64;
    for hi in 0..log.len() {
        sum += log[hi].1;
        while log[lo].0 + b.span_nanos() <= log[hi].0 {
            sum -= log[lo].1;
            lo += 1;
        }
        assert!(sum <= LIMIT, "span ending at {} holds {sum}", log[hi].0);
    }
    let overlapped: u64 = totals.iter().map(|t| t.2).sum();
    assert!(overlapped > 0, "reservations were pending at the same time");
}
