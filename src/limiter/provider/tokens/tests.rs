//! The token budget inside the limiter, on explicit clock nanoseconds: admission with a
//! cost, the reservation a request carries, the dispatcher's order with costs, what
//! answers teach; and a multi-thread stress test of the whole path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::limiter::provider::testing::{limiter, queued, S};
use crate::limiter::queue::testing::is_granted;
use crate::limiter::queue::{Grant, Ticket};
use crate::limiter::signal::{Quota, Refusal, TokenQuota, TokenRefusal};
use crate::limiter::token_budget::Charge;
use crate::limiter::{Decision, Permit};
use crate::priority::Priority;

/// A limiter whose request rules never bind (6,000 per minute, bursts of 1,000) with a
/// budget of `tokens` per 60 s window (span 60.3 s, sub-windows of ~0.97 s).
fn budgeted(tokens: u64) -> Limiter {
    limiter(6_000.0, 1_000, 64).with_token_budget(tokens)
}

fn cost(n: u64) -> Option<Cost> {
    Some(Cost {
        prompt: n / 2,
        completion: n - n / 2,
    })
}

fn admitted(d: Decision) -> Grant {
    match d {
        Decision::Admitted(g) => g,
        other => panic!("expected Admitted, got {other:?}"),
    }
}

/// Admits `n` tokens on the fast path and sends them at `now`; the reservation.
fn send(l: &Limiter, n: u64, now: u64) -> Reservation<'_> {
    let mut p = Permit::new(l, admitted(l.admit(Priority::Normal, cost(n), now)));
    p.stamp(now);
    p.take_tokens().expect("a cost was reserved")
}

fn granted(t: &mut Ticket) -> Option<Grant> {
    is_granted(t).then(|| t.grant()).flatten()
}

fn remaining(l: &Limiter, now: u64) -> u64 {
    l.token_view(now).unwrap().remaining
}

fn token_429(retry_after: Option<Duration>, stated: Option<TokenRefusal>) -> Answer {
    Answer {
        ok: false,
        refusal: Some(Refusal::Tokens),
        retry_after,
        token_refusal: stated,
        ..Answer::default()
    }
}

fn control(l: &Limiter, now: u64) -> Vec<Note> {
    let mut notes = Vec::new();
    l.control(now, &mut |n| notes.push(n));
    notes
}

// === admission ===

#[test]
fn a_cost_that_fits_goes_on_the_fast_path_and_one_that_does_not_is_parked() {
    let l = budgeted(1_000);
    let g = admitted(l.admit(Priority::Normal, cost(600), 0));
    assert_eq!(g.tokens.map(|r| r.cost.total()), Some(600));
    assert_eq!(remaining(&l, 0), 400, "reserved counts before it is sent");
    let mut t = queued(l.admit(Priority::Normal, cost(500), 0));
    assert_eq!(l.token_view(0).unwrap().waiting, 500);
    assert_eq!(
        l.bucket.tokens(0),
        999.0,
        "parking for tokens took no request token"
    );
    drop(Permit::new(&l, g));
    assert_eq!(l.dispatch(0), None);
    assert!(
        is_granted(&mut t),
        "the unsent reservation went back to the waiter"
    );
    assert_eq!(l.token_view(0).unwrap().waiting, 0);
}

