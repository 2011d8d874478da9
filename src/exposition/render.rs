//! `GET /metrics`: every metric in the Prometheus text format (0.0.4), encoded by
//! `prometheus-client` from values read at scrape time.
//!
//! Nothing here runs on the request path: a scrape drains the workers' shards
//! ([`crate::metrics::Metrics::collect`]) and copies each provider's atomics. Labels are
//! `provider` and small fixed sets (route, outcome, kind, priority, reason, state,
//! source; in cluster mode also result, mode, budget and replica: see [`super::cluster`];
//! token kinds: see `tokens.rs`),
//! never the model: model names come from clients, so per-model detail stays in the JSON
//! logs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::family::{family, Read, Res};
use super::limiter::{pacing, queue_flow};
use crate::app::App;
use crate::limiter::{DropReason, RetreatState};
use crate::metrics::{ErrorKind, Lane, Outcome};
use crate::priority::Priority;

/// `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders every metric of `app`.
pub fn render(app: &Arc<App>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AppCollector(Arc::clone(app))));
    let mut out = String::with_capacity(16 * 1024);
    // Writing to a String cannot fail, and our collector returns only encoder errors.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

struct AppCollector(Arc<App>);

impl std::fmt::Debug for AppCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppCollector")
    }
}

impl Collector for AppCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Res {
        let app = &*self.0;
        let now = app.clock.now_nanos();
        let snaps: Vec<_> = app.providers.iter().map(|p| p.snapshot(now)).collect();
        let names: Vec<&str> = app.providers.iter().map(|p| &*p.name).collect();
        let totals = app.metrics.collect(Instant::now());
        let series = &totals.providers;

        let mut f = family(
            &mut enc,
            "sidecar_upstream_latency_seconds",
            "From sending a request upstream to the upstream's response head.",
            MetricType::Histogram,
        )?;
        for (name, s) in names.iter().zip(series) {
            f.histogram(&[("provider", name)], &s.upstream_latency)?;
        }
        let mut f = family(
            &mut enc,
            "sidecar_time_to_first_byte_seconds",
            "From a request's arrival to the first body byte sent to the client (queue wait included).",
            MetricType::Histogram,
        )?;
        for (name, s) in names.iter().zip(series) {
            f.histogram(&[("provider", name)], &s.ttfb)?;
        }
        let mut f = family(
            &mut enc,
            "sidecar_request_duration_seconds",
            "From a request's arrival to its last byte, by route (none: answered by the sidecar without going upstream).",
            MetricType::Histogram,
        )?;
        for (name, s) in names.iter().zip(series) {
            for r in Lane::ALL {
                f.histogram(
                    &[("provider", name), ("route", r.as_str())],
                    &s.duration[r as usize],
                )?;
            }
        }
        let mut f = family(
            &mut enc,
            "sidecar_queue_wait_seconds",
            "Time limited requests waited for a token, by priority (0 when admitted at once).",
            MetricType::Histogram,
        )?;
        for (name, s) in names.iter().zip(series) {
            for p in Priority::ALL {
                f.histogram(
                    &[("provider", name), ("priority", p.as_str())],
                    &s.queue_wait[p as usize],
                )?;
            }
        }

