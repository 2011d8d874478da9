//! One parked request: its state, settled once by one CAS (granted or refused by the
//! dispatcher, or cancelled by its ticket, whichever comes first), and the answer the
//! dispatcher carries to it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use atomic_waker::AtomicWaker;

use crate::limiter::guard::Claim;
use crate::limiter::token_budget::{Cost, Reserved};
use crate::priority::Priority;

pub(super) const WAITING: u8 = 0;
pub(super) const GRANTED: u8 = 1;
pub(super) const CANCELLED: u8 = 2;
pub(super) const REFUSED: u8 = 3;

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
    /// The dispatcher's answer: set once, before the state turns GRANTED or REFUSED,
    /// read by the waiter after it sees either.
    pub(super) answer: OnceLock<Result<Grant, TooLarge>>,
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

/// The refusal of a parked request whose token cost no longer fits the whole budget of a
/// window (the limit fell below it while it waited): waiting cannot cure it, as for a
/// request refused at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The token limit per window when it was refused.
    pub limit: u64,
    /// Its token cost.
    pub estimate: u64,
}

impl Waiter {
    pub(super) fn new(priority: Priority, cost: Option<Cost>, parked_at: u64) -> Self {
        Self {
            state: AtomicU8::new(WAITING),
            waker: AtomicWaker::new(),
            priority,
            cost,
            parked_at,
            answer: OnceLock::new(),
        }
    }

    /// WAITING → `to`, once. AcqRel: the winner's view of the queue counters is
    /// ordered with the loser's.
    pub(super) fn settle(&self, to: u8) -> bool {
        self.state
            .compare_exchange(WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The dispatcher's answer, once the state says it was given.
    pub(super) fn answer(&self) -> Option<Result<Grant, TooLarge>> {
        // Acquire: pairs with the settling CAS, so the answer set before it is seen.
        match self.state.load(Ordering::Acquire) {
            GRANTED | REFUSED => self.answer.get().copied(),
            _ => None,
        }
    }

    pub(super) fn is_waiting(&self) -> bool {
        // Acquire: as `answer`; a stale WAITING only makes the dispatcher's CAS fail.
        self.state.load(Ordering::Acquire) == WAITING
    }
}
