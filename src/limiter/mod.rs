//! Admission control for one provider: token bucket, wait queues, retreat.
//!
//! Plain data structures on atomics — no hyper, no tokio, no lock on any path — so each
//! rule is unit-tested on a fake clock and the CAS protocols under loom. The async
//! waiting lives in the request path (`proxy`), the granting in [`dispatch`], a thread
//! that sleeps until the next token is due.
//!
//! Fast path: when nobody waits and a token is free, a request is admitted with one CAS.
//! Otherwise it is parked (never jumping those already waiting) and granted in strict
//! priority order as tokens free up.

pub mod bucket;
pub mod dispatch;
pub mod queue;
pub mod retreat;
pub(crate) mod sync;
pub mod window;

use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crate::priority::Priority;
pub use bucket::TokenBucket;
pub use queue::{QueueCounts, QueueFull, Ticket, WaitQueues};
pub use retreat::{Cut, Retreat, RetreatConfig, RetreatState, RetreatView, Transition};

/// What admission decided.
#[derive(Debug)]
pub enum Decision {
    /// A token was free and nobody waited: go now.
    Admitted,
    /// Parked: await the ticket.
    Queued(Ticket),
    /// The queue is at its bound.
    Full(QueueFull),
}

/// A provider's limiter.
#[derive(Debug)]
pub struct Limiter {
    pub bucket: TokenBucket,
    pub queues: Arc<WaitQueues>,
    pub retreat: Retreat,
    dispatcher: OnceLock<Thread>,
}

impl Limiter {
    pub fn new(rate_rpm: f64, capacity: u32, queue_max: usize, retreat: RetreatConfig) -> Self {
        Self {
            bucket: TokenBucket::new(rate_rpm, capacity),
            queues: WaitQueues::new(queue_max),
            retreat: Retreat::new(rate_rpm, retreat),
            dispatcher: OnceLock::new(),
        }
    }

    /// The thread to wake when a request is parked (set once by the dispatcher).
    pub fn set_dispatcher(&self, thread: Thread) {
        let _ = self.dispatcher.set(thread);
    }

    fn wake_dispatcher(&self) {
        if let Some(t) = self.dispatcher.get() {
            t.unpark();
        }
    }

    /// Admits at `now`, parks, or refuses.
    #[inline]
    pub fn admit(&self, priority: Priority, now: u64) -> Decision {
        if self.queues.is_empty() && self.bucket.try_acquire(now).is_ok() {
            return Decision::Admitted;
        }
        match self.queues.enqueue(priority, false) {
            Ok(ticket) => {
                self.wake_dispatcher();
                Decision::Queued(ticket)
            }
            Err(full) => Decision::Full(full),
        }
    }

    /// Parks a request again at the head of its priority (after an upstream 429).
    pub fn requeue(&self, priority: Priority) -> Result<Ticket, QueueFull> {
        let t = self.queues.enqueue(priority, true)?;
        self.wake_dispatcher();
        Ok(t)
    }

    /// A granted token that was not used (the client left first): give it back.
    pub fn refund(&self, now: u64) {
        self.bucket.refund(now);
        self.wake_dispatcher();
    }

    /// Grants tokens to waiters while tokens are free. Returns how long until the next
    /// token when waiters remain.
    pub fn dispatch(&self, now: u64) -> Option<Duration> {
        for _ in 0..self.queues.take_unused_grants() {
            self.bucket.refund(now);
        }
        loop {
            if self.queues.is_empty() {
                return None;
            }
            match self.bucket.try_acquire(now) {
                Ok(()) => {
                    if !self.queues.grant_next() {
                        // Every remaining waiter had cancelled: the token was not used.
                        self.bucket.refund(now);
                        return None;
                    }
                }
                Err(wait) => return Some(wait),
            }
        }
    }

    /// An upstream 429 at `now`: retreat, apply the new rate, and pause admission for
    /// `pause` (the provider's `Retry-After`, or the configured default).
    pub fn on_upstream_429(&self, now: u64, pause: Option<Duration>) -> Cut {
        let cut = self.retreat.on_429(now);
        if let Some(rpm) = cut.effective_rpm {
            let (_, capacity) = self.bucket.rate();
            self.bucket.set_rate(rpm, capacity, now);
        }
        let pause = pause.unwrap_or(self.retreat.config().default_pause);
        self.bucket
            .pause_until(now.saturating_add(pause.as_nanos() as u64));
        cut
    }

    /// Honours `x-ratelimit-remaining: 0` with its reset time on a successful answer.
    pub fn on_quota_exhausted(&self, now: u64, reset: Duration) {
        self.bucket
            .pause_until(now.saturating_add(reset.as_nanos() as u64));
    }

    /// Advances retreat recovery; applies a changed rate to the bucket.
    pub fn tick(&self, now: u64) -> Option<Transition> {
        let (transition, rate) = self.retreat.tick(now);
        if let Some(rpm) = rate {
            let (_, capacity) = self.bucket.rate();
            self.bucket.set_rate(rpm, capacity, now);
            self.wake_dispatcher();
        }
        transition
    }

    /// Changes the base rate and capacity at run time, keeping the bucket's state.
    pub fn set_rate(&self, base_rpm: f64, capacity: u32, now: u64) {
        let effective = self.retreat.set_base(base_rpm);
        self.bucket.set_rate(effective, capacity, now);
        self.wake_dispatcher();
    }

    /// `Retry-After` for a refused request: the time for the queue ahead of it (and it)
    /// to drain at the effective rate.
    pub fn retry_after(&self, ahead: usize, now: u64) -> Duration {
        let interval = 60.0 / self.retreat.effective_rpm().max(1e-9);
        let drain = Duration::from_secs_f64(interval * (ahead as f64 + 1.0));
        drain.max(self.bucket.wait_time(now))
    }
}

/// Parses `Retry-After` (seconds; HTTP dates are treated as absent) and the
/// `x-ratelimit-reset` forms providers send: seconds (`"2"`, `"1.5"`) or a Go-style
/// duration (`"1s"`, `"6m0s"`, `"250ms"`).
pub fn parse_delay(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    if let Ok(secs) = raw.parse::<f64>() {
        return (secs.is_finite() && (0.0..86_400.0).contains(&secs))
            .then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0;
    let mut rest = raw;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_end);
        total += value
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                _ => return None,
            };
        rest = next;
    }
    (total < 86_400.0).then(|| Duration::from_secs_f64(total))
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;
