//! The rolling-window guard: never more than `L` sends in any window of length
//! `span = W + margin`, as counted at the sidecar, with no lock.
//!
//! **Rule.** A claim at `now` succeeds iff (pending claims + stamped sends with
//! `time > now - span`) `< L`. A claim is pending from admission until it is stamped
//! with its send time (never earlier than the claim) or released (never sent); pending
//! counts as inside the window whatever its age. Stamps later than `now` count too (a
//! thread whose clock read came later stamped them).
//!
//! **Why that bounds every window.** Take any `t` and the sends stamped in
//! `(t - span, t]`, and among them the claim C that came last in the claims' order (the
//! ring's version, or the order of increments on `pending`; below). C decided at a time
//! `now_C` no later than its stamp, so `now_C <= t`; every other send of the interval
//! was claimed before C and, when C looked, was pending or stamped after
//! `t - span >= now_C - span`: C counted it and was admitted below `L`, so the interval
//! holds at most `L`. Forced sends are counted but never refused (an interval holds at
//! most `L` plus the forced sends claimed after its last metered claim); with the limit
//! changing, the bound is the limit C saw.
//!
//! **Exact mode** (`limit <= min(EXACT_CAP, max_limit)`): a ring of send times claimed
//! through a version counter (`ring.rs`): each admission decides on a count no other
//! admission changed in between, so the rule holds exactly, and `Claim::count` is the
//! count (higher only when the slot of a racing claim that then lost was counted).
//! **Sub-window mode** (a larger limit): a cumulative count per sub-window of
//! `span / 62` (`subwindows.rs`), admitted by increment-then-check in two loads whatever
//! the limit; the oldest sub-window is counted whole, so up to `span / 62` longer.
//!
//! **Mode switches.** Every claim is recorded in the sub-window counts, exact ones too,
//! so a switch up keeps the history. A claim recorded only there (sub-window mode, or a
//! forced send the ring had no room for) makes exact claims pass the sub-window check
//! as well while it is pending and for a span after its stamp; its mark is set before it
//! leaves `pending`, so the claim that comes last in `pending`'s order sees it.
//!
//! **A stale clock read.** A thread may call with a `now` older than times the guard has
//! already recorded. The exact rule needs nothing for it (a slot is reused only once its
//! stamp is a span old for the reuser, who then sends after the interval; a release puts
//! back what the claim replaced). The sub-window counts decide such a claim at their
//! latest sub-window's start instead, and its stamp is never earlier: `stamp` returns the
//! time recorded.
//!
//! The guard never reads a clock: every time is the caller's, in clock nanoseconds.

mod ring;
mod subwindows;

use std::fmt;
use std::time::Duration;

use crossbeam_utils::CachePadded;

use super::sync::{AtomicU64, Ordering};
use crate::clock::nanos;
use ring::{Outcome, Ring, MAX_TIME};
use subwindows::{SubWindows, LOW, RING_UNIT, SUB_UNIT};

/// The most slots the exact ring keeps; larger limits use sub-window counts.
pub const EXACT_CAP: u32 = 4096;

/// The shortest wait returned while only pending claims stand in the way.
const MIN_PENDING_WAIT: u64 = 1_000_000;

/// The guard's safety margin over the provider's window: `max(fraction·W, floor)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Margin {
    pub fraction: f64,
    pub floor: Duration,
}

impl Margin {
    /// The margin for `window` (a negative or NaN fraction counts as zero).
    pub fn of(&self, window: Duration) -> Duration {
        let fraction = if self.fraction > 0.0 {
            self.fraction
        } else {
            0.0
        };
        let scaled = Duration::from_nanos((nanos(window) as f64 * fraction).round() as u64);
        scaled.max(self.floor)
    }
}

/// What a claim holds until it is stamped or released (exactly one of the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// The ring slot, or `NO_INDEX` for a claim recorded in the sub-window counts only.
    index: u32,
    /// The time the claim was decided at (its stamp is never earlier).
    at: u64,
    /// What the ring slot held before (a release puts it back).
    prev: u64,
}

const NO_INDEX: u32 = u32::MAX;

impl Slot {
    /// The time the claim was decided at: the caller's `now`, or later if the guard had
    /// already seen a later time (a stale clock read).
    pub fn claimed_at(&self) -> u64 {
        self.at
    }

    fn ring_index(&self) -> Option<usize> {
        (self.index != NO_INDEX).then_some(self.index as usize)
    }

    fn unit(&self) -> u64 {
        if self.index == NO_INDEX {
            SUB_UNIT
        } else {
            RING_UNIT
        }
    }
}