#[test]
fn a_cost_over_the_whole_budget_is_refused_at_once_with_limit_and_estimate() {
    let l = budgeted(1_000);
    match l.admit(Priority::High, cost(1_001), 0) {
        Decision::TooLarge { limit, estimate } => assert_eq!((limit, estimate), (1_000, 1_001)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(l.queues.is_empty());
    assert!(matches!(
        l.admit(Priority::High, cost(1_000), 0),
        Decision::Admitted(_)
    ));
}

#[test]
fn without_a_budget_a_cost_is_ignored_and_costs_nothing() {
    let l = limiter(6_000.0, 10, 4);
    let g = admitted(l.admit(Priority::Normal, cost(u64::MAX / 4), 0));
    assert_eq!(g.tokens, None);
    assert!(l.token_view(0).is_none());
}

// === the reservation ===

#[test]
fn settling_under_reserved_keeps_the_bound_and_under_actual_gives_unused_back() {
    let l = budgeted(10_000);
    let r = send(&l, 4_000, 0); // 2,000 prompt + 2,000 bound
    let used = Some(Usage {
        prompt: 2_500,
        completion: 100,
    });
    let s = r.settle(used, Charge::Reserved, 0);
    assert_eq!((s.estimate, s.settled), (4_000, 4_500));
    assert_eq!(remaining(&l, S), 5_500);
    let r = send(&l, 4_000, S);
    let s = r.settle(used, Charge::Actual, S);
    assert_eq!((s.estimate, s.settled), (4_000, 2_600));
    assert_eq!(remaining(&l, 2 * S), 10_000 - 4_500 - 2_600);
}

#[test]
fn a_reservation_dropped_unsent_gives_back_and_one_dropped_sent_keeps_its_estimate() {
    let l = budgeted(1_000);
    let unsent = Permit::new(&l, admitted(l.admit(Priority::Normal, cost(700), 0)));
    assert_eq!(remaining(&l, 0), 300);
    drop(unsent);
    assert_eq!(remaining(&l, 0), 1_000);
    let sent = send(&l, 700, 0);
    drop(sent);
    assert_eq!(
        remaining(&l, S),
        300,
        "sent and never settled: the estimate stays"
    );
    // Given back explicitly, as when the client leaves before the send.
    let p = Permit::new(&l, admitted(l.admit(Priority::Normal, cost(300), S)));
    p.give_back(S);
    assert_eq!(remaining(&l, S), 300);
}

#[test]
fn settlement_dates_a_reserved_charge_at_its_send_and_an_actual_one_at_its_end() {
    let l = budgeted(2_000);
    let used = Some(Usage {
        prompt: 100,
        completion: 0,
    });
    // Both sent at 0 and settled at 30 s, at smaller charges: the room given back is
    // there at once. The reserved one (100 + its bound of 500) leaves with its send's
    // window; the actual one (100) with its end's, as the provider counts it.
    let s = send(&l, 1_000, 0).settle(used, Charge::Reserved, 30 * S);
    assert_eq!(s.settled, 600);
    let s = send(&l, 1_000, 0).settle(used, Charge::Actual, 30 * S);
    assert_eq!(s.settled, 100);
    assert_eq!(remaining(&l, 59 * S), 1_300);
    assert_eq!(
        remaining(&l, 62 * S),
        1_900,
        "the reserved one gone with its send's"
    );
    assert_eq!(
        remaining(&l, 92 * S),
        2_000,
        "the actual one with its end's"
    );
}

#[test]
fn a_reservation_settled_before_it_was_sent_gives_everything_back() {
    let l = budgeted(1_000);
    let mut p = Permit::new(&l, admitted(l.admit(Priority::Normal, cost(600), 0)));
    let r = p.take_tokens().unwrap();
    assert_eq!(r.settle(None, Charge::Reserved, 0).settled, 0);
    assert_eq!(remaining(&l, 0), 1_000);
    p.stamp(0);
}

// === the dispatcher's order ===

/// Admits a request of `n` tokens queued behind others at `now`, grants it by
/// dispatching at `now`, and sends it then.
fn pass_queue(l: &Limiter, n: u64, now: u64) {
    let mut t = queued(l.admit(Priority::Normal, cost(n), now));
    l.dispatch(now);
    let mut p = Permit::new(l, granted(&mut t).expect("it fits and passes"));
    p.stamp(now);
    drop(p.take_tokens());
}

#[test]
fn a_head_that_waited_a_window_is_passed_only_by_what_leaves_it_room_when_it_fits() {
    let l = budgeted(1_000);
    let _a = send(&l, 450, 0);
    let mut head = queued(l.admit(Priority::Normal, cost(700), 0));
    // Young, the head is passed by whatever fits: 250 sent at 30 s (leaves at 90.45 s).
    pass_queue(&l, 250, 30 * S);
    assert!(!is_granted(&mut head));
    // 61 s: the head has waited a window. It fits once the 450 of sub-window 0 leave
    // (61.27 s), with 50 to spare then; 100 fit now, but with them the head would wait
    // for the 250 sent at 30 s, past its deadline (61.27 s + 6 s).
    let mut hundred = queued(l.admit(Priority::Normal, cost(100), 61 * S));
    let mut fifty = queued(l.admit(Priority::Normal, cost(50), 61 * S));
    assert_eq!(remaining(&l, 61 * S), 300, "both would fit");
    assert!(l.dispatch(61 * S).is_some());
    assert!(!is_granted(&mut hundred), "held for the head");
    assert!(is_granted(&mut fifty), "it leaves the head its room");
    assert!(!is_granted(&mut head));
    assert!(l.dispatch(62 * S).is_some());
    assert!(is_granted(&mut head), "the head goes when its room is free");
    assert!(!is_granted(&mut hundred));
}

#[test]
fn a_held_head_may_be_made_to_fit_up_to_a_tenth_of_a_window_later_and_no_later() {
    let l = budgeted(1_000);
    let _a = send(&l, 450, 0);
    let mut head = queued(l.admit(Priority::Normal, cost(700), 0));
    pass_queue(&l, 100, 3 * S); // leaves at 64.19 s
    pass_queue(&l, 150, 30 * S); // leaves at 90.45 s
                                 // 61 s: held, the head fits at 61.27 s; its deadline is 67.27 s. 100 more make it
                                 // wait for the 100 sent at 3 s (64.19 s): within the deadline, they pass. 100 more
                                 // again would make it wait for the 150 sent at 30 s: held back.
    let mut first = queued(l.admit(Priority::Normal, cost(100), 61 * S));
    let mut second = queued(l.admit(Priority::Normal, cost(100), 61 * S));
    assert!(l.dispatch(61 * S).is_some());
    assert!(
        is_granted(&mut first),
        "the head still fits by its deadline"
    );
    assert!(
        !is_granted(&mut second),
        "it would push the head past its deadline"
    );
    // The deadline stays the one given when the head was first held.
    assert!(l.dispatch(63 * S).is_some());
    assert!(!is_granted(&mut second));
    assert!(!is_granted(&mut head));
    assert!(l.dispatch(65 * S).is_some());
    assert!(is_granted(&mut head), "the head fits at 64.19 s");
    assert!(!is_granted(&mut second));
}

#[test]
fn every_waiter_that_waited_a_window_is_held_for_not_only_the_head() {
    let l = budgeted(2_000);
    let a = send(&l, 1_500, 0);
    let mut first = queued(l.admit(Priority::Normal, cost(1_000), 0));
    let mut second = queued(l.admit(Priority::Normal, cost(950), 0));
    pass_queue(&l, 400, 8 * S); // both young, both passed: leaves at 69.05 s
                                // Most of the 1,500 turn out unused: settled at 700, still in sub-window 0.
    a.settle(
        Some(Usage {
            prompt: 700,
            completion: 0,
        }),
        Charge::Actual,
        0,
    );
    // 61 s: 900 free now. The head fits at 61.27 s (1,600 free then), with 600 to
    // spare by its deadline; the second, after it, once the 400 leave (69.05 s), with
    // 50 to spare: 300 would delay the second, 50 do not.
    let mut three_hundred = queued(l.admit(Priority::Normal, cost(300), 61 * S));
    let mut fifty = queued(l.admit(Priority::Normal, cost(50), 61 * S));
    assert_eq!(remaining(&l, 61 * S), 900);
    assert!(l.dispatch(61 * S).is_some());
    assert!(
        !is_granted(&mut three_hundred),
        "held for the second waiter"
    );
    assert!(is_granted(&mut fifty));
    assert!(l.dispatch(62 * S).is_some());
    assert!(is_granted(&mut first));
    assert!(!is_granted(&mut second));
    l.dispatch(70 * S);
    assert!(
        is_granted(&mut second),
        "in its turn, by the time it was to fit"
    );
    assert!(!is_granted(&mut three_hundred));
}

#[test]
fn the_wait_for_a_head_that_does_not_fit_is_when_the_budget_frees_up() {
    let l = budgeted(1_000);
    let _first = send(&l, 800, 0);
    let _big = queued(l.admit(Priority::Normal, cost(500), 0));
    let wait = l.dispatch(10 * S).unwrap();
    // Sub-window 0 leaves the span at width + span = 60.3 s / 62 + 60.3 s.
    let width = (60_300_000_000u64).div_ceil(62);
    assert_eq!(wait, Duration::from_nanos(width + 60_300_000_000 - 10 * S));
    assert_eq!(l.token_wait(cost(500), 10 * S), wait);
    assert_eq!(l.token_wait(cost(200), 10 * S), Duration::ZERO);
    assert_eq!(l.token_wait(None, 10 * S), Duration::ZERO);
}

#[test]
fn priority_order_is_kept_a_lower_priority_never_passes_a_higher_head() {
    let l = budgeted(1_000);
    let _first = send(&l, 800, 0);
    let mut high = queued(l.admit(Priority::High, cost(500), 0));
    let mut low_small = queued(l.admit(Priority::Low, cost(100), 0));
    let mut normal_free = queued(l.admit(Priority::Normal, None, 0));
    assert!(l.dispatch(S).is_some());
    assert!(!is_granted(&mut high));
    assert!(
        !is_granted(&mut low_small),
        "fits, but a higher priority waits"
    );
    assert!(
        !is_granted(&mut normal_free),
        "no cost, but a higher priority waits"
    );
    assert_eq!(l.dispatch(62 * S), None);
    assert!(is_granted(&mut high));
    assert!(is_granted(&mut normal_free));
    assert!(is_granted(&mut low_small));
}

#[test]
fn a_request_put_back_after_a_429_goes_before_new_ones_with_its_cost() {
    let l = budgeted(1_000);
    let _first = send(&l, 950, 0);
    let mut new = queued(l.admit(Priority::Normal, cost(100), 0));
    let mut again = l.requeue(Priority::Normal, cost(50), 0).unwrap();
    assert!(l.dispatch(0).is_some(), "room for one of them");
    assert!(is_granted(&mut again));
    assert!(!is_granted(&mut new));
}

// === a limit fallen below a parked request's cost: `tests/refused.rs` ===

mod refused;

// === `Retry-After` and the deadline estimate with tokens ahead: `tests/retry_after.rs` ===

mod retry_after;

// === what answers teach ===

#[test]
fn a_token_429_holds_token_admission_learns_the_limit_and_leaves_the_request_rate() {
    let l = budgeted(10_000);
    let _a = send(&l, 3_000, 0);
    let _b = send(&l, 3_000, 0);
    let c = send(&l, 3_000, 0);
    let answer = token_429(Some(Duration::from_secs(2)), None);
    l.on_answer_with_tokens(S, 0, 3, Some(c.cost().total()), &answer);
    // Held until the retry-after: a cost waits; a request without one goes.
    let _held = queued(l.admit(Priority::Normal, cost(10), S));
    assert_eq!(
        l.bucket.wait_time(S),
        Duration::ZERO,
        "requests are not paused"
    );
    assert_eq!(l.pacing_view(S).pause, None);
    let notes = control(&l, S);
    assert!(
        notes
            .iter()
            .any(|n| matches!(n, Note::Tokens(c) if c.from == 10_000 && c.to == 6_000)),
        "what the window held before it: {notes:?}"
    );
    assert_eq!(l.token_view(S).unwrap().limit, 6_000);
    assert_eq!(l.token_view(S).unwrap().held_until, 3 * S);
    assert_eq!(l.guard.limit(), 6_000, "the request limit is untouched");
}

#[test]
fn a_token_429_stating_its_limit_teaches_that_limit() {
    let l = budgeted(50_000);
    let stated = TokenRefusal {
        limit_tpm: Some(30_000),
        used: Some(29_000),
        requested: Some(2_000),
        too_large: false,
        try_again: Some(Duration::from_millis(1_500)),
    };
    l.on_answer(0, 0, 1, &token_429(None, Some(stated)));
    control(&l, 0);
    let v = l.token_view(0).unwrap();
    assert_eq!((v.limit, v.stated), (30_000, Some(30_000)));
    assert_eq!(v.held_until, 1_500_000_000, "the message's wait");
}

#[test]
fn request_too_large_teaches_the_limit_without_holding_the_budget() {
    let l = budgeted(50_000);
    let stated = TokenRefusal {
        limit_tpm: Some(10_000),
        requested: Some(36_055),
        too_large: true,
        ..TokenRefusal::default()
    };
    l.on_answer(0, 0, 1, &token_429(None, Some(stated)));
    control(&l, 0);
    assert_eq!(l.token_view(0).unwrap().held_until, 0);
    assert!(matches!(
        l.admit(Priority::Normal, cost(36_055), 0),
        Decision::TooLarge { limit: 10_000, .. }
    ));
}

fn with_tokens(limit_tpm: Option<u64>, remaining: Option<u64>) -> Answer {
    Answer {
        ok: true,
        quota: Some(Quota {
            tokens: Some(TokenQuota {
                limit_tpm,
                remaining,
                reset: None,
            }),
            ..Quota::default()
        }),
        ..Answer::default()
    }
}

#[test]
fn a_stated_token_limit_caps_the_budget_and_a_repeat_changes_nothing() {
    let l = budgeted(100_000);
    l.on_answer(0, 0, 1, &with_tokens(Some(80_000), None));
    assert!(control(&l, 0).iter().any(|n| matches!(n, Note::Tokens(_))));
    assert_eq!(l.token_view(0).unwrap().limit, 80_000);
    l.on_answer(S, 0, 1, &with_tokens(Some(80_000), None));
    assert!(control(&l, S).is_empty());
    l.on_answer(S, 0, 1, &with_tokens(Some(200_000), None));
    control(&l, S);
    assert_eq!(
        l.token_view(S).unwrap().limit,
        100_000,
        "never above the setting"
    );
}

#[test]
fn remaining_tokens_below_our_view_charge_the_difference() {
    let l = budgeted(10_000);
    let _r = send(&l, 1_000, 0);
    // The provider counted 6,000 of its 10,000: 5,000 more than the sidecar sent.
    l.on_answer(S, 0, 1, &with_tokens(Some(10_000), Some(4_000)));
    assert_eq!(remaining(&l, S), 4_000);
    // The same figure again charges nothing more.
    l.on_answer(S, 0, 1, &with_tokens(None, Some(4_000)));
    assert_eq!(remaining(&l, S), 4_000);
    // A higher remaining than our view changes nothing (our own view is the stricter).
    l.on_answer(S, 0, 1, &with_tokens(None, Some(9_000)));
    assert_eq!(remaining(&l, S), 4_000);
}

#[test]
fn with_the_budget_off_token_signals_are_remembered_and_told_once() {
    let l = limiter(6_000.0, 10, 4);
    assert!(!l.token_signals().seen());
    l.on_answer(0, 0, 1, &with_tokens(Some(10_000), Some(9_000)));
    assert!(l.token_signals().seen());
    assert!(l.token_signals().take_first());
    assert!(!l.token_signals().take_first(), "once");
    // A token 429 still pauses admission, as before budgets.
    let l = limiter(6_000.0, 10, 4);
    l.on_answer(0, 0, 1, &token_429(Some(Duration::from_secs(3)), None));
    assert!(l.token_signals().seen());
    assert_eq!(l.bucket.wait_time(0), Duration::from_secs(3));
}

#[test]
fn a_model_scope_gets_a_budget_like_its_key() {
    let l = budgeted(1_000).model_scoped(4);
    let m = l.scope("m", 0).unwrap();
    assert_eq!(m.token_view(0).map(|v| v.limit), Some(1_000));
    assert!(matches!(
        m.admit(Priority::Normal, cost(1_001), 0),
        Decision::TooLarge { .. }
    ));
}

// === many threads ===

/// Workers admit random costs at random priorities on a shared clock that moves by up
/// to 200 ms per attempt and 10 ms per look while parked (several windows in all); a
/// dispatcher thread grants the
/// parked ones; each request is sent when admitted and settled under one of the two
/// models (never above its estimate), or abandoned while parked. Afterwards: no rolling
/// span of dated charges ever held more than the limit, every reservation was settled
/// exactly once, and nothing is left pending or waiting.
#[test]
fn stress_no_window_over_the_limit_and_every_reservation_settled() {
    const THREADS: u64 = 3;
    const ROUNDS: u64 = 1_000;
    const LIMIT: u64 = 40_000;
    let l = Arc::new(limiter(1e9, 1_000_000, 100_000).with_token_budget(LIMIT));
    let clock = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(parking_lot::Mutex::new(Vec::<(u64, u64)>::new()));
    let dispatcher = {
        let (l, clock, stop) = (l.clone(), clock.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                l.dispatch(clock.load(Ordering::Relaxed));
                std::thread::yield_now();
            }
        })
    };
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (l, clock, log) = (l.clone(), clock.clone(), log.clone());
            std::thread::spawn(move || {
                let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (t + 1);
                let (mut reserved, mut settled, mut parked) = (0u64, 0u64, 0u64);
                for _ in 0..ROUNDS {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let n = rng % 2_000 + 1;
                    let p = Priority::ALL[(rng >> 8) as usize % 3];
                    let now = clock.fetch_add(rng % 200_000_000, Ordering::Relaxed);
                    let grant = match l.admit(p, cost(n), now) {
                        Decision::Admitted(g) => g,
                        Decision::Queued(mut ticket) => {
                            parked += 1;
                            let mut got = None;
                            // Waits up to 5 s of clock time, moving it on as it waits.
                            for _ in 0..500 {
                                if is_granted(&mut ticket) {
                                    got = ticket.grant();
                                    break;
                                }
                                clock.fetch_add(10_000_000, Ordering::Relaxed);
                                std::thread::yield_now();
                            }
                            match got {
                                Some(g) => g,
                                // The client leaves: its wait, or the grant it missed, goes back.
                                None => continue,
                            }
                        }
                        other => panic!("unexpected {other:?}"),
                    };
                    reserved += 1;
                    let mut permit = Permit::new(&l, grant);
                    permit.stamp(clock.load(Ordering::Relaxed));
                    let r = permit.take_tokens().expect("a budget reserves");
                    let sent_at = r.sent_at().expect("stamped");
                    let usage = Usage {
                        prompt: n / 2,
                        completion: (rng >> 30) % (n - n / 2 + 1),
                    };
                    let charge = if (rng >> 50).is_multiple_of(2) {
                        Charge::Actual
                    } else {
                        Charge::Reserved
                    };
                    // The answer ends at once (later ends are the move's, tested alone).
                    let s = r.settle(Some(usage), charge, sent_at);
                    assert!(s.settled <= s.estimate);
                    log.lock().push((sent_at, s.settled));
                    settled += 1;
                }
                (reserved, settled, parked)
            })
        })
        .collect();
    let totals: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    stop.store(true, Ordering::Relaxed);
    dispatcher.join().unwrap();
    let now = clock.load(Ordering::Relaxed);
    l.dispatch(now);
    let reserved: u64 = totals.iter().map(|t| t.0).sum();
    let settled: u64 = totals.iter().map(|t| t.1).sum();
    let parked: u64 = totals.iter().map(|t| t.2).sum();
    assert_eq!(reserved, settled, "every reservation settled exactly once");
    assert!(
        parked > 0 && reserved > 100,
        "{parked} parked, {reserved} sent"
    );
    let b = l.token_budget().unwrap();
    assert_eq!(b.pending(), 0, "nothing reserved is left unsent");
    assert!(l.queues.is_empty());
    assert_eq!(l.queues.waiting_cost(), 0);
    let mut log = log.lock().clone();
    log.sort_unstable();
    let (mut lo, mut sum) = (0, 0u64);
    for hi in 0..log.len() {
        sum += log[hi].1;
        while log[lo].0 + b.span_nanos() <= log[hi].0 {
            sum -= log[lo].1;
            lo += 1;
        }
        assert!(sum <= LIMIT, "the span ending at {} holds {sum}", log[hi].0);
    }
    assert!(now > 5 * 60 * S, "several windows went by");
}

