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

/// `sidecar_tokens_total{provider, kind}` in a `/metrics` text, whatever the order of
/// its labels.
pub fn tokens_total(text: &str, provider: &str, kind: &str) -> Option<f64> {
    let mut wanted = [
        format!("provider=\"{provider}\""),
        format!("kind=\"{kind}\""),
    ];
    wanted.sort_unstable();
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let inner = series
            .strip_prefix("sidecar_tokens_total{")?
            .strip_suffix('}')?;
        let mut found: Vec<&str> = inner.split(',').collect();
        found.sort_unstable();
        (found == wanted).then(|| value.parse().ok()).flatten()
    })
}
