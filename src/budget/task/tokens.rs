//! The token budget shared like the requests: token leases (`tlease`) for the token pot,
//! the changes settled requests made to what their leases charged, the provider's token
//! limits for every replica, and this replica's cap (the cluster's limit while shared,
//! its share of it on fallback).
//!
//! A token lease is sized to what this replica takes over one lease time, and never
//! less than the cost of the request the pot was short for (Redis grants that cost
//! whole or nothing: a part of it could not send the request). Changes of a lease's
//! charge (a reservation given back, a settlement above or below the estimate, the
//! unused rest of a lease) are reported as signed adjustments of that lease, summed per
//! lease and carried by the next call, at most `leases::ADJUST_EVERY` after the first.

use std::time::{Duration, Instant};

use super::{nanos, Op, Task, HEARTBEAT};
use crate::budget::inputs::Settings;
use crate::budget::script::Reply;
use crate::limiter::learn::tokens_per_window;
use crate::limiter::{Mode, TokenReport};

impl Task {
    /// Whether the cluster keeps a token budget this replica takes part in.
    fn tokens_shared(&self) -> bool {
        self.mode == Mode::Shared && self.tl.limit > 0 && self.limiter.token_budget().is_some()
    }

    /// This replica's configured token budget, per window (0: none).
    pub(super) fn configured_tokens(&self, settings: &dyn Settings) -> u64 {
        if self.limiter.token_budget().is_none() {
            return 0;
        }
        let tpm = settings.current().providers[self.b.index].tokens_per_minute;
        tokens_per_window(tpm, self.provider_window).unwrap_or(0)
    }

