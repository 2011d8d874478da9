//! Shared test harness: a simulated upstream and a sidecar on ephemeral ports, and a
//! small HTTP client on hyper's connection API.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use nvidia_sidecar::app::App;
use nvidia_sidecar::config::{self, Config, Settings};
use nvidia_sidecar::mock::{MockConfig, MockServer};
use nvidia_sidecar::server::{self, Running};

/// A simulated upstream and a sidecar in front of it.
pub struct Stack {
    pub mock: MockServer,
    pub sidecar: Running,
    pub addr: SocketAddr,
    /// The metrics listener (`GET /metrics`).
    pub metrics_addr: SocketAddr,
    pub app: Arc<App>,
}

/// A simulated upstream without a rate limit of its own: every request is answered.
pub fn unlimited_mock() -> MockConfig {
    MockConfig {
        rpm: 0.0,
        ..MockConfig::default()
    }
}

impl Stack {
    /// The sidecar's `GET /metrics`, as text.
    pub async fn scrape(&self) -> String {
        let a = call(
            self.metrics_addr,
            req("GET", self.metrics_addr, "/metrics", &[], ""),
        )
        .await;
        assert_eq!(a.status, 200);
        a.text()
    }

    /// `POST /v1/chat/completions` with `body` and extra headers, answered whole.
    pub async fn chat(&self, headers: &[(&str, &str)], body: &str) -> Answer {
        call(
            self.addr,
            req("POST", self.addr, "/v1/chat/completions", headers, body),
        )
        .await
    }

    pub fn stop(self) {
        self.sidecar.stop();
        self.mock.stop();
    }
}

/// Configuration from an environment map, as the binary would build it.
pub fn config_from(env: &[(&str, &str)]) -> Config {
    let mut map: HashMap<String, String> = [
        ("SIDECAR_LISTEN_PORT", "0"),
        ("SIDECAR_METRICS_PORT", "0"),
        ("SIDECAR_WORKERS", "1"),
        ("SIDECAR_UPSTREAM_API_KEY", "nvapi-provider-key-0001"),
        // Unlimited unless a test is about limiting.
        ("SIDECAR_RATE_RPM", "6000000"),
        ("SIDECAR_BUCKET_CAPACITY", "1000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in env {
        map.insert(k.to_string(), v.to_string());
    }
    config::load(None, &map, Settings::default()).expect("valid test configuration")
}

/// Configuration from a TOML file's text, on ephemeral ports with one worker.
pub fn config_from_toml(toml: &str) -> Config {
    let file = config::FileConfig::parse(toml, "test.toml").expect("valid TOML");
    let env: HashMap<String, String> = [
        ("SIDECAR_LISTEN_PORT", "0"),
        ("SIDECAR_METRICS_PORT", "0"),
        ("SIDECAR_WORKERS", "1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    config::from_file(&file, &env, Settings::default()).expect("valid test configuration")
}

pub fn mock(cfg: MockConfig) -> MockServer {
    MockServer::start(MockConfig {
        record_requests: true,
        ..cfg
    })
    .expect("mock starts")
}

/// Starts a mock with `mock_cfg` and a sidecar configured by `env` in front of it.
pub fn stack(mock_cfg: MockConfig, env: &[(&str, &str)]) -> Stack {
    stack_with_clock(
        mock_cfg,
        env,
        Arc::new(nvidia_sidecar::clock::MonotonicClock::new()),
    )
}

/// The same, with the limiter on `clock` (a `ManualClock` makes admission deterministic).
pub fn stack_with_clock(
    mock_cfg: MockConfig,
    env: &[(&str, &str)],
    clock: nvidia_sidecar::clock::SharedClock,
) -> Stack {
    let mock = mock(mock_cfg);
    let base = mock.base_url();
    let mut env = env.to_vec();
    env.push(("SIDECAR_UPSTREAM_URL", &base));
    let app = App::with_clock(config_from(&env), clock);
    let sidecar = server::start_proxy(Arc::clone(&app)).expect("sidecar starts");
    forget_sent(sidecar.local_addr);
    Stack {
        addr: sidecar.local_addr,
        metrics_addr: sidecar
            .metrics_addr
            .expect("the proxy starts a metrics listener"),
        mock,
        sidecar,
        app,
    }
}

/// Opens a fresh HTTP/1.1 connection and sends `req`; returns the response head and
/// its streaming body.
pub async fn send(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> hyper::Result<Response<Incoming>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    if req.uri().path().starts_with("/v1/") {
        note_sent(addr, 1);
    }
    tx.send_request(req).await
}

/// Builds a request to the sidecar.
pub fn req(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

/// A whole answer.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI-shaped sidecar error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {}", self.text());
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].as_str().is_some());
        assert_eq!(self.headers["content-type"], "application/json");
    }
}

pub async fn call(addr: SocketAddr, r: Request<Full<Bytes>>) -> Answer {
    let resp = send(addr, r).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub const CHAT: &str =
    r#"{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}"#;
pub const CHAT_STREAM: &str = r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// Reads the next data frame of a streaming body, with a generous bound so a broken
/// proxy fails the test instead of hanging it.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("a frame within 20 s")?;
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Waits for `cond` by polling (an observed event, not a sleep), for at most 20 s.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
pub mod redis;

/// The README's test command: it installs every tool the suite uses, then runs it with
/// nothing skipped.
pub const SETUP_COMMAND: &str = "tests/run.sh";

/// A test cannot run because `tool` is missing. Under `tests/run.sh` (which sets
/// `TESTS_NO_SKIP=1`) and in CI that is a failure; under a bare `cargo test` the test is
/// skipped, and says so where a person sees it: the line goes to the process's stderr
/// directly, which the test harness does not capture (its capture only takes
/// `print!`/`eprint!`), naming the command that installs the tool.
///
/// Returns so the caller can `return` from the test.
pub fn missing_tool(tool: &str, install: &str) {
    use std::io::Write as _;
    let strict = std::env::var_os("TESTS_NO_SKIP").is_some_and(|v| !v.is_empty())
        || std::env::var_os("CI").is_some();
    let msg = format!(
        "{tool} is not installed: install it with `{install}`, or run `{SETUP_COMMAND}`, which installs every tool the tests use"
    );
    if strict {
        panic!("{msg} (TESTS_NO_SKIP or CI is set, so nothing may be skipped)");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "\nSKIPPED {}: {msg}\n",
        std::thread::current().name().unwrap_or("a test")
    );
}

// === The request ledger ===

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
    let a = call(metrics_addr, req("GET", metrics_addr, "/metrics", &[], "")).await;
    assert_eq!(a.status, 200, "/metrics: {}", a.text());
    Ledger::from_metrics(&a.text())
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
    use nvidia_sidecar::snapshot::{json, publisher::Publisher};
    let metrics = Ledger::from_metrics(&nvidia_sidecar::metrics::exposition::render(app));
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
