//! A simulated upstream and a sidecar in front of it on ephemeral ports ([`Stack`]), the
//! configurations they start from, and the sidecar's clock: real, or a [`ManualClock`]
//! that moves only when the test advances it.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use http::Response;
use hyper::body::Incoming;
use nvidia_sidecar::app::App;
use nvidia_sidecar::clock::{ManualClock, MonotonicClock, SharedClock};
use nvidia_sidecar::config::{self, Config, Settings};
use nvidia_sidecar::mock::{MockConfig, MockServer};
use nvidia_sidecar::sidecar::{self, Running};

use super::{call, forget_sent, metrics_text, req, send, Answer, CHAT};

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
        metrics_text(self.metrics_addr).await
    }

    /// `POST /v1/chat/completions` with `body` and extra headers, answered whole.
    pub async fn chat(&self, headers: &[(&str, &str)], body: &str) -> Answer {
        call(
            self.addr,
            req("POST", self.addr, "/v1/chat/completions", headers, body),
        )
        .await
    }

    /// Sends `n` chats ([`CHAT`]) one after another; each must be answered 200.
    pub async fn chats_ok(&self, n: usize) {
        for i in 0..n {
            let a = self.chat(&[], CHAT).await;
            assert_eq!(a.status, 200, "chat {} of {n}: {}", i + 1, a.text());
        }
    }

    /// `POST /v1/chat/completions` with `headers` and `body`, once its head has come,
    /// which must say 200: the body is the caller's to read frame by frame (or to drop,
    /// hanging up).
    pub async fn open_chat(&self, headers: &[(&str, &str)], body: &str) -> Response<Incoming> {
        let resp = send(
            self.addr,
            req("POST", self.addr, "/v1/chat/completions", headers, body),
        )
        .await
        .expect("a response head");
        assert_eq!(resp.status(), 200);
        resp
    }

    /// The replica id of the first provider's shared budget (in cluster mode).
    pub fn replica(&self) -> String {
        self.app.providers[0]
            .budget
            .as_ref()
            .expect("cluster mode: the provider has a budget")
            .view()
            .replica
            .to_string()
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
    stack_with_clock(mock_cfg, env, Arc::new(MonotonicClock::new()))
}

/// The same, with the limiter on `clock` (a `ManualClock` makes admission deterministic).
pub fn stack_with_clock(mock_cfg: MockConfig, env: &[(&str, &str)], clock: SharedClock) -> Stack {
    let mock = mock(mock_cfg);
    let base = mock.base_url();
    let mut env = env.to_vec();
    env.push(("SIDECAR_UPSTREAM_URL", &base));
    let app = App::with_clock(config_from(&env), clock);
    let sidecar = sidecar::start(Arc::clone(&app)).expect("sidecar starts");
    forget_sent(sidecar.local_addr);
    Stack {
        addr: sidecar.local_addr,
        metrics_addr: sidecar.metrics_addr,
        mock,
        sidecar,
        app,
    }
}

/// [`stack`] with the limiter on a [`ManualClock`] at 0: a token appears, a window
/// empties and a deadline passes only when the test advances the clock it gets back.
pub fn manual_stack(mock_cfg: MockConfig, env: &[(&str, &str)]) -> (Stack, ManualClock) {
    manual_stack_at(0, mock_cfg, env)
}

/// [`manual_stack`] with the clock set to `nanos` before the sidecar starts.
pub fn manual_stack_at(
    nanos: u64,
    mock_cfg: MockConfig,
    env: &[(&str, &str)],
) -> (Stack, ManualClock) {
    let clock = ManualClock::new();
    clock.set(nanos);
    let s = stack_with_clock(mock_cfg, env, Arc::new(clock.clone()));
    (s, clock)
}

/// A free TCP port on loopback (bound, then released): nothing listens there.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A sidecar (no [`Stack`]) whose upstream is a port that was just free: nothing
/// listens there, so every request it forwards fails to connect.
pub fn sidecar_with_dead_upstream() -> Running {
    let url = format!("http://127.0.0.1:{}/v1", free_port());
    let app = App::new(config_from(&[("SIDECAR_UPSTREAM_URL", &url)]));
    sidecar::start(app).expect("sidecar starts")
}
