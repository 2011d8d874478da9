//! The exact ring: one word per send still counted, claimed through a version counter.
//!
//! A slot holds [`FREE`], [`PENDING`] (claimed, not yet stamped) or a stamp `time + 1`.
//! A claim reads the version, scans the slots ever used (a high-water mark, so a limit
//! of 40 touches about 40 of them), counts the pending ones and the stamps still in the
//! span, and, if the count is below the limit, moves one free or expired slot to
//! `PENDING` by CAS and then the version from `v` to `v + 1`. Only one claim wins each
//! version, and each winner's scan came after every earlier winner's slot write (the
//! version's Release/Acquire), so the count it compared was current. A claim that lost
//! the version puts back the value it took and scans again; another claim won, so the
//! ring as a whole is lock-free. Until it is put back, that slot reads as pending: a
//! concurrent scan may count it (a winner's `count` may then be higher, by one per such
//! slot, never lower) and refuse on it, never admit. Such a refusal admits no fewer in all: the loser
//! scans again and takes the place (of claims racing for the last places, the last to
//! decide sees no loser's slot, so all places are taken). It has to count: the slot may
//! have held a stamp that the loser, reading a later clock, found expired while this
//! claim's span still holds it.
//!
//! Nothing but its owner changes a pending slot (a scan never takes one), so stamping
//! and releasing are plain stores. A release puts back the value the claim replaced
//! (an expired stamp, or free): a slot's later values are then never older stamps than
//! the one a claim saw there, which is what the guard's bound rests on.

use super::super::sync::{AtomicU64, AtomicUsize, Ordering};

pub(super) const FREE: u64 = 0;
pub(super) const PENDING: u64 = u64::MAX;
/// The latest time a stamp can hold (`time + 1` stays below [`PENDING`]).
pub(super) const MAX_TIME: u64 = u64::MAX - 2;

/// What a scan at `now` counted.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Pending slots plus stamps with `time + span > now`.
    pub count: u32,
    pub stamped: u32,
    /// The earliest stamp counted.
    pub oldest: u64,
    /// The latest stamp seen, counted or not (+ 1; 0: none).
    pub latest: u64,
    /// A free or expired slot and the value it holds.
    pub candidate: Option<(usize, u64)>,
}

pub(super) enum Outcome {
    /// The claim holds `index`, which held `prev`; `count` includes it.
    Won { index: usize, prev: u64, count: u32 },
    /// The count is at the limit; enough stamps leave the span at `until` (None: only
    /// pending claims stand in the way).
    Refused { until: Option<u64> },
    /// Every slot is taken (a forced claim only).
    Full,
}

#[derive(Debug)]
pub(super) struct Ring {
    slots: Box<[AtomicU64]>,
    /// Slots ever used: scans cover `[0, used)`.
    used: AtomicUsize,
    version: AtomicU64,
    /// The latest stamp a claim replaced (+ 1), if it was the latest the claim saw: the
    /// ring's latest stamp is otherwise still in it.
    replaced: AtomicU64,
}

