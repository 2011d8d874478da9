use super::*;
use crate::dashboard::publisher::cluster_numbers;
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
