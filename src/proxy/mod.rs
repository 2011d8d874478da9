//! The request path, as explicit phases: `route` → `admit` → `forward` → `respond`,
//! with the [`Record`] filled in along the way and logged when the response ends.
//!
//! Every accepted request gets exactly one answer: the upstream's response streamed
//! through, or one of the sidecar's OpenAI-shaped errors ([`ProxyError`]). The request
//! body is read once, bounded, and kept as `Bytes` so later phases (routing by model,
//! retries) never read the client again.

mod admit;
pub mod headers;

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::app::Provider;
use crate::body::{BoxError, ProxyBody, UpstreamBody};
use crate::error::ProxyError;
use crate::health;
use crate::priority::Priority;
use crate::record::{End, Record, Route};
use crate::route;
use crate::server::Worker;
use crate::stats::ProviderStats;
use crate::upstream::SendError;

/// Entry point for every request a worker accepts.
pub async fn serve(
    worker: Rc<Worker>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<ProxyBody> {
    let path = req.uri().path();
    if path.starts_with("/v1/") {
        return proxy(&worker, req).await;
    }
    if path.starts_with("/api/admin/") {
        return Box::pin(crate::admin::serve(&worker.app, req, remote)).await;
    }
    if path.starts_with("/api/dashboard") {
        if let Some(resp) = crate::dashboard::serve(&worker, req.method(), path) {
            return resp;
        }
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/healthz") => health::healthz(),
        (&Method::GET | &Method::HEAD, "/readyz") => Box::pin(health::readyz(&worker)).await,
        (_, "/healthz" | "/readyz") => ProxyError::MethodNotAllowed {
            method: req.method().to_string(),
            path: path.to_owned(),
        }
        .into_response(),
        _ => ProxyError::NotFound {
            method: req.method().to_string(),
            path: truncate(path, 256),
        }
        .into_response(),
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Answers `record`'s request with `err` and logs it.
fn local_error(mut record: Record, err: ProxyError) -> Response<ProxyBody> {
    record.status = err.status().as_u16();
    let (outcome, kind) = err.outcome();
    record.outcome = Some(outcome);
    record.error = record.error.or(kind);
    let mut resp = err.into_response();
    resp.headers_mut()
        .insert(headers::X_REQUEST_ID, record.request_id.clone());
    let len = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    record.finish(End::Local, len);
    resp
}

/// The `/v1/*` path: everything a client sends to the provider.
async fn proxy(worker: &Rc<Worker>, req: Request<Incoming>) -> Response<ProxyBody> {
    let app = &worker.app;
    let (mut parts, body) = req.into_parts();
    let request_id = match headers::client_request_id(&parts.headers) {
        Some(id) => id.clone(),
        None => worker.next_request_id(),
    };
    let mut record = Record::new(
        request_id.clone(),
        parts.method.clone(),
        truncate(parts.uri.path(), 256),
    );
    record.metrics = Some(Arc::clone(&worker.metrics));
    // One version of the run-time settings for the whole request.
    let hot = app.hot.load();
    let deadline = record.started + hot.request_timeout;
    // One timer for the request's whole deadline (reading the body, then the upstream).
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);

    if let Err(e) = headers::check_limits(&parts.headers, &app.config.limits) {
        return local_error(record, e);
    }
    if let Some(p) = client_priority(&app.config.client_priorities, &parts.headers) {
        record.priority = p;
    }
    if let Some(v) = parts.headers.get(headers::X_PRIORITY) {
        match Priority::parse(v.as_bytes()) {
            Ok(p) => record.priority = p,
            Err(e) => {
                return local_error(record, ProxyError::InvalidPriority(e));
            }
        }
    }
    let body = match read_body(
        body,
        &parts.headers,
        app.config.limits.max_body_bytes,
        timer.as_mut(),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return local_error(record, e),
    };

    // route: the model is read when it picks the provider or the access log shows it
    // (parsing the body is the costliest step of a small request otherwise).
    let want_model = app.router.routes_by_model() || crate::record::access_log_enabled();
    let model = want_model
        .then(|| route::extract_model(&body).map(|m| truncate(&m, 256)))
        .flatten();
    let provider_index = app.router.provider_for(model.as_deref());
    let provider = &app.providers[provider_index];
    record.provider = Some(Arc::clone(&provider.name));
    record.provider_index = Some(provider_index);
    record.model = model;

    // admit
    let route = match admit::admit(app, &hot, provider, &mut record, deadline).await {
        Ok(r) => r,
        Err(e) => return local_error(record, e),
    };
    record.route = route;

    // forward: a limited request the upstream answers 429 is absorbed — parked again
    // at the head of its priority and re-sent after the retreat pause — while retries
    // and its deadline allow.
    let mut prepared = headers::upstream_request_headers(
        std::mem::take(&mut parts.headers),
        provider.auth_header.as_ref(),
        &request_id,
        body.len(),
    );
    let rest = &parts.uri.path()["/v1/".len()..];
    let hard_stop = &app.shutdown.hard_stop;
    let (resp, lease, sent_at) = loop {
        let target = match record.route {
            Route::Passthrough => provider
                .config
                .fallback
                .as_ref()
                .unwrap_or(&provider.config.upstream),
            _ => &provider.config.upstream,
        };
        // The headers are copied only when a 429 could send this request again.
        let may_retry =
            record.route == Route::Limited && record.retries < app.config.upstream_429_retries;
        let attempt_headers = if may_retry {
            prepared.clone()
        } else {
            std::mem::take(&mut prepared)
        };
        let up_req = match build_upstream_request(
            &parts,
            attempt_headers,
            rest,
            body.clone(),
            provider,
            target,
        ) {
            Ok(r) => r,
            Err(e) => return local_error(record, e),
        };
        let sent_at = Instant::now();
        let result = tokio::select! {
            biased;
            r = worker.pool.send(target, up_req) => Ok(r),
            _ = &mut timer => Err(()),
            _ = hard_stop.cancelled() => return local_error(record, ProxyError::ShuttingDown),
        };
        let (resp, lease) = match result {
            Ok(Ok(r)) => r,
            Err(()) => {
                return local_error(
                    record,
                    ProxyError::UpstreamTimeout {
                        provider: provider.name.to_string(),
                        timeout: hot.request_timeout,
                    },
                );
            }
            Ok(Err(e)) => {
                let (provider, reason) = (provider.name.to_string(), e.to_string());
                let err = match e {
                    SendError::Connect(_) => ProxyError::UpstreamConnect { provider, reason },
                    SendError::Request(_) => ProxyError::UpstreamFailed { provider, reason },
                };
                return local_error(record, err);
            }
        };
        let now = app.clock.now_nanos();
        let limiter = &provider.limiter;
        limiter.retreat.on_response(now);
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            ProviderStats::inc(&provider.stats.upstream_429);
            if record.route == Route::Limited {
                let pause = header_delay(resp.headers(), &header::RETRY_AFTER);
                let cut = limiter.on_upstream_429(now, pause);
                if let Some(t) = cut.transition {
                    tracing::warn!(
                        provider = &*provider.name,
                        from = t.from.as_str(),
                        to = t.to.as_str(),
                        effective_rpm = t.effective_rpm,
                        "retreat state change"
                    );
                }
                if may_retry && Instant::now() < deadline {
                    record.retries += 1;
                    ProviderStats::inc(&provider.stats.retries);
                    drop((resp, lease));
                    match Box::pin(admit::readmit(app, &hot, provider, &mut record, deadline)).await
                    {
                        Ok(r) => {
                            record.route = r;
                            continue;
                        }
                        Err(e) => return local_error(record, e),
                    }
                }
            }
        } else if resp.status().is_server_error() {
            record.error = Some(crate::metrics::ErrorKind::Status5xx);
        } else if quota_exhausted(resp.headers()) {
            if let Some(reset) = header_delay(resp.headers(), &X_RATELIMIT_RESET) {
                limiter.on_quota_exhausted(now, reset);
            }
        }
        break (resp, lease, sent_at);
    };

    // respond
    if !want_model && resp.status().is_server_error() {
        // A failure is logged at `warn` with its model even when the access log is off.
        record.model = route::extract_model(&body).map(|m| truncate(&m, 256));
    }
    record.upstream_latency = Some(sent_at.elapsed());
    record.status = resp.status().as_u16();
    if resp.status().as_u16() < 500 {
        provider.mark_success(app.clock.now_nanos());
    }
    let (mut head, incoming) = resp.into_parts();
    headers::strip_response(&mut head.headers);
    head.headers.insert(headers::X_REQUEST_ID, request_id);
    head.version = Version::HTTP_11;
    let sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let shutdown = sse.then(|| hard_stop.clone().cancelled_owned());
    let body = UpstreamBody::new(
        incoming,
        sse,
        app.config.timeouts.stream_idle,
        shutdown,
        lease,
        record,
    );
    Response::from_parts(head, ProxyBody::Upstream(Box::new(body)))
}

const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
const X_RATELIMIT_REMAINING: [HeaderName; 2] = [
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
];

/// A delay header (`Retry-After`, `x-ratelimit-reset`) as a duration.
fn header_delay(h: &http::HeaderMap, name: &HeaderName) -> Option<std::time::Duration> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::limiter::parse_delay)
}

