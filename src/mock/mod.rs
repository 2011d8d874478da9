//! The simulated upstream: an OpenAI-compatible server that behaves like NVIDIA's hosted
//! API, for the demo, the tests and the load test.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (plain and `"stream": true`
//! SSE ending in `data: [DONE]`), `POST /v1/embeddings`, and `GET /mock/stats`
//! (counters). It enforces its own limit like the real service — at most `rpm`
//! requests in any rolling 60 s, 429 with `Retry-After` past it, `x-ratelimit-*` on
//! every answer —
//! and has fault knobs, set at start-up or per request with `x-mock-*` headers (which
//! pass through the sidecar): added latency, slow headers, forced status or error
//! rate, a reset after N stream chunks, token count and inter-token delay.
//! It runs on the same thread-per-core server as the proxy.

mod limit;
mod respond;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use parking_lot::Mutex;

use crate::app::Shutdown;
use crate::config::Limits;
use crate::server::{self, Running, ServerSpec};

pub use limit::{Quota, WindowLimit};
pub use respond::MockBody;

/// Start-up settings of the simulated upstream.
#[derive(Debug, Clone, clap::Args)]
pub struct MockConfig {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,
    /// Requests allowed in any rolling 60 s (0: unlimited).
    #[arg(long, default_value_t = 40.0)]
    pub rpm: f64,
    /// Seconds of the rolling window the limit applies to (the limit scales with it).
    #[arg(long, default_value_t = 60.0)]
    pub window_secs: f64,
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Milliseconds of simulated compute: before the response, or before a stream's first token.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Milliseconds before response headers are sent (slow headers).
    #[arg(long, default_value_t = 0)]
    pub header_delay_ms: u64,
    /// Milliseconds between streamed tokens.
    #[arg(long, default_value_t = 20)]
    pub token_delay_ms: u64,
    /// Tokens per completion.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Fraction of requests answered with a 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Reset streams after this many chunks.
    #[arg(long)]
    pub reset_after: Option<usize>,
    /// Leave out the x-ratelimit-* headers on admitted answers (only 429s carry them).
    #[arg(long)]
    pub no_quota_headers: bool,
    /// Require this API key (401 otherwise).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Keep the headers of the last 1000 requests for tests (`MockServer::seen`).
    #[arg(skip)]
    pub record_requests: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            rpm: 0.0,
            window_secs: 60.0,
            workers: 1,
            latency_ms: 0,
            header_delay_ms: 0,
            token_delay_ms: 0,
            tokens: 16,
            error_rate: 0.0,
            reset_after: None,
            no_quota_headers: false,
            api_key: None,
            record_requests: false,
        }
    }
}

/// Counters of the simulated upstream.
#[derive(Debug, Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub rate_limited: AtomicU64,
    pub errors: AtomicU64,
    pub unauthorized: AtomicU64,
    pub streams: AtomicU64,
}

/// What the mock saw of one request (tests check the forwarded headers).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// State shared by the mock's workers.
pub struct MockShared {
    pub config: MockConfig,
    pub stats: MockStats,
    limit: Option<WindowLimit>,
    seen: Mutex<Vec<Seen>>,
    peers: Mutex<std::collections::HashSet<SocketAddr>>,
}

/// A running simulated upstream.
pub struct MockServer {
    pub addr: SocketAddr,
    pub shared: Arc<MockShared>,
    running: Running,
}

impl MockServer {
    /// Starts the mock; `listen` port 0 picks a free port.
    pub fn start(config: MockConfig) -> std::io::Result<Self> {
        let workers = if config.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.workers
        };
        let shared = Arc::new(MockShared {
            limit: (config.rpm > 0.0).then(|| {
                WindowLimit::new(
                    config.rpm,
                    Duration::from_secs_f64(config.window_secs.clamp(0.001, 86_400.0)),
                )
            }),
            stats: MockStats::default(),
            seen: Mutex::new(Vec::new()),
            peers: Mutex::new(std::collections::HashSet::new()),
            config: config.clone(),
        });
        let spec = ServerSpec {
            name: "mock",
            listen: config.listen,
            workers,
            limits: Limits {
                header_read_timeout: Duration::from_secs(30),
                max_headers: 200,
                max_header_bytes: 1 << 20,
                max_body_bytes: 64 << 20,
                max_connections: 100_000,
                h2_max_concurrent_streams: 1024,
                h2_max_header_list_size: 1 << 20,
                keep_alive: true,
            },
            grace: Duration::from_secs(2),
        };
        let s = Arc::clone(&shared);
        let running = server::spawn(spec, Shutdown::default(), move |_id| {
            // One `Rc` per worker: cloning it per request costs no atomic operation.
            let s = Rc::new(Arc::clone(&s));
            move |req: Request<Incoming>, remote: SocketAddr| handle(Rc::clone(&s), req, remote)
        })?;
        Ok(Self {
            addr: running.local_addr,
            shared,
            running,
        })
    }

    /// The base URL an OpenAI client (or the sidecar) uses: `http://addr/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Requests seen so far (only with `record_requests`).
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().clone()
    }

    /// Distinct client connections seen (only with `record_requests`).
    pub fn connections(&self) -> usize {
        self.shared.peers.lock().len()
    }

    pub fn requests(&self) -> u64 {
        self.shared.stats.requests.load(Ordering::Relaxed)
    }

    pub fn rate_limited(&self) -> u64 {
        self.shared.stats.rate_limited.load(Ordering::Relaxed)
    }

    /// Stops accepting and waits for in-flight responses (at most the grace period).
    pub fn stop(self) {
        self.running.stop();
    }

    /// Blocks until the server's workers end (after `begin_shutdown`).
    pub fn begin_shutdown(&self) {
        self.running.begin_shutdown();
    }

    pub fn join(self) {
        self.running.join();
    }
}

