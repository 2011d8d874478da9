//! Loom model of the token pot: two admissions take a request's cost (one gives it
//! back unsent) while the budget task replaces the lease. Run with
//! `RUSTFLAGS="--cfg sidecar_loom" cargo test --release --lib loom -- --test-threads=1`.

use loom::sync::Arc;
use loom::thread;

use super::*;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(f);
}

/// Lease 1 holds 10 tokens; two requests of 6 try to take them (the second gives its
/// back) while the task fills lease 2 with 5. Every token of lease 1 is accounted for
/// exactly once: taken and kept, left when the lease was replaced (the task gives those
/// back), or given back after it was replaced (a reported adjustment of lease 1, never
/// mixed into lease 2).
#[test]
fn loom_a_cost_is_taken_from_one_lease_and_given_back_to_the_same() {
    model(|| {
        let pot = Arc::new(TokenPot::new());
        pot.fill(1, 10, u64::MAX);
        let a = {
            let p = Arc::clone(&pot);
            thread::spawn(move || p.take(6, 0))
        };
        let b = {
            let p = Arc::clone(&pot);
            thread::spawn(move || {
                if let Some(lease) = p.take(6, 0) {
                    p.put_back(lease, 6);
                }
            })
        };
        let (old, left) = pot.fill(2, 5, u64::MAX);
        let kept = a.join().unwrap();
        b.join().unwrap();
        assert_eq!(old, 1);
        let mut reported = 0;
        while let Some(adj) = pot.next_adjustment() {
            assert_eq!(adj.lease, 1, "only lease 1's tokens were taken");
            reported -= adj.delta;
        }
        let kept_tokens = if kept == Some(1) { 6 } else { 0 };
        assert_eq!(
            kept_tokens + left + reported as u64,
            10,
            "lease 1's 10 tokens"
        );
        assert_eq!(
            pot.held(),
            (2, 5),
            "lease 2 untouched: 5 is less than a cost"
        );
    });
}
