//! The shared budget's series (cluster mode, `redis_url` set): one set per provider
//! that has a budget ([`crate::budget::Budget`]), read from its [`ClusterView`] and its
//! round-trip histogram at scrape time. A sidecar pacing alone has no budget and writes
//! none of these families, not even their `# HELP` lines.
//!
//! Labels: `provider`, plus `result` (lease results), `mode` (shared, fallback,
//! isolated) and `replica` (the ids of the replicas live in the shared window: bounded
//! by the live replicas; a replica id is not a secret).

use hdrhistogram::Histogram;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::family::{family, Res};
use crate::budget::{ClusterView, LeaseCounts};
use crate::limiter::Mode;
use crate::metrics::series::hdr_buckets;

/// Bucket bounds of `sidecar_budget_round_trip_seconds`, in seconds: 100 µs (a local
/// Redis) to 5 s (the longest `redis_timeout`).
pub const ROUND_TRIP_BUCKETS: [f64; 15] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// One provider's shared budget, copied at scrape time.
#[derive(Debug)]
pub struct Budgeted<'a> {
    pub provider: &'a str,
    pub view: ClusterView,
    /// Script round trips, in microseconds, since start.
    pub round_trips: Histogram<u64>,
}

/// The budgets of `app`'s providers (empty when it paces alone).
pub fn collect(app: &crate::app::App) -> Vec<Budgeted<'_>> {
    app.providers
        .iter()
        .filter_map(|p| {
            p.budget.as_ref().map(|b| Budgeted {
                provider: &p.name,
                view: b.view(),
                round_trips: b.round_trips(),
            })
        })
        .collect()
}

/// Each live replica's grants in the shared window, this replica always among them
/// (with 0 when it has none, or has not reached Redis yet), sorted by replica id.
pub fn shares(v: &ClusterView) -> Vec<(&str, u32)> {
    let mut out: Vec<(&str, u32)> = v.shares.iter().map(|(r, n)| (&**r, *n)).collect();
    if !out.iter().any(|(r, _)| *r == &*v.replica) {
        out.push((&v.replica, 0));
    }
    out.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out
}

/// The sum of a round-trip histogram in seconds (within 1%: HDR keeps no exact sum).
pub fn sum_seconds(h: &Histogram<u64>) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.mean() * h.len() as f64 / 1e6
    }
}

type ReadView = fn(&ClusterView) -> f64;
type CountView = fn(&ClusterView) -> u64;

fn flag(b: bool) -> f64 {
    f64::from(u8::from(b))
}

