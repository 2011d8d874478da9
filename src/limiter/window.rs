//! A sliding-window event counter in atomics: 60 one-second slots.
//!
//! Each slot packs `(second, count)` into one `AtomicU64`; a slot from an older second
//! is reset by the first event of the new one (a CAS), so no task has to rotate it.
//! Reads sum the slots of the last `WINDOW_SECS` seconds.

use super::sync::{AtomicU64, Ordering};

pub const WINDOW_SECS: u64 = 60;

/// Events per second over the last minute.
#[derive(Debug)]
pub struct SlidingCount {
    slots: [AtomicU64; WINDOW_SECS as usize],
}

impl Default for SlidingCount {
    fn default() -> Self {
        Self {
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

fn pack(sec: u64, count: u64) -> u64 {
    ((sec & 0xffff_ffff) << 32) | (count & 0xffff_ffff)
}

impl SlidingCount {
    /// Counts one event at `now` (clock nanoseconds).
    pub fn record(&self, now: u64) {
        let sec = now / 1_000_000_000;
        let slot = &self.slots[(sec % WINDOW_SECS) as usize];
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let next = if cur >> 32 == sec & 0xffff_ffff {
                pack(sec, (cur & 0xffff_ffff) + 1)
            } else {
                pack(sec, 1)
            };
            // Relaxed: a statistic; each slot is self-contained.
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Events in the last `WINDOW_SECS` seconds up to `now`.
    pub fn total(&self, now: u64) -> u64 {
        let sec = now / 1_000_000_000;
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| {
                let at = v >> 32;
                let age = (sec & 0xffff_ffff).wrapping_sub(at) & 0xffff_ffff;
                age < WINDOW_SECS
            })
            .map(|v| v & 0xffff_ffff)
            .sum()
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn events_leave_the_window_after_a_minute() {
        let c = SlidingCount::default();
        c.record(0);
        c.record(S / 2);
        c.record(10 * S);
        assert_eq!(c.total(10 * S), 3);
        assert_eq!(c.total(59 * S), 3);
        assert_eq!(c.total(60 * S), 1, "second 0 left the window");
        assert_eq!(c.total(70 * S), 0);
        // A slot is reused by a later second without counting the old events.
        c.record(60 * S);
        assert_eq!(c.total(60 * S), 2);
    }
}
