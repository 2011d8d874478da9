//! A provider's token counts (issue 19): what its token budget estimated, what it
//! settled, what the provider reported, and how far the estimates were from the usage.
//!
//! Written once per settled reservation ([`TokenStats::settle`]) with relaxed
//! `fetch_add`s only: no lock, no allocation, and nothing is ordered by them (they are
//! read as a whole only by the exposition and the snapshot, which tolerate a count
//! that is one settlement ahead of another).
//!
//! The estimate error is `estimate ÷ (prompt + completion)`, counted in fixed buckets
//! ([`RATIO_BOUNDS`]) compared in integers, so a ratio of exactly 1 lands in the `1`
//! bucket. The histogram's count is the sum of its buckets (so a scrape never sees a
//! `+Inf` bucket that disagrees with the count); its sum is kept in millionths.

use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the estimate-ratio buckets as fractions `(numerator, denominator)`,
/// ascending; a last bucket, `+Inf`, holds every ratio above the last bound.
pub const RATIO_BOUNDS: [(u64, u64); 10] = [
    (1, 2),
    (3, 4),
    (9, 10),
    (1, 1),
    (11, 10),
    (5, 4),
    (3, 2),
    (2, 1),
    (3, 1),
    (5, 1),
];

/// Buckets of the estimate-ratio histogram: one per bound, and `+Inf`.
pub const RATIO_BUCKETS: usize = RATIO_BOUNDS.len() + 1;

/// The most one observation adds to the ratio's sum, in millionths (a ratio of about
/// 4295): an estimate of a million tokens for an answer of one cannot wrap the sum.
const MAX_RATIO_MICROS: u64 = u32::MAX as u64;

/// The bucket a ratio `estimate ÷ actual` falls in (`actual > 0`).
fn bucket(estimate: u64, actual: u64) -> usize {
    let (e, a) = (u128::from(estimate), u128::from(actual));
    RATIO_BOUNDS
        .iter()
        .position(|&(num, den)| e * u128::from(den) <= u128::from(num) * a)
        .unwrap_or(RATIO_BOUNDS.len())
}

/// `estimate ÷ actual` in millionths, rounded down, at most [`MAX_RATIO_MICROS`].
fn ratio_micros(estimate: u64, actual: u64) -> u64 {
    let micros = u128::from(estimate) * 1_000_000 / u128::from(actual);
    u64::try_from(micros).map_or(MAX_RATIO_MICROS, |m| m.min(MAX_RATIO_MICROS))
}

/// The token counters of one provider.
#[derive(Debug, Default)]
pub struct TokenStats {
    /// Prompt tokens, as the provider reported them (`usage`).
    prompt: AtomicU64,
    /// Completion tokens, as the provider reported them (`usage`).
    completion: AtomicU64,
    /// Tokens reserved at admission (the estimates).
    estimated: AtomicU64,
    /// Tokens charged after settlement.
    settled: AtomicU64,
    /// Estimate-ratio observations per bucket (not cumulative).
    ratio: [AtomicU64; RATIO_BUCKETS],
    /// Sum of the observed ratios, in millionths.
    ratio_sum_micros: AtomicU64,
}

/// The token counters, copied at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt: u64,
    pub completion: u64,
    pub estimated: u64,
    pub settled: u64,
    /// Estimate-ratio observations per bucket of [`RATIO_BOUNDS`] (not cumulative),
    /// the last one `+Inf`.
    pub ratio: [u64; RATIO_BUCKETS],
    pub ratio_sum_micros: u64,
}

// === impl TokenStats ===

impl TokenStats {
    /// Counts one settled reservation: see [`crate::stats::ProviderStats::settle_tokens`].
    pub fn settle(&self, estimate: u64, settled: u64, usage: Option<(u64, u64)>) {
        // Relaxed throughout: independent counters that order nothing (module doc).
        self.estimated.fetch_add(estimate, Ordering::Relaxed);
        self.settled.fetch_add(settled, Ordering::Relaxed);
        let Some((prompt, completion)) = usage else {
            return;
        };
        self.prompt.fetch_add(prompt, Ordering::Relaxed);
        self.completion.fetch_add(completion, Ordering::Relaxed);
        let actual = prompt.saturating_add(completion);
        if actual > 0 {
            self.ratio[bucket(estimate, actual)].fetch_add(1, Ordering::Relaxed);
            self.ratio_sum_micros
                .fetch_add(ratio_micros(estimate, actual), Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> TokenCounts {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TokenCounts {
            prompt: load(&self.prompt),
            completion: load(&self.completion),
            estimated: load(&self.estimated),
            settled: load(&self.settled),
            ratio: std::array::from_fn(|i| load(&self.ratio[i])),
            ratio_sum_micros: load(&self.ratio_sum_micros),
        }
    }
}

// === impl TokenCounts ===

impl TokenCounts {
    /// Whether anything was ever counted.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    /// Estimate-ratio observations: the sum of the buckets.
    pub fn ratio_count(&self) -> u64 {
        self.ratio.iter().sum()
    }

    /// The sum of the observed ratios.
    pub fn ratio_sum(&self) -> f64 {
        self.ratio_sum_micros as f64 / 1e6
    }

    /// The mean observed ratio; `None` before the first observation.
    pub fn ratio_mean(&self) -> Option<f64> {
        let n = self.ratio_count();
        (n > 0).then(|| self.ratio_sum() / n as f64)
    }

    /// `(upper bound, count)` per bucket, not cumulative, the last bound `+Inf`: the
    /// shape the exposition's histograms take.
    pub fn ratio_buckets(&self) -> [(f64, u64); RATIO_BUCKETS] {
        std::array::from_fn(|i| {
            let le = RATIO_BOUNDS
                .get(i)
                .map_or(f64::INFINITY, |&(num, den)| num as f64 / den as f64);
            (le, self.ratio[i])
        })
    }
}

#[cfg(test)]
mod tests;
