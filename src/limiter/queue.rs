//! Per-priority lock-free wait queues with an atomically reserved total bound.
//!
//! Each priority has two crossbeam `SegQueue`s: `front` (requests put back after the
//! provider answered 429: they go to the head of their priority) and `back` (new
//! arrivals). Strict priority between levels, FIFO within one. The total number of
//! live waiters is reserved with a CAS against `max` *before* pushing, so the bound is
//! never overshot under concurrency; a shrunk `max` refuses new arrivals until the
//! depth falls under it, and never drops anyone already queued.
//!
//! A waiter is live until it is granted or cancelled; both are one CAS on its state,
//! so exactly one of them wins and the depth counters move exactly once. A cancelled
//! waiter (client gone, deadline passed) stays in the `SegQueue` as a tombstone and is
//! skipped by [`WaitQueues::grant_next`] without consuming a token.
//!
//! The queue keeps its own totals per priority, moved by the same winner: enqueued,
//! dequeued (granted) and dropped (cancelled, by [`DropReason`]). So for each priority
//! `enqueued = dequeued + dropped + depth` whenever no waiter is settling at that
//! moment (a read racing a settlement may see one request in neither place).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU8;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;

use super::guard::Claim;
use super::sync::{AtomicU64, AtomicUsize, Ordering};
use crate::priority::Priority;

const WAITING: u8 = 0;
const GRANTED: u8 = 1;
const CANCELLED: u8 = 2;

/// One parked request.
#[derive(Debug)]
pub struct Waiter {
    state: AtomicU8,
    waker: AtomicWaker,
    priority: Priority,
    /// The window-guard claim the grant carries: set once, before the state turns
    /// GRANTED, read by the waiter after it sees GRANTED.
    grant: OnceLock<Claim>,
}

impl Waiter {
    /// WAITING → `to`, once. AcqRel: the winner's view of the queue counters is
    /// ordered with the loser's.
    fn settle(&self, to: u8) -> bool {
        self.state
            .compare_exchange(
                WAITING,
                to,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_ok()
    }

    fn is_granted(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Acquire) == GRANTED
    }
}

#[derive(Debug, Default)]
struct Lane {
    front: SegQueue<Arc<Waiter>>,
    back: SegQueue<Arc<Waiter>>,
    depth: AtomicUsize,
    /// Totals since start: parked, granted, cancelled (`DropReason as usize`).
    enqueued: AtomicU64,
    dequeued: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

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
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        Self::ClientGone,
        Self::LowPriorityDeadline,
        Self::Timeout,
        Self::BeyondDeadline,
        Self::Shutdown,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientGone => "client_gone",
            Self::LowPriorityDeadline => "low_priority_deadline",
            Self::Timeout => "timeout",
            Self::BeyondDeadline => "beyond_deadline",
            Self::Shutdown => "shutdown",
        }
    }
}

/// The queue is at its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull {
    /// Live waiters at or above the refused request's priority.
    pub ahead: usize,
}

