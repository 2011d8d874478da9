//! Loom model of the lease pot: the request path takes tokens (and gives them back)
//! while the budget task drains and refills the pot. Run with
//! `RUSTFLAGS="--cfg sidecar_loom" cargo test --release --lib loom -- --test-threads=1`.

use loom::sync::Arc;
use loom::thread;

use super::*;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(f);
}

/// The lease pot: two admissions take tokens (one gives its token back, as when the
/// window guard refuses) while the budget task drains the pot and fills it with the next
/// lease. Every token ends up exactly once: taken, returned to the task, or in the pot;
/// and a token of lease 1 given back never lands in lease 2.
#[test]
fn loom_lease_tokens_are_taken_or_returned_exactly_once() {
    model(|| {
        let pot = Arc::new(LeasePot::new());
        pot.fill(PotLease::open(1, 2), 0);
        let a = {
            let p = Arc::clone(&pot);
            thread::spawn(move || p.try_take(1))
        };
        let b = {
            let p = Arc::clone(&pot);
            thread::spawn(move || {
                if let Some(n) = p.try_take(1) {
                    p.put_back(n);
                }
            })
        };
        let returned = pot.drain() + pot.fill(PotLease::open(2, 1), 0);
        let took = a.join().unwrap();
        b.join().unwrap();
        assert!(took.is_none_or(|n| n == 1 || n == 2));
        // `taken` counts a's token and b's when its lease was gone at the give-back.
        let taken = u32::try_from(pot.counts().0).unwrap();
        assert_eq!(taken + returned + pot.tokens(), 3, "2 leased, then 1");
        let lease_2_taken = u32::from(took == Some(2));
        assert_eq!(
            pot.tokens() + lease_2_taken,
            1,
            "lease 2 holds its own token only"
        );
    });
}
