//! Admission control for one provider: token bucket, window guard, wait queues, and the
//! controller that learns the provider's limit.
//!
//! Plain data structures on atomics — no hyper, no tokio, no lock on the request path —
//! so each rule is unit-tested on a fake clock and the CAS protocols under loom. The
//! async waiting lives in the request path (`proxy`), the granting in [`dispatch`], a
//! thread that sleeps until the next grant is due and also runs the controller.
//!
//! A request goes when the bucket has a token (even spacing at the paced rate) *and*
//! the window guard has room (never more than the limit in any rolling window, as
//! counted at the sidecar); the guard's claim travels with the request and is stamped
//! with the time it is written upstream. Fast path: when nobody waits, one CAS each.
//! Otherwise it is parked (never jumping those already waiting) and granted in strict
//! priority order.

pub mod bucket;
pub mod control;
pub mod dispatch;
pub mod guard;
pub mod learn;
pub mod lease;
pub mod queue;
pub mod retreat;
pub mod scopes;
pub mod signal;
pub(crate) mod sync;
pub mod window;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering as StdOrdering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use crate::priority::Priority;
pub use bucket::TokenBucket;
pub use control::{ClusterPacing, Event, Note, PacingView, PauseReason};
pub use guard::{Claim, Margin, WindowGuard};
pub use learn::{Change, Source};
pub use lease::{LeasePot, Mode};
pub use queue::{DropReason, Flow, QueueCounts, QueueFull, Ticket, WaitQueues};
pub use retreat::{AnswerCounts, Retreat, RetreatConfig, RetreatState, RetreatView, Transition};
pub use signal::{Quota, Refusal};

use control::Control;
use learn::{per_window, Learner};
use sync::Mutex;

/// What admission decided.
#[derive(Debug)]
pub enum Decision {
    /// A token and a window slot were free and nobody waited: go now.
    Admitted(Claim),
    /// Parked: await the ticket (it resolves to the claim).
    Queued(Ticket),
    /// The queue is at its bound.
    Full(QueueFull),
    /// Cluster mode, cut off from the shared budget for too long: nothing may be sent.
    Isolated,
}

/// How a provider is paced: the window it counts in and how limits are learned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// The window the provider counts requests in.
    pub window: Duration,
    /// Safety margin of the window guard.
    pub margin: Margin,
    /// Least time between two probes above the learned limit.
    pub probe_interval: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            margin: Margin {
                fraction: 0.005,
                floor: Duration::from_millis(50),
            },
            probe_interval: Duration::from_secs(600),
        }
    }
}

/// What one upstream answer said, as the proxy read it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Answer {
    /// A 2xx answer.
    pub ok: bool,
    pub refusal: Option<Refusal>,
    /// The provider's `Retry-After` (or `retry-after-ms`).
    pub retry_after: Option<Duration>,
    pub quota: Option<Quota>,
}

/// A provider's limiter.
#[derive(Debug)]
pub struct Limiter {
    pub bucket: TokenBucket,
    pub guard: WindowGuard,
    pub queues: Arc<WaitQueues>,
    /// Upstream answers and 429s over the last minute.
    pub answers: AnswerCounts,
    pacing: Pacing,
    default_pause: Duration,
    control: Mutex<Control>,
    inbox: SegQueue<Event>,
    /// The highest count-in-window answered without a 429 since the limit last changed.
    proven: AtomicU32,
    /// Rate-limit refusals among the sends in the guard's span (kept by the controller).
    refused_in_span: AtomicU32,
    /// Clock time + 1 a request last had to wait for the limit (0: never).
    demand_at: AtomicU64,
    /// The last limit the provider's headers stated (rpm; 0: none).
    header_limit: AtomicU64,
    /// Admission paused until (clock nanoseconds), and why (`PauseReason as u8`).
    pause_until: AtomicU64,
    pause_reason: AtomicU8,
    dispatcher: OnceLock<Thread>,
    /// `limit_scope = "model"`: the models' own limiters under this (the key's) one.
    models: Option<scopes::Models>,
    /// Cluster mode: tokens leased from the shared budget (`None`: the local bucket).
    lease: Option<Arc<LeasePot>>,
}

/// A claim held by a request on its way upstream: stamped with the time it is written,
/// or released when it never is (dropped unstamped).
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
    claim: Claim,
    sent_at: Option<u64>,
}

impl<'a> Permit<'a> {
    pub fn new(limiter: &'a Limiter, claim: Claim) -> Self {
        Self {
            limiter,
            claim,
            sent_at: None,
        }
    }

