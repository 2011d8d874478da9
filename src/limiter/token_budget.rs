//! The token budget of one limiter: never more than `L` tokens charged in any rolling
//! span (the window guard's `W + margin`), as estimated and settled at the sidecar,
//! with no lock. Named apart from the request bucket, whose "tokens" are requests.
//!
//! **Rule.** A reservation of `c` tokens at `now` succeeds iff (reservations not yet
//! sent + tokens charged to sends in the sub-windows overlapping `(now - span, now]`)
//! `<= L`, the reservation included; a reservation larger than `L` goes only into an
//! empty span (the caller refuses those at admission; this is for one parked before the
//! limit fell). A reservation is pending from admission until it is sent (its charge is
//! then dated at its send time, never earlier than the reservation) or given back.
//! Settlement sets the charge to what the provider counted (a raise is what admission
//! could not have known), dated as the provider dates it: at the send under `reserved`
//! (counted on arrival), at the answer's end under `actual` (counted then; a charge
//! moves there added first and taken from its send's sub-window after, `ring.rs`).
//!
//! **Increment-then-check**, as the window guard's sub-window counts: a reservation
//! adds itself to `pending` (Acquire) and only then reads the charges; a send adds its
//! charge to its sub-window's word and only then leaves `pending` (Release). Of any set
//! of concurrent reservations the last to add itself to `pending` sees every other one,
//! pending or charged, so no set of them can together pass the limit (at worst two of
//! them both refuse, and the dispatcher tries again). The charges per sub-window are
//! `ring.rs`; the oldest sub-window is counted whole, so a charge holds its room up to
//! `span / 62` longer than the span.
//!
//! **Why the guard's whole span.** A charge is dated at the send, as the guard dates a
//! request, and a `reserved` provider counts it on arrival: what separates the two
//! clocks is the same stamp-to-arrival skew the guard's margin is there for. A
//! token-specific allowance smaller than the guard's would need a bound on that skew
//! which the token path does not have. It costs the margin's share of the window (0.5 %
//! by default). (An `actual` charge, dated at the end the sidecar sees, needs none, but
//! while its answer runs it is dated at the send like the others.)
//!
//! **Why the oldest sub-window whole.** Counting it only until its latest charge leaves
//! is possible (a latest send time per word), and was measured on the issue 19 floods:
//! a provider 429 in 2 of 6 `reserved` runs and a rolling window over the limit in 2 of
//! 6 `actual` ones, none in as many runs with it whole. The room it holds (up to a
//! sub-window's charges, `span / 62` at most) is also what absorbs what admission cannot
//! see: estimates short of the provider's count until they settle (learned ratios aim
//! at the 95th percentile, not above every prompt).
//!
//! **Hold.** After a 429 about tokens, reservations are refused until the provider's
//! reset; the learned limit itself is the controller's (`learn.rs`), published here.
//!
//! **The head held for.** The dispatcher holds the budget for a waiter that has waited
//! a window and gives it a deadline to fit by (`Limiter::choose`); the budget keeps that
//! deadline, for the one head at a time, so it stays the one first given.
//!
//! The budget never reads a clock: every time is the caller's, in clock nanoseconds.

mod learn;
mod ring;

use std::time::Duration;

use crossbeam_utils::CachePadded;

pub use learn::{per_window_tokens, TokenChange, TokenLearner, TokenWhy};

use super::sync::{AtomicU64, Ordering};
use ring::Ring;

/// The shortest wait returned while only pending reservations stand in the way.
const MIN_PENDING_WAIT: u64 = 1_000_000;

/// A request's token cost as estimated before it is sent: the prompt, and the bound
/// on its completion (`max_tokens`, or the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    pub prompt: u64,
    pub completion: u64,
}

impl Cost {
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// The tokens a provider reports for an answer (`usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// How the provider charges a request (per-provider setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Charge {
    /// The prompt plus the completion bound, kept (OpenAI's way).
    #[default]
    Reserved,
    /// The prompt and completion used, reported afterwards (unused tokens go back).
    Actual,
}

impl Charge {
    /// What a request of `cost` is charged once its `usage` is known (`None`: the
    /// estimate stays).
    pub fn settled(self, cost: Cost, usage: Option<Usage>) -> u64 {
        match (usage, self) {
            (None, _) => cost.total(),
            (Some(u), Self::Reserved) => u.prompt.saturating_add(cost.completion),
            (Some(u), Self::Actual) => u.prompt.saturating_add(u.completion),
        }
    }
}

/// A reservation admitted and not yet sent: counted in `pending`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub cost: Cost,
    /// The time it was decided at (its charge is never dated earlier).
    pub at: u64,
    /// Cluster mode: the shared budget's lease its tokens were also taken from (0: none).
    pub lease: u32,
}

