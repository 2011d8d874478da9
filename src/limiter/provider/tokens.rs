//! The limiter's token budget, as the proxy sees it: the reservation a request carries
//! from admission to settlement, what answers teach the budget, and its views.
//!
//! **A reservation** ([`Reservation`]) is made by admission (the fast path, or the
//! dispatcher's grant) and travels in the [`Permit`](super::Permit). It is dated when
//! the request is written upstream and settled once, by value, when the answer ends:
//! [`Reservation::settle`] (under `actual`, the charge moves to the answer's end). Dropped
//! unsent, it gives every token back at once; dropped sent and unsettled, the estimate
//! stays charged where it was sent.
//!
//! **Answers.** A 429 about tokens holds token admission until the provider's reset
//! (requests without a token cost still go; the request rate is not touched) and goes to
//! the controller, which learns the token limit down (`token_budget/learn.rs`). A stated
//! `x-ratelimit-limit-tokens` caps the limit; a `x-ratelimit-remaining-tokens` below the
//! sidecar's own view means the provider counted more: the difference is charged now.
//! With the budget off, these signals are only remembered ([`TokenSignals`]), so the
//! proxy can suggest the setting once, and a token 429 pauses admission as before.

use std::sync::atomic::Ordering as StdOrdering;
use std::sync::Arc;

use super::{Limiter, Reservation, Settlement, State, TokenEvent, TokenSignals};
use crate::clock::nanos;
use crate::limiter::control::{Control, Note};
use crate::limiter::lease::{LeasePot, Mode};
use crate::limiter::signal::Answer;
use crate::limiter::token_budget::{
    per_window_tokens, Charge, Cost, Reserved, Sent, Settled, TokenBudget, TokenLearner, TokenView,
    Usage,
};
use crate::limiter::token_lease::TokenReport;

impl<'a> Reservation<'a> {
    pub(super) fn new(limiter: &'a Limiter, r: Reserved) -> Self {
        Self {
            limiter,
            state: State::Reserved(r),
        }
    }

    fn budget(&self) -> &'a TokenBudget {
        // A reservation exists only where the budget does.
        self.limiter
            .tokens
            .as_ref()
            .expect("a reservation comes from a token budget")
    }

    /// The cost estimated at admission.
    pub fn cost(&self) -> Cost {
        match self.state {
            State::Reserved(r) => r.cost,
            State::Sent(s) => s.cost,
            State::Done => Cost::default(),
        }
    }

    /// When its charge is dated (`None`: not sent yet).
    pub fn sent_at(&self) -> Option<u64> {
        match self.state {
            State::Sent(s) => Some(s.at),
            _ => None,
        }
    }

    /// The request is being written upstream now: the charge is dated now (or when it
    /// was reserved, if later). Once; later calls change nothing.
    pub fn stamp(&mut self, now: u64) {
        if let State::Reserved(r) = self.state {
            self.state = State::Sent(self.budget().send(r, now));
            if let Some(pot) = self.limiter.lease.as_deref() {
                pot.token_pot.sent(r.lease, r.cost.total(), now);
            }
        }
    }

    /// The answer ended at `now`: the charge becomes what the provider counts
    /// (`charge`) from its `usage` (`None`: the estimate stays), dated as the provider
    /// dates it ([`TokenBudget::settle`]). Never sent, every token goes back (settled 0).
    pub fn settle(mut self, usage: Option<Usage>, charge: Charge, now: u64) -> Settled {
        let state = std::mem::replace(&mut self.state, State::Done);
        match state {
            State::Reserved(r) => {
                self.give_back(r);
                Settled {
                    estimate: r.cost.total(),
                    settled: 0,
                }
            }
            State::Sent(mut s) => self.limiter.settle_sent(&mut s, usage, charge, now),
            State::Done => Settled::default(),
        }
    }

    fn give_back(&self, r: Reserved) {
        self.limiter.give_back_tokens(Some(r));
        self.limiter.wake_if_waiting();
    }
}

