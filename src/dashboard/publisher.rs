//! The one publisher: every tick it reads each provider once, drains the metrics
//! shards, builds a [`Snapshot`] and publishes it.
//!
//! It runs as a task on the metrics listener's thread, away from the proxy workers, and
//! owns the history (a minute of points per provider) so nothing else has to.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytemuck::Zeroable;

use crate::app::App;
use crate::budget::{Budget, ClusterView};
use crate::limiter::{DropReason, Mode, PacingView, Source, TokenView};
use crate::metrics::{Outcome, ProviderSeries};
use crate::snapshot::{
    ClusterPanel, PacingPanel, Panel, Point, Snapshot, TokenPanel, HISTORY, MAX_PROVIDERS,
};
use crate::stats::StatsSnapshot;

/// A provider's pacing view at clock time `now`, as the snapshot holds it.
fn pacing_panel(v: &PacingView, now: u64) -> PacingPanel {
    let secs = |nanos: u64| nanos as f64 / 1e9;
    PacingPanel {
        learned_rpm: v.learned_rpm,
        ceiling_rpm: v.ceiling_rpm,
        limit: u64::from(v.limit),
        learned: u64::from(v.learned),
        ceiling: u64::from(v.ceiling),
        window_s: v.window.as_secs_f64(),
        source: Source::ALL.iter().position(|s| *s == v.source).unwrap_or(0) as u64,
        probing: u64::from(v.probing),
        next_probe_s: v
            .next_probe_at
            .map_or(f64::NAN, |at| secs(at.saturating_sub(now))),
        pause_reason: v.pause.map_or(0, |(r, _)| r as u64),
        pause_s: v
            .pause
            .map_or(0.0, |(_, until)| secs(until.saturating_sub(now))),
        sent_in_window: u64::from(v.sent_in_window),
        changes: v.changes,
    }
}

/// A provider's token budget at clock time `now` and its counts, as the snapshot holds
/// them (zero without a budget).
pub fn token_panel(view: Option<&TokenView>, stats: &StatsSnapshot, now: u64) -> TokenPanel {
    let Some(v) = view else {
        return TokenPanel::zeroed();
    };
    let t = &stats.tokens;
    TokenPanel {
        present: 1,
        limit: v.limit,
        ceiling: v.ceiling,
        stated: v.stated.unwrap_or(0),
        charged: v.charged,
        remaining: v.remaining,
        waiting: v.waiting,
        held_s: v.held_until.saturating_sub(now) as f64 / 1e9,
        prompt: t.prompt,
        completion: t.completion,
        estimated: t.estimated,
        settled: t.settled,
        refused_too_large: stats.refused_tokens_too_large,
        ratio_count: t.ratio_count(),
        ratio_mean: t.ratio_mean().unwrap_or(f64::NAN),
    }
}

/// A provider's shared budget, as the snapshot holds it (zero without one).
fn cluster_panel(budget: Option<&Budget>) -> ClusterPanel {
    match budget {
        None => ClusterPanel::zeroed(),
        Some(b) => cluster_numbers(&b.view(), &b.round_trips()),
    }
}

/// The numbers of `v` and the round-trip percentiles of `round_trips` (microseconds).
pub fn cluster_numbers(
    v: &ClusterView,
    round_trips: &hdrhistogram::Histogram<u64>,
) -> ClusterPanel {
    let r = &v.record;
    let ms = |q: f64| {
        if round_trips.is_empty() {
            f64::NAN
        } else {
            round_trips.value_at_quantile(q) as f64 / 1e3
        }
    };
    ClusterPanel {
        present: 1,
        mode: Mode::ALL.iter().position(|m| *m == v.mode).unwrap_or(1) as u64,
        backend_up: u64::from(v.backend_up),
        replicas: u64::from(v.replicas),
        fallback_limit: u64::from(v.fallback_limit),
        reserved: u64::from(v.reserved),
        learning: u64::from(v.learning),
        record_version: r.version,
        record_rate_rpm: r.rate_rpm,
        record_bucket_capacity: u64::from(r.bucket_capacity),
        record_window_s: r.window.as_secs_f64(),
        record_fallback: u64::from(r.fallback),
        record_learned: u64::from(r.learned),
        record_limit: u64::from(r.limit),
        record_probing: u64::from(r.probing),
        record_rpm: r.rpm,
        record_retreat_factor: r.retreat_factor,
        leases: v.leases.labelled().map(|(_, n)| n),
        round_trips: v.round_trips,
        admitted: v.admitted,
        round_trip_p50_ms: ms(0.5),
        round_trip_p99_ms: ms(0.99),
        down_for_s: v.down_for.map_or(f64::NAN, |d| d.as_secs_f64()),
    }
}

/// Requests ended, by `Outcome as usize`, over every route of `series`.
fn outcomes<'a>(series: impl Iterator<Item = &'a ProviderSeries>) -> [u64; Outcome::ALL.len()] {
    let mut out = [0; Outcome::ALL.len()];
    for route in series.flat_map(|s| &s.requests) {
        for (total, n) in out.iter_mut().zip(route) {
            *total += n;
        }
    }
    out
}

/// Builds snapshots; keeps what one build needs from the previous one.
pub struct Publisher {
    app: Arc<App>,
    history: Vec<VecDeque<Point>>,
    last_total: Vec<u64>,
    last_at: Option<Instant>,
    snap: Box<Snapshot>,
}

