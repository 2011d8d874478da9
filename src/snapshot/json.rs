//! The snapshot as the dashboard reads it: JSON, with provider names and upstream URLs
//! (never keys) joined in from the configuration, and `null` where there is no value.

use serde::Serialize;

use super::{PacingPanel, Panel, Snapshot};
use crate::app::App;
use crate::limiter::{PauseReason, RetreatState, Source};
use crate::priority::Priority;

/// Encodes `snap` (sequence `seq`) for `app`'s providers.
pub fn encode(app: &App, snap: &Snapshot, seq: u64) -> Vec<u8> {
    let view = View {
        seq,
        builds: snap.build,
        tick_ms: snap.tick_ms,
        built_at_ms: snap.built_at_unix_ms,
        uptime_s: snap.uptime_ms as f64 / 1e3,
        version: env!("CARGO_PKG_VERSION"),
        providers_total: snap.providers_total,
        providers: snap
            .panels()
            .iter()
            .zip(&app.providers)
            .map(|(p, provider)| {
                let mut v = ProviderView::new(p, &provider.name, &provider.config, snap);
                v.pacing.models = models(provider, app.clock.now_nanos());
                v
            })
            .collect(),
    };
    // Serialising plain numbers and strings into a Vec cannot fail.
    serde_json::to_vec(&view).unwrap_or_default()
}

fn opt(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[derive(Serialize)]
struct View<'a> {
    seq: u64,
    builds: u64,
    tick_ms: u64,
    built_at_ms: u64,
    uptime_s: f64,
    version: &'static str,
    providers_total: u64,
    providers: Vec<ProviderView<'a>>,
}

#[derive(Serialize)]
struct ProviderView<'a> {
    name: &'a str,
    upstream: String,
    rate: Rate,
    retreat: Retreat,
    pacing: Pacing,
    requests: Requests,
    errors: Errors,
    queue: Queue,
    latency_ms: Percentiles,
    queue_wait_ms: Percentiles,
    history: History,
}

#[derive(Serialize)]
struct Rate {
    base_rpm: f64,
    effective_rpm: f64,
    bucket_tokens: f64,
    bucket_capacity: u64,
}

#[derive(Serialize)]
struct Retreat {
    state: &'static str,
    rate_429: f64,
    upstream_429_last_minute: u64,
    responses_last_minute: u64,
}

/// The learned limit, key scope, and each model's with `limit_scope = "model"`.
#[derive(Serialize)]
struct Pacing {
    window_s: f64,
    /// Sends per window: allowed now (the ceiling while probing), learned, configured.
    limit: u64,
    learned: u64,
    ceiling: u64,
    learned_rpm: f64,
    ceiling_rpm: f64,
    /// `config`, `header`, `learned_429`, `probe` or `state`.
    source: &'static str,
    probing: bool,
    /// Seconds until the next probe may start (0: now); `null`: nothing to probe.
    next_probe_s: Option<f64>,
    /// `null` while admission is not paused.
    pause: Option<Pause>,
    sent_in_window: u64,
    changes: u64,
    /// Per-model scopes, read live when the frame is encoded (they vary in number, so
    /// they are not part of the fixed-size snapshot); empty with `limit_scope = "key"`.
    models: Vec<ModelPacing>,
}

/// One model scope's learned limit.
#[derive(Serialize)]
struct ModelPacing {
    model: String,
    limit: u32,
    learned: u32,
    learned_rpm: f64,
    source: &'static str,
    probing: bool,
    pause: Option<Pause>,
    sent_in_window: u32,
}

fn models(provider: &crate::app::Provider, now: u64) -> Vec<ModelPacing> {
    let mut out: Vec<ModelPacing> = provider
        .limiter
        .models()
        .into_iter()
        .map(|(name, m)| {
            let v = m.pacing_view(now);
            ModelPacing {
                model: name.to_string(),
                limit: v.limit,
                learned: v.learned,
                learned_rpm: (v.learned_rpm * 1e3).round() / 1e3,
                source: v.source.as_str(),
                probing: v.probing,
                pause: v.pause.map(|(r, until)| Pause {
                    reason: r.as_str(),
                    seconds: (until.saturating_sub(now) as f64 / 1e6).round() / 1e3,
                }),
                sent_in_window: v.sent_in_window,
            }
        })
        .collect();
    out.sort_by(|a, b| a.model.cmp(&b.model));
    out
}

#[derive(Serialize)]
struct Pause {
    reason: &'static str,
    seconds: f64,
}

