//! Where waiters wait: each priority's two lock-free queues with its totals, and the
//! live counts across priorities. Producers push, the dispatcher's stage pops, and
//! whoever settles a waiter (a grant or its ticket) releases its place, once.

use std::sync::Arc;

use crossbeam_queue::SegQueue;

use super::waiter::Waiter;
use crate::limiter::sync::{AtomicU64, AtomicUsize, Ordering};
use crate::priority::Priority;

/// Why a waiter left the queue without a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The client went away (its ticket was dropped while it waited).
    ClientGone,
    /// A low-priority request's `low_priority_timeout` passed.
    LowPriorityDeadline,
    /// The request timeout passed.
    Timeout,
    /// Taken out right after parking: the queue ahead of it could not be served before
    /// its deadline at the rate paced now (refused at once, or sent to passthrough).
    BeyondDeadline,
    /// The shutdown grace period ended.
    Shutdown,
    /// The token limit fell below its cost while it waited: refused (413), as it would
    /// be at admission.
    TokensTooLarge,
}

impl DropReason {
    pub const ALL: [DropReason; 6] = [
        Self::ClientGone,
        Self::LowPriorityDeadline,
        Self::Timeout,
        Self::BeyondDeadline,
        Self::Shutdown,
        Self::TokensTooLarge,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientGone => "client_gone",
            Self::LowPriorityDeadline => "low_priority_deadline",
            Self::Timeout => "timeout",
            Self::BeyondDeadline => "beyond_deadline",
            Self::Shutdown => "shutdown",
            Self::TokensTooLarge => "tokens_too_large",
        }
    }
}

/// One priority's waiters: `front` for those put back after a 429, `back` for new ones.
#[derive(Debug, Default)]
pub(super) struct Lane {
    pub(super) front: SegQueue<Arc<Waiter>>,
    pub(super) back: SegQueue<Arc<Waiter>>,
    pub(super) depth: AtomicUsize,
    /// The token cost of its live waiters.
    pub(super) cost: AtomicU64,
    /// Totals since start: parked, granted, left without a grant (`DropReason as usize`).
    pub(super) enqueued: AtomicU64,
    pub(super) dequeued: AtomicU64,
    pub(super) dropped: [AtomicU64; DropReason::ALL.len()],
}

/// Every priority's lane, and the live waiters across them.
#[derive(Debug, Default)]
pub(super) struct Lanes {
    /// By `Priority as usize`.
    pub(super) by_priority: [Lane; 3],
    /// Live waiters of all priorities.
    pub(super) total: AtomicUsize,
}

impl Lanes {
    pub(super) fn lane(&self, p: Priority) -> &Lane {
        &self.by_priority[p as usize]
    }

    /// Releases a slot of a waiter that settled (granted, refused or cancelled).
    pub(super) fn release(&self, w: &Waiter) {
        let lane = self.lane(w.priority);
        if let Some(c) = w.cost {
            // Relaxed: an estimate's input, ordered with nothing.
            lane.cost.fetch_sub(c.total(), Ordering::Relaxed);
        }
        lane.depth.fetch_sub(1, Ordering::Relaxed);
        // Release: pairs with `WaitQueues::len`'s Acquire.
        self.total.fetch_sub(1, Ordering::Release);
    }
}
