//! The body of every response the sidecar sends: bytes it has whole, or a stream.
//!
//! Streams are boxed behind `dyn Body` (the proxy's upstream body, the dashboard's
//! events), so this, the lowest layer of the answer, knows none of them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every response the sidecar sends.
pub enum ProxyBody {
    Full(Full<Bytes>),
    /// A streamed body: an upstream's, or one the sidecar makes (the dashboard's events).
    Stream(Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>),
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Full::new(bytes.into()))
    }

    pub fn stream(body: impl Body<Data = Bytes, Error = BoxError> + 'static) -> Self {
        Self::Stream(Box::pin(body))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|never| match never {}))),
            ProxyBody::Stream(s) => s.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_end_stream(),
            ProxyBody::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(b) => b.size_hint(),
            ProxyBody::Stream(s) => s.size_hint(),
        }
    }
}
