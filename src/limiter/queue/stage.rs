//! The dispatcher's staging: waiters it popped and has not settled yet, per priority,
//! in grant order (those put back, then new ones), so that it can look past the head of
//! a priority. Only the dispatcher locks them; producers never do, so the lock is never
//! contended and the request path stays lock-free.
//!
//! **Refusals.** A waiter whose token cost is larger than the whole token budget of a
//! window can never be granted; admission refuses those, but the limit may fall while
//! one waits. The stage keeps the limit its waiters were checked against: when it
//! falls, every live waiter is taken out of the lanes and checked at once, and those
//! staged later are checked as they are staged. A waiter refused is settled like a
//! grant, by the same CAS and with the answer set before it: exactly one answer.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use super::lane::{DropReason, Lanes};
use super::waiter::{Grant, TooLarge, Waiter, GRANTED, REFUSED};
use crate::limiter::sync::{Mutex, Ordering};
use crate::limiter::token_budget::Cost;
use crate::priority::Priority;

/// What the dispatcher sees of a staged waiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parked {
    pub cost: Option<Cost>,
    pub parked_at: u64,
}

/// The staged waiters of every priority, behind the dispatcher's own lock.
#[derive(Debug)]
pub(super) struct Staging(Mutex<Held>);

impl Staging {
    pub(super) fn new() -> Self {
        Self(Mutex::new(Held {
            by_priority: Default::default(),
            fit: u64::MAX,
        }))
    }

    /// The dispatcher's view of `lanes` (see [`Stage`]).
    pub(super) fn lock<'q>(&'q self, lanes: &'q Lanes) -> Stage<'q> {
        Stage {
            lanes,
            staged: self.0.lock(),
        }
    }
}

/// What the dispatcher holds.
#[derive(Debug)]
struct Held {
    /// By `Priority as usize`.
    by_priority: [Staged; 3],
    /// The token limit the staged waiters' costs were checked against (none is larger).
    fit: u64,
}

/// One priority's waiters popped by the dispatcher and not yet settled, in grant order:
/// those put back, then new ones, then `later`.
#[derive(Debug, Default)]
struct Staged {
    front: VecDeque<Arc<Waiter>>,
    back: VecDeque<Arc<Waiter>>,
    /// New ones taken out of the lane to be checked, beyond the dispatcher's look: staged
    /// before any still in the lane.
    later: VecDeque<Arc<Waiter>>,
}

impl Staged {
    fn len(&self) -> usize {
        self.front.len() + self.back.len()
    }

    fn get(&self, pos: usize) -> Option<&Arc<Waiter>> {
        self.front
            .get(pos)
            .or_else(|| self.back.get(pos.checked_sub(self.front.len())?))
    }

    fn remove(&mut self, pos: usize) -> Option<Arc<Waiter>> {
        if pos < self.front.len() {
            self.front.remove(pos)
        } else {
            self.back.remove(pos - self.front.len())
        }
    }
}

/// The dispatcher's staged waiters, locked while it decides.
pub struct Stage<'q> {
    lanes: &'q Lanes,
    #[cfg(not(sidecar_loom))]
    staged: parking_lot::MutexGuard<'q, Held>,
    #[cfg(sidecar_loom)]
    staged: loom::sync::MutexGuard<'q, Held>,
}

impl Stage<'_> {
    /// The highest priority with a live waiter, its lane staged with up to `look` live
    /// waiters in grant order (tombstones dropped); `None` when nobody waits.
    pub fn top(&mut self, look: usize) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|&p| self.fill(p, look.max(1)) > 0)
    }

    /// Stages priority `p`'s waiters (tombstones dropped, those too large refused);
    /// returns how many are staged.
    fn fill(&mut self, p: Priority, look: usize) -> usize {
        let (lanes, fit) = (self.lanes, self.staged.fit);
        let lane = lanes.lane(p);
        let staged = &mut self.staged.by_priority[p as usize];
        let keep = |w: &Arc<Waiter>| stays(lanes, fit, w);
        // Put back after a 429: after those staged earlier, before every new one.
        while let Some(w) = lane.front.pop() {
            staged.front.push_back(w);
        }
        staged.front.retain(keep);
        staged.back.retain(keep);
        while staged.len() < look {
            match staged.later.pop_front().or_else(|| lane.back.pop()) {
                Some(w) if keep(&w) => staged.back.push_back(w),
                Some(_) => {}
                None => break,
            }
        }
        staged.len()
    }

    /// Refuses every live waiter whose token cost is larger than `limit` (the whole
    /// budget of a window): all of them at once when the limit fell since the last
    /// call, and from then on each as it is staged. Each refused waiter is woken with
    /// [`TooLarge`] and counted as dropped for [`DropReason::TokensTooLarge`].
    pub fn refuse_larger_than(&mut self, limit: u64) {
        let fell = limit < self.staged.fit;
        self.staged.fit = limit;
        if !fell {
            return;
        }
        let lanes = self.lanes;
        let keep = |w: &Arc<Waiter>| stays(lanes, limit, w);
        for p in Priority::ALL {
            let lane = lanes.lane(p);
            let staged = &mut self.staged.by_priority[p as usize];
            while let Some(w) = lane.front.pop() {
                staged.front.push_back(w);
            }
            while let Some(w) = lane.back.pop() {
                staged.later.push_back(w);
            }
            staged.front.retain(keep);
            staged.back.retain(keep);
            staged.later.retain(keep);
        }
    }

    /// Staged waiters of priority `p`.
    pub fn len(&self, p: Priority) -> usize {
        self.staged.by_priority[p as usize].len()
    }

    /// The `pos`-th staged waiter of priority `p` (0: the head).
    pub fn parked(&self, p: Priority, pos: usize) -> Option<Parked> {
        self.staged.by_priority[p as usize]
            .get(pos)
            .map(|w| Parked {
                cost: w.cost,
                parked_at: w.parked_at,
            })
    }

    /// Grants the `pos`-th staged waiter of priority `p` and wakes it; gives the grant
    /// back if that waiter cancelled meanwhile (it is dropped either way).
    pub fn grant(&mut self, p: Priority, pos: usize, grant: Grant) -> Result<(), Grant> {
        let Some(w) = self.staged.by_priority[p as usize].remove(pos) else {
            return Err(grant);
        };
        // Set before the CAS: a waiter that sees GRANTED finds it. A waiter that
        // cancelled first leaves it unread; the waiter is dropped. (A staged waiter was
        // never answered: each leaves the stage once.)
        let _ = w.answer.set(Ok(grant));
        if w.settle(GRANTED) {
            self.lanes.release(&w);
            self.lanes.lane(p).dequeued.fetch_add(1, Ordering::Relaxed);
            w.waker.wake();
            Ok(())
        } else {
            Err(grant)
        }
    }
}

/// Whether a staged waiter stays: it is live and its cost fits `limit`. One that does
/// not fit is refused here (unless it was cancelled first).
fn stays(lanes: &Lanes, limit: u64, w: &Waiter) -> bool {
    let estimate = w.cost.map_or(0, |c| c.total());
    if estimate <= limit {
        return w.is_waiting();
    }
    // Set before the CAS, as a grant's.
    let _ = w.answer.set(Err(TooLarge { limit, estimate }));
    if w.settle(REFUSED) {
        lanes.release(w);
        lanes.lane(w.priority).dropped[DropReason::TokensTooLarge as usize]
            .fetch_add(1, Ordering::Relaxed);
        w.waker.wake();
    }
    false
}

impl fmt::Debug for Stage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage")
            .field("staged", &Priority::ALL.map(|p| self.len(p)))
            .finish()
    }
}
