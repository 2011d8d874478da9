//! One request to the simulated upstream, in the order a provider checks it: the mock's
//! own `/mock/*` endpoints aside, count it, record it, check the API key, take a worker
//! slot (`--worker-limit`), pass the rolling windows, then answer with the fault knobs
//! applied. A worker slot is held by the answer's body, so a stream keeps its worker
//! busy until it ends or the client leaves.

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

use super::admit::WorkerSlot;
use super::control;
use super::headers;
use super::knobs::Knobs;
use super::respond::{self, MockBody};
use super::shared::{MockShared, Seen};
use crate::body::BoxError;

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
    let model = if s.gate.wants_model() {
        crate::route::extract_model(&body)
    } else {
        None
    };
    // The worker first: a request no worker takes never reaches the windows.
    let slot = match s.gate.worker(model.as_deref()) {
        Ok(slot) => slot,
        Err(limit) => {
            s.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            s.stats.worker_limited.fetch_add(1, Ordering::Relaxed);
            return (headers::worker_limited(limit), None);
        }
    };
    let binding = match s.gate.admit(model.as_deref()) {
        Ok(b) => b,
        Err(refusal) => {
            s.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            return (headers::rate_limited(s.headers, refusal), None);
        }
    };
    let mut resp = answer(s, &parts, &path, &body).await;
    if let Some(b) = binding {
        headers::admitted(resp.headers_mut(), s.headers, b);
    }
    (resp, slot)
}

fn bad_body(e: &BoxError) -> Response<MockBody> {
    respond::error(StatusCode::BAD_REQUEST, &format!("bad body: {e}"))
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
        (&Method::POST, "/v1/chat/completions") => respond::chat(&s.stats, body, &knobs).await,
        (&Method::POST, "/v1/embeddings") => respond::embeddings(body, &knobs).await,
        _ => respond::error(StatusCode::NOT_FOUND, &format!("no route {path}")),
    }
}
