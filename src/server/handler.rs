//! What the server runs for each request: any `Fn(Request, SocketAddr) -> impl Future`.
//!
//! The bounds the server needs (a body of `Bytes` whose error converts to a boxed
//! error, a `'static` future) are written once, here, and every generic function of
//! the server asks for `H: Handler`.

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body::Body;

use super::body::RequestBody;
use crate::body::BoxError;
use crate::http1::Maps;

/// A worker's request handler: called once per request with the client's address.
pub trait Handler: 'static {
    type Body: Body<Data = Bytes, Error: Into<BoxError>> + Unpin + 'static;
    type Future: Future<Output = Response<Self::Body>> + 'static;

    fn call(&self, req: Request<RequestBody>, remote: SocketAddr) -> Self::Future;

    /// The id an answer the server makes itself carries (a request it refuses before
    /// the handler sees it), in `x-request-id`; none by default.
    fn request_id(&self) -> Option<HeaderValue> {
        None
    }

    /// The worker's spare header maps, which the server fills with request heads and
    /// takes back from the answers it writes; the handler hands back the request maps
    /// it has read (see [`Maps`]). A fresh set by default.
    fn header_maps(&self) -> Rc<Maps> {
        Rc::default()
    }
}

/// A handler that shares its worker's request ids (`ids`: server-made answers carry
/// one) and header maps (`maps`) with the server.
pub struct WithWorker<F, I> {
    pub handler: F,
    pub ids: I,
    pub maps: Rc<Maps>,
}

impl<F, I> Handler for WithWorker<F, I>
where
    F: Handler,
    I: Fn() -> HeaderValue + 'static,
{
    type Body = F::Body;
    type Future = F::Future;

    fn call(&self, req: Request<RequestBody>, remote: SocketAddr) -> F::Future {
        self.handler.call(req, remote)
    }

    fn request_id(&self) -> Option<HeaderValue> {
        Some((self.ids)())
    }

    fn header_maps(&self) -> Rc<Maps> {
        Rc::clone(&self.maps)
    }
}

impl<F, Fut, B> Handler for F
where
    F: Fn(Request<RequestBody>, SocketAddr) -> Fut + 'static,
    Fut: Future<Output = Response<B>> + 'static,
    B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin + 'static,
{
    type Body = B;
    type Future = Fut;

    fn call(&self, req: Request<RequestBody>, remote: SocketAddr) -> Fut {
        self(req, remote)
    }
}
