use super::*;
use crate::dashboard::publisher::{cluster_numbers, token_panel};
use crate::exposition::cluster::tests::{hist, view};

#[test]
fn a_budget_becomes_the_cluster_object_the_dashboard_reads() {
    let mut v = view();
    v.record.pause_until_ms = 5;
    v.record.pause_reason = "quota".into();
    let h = hist(&[1_000, 2_000, 3_000, 40_000]);
    let c = Cluster::new(&cluster_numbers(&v, &h), &v);
    let mut json = serde_json::to_value(&c).unwrap();
    // HDR quantiles are within 1%.
    let rt = json["round_trip_ms"].take();
    for (q, want) in [("p50", 2.0), ("p99", 40.0)] {
        let got = rt[q].as_f64().unwrap();
        assert!((got - want).abs() <= want * 0.01, "{q} {got}");
    }
    assert_eq!(rt["count"], 17);
    assert_eq!(
        json,
        serde_json::json!({
            "budget": "shared-nv",
            "replica": "host-a-12-00ff",
            "mode": "shared",
            "backend_up": true,
            "replicas": 3,
            "share": 0.5,
            "shares": [
                {"replica": "host-a-12-00ff", "sends": 30},
                {"replica": "host-b-7-abcd", "sends": 20},
                {"replica": "host-c-9-0001", "sends": 10},
            ],
            "fallback_limit": 13,
            "reserved": 4,
            "learning": true,
            "generation": "g-1",
            "record": {
                "version": 7,
                "rate_rpm": 40.0,
                "bucket_capacity": 5,
                "window_secs": 60.0,
                "fallback": true,
                "learned": 36,
                "limit": 36,
                "source": "learned_429",
                "probing": false,
                "rpm": 36.0,
                "retreat_factor": 1.0,
                "pause_reason": "quota",
            },
            "leases": {"granted": 11, "partial": 2, "empty": 3, "returned": 4, "error": 1},
            "round_trips": 17,
            "admitted": 40,
            "round_trip_ms": null,
            "down_for_secs": null,
        })
    );
}

#[test]
fn before_redis_answers_the_record_generation_and_percentiles_are_null() {
    let mut v = ClusterView::new("nvidia".into(), "me-1-0000".into());
    v.down_for = Some(std::time::Duration::from_millis(2_500));
    v.mode = Mode::Isolated;
    let c = Cluster::new(&cluster_numbers(&v, &hist(&[])), &v);
    let json = serde_json::to_value(&c).unwrap();
    assert_eq!(json["mode"], "isolated");
    assert_eq!(json["backend_up"], false);
    assert_eq!(
        json["shares"],
        serde_json::json!([{"replica": "me-1-0000", "sends": 0}])
    );
    for key in ["record", "generation"] {
        assert!(json[key].is_null(), "{key}: {json}");
    }
    assert!(json["round_trip_ms"]["p50"].is_null(), "{json}");
    assert!(json["round_trip_ms"]["p99"].is_null(), "{json}");
    assert_eq!(json["down_for_secs"], 2.5);
}

/// A provider's stats after three settlements (ratios 1.0 and 1.5; one without usage)
/// and a refusal.
fn token_stats() -> crate::stats::StatsSnapshot {
    let s = crate::stats::ProviderStats::default();
    s.settle_tokens(100, 100, Some((60, 40)));
    s.settle_tokens(300, 250, Some((150, 50)));
    s.settle_tokens(70, 70, None);
    s.refuse_tokens_too_large();
    s.snapshot()
}

#[test]
fn a_token_budget_becomes_the_tokens_object_the_dashboard_reads() {
    let now = 5_000_000_000;
    let v = crate::limiter::TokenView {
        limit: 8_000,
        ceiling: 10_000,
        stated: Some(8_000),
        waiting: 1_200,
        charged: 4_500,
        remaining: 3_500,
        held_until: now + 1_250_000_000,
    };
    let panel = token_panel(Some(&v), &token_stats(), now);
    let json = serde_json::to_value(Tokens::new(&panel).expect("a budget")).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "limit": 8000,
            "ceiling": 10000,
            "stated": 8000,
            "charged": 4500,
            "remaining": 3500,
            "waiting": 1200,
            "held_s": 1.25,
            "totals": {"prompt": 210, "completion": 90, "estimated": 470, "settled": 420},
            "refused_too_large": 1,
            "estimate_ratio": {"count": 2, "mean": 1.25},
        })
    );
}

#[test]
fn before_any_settlement_or_statement_the_tokens_object_has_nulls_not_zeros() {
    let v = crate::limiter::TokenView {
        limit: 10_000,
        ceiling: 10_000,
        ..Default::default()
    };
    let panel = token_panel(Some(&v), &crate::stats::StatsSnapshot::default(), 7);
    let json = serde_json::to_value(Tokens::new(&panel).expect("a budget")).unwrap();
    for key in ["stated", "held_s"] {
        assert!(json[key].is_null(), "{key}: {json}");
    }
    assert!(json["estimate_ratio"]["mean"].is_null(), "{json}");
    assert_eq!(json["estimate_ratio"]["count"], 0);
    assert_eq!(json["remaining"], 0);
    assert_eq!(json["limit"], 10_000);
}

#[test]
fn a_provider_without_a_token_budget_has_no_tokens_object_even_with_counts() {
    let panel = token_panel(None, &token_stats(), 0);
    assert_eq!(
        panel,
        <crate::snapshot::TokenPanel as bytemuck::Zeroable>::zeroed()
    );
    assert!(Tokens::new(&panel).is_none());
}

#[test]
fn the_published_snapshot_carries_the_token_budget_of_a_provider_holding_one() {
    use crate::limiter::{Limiter, Pacing, RetreatConfig};
    use std::sync::Arc;
    let mut app = crate::app::App::new(crate::config::testing::config("", &[]));
    let now = app.clock.now_nanos();
    let budgeted =
        Limiter::with_pacing(40.0, 1, 8, RetreatConfig::default(), Pacing::default(), now)
            .with_token_budget(6_000);
    Arc::get_mut(&mut app).expect("the only handle").providers[0].limiter = Arc::new(budgeted);
    app.providers[0]
        .stats
        .settle_tokens(300, 250, Some((150, 50)));
    let mut publisher = crate::dashboard::Publisher::new(Arc::clone(&app));
    let snap = *publisher.build(std::time::Instant::now());
    let json: serde_json::Value = serde_json::from_slice(&encode(&app, &snap, 2)).unwrap();
    let t = &json["providers"][0]["tokens"];
    assert_eq!(t["limit"], 6_000, "{json}");
    assert_eq!(t["ceiling"], 6_000);
    assert_eq!(t["remaining"], 6_000);
    assert_eq!(
        t["totals"],
        serde_json::json!({"prompt": 150, "completion": 50, "estimated": 300, "settled": 250})
    );
    assert_eq!(
        t["estimate_ratio"],
        serde_json::json!({"count": 1, "mean": 1.5})
    );
}
