//! Properties over random sequences of claims, stamps, releases, forced sends, clock
//! advances and limit changes, each step checked against the test's own record.

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    Claim,
    Force,
    Stamp(usize),
    Release(usize),
    SetLimit(u32),
}

fn op(max_step: u64, limits: std::ops::Range<u32>) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..max_step).prop_map(Op::Advance),
        4 => Just(Op::Claim),
        1 => Just(Op::Force),
        3 => any::<usize>().prop_map(Op::Stamp),
        1 => any::<usize>().prop_map(Op::Release),
        1 => limits.prop_map(Op::SetLimit),
    ]
}

/// The test's own record of the guard: pending slots and recorded stamps.
#[derive(Default)]
struct Model {
    now: u64,
    pending: Vec<Slot>,
    stamps: Vec<u64>,
    forced: usize,
}

impl Model {
    fn count(&self, span: u64) -> usize {
        brute_count(self.pending.len(), &self.stamps, self.now, span)
    }

    /// The wait the exact rule gives: until enough stamps leave, else the pending wait.
    fn wait(&self, g: &WindowGuard, limit: usize) -> Duration {
        let span = g.span_nanos();
        let mut live: Vec<u64> = self
            .stamps
            .iter()
            .copied()
            .filter(|&s| s + span > self.now)
            .collect();
        live.sort_unstable();
        let k = self.count(span) + 1 - limit;
        match live.get(k - 1) {
            Some(&s) => Duration::from_nanos(s + span - self.now),
            None => Duration::from_nanos(g.pending_wait),
        }
    }

    /// Applies `op`; returns the claim's outcome if it was one.
    fn apply(&mut self, g: &WindowGuard, op: &Op) -> Option<Result<Claim, Duration>> {
        match *op {
            Op::Advance(by) => self.now += by,
            Op::Claim => {
                let r = g.try_claim(self.now);
                if let Ok(c) = r {
                    self.pending.push(c.slot);
                }
                return Some(r);
            }
            Op::Force => {
                self.pending.push(g.force_claim(self.now));
                self.forced += 1;
            }
            Op::Stamp(i) if !self.pending.is_empty() => {
                let slot = self.pending.remove(i % self.pending.len());
                let at = g.stamp(slot, self.now);
                assert_eq!(
                    at, self.now,
                    "a monotone clock's stamps are recorded as given"
                );
                self.stamps.push(at);
            }
            Op::Release(i) if !self.pending.is_empty() => {
                g.release(self.pending.remove(i % self.pending.len()));
            }
            Op::SetLimit(l) => g.set_limit(l),
            Op::Stamp(_) | Op::Release(_) => {}
        }
        None
    }
}

proptest! {
    /// Exact mode with a constant limit: admitted iff the brute-force count is below the
    /// limit, with the count it reports and the wait the rule gives; no half-open span
    /// ever holds more than the limit plus the forced sends.
    #[test]
    fn exact_mode_admits_iff_the_brute_force_count_is_below_the_limit(
        limit in 1u32..8,
        ops in prop::collection::vec(op(700 * MS, 1..2), 1..300),
    ) {
        let g = guard(secs(1), limit, 8);
        let span = g.span_nanos();
        let mut m = Model { now: T0, ..Model::default() };
        for op in ops.iter().filter(|op| !matches!(op, Op::SetLimit(_))) {
            let before = m.count(span);
            if matches!(op, Op::Force) && before >= g.ring.len() {
                continue; // would overflow the ring: exactness is checked without it
            }
            let expected_wait = (before >= limit as usize).then(|| m.wait(&g, limit as usize));
            prop_assert_eq!(g.wait_time(m.now), expected_wait.unwrap_or(Duration::ZERO));
            match m.apply(&g, op) {
                Some(Ok(c)) => {
                    prop_assert!(before < limit as usize, "admitted at {before}");
                    prop_assert_eq!(c.count as usize, before + 1);
                }
                Some(Err(wait)) => prop_assert_eq!(Some(wait), expected_wait),
                None => {}
            }
            prop_assert_eq!(g.in_span(m.now) as usize, m.count(span));
            prop_assert_eq!(g.newest(), m.stamps.iter().copied().max());
            prop_assert!(max_in_any_span(&m.stamps, span) <= limit as usize + m.forced);
        }
    }

    /// Sub-window mode with a constant limit: never admitted at or above the limit by
    /// the brute-force count, and no span holds more than the limit (forced aside).
    #[test]
    fn sub_window_mode_never_admits_at_or_above_the_limit(
        limit in 5u32..12,
        ops in prop::collection::vec(op(300 * MS, 1..2), 1..400),
    ) {
        let g = guard(secs(1), limit, 4);
        let span = g.span_nanos();
        let mut m = Model { now: T0, ..Model::default() };
        for op in ops.iter().filter(|op| !matches!(op, Op::SetLimit(_))) {
            let before = m.count(span);
            if let Some(Ok(c)) = m.apply(&g, op) {
                prop_assert!(before < limit as usize, "admitted at {before}");
                prop_assert!(c.count as usize > before, "count {} below {before} + 1", c.count);
            }
            prop_assert!(g.in_span(m.now) as usize >= m.count(span));
            prop_assert!(max_in_any_span(&m.stamps, span) <= limit as usize + m.forced);
        }
    }

    /// The limit changing, across both modes (ring of 4 + 1 slots): a claim is never
    /// admitted unless the brute-force count is below the limit in force, so after a
    /// decrease nothing is admitted until the span holds fewer than the new limit.
    #[test]
    fn with_the_limit_changing_no_claim_is_admitted_at_or_above_the_limit_in_force(
        ops in prop::collection::vec(op(300 * MS, 1..9), 1..400),
    ) {
        let g = guard(secs(1), 3, 4);
        let span = g.span_nanos();
        let mut m = Model { now: T0, ..Model::default() };
        for op in &ops {
            let before = m.count(span);
            let limit = g.limit() as usize;
            if let Some(Ok(_)) = m.apply(&g, op) {
                prop_assert!(before < limit, "admitted at {before} under limit {limit}");
            }
        }
    }
}