/// `x-ratelimit-remaining: 0` (or `-requests: 0`): the provider's quota is spent.
fn quota_exhausted(h: &http::HeaderMap) -> bool {
    X_RATELIMIT_REMAINING
        .iter()
        .any(|n| h.get(n).is_some_and(|v| v.as_bytes().trim_ascii() == b"0"))
}

/// Reads the whole body, at most `limit` bytes, before `timer` fires. A body that
/// arrives in one frame (most do) is kept as that frame, without buffering a copy.
async fn read_body(
    body: Incoming,
    headers: &http::HeaderMap,
    limit: usize,
    mut timer: Pin<&mut Sleep>,
) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    if declared == Some(0) {
        return Ok(Bytes::new());
    }
    let body_error = |e: BoxError| {
        if e.is::<http_body_util::LengthLimitError>() {
            ProxyError::BodyTooLarge { limit }
        } else {
            ProxyError::BadBody {
                reason: e.to_string(),
            }
        }
    };
    let mut body = Limited::new(body, limit);
    let first = tokio::select! {
        biased;
        f = body.frame() => f,
        _ = &mut timer => return Err(ProxyError::BodyTimeout),
    };
    let first = match first {
        None => return Ok(Bytes::new()),
        Some(Err(e)) => return Err(body_error(e)),
        Some(Ok(frame)) => frame.into_data().unwrap_or_default(),
    };
    if http_body::Body::is_end_stream(&body) {
        return Ok(first);
    }
    let rest = tokio::select! {
        biased;
        r = body.collect() => r.map_err(body_error)?.to_bytes(),
        _ = &mut timer => return Err(ProxyError::BodyTimeout),
    };
    if first.is_empty() {
        return Ok(rest);
    }
    let mut all = bytes::BytesMut::with_capacity(first.len() + rest.len());
    all.extend_from_slice(&first);
    all.extend_from_slice(&rest);
    Ok(all.freeze())
}