    /// The request is being written upstream now.
    pub fn stamp(&mut self, now: u64) {
        self.sent_at = Some(self.limiter.guard.stamp(self.claim.slot, now));
    }

    /// Sends in the window including this one, when it was claimed.
    pub fn count(&self) -> u32 {
        self.claim.count
    }

    pub fn sent_at(&self) -> Option<u64> {
        self.sent_at
    }

    /// Not sent after all: the window slot and the token go back at once, to the next
    /// waiter.
    pub fn give_back(mut self, now: u64) {
        if self.sent_at.is_none() {
            self.sent_at = Some(now);
            self.limiter.refund(self.claim, now);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.sent_at.is_none() {
            self.limiter.guard.release(self.claim.slot);
        }
    }
}

impl Limiter {
    /// A limiter on a 60 s window with the default margin and probe interval.
    pub fn new(rate_rpm: f64, capacity: u32, queue_max: usize, retreat: RetreatConfig) -> Self {
        Self::with_pacing(rate_rpm, capacity, queue_max, retreat, Pacing::default(), 0)
    }

    pub fn with_pacing(
        rate_rpm: f64,
        capacity: u32,
        queue_max: usize,
        retreat: RetreatConfig,
        pacing: Pacing,
        now: u64,
    ) -> Self {
        let ceiling = per_window(rate_rpm, pacing.window);
        Self {
            bucket: TokenBucket::new(rate_rpm, capacity),
            guard: WindowGuard::new(pacing.window, pacing.margin, ceiling, ceiling),
            queues: WaitQueues::new(queue_max),
            answers: AnswerCounts::default(),
            default_pause: retreat.default_pause,
            control: Mutex::new(Control {
                learner: Learner::new(ceiling, pacing.window, pacing.probe_interval, now),
                retreat: Retreat::new(retreat, pacing.window),
                ceiling_rpm: rate_rpm,
                capacity,
                window: pacing.window,
                published: Some((ceiling, rate_rpm, capacity)),
                changes: 0,
                logged_pause: 0,
                refused: std::collections::VecDeque::new(),
                cluster: None,
            }),
            pacing,
            inbox: SegQueue::new(),
            proven: AtomicU32::new(0),
            refused_in_span: AtomicU32::new(0),
            demand_at: AtomicU64::new(0),
            header_limit: AtomicU64::new(0),
            pause_until: AtomicU64::new(0),
            pause_reason: AtomicU8::new(0),
            dispatcher: OnceLock::new(),
            models: None,
            lease: None,
        }
    }

    /// Takes tokens from `pot` (leased from a shared budget) instead of the local bucket
    /// while the pot is in [`Mode::Shared`].
    pub fn leased(mut self, pot: Arc<LeasePot>) -> Self {
        self.lease = Some(pot);
        self
    }

    /// The pot of leased tokens (cluster mode).
    pub fn lease(&self) -> Option<&Arc<LeasePot>> {
        self.lease.as_ref()
    }

    /// Gives each model its own limiter (made like this one) under this one, at most
    /// `max` at once.
    pub fn model_scoped(mut self, max: usize) -> Self {
        let template = {
            let c = self.control.lock();
            scopes::Template {
                rate_rpm: c.ceiling_rpm,
                capacity: c.capacity,
                queue_max: self.queues.max(),
                retreat: c.retreat.config(),
                pacing: self.pacing,
            }
        };
        self.models = Some(scopes::Models::new(template, max));
        self
    }

    /// The limiter of `model` when limits are per model (`None`: per key, or no scope
    /// could be made for it).
    pub fn scope(&self, model: &str, now: u64) -> Option<Arc<Limiter>> {
        self.models.as_ref()?.get(model, now, self.dispatcher.get())
    }

    /// Whether limits are learned per model.
    pub fn is_model_scoped(&self) -> bool {
        self.models.is_some()
    }

    /// The live model scopes, by name (empty when limits are per key).
    pub fn models(&self) -> Vec<(Arc<str>, Arc<Limiter>)> {
        self.models
            .as_ref()
            .map_or_else(Vec::new, scopes::Models::all)
    }

    /// Limits learned per model before a restart, applied as each model is seen.
    pub fn restore_models(&self, limits: std::collections::HashMap<String, u32>) {
        if let Some(m) = &self.models {
            m.restore(limits);
        }
    }