/// A reservation sent: its charge, and the sub-window it is recorded in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub cost: Cost,
    /// Tokens charged now (the estimate until settled).
    pub charged: u64,
    /// The time the charge is dated at.
    pub at: u64,
    /// As [`Reserved::lease`].
    pub lease: u32,
    sub: u64,
}

/// What a settlement did, for the proxy's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// Tokens reserved at admission.
    pub estimate: u64,
    /// Tokens charged after settlement (0: never sent, all given back).
    pub settled: u64,
}

/// The budget as metrics show it (tokens per window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenView {
    /// Allowed now: the lowest of the configured, stated and learned limits.
    pub limit: u64,
    /// Configured.
    pub ceiling: u64,
    /// Stated by the provider (headers or a 429's message), scaled to the window.
    pub stated: Option<u64>,
    /// The token cost of the requests waiting in the queues.
    pub waiting: u64,
    /// Tokens charged in the span, reservations not yet sent included.
    pub charged: u64,
    /// `limit - charged`, at least 0.
    pub remaining: u64,
    /// Token admission held until (clock nanoseconds; 0: not held).
    pub held_until: u64,
}

/// Never more than `limit` tokens in any rolling span; see the module doc.
#[derive(Debug)]
pub struct TokenBudget {
    span: u64,
    pending_wait: u64,
    limit: AtomicU64,
    /// Tokens reserved and not yet sent or given back.
    pending: CachePadded<AtomicU64>,
    ring: Ring,
    /// Token admission refused before this time (a 429 about tokens).
    hold_until: AtomicU64,
    /// The held head (its parking time) and the deadline it was given.
    head: [AtomicU64; 2],
    contention: AtomicU64,
}

