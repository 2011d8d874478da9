//! The request path, as explicit phases: `route` → `admit` → `forward` → `respond`,
//! with the [`Record`] filled in along the way and logged when the response ends.
//!
//! Every accepted request gets exactly one answer: the upstream's response streamed
//! through, or one of the sidecar's OpenAI-shaped errors ([`ProxyError`]). The request
//! body is read once, bounded, and kept as `Bytes` so later phases (routing by model,
//! retries) never read the client again.

mod admit;
pub mod framing;
pub mod headers;

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::app::Provider;
use crate::body::{BoxError, ProxyBody, UpstreamBody};
use crate::error::ProxyError;
use crate::health;
use crate::limiter::Answer;
use crate::priority::Priority;
use crate::record::{End, Record, Route};
use crate::route;
use crate::server::Worker;
use crate::stats::ProviderStats;
use crate::upstream::SendError;

/// Entry point for every request a worker accepts. Whatever answers it, the answer
/// carries the request's id (the client's own when sane, see
/// [`headers::client_request_id`]), and a body the answer came before is drained in
/// the background, the connection then closing ([`framing::linger`]).
pub async fn serve(
    worker: Rc<Worker>,
    req: Request<Incoming>,
    remote: SocketAddr,
) -> Response<ProxyBody> {
    let request_id = match headers::client_request_id(req.headers()) {
        Some(id) => id.clone(),
        None => worker.next_request_id(),
    };
    let http1 = req.version() < Version::HTTP_2;
    let mut unread = None;
    let mut resp = route(&worker, req, remote, &request_id, &mut unread).await;
    if let Some(body) = unread.filter(|b| !http_body::Body::is_end_stream(b)) {
        let limits = &worker.app.config.limits;
        framing::linger(
            body,
            framing::linger_bytes(limits.max_body_bytes),
            worker.app.shutdown.hard_stop.clone(),
        );
        if http1 {
            close_connection(&mut resp);
        }
    }
    resp.headers_mut()
        .entry(headers::X_REQUEST_ID)
        .or_insert(request_id);
    resp
}

/// Routes a request to its answer; `unread` gets the request body when the answer
/// comes before it was read to its end.
async fn route(
    worker: &Rc<Worker>,
    req: Request<Incoming>,
    remote: SocketAddr,
    request_id: &HeaderValue,
    unread: &mut Option<Incoming>,
) -> Response<ProxyBody> {
    if req.uri().path().starts_with("/v1/") {
        return proxy(worker, req, request_id.clone(), unread).await;
    }
    let (parts, body) = req.into_parts();
    if let Err(e) = framing::check(&parts, worker.app.config.listen) {
        *unread = Some(body);
        return ProxyError::from(e).into_response();
    }
    let path = parts.uri.path();
    if path.starts_with("/api/admin/") {
        // The admin API reads its own body through a borrow, so whatever it leaves
        // unread (a refusal before reading, a 413 past its limit) is drained like the
        // proxy's: the client receives the answer, and the connection then closes.
        let mut body = body;
        let req = Request::from_parts(parts, &mut body);
        let resp = Box::pin(crate::admin::serve(&worker.app, req, remote)).await;
        *unread = Some(body);
        return resp;
    }
    *unread = Some(body);
    if path.starts_with("/api/dashboard") {
        if let Some(resp) = crate::dashboard::serve(worker, &parts.method, path) {
            return resp;
        }
    }
    match (&parts.method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => health::healthz(),
        (&Method::GET | &Method::HEAD, "/readyz") => Box::pin(health::readyz(worker)).await,
        (_, "/healthz" | "/readyz") => ProxyError::MethodNotAllowed {
            method: parts.method.to_string(),
            path: path.to_owned(),
        }
        .into_response(),
        _ => ProxyError::NotFound {
            method: parts.method.to_string(),
            path: truncate(path, 256),
        }
        .into_response(),
    }
}

/// `Connection: close` on an HTTP/1 answer after which the connection ends.
fn close_connection(resp: &mut Response<ProxyBody>) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
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

