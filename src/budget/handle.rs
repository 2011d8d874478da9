//! The handle a provider holds on its shared budget: the pot its limiter takes tokens
//! from, what this replica knows of the budget (for metrics, the snapshot and the admin
//! view), and the queue of admin changes for every replica. The budget's task fills the
//! one and writes the other; the handle itself never talks to Redis.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::SegQueue;
use parking_lot::Mutex;

use super::view::ClusterView;
use crate::limiter::LeasePot;

/// A change made at this replica, for every replica of the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Command {
    Configure {
        rate_rpm: f64,
        bucket_capacity: u32,
        fallback: bool,
        /// `tokens_per_minute`, and the tokens of the provider's window it allows.
        tokens_per_minute: u64,
        tokens_per_window: u64,
    },
    /// The token setting alone: this replica's, for a budget created without one.
    Tokens {
        tokens_per_minute: u64,
        tokens_per_window: u64,
    },
    Forget,
}

/// One provider's shared budget, as this replica holds it.
#[derive(Debug)]
pub struct Budget {
    pub provider: Arc<str>,
    /// Position of the provider in `App::providers`.
    pub index: usize,
    pub(super) pot: Arc<LeasePot>,
    pub(super) view: Mutex<ClusterView>,
    /// Script round trips, in microseconds.
    round_trip: Mutex<hdrhistogram::Histogram<u64>>,
    pub(super) commands: SegQueue<Command>,
}

impl Budget {
    pub fn new(provider: Arc<str>, index: usize, budget: &str, replica: Arc<str>) -> Self {
        Self {
            provider,
            index,
            pot: Arc::new(LeasePot::new()),
            view: Mutex::new(ClusterView::new(Arc::from(budget), replica)),
            round_trip: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2)
                    .expect("valid histogram bounds"),
            ),
            commands: SegQueue::new(),
        }
    }

    /// The pot the provider's limiter takes tokens from.
    pub fn pot(&self) -> Arc<LeasePot> {
        Arc::clone(&self.pot)
    }

    /// What this replica knows of the budget now.
    pub fn view(&self) -> ClusterView {
        self.view.lock().clone()
    }

    /// The round trips so far (microseconds).
    pub fn round_trips(&self) -> hdrhistogram::Histogram<u64> {
        self.round_trip.lock().clone()
    }

    /// Sends a change to every replica of the budget (through Redis).
    pub fn command(&self, c: Command) {
        self.commands.push(c);
        self.pot.wake();
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut ClusterView)) {
        f(&mut self.view.lock());
    }

    pub(super) fn record_round_trip(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self.round_trip.lock().record(us.min(60_000_000));
    }
}