impl TokenBudget {
    /// `limit` tokens per `span` (clock nanoseconds: the guard's window + margin);
    /// `pending_wait` is how long to wait while only pending reservations are in the way.
    pub fn new(limit: u64, span: u64, pending_wait: Duration) -> Self {
        let span = span.max(1);
        Self {
            span,
            pending_wait: (pending_wait.as_nanos() as u64).max(MIN_PENDING_WAIT),
            limit: AtomicU64::new(limit.max(1)),
            pending: CachePadded::new(AtomicU64::new(0)),
            ring: Ring::new(span),
            hold_until: AtomicU64::new(0),
            head: [AtomicU64::new(u64::MAX), AtomicU64::new(0)],
            contention: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> u64 {
        // Relaxed: each reservation reads the limit once and decides on that value.
        self.limit.load(Ordering::Relaxed)
    }

    /// Any value (at least 1). The charges stay: after a decrease nothing is reserved
    /// until the span holds less than the new limit.
    pub fn set_limit(&self, limit: u64) {
        // Relaxed: see `limit`.
        self.limit.store(limit.max(1), Ordering::Relaxed);
    }

    pub fn span_nanos(&self) -> u64 {
        self.span
    }

    /// Refuses reservations until `until` (the latest end wins).
    pub fn hold(&self, until: u64) {
        // Relaxed: a time compared alone.
        self.hold_until.fetch_max(until, Ordering::Relaxed);
    }

    pub fn held_until(&self) -> u64 {
        // Relaxed: as in `hold`.
        self.hold_until.load(Ordering::Relaxed)
    }

    /// The deadline of the head parked at `parked_at` the dispatcher holds the budget
    /// for: `deadline` the first time it asks about that head, the same answer after.
    pub fn head_deadline(&self, parked_at: u64, deadline: u64) -> u64 {
        // Relaxed: only the dispatcher reads and writes them, under the stage's lock.
        if self.head[0].load(Ordering::Relaxed) == parked_at {
            return self.head[1].load(Ordering::Relaxed);
        }
        self.head[0].store(parked_at, Ordering::Relaxed);
        self.head[1].store(deadline, Ordering::Relaxed);
        deadline
    }

    /// Reserves `cost` at `now`, or says how long until it could succeed if nothing
    /// else changes.
    #[inline]
    pub fn try_reserve(&self, cost: Cost, now: u64) -> Result<Reserved, Duration> {
        let held = self.held_until();
        if held > now {
            return Err(Duration::from_nanos(held - now));
        }
        let c = cost.total();
        let limit = self.limit();
        // Acquire: pairs with `send`'s Release, so the charges of every send that left
        // `pending` before this increment are visible to the reads that follow.
        let pending = self
            .pending
            .fetch_add(c, Ordering::Acquire)
            .saturating_add(c);
        let sum = self.ring.sum(now, self.span);
        // One larger than the whole budget needs an empty span.
        let need = pending - c + c.min(limit);
        if need.saturating_add(sum.charged) <= limit {
            return Ok(Reserved {
                cost,
                at: sum.at,
                lease: 0,
            });
        }
        // Relaxed: it publishes nothing; a reader that still counts it only refuses more.
        self.pending.fetch_sub(c, Ordering::Relaxed);
        Err(self.wait(sum.at, now, (need + sum.charged) - limit))
    }

    /// How long until charges leaving the span take `excess` off the count (the pending
    /// wait if they cannot: pending reservations stand in the way).
    fn wait(&self, at: u64, now: u64, excess: u64) -> Duration {
        Duration::from_nanos(match self.ring.until(at, excess) {
            Some(t) => t.saturating_sub(now).max(1),
            None => self.pending_wait,
        })
    }

    /// Zero when a reservation of `cost` would succeed at `now`, else its wait.
    pub fn wait_time(&self, cost: Cost, now: u64) -> Duration {
        let held = self.held_until();
        if held > now {
            return Duration::from_nanos(held - now);
        }
        let limit = self.limit();
        let c = cost.total();
        // Acquire: as in `try_reserve`.
        let pending = self.pending.load(Ordering::Acquire);
        let sum = self.ring.sum(now, self.span);
        let need = pending + c.min(limit) + sum.charged;
        if need <= limit {
            Duration::ZERO
        } else {
            self.wait(sum.at, now, need - limit)
        }
    }

    /// The reservation is sent at `sent_at`: its charge is dated then (or at the time
    /// it was decided at, if later).
    pub fn send(&self, r: Reserved, sent_at: u64) -> Sent {
        let c = r.cost.total();
        let at = sent_at.max(r.at);
        let sub = self.ring.charge(at, c, &self.contention);
        // Release: a reservation whose increment no longer counts this one as pending
        // sees its charge.
        self.pending.fetch_sub(c, Ordering::Release);
        Sent {
            cost: r.cost,
            charged: c,
            at,
            lease: r.lease,
            sub,
        }
    }

    /// Never sent: every token goes back at once.
    pub fn give_back(&self, r: Reserved) {
        // Relaxed: as a refused reservation's.
        self.pending.fetch_sub(r.cost.total(), Ordering::Relaxed);
    }

    /// Settles a sent charge whose answer ended at `end`: what `charge` makes of `usage`
    /// (the estimate without it). Under `reserved` it stays where it was dated (the
    /// provider counted it on arrival); under `actual` it moves to `end` (the provider
    /// counts it when the answer ends, which the sidecar sees no earlier). Returns the
    /// tokens charged now.
    pub fn settle(&self, s: &mut Sent, charge: Charge, usage: Option<Usage>, end: u64) -> u64 {
        let charged = charge.settled(s.cost, usage);
        match charge {
            Charge::Reserved => {
                let delta = i128::from(charged) - i128::from(s.charged);
                let delta =
                    i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
                self.ring.adjust(s.sub, delta);
            }
            Charge::Actual => {
                let at = end.max(s.at);
                s.sub = self
                    .ring
                    .moved(s.sub, s.charged, at, charged, &self.contention);
                s.at = at;
            }
        }
        s.charged = charged;
        charged
    }

    /// Tokens the provider counted that the sidecar did not: charged at `now`.
    pub fn charge_extra(&self, tokens: u64, now: u64) {
        if tokens > 0 {
            self.ring.charge(now, tokens, &self.contention);
        }
    }

    /// Tokens charged to sends dated in `(at - span, at]` (whole sub-windows; pending
    /// reservations not counted).
    pub fn charged_in(&self, at: u64, span: u64) -> u64 {
        self.ring.sum(at, span).charged
    }

    /// Room left at `at` (a later time) if nothing more is reserved or sent until then:
    /// the limit less what is pending and the charges that still count then.
    pub fn room_at(&self, at: u64) -> u64 {
        let charged = self.pending() + self.ring.sum(at, self.span).charged;
        self.limit().saturating_sub(charged)
    }

    /// Reserved and not yet sent.
    pub fn pending(&self) -> u64 {
        // Relaxed: a view.
        self.pending.load(Ordering::Relaxed)
    }

    pub fn view(&self, now: u64) -> TokenView {
        let limit = self.limit();
        let charged = self.pending() + self.charged_in(now, self.span);
        TokenView {
            limit,
            charged,
            remaining: limit.saturating_sub(charged),
            held_until: self.held_until(),
            ..TokenView::default()
        }
    }

    /// CAS retries on the sub-window words (evidence for stress tests).
    #[doc(hidden)]
    pub fn contention(&self) -> u64 {
        // Relaxed: a statistic.
        self.contention.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