/// The `/v1/*` path: everything a client sends to the provider. `unread` holds the
/// request body until it has been read whole.
async fn proxy(
    worker: &Rc<Worker>,
    req: Request<Incoming>,
    request_id: HeaderValue,
    unread: &mut Option<Incoming>,
) -> Response<ProxyBody> {
    let app = &worker.app;
    let (mut parts, body) = req.into_parts();
    let body = unread.insert(body);
    let mut record = Record::new(
        request_id.clone(),
        parts.method.clone(),
        truncate(parts.uri.path(), 256),
    );
    record.arrive(&worker.metrics, app.config.default_provider);
    // One version of the run-time settings for the whole request.
    let hot = app.hot.load();
    let deadline = record.started + hot.request_timeout;
    // One timer for the request's whole deadline (reading the body, then the upstream).
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);

    if let Err(e) = framing::check(&parts, app.config.listen) {
        return local_error(record, e.into());
    }
    if !framing::forwarded(&parts.method) {
        let method = parts.method.to_string().chars().take(64).collect();
        return local_error(record, ProxyError::MethodNotForwarded { method });
    }
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
    *unread = None;

    // route: the model is read when it picks the provider or the access log shows it
    // (parsing the body is the costliest step of a small request otherwise).
    let want_model =
        app.router.routes_by_model() || app.model_scoped || crate::record::access_log_enabled();
    let model = want_model
        .then(|| route::extract_model(&body).map(|m| truncate(&m, 256)))
        .flatten();
    let provider_index = app.router.provider_for(model.as_deref());
    let provider = &app.providers[provider_index];
    record.route_to(provider_index, Arc::clone(&provider.name));
    record.model = model;

    // admit: through the model's own limiter first when limits are per model.
    let limiter = &provider.limiter;
    let scope = record
        .model
        .as_deref()
        .and_then(|m| limiter.scope(m, app.clock.now_nanos()));
    let scope = scope.as_deref();
    let admitted = match admit::admit(app, &hot, provider, scope, &mut record, deadline).await {
        Ok(a) => a,
        Err(e) => return local_error(record, e),
    };
    record.route = admitted.route;
    let (mut permit, mut model_permit) = (admitted.key, admitted.model);

    // forward: a limited request the upstream answers 429 is absorbed — parked again
    // at the head of its priority and re-sent after the pause — while retries and its
    // deadline allow.
    let mut prepared = headers::upstream_request_headers(
        std::mem::take(&mut parts.headers),
        provider.auth_header.as_ref(),
        &request_id,
        body.len(),
    );
    let rest = &parts.uri.path()["/v1/".len()..];
    let hard_stop = &app.shutdown.hard_stop;
    let (head, incoming, prefix, lease, sent_at) = loop {
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
        // Granted too close to its deadline: not sent. It could not be answered in time,
        // and a send the deadline cuts off may or may not have reached the provider,
        // which would make the window's count (and what is learned from it) wrong.
        if deadline.saturating_duration_since(Instant::now()) < MIN_TIME_TO_SEND {
            let now = app.clock.now_nanos();
            for p in [permit.take(), model_permit.take()].into_iter().flatten() {
                p.give_back(now);
            }
            ProviderStats::inc(&provider.stats.dropped_timeout);
            let waited = round_ms(record.queue_wait);
            return local_error(
                record,
                ProxyError::QueueTimeout {
                    provider: provider.name.to_string(),
                    waited,
                },
            );
        }
        // Every send with the provider's key is counted in its window, stamped now.
        let send_clock = app.clock.now_nanos();
        match permit.as_mut() {
            Some(p) => p.stamp(send_clock),
            None if std::ptr::eq(target, &provider.config.upstream) => {
                limiter.record_forced_send(send_clock)
            }
            None => {}
        }
        if let Some(p) = model_permit.as_mut() {
            p.stamp(send_clock);
        }
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
        let (head, mut incoming) = resp.into_parts();
        let status = head.status;
        // A 429's body says which limit it is (rate, tokens, a model's concurrency).
        let prefix = if status == StatusCode::TOO_MANY_REQUESTS {
            read_prefix(&mut incoming, REFUSAL_PREFIX, timer.as_mut()).await
        } else {
            Bytes::new()
        };
        let now = app.clock.now_nanos();
        if status.is_server_error() {
            record.error = Some(crate::metrics::ErrorKind::Status5xx);
        }
        let Some(sent) = permit.take() else {
            // Passthrough: counted, teaches nothing about the paced limit.
            limiter.answers.on_response(now);
            if status == StatusCode::TOO_MANY_REQUESTS {
                limiter.answers.on_429(now);
                ProviderStats::inc(&provider.stats.upstream_429);
            }
            break (head, incoming, prefix, lease, sent_at);
        };
        let (sent_at_clock, sent_count) = (sent.sent_at().unwrap_or(now), sent.count());
        drop(sent);
        let answer = read_answer(&head, &prefix, provider.config.rate_limit_headers);
        match (model_permit.take(), scope) {
            // Per model: the key counts the answer and takes its quota headers; the
            // model's limiter learns from it.
            (Some(m), Some(model)) => {
                limiter.observe(now, &answer);
                let own = Answer {
                    quota: None,
                    ..answer
                };
                model.observe(now, &own);
                model.learn(now, sent_at_clock, m.count(), &own);
            }
            _ => limiter.on_answer(now, sent_at_clock, sent_count, &answer),
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            ProviderStats::inc(&provider.stats.upstream_429);
            let retryable = answer.refusal != Some(crate::limiter::Refusal::Billing);
            if may_retry && retryable && Instant::now() < deadline {
                record.retries += 1;
                ProviderStats::inc(&provider.stats.retries);
                drop((head, incoming, lease));
                match Box::pin(admit::readmit(
                    app,
                    &hot,
                    provider,
                    scope,
                    &mut record,
                    deadline,
                ))
                .await
                {
                    Ok(a) => {
                        record.route = a.route;
                        (permit, model_permit) = (a.key, a.model);
                        continue;
                    }
                    Err(e) => return local_error(record, e),
                }
            }
        }
        break (head, incoming, prefix, lease, sent_at);
    };

    // respond
    if !want_model && head.status.is_server_error() {
        // A failure is logged at `warn` with its model even when the access log is off.
        record.model = route::extract_model(&body).map(|m| truncate(&m, 256));
    }
    record.upstream_latency = Some(sent_at.elapsed());
    record.status = head.status.as_u16();
    if head.status.as_u16() < 500 {
        provider.mark_success(app.clock.now_nanos());
    }
    let mut head = head;
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
    )
    .with_prefix(prefix);
    Response::from_parts(head, ProxyBody::Upstream(Box::new(body)))
}

