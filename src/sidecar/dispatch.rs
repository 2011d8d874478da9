//! Every request a proxy worker accepts starts here: it gets its id, and its path picks
//! its handler (`/v1/` the proxy, `/api/admin/` the admin API, `/api/dashboard` the
//! dashboard, `/healthz` and `/readyz` health). Whatever answers it, the answer carries
//! the request's id (the client's own when sane, see
//! [`headers::client_request_id`]), and a body the answer came before is drained: by
//! the HTTP/1 connection itself once the answer is out (it then closes, so the answer
//! says so), by a background task for an HTTP/2 stream ([`framing::linger`]).

use std::net::SocketAddr;
use std::rc::Rc;

use crate::server::RequestBody;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response};

use super::worker::Worker;
use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::framing;
use crate::proxy::headers;
use crate::{admin, dashboard, health, proxy};

/// The worker's handler.
pub async fn serve(
    worker: Rc<Worker>,
    req: Request<RequestBody>,
    remote: SocketAddr,
) -> Response<proxy::Answer> {
    let request_id = match headers::client_request_id(req.headers()) {
        Some(id) => id.clone(),
        None => worker.next_request_id(),
    };
    let mut unread = None;
    // The proxy's path first, without the extra future of `route`.
    let mut resp = if req.uri().path().starts_with("/v1/") {
        let (parts, body) = req.into_parts();
        let resp = proxy::handle(&worker.proxy(), &parts, body, &request_id, &mut unread).await;
        // Read to its end: the map's storage serves a later head.
        worker.maps.put(parts.headers);
        resp
    } else {
        route(&worker, req, remote, &mut unread)
            .await
            .map(proxy::Answer::Local)
    };
    match unread.filter(|b| !http_body::Body::is_end_stream(b)) {
        None => {}
        // The HTTP/1 connection lingers itself once the answer is written, and closes.
        Some(RequestBody::H1(_)) => {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Some(RequestBody::H2(body)) => {
            let limits = &worker.app.config.limits;
            framing::linger(
                body,
                framing::linger_bytes(limits.max_body_bytes),
                worker.app.shutdown.hard_stop.clone(),
            );
        }
    }
    // The sidecar's id, also over one the upstream sent.
    resp.headers_mut().insert(headers::X_REQUEST_ID, request_id);
    resp
}

/// Routes a request outside `/v1/` to its answer; `unread` gets the request body when
/// the answer comes before it was read to its end.
async fn route(
    worker: &Rc<Worker>,
    req: Request<RequestBody>,
    remote: SocketAddr,
    unread: &mut Option<RequestBody>,
) -> Response<ProxyBody> {
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
        let resp = Box::pin(admin::serve(&worker.app, req, remote)).await;
        *unread = Some(body);
        return resp;
    }
    *unread = Some(body);
    if path.starts_with("/api/dashboard") {
        if let Some(resp) = dashboard::serve(&worker.app, &worker.dashboard, &parts.method, path) {
            return resp;
        }
    }
    match (&parts.method, path) {
        (&Method::GET | &Method::HEAD, "/healthz") => health::healthz(),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            Box::pin(health::readyz(&worker.app, &worker.pool, &worker.readiness)).await
        }
        (_, "/healthz" | "/readyz") => ProxyError::MethodNotAllowed {
            method: parts.method.to_string(),
            path: path.to_owned(),
        }
        .into_response(),
        _ => ProxyError::NotFound {
            method: parts.method.to_string(),
            path: framing::truncate(path, 256),
        }
        .into_response(),
    }
}