    /// What the provider said of its token limit, as `refused` ops for every replica.
    pub(super) fn token_reports(&mut self) {
        while let Some(r) = self.b.pot.token_pot.next_report() {
            let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            let args = match r {
                TokenReport::Refused { stated, hold } => vec![
                    "tokens".to_owned(),
                    stated
                        .map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX))
                        .to_string(),
                    hold.map_or(-1, ms).to_string(),
                ],
                TokenReport::Stated { per_window } => {
                    vec![
                        "theader".to_owned(),
                        per_window.to_string(),
                        "-1".to_owned(),
                    ]
                }
            };
            self.pending.push_back(Op {
                name: "refused",
                args,
            });
        }
    }

    /// What a reply says of the token budget: the cluster's limit, this replica's
    /// share, a hold after another replica's token 429.
    pub(super) fn on_token_reply(&mut self, r: &Reply) {
        self.tl.limit = r.tokens_limit;
        self.tl.share = r.tokens_share;
        let hold = self.record.tokens_hold_until_ms;
        if hold > r.now_ms {
            let until = self
                .clock
                .now_nanos()
                .saturating_add(nanos(Duration::from_millis(hold - r.now_ms)));
            self.limiter.hold_tokens(until);
        }
        self.apply_token_cap();
    }

    /// The limiter's token cap for the mode the replica is in.
    pub(super) fn apply_token_cap(&mut self) {
        if self.limiter.token_budget().is_none() {
            return;
        }
        let cap = match self.mode {
            Mode::Shared if self.tl.limit > 0 => Some(self.tl.limit),
            Mode::Shared => None,
            // Alone: its share of the cluster's limit, as for requests.
            Mode::Fallback | Mode::Isolated => match (self.tl.share, self.tl.limit) {
                (s, _) if s > 0 => Some(s),
                (_, l) if l > 0 => Some((l / u64::from(self.live.max(1))).max(1)),
                _ => None,
            },
        };
        let pot = &self.b.pot.token_pot;
        let on = self.tokens_shared();
        if pot.enabled() != on {
            pot.set_enabled(on);
            if !on {
                self.drain_tokens();
            }
        }
        if self.tl.cap != Some(cap) {
            self.tl.cap = Some(cap);
            self.limiter.set_token_cap(cap);
        }
    }

    /// The token lease in hand goes back (unused), with the next call.
    pub(super) fn drain_tokens(&mut self) {
        let (lease, left) = self.b.pot.token_pot.drain();
        if left > 0 {
            self.b.update(|v| v.token_leases.returned += left);
            self.note_change(lease, -(i64::try_from(left).unwrap_or(i64::MAX)));
        }
    }

    fn note_change(&mut self, lease: u32, delta: i64) {
        if lease == 0 || delta == 0 {
            return;
        }
        *self.tl.pending.entry(lease).or_insert(0) += delta;
        self.tl.pending_since.get_or_insert_with(Instant::now);
    }

    fn sample_tokens(&mut self) {
        let taken = self.b.pot.token_pot.taken();
        let (t0, at) = self.tl.last;
        let dt = at.elapsed().as_secs_f64();
        if dt < 0.05 {
            return;
        }
        let a = (dt / 0.25).min(1.0);
        self.tl.rate += a * (taken.saturating_sub(t0) as f64 / dt - self.tl.rate);
        self.tl.last = (taken, Instant::now());
    }

    /// The token side of a step: reports, an expired lease back, the next lease when
    /// the pot is short or low, and the changes waiting.
    pub(super) async fn token_step(&mut self, settings: &dyn Settings) {
        self.apply_token_cap();
        while let Some(a) = self.b.pot.token_pot.next_adjustment() {
            self.note_change(a.lease, a.delta);
        }
        while let Some(l) = self.b.pot.token_pot.next_late() {
            // Counted again from the send, in Redis time: they stay in the log for the
            // window, the margin and a lease time after it (the lease time is not taken
            // off: the one last heard of may be longer than the cluster's now).
            let at_ms = i64::try_from(l.at / 1_000_000).unwrap_or(i64::MAX) + self.offset_ms;
            self.tl
                .late
                .push((u64::try_from(at_ms).unwrap_or(0), l.tokens));
            self.tl.pending_since.get_or_insert_with(Instant::now);
            self.b.update(|v| v.token_leases.late += 1);
        }
        if !self.tokens_shared() {
            return;
        }
        self.sample_tokens();
        let pot = &self.b.pot.token_pot;
        if pot.tokens() > 0 && self.clock.now_nanos() >= pot.expires() {
            self.drain_tokens();
        }
        let pot = &self.b.pot.token_pot;
        self.tl.short = self.tl.short.max(pot.take_short());
        let steady = (self.tl.rate * self.ttl.as_secs_f64()).ceil() as u64;
        // Leased ahead only when a lease time takes several requests' worth (a high
        // rate, where a round trip per request would cost too much): below that, tokens
        // leased ahead sit unused, held from the others, until the next request, which
        // is better served by asking for its own cost.
        let mean_cost = pot.taken() / pot.takes().max(1);
        let low = steady >= 4 * mean_cost.max(1) && pot.tokens() <= steady / 4;
        let now = Instant::now();
        if (self.tl.short > 0 || low) && now >= self.tl.retry_at {
            let least = self.tl.short.max(1);
            // Up to a tenth of the window's limit, and never less than the request the
            // pot was short for.
            let want = steady.saturating_mul(2).min(self.tl.limit / 10).max(least);
            self.token_call(settings, want, least).await;
        } else if self.tl.adjust_due().is_some_and(|d| d.is_zero()) {
            self.token_call(settings, 0, 0).await;
        }
    }

    async fn token_call(&mut self, settings: &dyn Settings, want: u64, least: u64) {
        if want > 0 {
            // What is left of the last lease goes back with this call.
            self.drain_tokens();
        }
        let mut args = vec![
            want.to_string(),
            least.to_string(),
            String::new(),
            "0".to_owned(),
            self.live.to_string(),
        ];
        let changes: Vec<(u32, i64)> = self.tl.pending.drain().collect();
        let late = std::mem::take(&mut self.tl.late);
        self.tl.pending_since = None;
        for &(lease, delta) in &changes {
            // A lease no longer known left the shared log, and its sends the
            // provider's window: nothing to change.
            if let Some(m) = self.tl.member_of(lease) {
                args.push(m.to_owned());
                args.push(delta.to_string());
            }
        }
        for &(from, tokens) in &late {
            args.push(format!("+{from}"));
            args.push(tokens.to_string());
        }
        let sent = self.clock.now_nanos();
        let Some(r) = self.call(settings, "tlease", &args).await else {
            // Kept for the next call: a give-back late is safe, a raise late is counted
            // from its lease's grant all the same.
            for (lease, delta) in changes {
                self.note_change(lease, delta);
            }
            self.tl.late.extend(late);
            return;
        };
        let span = self.window() + Duration::from_secs(2);
        while self
            .tl
            .recent
            .front()
            .is_some_and(|(_, _, at)| at.elapsed() > span)
        {
            self.tl.recent.pop_front();
        }
        tracing::debug!(
            provider = &*self.b.provider,
            want,
            least,
            granted = r.granted,
            wait_ms = r.wait.as_millis() as u64,
            limit = r.tokens_limit,
            "token lease"
        );
        if want == 0 {
            return;
        }
        self.b.update(|v| match u64::from(r.granted) {
            0 => v.token_leases.empty += 1,
            g if g < want => v.token_leases.partial += 1,
            _ => v.token_leases.granted += 1,
        });
        if u64::from(r.granted) >= least && r.granted > 0 {
            let n = self.tl.number();
            let expires = sent.saturating_add(nanos(r.ttl.mul_f64(0.9)));
            let (old, left) = self.b.pot.token_pot.fill(n, u64::from(r.granted), expires);
            if left > 0 {
                self.note_change(old, -(i64::try_from(left).unwrap_or(i64::MAX)));
            }
            self.tl
                .recent
                .push_back((n, r.member.clone(), Instant::now()));
            self.tl.short = 0;
            self.limiter.wake_dispatcher();
        } else {
            // Never longer than a quarter heartbeat: a wait for the window is only an
            // estimate, and room held for this replica by the others' parts waits for it.
            self.tl.retry_at =
                Instant::now() + r.wait.clamp(Duration::from_millis(1), HEARTBEAT / 4);
        }
    }

    /// This replica's token charges over the span (or since clock time `since`), as
    /// the seed op takes them after the request pairs: `tokens`, then pairs of how long
    /// ago each bucket ends (ms) and its tokens.
    pub(super) fn tokens_by_bucket(&self, since: Option<u64>) -> Vec<String> {
        let Some(budget) = self.limiter.token_budget() else {
            return Vec::new();
        };
        let pairs = self.by_bucket(budget.span_nanos(), since, |end, len| {
            budget.charged_in(end, len)
        });
        if pairs.is_empty() {
            return pairs;
        }
        std::iter::once("tokens".to_owned()).chain(pairs).collect()
    }
}
