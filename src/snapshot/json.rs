//! The snapshot as the dashboard reads it: JSON, with provider names and upstream URLs
//! (never keys) joined in from the configuration, and `null` where there is no value.

use serde::Serialize;

use super::{Panel, Snapshot};
use crate::app::App;
use crate::limiter::RetreatState;
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
            .map(|(p, provider)| ProviderView::new(p, &provider.name, &provider.config, snap))
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
            },
        }
    }
}
