//! Redis lost: back off, send at most the fallback share (the shared limit divided by
//! the replicas last seen), and stop sending once cut off for longer than Redis keeps
//! this replica's share reserved (`redis_fallback_for`).

use std::time::{Duration, Instant};

use super::{Task, MAX_BACKOFF};
use crate::budget::inputs::Settings;
use crate::limiter::learn::{per_window, rpm_of};
use crate::limiter::{ClusterPacing, Mode};

impl Task {
    pub(super) fn on_error(&mut self, settings: &dyn Settings, err: &str) {
        self.failures = self.failures.saturating_add(1);
        self.down_since.get_or_insert_with(Instant::now);
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << self.failures.min(6))
            .min(MAX_BACKOFF);
        self.retry_at = Instant::now() + backoff;
        if self.mode == Mode::Shared {
            self.fallback_since = Some(self.clock.now_nanos());
            tracing::warn!(
                provider = &*self.b.provider,
                error = %err,
                fallback_limit = self.fallback_limit(settings),
                replicas = self.live,
                for_secs = self.fallback_for.as_secs_f64(),
                "Redis is unreachable: this replica sends at most its fallback share until it answers"
            );
            self.enter_fallback(settings);
        } else if self.failures == 1 && self.last_ok.is_none() {
            tracing::warn!(
                provider = &*self.b.provider,
                error = %err,
                fallback_limit = self.fallback_limit(settings),
                replicas = self.live,
                "Redis not reached yet: this replica sends at most its fallback share"
            );
        }
        let down = self.last_ok.unwrap_or(self.started).elapsed();
        self.b.update(|v| {
            v.backend_up = false;
            v.down_for = Some(down);
            v.leases.error += 1;
        });
        self.check_isolation();
    }

    /// Per window: what this replica may send alone.
    fn fallback_limit(&self, settings: &dyn Settings) -> u32 {
        if self.joined && self.share > 0 {
            return self.share;
        }
        let rate = settings.current().providers[self.b.index].rate_rpm;
        (per_window(rate, self.provider_window) / self.replicas_configured).max(1)
    }

    pub(super) fn enter_fallback(&mut self, settings: &dyn Settings) {
        self.drain_lease();
        self.mode = Mode::Fallback;
        self.b.pot.set_mode(Mode::Fallback);
        let window = self.provider_window;
        let limit = self.fallback_limit(settings);
        let pacing = ClusterPacing {
            rpm: rpm_of(limit, window),
            ..self.pacing(limit, rpm_of(limit, window))
        };
        self.limiter
            .set_cluster(Some(pacing), self.clock.now_nanos());
        self.apply_token_cap();
        self.limiter.wake_dispatcher();
        let mode = self.mode;
        self.b.update(|v| {
            v.mode = mode;
            v.fallback_limit = limit;
        });
    }

    /// A replica cut off from Redis longer than its share is reserved stops sending.
    pub(super) fn check_isolation(&mut self) {
        if self.mode != Mode::Fallback {
            return;
        }
        let down = self.last_ok.unwrap_or(self.started).elapsed();
        if down >= self.fallback_for {
            tracing::error!(
                provider = &*self.b.provider,
                down_secs = down.as_secs_f64(),
                "Redis unreachable for longer than redis_fallback_for: this replica stops sending with the shared key until Redis answers (requests get 503 budget_unavailable)"
            );
            self.mode = Mode::Isolated;
            self.b.pot.set_mode(Mode::Isolated);
            self.limiter.wake_dispatcher();
            self.b.update(|v| v.mode = Mode::Isolated);
        }
    }
}
