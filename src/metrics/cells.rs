//! What a worker writes per request, without a lock: counters and latency histograms as
//! atomics that only the worker stores to, and that a collector (another thread) reads.
//!
//! **One writer.** Each cell is stored to by one thread only, its worker's (see
//! `shards::Shard`), so adding to it is a load and a store, not a read-modify-write:
//! no other store can come between the two, and nothing is lost. (A `lock`ed add would
//! cost tens of cycles per cell, for a guarantee nobody needs.) A reader loads cells
//! with `Relaxed`: each only ever grows, and two loads of one cell by one thread never
//! see it go back (every atomic has a single modification order), so totals built from
//! what a collector read never go backwards. Where a reader needs several cells to agree
//! (the ledger's counts), the shard's sequence provides it, not the cells.
//!
//! **Histograms** keep hdrhistogram's layout for [`Latency`] (two significant digits,
//! lowest value 1 µs, up to an hour): slot `i` counts the values hdrhistogram counts at
//! its index `i`, so a collector turns the counts it reads into the same
//! `hdrhistogram::Histogram` the worker used to record into (by recording each slot's
//! lowest value as often as the slot counts: every figure read from a histogram, its
//! quantiles, buckets and count, depends only on which slot holds how many values).
//! Slots come in chunks of 128, one per half bucket, each allocated when a value first
//! lands in it: a histogram costs memory only for the magnitudes it has seen.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

use super::series::{Latency, MAX_US};

/// Slots per chunk: hdrhistogram's half bucket at two significant digits.
const CHUNK: usize = 128;
/// Chunks that cover 1 µs ..= [`MAX_US`]: bucket 0 takes two, each of the next 24
/// one (the 24th bucket reaches 2^32 > 3.6·10^9).
const CHUNKS: usize = 26;

/// hdrhistogram's slot for `us` (1 ..= [`MAX_US`]) at two significant digits from 1:
/// 256 sub-buckets (`2 · 10^2` rounded up to a power of two), bucket `b` counting in
/// steps of `2^b`; bucket 0 uses all 256 slots, every later one its upper 128
/// (`Histogram::index_for` with `leading_zero_count_base` 56 and
/// `sub_bucket_half_count_magnitude` 7).
fn slot(us: u64) -> usize {
    let bucket = 56 - (us | 255).leading_zeros() as usize;
    let sub = (us >> bucket) as usize;
    ((bucket + 1) << 7) + sub - CHUNK
}

/// The lowest value hdrhistogram counts at `slot` (`Histogram::value_for`).
fn slot_value(slot: usize) -> u64 {
    let (bucket, sub) = match slot >> 7 {
        0 | 1 => (0, slot),
        chunk => (chunk - 1, (slot & (CHUNK - 1)) + CHUNK),
    };
    (sub as u64) << bucket
}

/// `cell + n`, by its one writer.
#[inline]
pub(super) fn add(cell: &AtomicU64, n: u64) {
    cell.store(cell.load(Relaxed).wrapping_add(n), Relaxed);
}

/// One latency distribution as a worker records it (see the module's notes).
#[derive(Debug, Default)]
pub struct LatencyCells {
    chunks: [OnceLock<Box<[AtomicU64; CHUNK]>>; CHUNKS],
    /// Microseconds recorded, saturating (as [`Latency`]'s sum).
    sum_us: AtomicU64,
}

impl LatencyCells {
    /// Counts `d`, cut to 1 µs ..= an hour as [`Latency::record`] does. Only the
    /// shard's worker calls this.
    #[inline]
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, MAX_US);
        let i = slot(us);
        let chunk = self.chunks[i / CHUNK]
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        add(&chunk[i % CHUNK], 1);
        let sum = self.sum_us.load(Relaxed).saturating_add(us);
        self.sum_us.store(sum, Relaxed);
    }
}

/// What a collector has taken from one [`LatencyCells`] so far.
#[derive(Debug, Default)]
pub struct LatencySeen {
    chunks: [Option<Box<[u64; CHUNK]>>; CHUNKS],
    sum_us: u64,
}

