//! The per-request record: one structured log line when the response ends, however it
//! ends (complete, client gone, upstream failure, idle timeout, shutdown).
//!
//! A record holds its request's [`Entry`] in the metrics ledger from acceptance
//! ([`Record::arrive`]) and settles it when it is finished, exactly once. A record
//! dropped unfinished — its task cancelled because the client left while the request was
//! queued, its body was read or the upstream was awaited — is finished on drop as
//! `client_gone`, on route `none` unless it was sent upstream.
//!
//! Per-model detail lives here, in the logs, not in metric labels. Nothing secret is
//! ever put in a record: no key, no `Authorization`, no body.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{Entry, ErrorKind, Lane, Outcome, Sample, ShardHandle};
use crate::priority::Priority;

/// Most bytes of a request's path a log line carries.
pub const PATH_LOGGED: usize = 256;

/// The target of the per-request log lines.
pub const ACCESS_TARGET: &str = "nvidia_sidecar::access";

/// Whether every request's line is logged (the access log is at `info`); per-request
/// detail only a log line uses (the model) is worth reading only then.
pub fn access_log_enabled() -> bool {
    tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO)
}

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

/// What is known about one request, filled in phase by phase.
#[derive(Debug)]
pub struct Record {
    pub request_id: http::HeaderValue,
    pub method: http::Method,
    /// The request's URI (a cheap clone of what hyper parsed); its path is logged, cut to
    /// [`PATH_LOGGED`] bytes.
    pub uri: http::Uri,
    pub provider: Option<Arc<str>>,
    /// Index of `provider` in the app's providers.
    pub provider_index: Option<usize>,
    pub model: Option<String>,
    pub priority: Priority,
    /// `Lane::None` until admission lets the request through.
    pub route: Lane,
    /// Times the request was queued again after an upstream 429.
    pub retries: u32,
    pub status: u16,
    pub started: Instant,
    pub queue_wait: Duration,
    /// From sending upstream to the response head.
    pub upstream_latency: Option<Duration>,
    /// When the first body byte went to the client.
    pub first_byte: Option<Instant>,
    /// Set when the sidecar answered itself.
    pub outcome: Option<Outcome>,
    /// Set when the upstream failed.
    pub error: Option<ErrorKind>,
    /// The request's place in the metrics ledger (absent in unit tests of other phases).
    ledger: Option<Entry>,
    finished: bool,
}

impl Record {
    pub fn new(request_id: http::HeaderValue, method: http::Method, uri: http::Uri) -> Self {
        Self {
            request_id,
            method,
            uri,
            provider: None,
            provider_index: None,
            model: None,
            priority: Priority::Normal,
            route: Lane::None,
            retries: 0,
            status: 0,
            started: Instant::now(),
            queue_wait: Duration::ZERO,
            upstream_latency: None,
            first_byte: None,
            outcome: None,
            error: None,
            ledger: None,
            finished: false,
        }
    }

    /// Counts the request as arrived in the worker's `shard`, in flight for the
    /// `default` provider until [`Record::route_to`] says otherwise.
    pub fn arrive(&mut self, shard: &ShardHandle, default: usize) {
        self.ledger = Some(Entry::arrive(Arc::clone(shard), default));
    }

    /// Routing picked the provider at `index`, named `name`.
    pub fn route_to(&mut self, index: usize, name: Arc<str>) {
        self.provider = Some(name);
        self.provider_index = Some(index);
        if let Some(e) = self.ledger.as_mut() {
            e.route_to(index);
        }
    }

    /// How the request ended, for `sidecar_requests_total{outcome}`.
    fn outcome(&self, end: End) -> Outcome {
        if let Some(o) = self.outcome {
            return o;
        }
        match end {
            End::ClientGone => Outcome::ClientGone,
            End::Shutdown => Outcome::Shutdown,
            End::UpstreamError | End::IdleTimeout => Outcome::UpstreamError,
            End::Complete | End::Local => match self.status {
                429 => Outcome::Upstream429,
                500.. => Outcome::UpstreamError,
                400..=499 => Outcome::ClientError,
                _ => Outcome::Success,
            },
        }
    }

    /// Settles the request's ledger entry with how it ended.
    fn record_metrics(&mut self, end: End, total: Duration) {
        let Some(entry) = self.ledger.take() else {
            return;
        };
        let error = match end {
            End::UpstreamError => Some(ErrorKind::Stream),
            End::IdleTimeout => Some(ErrorKind::IdleTimeout),
            _ => self.error,
        };
        let sample = Sample {
            route: self.route,
            outcome: self.outcome(end),
            error,
            priority: self.priority,
            upstream_latency: self.upstream_latency,
            ttfb: self
                .first_byte
                .map(|t| t.saturating_duration_since(self.started))
                .or_else(|| self.upstream_latency.is_some().then_some(total)),
            duration: total,
            // Only requests that got through admission waited in the queue's sense.
            queue_wait: (self.route == Lane::Limited).then_some(self.queue_wait),
        };
        // Answered by the sidecar before routing: refused (bad headers, body, priority).
        if self.provider_index.is_none() && end == End::Local {
            entry.settle_invalid(&sample);
        } else {
            entry.settle(&sample);
        }
    }

    /// Counts the request's end and emits its log line.
    pub fn finish(mut self, end: End, bytes: u64) {
        self.end(end, bytes);
    }

    /// [`Record::finish`], once: a finished record does nothing more when dropped.
    fn end(&mut self, end: End, bytes: u64) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let total = self.started.elapsed();
        self.record_metrics(end, total);
        let upstream_ms = self.upstream_latency.map(ms);
        macro_rules! line {
            ($lvl:ident) => {
                tracing::$lvl!(
                    target: ACCESS_TARGET,
                    request_id = self.request_id.to_str().unwrap_or("-"),
                    method = %self.method,
                    path = crate::framing::cut(self.uri.path(), PATH_LOGGED),
                    provider = self.provider.as_deref().unwrap_or("-"),
                    model = self.model.as_deref().unwrap_or("-"),
                    priority = self.priority.as_str(),
                    route = self.route.as_str(),
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

impl Drop for Record {
    fn drop(&mut self) {
        // Dropped unfinished: the task serving the request was cancelled, which happens
        // when its client goes away (queued, sending its body, or awaiting the upstream).
        self.end(End::ClientGone, 0);
    }
}
