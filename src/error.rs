//! Errors the sidecar answers a request with itself, and how each one renders: status,
//! OpenAI `type` and `code`, `Retry-After`, `Allow` (through [`crate::reply`]), and how
//! it counts in the metrics. Messages never contain keys or tokens.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::framing::{FramingError, FORWARDED_METHODS};
use crate::metrics::{ErrorKind, Outcome};
use crate::reply::{error_body, Reply};

/// Why the sidecar answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {method} {path}; the proxy serves /v1/*, /healthz, /readyz, /api/dashboard and /api/admin/config")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("method {method} is not forwarded; /v1/ accepts {}", FORWARDED_METHODS)]
    MethodNotForwarded { method: String },
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request headers exceed the limit of {max_headers} headers or {max_bytes} bytes")]
    HeadersTooLarge {
        max_headers: usize,
        max_bytes: usize,
    },
    #[error(transparent)]
    InvalidPriority(#[from] crate::priority::InvalidPriority),
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("the request body did not arrive within the request timeout")]
    BodyTimeout,
    #[error("could not read the request body: {source}")]
    BadBody {
        #[source]
        source: crate::body::BoxError,
    },
    #[error("upstream {provider} is unreachable: {source}")]
    UpstreamConnect {
        provider: String,
        #[source]
        source: crate::upstream::ConnectError,
    },
    #[error("upstream {provider} failed before answering: upstream request failed: {source}")]
    UpstreamFailed {
        provider: String,
        #[source]
        source: crate::upstream::RequestError,
    },
    #[error("upstream {provider} sent no response headers within {timeout:?}")]
    UpstreamTimeout { provider: String, timeout: Duration },
    #[error("the sidecar is shutting down")]
    ShuttingDown,
    #[error("provider {provider} is at its rate limit and its queue is full ({ahead} waiting ahead); retry after {retry_after:?}")]
    QueueFull {
        provider: String,
        ahead: usize,
        retry_after: Duration,
    },
    #[error("provider {provider} is at its rate limit: the {ahead} requests ahead drain in about {wait:?} at the rate paced now, past this request's remaining {budget:?}; retry after {retry_after:?}")]
    QueueBeyondDeadline {
        provider: String,
        ahead: usize,
        wait: Duration,
        budget: Duration,
        retry_after: Duration,
    },
    #[error("low-priority request waited {waited:?} in the {provider} queue, longer than low_priority_timeout; dropped")]
    LowPriorityDropped { provider: String, waited: Duration },
    #[error("request waited {waited:?} in the {provider} queue without a token before the request timeout")]
    QueueTimeout { provider: String, waited: Duration },
    #[error("request too large for provider {provider}'s token limit: it is estimated at {estimate} tokens (prompt and completion bound), and the provider allows {limit} tokens per {window:?}; lower max_tokens or shorten the prompt")]
    TokensTooLarge {
        provider: String,
        limit: u64,
        estimate: u64,
        window: Duration,
    },
    #[error("provider {provider} shares its budget through Redis, which this replica has not reached for longer than redis_fallback_for: nothing is sent with the shared key until it answers again; retry after {retry_after:?}")]
    BudgetUnavailable {
        provider: String,
        retry_after: Duration,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } | Self::MethodNotForwarded { .. } => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            Self::BodyTooLarge { .. } | Self::TokensTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BadBody { .. }
            | Self::InvalidPriority(_)
            | Self::BadRequest { .. }
            | Self::Framing(_) => StatusCode::BAD_REQUEST,
            Self::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UpstreamConnect { .. } | Self::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::ShuttingDown | Self::BudgetUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::QueueFull { .. } | Self::QueueBeyondDeadline { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::LowPriorityDropped { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::QueueTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// How the request ends in the metrics, and which upstream failure it was.
    pub fn outcome(&self) -> (Outcome, Option<ErrorKind>) {
        match self {
            Self::UpstreamConnect { .. } => (Outcome::UpstreamError, Some(ErrorKind::Connect)),
            Self::UpstreamFailed { .. } => (Outcome::UpstreamError, Some(ErrorKind::Request)),
            Self::UpstreamTimeout { .. } => (Outcome::UpstreamError, Some(ErrorKind::Timeout)),
            Self::ShuttingDown => (Outcome::Shutdown, None),
            Self::QueueFull { .. }
            | Self::QueueBeyondDeadline { .. }
            | Self::BudgetUnavailable { .. } => (Outcome::Rejected, None),
            Self::LowPriorityDropped { .. } | Self::QueueTimeout { .. } => (Outcome::Dropped, None),
            Self::NotFound { .. }
            | Self::MethodNotAllowed { .. }
            | Self::MethodNotForwarded { .. }
            | Self::Framing(_)
            | Self::BodyTooLarge { .. }
            | Self::TokensTooLarge { .. }
            | Self::HeadersTooLarge { .. }
            | Self::InvalidPriority(_)
            | Self::BadRequest { .. }
            | Self::BodyTimeout
            | Self::BadBody { .. } => (Outcome::ClientError, None),
        }
    }

    /// OpenAI `type` and `code` fields.
    pub fn kind(&self) -> (&'static str, &'static str) {
        match self {
            Self::NotFound { .. } => ("invalid_request_error", "not_found"),
            Self::MethodNotAllowed { .. } | Self::MethodNotForwarded { .. } => {
                ("invalid_request_error", "method_not_allowed")
            }
            Self::Framing(e) => ("invalid_request_error", e.code()),
            Self::BodyTooLarge { .. } => ("invalid_request_error", "request_too_large"),
            Self::TokensTooLarge { .. } => ("invalid_request_error", "tokens_exceed_limit"),
            Self::HeadersTooLarge { .. } => ("invalid_request_error", "headers_too_large"),
            Self::BadBody { .. } => ("invalid_request_error", "bad_request_body"),
            Self::InvalidPriority(_) => ("invalid_request_error", "invalid_priority"),
            Self::BadRequest { .. } => ("invalid_request_error", "bad_request"),
            Self::BodyTimeout => ("invalid_request_error", "request_timeout"),
            Self::UpstreamConnect { .. } => ("upstream_error", "upstream_unavailable"),
            Self::UpstreamFailed { .. } => ("upstream_error", "upstream_failed"),
            Self::UpstreamTimeout { .. } => ("upstream_error", "upstream_timeout"),
            Self::ShuttingDown => ("server_error", "shutting_down"),
            Self::QueueFull { .. } => ("rate_limit_error", "queue_full"),
            Self::QueueBeyondDeadline { .. } => ("rate_limit_error", "queue_beyond_deadline"),
            Self::LowPriorityDropped { .. } => ("rate_limit_error", "low_priority_timeout"),
            Self::QueueTimeout { .. } => ("rate_limit_error", "queue_timeout"),
            Self::BudgetUnavailable { .. } => ("server_error", "budget_unavailable"),
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::ShuttingDown => Some(Duration::from_secs(1)),
            Self::QueueFull { retry_after, .. }
            | Self::QueueBeyondDeadline { retry_after, .. }
            | Self::BudgetUnavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The `Allow` header of a 405, where the methods allowed are known here.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            Self::MethodNotForwarded { .. } => Some(FORWARDED_METHODS),
            // The read-only routes (health, dashboard).
            Self::MethodNotAllowed { .. } => Some("GET, HEAD"),
            _ => None,
        }
    }

    /// The JSON body, also used for the final `event: error` of a broken SSE stream.
    pub fn json(&self) -> Bytes {
        let (kind, code) = self.kind();
        error_body(&self.to_string(), kind, code)
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut reply = Reply::json(self.status(), self.json()).retry_after(self.retry_after());
        if let Some(allow) = self.allow() {
            reply = reply.header(header::ALLOW, HeaderValue::from_static(allow));
        }
        reply.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_renders_openai_shape() {
        let e = ProxyError::UpstreamTimeout {
            provider: "nvidia".into(),
            timeout: Duration::from_secs(3),
        };
        let v: serde_json::Value = serde_json::from_slice(&e.json()).unwrap();
        assert_eq!(v["error"]["type"], "upstream_error");
        assert_eq!(v["error"]["code"], "upstream_timeout");
        assert!(v["error"]["message"].as_str().unwrap().contains("nvidia"));
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
    }

    #[test]
    fn a_request_over_the_token_budget_is_a_413_naming_the_limit_and_the_estimate() {
        let e = ProxyError::TokensTooLarge {
            provider: "nvidia".into(),
            limit: 1_000,
            estimate: 4_096,
            window: Duration::from_secs(60),
        };
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(e.retry_after(), None, "waiting does not cure it");
        let v: serde_json::Value = serde_json::from_slice(&e.json()).unwrap();
        assert_eq!(v["error"]["code"], "tokens_exceed_limit");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("4096") && msg.contains("1000"), "{msg}");
    }

    #[test]
    fn a_method_not_forwarded_is_a_405_that_lists_the_methods() {
        let r = ProxyError::MethodNotForwarded {
            method: "TRACE".into(),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], FORWARDED_METHODS);
        let e = ProxyError::from(FramingError::MissingHost);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.kind(), ("invalid_request_error", "missing_host"));
    }
}
