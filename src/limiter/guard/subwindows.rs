//! The guard's conservative counts: claims not yet stamped (one word), and stamped sends
//! per sub-window of width `w = ceil(span / (K - 2))`, kept as a cumulative count.
//!
//! **Layout.** `head` packs `(index, cum)`: the latest sub-window stamped (`time / w`,
//! low 32 bits) and the number of stamps ever (wrapping 32 bits). Every stamp is one CAS
//! on it; a stamp older than the head's sub-window counts in the head's, at its start
//! (later, so conservative). The stamp that moves the head on writes `(i, cum through
//! i)` into `archive[i % K]` for the sub-windows it left (the last K of them). Stamps in
//! the sub-windows overlapping `(now - span, now]`, the oldest whole, are then
//! `head.cum - archive[lo - 1].cum`: two loads, whatever the limit.
//!
//! **Admission is increment-then-check.** A claim adds itself to `pending` first and
//! only then reads the counts: of any set of claims, the last to increment sees all the
//! others (pending, or stamped: a stamp moves the head before it leaves `pending`, with
//! Release, and the head's cum never goes back), so no set of concurrent claims can
//! together pass the limit. An archive not yet written (its writer is between two
//! stores) is replaced by an older one: a smaller base, a larger count.
//!
//! **A stale `now`.** A claim whose clock read is older than the head decides, and is
//! recorded, at the head's start: its own stamp then comes after every stamp counted
//! before the head, so what it counts is what its span holds.

use crossbeam_utils::CachePadded;

use super::super::sync::{AtomicU64, Ordering};

/// Archived sub-windows: more than a span's worth (at most `K - 1` overlap one).
#[cfg(not(sidecar_loom))]
pub(super) const K: usize = 64;
#[cfg(sidecar_loom)]
pub(super) const K: usize = 8;

/// Units of `pending`: every claim counts in the low half; a claim recorded only here
/// (sub-window mode, or a forced send the ring had no room for) in the high half too.
pub(super) const RING_UNIT: u64 = 1;
pub(super) const SUB_UNIT: u64 = 1 | 1 << 32;
pub(super) const LOW: u64 = 0xffff_ffff;
/// A head this far ahead of `now` is a stale word from 2^32 sub-windows ago.
const AHEAD_MAX: u32 = 1 << 24;

fn pack(index: u64, cum: u64) -> u64 {
    ((index & LOW) << 32) | (cum & LOW)
}

/// One more stamp in the word's sub-window (the count wraps within its half).
fn bump(word: u64) -> u64 {
    (word & !LOW) | (word.wrapping_add(1) & LOW)
}

fn index32(word: u64) -> u32 {
    (word >> 32) as u32
}

/// How many sub-windows `word`'s lies ahead of the sub-window `cur`, if it does.
fn ahead(cur: u64, word: u64) -> Option<u64> {
    let a = index32(word).wrapping_sub(cur as u32);
    (a != 0 && a <= AHEAD_MAX).then_some(u64::from(a))
}

/// The full index of `word`'s sub-window, at or before `cur` (`word` not ahead).
fn full_index(cur: u64, word: u64) -> u64 {
    cur.saturating_sub(u64::from((cur as u32).wrapping_sub(index32(word))))
}

/// What a claim at `at` counts.
pub(super) struct Sum {
    /// Stamps in the sub-windows `lo..`.
    pub stamped: u64,
    /// The time decided at: `now`, or the head's start if that is later.
    pub at: u64,
    lo: u64,
    head: u64,
    base: u64,
}

#[derive(Debug)]
pub(super) struct SubWindows {
    width: u64,
    span: u64,
    /// Claims not yet stamped or released: all in the low half, sub-window-only ones
    /// also in the high half.
    pending: CachePadded<AtomicU64>,
    /// `(index, cum)` of the latest sub-window stamped; 0 before the first stamp.
    head: CachePadded<AtomicU64>,
    /// The first sub-window stamped, + 1 (0: none yet): before it, cum is 0.
    first: AtomicU64,
    /// `(i, cum through i)` at `i % K`, for sub-windows the head has left.
    archive: Box<[AtomicU64]>,
    /// The exact check consults these counts before this time (a sub-window-only send's
    /// stamp plus the span, rounded up to a sub-window).
    consult_until: CachePadded<AtomicU64>,
}

