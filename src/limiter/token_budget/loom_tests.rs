//! Loom models of the token budget's protocol: increment-then-check on `pending` with
//! the charge's hand-off from `pending` to its sub-window word, and the word's CAS when
//! a later sub-window reuses it. Run with
//! `RUSTFLAGS="--cfg sidecar_loom" cargo test --lib loom -- --test-threads=1`.

use loom::sync::Arc;
use loom::thread;

use super::*;

const S: u64 = 1_000_000_000;
const NOW: u64 = 100 * S;
/// Sub-windows of 1 s under loom's K = 8.
const SPAN: u64 = 6 * S;

fn budget(limit: u64) -> Arc<TokenBudget> {
    Arc::new(TokenBudget::new(limit, SPAN, Duration::from_millis(1)))
}

fn cost(n: u64) -> Cost {
    Cost {
        prompt: n,
        completion: 0,
    }
}

#[test]
fn loom_two_reservations_that_fit_only_one_at_a_time_never_both_pass() {
    loom::model(|| {
        let b = budget(10);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let b = Arc::clone(&b);
                thread::spawn(move || b.try_reserve(cost(6), NOW).is_ok())
            })
            .collect();
        let won = handles
            .into_iter()
            .filter_map(|h| h.join().unwrap().then_some(()))
            .count();
        assert!(won <= 1, "{won} passed");
        assert_eq!(b.pending(), 6 * won as u64);
    });
}

#[test]
fn loom_a_reservation_racing_a_send_sees_it_pending_or_charged() {
    loom::model(|| {
        let b = budget(10);
        let r = b.try_reserve(cost(6), NOW).unwrap();
        let sender = {
            let b = Arc::clone(&b);
            thread::spawn(move || {
                b.send(r, NOW);
            })
        };
        let other = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_reserve(cost(6), NOW).is_ok())
        };
        sender.join().unwrap();
        assert!(!other.join().unwrap(), "6 + 6 over a limit of 10");
        assert_eq!(b.pending(), 0);
        assert_eq!(b.charged_in(NOW, SPAN), 6);
    });
}

#[test]
fn loom_a_charge_racing_a_later_sub_window_on_its_word_is_never_lost() {
    loom::model(|| {
        let b = budget(100);
        let later = NOW + 8 * S; // the same word, K sub-windows on
        let old = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.charge_extra(3, NOW))
        };
        let new = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.charge_extra(5, later))
        };
        old.join().unwrap();
        new.join().unwrap();
        let n = b.charged_in(later, SPAN);
        // Replaced (3 was more than a span old), or taken into the later sub-window.
        assert!(n == 5 || n == 8, "{n}");
    });
}

#[test]
fn loom_a_charge_moved_to_its_answers_end_is_counted_by_a_racing_reservation() {
    loom::model(|| {
        let b = budget(10);
        let r = b.try_reserve(cost(6), NOW).unwrap();
        let mut sent = b.send(r, NOW);
        let mover = {
            let b = Arc::clone(&b);
            // Ends 2 sub-windows later: moved to another word.
            thread::spawn(move || {
                b.settle(&mut sent, Charge::Actual, None, NOW + 2 * S);
            })
        };
        let other = {
            let b = Arc::clone(&b);
            thread::spawn(move || b.try_reserve(cost(6), NOW + 2 * S).is_ok())
        };
        mover.join().unwrap();
        assert!(!other.join().unwrap(), "6 + 6 over a limit of 10");
        assert_eq!(b.charged_in(NOW + 2 * S, SPAN), 6);
        assert_eq!(
            b.charged_in(NOW + SPAN + S, SPAN),
            6,
            "counted from its end"
        );
    });
}

#[test]
fn loom_a_settlement_racing_a_send_keeps_both() {
    loom::model(|| {
        let b = budget(100);
        let r = b.try_reserve(cost(10), NOW).unwrap();
        let mut first = b.send(r, NOW);
        let r2 = b.try_reserve(cost(20), NOW).unwrap();
        let settler = {
            let b = Arc::clone(&b);
            thread::spawn(move || {
                b.settle(
                    &mut first,
                    Charge::Reserved,
                    Some(Usage {
                        prompt: 4,
                        completion: 0,
                    }),
                    NOW,
                );
            })
        };
        let sender = {
            let b = Arc::clone(&b);
            thread::spawn(move || {
                b.send(r2, NOW);
            })
        };
        settler.join().unwrap();
        sender.join().unwrap();
        assert_eq!(b.charged_in(NOW, SPAN), 24);
    });
}
