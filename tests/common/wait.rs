//! Bounded polls: waiting for an observed state (a condition, what the dashboard
//! snapshot shows) instead of sleeping, failing the test with what it waited for when
//! the bound passes.

use std::net::SocketAddr;
use std::time::Duration;

use super::{call, req, Answer};

/// Waits for `cond` by polling (an observed event, not a sleep), for at most 20 s.
pub async fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, Duration::from_secs(20), cond).await;
}

/// [`wait_until`] for at most `bound`.
pub async fn wait_until_within(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + bound;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Polls `GET /api/dashboard/snapshot` of the sidecar at `addr` (a JSON 200 each time)
/// until `cond` holds for the snapshot, for at most 20 s; returns that snapshot.
pub async fn snapshot_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    snapshot_answer_until(addr, what, cond).await.json()
}

/// [`snapshot_until`], returning the answer itself (the snapshot's text as sent).
pub async fn snapshot_answer_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Answer {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let a = call(addr, req("GET", addr, "/api/dashboard/snapshot", &[], "")).await;
        assert_eq!(a.status, 200, "/api/dashboard/snapshot: {}", a.text());
        assert_eq!(a.headers["content-type"], "application/json");
        let v = a.json();
        if cond(&v) {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the snapshot never showed {what}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
