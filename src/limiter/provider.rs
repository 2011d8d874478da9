//! One limiter: a provider key's, or one model's under it (`limit_scope = "model"`,
//! see [`super::scopes`]). It joins the parts the sibling modules define — the bucket,
//! the window guard, the wait queues, the controller's state, the lease pot in cluster
//! mode — and owns the atomics the request path and the controller share.
//!
//! This file holds the struct, how it is built and wired (model scopes, lease, the
//! dispatcher thread), and what admission answers. The behaviour is split by who calls
//! it: `admit.rs` for the request path and the dispatcher's grants, `control.rs` for what
//! answers report, the controller step, admin changes and views, `tokens.rs` for the
//! token budget's reservation, learning and views.

mod admit;
mod control;
#[cfg(all(test, not(sidecar_loom)))]
mod testing;
mod tokens;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use super::bucket::TokenBucket;
use super::control::{Control, Event};
use super::guard::{Claim, WindowGuard};
use super::learn::per_window;
use super::lease::LeasePot;
use super::pacing::Pacing;
use super::queue::{Grant, QueueFull, Ticket, WaitQueues};
use super::retreat::{AnswerCounts, RetreatConfig};
use super::scopes::{self, Scoped};
use super::sync::Mutex;
use super::token_budget::{Reserved, Sent, TokenBudget};

/// What admission decided.
#[derive(Debug)]
pub enum Decision {
    /// A token, a window slot and the request's token cost were free and nobody
    /// waited: go now.
    Admitted(Grant),
    /// Parked: await the ticket (it resolves to the claim, or to a refusal when the token
    /// limit falls below the request's cost while it waits).
    Queued(Ticket),
    /// The queue is at its bound.
    Full(QueueFull),
    /// Cluster mode, cut off from the shared budget for too long: nothing may be sent.
    Isolated,
    /// The request's estimate is larger than the whole token budget of a window: it
    /// could never be sent (tokens per window).
    TooLarge { limit: u64, estimate: u64 },
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
    models: Option<scopes::Models<Limiter>>,
    /// Cluster mode: tokens leased from the shared budget (`None`: the local bucket).
    lease: Option<Arc<LeasePot>>,
    /// The token budget, when a token limit is configured (`None`: off, one branch).
    tokens: Option<TokenBudget>,
    /// Token headers or token 429s seen (see [`TokenSignals`]).
    token_signals: TokenSignals,
    /// The last token limit the provider's headers stated (tpm; 0: none).
    token_header_limit: AtomicU64,
    token_inbox: SegQueue<TokenEvent>,
    /// Cluster mode: the most tokens per window the shared budget lets this replica
    /// charge (`u64::MAX`: no cap).
    token_cap: AtomicU64,
}

/// A claim held by a request on its way upstream, with its token reservation: stamped
/// with the time it is written, or released when it never is (dropped unstamped).
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a Limiter,
    claim: Claim,
    /// Boxed: a permit is moved through the request path's layers, and a request
    /// without a token cost (every one, when no budget is set) should not carry the room.
    tokens: Option<Box<Reservation<'a>>>,
    sent_at: Option<u64>,
}

impl<'a> Permit<'a> {
    /// The permit of a grant (or of a bare claim: no tokens reserved).
    pub fn new(limiter: &'a Limiter, grant: impl Into<Grant>) -> Self {
        let grant = grant.into();
        Self {
            limiter,
            claim: grant.claim,
            tokens: grant.tokens.map(|r| Box::new(Reservation::new(limiter, r))),
            sent_at: None,
        }
    }

    /// The request is being written upstream now (its token charge is dated now too).
    pub fn stamp(&mut self, now: u64) {
        self.sent_at = Some(self.limiter.guard.stamp(self.claim.slot, now));
        if self.claim.lease != 0 {
            if let Some(pot) = self.limiter.lease.as_deref() {
                pot.sent(self.claim.lease, now);
            }
        }
        if let Some(r) = &mut self.tokens {
            r.stamp(now);
        }
    }

    /// Sends in the window including this one, when it was claimed.
    pub fn count(&self) -> u32 {
        self.claim.count
    }

    pub fn sent_at(&self) -> Option<u64> {
        self.sent_at
    }

    /// The token reservation, to settle when the answer ends (`None`: the request had
    /// no token cost, or it was taken already). Taken before the permit is stamped, it
    /// is stamped by its own [`Reservation::stamp`].
    pub fn take_tokens(&mut self) -> Option<Reservation<'a>> {
        self.tokens.take().map(|r| *r)
    }

    /// The token reservation, to read or report an answer to.
    pub fn tokens(&self) -> Option<&Reservation<'a>> {
        self.tokens.as_deref()
    }

    /// Not sent after all: the window slot, the token and the reserved token cost go
    /// back at once, to the next waiter.
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
        // An unsent reservation gives its tokens back as it drops.
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
            control: Mutex::new(Control::new(rate_rpm, capacity, retreat, &pacing, now)),
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
            tokens: None,
            token_signals: TokenSignals::default(),
            token_header_limit: AtomicU64::new(0),
            token_inbox: SegQueue::new(),
            token_cap: AtomicU64::new(u64::MAX),
        }
    }

    /// Takes tokens from `pot` (leased from a shared budget) instead of the local bucket
    /// while the pot is in [`Mode::Shared`](super::lease::Mode::Shared).
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
                token_limit: c.tokens.as_ref().map(|t| t.ceiling()),
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
}

/// A model's limiter is a limiter like the key's, made from its template.
impl Scoped for Limiter {
    fn from_template(
        t: &scopes::Template,
        now: u64,
        wake: Option<&Thread>,
        restored: Option<u32>,
    ) -> Self {
        let l = Limiter::with_pacing(
            t.rate_rpm,
            t.capacity,
            t.queue_max,
            t.retreat,
            t.pacing,
            now,
        );
        let l = match t.token_limit {
            Some(n) => l.with_token_budget(n),
            None => l,
        };
        if let Some(th) = wake {
            l.set_dispatcher(th.clone());
        }
        if let Some(n) = restored {
            l.restore(n, now);
        }
        l
    }

    fn is_idle(&self) -> bool {
        self.queues.is_empty()
    }

    fn set_queue_bound(&self, max: usize) {
        self.queues.set_max(max);
    }
}

// The token types the limiter holds, defined here so that `tokens.rs` (their
// behaviour) imports them and not the other way round.

/// Tokens reserved for a request: given back if it is never sent, settled once after.
#[derive(Debug)]
pub struct Reservation<'a> {
    limiter: &'a Limiter,
    state: State,
}

#[derive(Debug, Clone, Copy)]
pub(super) enum State {
    Reserved(Reserved),
    Sent(Sent),
    Done,
}

/// A sent reservation that owns its limiter (see [`Reservation::detach`]): settled
/// once, by value, when the answer ends; dropped unsettled, the estimate stays charged.
#[derive(Debug)]
pub struct Settlement {
    limiter: Arc<Limiter>,
    sent: Sent,
}

/// Whether the provider showed a token limit while the budget is off.
#[derive(Debug, Default)]
pub struct TokenSignals(AtomicU8);

/// What the request path reports about tokens to the controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum TokenEvent {
    /// The provider stated its limit, tokens per minute.
    Stated { limit_tpm: u64 },
    /// A 429 about tokens on a send dated `sent_at` of `cost` tokens (if known).
    Refused { sent_at: u64, cost: Option<u64> },
}
