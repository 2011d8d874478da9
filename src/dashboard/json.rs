//! The snapshot as the dashboard reads it: JSON, with provider names and upstream URLs
//! (never keys) joined in from the configuration, and `null` where there is no value.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::app::App;
use crate::budget::ClusterView;
use crate::limiter::{DropReason, Mode, PauseReason, RetreatState, Source};
use crate::metrics::Outcome;
use crate::priority::Priority;
use crate::snapshot::{ClusterPanel, PacingPanel, Panel, Point, Snapshot, TokenPanel};

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
        requests: Ledger {
            arrived: snap.arrived,
            in_flight: snap.in_flight,
            outcomes: by_outcome(&snap.outcomes),
        },
        providers: snap
            .panels()
            .iter()
            .zip(&app.providers)
            .map(|(p, provider)| {
                let mut v = ProviderView::new(p, &provider.name, &provider.config, snap);
                v.pacing.models = models(provider, app.clock.now_nanos());
                v.cluster = provider
                    .budget
                    .as_ref()
                    .filter(|_| p.cluster.present != 0)
                    .map(|b| Cluster::new(&p.cluster, &b.view()));
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
    /// The request ledger over every provider.
    requests: Ledger,
    providers: Vec<ProviderView<'a>>,
}

/// Requests accepted, ended by outcome, and in flight: `arrived = Σ outcomes +
/// in_flight` (the same numbers as `sidecar_requests_arrived_total`,
/// `sidecar_requests_total` and `sidecar_requests_in_flight`).
#[derive(Serialize)]
struct Ledger {
    arrived: u64,
    in_flight: u64,
    outcomes: BTreeMap<&'static str, u64>,
}

fn by_outcome(counts: &[u64; Outcome::ALL.len()]) -> BTreeMap<&'static str, u64> {
    Outcome::ALL
        .into_iter()
        .map(|o| (o.as_str(), counts[o as usize]))
        .collect()
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
    /// Cluster mode only (absent when the provider paces alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster: Option<Cluster>,
    /// Token budget only (absent when the provider has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<Tokens>,
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

/// The provider's budget shared through Redis: this replica's view of it. Numbers come
/// from the snapshot; names and the per-replica shares are read when the frame is
/// encoded (they vary in size, so they are not part of the fixed-size snapshot).
#[derive(Serialize)]
struct Cluster {
    budget: String,
    /// This replica's id.
    replica: String,
    /// `shared`, `fallback` or `isolated`.
    mode: &'static str,
    backend_up: bool,
    /// Live replicas (this one included).
    replicas: u64,
    /// This replica's part of the cluster's grants in the shared window (0 to 1).
    share: f64,
    /// Each live replica's grants in the shared window, this one always included.
    shares: Vec<Share>,
    /// Sends per window: this replica's share while Redis is lost, and the shares kept
    /// for replicas that vanished.
    fallback_limit: u64,
    reserved: u64,
    learning: bool,
    /// `null` before Redis was reached.
    generation: Option<String>,
    /// `null` before the shared record was read.
    record: Option<ClusterRecord>,
    leases: Leases,
    round_trips: u64,
    admitted: u64,
    round_trip_ms: Percentiles,
    /// Seconds Redis had gone unanswered at its last failed call; `null` while it answers.
    down_for_secs: Option<f64>,
}

#[derive(Serialize)]
struct Share {
    replica: String,
    sends: u32,
}

/// The budget's shared record as this replica last read it.
#[derive(Serialize)]
struct ClusterRecord {
    version: u64,
    rate_rpm: f64,
    bucket_capacity: u64,
    window_secs: f64,
    fallback: bool,
    /// Sends per window: the learned limit (0: none) and the limit kept now.
    learned: u64,
    limit: u64,
    source: String,
    probing: bool,
    /// Requests per minute the cluster is paced at now (retreat included).
    rpm: f64,
    retreat_factor: f64,
    /// Why the cluster is paused; `null` when it is not.
    pause_reason: Option<String>,
}

#[derive(Serialize)]
struct Leases {
    granted: u64,
    partial: u64,
    empty: u64,
    returned: u64,
    error: u64,
}

impl Cluster {
    fn new(c: &ClusterPanel, v: &ClusterView) -> Self {
        let round = |x: f64, digits: i32| {
            let f = 10f64.powi(digits);
            (x * f).round() / f
        };
        let [granted, partial, empty, returned, error] = c.leases;
        let mode = usize::try_from(c.mode)
            .ok()
            .and_then(|i| Mode::ALL.get(i))
            .copied()
            .unwrap_or(Mode::Fallback);
        Self {
            budget: v.budget.to_string(),
            replica: v.replica.to_string(),
            mode: mode.as_str(),
            backend_up: c.backend_up != 0,
            replicas: c.replicas,
            share: round(v.own_share(), 4),
            shares: crate::exposition::cluster::shares(v)
                .into_iter()
                .map(|(replica, sends)| Share {
                    replica: replica.to_owned(),
                    sends,
                })
                .collect(),
            fallback_limit: c.fallback_limit,
            reserved: c.reserved,
            learning: c.learning != 0,
            generation: Some(v.generation.clone()).filter(|g| !g.is_empty()),
            record: (c.record_version != 0).then(|| ClusterRecord {
                version: c.record_version,
                rate_rpm: c.record_rate_rpm,
                bucket_capacity: c.record_bucket_capacity,
                window_secs: round(c.record_window_s, 3),
                fallback: c.record_fallback != 0,
                learned: c.record_learned,
                limit: c.record_limit,
                source: v.record.source.clone(),
                probing: c.record_probing != 0,
                rpm: round(c.record_rpm, 3),
                retreat_factor: round(c.record_retreat_factor, 4),
                pause_reason: Some(v.record.pause_reason.clone())
                    .filter(|r| !r.is_empty() && v.record.pause_until_ms != 0),
            }),
            leases: Leases {
                granted,
                partial,
                empty,
                returned,
                error,
            },
            round_trips: c.round_trips,
            admitted: c.admitted,
            round_trip_ms: Percentiles {
                p50: opt(c.round_trip_p50_ms).map(|x| round(x, 3)),
                p90: None,
                p99: opt(c.round_trip_p99_ms).map(|x| round(x, 3)),
                count: c.round_trips,
            },
            down_for_secs: opt(c.down_for_s).map(|x| round(x, 3)),
        }
    }
}

/// The provider's token budget, tokens per window, and its token counts since start
/// (the same numbers as `sidecar_token_budget_*` and `sidecar_tokens_total{kind}`).
#[derive(Serialize)]
struct Tokens {
    /// Allowed now (the lowest of the configured, stated and learned limits), and
    /// configured.
    limit: u64,
    ceiling: u64,
    /// `null` until the provider states its limit.
    stated: Option<u64>,
    /// Charged in the rolling window (reservations included); what is left of the limit.
    charged: u64,
    remaining: u64,
    /// Estimated tokens of the requests parked in the queue.
    waiting: u64,
    /// Seconds left of a hold after a 429 about tokens; `null` when not held.
    held_s: Option<f64>,
    /// Since start, by kind: reported by the provider (prompt, completion), reserved at
    /// admission (estimated), charged in the end (settled).
    totals: TokenTotals,
    /// Refused because the estimate exceeds a whole window.
    refused_too_large: u64,
    /// `estimate ÷ actual` over the settlements with usage: their number and mean
    /// (`null` before the first).
    estimate_ratio: EstimateRatio,
}

#[derive(Serialize)]
struct TokenTotals {
    prompt: u64,
    completion: u64,
    estimated: u64,
    settled: u64,
}

#[derive(Serialize)]
struct EstimateRatio {
    count: u64,
    mean: Option<f64>,
}

impl Tokens {
    /// `None` when the provider has no token budget.
    fn new(t: &TokenPanel) -> Option<Self> {
        let round = |x: f64| (x * 1e3).round() / 1e3;
        (t.present != 0).then(|| Self {
            limit: t.limit,
            ceiling: t.ceiling,
            stated: (t.stated != 0).then_some(t.stated),
            charged: t.charged,
            remaining: t.remaining,
            waiting: t.waiting,
            held_s: (t.held_s > 0.0).then(|| round(t.held_s)),
            totals: TokenTotals {
                prompt: t.prompt,
                completion: t.completion,
                estimated: t.estimated,
                settled: t.settled,
            },
            refused_too_large: t.refused_too_large,
            estimate_ratio: EstimateRatio {
                count: t.ratio_count,
                mean: opt(t.ratio_mean).map(round),
            },
        })
    }
}

#[derive(Serialize)]
struct Requests {
    /// Routed to the provider; of those, admitted through the bucket, sent through.
    total: u64,
    limited: u64,
    passthrough: u64,
    per_second: f64,
    /// The provider's part of the request ledger: ended by outcome, in flight now.
    in_flight: u64,
    outcomes: BTreeMap<&'static str, u64>,
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

/// Depth now, and the totals since start (the Python service's `total_enqueued`,
/// `total_dequeued`, `total_dropped`): `enqueued = dequeued + dropped + total`.
#[derive(Serialize)]
struct Queue {
    depth: Depth,
    total: u64,
    max: u64,
    enqueued: u64,
    dequeued: u64,
    dropped: u64,
    /// By reason (`client_gone`, `low_priority_deadline`, `timeout`, `beyond_deadline`,
    /// `shutdown`, `tokens_too_large`).
    dropped_by_reason: BTreeMap<&'static str, u64>,
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
        let series = |f: fn(&Point) -> f32| -> Vec<Option<f32>> {
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
                in_flight: p.in_flight,
                outcomes: by_outcome(&p.outcomes),
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
                enqueued: p.queue_enqueued,
                dequeued: p.queue_dequeued,
                dropped: p.queue_dropped.iter().sum(),
                dropped_by_reason: DropReason::ALL
                    .into_iter()
                    .map(|why| (why.as_str(), p.queue_dropped[why as usize]))
                    .collect(),
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
            cluster: None,
            tokens: Tokens::new(&p.tokens),
        }
    }
}

#[cfg(test)]
mod tests;