impl Publisher {
    pub fn new(app: Arc<App>) -> Self {
        let n = app.providers.len().min(MAX_PROVIDERS);
        if app.providers.len() > MAX_PROVIDERS {
            tracing::warn!(
                providers = app.providers.len(),
                shown = MAX_PROVIDERS,
                "the dashboard shows the first {MAX_PROVIDERS} providers; /metrics has them all"
            );
        }
        Self {
            app,
            history: vec![VecDeque::with_capacity(HISTORY); n],
            last_total: vec![0; n],
            last_at: None,
            snap: Box::new(Snapshot::zeroed()),
        }
    }

    /// Builds the snapshot for `now` (without publishing it).
    pub fn build(&mut self, now: Instant) -> &Snapshot {
        let app = &*self.app;
        let clock_now = app.clock.now_nanos();
        let elapsed = self
            .last_at
            .map(|t| now.saturating_duration_since(t).as_secs_f64());
        self.last_at = Some(now);
        let totals = app.metrics.collect(now);
        let snap = &mut *self.snap;
        snap.build = app.snapshots.builds() + 1;
        snap.built_at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        snap.uptime_ms = app.started.elapsed().as_millis() as u64;
        snap.tick_ms = app.config.snapshot_interval.as_millis() as u64;
        snap.providers_total = app.providers.len() as u64;
        snap.providers_len = self.history.len() as u64;
        snap.arrived = totals.arrived;
        snap.outcomes = outcomes(totals.providers.iter());
        snap.in_flight = totals.in_flight.iter().sum();
        for (i, provider) in app.providers.iter().take(MAX_PROVIDERS).enumerate() {
            let s = provider.snapshot(clock_now);
            let (latency, wait) = totals.windows[i].merged();
            let series = &totals.providers[i];
            let per_second = match elapsed {
                Some(e) if e > 0.0 => s.stats.total.saturating_sub(self.last_total[i]) as f64 / e,
                _ => 0.0,
            };
            self.last_total[i] = s.stats.total;
            let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
            let p = &mut snap.panels[i];
            *p = Panel {
                total: s.stats.total,
                outcomes: outcomes(std::iter::once(series)),
                in_flight: totals.in_flight[i],
                limited: s.stats.limited,
                passthrough: s.stats.passthrough,
                rate_limited: s.stats.rate_limited,
                queue_full: s.stats.queue_full,
                dropped_low_priority: s.stats.dropped_low_priority,
                dropped_timeout: s.stats.dropped_timeout,
                upstream_errors: series.errors_total(),
                upstream_429: s.stats.upstream_429,
                retries: s.stats.retries,
                queue_depth: s.queue.depth.map(|d| d as u64),
                queue_total: s.queue.total as u64,
                queue_max: s.queue.max as u64,
                queue_enqueued: s.queue.enqueued,
                queue_dequeued: s.queue.dequeued,
                queue_dropped: DropReason::ALL.map(|why| s.queue.dropped(why)),
                retreat_state: s.retreat.state as u64,
                upstream_429_last_minute: s.retreat.upstream_429_last_minute,
                responses_last_minute: s.retreat.responses_last_minute,
                base_rpm: s.retreat.base_rpm,
                effective_rpm: s.retreat.effective_rpm,
                rate_429: s.retreat.rate_429,
                bucket_tokens: s.bucket_tokens,
                bucket_capacity: u64::from(s.bucket_capacity),
                per_second,
                latency_p50_ms: nan(latency.quantile_ms(0.5)),
                latency_p90_ms: nan(latency.quantile_ms(0.9)),
                latency_p99_ms: nan(latency.quantile_ms(0.99)),
                latency_count: latency.count(),
                wait_p50_ms: nan(wait.quantile_ms(0.5)),
                wait_p99_ms: nan(wait.quantile_ms(0.99)),
                wait_count: wait.count(),
                pacing: pacing_panel(&s.pacing, clock_now),
                cluster: cluster_panel(provider.budget.as_deref()),
                tokens: token_panel(
                    provider.limiter.token_view(clock_now).as_ref(),
                    &s.stats,
                    clock_now,
                ),
                history: p.history,
            };
            let h = &mut self.history[i];
            if h.len() == HISTORY {
                h.pop_front();
            }
            h.push_back(Point {
                rps: per_second as f32,
                p99_ms: p.latency_p99_ms as f32,
                queue: s.queue.total as f32,
                effective_rpm: s.retreat.effective_rpm as f32,
                learned_rpm: s.pacing.learned_rpm as f32,
                ceiling_rpm: s.pacing.ceiling_rpm as f32,
            });
            for (slot, point) in p.history.iter_mut().zip(h.iter()) {
                *slot = *point;
            }
        }
        snap.history_len = self.history.first().map_or(0, |h| h.len() as u64);
        &self.snap
    }

    /// Builds and publishes one snapshot.
    pub fn tick(&mut self, now: Instant) -> u64 {
        self.build(now);
        self.app.snapshots.publish(&self.snap)
    }

    /// Publishes every `interval` until the app starts draining.
    pub async fn run(mut self) {
        let interval = self.app.config.snapshot_interval;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let draining = self.app.shutdown.draining.clone();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = draining.cancelled() => break,
            }
            self.tick(Instant::now());
        }
    }
}