/// A provider's wait queues.
#[derive(Debug)]
pub struct WaitQueues {
    lanes: [Lane; 3],
    total: AtomicUsize,
    max: AtomicUsize,
    /// Grants whose ticket was dropped before it saw them: claims and tokens to give back.
    unused_grants: SegQueue<Claim>,
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
            lanes: Default::default(),
            total: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
            unused_grants: SegQueue::new(),
        })
    }

    /// Live waiters of all priorities.
    pub fn len(&self) -> usize {
        // Acquire: pairs with the Release decrements so a zero means the waiters'
        // settlement is visible.
        self.total.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn depth(&self, p: Priority) -> usize {
        self.lanes[p as usize].depth.load(Ordering::Relaxed)
    }

    /// Live waiters at priority `p` or higher: those a new `p` request would wait behind.
    pub fn ahead_of(&self, p: Priority) -> usize {
        self.lanes[..=p as usize]
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
        let flow = self.lanes.each_ref().map(|l| Flow {
            enqueued: l.enqueued.load(Ordering::Relaxed),
            dequeued: l.dequeued.load(Ordering::Relaxed),
            dropped: l.dropped.each_ref().map(|d| d.load(Ordering::Relaxed)),
        });
        QueueCounts {
            depth: [0, 1, 2].map(|i| self.lanes[i].depth.load(Ordering::Relaxed)),
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
        let mut cur = self.total.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return false;
            }
            // Relaxed: the count orders nothing else; the waiter itself is published by
            // the SegQueue push that follows.
            match self.total.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Releases a slot of a waiter that settled (granted or cancelled).
    fn release(&self, p: Priority) {
        self.lanes[p as usize].depth.fetch_sub(1, Ordering::Relaxed);
        // Release: pairs with `len`'s Acquire.
        self.total.fetch_sub(1, Ordering::Release);
    }

    /// Parks a request. `front` puts it at the head of its priority (a retry).
    pub fn enqueue(self: &Arc<Self>, p: Priority, front: bool) -> Result<Ticket, QueueFull> {
        if !self.reserve() {
            return Err(QueueFull {
                ahead: self.ahead_of(p),
            });
        }
        let waiter = Arc::new(Waiter {
            state: AtomicU8::new(WAITING),
            waker: AtomicWaker::new(),
            priority: p,
            grant: OnceLock::new(),
        });
        let lane = &self.lanes[p as usize];
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

    /// The next grant nobody used (the dispatcher gives its claim and token back).
    pub fn take_unused_grant(&self) -> Option<Claim> {
        self.unused_grants.pop()
    }

    /// Grants `claim` to the highest-priority live waiter (front before back within a
    /// priority) and wakes it. Tombstones of cancelled waiters are dropped on the way.
    /// Gives the claim back when nobody is waiting, so the caller can release it.
    pub fn grant_next(&self, claim: Claim) -> Result<(), Claim> {
        for lane in &self.lanes {
            for q in [&lane.front, &lane.back] {
                while let Some(w) = q.pop() {
                    // Set before the CAS: a waiter that sees GRANTED finds it. A waiter
                    // that cancelled first leaves it unread; the waiter is dropped.
                    let _ = w.grant.set(claim);
                    if w.settle(GRANTED) {
                        self.release(w.priority);
                        lane.dequeued.fetch_add(1, Ordering::Relaxed);
                        w.waker.wake();
                        return Ok(());
                    }
                }
            }
        }
        Err(claim)
    }
}

/// A queued request's claim: a future that resolves when the request is granted.
/// Dropping it before then cancels the wait and frees its slot at once.
#[derive(Debug)]
pub struct Ticket {
    queues: Arc<WaitQueues>,
    waiter: Arc<Waiter>,
    done: bool,
}

impl Ticket {
    /// Cancels the wait, counted as dropped for `why`; `false` if the grant came first
    /// (the caller then owns a token, and the request counts as dequeued).
    pub fn cancel(&mut self, why: DropReason) -> bool {
        if self.done {
            return false;
        }
        self.done = true;
        if self.waiter.settle(CANCELLED) {
            let p = self.waiter.priority;
            self.queues.release(p);
            self.queues.lanes[p as usize].dropped[why as usize].fetch_add(1, Ordering::Relaxed);
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
            if let Some(c) = self.waiter.grant.get() {
                self.queues.unused_grants.push(*c);
            }
        }
    }

    pub fn priority(&self) -> Priority {
        self.waiter.priority
    }

    /// The claim of the grant, once granted (after a `cancel` that lost to it).
    pub fn grant(&self) -> Option<Claim> {
        self.waiter
            .is_granted()
            .then(|| self.waiter.grant.get().copied())
            .flatten()
    }
}

impl Ticket {
    /// The claim of a granted waiter.
    fn granted(&mut self) -> Option<Claim> {
        if !self.waiter.is_granted() {
            return None;
        }
        self.done = true;
        self.waiter.grant.get().copied()
    }
}

impl Future for Ticket {
    /// The window-guard claim that came with the grant.
    type Output = Claim;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Claim> {
        if let Some(c) = self.granted() {
            return Poll::Ready(c);
        }
        self.waiter.waker.register(cx.waker());
        // Re-check after registering: a grant between the check and the registration
        // would otherwise be missed.
        match self.granted() {
            Some(c) => Poll::Ready(c),
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