impl Reservation<'_> {
    /// The sent reservation, carried past the request's borrow of its limiter (by the
    /// answer's body, which outlives the request): `limiter` is the one it came from.
    /// `None` when it was never sent (every token then goes back) or already settled.
    pub fn detach(mut self, limiter: Arc<Limiter>) -> Option<Settlement> {
        debug_assert!(std::ptr::eq(self.limiter, &*limiter), "its own limiter");
        match std::mem::replace(&mut self.state, State::Done) {
            State::Sent(sent) => Some(Settlement { limiter, sent }),
            State::Reserved(r) => {
                self.give_back(r);
                None
            }
            State::Done => None,
        }
    }
}

impl Settlement {
    /// The cost estimated at admission.
    pub fn cost(&self) -> Cost {
        self.sent.cost
    }

    /// As [`Reservation::settle`] for a sent reservation.
    pub fn settle(mut self, usage: Option<Usage>, charge: Charge, now: u64) -> Settled {
        self.limiter.settle_sent(&mut self.sent, usage, charge, now)
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let State::Reserved(r) = self.state {
            self.give_back(r);
        }
    }
}

const UNSEEN: u8 = 0;
const SEEN: u8 = 1;
const TOLD: u8 = 2;

impl TokenSignals {
    fn saw(&self) {
        // Relaxed: a flag read alone; read first so the usual answer writes nothing.
        if self.0.load(StdOrdering::Relaxed) == UNSEEN {
            let _ =
                self.0
                    .compare_exchange(UNSEEN, SEEN, StdOrdering::Relaxed, StdOrdering::Relaxed);
        }
    }

    /// Token headers or a token 429 were seen.
    pub fn seen(&self) -> bool {
        self.0.load(StdOrdering::Relaxed) != UNSEEN
    }

    /// `true` once, the first time it is asked after they were seen (to log it once).
    pub fn take_first(&self) -> bool {
        self.0
            .compare_exchange(SEEN, TOLD, StdOrdering::Relaxed, StdOrdering::Relaxed)
            .is_ok()
    }
}

impl Limiter {
    /// Gives this limiter a token budget of `per_window` tokens per window (the
    /// per-minute setting scaled to the window by the caller), counted over the window
    /// guard's span.
    pub fn with_token_budget(mut self, per_window: u64) -> Self {
        let span = self.guard.span_nanos();
        let margin = span.saturating_sub(nanos(self.pacing.window));
        self.tokens = Some(TokenBudget::new(
            per_window,
            span,
            std::time::Duration::from_nanos(margin / 4),
        ));
        self.control.lock().tokens = Some(TokenLearner::new(
            per_window,
            self.pacing.window,
            self.pacing.probe_interval,
        ));
        self
    }

    /// The token budget, when one is configured.
    pub fn token_budget(&self) -> Option<&TokenBudget> {
        self.tokens.as_ref()
    }

    /// Whether the provider showed a token limit (headers, 429s) while the budget is off.
    pub fn token_signals(&self) -> &TokenSignals {
        &self.token_signals
    }

    /// Settles a sent reservation ended at `now`: the charge where the budget dates it,
    /// and in cluster mode the change reported against the lease its tokens came from.
    /// Under `actual` the provider counts the charge at the answer's end; an end past
    /// the lease's time moves it in the shared log too (counted again from the end,
    /// taken from the lease), as the budget moves it here.
    fn settle_sent(&self, s: &mut Sent, usage: Option<Usage>, charge: Charge, now: u64) -> Settled {
        let estimate = s.cost.total();
        let settled = match &self.tokens {
            Some(b) => b.settle(s, charge, usage, now),
            None => charge.settled(s.cost, usage),
        };
        if let Some(pot) = &self.lease {
            let clamp = |d: i128| d.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
            let mut delta = i128::from(settled) - i128::from(estimate);
            if charge == Charge::Actual
                && usage.is_some()
                && pot.token_pot.sent(s.lease, settled, now)
            {
                delta -= i128::from(settled);
            }
            pot.token_pot.adjust(s.lease, clamp(delta));
        }
        if settled < estimate {
            self.wake_if_waiting();
        }
        Settled { estimate, settled }
    }