/// `Retry-After` of a request refused because the shared budget is out of reach.
pub(crate) const BUDGET_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Least time left before its deadline for a request to be sent upstream.
pub(crate) const MIN_TIME_TO_SEND: std::time::Duration = std::time::Duration::from_millis(50);

fn round_ms(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}

/// Most bytes of a 429's body read to classify it (the rest streams to the client).
const REFUSAL_PREFIX: usize = 4096;

/// What an upstream answer says about the provider's limits.
fn read_answer(
    head: &http::response::Parts,
    prefix: &[u8],
    dialect: crate::limiter::signal::Dialect,
) -> Answer {
    use crate::limiter::signal;
    let refusal = signal::classify(head.status, &head.headers, prefix);
    Answer {
        ok: head.status.is_success(),
        refusal,
        // Read only where it applies (a refusal): it may need the wall clock.
        retry_after: refusal
            .and_then(|_| signal::retry_after(&head.headers, std::time::SystemTime::now())),
        quota: signal::quota(&head.headers, dialect),
    }
}

/// Reads the first frames of `body`, up to about `max` bytes, before `timer` fires. What
/// is read is sent to the client first ([`UpstreamBody::with_prefix`]).
async fn read_prefix(body: &mut Incoming, max: usize, mut timer: Pin<&mut Sleep>) -> Bytes {
    let mut out = bytes::BytesMut::new();
    while out.len() < max && !http_body::Body::is_end_stream(body) {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            _ = &mut timer => break,
        };
        match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    out.extend_from_slice(d);
                }
            }
            // An error or the end: what was read is all there is; the rest of the
            // stream reports its own end.
            _ => break,
        }
    }
    out.freeze()
}

/// Reads the whole body, at most `limit` bytes, before `timer` fires. A body that
/// arrives in one frame (most do) is kept as that frame, without buffering a copy.
async fn read_body(
    body: &mut Incoming,
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
