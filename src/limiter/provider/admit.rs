//! Admission, as the request path and the dispatcher use it: the fast path (a token
//! and a window slot when nobody waits, one CAS each, and the token cost when the
//! limiter has a token budget), parking behind those already waiting, the dispatcher's
//! grants in priority order, refunds of unused claims, and how long a request would wait.
//!
//! A token comes from the local bucket, or in cluster mode from the lease pot while it
//! is shared (the local bucket again in fallback, none when isolated); the window guard
//! must have room as well, or the token goes back.
//!
//! **Token costs in the queue.** The dispatcher grants the highest priority first. Within
//! it the head goes first; if its cost does not fit the token budget yet, a request
//! behind it whose cost fits may pass. Once the head has waited one window the budget
//! that frees up is its own: it is given a deadline (when it could fit then, plus a
//! tenth of the window), and only a request that still lets it fit by then may pass
//! (`choose`). A request whose cost is larger than the whole budget of a window is
//! refused at admission, or by the dispatcher when the limit falls below it while it
//! waits.

use std::sync::atomic::Ordering as StdOrdering;
use std::time::Duration;

use super::{Decision, Limiter};
use crate::clock::nanos;
use crate::limiter::guard::Claim;
use crate::limiter::lease::{LeasePot, Mode};
use crate::limiter::queue::{Grant, QueueFull, Stage, Ticket};
use crate::limiter::token_budget::{Cost, Reserved};
use crate::priority::Priority;

/// How many waiters of one priority the dispatcher looks at for one that fits the token
/// budget while the head does not.
const LOOK_PAST: usize = 64;

/// What admission found short.
enum Short {
    Requests,
    Tokens,
}

const LEASE_POLL: Duration = Duration::from_millis(100);

