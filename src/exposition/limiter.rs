//! The limiter's families: the queue's flow (enqueued, dequeued, dropped per priority)
//! and the learned limit (what the window guard allows, where it comes from, probing
//! and pauses).

use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::family::{family, Read, Res};
use crate::app::ProviderSnapshot;
use crate::limiter::{DropReason, Flow, PauseReason, Source};
use crate::priority::Priority;

/// The queue's totals since start, per priority: for each, `enqueued = dequeued +
/// dropped + sidecar_queue_depth` (a scrape racing a grant may see one request in
/// neither place). A request put back after an upstream 429 is enqueued again.
pub(super) fn queue_flow(
    enc: &mut DescriptorEncoder,
    names: &[&str],
    snaps: &[ProviderSnapshot],
) -> Res {
    type Total = fn(&Flow) -> u64;
    let totals: [(&str, &str, Total); 2] = [
        (
            "sidecar_queue_enqueued",
            "Requests parked in the queue, by priority (a request put back after an upstream 429 counts again).",
            |f| f.enqueued,
        ),
        (
            "sidecar_queue_dequeued",
            "Requests taken out of the queue with a token, to be sent, by priority.",
            |f| f.dequeued,
        ),
    ];
    for (metric, help, get) in totals {
        let mut f = family(enc, metric, help, MetricType::Counter)?;
        for (name, s) in names.iter().zip(snaps) {
            for p in Priority::ALL {
                f.counter(
                    &[("provider", name), ("priority", p.as_str())],
                    get(&s.queue.flow[p as usize]),
                )?;
            }
        }
    }
    let mut f = family(
        enc,
        "sidecar_queue_dropped",
        "Requests taken out of the queue without a token, by priority and reason: client_gone, low_priority_deadline, timeout (the request timeout), beyond_deadline (the queue ahead could not be served in time), shutdown, tokens_too_large (the token limit fell below its estimate while it waited).",
        MetricType::Counter,
    )?;
    for (name, s) in names.iter().zip(snaps) {
        for p in Priority::ALL {
            for why in DropReason::ALL {
                f.counter(
                    &[
                        ("provider", name),
                        ("priority", p.as_str()),
                        ("reason", why.as_str()),
                    ],
                    s.queue.flow[p as usize].dropped[why as usize],
                )?;
            }
        }
    }
    Ok(())
}

/// The learned limit of each provider ([`crate::limiter::PacingView`]): what the window
/// guard allows, where that comes from, probing and pauses.
pub(super) fn pacing(
    enc: &mut DescriptorEncoder,
    names: &[&str],
    snaps: &[ProviderSnapshot],
    now: u64,
) -> Res {
    let secs = |nanos: u64| nanos as f64 / 1e9;
    let gauges: [(&str, &str, Read); 6] = [
        (
            "sidecar_limit_learned_rpm",
            "The provider's limit as learned, in requests per minute (the configured rate while nothing lower was learned).",
            |s| s.pacing.learned_rpm,
        ),
        (
            "sidecar_limit_ceiling_rpm",
            "The configured rate_rpm: the most the learned limit may reach.",
            |s| s.pacing.ceiling_rpm,
        ),
        (
            "sidecar_limit_per_window",
            "Sends per provider window the window guard allows now (the learned limit, or the ceiling while probing).",
            |s| f64::from(s.pacing.limit),
        ),
        (
            "sidecar_provider_window_seconds",
            "Length of the rolling window the provider counts requests in.",
            |s| s.pacing.window.as_secs_f64(),
        ),
        (
            "sidecar_limit_probing",
            "1 while a probe lifts the limit to the ceiling for one window, else 0.",
            |s| f64::from(u8::from(s.pacing.probing)),
        ),
        (
            "sidecar_sent_in_window",
            "Sends stamped in the last provider window, as the window guard counts them.",
            |s| f64::from(s.pacing.sent_in_window),
        ),
    ];
    for (metric, help, get) in gauges {
        let mut f = family(enc, metric, help, MetricType::Gauge)?;
        for (name, s) in names.iter().zip(snaps) {
            f.gauge(&[("provider", name)], get(s))?;
        }
    }
    let mut f = family(
        enc,
        "sidecar_limit_next_probe_seconds",
        "Seconds until the next probe above the learned limit may start (it starts only while demand exceeds the limit); 0 when one may start now or there is nothing to probe (the learned limit is the ceiling, or the provider's headers state it).",
        MetricType::Gauge,
    )?;
    for (name, s) in names.iter().zip(snaps) {
        let left = s
            .pacing
            .next_probe_at
            .map_or(0, |at| at.saturating_sub(now));
        f.gauge(&[("provider", name)], secs(left))?;
    }
    let mut f = family(
        enc,
        "sidecar_limit_source",
        "1 for where the limit in force comes from (config, header, learned_429, probe, state), 0 for the others.",
        MetricType::Gauge,
    )?;
    for (name, s) in names.iter().zip(snaps) {
        for src in Source::ALL {
            f.gauge(
                &[("provider", name), ("source", src.as_str())],
                i64::from(s.pacing.source == src),
            )?;
        }
    }
    let mut f = family(
        enc,
        "sidecar_limit_changes",
        "Changes of the limit in force: learned from a 429 or headers, probed, restored, forgotten, or capped by a new ceiling.",
        MetricType::Counter,
    )?;
    for (name, s) in names.iter().zip(snaps) {
        f.counter(&[("provider", name)], s.pacing.changes)?;
    }
    let mut f = family(
        enc,
        "sidecar_pause_seconds",
        "Seconds left of the current admission pause for its reason (retry_after, quota, window, overload), 0 for the others.",
        MetricType::Gauge,
    )?;
    for (name, s) in names.iter().zip(snaps) {
        for reason in PauseReason::ALL {
            let left = match s.pacing.pause {
                Some((r, until)) if r == reason => until.saturating_sub(now),
                _ => 0,
            };
            f.gauge(
                &[("provider", name), ("reason", reason.as_str())],
                secs(left),
            )?;
        }
    }
    Ok(())
}
