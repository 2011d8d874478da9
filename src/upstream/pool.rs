//! A per-worker pool of upstream connections: no lock, no atomics, no cross-thread hand-off.
//!
//! Each worker thread owns one `Pool` (behind an `Rc`). HTTP/1.1 connections are checked
//! out for one request and come back when its response body has been read to the end
//! ([`Lease`]); a body dropped early takes its connection with it, since an unread
//! response cannot be reused. An HTTP/2 connection is shared by all requests of the
//! worker. A pooled connection that turns out to be closed before the request was
//! written is discarded and the request retried on another, so an upstream's idle
//! close never surfaces as a 502.

use std::cell::RefCell;
use std::rc::Rc;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};

use super::connector::{ConnectError, Connector, Handshaken, UpBody};
use crate::config::{Scheme, UpstreamUrl};

/// Idle HTTP/1.1 connections kept per upstream per worker.
const MAX_IDLE_PER_UPSTREAM: usize = 512;

#[derive(Debug, Clone)]
struct Key {
    fingerprint: u64,
    scheme: Scheme,
    authority: Authority,
}

impl Key {
    fn of(url: &UpstreamUrl) -> Self {
        Self {
            fingerprint: url.fingerprint,
            scheme: url.scheme,
            authority: url.authority.clone(),
        }
    }

    fn same(&self, other: &Key) -> bool {
        self.fingerprint == other.fingerprint
            && self.scheme == other.scheme
            && self.authority.as_str() == other.authority.as_str()
    }

    fn is(&self, url: &UpstreamUrl) -> bool {
        self.fingerprint == url.fingerprint
            && self.scheme == url.scheme
            && self.authority.as_str() == url.authority.as_str()
    }
}

/// Why a request could not be sent or answered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream request failed: {0}")]
    Request(#[source] hyper::Error),
}

/// The worker's connections.
pub struct Pool {
    connector: Connector,
    // A worker talks to a handful of upstreams: a short list scanned by a precomputed
    // fingerprint beats hashing the authority on every checkout and return.
    idle: RefCell<Vec<(Key, Vec<http1::SendRequest<UpBody>>)>>,
    h2: RefCell<Vec<(Key, http2::SendRequest<UpBody>)>>,
}

/// An HTTP/1.1 connection lent to one request; [`Lease::release`] returns it.
pub struct Lease {
    pool: Rc<Pool>,
    key: Key,
    sender: http1::SendRequest<UpBody>,
}

impl Lease {
    /// Puts the connection back; call only once its response body has ended.
    pub fn release(self) {
        let Lease { pool, key, sender } = self;
        if sender.is_closed() {
            return;
        }
        let mut idle = pool.idle.borrow_mut();
        let pos = match idle.iter().position(|(k, _)| k.same(&key)) {
            Some(i) => i,
            None => {
                idle.push((key, Vec::new()));
                idle.len() - 1
            }
        };
        let list = &mut idle[pos].1;
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(sender);
        }
    }
}

impl Pool {
    pub fn new(connector: Connector) -> Rc<Self> {
        Rc::new(Self {
            connector,
            idle: RefCell::new(Vec::new()),
            h2: RefCell::new(Vec::new()),
        })
    }

    fn take_idle(&self, url: &UpstreamUrl) -> Option<http1::SendRequest<UpBody>> {
        let mut idle = self.idle.borrow_mut();
        let list = &mut idle.iter_mut().find(|(k, _)| k.is(url))?.1;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn shared_h2(&self, url: &UpstreamUrl) -> Option<http2::SendRequest<UpBody>> {
        let mut list = self.h2.borrow_mut();
        let i = list.iter().position(|(k, _)| k.is(url))?;
        if list[i].1.is_closed() {
            list.swap_remove(i);
            return None;
        }
        Some(list[i].1.clone())
    }

    fn forget_h2(&self, url: &UpstreamUrl) {
        self.h2.borrow_mut().retain(|(k, _)| !k.is(url));
    }

    /// Sends `req` to `url` on a pooled connection (or a new one) and returns the
    /// response head with the lease to release when its body ends (HTTP/1.1 only).
    pub async fn send(
        self: &Rc<Self>,
        url: &UpstreamUrl,
        mut req: Request<UpBody>,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        // Reuse first; a connection that closed under us hands the request back unsent.
        loop {
            if let Some(mut h2) = self.shared_h2(url) {
                absolute_form(&mut req, url);
                match h2.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, None)),
                    Err(mut e) => match e.take_message() {
                        Some(back) => {
                            self.forget_h2(url);
                            req = back;
                            origin_form(&mut req);
                            continue;
                        }
                        None => return Err(SendError::Request(e.into_error())),
                    },
                }
            }
            let Some(mut sender) = self.take_idle(url) else {
                break;
            };
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(self.lease(url, sender)))),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
        // Boxed: the TLS handshake future is large and rare; inline it would grow every
        // request's future (hyper moves that future once per request).
        match Box::pin(self.connector.connect(url)).await? {
            Handshaken::H1(mut sender) => {
                let resp = sender.send_request(req).await.map_err(SendError::Request)?;
                Ok((resp, Some(self.lease(url, sender))))
            }
            Handshaken::H2(mut sender) => {
                self.forget_h2(url);
                self.h2.borrow_mut().push((Key::of(url), sender.clone()));
                absolute_form(&mut req, url);
                let resp = sender.send_request(req).await.map_err(SendError::Request)?;
                Ok((resp, None))
            }
        }
    }

    fn lease(self: &Rc<Self>, url: &UpstreamUrl, sender: http1::SendRequest<UpBody>) -> Lease {
        Lease {
            pool: Rc::clone(self),
            key: Key::of(url),
            sender,
        }
    }
}

/// HTTP/2 needs `:scheme` and `:authority`: the URI becomes absolute.
fn absolute_form(req: &mut Request<UpBody>, url: &UpstreamUrl) {
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = Some(match url.scheme {
        Scheme::Http => http::uri::Scheme::HTTP,
        Scheme::Https => http::uri::Scheme::HTTPS,
    });
    parts.authority = Some(url.authority.clone());
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
}

/// HTTP/1.1 origin servers get the path and query only.
fn origin_form(req: &mut Request<UpBody>) {
    let mut parts = req.uri().clone().into_parts();
    parts.scheme = None;
    parts.authority = None;
    if let Ok(uri) = http::Uri::from_parts(parts) {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_11;
}
