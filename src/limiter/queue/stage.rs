//! The dispatcher's staging: waiters it popped and has not settled yet, per priority,
//! in grant order (those put back, then new ones), so that it can look past the head of
//! a priority. Only the dispatcher locks them; producers never do, so the lock is never
//! contended and the request path stays lock-free.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use super::lane::Lanes;
use super::waiter::{Grant, Waiter, GRANTED};
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
pub(super) struct Staging(Mutex<[Staged; 3]>);

impl Staging {
    pub(super) fn new() -> Self {
        Self(Mutex::new(Default::default()))
    }

    /// The dispatcher's view of `lanes` (see [`Stage`]).
    pub(super) fn lock<'q>(&'q self, lanes: &'q Lanes) -> Stage<'q> {
        Stage {
            lanes,
            staged: self.0.lock(),
        }
    }
}

/// One priority's waiters popped by the dispatcher and not yet settled, in grant order:
/// those put back, then new ones.
#[derive(Debug, Default)]
struct Staged {
    front: VecDeque<Arc<Waiter>>,
    back: VecDeque<Arc<Waiter>>,
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
    staged: parking_lot::MutexGuard<'q, [Staged; 3]>,
    #[cfg(sidecar_loom)]
    staged: loom::sync::MutexGuard<'q, [Staged; 3]>,
}

impl Stage<'_> {
    /// The highest priority with a live waiter, its lane staged with up to `look` live
    /// waiters in grant order (tombstones dropped); `None` when nobody waits.
    pub fn top(&mut self, look: usize) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|&p| self.fill(p, look.max(1)) > 0)
    }

    /// Stages priority `p`'s waiters; returns how many are staged.
    fn fill(&mut self, p: Priority, look: usize) -> usize {
        let lane = self.lanes.lane(p);
        let staged = &mut self.staged[p as usize];
        // Put back after a 429: after those staged earlier, before every new one.
        while let Some(w) = lane.front.pop() {
            staged.front.push_back(w);
        }
        staged.front.retain(|w| w.is_waiting());
        staged.back.retain(|w| w.is_waiting());
        while staged.len() < look {
            match lane.back.pop() {
                Some(w) if w.is_waiting() => staged.back.push_back(w),
                Some(_) => {}
                None => break,
            }
        }
        staged.len()
    }

    /// Staged waiters of priority `p`.
    pub fn len(&self, p: Priority) -> usize {
        self.staged[p as usize].len()
    }

    /// The `pos`-th staged waiter of priority `p` (0: the head).
    pub fn parked(&self, p: Priority, pos: usize) -> Option<Parked> {
        self.staged[p as usize].get(pos).map(|w| Parked {
            cost: w.cost,
            parked_at: w.parked_at,
        })
    }

    /// Grants the `pos`-th staged waiter of priority `p` and wakes it; gives the grant
    /// back if that waiter cancelled meanwhile (it is dropped either way).
    pub fn grant(&mut self, p: Priority, pos: usize, grant: Grant) -> Result<(), Grant> {
        let Some(w) = self.staged[p as usize].remove(pos) else {
            return Err(grant);
        };
        // Set before the CAS: a waiter that sees GRANTED finds it. A waiter that
        // cancelled first leaves it unread; the waiter is dropped.
        let _ = w.grant.set(grant);
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

impl fmt::Debug for Stage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stage")
            .field("staged", &Priority::ALL.map(|p| self.len(p)))
            .finish()
    }
}