/// One attempt's upstream request: origin-form URI under the target's base path, the
/// prepared headers addressed to the target.
fn build_upstream_request(
    parts: &http::request::Parts,
    mut headers: http::HeaderMap,
    rest: &str,
    body: Bytes,
    provider: &Provider,
    upstream: &crate::config::UpstreamUrl,
) -> Result<Request<Full<Bytes>>, ProxyError> {
    let uri = if upstream.base_path == "/v1" && parts.uri.authority().is_none() {
        // The upstream's path is the client's: share it rather than parse it again.
        parts.uri.clone()
    } else {
        let path = upstream.path_for(rest, parts.uri.query());
        Uri::try_from(path).map_err(|e| ProxyError::BadRequest {
            reason: format!("request path cannot be forwarded: {e}"),
        })?
    };
    let host = if std::ptr::eq(upstream, &provider.config.upstream) {
        provider.host_header.clone()
    } else {
        HeaderValue::from_str(upstream.authority.as_str()).map_err(|e| ProxyError::BadRequest {
            reason: format!("upstream authority: {e}"),
        })?
    };
    let mut req = Request::new(Full::new(body));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    headers.insert(header::HOST, host);
    *req.headers_mut() = headers;
    Ok(req)
}

/// The default priority of the client's key, if the configuration maps it.
fn client_priority(
    map: &std::collections::HashMap<String, Priority>,
    h: &http::HeaderMap,
) -> Option<Priority> {
    if map.is_empty() {
        return None;
    }
    let token = h
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    map.get(token).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spent_quota_is_read_from_the_rate_limit_headers() {
        let mut h = http::HeaderMap::new();
        assert!(!quota_exhausted(&h));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("3"));
        assert!(!quota_exhausted(&h));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static(" 0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1.250"));
        assert!(quota_exhausted(&h));
        assert_eq!(
            header_delay(&h, &X_RATELIMIT_RESET),
            Some(std::time::Duration::from_millis(1250))
        );
        let mut openai = http::HeaderMap::new();
        openai.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("0"),
        );
        assert!(quota_exhausted(&openai));
        openai.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(header_delay(&openai, &header::RETRY_AFTER), None);
    }

    #[test]
    fn a_mapped_client_key_sets_the_default_priority() {
        let map: std::collections::HashMap<String, Priority> =
            [("sk-batch".to_owned(), Priority::Low)]
                .into_iter()
                .collect();
        let mut h = http::HeaderMap::new();
        assert_eq!(client_priority(&map, &h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-batch"),
        );
        assert_eq!(client_priority(&map, &h), Some(Priority::Low));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer other"),
        );
        assert_eq!(client_priority(&map, &h), None);
        assert_eq!(client_priority(&Default::default(), &h), None);
    }
}