impl Limiter {
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
                if self.pause_until.load(StdOrdering::Relaxed) > now {
                    return None;
                }
                let lease = pot.try_take(now)?;
                match self.guard.try_claim(now) {
                    Ok(c) => Some(Claim { lease, ..c }),
                    Err(_) => {
                        pot.put_back(lease);
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

    /// Time until both a token and a window slot are free (zero if they are now); the
    /// token budget is not counted.
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

    /// Admits a request of token `cost` (`None`: none counted) at `now`, parks it, or
    /// refuses it. Without a token budget the cost is ignored.
    #[inline]
    pub fn admit(&self, priority: Priority, cost: Option<Cost>, now: u64) -> Decision {
        if let Some(pot) = &self.lease {
            pot.offer();
            if pot.mode() == Mode::Isolated {
                return Decision::Isolated;
            }
        }
        let cost = match (cost, &self.tokens) {
            (Some(c), Some(b)) => {
                let limit = b.limit();
                if c.total() > limit {
                    return Decision::TooLarge {
                        limit,
                        estimate: c.total(),
                    };
                }
                Some(c)
            }
            _ => None,
        };
        if self.queues.is_empty() {
            match self.try_grant(cost, now) {
                Ok(g) => return Decision::Admitted(g),
                Err(Short::Requests) => self.note_demand(now),
                Err(Short::Tokens) => {}
            }
        } else {
            self.note_demand(now);
        }
        match self.queues.park(priority, false, cost, now) {
            Ok(ticket) => {
                self.wake_dispatcher();
                Decision::Queued(ticket)
            }
            Err(full) => Decision::Full(full),
        }
    }

    /// The token cost reserved, then a token and a window slot, at `now`; what was short
    /// otherwise (nothing is kept).
    #[inline]
    fn try_grant(&self, cost: Option<Cost>, now: u64) -> Result<Grant, Short> {
        let tokens = match (cost, &self.tokens) {
            (Some(c), Some(b)) => Some(b.try_reserve(c, now).map_err(|_| Short::Tokens)?),
            _ => None,
        };
        match self.try_take(now) {
            Some(claim) => {
                let mut tokens = tokens;
                if !self.take_leased_tokens(&mut tokens, now) {
                    self.give_back(Grant { claim, tokens }, now);
                    return Err(Short::Tokens);
                }
                Ok(Grant { claim, tokens })
            }
            None => {
                self.give_back_tokens(tokens);
                Err(Short::Requests)
            }
        }
    }

    /// Cluster mode, when the shared budget keeps a token budget: `r`'s cost taken from
    /// the leased tokens as well, its lease noted in it. `false`: the pot is short (its
    /// task is asked for more and wakes the dispatcher when they come).
    #[inline]
    fn take_leased_tokens(&self, r: &mut Option<Reserved>, now: u64) -> bool {
        let (Some(pot), Some(r)) = (&self.lease, r.as_mut()) else {
            return true;
        };
        if pot.mode() != Mode::Shared || !pot.token_pot.enabled() {
            return true;
        }
        match pot.take_tokens(r.cost.total(), now) {
            Some(lease) => {
                r.lease = lease;
                true
            }
            None => false,
        }
    }

    pub(super) fn give_back_tokens(&self, tokens: Option<Reserved>) {
        if let (Some(r), Some(b)) = (tokens, &self.tokens) {
            b.give_back(r);
            if let Some(pot) = &self.lease {
                pot.token_pot.put_back(r.lease, r.cost.total());
            }
        }
    }

    /// Parks a request again at the head of its priority (after an upstream 429).
    pub fn requeue(
        &self,
        priority: Priority,
        cost: Option<Cost>,
        now: u64,
    ) -> Result<Ticket, QueueFull> {
        let cost = cost.filter(|_| self.tokens.is_some());
        let t = self.queues.park(priority, true, cost, now)?;
        self.wake_dispatcher();
        Ok(t)
    }

    /// A granted claim that was not used (the client left first): give its window slot
    /// and its token back.
    pub fn refund(&self, claim: Claim, now: u64) {
        self.give_back(claim.into(), now);
        self.wake_dispatcher();
    }

    fn give_back(&self, grant: Grant, now: u64) {
        self.guard.release(grant.claim.slot);
        match &self.lease {
            Some(pot) if grant.claim.lease != 0 => pot.put_back(grant.claim.lease),
            _ => self.bucket.refund(now),
        }
        self.give_back_tokens(grant.tokens);
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

    /// Grants tokens to waiters while tokens, window slots and their token costs are
    /// free, and refuses those whose cost the token limit fell below. Returns how long
    /// until the next grant could be due when waiters remain.
    pub fn dispatch(&self, now: u64) -> Option<Duration> {
        while let Some(g) = self.queues.take_unused_grant() {
            self.give_back(g, now);
        }
        let mut stage = self.queues.stage();
        if let Some(b) = &self.tokens {
            // A limit fallen below a parked request's cost: it is refused, as at admission.
            stage.refuse_larger_than(b.limit());
        }
        loop {
            let look = if self.tokens.is_some() { LOOK_PAST } else { 1 };
            let p = stage.top(look)?;
            let (pos, tokens) = match self.choose(&stage, p, now) {
                Ok(chosen) => chosen,
                Err(wait) => return Some(wait),
            };
            let Some(claim) = self.try_take(now) else {
                self.give_back_tokens(tokens);
                // A zero wait is a race with a fast-path admission: look again soon.
                let wait = self.wait_time(now);
                return Some(if wait.is_zero() {
                    Duration::from_micros(50)
                } else {
                    wait
                });
            };
            let mut tokens = tokens;
            if !self.take_leased_tokens(&mut tokens, now) {
                self.give_back(Grant { claim, tokens }, now);
                // The budget task wakes the dispatcher when the next lease comes.
                return Some(LEASE_POLL);
            }
            if let Err(g) = stage.grant(p, pos, Grant { claim, tokens }) {
                // That waiter cancelled meanwhile: nothing was used.
                self.give_back(g, now);
            }
        }
    }

    /// Whom of priority `p`'s staged waiters to grant, with the tokens reserved for it:
    /// the head if its cost fits; else the first behind it whose cost fits and who
    /// leaves each waiter in front of it that has waited a window its room by the time
    /// it was to fit (the head: its deadline). Otherwise the wait for the head's cost.
    fn choose(
        &self,
        stage: &Stage<'_>,
        p: Priority,
        now: u64,
    ) -> Result<(usize, Option<Reserved>), Duration> {
        /// How much later than it could fit when first held the head may be made to fit
        /// by those passing it: a tenth of the window.
        const SLACK_PER_WINDOW: u64 = 10;
        let Some(budget) = &self.tokens else {
            return Ok((0, None));
        };
        let cost = |pos: usize| stage.parked(p, pos).and_then(|w| w.cost);
        let fits = |pos: usize| -> Result<Option<Reserved>, Duration> {
            match cost(pos) {
                None => Ok(None),
                Some(c) => budget.try_reserve(c, now).map(Some),
            }
        };
        let head_wait = match fits(0) {
            Ok(r) => return Ok((0, r)),
            Err(wait) => wait,
        };
        let window = nanos(self.pacing.window);
        let limit = budget.limit();
        let held = |pos: usize| {
            stage
                .parked(p, pos)
                .is_some_and(|w| now.saturating_sub(w.parked_at) >= window)
        };
        let total = |pos: usize| cost(pos).map_or(0, |c| c.total());
        // A waiter that has waited a window is held for: what frees up is its own (and
        // of those held in front of it) but for what a waiter behind can take and still
        // leave it its room when it was to fit (a charge made now counts then too). The
        // head gets a deadline when first held, when it could fit then plus the slack;
        // one behind it, when it could fit now, after those in front. Only what one span
        // of the budget can serve is held for; the young may be passed freely.
        let (mut ahead, mut spare) = (0u64, u64::MAX);
        // The waiter at `pos`, to fit `by`, joins those held for.
        let hold = |(ahead, spare): (u64, u64), pos: usize, by: u64| {
            let ahead = ahead.saturating_add(total(pos));
            (ahead, spare.min(budget.room_at(by).saturating_sub(ahead)))
        };
        if held(0) {
            let head = stage.parked(p, 0).map_or(now, |w| w.parked_at);
            let fits_at = now.saturating_add(nanos(head_wait));
            let by = budget
                .head_deadline(head, fits_at.saturating_add(window / SLACK_PER_WINDOW))
                .max(fits_at);
            (ahead, spare) = hold((ahead, spare), 0, by);
        }
        let mut wait = head_wait;
        let mut holding = true;
        for pos in 1..stage.len(p) {
            if total(pos) <= spare {
                match fits(pos) {
                    Ok(r) => return Ok((pos, r)),
                    Err(d) => wait = wait.min(d),
                }
            }
            if !held(pos) {
                continue;
            }
            holding &= ahead.saturating_add(total(pos)) <= limit;
            if holding {
                let both = Cost {
                    prompt: ahead.saturating_add(total(pos)),
                    completion: 0,
                };
                let by = now.saturating_add(nanos(budget.wait_time(both, now)));
                (ahead, spare) = hold((ahead, spare), pos, by);
            }
        }
        Err(wait)
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

    /// How long a request would wait with `ahead` waiters granted before it, and
    /// `tokens` of token cost to pass the token budget before it goes (theirs and its
    /// own): the requests' drain (the current wait, then one bucket interval each for
    /// the first window's worth, and the guard's share of the span each after that),
    /// or the tokens' when longer ([`Self::token_drain`]).
    pub fn expected_wait(&self, ahead: usize, tokens: u64, now: u64) -> Duration {
        let (bucket, guarded) = self.intervals();
        let within = ahead.min(self.guard.limit() as usize);
        let beyond = ahead - within;
        let secs = bucket * within as f64 + guarded * beyond as f64;
        let requests = self.wait_time(now) + Duration::from_secs_f64(secs);
        requests.max(self.token_drain(tokens, now))
    }

    /// The time for `tokens` to pass the token budget at its rate, the limit per span
    /// (a budget kept full passes no faster), after a hold (a token 429's); zero without
    /// a budget or tokens.
    fn token_drain(&self, tokens: u64, now: u64) -> Duration {
        let Some(b) = self.tokens.as_ref().filter(|_| tokens > 0) else {
            return Duration::ZERO;
        };
        let nanos = u128::from(tokens) * u128::from(b.span_nanos()) / u128::from(b.limit());
        let held = b.held_until().saturating_sub(now);
        Duration::from_nanos(held.saturating_add(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }

    /// `Retry-After` for a refused request: the time for the queue ahead of it (and it)
    /// to drain at the rate paced now, `tokens` (theirs and its own) through the token
    /// budget as well.
    pub fn retry_after(&self, ahead: usize, tokens: u64, now: u64) -> Duration {
        self.expected_wait(ahead, tokens, now)
            .max(Duration::from_secs_f64(self.intervals().0))
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;
