//! The controller step of a limiter, and everything that feeds it or reads it.
//!
//! The request path reports each upstream answer ([`Limiter::on_answer`]): it counts
//! it, pauses admission at once on a refusal or a spent quota, and leaves an
//! [`Event`] in the inbox (or, in cluster mode, for the shared budget). The dispatcher
//! runs [`Limiter::control`]: it drains the inbox into the learner and the retreat under
//! the controller's mutex and publishes the guard's limit and the bucket's rate. Admin
//! changes (rate, forget, restore, the cluster's pacing) take the same mutex and publish
//! the same way; the views copy the state out for metrics and the dashboard. The state
//! and the messages themselves are in `limiter/control.rs`.

use std::sync::atomic::Ordering as StdOrdering;

use super::Limiter;
use crate::clock::nanos;
use crate::limiter::control::{ClusterPacing, Control, Event, Note, PacingView, PauseReason};
use crate::limiter::learn::{self, per_window, Change};
use crate::limiter::retreat::RetreatView;
use crate::limiter::signal::{Answer, Refusal};

impl Limiter {
    /// What the upstream answered to a limited request sent at `sent_at` as the
    /// `count`-th of its window: [`Self::observe`] then [`Self::learn`].
    pub fn on_answer(&self, now: u64, sent_at: u64, count: u32, answer: &Answer) {
        self.on_answer_with_tokens(now, sent_at, count, None, answer);
    }

    /// [`Self::on_answer`] for a request that reserved `tokens` (its estimate, or its
    /// charge once settled): a 429 about tokens then learns the limit from what its
    /// window held before it.
    pub fn on_answer_with_tokens(
        &self,
        now: u64,
        sent_at: u64,
        count: u32,
        tokens: Option<u64>,
        answer: &Answer,
    ) {
        self.observe(now, answer);
        self.learn_costed(now, sent_at, count, tokens, answer);
    }

    /// Counts an upstream answer, and takes what its rate-limit headers say: a stated
    /// limit goes to the controller, a spent quota pauses admission until its reset.
    pub fn observe(&self, now: u64, answer: &Answer) {
        self.answers.on_response(now);
        if matches!(
            answer.refusal,
            Some(Refusal::RateLimit | Refusal::Tokens | Refusal::Concurrency)
        ) {
            self.answers.on_429(now);
        }
        self.observe_tokens(now, answer);
        let Some(q) = answer.quota else { return };
        if let Some(rpm) = q.limit_rpm {
            // Relaxed: deduplication only; the controller keeps the truth.
            // Read first: the same figure on every answer writes nothing (no shared
            // cache line bounced between workers).
            if self.header_limit.load(StdOrdering::Relaxed) != rpm
                && self.header_limit.swap(rpm, StdOrdering::Relaxed) != rpm
            {
                self.report(Event::HeaderLimit { limit_rpm: rpm });
            }
        }
        if let (Some(0), Some(reset), None) = (q.remaining, q.reset, answer.refusal) {
            self.pause(now.saturating_add(nanos(reset)), PauseReason::Quota);
            if let Some(pot) = &self.lease {
                pot.report(Event::QuotaSpent { reset });
            }
        }
    }

    /// What an answer teaches about the limit: a success proves its count; a refusal
    /// pauses admission at once (its `Retry-After`, or the default pause) and goes to
    /// the controller.
    pub fn learn(&self, now: u64, sent_at: u64, count: u32, answer: &Answer) {
        self.learn_costed(now, sent_at, count, None, answer);
    }

    /// [`Self::learn`] for a request that reserved `tokens` here (a model's limiter,
    /// when limits are per model).
    pub fn learn_costed(
        &self,
        now: u64,
        sent_at: u64,
        count: u32,
        tokens: Option<u64>,
        answer: &Answer,
    ) {
        if answer.refusal == Some(Refusal::Tokens)
            && self.learn_tokens(now, sent_at, tokens, answer)
        {
            // The token budget's: the request rate is not touched.
            return;
        }
        let Some(kind) = answer.refusal else {
            // Refused sends still in the window are in `count` but not in the
            // provider's; Relaxed: both are hints the controller reads a tick later.
            let admitted = count.saturating_sub(self.refused_in_span.load(StdOrdering::Relaxed));
            if answer.ok && self.proven.load(StdOrdering::Relaxed) < admitted {
                self.proven.fetch_max(admitted, StdOrdering::Relaxed);
            }
            return;
        };
        let pause = now.saturating_add(nanos(answer.retry_after.unwrap_or(self.default_pause)));
        match kind {
            Refusal::Billing => return,
            Refusal::RateLimit | Refusal::Tokens => self.pause(pause, PauseReason::RetryAfter),
            Refusal::Concurrency | Refusal::Overload => self.pause(pause, PauseReason::Overload),
        }
        self.report(Event::Refused {
            at: now,
            sent_at,
            count,
            kind,
            retry_after: answer.retry_after,
        });
    }