/// A budgeted limiter in cluster mode, on the shared budget, whose cluster keeps a token
/// budget: request tokens in hand, no token lease yet.
fn leased(tokens: u64) -> (Arc<crate::limiter::LeasePot>, Limiter) {
    use crate::limiter::{LeasePot, Mode};
    let pot = Arc::new(LeasePot::new());
    pot.fill(crate::limiter::PotLease::open(1, 1_000), 0);
    pot.set_mode(Mode::Shared);
    pot.token_pot.set_enabled(true);
    let l = budgeted(tokens).leased(Arc::clone(&pot));
    (pot, l)
}

#[test]
fn in_cluster_mode_a_cost_is_taken_from_a_token_lease_and_its_changes_go_to_that_lease() {
    use crate::limiter::token_lease::Adjustment;
    let (pot, l) = leased(10_000);
    let tokens = &pot.token_pot;
    // No token lease in hand: parked, and the cost is what the task must lease.
    let mut t = queued(l.admit(Priority::Normal, cost(600), 0));
    assert_eq!(tokens.take_short(), 600);
    assert!(l.dispatch(0).is_some(), "still short");
    assert_eq!(tokens.take_short(), 600, "asked again by the dispatcher");
    tokens.fill(7, 1_000, u64::MAX);
    l.dispatch(0);
    let g = granted(&mut t).expect("granted once lease 7 came");
    assert_eq!(g.tokens.map(|r| r.lease), Some(7));
    assert_eq!(tokens.tokens(), 400);
    // Settled lower (actual usage): the difference goes back to lease 7.
    let mut p = Permit::new(&l, g);
    p.stamp(0);
    let used = Usage {
        prompt: 200,
        completion: 100,
    };
    p.take_tokens()
        .unwrap()
        .settle(Some(used), Charge::Actual, 0);
    assert_eq!(
        tokens.next_adjustment(),
        Some(Adjustment {
            lease: 7,
            delta: -300
        })
    );
    // A reservation dropped unsent while its lease is in hand goes back into the pot.
    let g = admitted(l.admit(Priority::Normal, cost(300), S));
    assert_eq!(tokens.tokens(), 100);
    drop(Permit::new(&l, g));
    assert_eq!(tokens.tokens(), 400);
    assert_eq!(tokens.next_adjustment(), None);
    // More than the lease holds: refused at the fast path, nothing kept.
    let t2 = queued(l.admit(Priority::Normal, cost(500), S));
    assert_eq!(tokens.tokens(), 400, "nothing taken");
    assert_eq!(tokens.take_short(), 500);
    drop(t2);
}

