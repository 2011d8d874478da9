//! Per-model correction of the text estimate, learned from settled usage.
//!
//! Each settled request whose prompt is text only (no images, media or token ids, see
//! [`Estimate::ratio_base`]) gives a sample `x = actual ÷ estimated` prompt tokens. Per
//! model the table keeps, in steps of 1/16384:
//!
//! - `mean`, `dev`: the mean of `x` and of `|x − mean|`, plain averages over the first 8
//!   samples, then exponential with weight 1/8;
//! - `peak`: at least the latest sample and `mean + 2·dev`, about the 95th percentile
//!   of a normal spread (whose mean absolute deviation is 0.8σ); above that bound it
//!   falls back by an eighth of the gap per sample, so an outlier is remembered for about
//!   16 samples (0.875¹⁶ ≈ 0.12 of it left).
//!
//! The factor applied to a model's estimates is `max(floor, peak)`: never below the
//! sample just seen, and by default ([`RatioRules::floor`] = 1) never below the fixed
//! ratio's estimate, so bytes per token only ever go *down* from the configured ratio
//! (at most 3): learning raises reservations where a tokenizer packs fewer bytes per
//! token than the ratio assumes (hashes, base64, some scripts), and never cuts them
//! under what the ratio alone would reserve. A lower floor lets it shrink
//! over-estimates too. Samples and the factor round up; the averages round to nearest,
//! so they settle on a steady ratio (within 2/1024 above it) instead of creeping.
//!
//! Prompts estimated under [`RatioRules::min_sample`] tokens are not learned from: a
//! chat template's fixed tokens (Llama 3.1's adds a dated system header to every
//! request) dominate them, and a ratio learned there would inflate every long prompt.
//!
//! Lock-free: a model's whole state is one `AtomicU64` updated by one CAS loop over
//! the pure [`step`]; models are found by a 64-bit hash in a fixed open-addressed table
//! (64 by default), claimed once and never freed. Models past the table's capacity
//! share one overflow slot. Feed it only answers the provider accepted (with `usage`),
//! so invented model names cannot fill the table. A hash collision shares a slot, and
//! the floor keeps a shared slot conservative.

use std::sync::atomic::{AtomicU64, Ordering};

use super::estimate::{Estimate, Factor};

/// How samples are taken and how low the factor may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RatioRules {
    /// The factor never goes below this; 1 keeps every estimate at or above the fixed
    /// ratio's.
    pub floor: Factor,
    /// Estimates under this many tokens are not learned from.
    pub min_sample: u64,
}

impl Default for RatioRules {
    fn default() -> Self {
        RatioRules {
            floor: Factor::ONE,
            min_sample: 64,
        }
    }
}

/// Models tracked by default.
pub const DEFAULT_MODELS: usize = 64;

// === The state word ===
//
// bits  0..20  mean   (in UNITs)
// bits 20..40  dev    (in UNITs)
// bits 40..60  peak   (in UNITs)
// bits 60..64  samples, saturating at 15 (only "fewer than 8" matters)
//
// A UNIT is 1/16 of a Factor step: averaging an eighth of a sample into the mean
// would otherwise stick up to 8 steps away from a steady ratio.

const UNIT: u64 = 16 * Factor::SCALE as u64;
const FIELD_BITS: u32 = 20;
const FIELD_MAX: u64 = (1 << FIELD_BITS) - 1;
const WARM: u64 = 8;
const SPREAD: u64 = 2;
const DECAY: u64 = 8;

/// `actual ÷ estimated` in UNITs, rounded up, at most what a field holds.
fn sample(actual: u64, estimated: u64) -> u64 {
    let x = (u128::from(actual) * u128::from(UNIT)).div_ceil(u128::from(estimated.max(1)));
    u64::try_from(x).unwrap_or(u64::MAX).min(FIELD_MAX)
}

/// A model's learned ratio, unpacked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Learned {
    mean: u64,
    dev: u64,
    peak: u64,
    samples: u64,
}

impl Learned {
    fn unpack(w: u64) -> Self {
        Learned {
            mean: w & FIELD_MAX,
            dev: (w >> FIELD_BITS) & FIELD_MAX,
            peak: (w >> (2 * FIELD_BITS)) & FIELD_MAX,
            samples: w >> (3 * FIELD_BITS),
        }
    }

    fn pack(self) -> u64 {
        self.mean.min(FIELD_MAX)
            | self.dev.min(FIELD_MAX) << FIELD_BITS
            | self.peak.min(FIELD_MAX) << (2 * FIELD_BITS)
            | self.samples.min(15) << (3 * FIELD_BITS)
    }