    /// To the shared budget in cluster mode, else to the local controller.
    fn report(&self, ev: Event) {
        match &self.lease {
            Some(pot) => pot.report(ev),
            None => {
                self.inbox.push(ev);
                self.wake_dispatcher();
            }
        }
    }

    /// Cluster mode: the pacing the shared budget decided (`None`: back to the local
    /// learner). Published at once.
    pub fn set_cluster(&self, pacing: Option<ClusterPacing>, now: u64) {
        let mut c = self.control.lock();
        if c.cluster == pacing {
            return;
        }
        c.cluster = pacing;
        self.publish(&mut c, now);
    }

    /// Runs the controller at `now`: applies what the request path reported, starts and
    /// ends probes, advances retreat recovery, and publishes the limit and rate.
    /// Reports what is worth a log line to `note`. Called by the dispatcher.
    pub fn control(&self, now: u64, note: &mut dyn FnMut(Note)) {
        let mut c = self.control.lock();
        while let Some(ev) = self.inbox.pop() {
            self.apply(&mut c, ev, note);
        }
        self.control_tokens(&mut c, now, note);
        let window = nanos(self.pacing.window);
        let demand_at = self.demand_at.load(StdOrdering::Relaxed);
        let demand = demand_at != 0 && now.saturating_sub(demand_at - 1) < window;
        c.forget_refused_before(now, self.guard.span_nanos());
        self.refused_in_span
            .store(c.refused.len() as u32, StdOrdering::Relaxed);
        // Sends over the guard's span (what it paces: `limit` per span), less refusals:
        // a probe that ends without a 429 proves that many per span safe.
        let sent = self
            .guard
            .sent_in(now, self.guard.span_nanos())
            .saturating_sub(self.refused_in_span.load(StdOrdering::Relaxed));
        // In cluster mode the shared budget learns and retreats for every replica.
        if c.cluster.is_none() {
            if let Some(ch) = c.learner.tick(now, demand, sent) {
                self.changed(&mut c, ch, note);
            }
            if let Some(t) = c.retreat.tick(now) {
                note(Note::Retreat(t));
            }
        }
        let until = self.pause_until.load(StdOrdering::Relaxed);
        if until > now && until > c.logged_pause {
            c.logged_pause = until;
            if let Some(reason) = PauseReason::from_u8(self.pause_reason.load(StdOrdering::Relaxed))
            {
                note(Note::Pause { reason, until, now });
            }
        }
        self.publish(&mut c, now);
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

    fn apply(&self, c: &mut Control, ev: Event, note: &mut dyn FnMut(Note)) {
        match ev {
            Event::HeaderLimit { limit_rpm } => {
                if let Some(ch) = c.learner.on_header_limit(limit_rpm) {
                    self.changed(c, ch, note);
                }
            }
            Event::Refused {
                at,
                sent_at,
                count,
                kind,
                ..
            } => match kind {
                Refusal::RateLimit => {
                    let span = self.guard.span_nanos();
                    let empty_at = self.guard.newest().map_or(at, |t| t.saturating_add(span));
                    // What the provider saw: the sends stamped in the window (not the
                    // guard's span, which is longer by the margin) up to this one, less
                    // those it refused (the guard counts them: safe whether or not the
                    // provider does; learning must not).
                    let window = nanos(self.pacing.window);
                    let seen = self.guard.sent_in(sent_at, window).clamp(1, count.max(1));
                    let before = c
                        .refused
                        .iter()
                        .filter(|&&t| t < sent_at && t.saturating_add(window) > sent_at)
                        .count();
                    let admitted = seen.saturating_sub(u32::try_from(before).unwrap_or(u32::MAX));
                    c.note_refused(sent_at, at, span);
                    self.refused_in_span
                        .store(c.refused.len() as u32, StdOrdering::Relaxed);
                    let proven = self.proven.load(StdOrdering::Relaxed);
                    let r = c
                        .learner
                        .on_refused(at, sent_at, admitted.max(1), proven, empty_at);
                    if let Some(until) = r.pause_until {
                        self.pause(until, PauseReason::Window);
                    }
                    if let Some(ch) = r.change {
                        self.changed(c, ch, note);
                    }
                }
                Refusal::Concurrency | Refusal::Overload => {
                    if let Some(t) = c.retreat.on_refusal(at) {
                        note(Note::Retreat(t));
                    }
                }
                Refusal::Tokens => note(Note::TokenLimit),
                Refusal::Billing => {}
            },
            // Already applied by the request path.
            Event::QuotaSpent { .. } => {}
        }
    }

    fn changed(&self, c: &mut Control, ch: Change, note: &mut dyn FnMut(Note)) {
        c.changes += 1;
        // What was proven held under the old limit.
        self.proven.store(0, StdOrdering::Relaxed);
        note(Note::Limit(ch));
    }

    /// Gives the guard and the bucket what the state implies, if it changed.
    fn publish(&self, c: &mut Control, now: u64) {
        let targets = c.targets();
        if c.published == Some(targets) {
            return;
        }
        let (limit, rpm, capacity) = targets;
        self.guard.set_limit(limit);
        self.bucket.set_rate(rpm, capacity, now);
        c.published = Some(targets);
        self.wake_dispatcher();
    }

    /// Changes the configured rate (the ceiling) and capacity at run time: what was
    /// learned is kept, capped by the new ceiling; the bucket keeps its tokens.
    pub fn set_rate(&self, rate_rpm: f64, capacity: u32, now: u64) -> Option<Change> {
        if let Some(models) = &self.models {
            models.set_rate(rate_rpm, capacity);
            for (_, m) in models.all() {
                m.set_rate(rate_rpm, capacity, now);
            }
        }
        let mut c = self.control.lock();
        c.ceiling_rpm = rate_rpm;
        c.capacity = capacity;
        let ch = c
            .learner
            .set_ceiling(per_window(rate_rpm, self.pacing.window));
        if let Some(ch) = ch {
            self.changed(&mut c, ch, &mut |_| {});
        }
        self.publish(&mut c, now);
        ch
    }

    /// Forgets what was learned: back to the configured rate.
    pub fn forget(&self, now: u64) -> Option<Change> {
        for (_, m) in self.models() {
            m.forget(now);
        }
        let mut c = self.control.lock();
        let ch = c.learner.forget(now);
        self.header_limit.store(0, StdOrdering::Relaxed);
        if let (Some(l), Some(b)) = (c.tokens.as_mut(), &self.tokens) {
            l.forget();
            b.set_limit(self.capped_tokens(l.limit()));
            self.token_header_limit.store(0, StdOrdering::Relaxed);
        }
        if let Some(ch) = ch {
            self.changed(&mut c, ch, &mut |_| {});
        }
        self.publish(&mut c, now);
        ch
    }

    /// A learned limit from before a restart.
    pub fn restore(&self, learned: u32, now: u64) -> Option<Change> {
        let mut c = self.control.lock();
        let ch = c.learner.restore(learned);
        if let Some(ch) = ch {
            self.changed(&mut c, ch, &mut |_| {});
        }
        self.publish(&mut c, now);
        ch
    }

    /// Pacing state for metrics, the dashboard and the admin view.
    pub fn pacing_view(&self, now: u64) -> PacingView {
        let c = self.control.lock();
        let until = self.pause_until.load(StdOrdering::Relaxed);
        let pause = (until > now)
            .then(|| PauseReason::from_u8(self.pause_reason.load(StdOrdering::Relaxed)))
            .flatten()
            .map(|r| (r, until));
        let window = self.pacing.window;
        if let Some(p) = &c.cluster {
            return PacingView {
                window,
                limit: p.limit,
                learned: p.learned,
                ceiling: c.learner.ceiling(),
                learned_rpm: if p.learned == 0 {
                    c.ceiling_rpm
                } else {
                    learn::rpm_of(p.learned, window).min(c.ceiling_rpm)
                },
                ceiling_rpm: c.ceiling_rpm,
                source: p.source,
                probing: p.probing,
                next_probe_at: None,
                relearning: false,
                pause,
                sent_in_window: self.guard.sent_in(now, nanos(window)),
                retreat_state: p.retreat_state,
                retreat_factor: p.retreat_factor,
                changes: p.changes,
            };
        }
        PacingView {
            window,
            limit: c.learner.limit(),
            learned: c.learner.learned(),
            ceiling: c.learner.ceiling(),
            learned_rpm: learn::rpm_of(c.learner.learned(), window).min(c.ceiling_rpm),
            ceiling_rpm: c.ceiling_rpm,
            source: c.learner.source(),
            probing: c.learner.probing(),
            next_probe_at: c.learner.next_probe_at(),
            relearning: c.learner.relearning(),
            pause,
            sent_in_window: self.guard.sent_in(now, nanos(window)),
            retreat_state: c.retreat.state(),
            retreat_factor: c.retreat.factor(),
            changes: c.changes,
        }
    }

    /// Retreat state and answer counts, for metrics and the dashboard.
    pub fn retreat_view(&self, now: u64) -> RetreatView {
        let (state, entered, ceiling_rpm, paced_rpm) = {
            let c = self.control.lock();
            let paced = c.published.map_or(c.ceiling_rpm, |(_, rpm, _)| rpm);
            let state = c
                .cluster
                .as_ref()
                .map_or(c.retreat.state(), |p| p.retreat_state);
            (state, c.retreat.entered(), c.ceiling_rpm, paced)
        };
        let (c429, all, rate) = self.answers.last_minute(now);
        RetreatView {
            state,
            base_rpm: ceiling_rpm,
            // The rate published, not the bucket's (rebuilt from nanoseconds per token).
            effective_rpm: paced_rpm,
            upstream_429_last_minute: c429,
            responses_last_minute: all,
            rate_429: rate,
            entered,
        }
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
