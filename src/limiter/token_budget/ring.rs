//! The charges sent, per sub-window of width `w = ceil(span / (K - 2))`: one word per
//! sub-window in a ring of K, packing `(tag, amount)` with `tag = index + 1` (0: never
//! used) in the high half and the tokens charged in it in the low half.
//!
//! **Writes.** A charge is added to its sub-window's word by one CAS loop: the same tag
//! adds, an older tag is replaced (that sub-window is more than a span old), a newer tag
//! (the caller's time is stale by K sub-windows) takes the charge in the newer
//! sub-window instead: later, so counted longer, never lost. A settlement adjusts the
//! word of the sub-window the charge was recorded in, if it still holds that tag (else
//! the charge has left every span and the adjustment is moot).
//!
//! **Moves.** A charge settled under `actual` moves to the answer's end: added to the
//! later sub-window first, then taken from its old word (Release).
//!
//! **Reads.** The tokens charged in the sub-windows overlapping `(at - span, at]` (the
//! oldest whole): K loads, oldest sub-window first (Acquire), so a read that sees a
//! moved charge gone from its old word sees it in its new one. A word tagged after
//! `at`'s sub-window means another thread's clock is ahead, and may have replaced a word
//! this read needed: the read is made again at that sub-window's start (decided later,
//! as the window guard does), where the word replaced has left the span.

use crate::limiter::sync::{AtomicU64, Ordering};

/// Sub-windows in the ring: more than a span's worth (at most `K - 1` overlap one).
#[cfg(not(sidecar_loom))]
pub(super) const K: usize = 64;
#[cfg(sidecar_loom)]
pub(super) const K: usize = 8;

const LOW: u64 = 0xffff_ffff;
/// A tag this far ahead of the sub-window read is a real one (not a wrapped old one).
const AHEAD_MAX: u32 = 1 << 24;

fn pack(tag: u32, amount: u64) -> u64 {
    (u64::from(tag) << 32) | amount.min(LOW)
}

fn tag_of(index: u64) -> u32 {
    (index as u32).wrapping_add(1)
}

/// How many sub-windows `tag` lies ahead of sub-window `cur`, if it does.
fn ahead(cur: u64, tag: u32) -> Option<u64> {
    let a = tag.wrapping_sub(tag_of(cur));
    (a != 0 && a <= AHEAD_MAX).then_some(u64::from(a))
}

/// What a read counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sum {
    /// Tokens charged in the sub-windows overlapping the span ending at `at`.
    pub charged: u64,
    /// The time decided at: the caller's, or a later sub-window's start.
    pub at: u64,
}

#[derive(Debug)]
pub(super) struct Ring {
    width: u64,
    span: u64,
    words: Box<[AtomicU64]>,
}