impl SubWindows {
    pub fn new(span: u64) -> Self {
        Self {
            width: span.div_ceil(K as u64 - 2).max(1),
            span,
            pending: CachePadded::new(AtomicU64::new(0)),
            head: CachePadded::new(AtomicU64::new(0)),
            first: AtomicU64::new(0),
            archive: (0..K).map(|_| AtomicU64::new(0)).collect(),
            consult_until: CachePadded::new(AtomicU64::new(0)),
        }
    }

    #[cfg(all(test, not(sidecar_loom)))]
    pub fn width(&self) -> u64 {
        self.width
    }

    /// Adds a claim to `pending`; returns the word including it.
    #[inline]
    pub fn enter(&self, unit: u64) -> u64 {
        // Acquire: pairs with stamps' Release decrements, so their head (and archive,
        // `consult_until`) writes are visible to the reads that follow.
        self.pending.fetch_add(unit, Ordering::Acquire) + unit
    }

    /// A refused or released claim leaves `pending`.
    #[inline]
    pub fn leave(&self, unit: u64) {
        // Relaxed: it publishes nothing; a reader that still counts it only refuses more.
        self.pending.fetch_sub(unit, Ordering::Relaxed);
    }

    /// `pending`'s word as it stands (for read-only evaluations).
    pub fn pending_word(&self) -> u64 {
        // Acquire: as in `enter`.
        self.pending.load(Ordering::Acquire)
    }

    /// Whether the exact check must also pass these counts: a sub-window-only claim is
    /// pending, or one stamped less than a span ago.
    #[inline]
    pub fn consult(&self, word: u64, now: u64) -> bool {
        // Relaxed: ordered by `enter`'s Acquire (set before the stamp's Release).
        word >> 32 != 0 || self.consult_until.load(Ordering::Relaxed) > now
    }

    /// When the exact check stops consulting these counts, if no sub-window-only claim
    /// is pending.
    pub fn consult_end(&self, word: u64) -> Option<u64> {
        // Relaxed: as in `consult`.
        (word >> 32 == 0).then(|| self.consult_until.load(Ordering::Relaxed))
    }

    /// The admission check for `pending` claims (the caller included) at `now`: the
    /// count compared and the time decided at, or the time the counts allow a claim
    /// (None: only pending claims stand in the way).
    #[inline]
    pub fn check(&self, word: u64, now: u64, limit: u64) -> Result<(u64, u64), Option<u64>> {
        let sum = self.sum(now, self.span);
        let count = (word & LOW).saturating_add(sum.stamped);
        if count <= limit {
            Ok((count, sum.at))
        } else {
            Err(self.until(&sum, count - limit))
        }
    }

    /// Stamps in the sub-windows overlapping `(at - span, at]`, the oldest whole; `at`
    /// raised to the head's start if the head is ahead of it.
    #[inline]
    pub fn sum(&self, at: u64, span: u64) -> Sum {
        // Relaxed: the claim's `enter` (Acquire) ordered the stamps it must see.
        let head = self.head.load(Ordering::Relaxed);
        let mut sum = Sum {
            stamped: 0,
            at,
            lo: 0,
            head: 0,
            base: 0,
        };
        if head == 0 && self.first.load(Ordering::Relaxed) == 0 {
            return sum; // nothing stamped yet
        }
        let mut cur = at / self.width;
        if let Some(a) = ahead(cur, head) {
            cur += a;
            sum.at = cur * self.width;
        }
        sum.lo = sum.at.saturating_sub(span) / self.width;
        sum.head = full_index(cur, head);
        if sum.head < sum.lo {
            return sum; // nothing stamped since the span began
        }
        sum.base = self.cum_through(sum.lo.wrapping_sub(1), cur);
        sum.stamped = (head & LOW).wrapping_sub(sum.base) & LOW;
        sum
    }