        let mut f = family(
            &mut enc,
            "sidecar_requests",
            "Requests ended, each once, by route (limited: through the token bucket; passthrough: unmetered or fallback; none: never sent upstream) and outcome (client_gone: the client left first, queued included).",
            MetricType::Counter,
        )?;
        for (name, s) in names.iter().zip(series) {
            for r in Lane::ALL {
                for o in Outcome::ALL {
                    f.counter(
                        &[
                            ("provider", name),
                            ("route", r.as_str()),
                            ("outcome", o.as_str()),
                        ],
                        s.requests[r as usize][o as usize],
                    )?;
                }
            }
        }
        let mut f = family(
            &mut enc,
            "sidecar_requests_arrived",
            "Requests accepted under /v1/, counted on arrival; arrived = sum of sidecar_requests_total + sum of sidecar_requests_in_flight.",
            MetricType::Counter,
        )?;
        f.counter(&[], totals.arrived)?;
        let mut f = family(
            &mut enc,
            "sidecar_requests_in_flight",
            "Requests accepted and not yet ended (queued, sent upstream, or streaming their answer); a request not yet routed counts under the default provider.",
            MetricType::Gauge,
        )?;
        for (name, n) in names.iter().zip(&totals.in_flight) {
            f.gauge(&[("provider", name)], *n as i64)?;
        }
        let mut f = family(
            &mut enc,
            "sidecar_invalid_requests",
            "Requests refused before routing: bad headers, body or priority (also in sidecar_requests_total, as the default provider's route none, outcome client_error).",
            MetricType::Counter,
        )?;
        f.counter(&[], totals.invalid)?;
        let mut f = family(
            &mut enc,
            "sidecar_upstream_errors",
            "Upstream failures by kind: connect, timeout, request (failed before a response), status_5xx, stream (cut mid-body), idle_timeout.",
            MetricType::Counter,
        )?;
        for (name, s) in names.iter().zip(series) {
            for k in ErrorKind::ALL {
                f.counter(
                    &[("provider", name), ("kind", k.as_str())],
                    s.errors[k as usize],
                )?;
            }
        }
        drop(totals);

        let mut f = family(
            &mut enc,
            "sidecar_upstream_429",
            "429 answers from the upstream (each retry counts again).",
            MetricType::Counter,
        )?;
        for (name, s) in names.iter().zip(&snaps) {
            f.counter(&[("provider", name)], s.stats.upstream_429)?;
        }
        let mut f = family(
            &mut enc,
            "sidecar_retries",
            "Requests queued again after an upstream 429.",
            MetricType::Counter,
        )?;
        for (name, s) in names.iter().zip(&snaps) {
            f.counter(&[("provider", name)], s.stats.retries)?;
        }
        let mut f = family(
            &mut enc,
            "sidecar_dropped",
            "Requests the sidecar did not send: queue_full (refused or sent to passthrough), low_priority_deadline, timeout (waited past the request timeout), client_gone (left the queue), tokens_too_large (refused: the token estimate exceeds the whole budget of a window, at admission or while parked).",
            MetricType::Counter,
        )?;
        for (name, s) in names.iter().zip(&snaps) {
            for (reason, v) in [
                ("queue_full", s.stats.queue_full),
                ("low_priority_deadline", s.stats.dropped_low_priority),
                ("timeout", s.stats.dropped_timeout),
                ("client_gone", s.queue.dropped(DropReason::ClientGone)),
                ("tokens_too_large", s.stats.refused_tokens_too_large),
            ] {
                f.counter(&[("provider", name), ("reason", reason)], v)?;
            }
        }

        let mut f = family(
            &mut enc,
            "sidecar_queue_depth",
            "Requests waiting for a token, by priority.",
            MetricType::Gauge,
        )?;
        for (name, s) in names.iter().zip(&snaps) {
            for p in Priority::ALL {
                f.gauge(
                    &[("provider", name), ("priority", p.as_str())],
                    s.queue.depth[p as usize] as i64,
                )?;
            }
        }
        queue_flow(&mut enc, &names, &snaps)?;
        let gauges: [(&str, &str, Read); 5] = [
            ("sidecar_queue_max", "Most requests the queue holds.", |s| {
                s.queue.max as f64
            }),
            (
                "sidecar_rate_effective_rpm",
                "Requests per minute the bucket admits now: the learned limit times the retreat factor (below it while retreating).",
                |s| s.retreat.effective_rpm,
            ),
            (
                "sidecar_rate_base_rpm",
                "Configured requests per minute.",
                |s| s.retreat.base_rpm,
            ),
            ("sidecar_bucket_tokens", "Tokens in the bucket now.", |s| {
                s.bucket_tokens
            }),
            (
                "sidecar_bucket_capacity",
                "Most tokens the bucket holds (the burst).",
                |s| f64::from(s.bucket_capacity),
            ),
        ];
        for (metric, help, get) in gauges {
            let mut f = family(&mut enc, metric, help, MetricType::Gauge)?;
            for (name, s) in names.iter().zip(&snaps) {
                f.gauge(&[("provider", name)], get(s))?;
            }
        }
        let mut f = family(
            &mut enc,
            "sidecar_retreat_state",
            "1 for the provider's current retreat state (normal, retreating, recovering), 0 for the others.",
            MetricType::Gauge,
        )?;
        for (name, s) in names.iter().zip(&snaps) {
            for st in RetreatState::ALL {
                f.gauge(
                    &[("provider", name), ("state", st.as_str())],
                    i64::from(s.retreat.state == st),
                )?;
            }
        }

