//! The sidecar's own answers: one builder for every response it makes itself (errors,
//! health, the admin API, the dashboard, `/metrics`), and the OpenAI error body.
//!
//! Every error a client can see is `{"error":{"message":…,"type":…,"code":…}}`; where a
//! retry makes sense it carries `Retry-After` in whole seconds, rounded up.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};

use crate::body::ProxyBody;

/// `{"error":{"message","type","code"}}` as bytes (also the data of an SSE
/// `event: error`).
pub fn error_body(message: &str, kind: &str, code: &str) -> Bytes {
    let v = serde_json::json!({"error": {"message": message, "type": kind, "code": code}});
    Bytes::from(v.to_string())
}

/// A response the sidecar answers itself, built step by step.
#[must_use]
pub struct Reply(Response<ProxyBody>);

impl Reply {
    /// `body` as `content_type`, with `status`.
    pub fn new(status: StatusCode, content_type: &'static str, body: ProxyBody) -> Self {
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        Self(resp)
    }

    /// A JSON body.
    pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Self::new(status, "application/json", ProxyBody::full(body))
    }

    /// An OpenAI-shaped error.
    pub fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Self {
        Self::json(status, error_body(message, kind, code))
    }

    /// Never cached (health, admin, dashboard answers change from one call to the next).
    pub fn no_store(self) -> Self {
        self.header(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))
    }

    /// `Retry-After` in whole seconds, rounded up, at least 1.
    pub fn retry_after(self, after: Option<Duration>) -> Self {
        match after {
            Some(after) => {
                let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
                self.header(header::RETRY_AFTER, HeaderValue::from(secs.max(1)))
            }
            None => self,
        }
    }

    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.0.headers_mut().insert(name, value);
        self
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = Reply::json(StatusCode::TOO_MANY_REQUESTS, "{}")
            .retry_after(Some(Duration::from_millis(1500)))
            .into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let r = Reply::json(StatusCode::OK, "{}")
            .retry_after(Some(Duration::from_millis(10)))
            .into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn an_error_has_the_openai_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&error_body("no", "invalid_request_error", "bad")).unwrap();
        assert_eq!(v["error"]["message"], "no");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "bad");
    }
}
