//! A per-worker pool of upstream connections: no lock, no atomics, no cross-thread hand-off.
//!
//! Each worker thread owns one `Pool` (behind an `Rc`). An HTTP/1.1 connection is
//! taken for one request, driven by the request's own task ([`h1`](super::h1)), and
//! goes back idle when its answer's body is complete ([`RespBody`]). An HTTP/2
//! connection (chosen by ALPN) is shared by all requests of the worker through hyper's
//! client. A request whose write fails on a reused connection (the upstream closed it
//! while idle) is sent again on another, so an upstream's idle close never surfaces as
//! a 502.

use std::cell::RefCell;
use std::rc::Rc;

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body_util::Full;
use hyper::client::conn::http2;

use super::body::{H1Body, RespBody};
use super::connector::{ConnectError, Connector, Handshaken};
use super::h1::head::RequestHead;
use super::h1::{BodyState, Conn, H1Error};
use super::idle::Idle;
use crate::config::{Scheme, UpstreamUrl};
use crate::http1::Maps;

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream request failed: {0}")]
    Request(#[source] RequestError),
}

/// A request that failed on an open connection.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    H1(#[from] H1Error),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

/// The worker's connections.
pub struct Pool {
    connector: Connector,
    pub(super) idle: Rc<Idle>,
    h2: RefCell<Vec<Shared>>,
    /// The worker's spare header maps: each HTTP/1.1 answer's head fills one.
    maps: Rc<Maps>,
}

/// The worker's HTTP/2 connection to one upstream.
struct Shared {
    fingerprint: u64,
    scheme: Scheme,
    authority: Authority,
    sender: http2::SendRequest<Full<Bytes>>,
}

impl Shared {
    fn is(&self, url: &UpstreamUrl) -> bool {
        self.fingerprint == url.fingerprint
            && self.scheme == url.scheme
            && self.authority.as_str() == url.authority.as_str()
    }
}

impl Pool {
    pub fn new(connector: Connector, maps: Rc<Maps>) -> Rc<Self> {
        Rc::new(Self {
            connector,
            idle: Rc::new(Idle::default()),
            h2: RefCell::new(Vec::new()),
            maps,
        })
    }

    /// Idle HTTP/1.1 connections kept, all upstreams together.
    pub fn idle_connections(&self) -> usize {
        self.idle.len()
    }

    fn shared_h2(&self, url: &UpstreamUrl) -> Option<http2::SendRequest<Full<Bytes>>> {
        let mut list = self.h2.borrow_mut();
        let i = list.iter().position(|e| e.is(url))?;
        if list[i].sender.is_closed() {
            list.swap_remove(i);
            return None;
        }
        Some(list[i].sender.clone())
    }

    fn forget_h2(&self, url: &UpstreamUrl) {
        self.h2.borrow_mut().retain(|e| !e.is(url));
    }

    /// Sends the request `head` with `body` to `url` on a pooled connection (or a new
    /// one) and returns the answer's head and body.
    pub async fn send(
        self: &Rc<Self>,
        url: &UpstreamUrl,
        head: &RequestHead<'_>,
        body: &Bytes,
    ) -> Result<Response<RespBody>, SendError> {
        // Reuse first; a connection that closed under us takes the request unsent.
        loop {
            if let Some(mut h2) = self.shared_h2(url) {
                match h2.try_send_request(h2_request(url, head, body)).await {
                    Ok(resp) => return Ok(resp.map(RespBody::H2)),
                    Err(mut e) => match e.take_message() {
                        Some(_) => {
                            self.forget_h2(url);
                            continue;
                        }
                        None => return Err(SendError::Request(e.into_error().into())),
                    },
                }
            }
            let Some((slot, mut conn)) = self.idle.take(url) else {
                break;
            };
            match conn.send(head, body, &self.maps).await {
                Ok(answer) => return Ok(self.h1_response(slot, conn, answer)),
                Err(e) if e.unsent() => continue,
                Err(e) => return Err(SendError::Request(e.into())),
            }
        }
        // Boxed: the TLS handshake future is large and rare; inline it would grow every
        // request's future.
        match Box::pin(self.connector.connect(url)).await? {
            Handshaken::H1(io) => {
                let mut conn = Conn::new(io);
                let slot = self.idle.slot(url);
                let answer = conn
                    .send(head, body, &self.maps)
                    .await
                    .map_err(|e| SendError::Request(e.into()))?;
                Ok(self.h1_response(slot, conn, answer))
            }
            Handshaken::H2(mut sender) => {
                self.forget_h2(url);
                self.h2.borrow_mut().push(Shared {
                    fingerprint: url.fingerprint,
                    scheme: url.scheme,
                    authority: url.authority.clone(),
                    sender: sender.clone(),
                });
                let resp = sender
                    .send_request(h2_request(url, head, body))
                    .await
                    .map_err(|e| SendError::Request(e.into()))?;
                Ok(resp.map(RespBody::H2))
            }
        }
    }

    fn h1_response(
        &self,
        slot: usize,
        conn: Conn,
        answer: super::h1::head::ResponseHead,
    ) -> Response<RespBody> {
        let state = BodyState::new(answer.framing);
        let body = H1Body::new(conn, state, answer.keep_alive, Rc::clone(&self.idle), slot);
        let mut resp = Response::new(RespBody::H1(body));
        *resp.status_mut() = answer.status;
        *resp.version_mut() = answer.version;
        *resp.headers_mut() = answer.headers;
        resp
    }
}

/// The request for an HTTP/2 connection: an absolute URI (`:scheme`, `:authority`).
fn h2_request(url: &UpstreamUrl, head: &RequestHead<'_>, body: &Bytes) -> Request<Full<Bytes>> {
    let scheme = match url.scheme {
        Scheme::Http => "http",
        Scheme::Https => "https",
    };
    let target = if head.target.is_empty() {
        "/"
    } else {
        head.target
    };
    let mut req = Request::new(Full::new(body.clone()));
    *req.method_mut() = head.method.clone();
    // The target is the path of a URI already parsed (or checked when it was built) and
    // the authority the configuration's: the absolute form always parses.
    if let Ok(uri) = format!("{scheme}://{}{target}", url.authority).parse() {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    *req.headers_mut() = head.to_map();
    req
}