        pacing(&mut enc, &names, &snaps, now)?;
        // Token budgets only: a sidecar where no provider has one writes none of it.
        super::tokens::encode(&mut enc, &super::tokens::collect(app, &snaps, now))?;
        // Cluster mode only: a sidecar pacing alone has no budget and writes none of it.
        super::cluster::encode(&mut enc, &super::cluster::collect(app))?;

        let hub = &app.snapshots;
        let mut f = family(
            &mut enc,
            "sidecar_dashboard_clients",
            "Dashboard SSE streams open now.",
            MetricType::Gauge,
        )?;
        f.gauge(&[], hub.clients() as i64)?;
        let mut f = family(
            &mut enc,
            "sidecar_dashboard_snapshot_builds",
            "Dashboard snapshots built (one per tick, however many clients).",
            MetricType::Counter,
        )?;
        f.counter(&[], hub.builds())?;
        let mut f = family(
            &mut enc,
            "sidecar_admin_changes",
            "Changes through the admin API (configuration patches, forgotten learned limits), by result (applied, rejected).",
            MetricType::Counter,
        )?;
        for (result, v) in [
            ("applied", app.admin_changes.applied.load(Ordering::Relaxed)),
            (
                "rejected",
                app.admin_changes.rejected.load(Ordering::Relaxed),
            ),
        ] {
            f.counter(&[("result", result)], v)?;
        }

        let mut f = family(
            &mut enc,
            "sidecar_build_info",
            "Always 1; the labels say which build is running.",
            MetricType::Gauge,
        )?;
        f.gauge(&[("version", env!("CARGO_PKG_VERSION"))], 1i64)?;
        let mut f = family(
            &mut enc,
            "sidecar_uptime_seconds",
            "Seconds since the sidecar started.",
            MetricType::Gauge,
        )?;
        f.gauge(&[], app.started.elapsed().as_secs_f64())?;

        if let Some(p) = crate::metrics::process::read() {
            let mut f = family(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                MetricType::Gauge,
            )?;
            f.gauge(&[], p.resident_memory_bytes as f64)?;
            let mut f = family(
                &mut enc,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                MetricType::Gauge,
            )?;
            f.gauge(&[], p.virtual_memory_bytes as f64)?;
            let mut f = family(
                &mut enc,
                "process_open_fds",
                "Open file descriptors (sockets included).",
                MetricType::Gauge,
            )?;
            f.gauge(&[], p.open_fds as i64)?;
            if let Some(max) = p.max_fds {
                let mut f = family(
                    &mut enc,
                    "process_max_fds",
                    "Most open file descriptors allowed.",
                    MetricType::Gauge,
                )?;
                f.gauge(&[], max as f64)?;
            }
            let mut f = family(
                &mut enc,
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds.",
                MetricType::Counter,
            )?;
            f.counter(&[], p.cpu_seconds)?;
            let mut f = family(
                &mut enc,
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                MetricType::Gauge,
            )?;
            f.gauge(&[], p.start_time_seconds)?;
        }
        Ok(())
    }
}
