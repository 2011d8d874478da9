//! The simulated upstream: an OpenAI-compatible server that behaves like NVIDIA's hosted
//! API, for the demo, the tests and the load test, and the independent judge of whether
//! the sidecar kept to a provider's limits.
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (plain and `"stream": true`
//! SSE ending in `data: [DONE]`), `POST /v1/embeddings`, and the mock's own
//! `/mock/stats`, `/mock/limit` and `/mock/windows` (see `control.rs`).
//!
//! Limits, like a provider's: at most `rpm × window / 60` requests in any rolling window
//! (`limit`), optionally a tighter window per model (`--model-limit`), optionally at most
//! `tpm × window / 60` tokens charged in the same kind of window (`--tpm`, `tokens`),
//! all changeable at run time without forgetting history (`POST /mock/limit`,
//! [`MockServer::set_limit`], [`MockServer::set_token_limit`]), and optionally NVIDIA's
//! per-model cap on requests in flight (`--worker-limit`), checked first (`admit`). A
//! request must pass every window. Tokens are counted by the mock's own rule, not the
//! sidecar's (`count`: `ceil(bytes / 4)` per text field, 3 per message, 85 per image; the
//! completion is what it generates), and charged as `--token-charge` says: `reserved`
//! (OpenAI: prompt plus the `max_tokens` bound, times `n`, on arrival) or `actual` (prompt
//! plus the generated completion when the answer ends). A 429 speaks one of three
//! dialects: bare `x-ratelimit-*` with `Retry-After` in seconds or as a date, OpenAI's
//! `x-ratelimit-*-requests` and `-tokens` with its token 429 bodies, or NVIDIA's
//! header-less body (`headers`). Every window decision and token charge is recorded with
//! its time and model (`judge`), so tests assert what the provider saw — per fixed
//! window, or the most in any rolling window, requests and tokens, and which limit
//! refused — never the sidecar's own gauges.
//!
//! Answers carry `usage` with the mock's counts (a stream only when asked with
//! `stream_options.include_usage`, as OpenAI sends it). Fault knobs, set at start-up or
//! per request with `x-mock-*` headers (which pass through the sidecar): added latency,
//! slow headers, forced status or error rate, a reset after N stream chunks, token count
//! and inter-token delay, and a 400 to `stream_options` (`x-mock-refuse-include-usage`,
//! or per model `--refuse-include-usage`). It runs on the same thread-per-core server as
//! the proxy.

mod admit;
mod config;
mod control;
mod count;
mod handle;
mod headers;
mod judge;
mod knobs;
mod limit;
mod respond;
mod shared;
mod stats;
#[cfg(test)]
mod tests;
mod tokens;
mod workers;

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::RequestBody;
use http::Request;
use parking_lot::Mutex;

use crate::config::Fairness;
use crate::config::Limits;
use crate::server::{self, Running, ServerSpec, Shutdown};

pub use admit::LimitsState;
pub use config::{MockConfig, MockConfigError};
pub use headers::go_duration;
pub use judge::{Filter, TokenCount, TokenVerdicts, Verdicts, WindowCount};
pub use knobs::Knobs;
pub use limit::{LimitState, Quota, Refusal, WindowLimit};
pub use respond::MockBody;
pub use shared::{MockShared, Seen};
pub use stats::MockStats;
pub use tokens::{TokenCharge, TokenLimitState};
pub use workers::WorkerSlot;

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
        let window = config.window()?;
        let models = config.parsed_model_limits()?;
        let tokens = tokens::TokenWindow::new(config.token_max()?, window, config.token_charge);
        let shared = Arc::new(MockShared {
            gate: Arc::new(admit::Gate::new(
                limit::max_for(config.rpm, window),
                tokens,
                window,
                &models,
                config.worker_limit,
                config.judge || config.record_requests,
                Instant::now(),
            )),
            headers: headers::HeaderPolicy::from(&config),
            window,
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
            // Its clients are trusted: a silent connection lasts the header read timeout.
            fairness: Fairness {
                first_byte_timeout: Duration::from_secs(30),
                max_connections_per_ip: None,
            },
            grace: Duration::from_secs(2),
        };
        let s = Arc::clone(&shared);
        let running = server::spawn(spec, Shutdown::default(), move |_id| {
            // One `Rc` per worker: cloning it per request costs no atomic operation.
            let s = Rc::new(Arc::clone(&s));
            move |req: Request<RequestBody>, remote: SocketAddr| {
                handle::handle(Rc::clone(&s), req, remote)
            }
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

    /// 429s of a full worker (`worker_limit`), also counted in `rate_limited`.
    pub fn worker_limited(&self) -> u64 {
        self.shared.stats.worker_limited.load(Ordering::Relaxed)
    }

    /// Sets the global limit to `rpm` a minute over a rolling `window` (`rpm` 0:
    /// unlimited), keeping the admissions on record: a lowered limit refuses until the
    /// window holds fewer than the new maximum.
    pub fn set_limit(&self, rpm: f64, window: Duration) {
        self.shared.gate.set_limit(rpm, window);
    }

    /// Sets the token limit to `tpm` tokens a minute over a rolling `window` (`tpm` 0:
    /// unlimited), keeping the charges on record: a lowered limit refuses until enough
    /// old charges have left the window.
    pub fn set_token_limit(&self, tpm: f64, window: Duration) {
        self.shared.gate.set_token_limit(tpm, window);
    }

    /// Sets `model`'s own limit, on top of the global one (`rpm` 0: unlimited).
    pub fn set_model_limit(&self, model: &str, rpm: f64, window: Duration) {
        self.shared.gate.set_model_limit(model, rpm, window);
    }

    /// The limits in force.
    pub fn limits(&self) -> LimitsState {
        self.shared.gate.state_at(Instant::now())
    }

    /// Everything the judge can say about `filter`'s decisions, counted per `window`.
    pub fn verdicts(&self, filter: Filter<'_>, window: Duration) -> Verdicts {
        self.shared
            .gate
            .judge
            .verdicts(filter, window, Instant::now())
    }

    /// Admissions and refusals of the rolling windows per fixed `window` since start (the
    /// last one still running). Empty until some limit exists, unless `judge` or
    /// `record_requests` is set.
    pub fn window_counts(&self, window: Duration) -> Vec<WindowCount> {
        self.verdicts(Filter::All, window).windows
    }

    /// The same for requests naming `model`.
    pub fn window_counts_for(&self, model: &str, window: Duration) -> Vec<WindowCount> {
        self.verdicts(Filter::Model(model), window).windows
    }

    /// The most admissions in any rolling `window`: what the provider saw at its worst.
    pub fn max_in_rolling(&self, window: Duration) -> usize {
        self.verdicts(Filter::All, window).max_in_rolling
    }

    /// The same for requests naming `model`.
    pub fn max_in_rolling_for(&self, model: &str, window: Duration) -> usize {
        self.verdicts(Filter::Model(model), window).max_in_rolling
    }

    /// Requests the rolling windows refused since start (not the worker limit's).
    pub fn refused_total(&self) -> u64 {
        self.shared.gate.judge.refused_total()
    }

    /// Requests the rolling windows admitted since start.
    pub fn admitted_total(&self) -> u64 {
        self.shared.gate.judge.admitted_total()
    }

    /// Tokens charged since start, as the mock counts them (on arrival under `reserved`,
    /// when the answer ends under `actual`). Recorded once any limit exists.
    pub fn tokens_total(&self) -> u64 {
        self.shared.gate.judge.tokens_total()
    }

    /// Tokens charged per fixed `window` since start (the last one still running), and
    /// the token limit's refusals in each.
    pub fn token_window_counts(&self, window: Duration) -> Vec<TokenCount> {
        self.verdicts(Filter::All, window).tokens.windows
    }

    /// The most tokens charged in any rolling `window`.
    pub fn max_tokens_in_rolling(&self, window: Duration) -> u64 {
        self.verdicts(Filter::All, window).tokens.max_in_rolling
    }

    /// The same for requests naming `model`.
    pub fn max_tokens_in_rolling_for(&self, model: &str, window: Duration) -> u64 {
        self.verdicts(Filter::Model(model), window)
            .tokens
            .max_in_rolling
    }

    /// 429s of the token limit since start, too-large requests included.
    pub fn refused_for_tokens(&self) -> u64 {
        self.shared.gate.judge.refusals().1
    }

    /// 429s of a request window (global or a model's) since start.
    pub fn refused_for_requests(&self) -> u64 {
        self.shared.gate.judge.refusals().0
    }

    /// Requests refused as larger than the whole token window (also in
    /// `refused_for_tokens`).
    pub fn too_large(&self) -> u64 {
        self.shared.gate.judge.refusals().2
    }

    /// 400s given to `stream_options` (`x-mock-refuse-include-usage`,
    /// `--refuse-include-usage`).
    pub fn stream_options_refused(&self) -> u64 {
        self.shared
            .stats
            .stream_options_refused
            .load(Ordering::Relaxed)
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