impl Ring {
    pub fn new(len: usize) -> Self {
        Self {
            slots: (0..len).map(|_| AtomicU64::new(FREE)).collect(),
            used: AtomicUsize::new(0),
            version: AtomicU64::new(0),
            replaced: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Slots ever used (the high-water mark).
    pub fn used(&self) -> usize {
        // Relaxed: a statistic.
        self.used.load(Ordering::Relaxed)
    }

    fn scan(&self, used: usize, now: u64, span: u64) -> Scan {
        let mut scan = Scan {
            oldest: u64::MAX,
            ..Scan::default()
        };
        for (i, slot) in self.slots[..used].iter().enumerate() {
            // Relaxed: the version's Acquire made every earlier winner's PENDING visible;
            // any value after it in the slot's order is as good (see the module doc).
            let value = slot.load(Ordering::Relaxed);
            if value != PENDING {
                scan.latest = scan.latest.max(value);
            }
            if value == PENDING {
                scan.count += 1;
            } else if value != FREE && (value - 1).saturating_add(span) > now {
                scan.count += 1;
                scan.stamped += 1;
                scan.oldest = scan.oldest.min(value - 1);
            } else if scan.candidate.is_none() {
                scan.candidate = Some((i, value));
            }
        }
        scan
    }

    /// A scan at `now` without claiming (read-only evaluations).
    pub fn count(&self, now: u64, span: u64) -> Scan {
        // Acquire: as in `claim`.
        self.version.load(Ordering::Acquire);
        self.scan(self.used.load(Ordering::Relaxed), now, span)
    }

    /// Takes a slot at `now` if fewer than `limit` are counted (`None`: no limit, a
    /// forced send).
    pub fn claim(
        &self,
        now: u64,
        span: u64,
        limit: Option<u32>,
        contention: &AtomicU64,
    ) -> Outcome {
        // Slots known taken: a claim that found the one past the mark taken scans it
        // next time, even before the other claim's mark reaches us.
        let mut seen = 0;
        loop {
            // Acquire: pairs with the winners' Release CAS below; their slot writes and
            // high-water marks are visible to the scan.
            let v = self.version.load(Ordering::Acquire);
            // Relaxed: ordered by the Acquire above.
            let used = self.used.load(Ordering::Relaxed).max(seen);
            let scan = self.scan(used, now, span);
            if let Some(limit) = limit {
                if scan.count >= limit {
                    return Outcome::Refused {
                        until: self.until(&scan, scan.count - limit + 1, now, span),
                    };
                }
            }
            let (index, prev) = match scan.candidate {
                Some(c) => c,
                None if used < self.slots.len() => (used, FREE),
                None => return Outcome::Full,
            };
            // Relaxed: published by the version CAS (Release).
            if self.slots[index]
                .compare_exchange(prev, PENDING, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                seen = seen.max(index + 1);
                // Relaxed: a statistic.
                contention.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if index == used {
                // Relaxed: published by the version CAS (Release).
                self.used.fetch_max(used + 1, Ordering::Relaxed);
            }
            // Release: the next winner's scan sees our PENDING. Relaxed on failure: we
            // scan again from a fresh Acquire load.
            if self
                .version
                .compare_exchange(v, v + 1, Ordering::Release, Ordering::Relaxed)
                .is_ok()
            {
                if prev != FREE && prev >= scan.latest {
                    // Rare (the span held nothing later): keep it for `newest`.
                    // Relaxed: read alone.
                    self.replaced.fetch_max(prev, Ordering::Relaxed);
                }
                return Outcome::Won {
                    index,
                    prev,
                    count: scan.count + 1,
                };
            }
            // Relaxed: nobody else writes a pending slot; the value is all that matters.
            self.slots[index].store(prev, Ordering::Relaxed);
            contention.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// When `k` of the counted stamps have left the span (None if fewer are stamped).
    pub fn until(&self, scan: &Scan, k: u32, now: u64, span: u64) -> Option<u64> {
        if k > scan.stamped {
            return None;
        }
        let kth = if k == 1 {
            scan.oldest
        } else {
            // Rare (the limit was lowered below the count): a second pass.
            let mut times: Vec<u64> = self.slots[..self.used()]
                .iter()
                .map(|s| s.load(Ordering::Relaxed))
                .filter(|&v| v != FREE && v != PENDING && (v - 1).saturating_add(span) > now)
                .map(|v| v - 1)
                .collect();
            let k = (k as usize).checked_sub(1).filter(|&k| k < times.len())?;
            *times.select_nth_unstable(k).1
        };
        Some(kth.saturating_add(span))
    }

    /// Records the send time of the pending slot `index`.
    pub fn stamp(&self, index: usize, time: u64) {
        let slot = &self.slots[index];
        // Relaxed: the slot's owner is its only writer; scans need only the value.
        debug_assert_eq!(
            slot.load(Ordering::Relaxed),
            PENDING,
            "slot {index} not pending"
        );
        slot.store(time.min(MAX_TIME) + 1, Ordering::Relaxed);
    }

    /// Gives back the pending slot `index`, restoring what the claim replaced.
    pub fn restore(&self, index: usize, prev: u64) {
        let slot = &self.slots[index];
        // Relaxed: as in `stamp`.
        debug_assert_eq!(
            slot.load(Ordering::Relaxed),
            PENDING,
            "slot {index} not pending"
        );
        slot.store(prev, Ordering::Relaxed);
    }

    /// The latest stamp recorded: still in a slot, or replaced by a claim that kept it.
    pub fn newest(&self) -> Option<u64> {
        self.slots[..self.used()]
            .iter()
            // Relaxed: a snapshot of values.
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&v| v != PENDING)
            .chain([self.replaced.load(Ordering::Relaxed)])
            .max()
            .and_then(|v| v.checked_sub(1))
    }

    /// Stamps with `time <= now` and `time + span > now`.
    pub fn stamped_in(&self, now: u64, span: u64) -> u32 {
        self.slots[..self.used()]
            .iter()
            // Relaxed: a snapshot of values.
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&v| {
                v != FREE && v != PENDING && v - 1 <= now && (v - 1).saturating_add(span) > now
            })
            .count() as u32
    }
}
