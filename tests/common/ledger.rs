//! The request ledger: what the test client sent to each sidecar, and the ledger the
//! sidecar keeps (`arrived = sum of outcomes + in flight`) as `/metrics` and the
//! dashboard snapshot show it, with the end-of-scenario checks that every request sent
//! arrived and ended exactly once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nvidia_sidecar::app::App;

use super::{call, metrics_text, req, Stack};

/// Requests the test client sent under `/v1/` to each sidecar address: [`send`] counts
/// its own; a test that reaches the sidecar another way (a raw socket, another client)
/// adds them with [`note_sent`].
static SENT: std::sync::Mutex<BTreeMap<SocketAddr, u64>> = std::sync::Mutex::new(BTreeMap::new());

fn sent_map() -> std::sync::MutexGuard<'static, BTreeMap<SocketAddr, u64>> {
    SENT.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counts `n` requests sent to the sidecar at `addr` by a client other than [`send`].
pub fn note_sent(addr: SocketAddr, n: u64) {
    *sent_map().entry(addr).or_default() += n;
}

/// Requests the test client sent under `/v1/` to the sidecar at `addr`.
pub fn sent_to(addr: SocketAddr) -> u64 {
    sent_map().get(&addr).copied().unwrap_or(0)
}

/// Starts the count of a new sidecar at `addr` from zero (a port may be reused).
pub fn forget_sent(addr: SocketAddr) {
    sent_map().remove(&addr);
}

/// The request ledger as one source shows it: requests arrived, how each one ended
/// (outcomes, per provider, all routes together; zeros left out) and those in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pub arrived: u64,
    /// `(provider, outcome)` → requests.
    pub outcomes: BTreeMap<(String, String), u64>,
    /// provider → requests in flight now (zeros left out).
    pub in_flight: BTreeMap<String, u64>,
}

impl Ledger {
    /// Requests that ended, however they ended.
    pub fn ended(&self) -> u64 {
        self.outcomes.values().sum()
    }

    pub fn in_flight_total(&self) -> u64 {
        self.in_flight.values().sum()
    }

    /// Requests of `provider` that ended with `outcome`.
    pub fn outcome(&self, provider: &str, outcome: &str) -> u64 {
        self.outcomes
            .get(&(provider.to_owned(), outcome.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// The ledger in a `/metrics` scrape: `sidecar_requests_arrived_total`,
    /// `sidecar_requests_total{provider,route,outcome}` and
    /// `sidecar_requests_in_flight{provider}`.
    pub fn from_metrics(text: &str) -> Self {
        let mut arrived = None;
        let mut outcomes = BTreeMap::new();
        let mut in_flight = BTreeMap::new();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value: f64 = value.parse().expect("a number");
            let n = value as u64;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, series_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            match name {
                "sidecar_requests_arrived_total" => arrived = Some(n),
                "sidecar_requests_total" if n > 0 => {
                    *outcomes
                        .entry((label("provider"), label("outcome")))
                        .or_default() += n;
                }
                "sidecar_requests_in_flight" if n > 0 => {
                    in_flight.insert(label("provider"), n);
                }
                _ => {}
            }
        }
        Self {
            arrived: arrived.unwrap_or_else(|| {
                panic!("/metrics has no sidecar_requests_arrived_total:\n{text}")
            }),
            outcomes,
            in_flight,
        }
    }

    /// The ledger in a dashboard snapshot: its `requests` object (the totals) must
    /// agree with its providers' `requests`.
    pub fn from_snapshot(v: &serde_json::Value) -> Self {
        let total = &v["requests"];
        let arrived = total["arrived"]
            .as_u64()
            .unwrap_or_else(|| panic!("the snapshot has requests.arrived: {total}"));
        let mut outcomes = BTreeMap::new();
        let mut in_flight = BTreeMap::new();
        for p in v["providers"].as_array().expect("providers") {
            let name = p["name"].as_str().expect("a provider name").to_owned();
            let r = &p["requests"];
            for (outcome, n) in r["outcomes"].as_object().expect("requests.outcomes") {
                let n = n.as_u64().expect("a count");
                if n > 0 {
                    outcomes.insert((name.clone(), outcome.clone()), n);
                }
            }
            let n = r["in_flight"].as_u64().expect("requests.in_flight");
            if n > 0 {
                in_flight.insert(name, n);
            }
        }
        let ledger = Self {
            arrived,
            outcomes,
            in_flight,
        };
        if v["providers_total"] == v["providers"].as_array().map_or(0, Vec::len) {
            assert_eq!(
                total["in_flight"].as_u64(),
                Some(ledger.in_flight_total()),
                "the snapshot's requests.in_flight is its providers' sum: {v}"
            );
            let by_outcome = total["outcomes"].as_object().expect("requests.outcomes");
            assert_eq!(
                by_outcome.values().filter_map(|n| n.as_u64()).sum::<u64>(),
                ledger.ended(),
                "the snapshot's requests.outcomes are its providers' sums: {total}"
            );
        }
        ledger
    }

    /// `arrived = ended + in flight`, the one equation every request keeps.
    pub fn assert_balanced(&self, source: &str) {
        assert_eq!(
            self.arrived,
            self.ended() + self.in_flight_total(),
            "{source}: arrived = sum of outcomes + in flight: {self:#?}"
        );
    }
}

/// `a="x",b="y"` (values without quotes or commas, as the sidecar's are).
fn series_labels(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.trim_matches('"').to_owned()))
        })
        .collect()
}