#[test]
fn in_cluster_mode_on_fallback_no_token_lease_is_needed() {
    use crate::limiter::Mode;
    let (pot, l) = leased(10_000);
    pot.set_mode(Mode::Fallback);
    let g = admitted(l.admit(Priority::Normal, cost(600), 0));
    assert_eq!(g.tokens.map(|r| r.lease), Some(0), "the local budget only");
    assert_eq!(pot.token_pot.take_short(), 0);
}

#[test]
fn the_cluster_caps_the_token_limit_and_lifting_the_cap_restores_it() {
    let l = budgeted(10_000);
    l.set_token_cap(Some(4_000));
    assert_eq!(l.token_view(0).unwrap().limit, 4_000);
    assert!(matches!(
        l.admit(Priority::Normal, cost(5_000), 0),
        Decision::TooLarge { limit: 4_000, .. }
    ));
    l.set_token_cap(Some(20_000));
    assert_eq!(
        l.token_view(0).unwrap().limit,
        10_000,
        "never above the learned"
    );
    l.set_token_cap(None);
    assert_eq!(l.token_view(0).unwrap().limit, 10_000);
    l.hold_tokens(5 * S);
    assert!(queued_or_held(&l));
}

fn queued_or_held(l: &Limiter) -> bool {
    matches!(l.admit(Priority::Normal, cost(10), S), Decision::Queued(_))
}

#[test]
fn in_cluster_mode_an_actual_charge_ending_after_its_lease_moves_to_the_end() {
    use crate::limiter::token_lease::{Adjustment, LateSend};
    let (pot, l) = leased(10_000);
    let tokens = &pot.token_pot;
    tokens.fill(3, 1_000, 100);
    let g = admitted(l.admit(Priority::Normal, cost(600), 0));
    let mut p = Permit::new(&l, g);
    p.stamp(0);
    let used = Usage {
        prompt: 200,
        completion: 100,
    };
    // Ended at 5 s, long after lease 3's time: the 300 charged leave lease 3 (with the
    // 300 unused) and are counted again from the end.
    p.take_tokens()
        .unwrap()
        .settle(Some(used), Charge::Actual, 5 * S);
    assert_eq!(
        tokens.next_late(),
        Some(LateSend {
            lease: 3,
            tokens: 300,
            at: 5 * S
        })
    );
    assert_eq!(
        tokens.next_adjustment(),
        Some(Adjustment {
            lease: 3,
            delta: -600
        })
    );
}