impl Ring {
    pub fn new(span: u64) -> Self {
        Self {
            width: span.div_ceil(K as u64 - 2).max(1),
            span,
            words: (0..K).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    #[cfg(all(test, not(sidecar_loom)))]
    pub fn width(&self) -> u64 {
        self.width
    }

    fn word(&self, index: u64) -> &AtomicU64 {
        &self.words[(index % K as u64) as usize]
    }

    /// Adds `amount` sent at `time`; returns the sub-window it was recorded in (a later
    /// one if `time`'s word already holds a later sub-window).
    pub fn charge(&self, time: u64, amount: u64, contention: &AtomicU64) -> u64 {
        let own = time / self.width;
        let word = self.word(own);
        // Relaxed: ordered by the caller's Release on `pending` (see the module doc of
        // `token_budget`); the word itself is self-contained.
        let mut cur = word.load(Ordering::Relaxed);
        loop {
            let tag = (cur >> 32) as u32;
            let (next, at) = if tag == tag_of(own) {
                (pack(tag, (cur & LOW).saturating_add(amount)), own)
            } else if let Some(a) = ahead(own, tag) {
                (pack(tag, (cur & LOW).saturating_add(amount)), own + a)
            } else {
                (pack(tag_of(own), amount), own)
            };
            match word.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return at,
                Err(actual) => {
                    // Relaxed: a statistic.
                    contention.fetch_add(1, Ordering::Relaxed);
                    cur = actual;
                }
            }
        }
    }

    /// Changes the charge recorded in sub-window `index` by `delta` (never below 0);
    /// nothing if the word has moved on to a later sub-window.
    pub fn adjust(&self, index: u64, delta: i64) {
        if delta == 0 {
            return;
        }
        let word = self.word(index);
        // Relaxed: only the start of the CAS loop.
        let mut cur = word.load(Ordering::Relaxed);
        loop {
            if (cur >> 32) as u32 != tag_of(index) {
                return;
            }
            let amount = (cur & LOW).saturating_add_signed(delta);
            let next = pack(tag_of(index), amount);
            // Release: a charge moved away from here (`moved`) was added to its later
            // word first; a read that sees it gone from here sees it there.
            match word.compare_exchange_weak(cur, next, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Moves `from_amount` recorded in sub-window `from` to `time`, as `amount`: added
    /// at `time` first, then taken from `from`, so a read counts it at least once.
    /// Returns the sub-window it is recorded in now.
    pub fn moved(
        &self,
        from: u64,
        from_amount: u64,
        time: u64,
        amount: u64,
        contention: &AtomicU64,
    ) -> u64 {
        let to = self.charge(time, amount, contention);
        self.adjust(from, -i64::try_from(from_amount).unwrap_or(i64::MAX));
        to
    }

    /// Tokens charged in the sub-windows overlapping `(at - span, at]` (the oldest
    /// whole), decided at `at` or, if a later sub-window is recorded, at its start.
    pub fn sum(&self, at: u64, span: u64) -> Sum {
        let mut at = at;
        loop {
            let (charged, later) = self.sum_at(at, span);
            match later {
                None => return Sum { charged, at },
                Some(index) => at = index * self.width,
            }
        }
    }

    /// The sum at `at`, or the latest sub-window recorded after `at`'s.
    fn sum_at(&self, at: u64, span: u64) -> (u64, Option<u64>) {
        let cur = at / self.width;
        let lo = at.saturating_sub(span) / self.width;
        let back = cur - lo;
        let mut charged = 0u64;
        let mut later = None;
        // Oldest first: lo, lo + 1, ..., cur, then the words of other sub-windows.
        for i in lo..lo + K as u64 {
            // Acquire: pairs with `adjust`'s Release, so a charge seen gone from an older
            // word is seen in the later one it moved to. Sends' charges are ordered by
            // the caller's Acquire on `pending`.
            let w = self.word(i).load(Ordering::Acquire);
            let tag = (w >> 32) as u32;
            if tag == 0 {
                continue;
            }
            if u64::from(tag_of(cur).wrapping_sub(tag)) <= back {
                charged = charged.saturating_add(w & LOW);
            } else if let Some(a) = ahead(cur, tag) {
                later = later.max(Some(cur + a));
            }
        }
        (charged, later)
    }

    /// When enough of the sub-windows counted at `at` leave the span to take `excess`
    /// off the count: oldest first, sub-window `i` leaves at `(i + 1)·w + span`.
    pub fn until(&self, at: u64, excess: u64) -> Option<u64> {
        let cur = at / self.width;
        let lo = at.saturating_sub(self.span) / self.width;
        let mut freed = 0u64;
        for i in lo..=cur {
            // Relaxed: an estimate; a word missed only makes the wait longer.
            let w = self.word(i).load(Ordering::Relaxed);
            if (w >> 32) as u32 == tag_of(i) {
                freed = freed.saturating_add(w & LOW);
            }
            if freed >= excess {
                return Some((i + 1).saturating_mul(self.width).saturating_add(self.span));
            }
        }
        None
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    /// Sub-windows of 1 000 ns over a span of 62 000.
    const SPAN: u64 = 62_000;
    const W: u64 = 1_000;

    #[test]
    fn charges_leave_the_sum_with_their_sub_window() {
        let r = Ring::new(SPAN);
        let c = AtomicU64::new(0);
        assert_eq!(r.width(), W);
        r.charge(5 * W, 10, &c);
        r.charge(5 * W + 999, 5, &c);
        r.charge(6 * W, 7, &c);
        assert_eq!(r.sum(6 * W, SPAN).charged, 22);
        assert_eq!(r.sum(5 * W + SPAN, SPAN).charged, 22, "sub-window 5 whole");
        assert_eq!(r.sum(6 * W + SPAN, SPAN).charged, 7);
        assert_eq!(r.sum(7 * W + SPAN, SPAN).charged, 0);
        assert_eq!(r.until(6 * W, 15), Some(6 * W + SPAN), "5 leaves first");
        assert_eq!(r.until(6 * W, 16), Some(7 * W + SPAN));
        assert_eq!(r.until(6 * W, 23), None);
    }

    #[test]
    fn a_reused_word_replaces_the_old_sub_window_and_adjusts_only_its_own() {
        let r = Ring::new(SPAN);
        let c = AtomicU64::new(0);
        assert_eq!(r.charge(3 * W, 10, &c), 3);
        r.adjust(3, -4);
        assert_eq!(r.sum(3 * W, SPAN).charged, 6);
        let later = 3 + K as u64;
        assert_eq!(r.charge(later * W, 2, &c), later);
        r.adjust(3, 100);
        assert_eq!(
            r.sum(later * W, SPAN).charged,
            2,
            "the old charge left the span"
        );
        r.adjust(later, -5);
        assert_eq!(r.sum(later * W, SPAN).charged, 0, "never below zero");
    }

    #[test]
    fn a_stale_time_is_recorded_and_read_at_the_later_sub_window() {
        let r = Ring::new(SPAN);
        let c = AtomicU64::new(0);
        let later = 2 + K as u64;
        r.charge(later * W, 4, &c);
        assert_eq!(
            r.charge(2 * W, 3, &c),
            later,
            "taken in the later sub-window"
        );
        let s = r.sum(10 * W, SPAN);
        assert_eq!(
            (s.at, s.charged),
            (later * W, 7),
            "decided at the later start"
        );
    }
}