impl Pacing {
    fn new(p: &PacingPanel) -> Self {
        let ms = |s: f64| (s * 1e3).round() / 1e3;
        let source = usize::try_from(p.source)
            .ok()
            .and_then(|i| Source::ALL.get(i))
            .copied()
            .unwrap_or(Source::Config);
        Self {
            window_s: ms(p.window_s),
            limit: p.limit,
            learned: p.learned,
            ceiling: p.ceiling,
            learned_rpm: p.learned_rpm,
            ceiling_rpm: p.ceiling_rpm,
            source: source.as_str(),
            probing: p.probing != 0,
            next_probe_s: opt(p.next_probe_s).map(ms),
            pause: u8::try_from(p.pause_reason)
                .ok()
                .and_then(PauseReason::from_u8)
                .map(|r| Pause {
                    reason: r.as_str(),
                    seconds: ms(p.pause_s),
                }),
            sent_in_window: p.sent_in_window,
            changes: p.changes,
            models: Vec::new(),
        }
    }
}

#[derive(Serialize)]
struct Requests {
    total: u64,
    limited: u64,
    passthrough: u64,
    per_second: f64,
}

#[derive(Serialize)]
struct Errors {
    upstream: u64,
    upstream_429: u64,
    rate_limited: u64,
    dropped_low_priority: u64,
    dropped_timeout: u64,
    retries: u64,
}

#[derive(Serialize)]
struct Queue {
    depth: Depth,
    total: u64,
    max: u64,
}

#[derive(Serialize)]
struct Depth {
    high: u64,
    normal: u64,
    low: u64,
}

#[derive(Serialize)]
struct Percentiles {
    p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    p90: Option<Option<f64>>,
    p99: Option<f64>,
    count: u64,
}

#[derive(Serialize)]
struct History {
    rps: Vec<Option<f32>>,
    p99_ms: Vec<Option<f32>>,
    queue: Vec<Option<f32>>,
    effective_rpm: Vec<Option<f32>>,
    learned_rpm: Vec<Option<f32>>,
    ceiling_rpm: Vec<Option<f32>>,
}

impl<'a> ProviderView<'a> {
    fn new(p: &Panel, name: &'a str, config: &crate::config::ProviderConfig, s: &Snapshot) -> Self {
        let points = &p.history[..(s.history_len as usize).min(p.history.len())];
        let series = |f: fn(&super::Point) -> f32| -> Vec<Option<f32>> {
            points
                .iter()
                .map(|pt| Some(f(pt)).filter(|v| v.is_finite()))
                .collect()
        };
        let state = RetreatState::ALL
            .into_iter()
            .find(|st| *st as u64 == p.retreat_state)
            .unwrap_or(RetreatState::Normal);
        Self {
            name,
            upstream: config.upstream.display(),
            rate: Rate {
                base_rpm: p.base_rpm,
                effective_rpm: p.effective_rpm,
                bucket_tokens: (p.bucket_tokens * 100.0).round() / 100.0,
                bucket_capacity: p.bucket_capacity,
            },
            retreat: Retreat {
                state: state.as_str(),
                rate_429: p.rate_429,
                upstream_429_last_minute: p.upstream_429_last_minute,
                responses_last_minute: p.responses_last_minute,
            },
            pacing: Pacing::new(&p.pacing),
            requests: Requests {
                total: p.total,
                limited: p.limited,
                passthrough: p.passthrough,
                per_second: (p.per_second * 100.0).round() / 100.0,
            },
            errors: Errors {
                upstream: p.upstream_errors,
                upstream_429: p.upstream_429,
                rate_limited: p.rate_limited,
                dropped_low_priority: p.dropped_low_priority,
                dropped_timeout: p.dropped_timeout,
                retries: p.retries,
            },
            queue: Queue {
                depth: Depth {
                    high: p.queue_depth[Priority::High as usize],
                    normal: p.queue_depth[Priority::Normal as usize],
                    low: p.queue_depth[Priority::Low as usize],
                },
                total: p.queue_total,
                max: p.queue_max,
            },
            latency_ms: Percentiles {
                p50: opt(p.latency_p50_ms),
                p90: Some(opt(p.latency_p90_ms)),
                p99: opt(p.latency_p99_ms),
                count: p.latency_count,
            },
            queue_wait_ms: Percentiles {
                p50: opt(p.wait_p50_ms),
                p90: None,
                p99: opt(p.wait_p99_ms),
                count: p.wait_count,
            },
            history: History {
                rps: series(|pt| pt.rps),
                p99_ms: series(|pt| pt.p99_ms),
                queue: series(|pt| pt.queue),
                effective_rpm: series(|pt| pt.effective_rpm),
                learned_rpm: series(|pt| pt.learned_rpm),
                ceiling_rpm: series(|pt| pt.ceiling_rpm),
            },
        }
    }
}
