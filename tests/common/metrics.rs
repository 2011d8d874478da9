//! `GET /metrics` as text, and one sample of it.

use std::net::SocketAddr;

use super::{call, req};

/// `GET /metrics` of the metrics listener at `addr`, answered 200, as text.
pub async fn metrics_text(addr: SocketAddr) -> String {
    let a = call(addr, req("GET", addr, "/metrics", &[], "")).await;
    assert_eq!(a.status, 200, "/metrics: {}", a.text());
    a.text()
}

/// The value of the sample whose name and labels are exactly `series`
/// (`name{a="x",b="y"}`, labels in the order the sidecar writes them).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == series).then(|| v.parse().expect("a number"))
    })
}