    /// `max(floor, peak)`, the peak rounded up to a Factor step; the fixed ratio's
    /// (1, or the floor if that is higher) until a sample is in: a floor below 1 lets
    /// learning shrink over-estimates, it never cuts a model's first reservations.
    fn factor(self, floor: Factor) -> Factor {
        if self.samples == 0 {
            return floor.max(Factor::ONE);
        }
        let peak = self.peak.div_ceil(UNIT / u64::from(Factor::SCALE));
        Factor::from_scaled(peak as u32).max(floor)
    }
}

/// The pure update: the state word after sample `x` (UNITs; see the module doc). The
/// averages round to nearest, so they settle on a steady ratio; the peak's decay
/// rounds down, so it stays on the high side.
fn step(word: u64, x: u64) -> u64 {
    let s = Learned::unpack(word);
    if s.samples == 0 {
        return Learned {
            mean: x,
            dev: 0,
            peak: x,
            samples: 1,
        }
        .pack();
    }
    let w = (s.samples + 1).min(WARM);
    let mean = (s.mean * (w - 1) + x + w / 2) / w;
    let dev = (s.dev * (w - 1) + x.abs_diff(s.mean) + w / 2) / w;
    let bound = (mean + SPREAD * dev).min(FIELD_MAX);
    let decayed = s.peak - s.peak.saturating_sub(bound) / DECAY;
    Learned {
        mean,
        dev,
        peak: x.max(bound).max(decayed),
        samples: s.samples + 1,
    }
    .pack()
}

// === impl RatioTable ===

#[derive(Debug, Default)]
struct Slot {
    /// The model's hash; 0 while free. Set once.
    key: AtomicU64,
    state: AtomicU64,
}

/// Learned factors of up to `capacity` models, shared by every worker.
#[derive(Debug)]
pub struct RatioTable {
    slots: Box<[Slot]>,
    overflow: AtomicU64,
    rules: RatioRules,
}

impl RatioTable {
    pub fn new(capacity: usize, rules: RatioRules) -> Self {
        RatioTable {
            slots: (0..capacity.max(1)).map(|_| Slot::default()).collect(),
            overflow: AtomicU64::new(0),
            rules,
        }
    }

    /// The factor for `model`'s estimates: the fixed ratio's until it has settled a
    /// sample.
    pub fn factor(&self, model: &str) -> Factor {
        let word = self
            .state(model, false)
            // Relaxed: the word is the whole state; nothing else is read through it.
            .map_or(0, |s| s.load(Ordering::Relaxed));
        Learned::unpack(word).factor(self.rules.floor)
    }

    /// Learns from a settled request: its estimate and the prompt tokens its `usage`
    /// reported. Ignored unless the estimate has a [`ratio_base`](Estimate::ratio_base)
    /// of at least [`RatioRules::min_sample`] tokens and the usage is not zero.
    pub fn observe(&self, model: &str, estimate: &Estimate, actual_prompt: u64) {
        let Some(base) = estimate.ratio_base else {
            return;
        };
        if base < self.rules.min_sample || actual_prompt == 0 {
            return;
        }
        let x = sample(actual_prompt, base);
        let Some(state) = self.state(model, true) else {
            return;
        };
        // Relaxed: the word is the whole state, and the CAS alone orders updates to it.
        let mut cur = state.load(Ordering::Relaxed);
        loop {
            match state.compare_exchange_weak(
                cur,
                step(cur, x),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// The state word of `model`: its slot, found by linear probing from its hash;
    /// with `claim`, the first free slot on the way becomes its own. The overflow word
    /// when every slot holds another model; `None` when it is not in the table and
    /// `claim` is off.
    fn state(&self, model: &str, claim: bool) -> Option<&AtomicU64> {
        let key = fnv1a(model.as_bytes()).max(1);
        let n = self.slots.len();
        let start = (key % n as u64) as usize;
        for i in 0..n {
            let slot = &self.slots[(start + i) % n];
            // Relaxed: a key is the only fact read from it, and it changes once.
            let mut seen = slot.key.load(Ordering::Relaxed);
            if seen == 0 {
                if !claim {
                    return None;
                }
                seen = match slot
                    .key
                    .compare_exchange(0, key, Ordering::Relaxed, Ordering::Relaxed)
                {
                    Ok(_) => key,
                    Err(other) => other,
                };
            }
            if seen == key {
                return Some(&slot.state);
            }
        }
        Some(&self.overflow)
    }
}

impl Default for RatioTable {
    fn default() -> Self {
        RatioTable::new(DEFAULT_MODELS, RatioRules::default())
    }
}

/// FNV-1a, 64 bits: deterministic, no state, no allocation.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests;