/// Writes every cluster family; nothing at all when `budgets` is empty.
pub fn encode(enc: &mut DescriptorEncoder, budgets: &[Budgeted]) -> Res {
    if budgets.is_empty() {
        return Ok(());
    }
    let mut f = family(
        enc,
        "sidecar_budget_info",
        "Always 1 per provider with a budget shared through Redis; the labels say the budget's name (the provider's unless renamed) and this replica's id.",
        MetricType::Gauge,
    )?;
    for b in budgets {
        f.gauge(
            &[
                ("provider", b.provider),
                ("budget", &b.view.budget),
                ("replica", &b.view.replica),
            ],
            1i64,
        )?;
    }

    let mut f = family(
        enc,
        "sidecar_budget_round_trip_seconds",
        "Round trips of the shared budget's script calls to Redis (leases, reports, heartbeats), timeouts included; the sum is within 1%.",
        MetricType::Histogram,
    )?;
    for b in budgets {
        let h = &b.round_trips;
        let buckets: [(f64, u64); ROUND_TRIP_BUCKETS.len() + 1] =
            hdr_buckets(h, &ROUND_TRIP_BUCKETS);
        f.histogram_buckets(
            &[("provider", b.provider)],
            sum_seconds(h),
            h.len(),
            &buckets,
        )?;
    }

    let mut f = family(
        enc,
        "sidecar_budget_leases",
        "Lease calls to Redis by result: granted (all that was asked for), partial (less, but some), empty (none: the shared budget is spent for now, or paused), error (the call failed or timed out); returned counts unused tokens given back, not calls; late the requests written after their lease's time (counted again from their send).",
        MetricType::Counter,
    )?;
    for b in budgets {
        let late = ("late", b.view.leases.late);
        for (result, n) in b.view.leases.labelled().into_iter().chain([late]) {
            f.counter(&[("provider", b.provider), ("result", result)], n)?;
        }
    }
    if budgets
        .iter()
        .any(|b| b.view.token_leases != LeaseCounts::default())
    {
        let mut f = family(
            enc,
            "sidecar_budget_token_leases",
            "Token lease calls to Redis (the shared token budget) by result, as sidecar_budget_leases; returned counts unused tokens given back, late the sends written after their lease's time (counted again from their send).",
            MetricType::Counter,
        )?;
        for b in budgets {
            let late = ("late", b.view.token_leases.late);
            for (result, n) in b.view.token_leases.labelled().into_iter().chain([late]) {
                f.counter(&[("provider", b.provider), ("result", result)], n)?;
            }
        }
    }
    let counters: [(&str, &str, CountView); 2] = [
        (
            "sidecar_budget_round_trips",
            "Script calls this replica made to Redis for the shared budget (every kind, failed ones included).",
            |v| v.round_trips,
        ),
        (
            "sidecar_budget_admitted",
            "Requests this replica admitted with tokens leased from the shared budget.",
            |v| v.admitted,
        ),
    ];
    for (metric, help, get) in counters {
        let mut f = family(enc, metric, help, MetricType::Counter)?;
        for b in budgets {
            f.counter(&[("provider", b.provider)], get(&b.view))?;
        }
    }

    let mut f = family(
        enc,
        "sidecar_cluster_mode",
        "1 for how this replica gets its tokens now, 0 for the others: shared (leases from Redis), fallback (Redis lost: its fallback share of the limit, alone), isolated (lost for longer than redis_fallback_for: nothing sent until Redis answers).",
        MetricType::Gauge,
    )?;
    for b in budgets {
        for m in Mode::ALL {
            f.gauge(
                &[("provider", b.provider), ("mode", m.as_str())],
                i64::from(b.view.mode == m),
            )?;
        }
    }
    let gauges: [(&str, &str, ReadView); 7] = [
        (
            "sidecar_budget_backend_up",
            "1 while the last call to Redis succeeded, 0 while Redis is lost or not reached yet (the replica then paces on its fallback share).",
            |v| flag(v.backend_up),
        ),
        (
            "sidecar_cluster_replicas",
            "Replicas of the shared budget that heartbeated within the last 3 seconds, this one included (the last count seen while Redis is lost).",
            |v| f64::from(v.replicas),
        ),
        (
            "sidecar_cluster_share",
            "This replica's part (0 to 1) of the grants the whole cluster made in the current shared window.",
            ClusterView::own_share,
        ),
        (
            "sidecar_budget_fallback_limit",
            "Sends per provider window this replica may make alone while Redis is lost: the shared limit divided by the live replicas it last saw.",
            |v| f64::from(v.fallback_limit),
        ),
        (
            "sidecar_budget_reserved",
            "Sends per provider window kept reserved for replicas that vanished but may still be sending on their fallback share (until redis_fallback_for has passed).",
            |v| f64::from(v.reserved),
        ),
        (
            "sidecar_budget_learning",
            "1 during the first window of a new generation (Redis lost the shared state), when each replica takes at most its share; else 0.",
            |v| flag(v.learning),
        ),
        (
            "sidecar_budget_record_version",
            "Version of the budget's shared record (rate, capacity, window, learned limit, fallback) as this replica last read it; every change bumps it, 0: not read yet.",
            |v| v.record.version as f64,
        ),
    ];
    for (metric, help, get) in gauges {
        let mut f = family(enc, metric, help, MetricType::Gauge)?;
        for b in budgets {
            f.gauge(&[("provider", b.provider)], get(&b.view))?;
        }
    }
    let mut f = family(
        enc,
        "sidecar_cluster_replica_window_sends",
        "Grants each live replica of the shared budget (by replica id) received in the current shared window; this replica is always listed.",
        MetricType::Gauge,
    )?;
    for b in budgets {
        for (replica, n) in shares(&b.view) {
            f.gauge(
                &[("provider", b.provider), ("replica", replica)],
                i64::from(n),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests;
