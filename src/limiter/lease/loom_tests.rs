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
/// lease. Every token ends up exactly once: taken, returned to the task, or in the pot.
#[test]
fn loom_lease_tokens_are_taken_or_returned_exactly_once() {
    model(|| {
        let pot = Arc::new(LeasePot::new());
        pot.fill(2, 0, u64::MAX, 0);
        let a = {
            let p = Arc::clone(&pot);
            thread::spawn(move || u32::from(p.try_take(1)))
        };
        let b = {
            let p = Arc::clone(&pot);
            thread::spawn(move || {
                if p.try_take(1) {
                    p.put_back();
                }
            })
        };
        let returned = pot.drain() + pot.fill(1, 0, u64::MAX, 0);
        let taken = a.join().unwrap();
        b.join().unwrap();
        assert_eq!(taken + returned + pot.tokens(), 3, "2 leased, then 1");
    });
}
