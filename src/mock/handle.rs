//! One request to the simulated upstream, in the order a provider checks it: the mock's
//! own `/mock/*` endpoints aside, count it, record it, check the API key, refuse
//! `stream_options` if this model does (a 400 that enters no window), take a worker slot
//! (`--worker-limit`), pass the rolling windows (requests and tokens), then answer with
//! the fault knobs applied. The body is parsed once, for the token count and the answer.
//! A worker slot is held by the answer's body, so a stream keeps its worker busy until it
//! ends or the client leaves.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::server::RequestBody;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;

use super::admit::Meter;
use super::control;
use super::count::Ask;
use super::headers;
use super::knobs::Knobs;
use super::respond::{self, MockBody};
use super::shared::{MockShared, Seen};
use super::tokens::TokenCharge;
use super::workers::WorkerSlot;
use crate::body::BoxError;

const CHAT: &str = "/v1/chat/completions";
const EMBEDDINGS: &str = "/v1/embeddings";

/// Answers one request.
// `Rc<Arc<_>>` on purpose: the per-request clone is the `Rc`'s, a non-atomic increment.
#[allow(clippy::redundant_allocation)]
pub async fn handle(
    shared: Rc<Arc<MockShared>>,
    req: Request<RequestBody>,
    remote: SocketAddr,
) -> Response<Holding> {
    let (resp, slot) = serve(&shared, req, remote).await;
    resp.map(|body| Holding { body, _slot: slot })
}

/// An answer's body with the worker slot it holds: freed when hyper drops the body (at
/// its end, or when the client goes away). The size and the end pass through, so a
/// whole body is sent with its `Content-Length`, as a provider sends it.
pub struct Holding {
    body: MockBody,
    _slot: Option<WorkerSlot>,
}

impl Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The answer, and the worker slot it holds (if the worker cap took one).
async fn serve(
    s: &MockShared,
    req: Request<RequestBody>,
    remote: SocketAddr,
) -> (Response<MockBody>, Option<WorkerSlot>) {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    if path.starts_with("/mock/") {
        let body = match Limited::new(body, 1 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return (bad_body(&e), None),
        };
        let query = parts.uri.query().unwrap_or("");
        let resp = control::route(s, &parts.method, &path, query, &body)
            .unwrap_or_else(|| respond::error(StatusCode::NOT_FOUND, &format!("no route {path}")));
        return (resp, None);
    }
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    let body = match Limited::new(body, 64 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return (bad_body(&e), None),
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
            let resp = respond::error(StatusCode::UNAUTHORIZED, "missing or invalid API key");
            return (resp, None);
        }
    }
    let knobs = Knobs::from(&s.config, &parts.headers);
    let parsed = (parts.method == Method::POST && (path == CHAT || path == EMBEDDINGS))
        .then(|| respond::parse(&body));
    let ask = match &parsed {
        Some(Ok(v)) => Ask::read(v),
        _ => Ask::default(),
    };
    let refusing_models = &s.config.refuse_include_usage;
    let model = if s.gate.wants_model() || !refusing_models.is_empty() {
        crate::route::extract_model(&body)
    } else {
        None
    };
    if ask.has_stream_options
        && (knobs.refuse_stream_options
            || model
                .as_deref()
                .is_some_and(|m| refusing_models.iter().any(|r| r == m)))
    {
        s.stats
            .stream_options_refused
            .fetch_add(1, Ordering::Relaxed);
        return (respond::stream_options_refused(), None);
    }
    // The worker first: a request no worker takes never reaches the windows.
    let slot = match s.gate.worker(model.as_deref()) {
        Ok(slot) => slot,
        Err(limit) => {
            s.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            s.stats.worker_limited.fetch_add(1, Ordering::Relaxed);
            return (headers::worker_limited(limit), None);
        }
    };
    let bound = if path == CHAT {
        ask.bound(knobs.tokens)
    } else {
        0
    };
    let admission = match s
        .gate
        .admit(model.as_deref(), ask.prompt.saturating_add(bound))
    {
        Ok(a) => a,
        Err(refused) => {
            s.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let resp = headers::rate_limited(s.headers, *refused, model.as_deref());
            return (resp, None);
        }
    };
    let meter = (s.gate.charge_model() == TokenCharge::Actual && s.gate.is_judging())
        .then(|| Meter::new(Arc::clone(&s.gate), model.map(|m| m.into_owned())));
    let mut resp = answer(s, &parts, &path, parsed, &ask, &knobs, meter).await;
    headers::admitted(resp.headers_mut(), s.headers, admission);
    (resp, slot)
}

fn bad_body(e: &BoxError) -> Response<MockBody> {
    respond::error(StatusCode::BAD_REQUEST, &format!("bad body: {e}"))
}

/// The answer to an admitted request, with the fault knobs applied; `parsed` is the body
/// of a chat or embeddings request, `meter` what an `actual` charge counts.
async fn answer(
    s: &MockShared,
    parts: &http::request::Parts,
    path: &str,
    parsed: Option<Result<Value, String>>,
    ask: &Ask,
    knobs: &Knobs,
    meter: Option<Meter>,
) -> Response<MockBody> {
    if !knobs.header_delay.is_zero() {
        tokio::time::sleep(knobs.header_delay).await;
    }
    if let Some(status) = knobs.status {
        s.stats.errors.fetch_add(1, Ordering::Relaxed);
        return respond::error(status, "simulated upstream error");
    }
    match (&parts.method, path, parsed) {
        (&Method::GET, "/v1/models", _) => respond::models(),
        (&Method::POST, CHAT, Some(req)) => respond::chat(&s.stats, &req, ask, knobs, meter).await,
        (&Method::POST, EMBEDDINGS, Some(req)) => {
            respond::embeddings(&req, ask, knobs, meter).await
        }
        _ => respond::error(StatusCode::NOT_FOUND, &format!("no route {path}")),
    }
}
