//! This replica's token leases as the task keeps them: the leases still in the span by
//! their number in the pot, the changes and late sends not reported yet, the pot's
//! shortfall and the cluster's token limit. Plain state; `tokens.rs` drives it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The longest a settled request's change waits for a call to carry it.
pub(crate) const ADJUST_EVERY: Duration = Duration::from_millis(20);

/// This replica's token leases.
#[derive(Debug)]
pub(crate) struct TokenLeases {
    /// Leases granted within the last span, by their number in the pot: where a
    /// reservation's later change is reported.
    pub(super) recent: VecDeque<(u32, String, Instant)>,
    pub(super) next: u32,
    /// Changes not reported yet, by lease number.
    pub(super) pending: HashMap<u32, i64>,
    /// Late sends not reported yet: Redis milliseconds to count them from, and tokens.
    pub(super) late: Vec<(u64, u64)>,
    pub(super) pending_since: Option<Instant>,
    /// The largest cost the pot was short for, until a lease covers it.
    pub(super) short: u64,
    pub(super) retry_at: Instant,
    /// Tokens taken per second (sampled like the requests' rate).
    pub(super) rate: f64,
    pub(super) last: (u64, Instant),
    /// The cluster's token limit and this replica's share, per window (0: unknown).
    pub(super) limit: u64,
    pub(super) share: u64,
    /// The cap last given to the limiter.
    pub(super) cap: Option<Option<u64>>,
}

impl TokenLeases {
    pub(super) fn new(now: Instant) -> Self {
        Self {
            recent: VecDeque::new(),
            next: 0,
            pending: HashMap::new(),
            late: Vec::new(),
            pending_since: None,
            short: 0,
            retry_at: now,
            rate: 0.0,
            last: (0, now),
            limit: 0,
            share: 0,
            cap: None,
        }
    }

    pub(super) fn member_of(&self, lease: u32) -> Option<&str> {
        self.recent
            .iter()
            .rev()
            .find(|(n, ..)| *n == lease)
            .map(|(_, m, _)| m.as_str())
    }

    pub(super) fn number(&mut self) -> u32 {
        self.next = if self.next >= crate::limiter::token_lease::MAX_LEASE {
            1
        } else {
            self.next + 1
        };
        self.next
    }

    /// Whether a change has waited long enough for a call of its own.
    pub(super) fn adjust_due(&self) -> Option<Duration> {
        self.pending_since
            .map(|t| ADJUST_EVERY.saturating_sub(t.elapsed()))
    }
}