    /// Model scopes evicted so far (the bound was reached).
    pub fn models_evicted(&self) -> u64 {
        self.models.as_ref().map_or(0, scopes::Models::evicted)
    }

    pub fn pacing(&self) -> Pacing {
        self.pacing
    }

    /// The thread to wake when a request is parked (set once by the dispatcher).
    pub fn set_dispatcher(&self, thread: Thread) {
        for (_, m) in self.models() {
            m.set_dispatcher(thread.clone());
        }
        let _ = self.dispatcher.set(thread);
    }

    /// Wakes the dispatcher (tokens arrived, the mode changed).
    pub fn wake_dispatcher(&self) {
        if let Some(t) = self.dispatcher.get() {
            t.unpark();
        }
    }

    /// A token and a window slot at `now`, or nothing (neither is kept).
    #[inline]
    fn try_take(&self, now: u64) -> Option<Claim> {
        if let Some(pot) = &self.lease {
            return self.try_take_leased(pot, now);
        }
        self.try_take_local(now)
    }

    #[inline]
    fn try_take_local(&self, now: u64) -> Option<Claim> {
        // The bucket first: one CAS, and where a busy limiter refuses most often.
        self.bucket.try_acquire(now).ok()?;
        match self.guard.try_claim(now) {
            Ok(c) => Some(c),
            Err(_) => {
                self.bucket.refund(now);
                None
            }
        }
    }

    /// A token from the lease, then a window slot; the local bucket in fallback mode.
    #[inline]
    fn try_take_leased(&self, pot: &LeasePot, now: u64) -> Option<Claim> {
        match pot.mode() {
            Mode::Fallback => self.try_take_local(now),
            Mode::Isolated => None,
            Mode::Shared => {
                // Relaxed: the pause is also enforced by the shared budget; this one only
                // keeps tokens in hand from going out during it.
                if self.pause_until.load(StdOrdering::Relaxed) > now || !pot.try_take(now) {
                    return None;
                }
                match self.guard.try_claim(now) {
                    Ok(c) => Some(c),
                    Err(_) => {
                        pot.put_back();
                        None
                    }
                }
            }
        }
    }

    /// Whether the window holds more sends (pending claims included) than the limit now
    /// allows: claims granted before the limit fell.
    pub fn over_limit(&self, now: u64) -> bool {
        self.guard.in_span(now) > self.guard.limit()
    }

    /// Time until both a token and a window slot are free (zero if they are now).
    pub fn wait_time(&self, now: u64) -> Duration {
        let guard = self.guard.wait_time(now);
        match self.lease.as_ref().map(|p| (p.mode(), p.tokens())) {
            // No token in hand: the budget task wakes the dispatcher when a lease comes.
            Some((Mode::Shared, 0)) => guard.max(LEASE_POLL),
            Some((Mode::Shared, _)) => guard.max(self.pause_left(now)).max(
                self.lease
                    .as_ref()
                    .map_or(Duration::ZERO, |p| p.usable_in(now)),
            ),
            Some((Mode::Isolated, _)) => guard.max(LEASE_POLL),
            _ => self.bucket.wait_time(now).max(guard),
        }
    }

    fn pause_left(&self, now: u64) -> Duration {
        Duration::from_nanos(
            self.pause_until
                .load(StdOrdering::Relaxed)
                .saturating_sub(now),
        )
    }

    fn note_demand(&self, now: u64) {
        // Relaxed: a hint for probing, read by the controller a tick later.
        if self.demand_at.load(StdOrdering::Relaxed) <= now {
            self.demand_at.store(now + 1, StdOrdering::Relaxed);
        }
    }