    pub(super) fn wake_if_waiting(&self) {
        if !self.queues.is_empty() {
            self.wake_dispatcher();
        }
    }

    /// The token headers of an answer: a stated limit goes to the controller; a
    /// remaining count below the sidecar's view is charged now.
    pub(super) fn observe_tokens(&self, now: u64, answer: &Answer) {
        let Some(t) = answer.quota.and_then(|q| q.tokens) else {
            return;
        };
        let Some(budget) = &self.tokens else {
            self.token_signals.saw();
            return;
        };
        if let Some(tpm) = t.limit_tpm {
            // Relaxed: deduplication only, as the request limit's.
            if self.token_header_limit.load(StdOrdering::Relaxed) != tpm
                && self.token_header_limit.swap(tpm, StdOrdering::Relaxed) != tpm
            {
                self.report_tokens(TokenEvent::Stated { limit_tpm: tpm });
                if let Some(pot) = self.shared_tokens() {
                    pot.report_tokens(TokenReport::Stated {
                        per_window: per_window_tokens(tpm, self.pacing.window),
                    });
                }
            }
        }
        let limit_tpm = t
            .limit_tpm
            .or_else(|| Some(self.token_header_limit.load(StdOrdering::Relaxed)))
            .filter(|&n| n > 0);
        if let (Some(limit), Some(remaining)) = (limit_tpm, t.remaining) {
            // The provider's figures are per minute: what it counted, scaled to the window.
            let counted = limit.saturating_sub(remaining);
            if counted > 0 {
                let window = self.pacing.window;
                let used = per_window_tokens(counted, window);
                let ours = budget.charged_in(now, nanos(window));
                if used > ours {
                    budget.charge_extra(used - ours, now);
                }
            }
        }
    }

    /// A 429 about tokens (see the module doc); `false` when the budget is off and the
    /// request rules take it.
    pub(super) fn learn_tokens(
        &self,
        now: u64,
        sent_at: u64,
        cost: Option<u64>,
        answer: &Answer,
    ) -> bool {
        let Some(budget) = &self.tokens else {
            self.token_signals.saw();
            return false;
        };
        let stated = answer.token_refusal;
        if let Some(tpm) = stated.and_then(|s| s.limit_tpm) {
            self.report_tokens(TokenEvent::Stated { limit_tpm: tpm });
        }
        if stated.is_some_and(|s| s.too_large) {
            // This request never fits; the budget is not spent.
            return true;
        }
        let wait = answer
            .retry_after
            .or_else(|| stated.and_then(|s| s.try_again))
            .or_else(|| answer.quota.and_then(|q| q.tokens).and_then(|t| t.reset))
            .unwrap_or(self.default_pause);
        budget.hold(now.saturating_add(nanos(wait)));
        if let Some(pot) = self.shared_tokens() {
            pot.report_tokens(TokenReport::Refused {
                stated: stated
                    .and_then(|s| s.limit_tpm)
                    .map(|tpm| per_window_tokens(tpm, self.pacing.window)),
                hold: Some(wait),
            });
        }
        if stated.and_then(|s| s.limit_tpm).is_none() {
            self.report_tokens(TokenEvent::Refused { sent_at, cost });
        }
        true
    }

    fn report_tokens(&self, ev: TokenEvent) {
        self.token_inbox.push(ev);
        self.wake_dispatcher();
    }