    /// Stamps ever (wrapping), through sub-window `i`, which the head has left: its
    /// archive. Rarely (its writer is between two stores) the latest archived before it,
    /// or 0 if none is: a smaller base, so a claim counts more. Every sub-window of the
    /// last K before the head is archived, so an old guard always has one; only a young
    /// one (fewer than 2^32 stamps ever) falls back to 0.
    fn cum_through(&self, i: u64, cur: u64) -> u64 {
        // Relaxed: ordered by the claim's `enter`, as the head.
        let first = self.first.load(Ordering::Relaxed);
        if first == 0 || i.wrapping_add(1) < first {
            return 0; // before the first stamp (`i` may be -1)
        }
        let direct = self.archive[(i % K as u64) as usize].load(Ordering::Relaxed);
        if direct != 0 && index32(direct) == i as u32 {
            return direct & LOW;
        }
        let back = cur - i;
        self.archive
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&a| a != 0)
            .map(|a| ((cur as u32).wrapping_sub(index32(a)), a))
            .filter(|&(d, _)| u64::from(d) >= back && d < 1 << 31)
            .min_by_key(|&(d, _)| d)
            .map_or(0, |(_, a)| a & LOW)
    }

    /// When enough of the counted sub-windows have left the span to take `excess` off the
    /// count: oldest first, sub-window `i` leaves at `(i + 1)·w + span`.
    fn until(&self, sum: &Sum, excess: u64) -> Option<u64> {
        let leaves = |i: u64| Some((i + 1).saturating_mul(self.width).saturating_add(self.span));
        for i in sum.lo..sum.head {
            // Relaxed: an estimate; a missing archive only makes the wait longer.
            let a = self.archive[(i % K as u64) as usize].load(Ordering::Relaxed);
            if a != 0
                && index32(a) == i as u32
                && ((a & LOW).wrapping_sub(sum.base) & LOW) >= excess
            {
                return leaves(i);
            }
        }
        (sum.stamped >= excess).then(|| leaves(sum.head)).flatten()
    }

    /// Records a send stamped at `time`; returns the time recorded: the head's start if
    /// `time` is before it (another stamp already moved the head on).
    pub fn record(&self, time: u64, contention: &AtomicU64) -> u64 {
        let own = time / self.width;
        // Relaxed: the stamp's Release on `pending` orders it.
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            // Relaxed: written once, before the stamp's Release; a word of 0 is then a
            // real head (index and cum both wrapped to 0).
            let empty = head == 0 && self.first.load(Ordering::Relaxed) == 0;
            let (next, recorded) = if empty {
                (pack(own, 1), time)
            } else if let Some(a) = ahead(own, head) {
                // A later sub-window is the head: count there, from its start.
                (bump(head), (own + a) * self.width)
            } else if index32(head) == own as u32 {
                (bump(head), time)
            } else {
                (pack(own, (head & LOW) + 1), time)
            };
            // Relaxed: as the load above.
            match self
                .head
                .compare_exchange_weak(head, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    if empty {
                        // Relaxed: as above.
                        self.first.store(own + 1, Ordering::Relaxed);
                    } else if index32(next) != index32(head) {
                        self.moved_on(head, own);
                    }
                    return recorded;
                }
                Err(actual) => {
                    // Relaxed: a statistic.
                    contention.fetch_add(1, Ordering::Relaxed);
                    head = actual;
                }
            }
        }
    }

    /// The head moved from `old` to sub-window `own`: archive the sub-windows it left
    /// (the last K: nothing was stamped after `old`'s, so all hold its cum).
    fn moved_on(&self, old: u64, own: u64) {
        let from = full_index(own, old).max(own.saturating_sub(K as u64));
        for i in from..own {
            // Relaxed: ordered before the stamp's Release on `pending`.
            self.archive[(i % K as u64) as usize].store(pack(i, old & LOW), Ordering::Relaxed);
        }
    }

    /// A sub-window-only send stamped at `time`: the exact check consults these counts
    /// until it has left the span.
    pub fn extend_consult(&self, time: u64) {
        let until = time
            .saturating_add(self.span)
            .div_ceil(self.width)
            .saturating_mul(self.width);
        // Relaxed: ordered before the stamp's Release on `pending`; one write per
        // sub-window at most.
        if self.consult_until.load(Ordering::Relaxed) < until {
            self.consult_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// A stamped claim leaves `pending`, after the head counted it.
    #[inline]
    pub fn leave_stamped(&self, unit: u64) {
        // Release: a claim whose `enter` no longer counts this one as pending sees the
        // head, archive and `consult_until` as they were after this stamp.
        self.pending.fetch_sub(unit, Ordering::Release);
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    /// Sub-windows of 1 000 ns over a span of 62 000.
    const SPAN: u64 = 62_000;
    const W: u64 = 1_000;

    fn record_n(s: &SubWindows, time: u64, n: u64) {
        let contention = AtomicU64::new(0);
        for _ in 0..n {
            assert_eq!(s.record(time, &contention), time);
        }
    }

    #[test]
    fn the_count_wraps_within_its_half_of_the_word() {
        assert_eq!(bump(pack(5, LOW)), pack(5, 0));
        assert_eq!(bump(pack(5, 7)), pack(5, 8));
    }

    #[test]
    fn counts_stay_right_when_the_cumulative_count_wraps() {
        let s = SubWindows::new(SPAN);
        assert_eq!(s.width, W);
        // As if 2^32 - 3 stamps had come before, one a sub-window from 36 to 99 (and
        // the archive as the head left those sub-windows).
        let cum_through = |i: u64| LOW - 2 - (99 - i);
        s.head.store(pack(99, cum_through(99)), Ordering::Relaxed);
        s.first.store(1, Ordering::Relaxed);
        for i in 36..99 {
            s.archive[(i % K as u64) as usize].store(pack(i, cum_through(i)), Ordering::Relaxed);
        }
        record_n(&s, 100 * W, 5);
        record_n(&s, 101 * W, 2);
        assert_eq!(s.head.load(Ordering::Relaxed), pack(101, 4));
        assert_eq!(
            s.sum(101 * W, SPAN).stamped,
            61 + 7,
            "39 to 99 are in the span"
        );
        assert_eq!(s.sum(100 * W + SPAN, SPAN).stamped, 7, "from 100 on");
        assert_eq!(s.sum(101 * W + SPAN, SPAN).stamped, 2, "from 101 on");
    }

    #[test]
    fn a_jump_past_k_sub_windows_archives_the_last_k() {
        let s = SubWindows::new(SPAN);
        record_n(&s, 10 * W, 3);
        record_n(&s, 210 * W, 1);
        // The span at 210 reaches back to 148: archive 147 holds the 3 of sub-window 10.
        assert_eq!(s.sum(210 * W, SPAN).stamped, 1);
        let stale = s.sum(72 * W, SPAN);
        assert_eq!(
            (stale.at, stale.stamped),
            (210 * W, 1),
            "decided at the head"
        );
    }

    #[test]
    fn before_the_first_stamp_the_count_starts_at_zero() {
        let s = SubWindows::new(SPAN);
        assert_eq!(s.sum(5 * W, SPAN).stamped, 0);
        record_n(&s, 5 * W, 2);
        record_n(&s, 6 * W, 1);
        assert_eq!(s.sum(6 * W, SPAN).stamped, 3);
        assert_eq!(
            s.sum(5 * W + SPAN, SPAN).stamped,
            3,
            "sub-window 5 counted whole"
        );
        assert_eq!(s.sum(6 * W + SPAN, SPAN).stamped, 1);
        assert_eq!(s.sum(7 * W + SPAN, SPAN).stamped, 0);
    }

    #[test]
    fn an_archive_not_yet_written_is_replaced_by_an_older_one() {
        let s = SubWindows::new(SPAN);
        record_n(&s, 10 * W, 3);
        record_n(&s, 11 * W, 4);
        record_n(&s, 12 * W, 5);
        let at = 11 * W + SPAN; // counts 11 and 12: 9
        assert_eq!(s.sum(at, SPAN).stamped, 9);
        // Archive 10 missing, as while its writer is between stores: its base comes
        // from before 10, so 10's three count too.
        s.archive[10].store(0, Ordering::Relaxed);
        assert_eq!(s.sum(at, SPAN).stamped, 12);
        // With no archive before it (a young guard), everything since the first counts.
        s.archive[11].store(0, Ordering::Relaxed);
        assert_eq!(s.sum(at + W, SPAN).stamped, 12);
    }

    #[test]
    fn a_stamp_before_the_head_counts_in_the_head_at_its_start() {
        let s = SubWindows::new(SPAN);
        let contention = AtomicU64::new(0);
        s.record(20 * W + 500, &contention);
        assert_eq!(s.record(3 * W, &contention), 20 * W);
        assert_eq!(s.sum(20 * W + SPAN, SPAN).stamped, 2);
        assert_eq!(s.sum(21 * W + SPAN, SPAN).stamped, 0);
    }
}