/// An admitted claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub slot: Slot,
    /// Sends (pending + stamped) in the span including this one: exact in exact mode,
    /// an upper bound in sub-window mode.
    pub count: u32,
    /// The number of the shared budget's lease its token came from (cluster mode; 0:
    /// the local bucket's).
    pub lease: u32,
}

/// Never more than `limit` sends in any rolling span; see the module doc.
pub struct WindowGuard {
    window: u64,
    span: u64,
    pending_wait: u64,
    exact_cap: u32,
    limit: AtomicU64,
    ring: Ring,
    subs: SubWindows,
    /// Latest stamp + 1 (0: none) of the sends not in the ring, which keeps its own.
    newest: CachePadded<AtomicU64>,
    /// CAS retries: lost versions, taken slots, contended sub-windows.
    contention: AtomicU64,
}

impl fmt::Debug for WindowGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WindowGuard")
            .field("window", &self.window)
            .field("span", &self.span)
            .field("limit", &self.limit())
            .field("exact_cap", &self.exact_cap)
            .field("ring_len", &self.ring.len())
            .field("ring_used", &self.ring.used())
            .field("pending", &(self.subs.pending_word() & LOW))
            .field("contention", &self.contention())
            .finish()
    }
}

impl WindowGuard {
    /// `max_limit`: the highest limit this guard will be given (the configured
    /// ceiling); sizes the exact ring: `min(EXACT_CAP, max_limit)` slots plus an eighth
    /// for forced sends.
    pub fn new(window: Duration, margin: Margin, limit: u32, max_limit: u32) -> Self {
        let margin = nanos(margin.of(window));
        let span = nanos(window).saturating_add(margin).clamp(1, MAX_TIME / 2);
        let exact_cap = EXACT_CAP.min(max_limit).max(1);
        let cap = exact_cap as usize;
        Self {
            window: nanos(window),
            span,
            pending_wait: (margin / 4).max(MIN_PENDING_WAIT),
            exact_cap,
            limit: AtomicU64::new(u64::from(limit.max(1))),
            ring: Ring::new(cap + cap / 8 + 1),
            subs: SubWindows::new(span),
            newest: CachePadded::new(AtomicU64::new(0)),
            contention: AtomicU64::new(0),
        }
    }

    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.window)
    }

    /// Window + margin, in nanoseconds: the length every check counts over.
    pub fn span_nanos(&self) -> u64 {
        self.span
    }

    pub fn limit(&self) -> u32 {
        // Relaxed: each claim reads the limit once and decides on that value.
        self.limit.load(Ordering::Relaxed) as u32
    }

    /// Any value (at least 1), also above `max_limit` (then counted by sub-windows).
    /// The history stays: after a decrease nothing is admitted until the span holds
    /// fewer than the new limit.
    pub fn set_limit(&self, limit: u32) {
        // Relaxed: see `limit`.
        self.limit.store(u64::from(limit.max(1)), Ordering::Relaxed);
    }

    fn wait(&self, now: u64, until: Option<u64>) -> Duration {
        Duration::from_nanos(match until {
            Some(t) => t.saturating_sub(now).max(1),
            None => self.pending_wait,
        })
    }

    /// When the sub-window counts stop refusing: in exact mode, also when the exact
    /// check stops consulting them (then the ring decides).
    fn sub_until(&self, unit: u64, word: u64, until: Option<u64>) -> Option<u64> {
        match (until, self.subs.consult_end(word)) {
            (Some(u), Some(end)) if unit == RING_UNIT => Some(u.min(end)),
            (None, Some(end)) if unit == RING_UNIT => Some(end),
            _ => until,
        }
    }

    /// Claims a send at `now`, or says how long until one could succeed if nothing else
    /// changes (at least 1 ns; a quarter of the margin, at least 1 ms, when only pending
    /// claims stand in the way).
    #[inline]
    pub fn try_claim(&self, now: u64) -> Result<Claim, Duration> {
        let limit = self.limit();
        let unit = if limit <= self.exact_cap {
            RING_UNIT
        } else {
            SUB_UNIT
        };
        let word = self.subs.enter(unit);
        let (mut at, mut count) = (now, 0);
        if unit == SUB_UNIT || self.subs.consult(word, now) {
            match self.subs.check(word, now, u64::from(limit)) {
                Ok((c, a)) => (count, at) = (c, a),
                Err(until) => {
                    self.subs.leave(unit);
                    return Err(self.wait(now, self.sub_until(unit, word, until)));
                }
            }
        }
        let slot = if unit == SUB_UNIT {
            Slot {
                index: NO_INDEX,
                at,
                prev: 0,
            }
        } else {
            match self
                .ring
                .claim(at, self.span, Some(limit), &self.contention)
            {
                Outcome::Won {
                    index,
                    prev,
                    count: c,
                } => {
                    count = count.max(u64::from(c));
                    Slot {
                        index: index as u32,
                        at,
                        prev,
                    }
                }
                Outcome::Refused { until } => {
                    self.subs.leave(unit);
                    return Err(self.wait(now, until));
                }
                // Unreachable: fewer than `limit <= exact_cap` counted leaves a slot.
                Outcome::Full => {
                    self.subs.leave(unit);
                    return Err(self.wait(now, None));
                }
            }
        };
        Ok(Claim {
            slot,
            count: u32::try_from(count).unwrap_or(u32::MAX),
            lease: 0,
        })
    }

    /// A send that goes out whatever the window says (unmetered passthrough to the same
    /// upstream): recorded so later claims count it.
    pub fn force_claim(&self, now: u64) -> Slot {
        if self.limit() <= self.exact_cap {
            self.subs.enter(RING_UNIT);
            if let Outcome::Won { index, prev, .. } =
                self.ring.claim(now, self.span, None, &self.contention)
            {
                return Slot {
                    index: index as u32,
                    at: now,
                    prev,
                };
            }
            // The ring is full: count it in the sub-window counts only.
            self.subs.enter(SUB_UNIT - RING_UNIT);
        } else {
            self.subs.enter(SUB_UNIT);
        }
        Slot {
            index: NO_INDEX,
            at: now,
            prev: 0,
        }
    }

    /// Zero when `try_claim(now)` would succeed now, else its wait.
    pub fn wait_time(&self, now: u64) -> Duration {
        let limit = self.limit();
        let exact = limit <= self.exact_cap;
        let unit = if exact { RING_UNIT } else { SUB_UNIT };
        let word = self.subs.pending_word() + unit;
        if !exact || self.subs.consult(word, now) {
            if let Err(until) = self.subs.check(word, now, u64::from(limit)) {
                return self.wait(now, self.sub_until(unit, word, until));
            }
        }
        if exact {
            let scan = self.ring.count(now, self.span);
            if scan.count >= limit {
                let until = self
                    .ring
                    .until(&scan, scan.count - limit + 1, now, self.span);
                return self.wait(now, until);
            }
        }
        Duration::ZERO
    }

    /// Records the real send time of a claim (the claim's time if `sent_at` is earlier);
    /// returns the time recorded, which later claims count until it leaves the span.
    pub fn stamp(&self, slot: Slot, sent_at: u64) -> u64 {
        let time = self
            .subs
            .record(sent_at.max(slot.at).min(MAX_TIME), &self.contention);
        if let Some(index) = slot.ring_index() {
            self.ring.stamp(index, time);
        } else {
            self.subs.extend_consult(time);
            // Relaxed: read alone, by `newest`.
            self.newest.fetch_max(time + 1, Ordering::Relaxed);
        }
        self.subs.leave_stamped(slot.unit());
        time
    }

    /// A claim that was never sent: frees it at once.
    pub fn release(&self, slot: Slot) {
        if let Some(index) = slot.ring_index() {
            self.ring.restore(index, slot.prev);
        }
        self.subs.leave(slot.unit());
    }

    /// Stamped sends with time in `(now - span, now]` (pending not counted). Exact in
    /// exact mode for spans up to [`span_nanos`](Self::span_nanos); otherwise an upper
    /// bound from the sub-window counts (whole sub-windows).
    pub fn sent_in(&self, now: u64, span: u64) -> u32 {
        let word = self.subs.pending_word();
        if self.limit() <= self.exact_cap && !self.subs.consult(word, now) {
            self.ring.stamped_in(now, span)
        } else {
            u32::try_from(self.subs.sum(now, span).stamped).unwrap_or(u32::MAX)
        }
    }

    /// Pending + stamped in the span at `now`: what `try_claim` compares with the limit
    /// (stamps after `now` included).
    pub fn in_span(&self, now: u64) -> u32 {
        let word = self.subs.pending_word();
        let exact = self.limit() <= self.exact_cap;
        let ring = if exact {
            u64::from(self.ring.count(now, self.span).count)
        } else {
            0
        };
        let subs = if !exact || self.subs.consult(word, now) {
            (word & LOW) + self.subs.sum(now, self.span).stamped
        } else {
            0
        };
        u32::try_from(ring.max(subs)).unwrap_or(u32::MAX)
    }

    /// The latest stamped send time, if any.
    pub fn newest(&self) -> Option<u64> {
        // Relaxed: see `stamp`.
        let outside = self.newest.load(Ordering::Relaxed).checked_sub(1);
        self.ring.newest().max(outside)
    }

    /// CAS retries so far (lost versions, taken slots, contended sub-windows): evidence
    /// for stress tests that the protocol was raced.
    #[doc(hidden)]
    pub fn contention(&self) -> u64 {
        // Relaxed: a statistic.
        self.contention.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