/// Per-request knobs: start-up values overridden by `x-mock-*` headers.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub latency: Duration,
    pub header_delay: Duration,
    pub token_delay: Duration,
    pub tokens: usize,
    pub status: Option<StatusCode>,
    pub reset_after: Option<usize>,
}

impl Knobs {
    fn from(config: &MockConfig, h: &HeaderMap) -> Self {
        let num = |name: &str| -> Option<u64> {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        };
        let forced = num("x-mock-status")
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok());
        let random_error = config.error_rate > 0.0 && fastrand::f64() < config.error_rate;
        Self {
            latency: Duration::from_millis(num("x-mock-latency-ms").unwrap_or(config.latency_ms)),
            header_delay: Duration::from_millis(
                num("x-mock-header-delay-ms").unwrap_or(config.header_delay_ms),
            ),
            token_delay: Duration::from_millis(
                num("x-mock-token-delay-ms").unwrap_or(config.token_delay_ms),
            ),
            tokens: num("x-mock-tokens").map_or(config.tokens, |n| n.min(100_000) as usize),
            status: forced.or(random_error.then_some(StatusCode::INTERNAL_SERVER_ERROR)),
            reset_after: num("x-mock-reset-after")
                .map(|n| n as usize)
                .or(config.reset_after),
        }
    }
}

// `Rc<Arc<_>>` on purpose: the per-request clone is the `Rc`'s, a non-atomic increment.
#[allow(clippy::redundant_allocation)]
async fn handle(
    shared: Rc<Arc<MockShared>>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<MockBody> {
    let s = &**shared;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path == "/mock/stats" {
        return respond::stats(s);
    }
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    let body = match Limited::new(body, 64 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return respond::error(StatusCode::BAD_REQUEST, &format!("bad body: {e}")),
    };
    if s.config.record_requests {
        s.peers.lock().insert(remote);
        let mut seen = s.seen.lock();
        if seen.len() >= 1000 {
            seen.remove(0);
        }
        seen.push(Seen {
            method: parts.method.clone(),
            path: path.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    if let Some(expected) = &s.config.api_key {
        let ok = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            == Some(expected.as_str());
        if !ok {
            s.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            return respond::error(StatusCode::UNAUTHORIZED, "missing or invalid API key");
        }
    }
    let quota = match &s.limit {
        Some(limit) => match limit.try_acquire() {
            Ok(q) => Some(q),
            Err(retry_after) => {
                s.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                return respond::rate_limited(retry_after, limit);
            }
        },
        None => None,
    };
    let mut resp = answer(s, &parts, &path, &body).await;
    if let Some(q) = quota.filter(|_| !s.config.no_quota_headers) {
        respond::quota_headers(
            resp.headers_mut(),
            q,
            s.limit.as_ref().map_or(0, |l| l.max()),
        );
    }
    resp
}

/// The answer to an admitted request, with the fault knobs applied.
async fn answer(
    s: &MockShared,
    parts: &http::request::Parts,
    path: &str,
    body: &Bytes,
) -> Response<MockBody> {
    let knobs = Knobs::from(&s.config, &parts.headers);
    if !knobs.header_delay.is_zero() {
        tokio::time::sleep(knobs.header_delay).await;
    }
    if let Some(status) = knobs.status {
        s.stats.errors.fetch_add(1, Ordering::Relaxed);
        return respond::error(status, "simulated upstream error");
    }
    match (&parts.method, path) {
        (&Method::GET, "/v1/models") => respond::models(),
        (&Method::POST, "/v1/chat/completions") => respond::chat(s, body, &knobs).await,
        (&Method::POST, "/v1/embeddings") => respond::embeddings(body, &knobs).await,
        _ => respond::error(StatusCode::NOT_FOUND, &format!("no route {path}")),
    }
}
