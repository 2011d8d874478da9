//! Per-priority lock-free wait queues with an atomically reserved total bound.
//!
//! Each priority has two crossbeam `SegQueue`s: `front` (requests put back after the
//! provider answered 429: they go to the head of their priority) and `back` (new
//! arrivals). Strict priority between levels, FIFO within one. The total number of
//! live waiters is reserved with a CAS against `max` *before* pushing, so the bound is
//! never overshot under concurrency; a shrunk `max` refuses new arrivals until the
//! depth falls under it, and never drops anyone already queued.
//!
//! A waiter is live until it is granted, refused or cancelled; each is one CAS on its
//! state, so exactly one of them wins, the depth counters move exactly once and its
//! ticket resolves to exactly one answer. A cancelled waiter (client gone, deadline
//! passed) stays in the `SegQueue` as a tombstone and is skipped by
//! [`WaitQueues::grant_next`] without consuming a token. A refusal ([`TooLarge`]) is
//! for a waiter whose token cost the limit fell below while it waited (see
//! [`Stage::refuse_larger_than`]).
//!
//! The dispatcher is the only consumer. It stages popped waiters in lanes of its own
//! ([`Stage`], behind a mutex no producer takes) so that it can look past the head of a
//! priority: a parked request carries its token cost, and a smaller one may be granted
//! before a head whose cost does not fit yet (the limiter decides which; see
//! `provider/admit.rs`). Within a priority the order stays: put back, then new.
//!
//! The queue keeps its own totals per priority, moved by the same winner: enqueued,
//! dequeued (granted) and dropped (cancelled or refused, by [`DropReason`]). So for each priority
//! `enqueued = dequeued + dropped + depth` whenever no waiter is settling at that
//! moment (a read racing a settlement may see one request in neither place).
//!
//! Layout: `waiter.rs` is one waiter and its settlement, `lane.rs` the lanes and the
//! counts a settlement moves, `stage.rs` the dispatcher's staging; this file the bound,
//! parking, the ticket and the view of the totals.

mod lane;
mod stage;
mod waiter;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crossbeam_queue::SegQueue;

use super::sync::{AtomicUsize, Ordering};
use super::token_budget::Cost;
use crate::priority::Priority;
pub use lane::DropReason;
use lane::Lanes;
use stage::Staging;
pub use stage::{Parked, Stage};
use waiter::CANCELLED;
pub use waiter::{Grant, TooLarge, Waiter};

/// The queue is at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Live waiters at or above the refused request's priority.
    pub ahead: usize,
    /// Their token cost.
    pub tokens: u64,
}

/// A provider's wait queues.
#[derive(Debug)]
pub struct WaitQueues {
    lanes: Lanes,
    max: AtomicUsize,
    /// Grants whose ticket was dropped before it saw them: claims and tokens to give back.
    unused_grants: SegQueue<Grant>,
    /// The dispatcher's staged waiters (only the consumer locks them).
    staging: Staging,
}

/// One priority's totals since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    /// Parked (a request put back after a 429 counts again).
    pub enqueued: u64,
    /// Taken out with a grant, to be sent.
    pub dequeued: u64,
    /// Taken out without one, by `DropReason as usize`.
    pub dropped: [u64; DropReason::ALL.len()],
}

impl Flow {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

/// Counters of the queues, copied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub depth: [usize; 3],
    pub total: usize,
    pub max: usize,
    /// Per priority (`Priority as usize`).
    pub flow: [Flow; 3],
    /// `flow` summed over priorities: parked, granted, and left without a grant.
    pub enqueued: u64,
    pub dequeued: u64,
    pub abandoned: u64,
}

impl QueueCounts {
    /// Left without a grant for `why`, all priorities.
    pub fn dropped(&self, why: DropReason) -> u64 {
        self.flow.iter().map(|f| f.dropped[why as usize]).sum()
    }
}