    /// The controller's part: applies token events and publishes the token limit.
    pub(super) fn control_tokens(&self, c: &mut Control, now: u64, note: &mut dyn FnMut(Note)) {
        let (Some(budget), Some(learner)) = (&self.tokens, c.tokens.as_mut()) else {
            while self.token_inbox.pop().is_some() {}
            return;
        };
        while let Some(ev) = self.token_inbox.pop() {
            let change = match ev {
                TokenEvent::Stated { limit_tpm } => learner.on_stated(limit_tpm),
                TokenEvent::Refused { sent_at, cost } => {
                    let charged = budget.charged_in(sent_at, nanos(self.pacing.window));
                    learner.on_refused(charged, cost, now)
                }
            };
            if let Some(ch) = change {
                note(Note::Tokens(ch));
            }
        }
        // Relaxed read of the queues' token cost: a hint, as the request side's demand.
        if let Some(ch) = learner.tick(now, self.queues.waiting_cost() > 0) {
            note(Note::Tokens(ch));
        }
        let limit = self.capped_tokens(learner.limit());
        if budget.limit() != limit {
            budget.set_limit(limit);
            self.wake_dispatcher();
        }
    }

    /// A new configured token limit (tokens per window) at run time (a limiter made
    /// without a budget stays without one).
    pub fn set_token_limit(&self, per_window: u64) {
        for (_, m) in self.models() {
            m.set_token_limit(per_window);
        }
        let mut c = self.control.lock();
        if let (Some(l), Some(b)) = (c.tokens.as_mut(), &self.tokens) {
            l.set_ceiling(per_window);
            b.set_limit(self.capped_tokens(l.limit()));
            self.wake_dispatcher();
        }
    }

    /// Cluster mode: the most tokens per window the shared budget lets this replica
    /// charge (the cluster's limit while shared, its share of it on fallback); `None`
    /// lifts the cap. Below what this limiter learned, it is the limit.
    pub fn set_token_cap(&self, cap: Option<u64>) {
        // Relaxed: read under the controller's lock, which publishes the limit.
        self.token_cap
            .store(cap.unwrap_or(u64::MAX), StdOrdering::Relaxed);
        let c = self.control.lock();
        if let (Some(l), Some(b)) = (c.tokens.as_ref(), &self.tokens) {
            b.set_limit(self.capped_tokens(l.limit()));
            self.wake_dispatcher();
        }
    }

    /// Cluster mode: the shared budget holds token admission until `until` (a token
    /// 429 another replica had).
    pub fn hold_tokens(&self, until: u64) {
        if let Some(b) = &self.tokens {
            if until > b.held_until() {
                b.hold(until);
            }
        }
    }

    pub(super) fn capped_tokens(&self, limit: u64) -> u64 {
        limit.min(self.token_cap.load(StdOrdering::Relaxed))
    }

    /// The shared budget's token pot, when the cluster keeps a token budget and this
    /// replica uses it now.
    fn shared_tokens(&self) -> Option<&LeasePot> {
        self.lease
            .as_deref()
            .filter(|p| p.mode() == Mode::Shared && p.token_pot.enabled())
    }

    /// How long until a request of `cost` would fit the token budget (zero when it
    /// does now, when it has no cost, or when the budget is off): for the proxy's
    /// estimate of a parked request's wait, beside [`Limiter::expected_wait`].
    pub fn token_wait(&self, cost: Option<Cost>, now: u64) -> std::time::Duration {
        match (cost, &self.tokens) {
            (Some(c), Some(b)) => b.wait_time(c, now),
            _ => std::time::Duration::ZERO,
        }
    }

    /// The token budget for metrics (`None`: off): the limit, what is charged in the
    /// span and what remains, and the token cost of the requests waiting.
    pub fn token_view(&self, now: u64) -> Option<TokenView> {
        let b = self.tokens.as_ref()?;
        let (ceiling, stated) = {
            let c = self.control.lock();
            c.tokens
                .as_ref()
                .map_or((0, None), |l| (l.ceiling(), l.stated()))
        };
        Some(TokenView {
            ceiling,
            stated,
            waiting: self.queues.waiting_cost(),
            ..b.view(now)
        })
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;