impl LatencySeen {
    /// Adds to `into` what `cells` recorded since the last take; whether there was any.
    pub fn take(&mut self, cells: &LatencyCells, into: &mut Latency) -> bool {
        let mut any = false;
        for (c, (cells, seen)) in cells.chunks.iter().zip(&mut self.chunks).enumerate() {
            // A chunk not yet allocated has counted nothing; one allocated meanwhile is
            // read next time.
            let Some(cells) = cells.get() else {
                continue;
            };
            let seen = seen.get_or_insert_with(|| Box::new([0; CHUNK]));
            for (s, (cell, seen)) in cells.iter().zip(seen.iter_mut()).enumerate() {
                let now = cell.load(Relaxed);
                let new = now.wrapping_sub(*seen);
                if new != 0 {
                    *seen = now;
                    into.record_n_at(slot_value(c * CHUNK + s), new);
                    any = true;
                }
            }
        }
        // Read after the slots: a value counted in a slot read above has its sum in.
        // (Whether a sum read here includes values counted after those slots were read
        // only moves microseconds between two collects, never loses them.)
        let sum = cells.sum_us.load(Relaxed);
        into.add_sum_us(sum.wrapping_sub(self.sum_us));
        self.sum_us = sum;
        any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::Histogram;

    /// Values across every bucket up to an hour, both ends of each slot included.
    fn values() -> impl Iterator<Item = u64> {
        let edges = (0..32).flat_map(|b| {
            let p = 1u64 << b;
            [p - 1, p, p + 1, p + p / 3, p * 2 - 1]
        });
        (1..=2000)
            .chain(edges)
            .chain((1..1000).map(|i| i * 3_600_003))
            .chain([MAX_US - 1, MAX_US])
            .filter(|&v| (1..=MAX_US).contains(&v))
    }

    #[test]
    fn slots_are_hdrhistograms_at_two_significant_digits() {
        let h: Histogram<u64> = Histogram::new(2).unwrap();
        for v in values() {
            let i = slot(v);
            assert!(i < CHUNK * CHUNKS, "{v}");
            assert_eq!(slot_value(i), h.lowest_equivalent(v), "{v}");
            assert_eq!(slot(h.highest_equivalent(v)), i, "{v}");
            if h.lowest_equivalent(v) > 1 {
                assert_eq!(slot(h.lowest_equivalent(v) - 1), i - 1, "{v}");
            }
        }
        assert_eq!(
            slot(MAX_US) / CHUNK,
            CHUNKS - 1,
            "an hour is in the last chunk"
        );
    }

    #[test]
    fn taken_cells_give_the_histogram_recording_would_have() {
        let cells = LatencyCells::default();
        let mut direct = Latency::default();
        let mut taken = Latency::default();
        let mut seen = LatencySeen::default();
        let mut n = 0;
        for (k, v) in values().enumerate() {
            let d = Duration::from_micros(v);
            cells.record(d);
            direct.record(d);
            n += 1;
            if k % 97 == 0 {
                assert!(seen.take(&cells, &mut taken));
                assert!(!seen.take(&cells, &mut taken), "nothing twice");
            }
        }
        seen.take(&cells, &mut taken);
        cells.record(Duration::from_secs(7200));
        direct.record(Duration::from_secs(7200));
        for d in [
            Duration::ZERO,
            Duration::from_nanos(999),
            Duration::from_nanos(123_456_789),
            Duration::from_secs(3600) - Duration::from_nanos(1),
            Duration::MAX,
        ] {
            cells.record(d);
            direct.record(d);
        }
        seen.take(&cells, &mut taken);
        assert_eq!(taken.count(), n + 6);
        assert_eq!(taken.count(), direct.count());
        assert_eq!(taken.sum_seconds(), direct.sum_seconds());
        assert_eq!(taken.buckets(), direct.buckets());
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(taken.quantile_ms(q), direct.quantile_ms(q), "{q}");
        }
    }
}
