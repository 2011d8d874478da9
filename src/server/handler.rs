//! What the server runs for each request: any `Fn(Request, SocketAddr) -> impl Future`.
//!
//! The bounds hyper needs (a body of `Bytes` whose error converts to a boxed error, a
//! `'static` future) are written once, here, and every generic function of the server
//! asks for `H: Handler`.

use std::future::Future;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;

use crate::body::BoxError;

/// A worker's request handler: called once per request with the client's address.
pub trait Handler: 'static {
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Unpin + 'static;
    type Future: Future<Output = Response<Self::Body>> + 'static;

    fn call(&self, req: Request<Incoming>, remote: SocketAddr) -> Self::Future;
}

impl<F, Fut, B> Handler for F
where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = Response<B>> + 'static,
    B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin + 'static,
{
    type Body = B;
    type Future = Fut;

    fn call(&self, req: Request<Incoming>, remote: SocketAddr) -> Fut {
        self(req, remote)
    }
}
