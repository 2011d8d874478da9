//! The per-request record: one structured log line when the response ends, however it
//! ends (complete, client gone, upstream failure, idle timeout, shutdown).
//!
//! Per-model detail lives here, in the logs, not in metric labels. Nothing secret is
//! ever put in a record: no key, no `Authorization`, no body.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::priority::Priority;

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The whole response reached the client.
    Complete,
    /// The client went away before the end.
    ClientGone,
    /// The upstream failed mid-body.
    UpstreamError,
    /// The upstream went silent for longer than the idle timeout.
    IdleTimeout,
    /// The shutdown grace period ended the stream.
    Shutdown,
    /// The sidecar answered itself (an error response).
    Local,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::ClientGone => "client_gone",
            End::UpstreamError => "upstream_error",
            End::IdleTimeout => "idle_timeout",
            End::Shutdown => "shutdown",
            End::Local => "local",
        }
    }
}

/// Which way a request went to its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Through the token bucket.
    Limited,
    /// Unmetered, or to the fallback upstream.
    Passthrough,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Limited => "limited",
            Route::Passthrough => "passthrough",
        }
    }
}

/// What is known about one request, filled in phase by phase.
#[derive(Debug)]
pub struct Record {
    pub request_id: Arc<str>,
    pub method: http::Method,
    pub path: String,
    pub provider: Option<Arc<str>>,
    pub model: Option<String>,
    pub priority: Priority,
    pub route: Option<Route>,
    /// Times the request was queued again after an upstream 429.
    pub retries: u32,
    pub status: u16,
    pub started: Instant,
    pub queue_wait: Duration,
    /// From sending upstream to the response head.
    pub upstream_latency: Option<Duration>,
}

impl Record {
    pub fn new(request_id: Arc<str>, method: http::Method, path: String) -> Self {
        Self {
            request_id,
            method,
            path,
            provider: None,
            model: None,
            priority: Priority::Normal,
            route: None,
            retries: 0,
            status: 0,
            started: Instant::now(),
            queue_wait: Duration::ZERO,
            upstream_latency: None,
        }
    }

    /// Emits the request's log line.
    pub fn finish(self, end: End, bytes: u64) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let total = self.started.elapsed();
        let upstream_ms = self.upstream_latency.map(ms);
        macro_rules! line {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: "nvidia_sidecar::access",
                    request_id = %self.request_id,
                    method = %self.method,
                    path = %self.path,
                    provider = self.provider.as_deref().unwrap_or("-"),
                    model = self.model.as_deref().unwrap_or("-"),
                    priority = self.priority.as_str(),
                    route = self.route.map_or("-", Route::as_str),
                    retries = self.retries,
                    status = self.status,
                    end = end.as_str(),
                    upstream_latency_ms = upstream_ms,
                    queue_wait_ms = ms(self.queue_wait),
                    duration_ms = ms(total),
                    bytes,
                    "request"
                )
            };
        }
        if self.status >= 500 || matches!(end, End::UpstreamError | End::IdleTimeout) {
            line!(warn);
        } else {
            line!(info);
        }
    }
}