impl WaitQueues {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            lanes: Lanes::default(),
            max: AtomicUsize::new(max),
            unused_grants: SegQueue::new(),
            staging: Staging::new(),
        })
    }

    /// Live waiters of all priorities.
    pub fn len(&self) -> usize {
        // Acquire: pairs with the Release decrements so a zero means the waiters'
        // settlement is visible.
        self.lanes.total.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn depth(&self, p: Priority) -> usize {
        self.lanes.lane(p).depth.load(Ordering::Relaxed)
    }

    /// Live waiters at priority `p` or higher: those a new `p` request would wait behind.
    pub fn ahead_of(&self, p: Priority) -> usize {
        self.lanes.by_priority[..=p as usize]
            .iter()
            .map(|l| l.depth.load(Ordering::Relaxed))
            .sum()
    }

    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    pub fn counts(&self) -> QueueCounts {
        // Relaxed throughout: statistics, ordered with nothing.
        let flow = self.lanes.by_priority.each_ref().map(|l| Flow {
            enqueued: l.enqueued.load(Ordering::Relaxed),
            dequeued: l.dequeued.load(Ordering::Relaxed),
            dropped: l.dropped.each_ref().map(|d| d.load(Ordering::Relaxed)),
        });
        QueueCounts {
            depth: Priority::ALL.map(|p| self.depth(p)),
            total: self.len(),
            max: self.max(),
            flow,
            enqueued: flow.iter().map(|f| f.enqueued).sum(),
            dequeued: flow.iter().map(|f| f.dequeued).sum(),
            abandoned: flow.iter().map(Flow::dropped_total).sum(),
        }
    }

    /// Reserves one slot under the bound: one CAS loop, never past `max`.
    fn reserve(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        let total = &self.lanes.total;
        let mut cur = total.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return false;
            }
            // Relaxed: the count orders nothing else; the waiter itself is published by
            // the SegQueue push that follows.
            match total.compare_exchange_weak(cur, cur + 1, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The token cost of the live waiters.
    pub fn waiting_cost(&self) -> u64 {
        self.cost_ahead_of(Priority::Low)
    }

    /// The token cost of the live waiters at priority `p` or higher (see
    /// [`Self::ahead_of`]).
    pub fn cost_ahead_of(&self, p: Priority) -> u64 {
        self.lanes.by_priority[..=p as usize]
            .iter()
            // Relaxed: an estimate, ordered with nothing.
            .map(|l| l.cost.load(Ordering::Relaxed))
            .sum()
    }

    /// Parks a request with no token cost. `front` puts it at the head of its priority
    /// (a retry).
    pub fn enqueue(self: &Arc<Self>, p: Priority, front: bool) -> Result<Ticket, QueueFull> {
        self.park(p, front, None, 0)
    }

    /// Parks a request of token cost `cost` at `now`. `front` puts it at the head of its
    /// priority (a retry).
    pub fn park(
        self: &Arc<Self>,
        p: Priority,
        front: bool,
        cost: Option<Cost>,
        now: u64,
    ) -> Result<Ticket, QueueFull> {
        if !self.reserve() {
            return Err(QueueFull {
                ahead: self.ahead_of(p),
                tokens: self.cost_ahead_of(p),
            });
        }
        let waiter = Arc::new(Waiter::new(p, cost, now));
        let lane = self.lanes.lane(p);
        if let Some(c) = cost {
            // Relaxed: an estimate's input, ordered with nothing.
            lane.cost.fetch_add(c.total(), Ordering::Relaxed);
        }
        lane.depth.fetch_add(1, Ordering::Relaxed);
        lane.enqueued.fetch_add(1, Ordering::Relaxed);
        if front {
            lane.front.push(Arc::clone(&waiter));
        } else {
            lane.back.push(Arc::clone(&waiter));
        }
        Ok(Ticket {
            queues: Arc::clone(self),
            waiter,
            done: false,
        })
    }

    /// The next grant nobody used (the dispatcher gives its claim and tokens back).
    pub fn take_unused_grant(&self) -> Option<Grant> {
        self.unused_grants.pop()
    }

    /// The dispatcher's view of the waiters, to choose whom to grant. Only the
    /// dispatcher calls it (the lock is never contended; producers never take it).
    pub fn stage(&self) -> Stage<'_> {
        self.staging.lock(&self.lanes)
    }

    /// Grants `grant` to the highest-priority live waiter (put back before new within
    /// a priority) and wakes it. Tombstones of cancelled waiters are dropped on the way.
    /// Gives the grant back when nobody is waiting, so the caller can release it.
    pub fn grant_next(&self, grant: impl Into<Grant>) -> Result<(), Grant> {
        let mut grant = grant.into();
        let mut stage = self.stage();
        while let Some(p) = stage.top(1) {
            match stage.grant(p, 0, grant) {
                Ok(()) => return Ok(()),
                Err(g) => grant = g,
            }
        }
        Err(grant)
    }
}

/// A queued request's claim: a future that resolves when the request is granted (or
/// refused: [`TooLarge`]). Dropping it before then cancels the wait and frees its slot
/// at once.
#[derive(Debug)]
pub struct Ticket {
    queues: Arc<WaitQueues>,
    waiter: Arc<Waiter>,
    done: bool,
}

impl Ticket {
    /// Cancels the wait, counted as dropped for `why`; `false` if the dispatcher's
    /// answer came first ([`Ticket::answer`]: after a grant the caller owns a token, and
    /// the request counts as dequeued).
    pub fn cancel(&mut self, why: DropReason) -> bool {
        if self.done {
            return false;
        }
        self.done = true;
        if self.waiter.settle(CANCELLED) {
            let p = self.waiter.priority;
            self.queues.lanes.release(&self.waiter);
            self.queues.lanes.lane(p).dropped[why as usize].fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// Gives up the wait for `why`. A grant that came first is not lost: its claim and
    /// token go back to the dispatcher (the request counts as dequeued).
    pub fn abandon(mut self, why: DropReason) {
        self.leave(why);
    }

    fn leave(&mut self, why: DropReason) {
        if !self.done && !self.cancel(why) {
            if let Some(Ok(g)) = self.waiter.answer() {
                self.queues.unused_grants.push(g);
            }
        }
    }

    pub fn priority(&self) -> Priority {
        self.waiter.priority
    }

    /// The dispatcher's answer, once given (after a `cancel` that lost to it).
    pub fn answer(&self) -> Option<Result<Grant, TooLarge>> {
        self.waiter.answer()
    }

    /// The grant, once granted (after a `cancel` that lost to it).
    pub fn grant(&self) -> Option<Grant> {
        self.answer().and_then(Result::ok)
    }
}

impl Ticket {
    /// The answer of an answered waiter, taken: the ticket is done.
    fn answered(&mut self) -> Option<Result<Grant, TooLarge>> {
        let answer = self.waiter.answer()?;
        self.done = true;
        Some(answer)
    }
}

impl Future for Ticket {
    /// The window-guard claim (and reserved tokens) that came with the grant, or the
    /// refusal of a request the token limit fell below.
    type Output = Result<Grant, TooLarge>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(a) = self.answered() {
            return Poll::Ready(a);
        }
        self.waiter.waker.register(cx.waker());
        // Re-check after registering: an answer between the check and the registration
        // would otherwise be missed.
        match self.answered() {
            Some(a) => Poll::Ready(a),
            None => Poll::Pending,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Dropped while waiting: the client is gone (every other way out settles first,
        // naming its reason).
        self.leave(DropReason::ClientGone);
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, not(sidecar_loom)))]
pub(crate) mod testing;
