//! Shared test harness: a simulated upstream and a sidecar on ephemeral ports, and a
//! small HTTP client on hyper's connection API.
#![allow(dead_code)]

use std::collections::HashMap;
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

impl Stack {
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
