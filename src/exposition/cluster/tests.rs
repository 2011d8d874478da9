use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;

use super::*;
use crate::budget::{LeaseCounts, Record};

/// Renders only the cluster families of `budgets`.
pub(crate) fn render(budgets: Vec<Budgeted<'static>>) -> String {
    #[derive(Debug)]
    struct Only(Vec<Budgeted<'static>>);
    impl Collector for Only {
        fn encode(&self, mut enc: DescriptorEncoder) -> Res {
            encode(&mut enc, &self.0)
        }
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Only(budgets)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
    out
}

/// A replica in shared mode with two peers, a record and some round trips.
pub(crate) fn view() -> ClusterView {
    let mut v = ClusterView::new(Arc::from("shared-nv"), Arc::from("host-a-12-00ff"));
    v.mode = Mode::Shared;
    v.backend_up = true;
    v.replicas = 3;
    v.shares = vec![
        (Arc::from("host-c-9-0001"), 10),
        (Arc::from("host-a-12-00ff"), 30),
        (Arc::from("host-b-7-abcd"), 20),
    ];
    v.fallback_limit = 13;
    v.reserved = 4;
    v.learning = true;
    v.record = Record {
        version: 7,
        rate_rpm: 40.0,
        bucket_capacity: 5,
        window: Duration::from_secs(60),
        fallback: true,
        learned: 36,
        limit: 36,
        source: "learned_429".into(),
        probing: false,
        rpm: 36.0,
        retreat_factor: 1.0,
        pause_until_ms: 0,
        pause_reason: String::new(),
        changes: 2,
        ..Record::default()
    };
    v.generation = "g-1".into();
    v.leases = LeaseCounts {
        granted: 11,
        partial: 2,
        empty: 3,
        returned: 4,
        error: 1,
        late: 5,
    };
    v.round_trips = 17;
    v.admitted = 40;
    v
}

pub(crate) fn hist(us: &[u64]) -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 60_000_000, 2).unwrap();
    for v in us {
        h.record(*v).unwrap();
    }
    h
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(|v| v.parse().expect("a number"))
    })
}

#[test]
fn no_budget_writes_nothing() {
    assert_eq!(render(Vec::new()), "");
}

