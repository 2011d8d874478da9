//! One parked request: its state, settled once by one CAS (granted by the dispatcher or
//! cancelled by its ticket, whichever comes first), and what a grant carries to it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use atomic_waker::AtomicWaker;

use crate::limiter::guard::Claim;
use crate::limiter::token_budget::{Cost, Reserved};
use crate::priority::Priority;

pub(super) const WAITING: u8 = 0;
pub(super) const GRANTED: u8 = 1;
pub(super) const CANCELLED: u8 = 2;

/// One parked request.
#[derive(Debug)]
pub struct Waiter {
    state: AtomicU8,
    pub(super) waker: AtomicWaker,
    pub(super) priority: Priority,
    /// Its token cost (`None`: none counted).
    pub(super) cost: Option<Cost>,
    /// When it was parked (clock nanoseconds).
    pub(super) parked_at: u64,
    /// What the grant carries: set once, before the state turns GRANTED, read by the
    /// waiter after it sees GRANTED.
    pub(super) grant: OnceLock<Grant>,
}

/// What a grant carries: the window-guard claim, and the tokens reserved for the
/// request's cost when it has one and the limiter a token budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub claim: Claim,
    pub tokens: Option<Reserved>,
}

impl From<Claim> for Grant {
    fn from(claim: Claim) -> Self {
        Self {
            claim,
            tokens: None,
        }
    }
}

impl Waiter {
    pub(super) fn new(priority: Priority, cost: Option<Cost>, parked_at: u64) -> Self {
        Self {
            state: AtomicU8::new(WAITING),
            waker: AtomicWaker::new(),
            priority,
            cost,
            parked_at,
            grant: OnceLock::new(),
        }
    }

    /// WAITING → `to`, once. AcqRel: the winner's view of the queue counters is
    /// ordered with the loser's.
    pub(super) fn settle(&self, to: u8) -> bool {
        self.state
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub(super) fn is_granted(&self) -> bool {
        self.state.load(Ordering::Acquire) == GRANTED
    }

    pub(super) fn is_waiting(&self) -> bool {
        // Acquire: as `is_granted`; a stale WAITING only makes the grant's CAS fail.
        self.state.load(Ordering::Acquire) == WAITING
    }
}
