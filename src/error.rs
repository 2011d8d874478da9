//! Errors the sidecar answers itself, and the one function that renders them.
//!
//! Every error a client can see is an OpenAI-style body,
//! `{"error":{"message":…,"type":…,"code":…}}`, with the matching status and, where a
//! retry makes sense, `Retry-After`. Messages never contain keys or tokens.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::metrics::{ErrorKind, Outcome};

/// Why the sidecar answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {method} {path}; the proxy serves /v1/*, /healthz, /readyz, /api/dashboard and /api/admin/config")]
    NotFound { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error(
        "method {method} is not forwarded; /v1/ accepts {}",
        crate::proxy::framing::FORWARDED_METHODS
    )]
    MethodNotForwarded { method: String },
    #[error(transparent)]
    Framing(#[from] crate::proxy::framing::FramingError),
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
    #[error("could not read the request body: {reason}")]
    BadBody { reason: String },
    #[error("upstream {provider} is unreachable: {reason}")]
    UpstreamConnect { provider: String, reason: String },
    #[error("upstream {provider} failed before answering: {reason}")]
    UpstreamFailed { provider: String, reason: String },
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
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
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
            Self::MethodNotForwarded { .. } => Some(crate::proxy::framing::FORWARDED_METHODS),
            // The read-only routes (health, dashboard).
            Self::MethodNotAllowed { .. } => Some("GET, HEAD"),
            _ => None,
        }
    }

    /// The JSON body, also used for the final `event: error` of a broken SSE stream.
    pub fn json(&self) -> Bytes {
        error_json(&self.to_string(), self.kind().0, self.kind().1)
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut resp = json_error_response(self.status(), self.json(), self.retry_after());
        if let Some(allow) = self.allow() {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

/// `{"error":{"message","type","code"}}` as bytes.
pub fn error_json(message: &str, kind: &str, code: &str) -> Bytes {
    let v = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    Bytes::from(v.to_string())
}

/// A JSON error response with an optional `Retry-After` (whole seconds, rounded up).
pub fn json_error_response(
    status: StatusCode,
    body: Bytes,
    retry_after: Option<Duration>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(after) = retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
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
    fn a_method_not_forwarded_is_a_405_that_lists_the_methods() {
        let r = ProxyError::MethodNotForwarded {
            method: "TRACE".into(),
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            r.headers()[header::ALLOW],
            crate::proxy::framing::FORWARDED_METHODS
        );
        let e = ProxyError::from(crate::proxy::framing::FramingError::MissingHost);
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.kind(), ("invalid_request_error", "missing_host"));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = json_error_response(
            StatusCode::TOO_MANY_REQUESTS,
            Bytes::from_static(b"{}"),
            Some(Duration::from_millis(1500)),
        );
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