#[test]
fn every_series_of_a_budget_is_written_with_its_value() {
    let text = render(vec![Budgeted {
        provider: "nvidia",
        view: view(),
        round_trips: hist(&[200, 800, 3_000, 3_000, 40_000]),
    }]);
    let p = "provider=\"nvidia\"";
    let want = [
        (format!("sidecar_budget_backend_up{{{p}}}"), 1.0),
        (format!("sidecar_cluster_replicas{{{p}}}"), 3.0),
        (format!("sidecar_cluster_share{{{p}}}"), 0.5),
        (format!("sidecar_budget_fallback_limit{{{p}}}"), 13.0),
        (format!("sidecar_budget_reserved{{{p}}}"), 4.0),
        (format!("sidecar_budget_learning{{{p}}}"), 1.0),
        (format!("sidecar_budget_record_version{{{p}}}"), 7.0),
        (format!("sidecar_budget_round_trips_total{{{p}}}"), 17.0),
        (format!("sidecar_budget_admitted_total{{{p}}}"), 40.0),
        (
            format!("sidecar_budget_leases_total{{{p},result=\"granted\"}}"),
            11.0,
        ),
        (
            format!("sidecar_budget_leases_total{{{p},result=\"partial\"}}"),
            2.0,
        ),
        (
            format!("sidecar_budget_leases_total{{{p},result=\"empty\"}}"),
            3.0,
        ),
        (
            format!("sidecar_budget_leases_total{{{p},result=\"returned\"}}"),
            4.0,
        ),
        (
            format!("sidecar_budget_leases_total{{{p},result=\"error\"}}"),
            1.0,
        ),
        (
            format!("sidecar_budget_leases_total{{{p},result=\"late\"}}"),
            5.0,
        ),
        (format!("sidecar_cluster_mode{{{p},mode=\"shared\"}}"), 1.0),
        (
            format!("sidecar_cluster_mode{{{p},mode=\"fallback\"}}"),
            0.0,
        ),
        (
            format!("sidecar_cluster_mode{{{p},mode=\"isolated\"}}"),
            0.0,
        ),
        (
            format!("sidecar_cluster_replica_window_sends{{{p},replica=\"host-a-12-00ff\"}}"),
            30.0,
        ),
        (
            format!("sidecar_cluster_replica_window_sends{{{p},replica=\"host-b-7-abcd\"}}"),
            20.0,
        ),
        (
            format!("sidecar_cluster_replica_window_sends{{{p},replica=\"host-c-9-0001\"}}"),
            10.0,
        ),
        (
            format!("sidecar_budget_info{{{p},budget=\"shared-nv\",replica=\"host-a-12-00ff\"}}"),
            1.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_count{{{p}}}"),
            5.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_bucket{{{p},le=\"0.00025\"}}"),
            1.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_bucket{{{p},le=\"0.001\"}}"),
            2.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_bucket{{{p},le=\"0.005\"}}"),
            4.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_bucket{{{p},le=\"0.05\"}}"),
            5.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_bucket{{{p},le=\"+Inf\"}}"),
            5.0,
        ),
    ];
    for (series, value) in &want {
        assert_eq!(sample(&text, series), Some(*value), "{series} in:\n{text}");
    }
    let sum = sample(
        &text,
        &format!("sidecar_budget_round_trip_seconds_sum{{{p}}}"),
    )
    .unwrap();
    assert!((sum - 0.047).abs() < 0.047 * 0.01, "sum {sum}");
    for (ty, family) in [
        ("gauge", "sidecar_budget_backend_up"),
        ("histogram", "sidecar_budget_round_trip_seconds"),
        ("counter", "sidecar_budget_leases_total"),
        ("counter", "sidecar_budget_round_trips_total"),
        ("gauge", "sidecar_cluster_replicas"),
        ("gauge", "sidecar_cluster_mode"),
        ("gauge", "sidecar_cluster_share"),
        ("gauge", "sidecar_cluster_replica_window_sends"),
        ("gauge", "sidecar_budget_fallback_limit"),
        ("gauge", "sidecar_budget_reserved"),
        ("gauge", "sidecar_budget_learning"),
        ("gauge", "sidecar_budget_record_version"),
        ("gauge", "sidecar_budget_info"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {ty}\n")),
            "{family} {ty}:\n{text}"
        );
        let help = format!("# HELP {family} ");
        let line = text.lines().find(|l| l.starts_with(&help));
        assert!(
            line.is_some_and(|l| l.len() > help.len() + 20),
            "{family} has a HELP text:\n{text}"
        );
    }
}

#[test]
fn a_replica_that_never_reached_redis_shows_fallback_down_and_itself_at_zero() {
    let v = ClusterView::new(Arc::from("nvidia"), Arc::from("me-1-0000"));
    let text = render(vec![Budgeted {
        provider: "nvidia",
        view: v,
        round_trips: hist(&[]),
    }]);
    let p = "provider=\"nvidia\"";
    for (series, value) in [
        (format!("sidecar_budget_backend_up{{{p}}}"), 0.0),
        (
            format!("sidecar_cluster_mode{{{p},mode=\"fallback\"}}"),
            1.0,
        ),
        (format!("sidecar_cluster_mode{{{p},mode=\"shared\"}}"), 0.0),
        (format!("sidecar_cluster_share{{{p}}}"), 0.0),
        (
            format!("sidecar_cluster_replica_window_sends{{{p},replica=\"me-1-0000\"}}"),
            0.0,
        ),
        (
            format!("sidecar_budget_round_trip_seconds_count{{{p}}}"),
            0.0,
        ),
        (format!("sidecar_budget_round_trip_seconds_sum{{{p}}}"), 0.0),
        (format!("sidecar_budget_record_version{{{p}}}"), 0.0),
    ] {
        assert_eq!(sample(&text, &series), Some(value), "{series} in:\n{text}");
    }
    assert_eq!(
        text.matches("sidecar_cluster_replica_window_sends{")
            .count(),
        1,
        "only itself:\n{text}"
    );
}

#[test]
fn isolated_mode_is_the_only_one_at_1_and_providers_are_kept_apart() {
    let mut a = view();
    a.mode = Mode::Isolated;
    a.backend_up = false;
    let b = ClusterView::new(Arc::from("other"), Arc::from("host-a-12-00ff"));
    let text = render(vec![
        Budgeted {
            provider: "nvidia",
            view: a,
            round_trips: hist(&[]),
        },
        Budgeted {
            provider: "backup",
            view: b,
            round_trips: hist(&[1_000]),
        },
    ]);
    let modes: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sidecar_cluster_mode{provider=\"nvidia\""))
        .collect();
    assert_eq!(modes.len(), 3, "{text}");
    assert_eq!(
        modes
            .iter()
            .copied()
            .filter(|l| l.ends_with(" 1"))
            .collect::<Vec<_>>(),
        ["sidecar_cluster_mode{provider=\"nvidia\",mode=\"isolated\"} 1"]
    );
    assert_eq!(
        sample(
            &text,
            "sidecar_budget_round_trip_seconds_count{provider=\"backup\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "sidecar_budget_backend_up{provider=\"nvidia\"}"),
        Some(0.0)
    );
    // One HELP per family, whatever the number of budgets.
    assert_eq!(text.matches("# HELP sidecar_budget_backend_up ").count(), 1);
}

#[test]
fn shares_list_every_live_replica_once_sorted_with_this_one() {
    let v = view();
    assert_eq!(
        shares(&v),
        [
            ("host-a-12-00ff", 30),
            ("host-b-7-abcd", 20),
            ("host-c-9-0001", 10)
        ]
    );
    let mut alone = view();
    alone.shares.retain(|(r, _)| &**r != "host-a-12-00ff");
    assert_eq!(shares(&alone)[0], ("host-a-12-00ff", 0));
    assert_eq!(shares(&alone).len(), 3);
}

#[test]
fn token_leases_are_written_only_once_a_token_lease_was_asked_for() {
    let plain = render(vec![Budgeted {
        provider: "nvidia",
        view: view(),
        round_trips: hist(&[200]),
    }]);
    assert!(!plain.contains("sidecar_budget_token_leases"), "{plain}");
    let mut v = view();
    v.token_leases = LeaseCounts {
        granted: 9,
        empty: 4,
        returned: 1_200,
        late: 2,
        ..LeaseCounts::default()
    };
    let text = render(vec![Budgeted {
        provider: "nvidia",
        view: v,
        round_trips: hist(&[200]),
    }]);
    assert!(
        text.contains("# TYPE sidecar_budget_token_leases_total counter\n"),
        "{text}"
    );
    let series = |r: &str| {
        sample(
            &text,
            &format!("sidecar_budget_token_leases_total{{provider=\"nvidia\",result=\"{r}\"}}"),
        )
    };
    assert_eq!(
        ["granted", "partial", "empty", "returned", "error", "late"].map(series),
        [
            Some(9.0),
            Some(0.0),
            Some(4.0),
            Some(1_200.0),
            Some(0.0),
            Some(2.0)
        ]
    );
}