    /// Admits at `now`, parks, or refuses.
    #[inline]
    pub fn admit(&self, priority: Priority, now: u64) -> Decision {
        if let Some(pot) = &self.lease {
            pot.offer();
            if pot.mode() == Mode::Isolated {
                return Decision::Isolated;
            }
        }
        if self.queues.is_empty() {
            if let Some(c) = self.try_take(now) {
                return Decision::Admitted(c);
            }
        }
        self.note_demand(now);
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

    /// A granted claim that was not used (the client left first): give its window slot
    /// and its token back.
    pub fn refund(&self, claim: Claim, now: u64) {
        self.give_back(claim, now);
        self.wake_dispatcher();
    }

    fn give_back(&self, claim: Claim, now: u64) {
        self.guard.release(claim.slot);
        match &self.lease {
            Some(pot) if pot.mode() == Mode::Shared => pot.put_back(),
            _ => self.bucket.refund(now),
        }
    }

    /// A token and a window slot at `now` when nobody waits, without queueing: for a
    /// send that may be skipped (a readiness probe), so it spends the provider's quota
    /// only where a request could have.
    pub fn try_admit_now(&self, now: u64) -> Option<Claim> {
        if self.queues.is_empty() {
            self.try_take(now)
        } else {
            None
        }
    }

    /// A send that goes out whatever the limit says (unmetered passthrough to the same
    /// upstream): counted in the window.
    pub fn record_forced_send(&self, now: u64) {
        let slot = self.guard.force_claim(now);
        self.guard.stamp(slot, now);
    }

    /// Grants tokens to waiters while tokens and window slots are free. Returns how long
    /// until the next grant could be due when waiters remain.
    pub fn dispatch(&self, now: u64) -> Option<Duration> {
        while let Some(c) = self.queues.take_unused_grant() {
            self.give_back(c, now);
        }
        loop {
            if self.queues.is_empty() {
                return None;
            }
            match self.try_take(now) {
                Some(claim) => {
                    if let Err(c) = self.queues.grant_next(claim) {
                        // Every remaining waiter had cancelled: nothing was used.
                        self.give_back(c, now);
                        return None;
                    }
                }
                None => {
                    // A zero wait is a race with a fast-path admission: look again soon.
                    let wait = self.wait_time(now);
                    return Some(if wait.is_zero() {
                        Duration::from_micros(50)
                    } else {
                        wait
                    });
                }
            }
        }
    }

    /// [`Self::dispatch`] for this limiter and each model scope: the soonest next wait.
    pub fn dispatch_all(&self, now: u64) -> Option<Duration> {
        let mut wait = self.dispatch(now);
        for (_, m) in self.models() {
            if let Some(w) = m.dispatch(now) {
                wait = Some(wait.map_or(w, |x| x.min(w)));
            }
        }
        wait
    }

    /// [`Self::control`] for this limiter and each model scope; notes name the model.
    pub fn control_all(&self, now: u64, note: &mut dyn FnMut(Option<&str>, Note)) {
        self.control(now, &mut |n| note(None, n));
        for (name, m) in self.models() {
            m.control(now, &mut |n| note(Some(&name), n));
        }
    }

    /// Pauses admission until `until` for `reason` (the latest end wins).
    pub fn pause(&self, until: u64, reason: PauseReason) {
        self.bucket.pause_until(until);
        // Relaxed: a display value; the bucket holds the pause itself.
        if self.pause_until.fetch_max(until, StdOrdering::Relaxed) < until {
            self.pause_reason.store(reason as u8, StdOrdering::Relaxed);
        }
    }

    /// A new queue bound, for this limiter and its model scopes.
    pub fn set_queue_max(&self, max: usize) {
        self.queues.set_max(max);
        if let Some(models) = &self.models {
            models.set_queue_max(max);
        }
    }

    /// Seconds between grants: the bucket's interval, and the guarded span's share of
    /// each send (the guard spaces `limit` sends over window + margin), which binds
    /// once a window's worth has gone.
    fn intervals(&self) -> (f64, f64) {
        let (rpm, _) = self.bucket.rate();
        let bucket = 60.0 / rpm.max(1e-9);
        let guard = self.guard.span_nanos() as f64 / 1e9 / f64::from(self.guard.limit().max(1));
        (bucket, bucket.max(guard))
    }

    /// How long a request would wait with `ahead` waiters granted before it: the
    /// current wait, then one bucket interval each for the first window's worth, and
    /// the guard's share of the span each after that.
    pub fn expected_wait(&self, ahead: usize, now: u64) -> Duration {
        let (bucket, guarded) = self.intervals();
        let within = ahead.min(self.guard.limit() as usize);
        let beyond = ahead - within;
        let secs = bucket * within as f64 + guarded * beyond as f64;
        self.wait_time(now) + Duration::from_secs_f64(secs)
    }

    /// `Retry-After` for a refused request: the time for the queue ahead of it (and it)
    /// to drain at the rate paced now.
    pub fn retry_after(&self, ahead: usize, now: u64) -> Duration {
        self.expected_wait(ahead, now)
            .max(Duration::from_secs_f64(self.intervals().0))
    }
}

/// How often the dispatcher looks again while it waits for a lease (the budget task wakes
/// it as soon as one comes).
const LEASE_POLL: Duration = Duration::from_millis(100);

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