/// The ledger in a scrape of the metrics listener at `metrics_addr`.
pub async fn metrics_ledger(metrics_addr: SocketAddr) -> Ledger {
    Ledger::from_metrics(&metrics_text(metrics_addr).await)
}

/// The ledger in the latest dashboard snapshot of the sidecar at `addr`.
pub async fn snapshot_ledger(addr: SocketAddr) -> Ledger {
    let a = call(addr, req("GET", addr, "/api/dashboard/snapshot", &[], "")).await;
    assert_eq!(a.status, 200, "/api/dashboard/snapshot: {}", a.text());
    Ledger::from_snapshot(&a.json())
}

/// Waits (at most 20 s) until the dashboard snapshot of the sidecar at `addr` counts at
/// least `sent` arrivals: a test about to hang up on requests it sent waits for them to
/// reach the sidecar first, so none is still on the wire.
pub async fn wait_for_arrivals(addr: SocketAddr, sent: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = snapshot_ledger(addr).await;
        if l.arrived >= sent {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{sent} requests sent, {} arrived: {l:#?}",
            l.arrived
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// At the end of a scenario: every request the client sent arrived, and each one is
/// counted exactly once with its outcome. Waits (at most 10 s) for the requests still
/// in flight to end and for a snapshot built after them, then asserts, in `/metrics`
/// and in the dashboard snapshot, `arrived = sum of outcomes + in flight` with nothing
/// in flight; that the two agree, provider by provider and outcome by outcome; and that
/// `arrived` is `sent_by_client`, the client's own count.
pub async fn assert_ledger(stack: &Stack, sent_by_client: u64) {
    assert_ledger_at(stack.addr, stack.metrics_addr, sent_by_client).await;
}

/// [`assert_ledger`] for a sidecar started without a [`Stack`].
pub async fn assert_ledger_at(addr: SocketAddr, metrics_addr: SocketAddr, sent_by_client: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (metrics, snapshot) = loop {
        let metrics = metrics_ledger(metrics_addr).await;
        let snapshot = snapshot_ledger(addr).await;
        let settled = metrics.in_flight_total() == 0 && metrics == snapshot;
        if settled || tokio::time::Instant::now() >= deadline {
            break (metrics, snapshot);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    metrics.assert_balanced("/metrics");
    snapshot.assert_balanced("the dashboard snapshot");
    assert_eq!(
        metrics.in_flight_total(),
        0,
        "requests still in flight at the end of the scenario: {metrics:#?}"
    );
    assert_eq!(metrics, snapshot, "/metrics and the snapshot disagree");
    assert_eq!(
        metrics.arrived, sent_by_client,
        "requests arrived at the sidecar vs sent by the client: {metrics:#?}"
    );
}

/// [`assert_ledger`] for a sidecar that has stopped (its listeners are closed): the
/// exposition and a snapshot are built from `app` in process, as the endpoints would.
pub fn assert_app_ledger(app: &Arc<App>, sent_by_client: u64) {
    use nvidia_sidecar::dashboard::{json, Publisher};
    let metrics = Ledger::from_metrics(&nvidia_sidecar::exposition::render(app));
    let mut publisher = Publisher::new(Arc::clone(app));
    let snap = publisher.build(std::time::Instant::now());
    let snapshot: serde_json::Value =
        serde_json::from_slice(&json::encode(app, snap, 0)).expect("snapshot JSON");
    let snapshot = Ledger::from_snapshot(&snapshot);
    metrics.assert_balanced("/metrics");
    snapshot.assert_balanced("the dashboard snapshot");
    assert_eq!(
        metrics.in_flight_total(),
        0,
        "requests in flight after the sidecar stopped: {metrics:#?}"
    );
    assert_eq!(metrics, snapshot, "/metrics and the snapshot disagree");
    assert_eq!(
        metrics.arrived, sent_by_client,
        "requests arrived at the sidecar vs sent by the client: {metrics:#?}"
    );
}
