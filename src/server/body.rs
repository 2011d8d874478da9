//! The body of a request, as the handler receives it: read from an HTTP/1 connection's
//! socket by the handler's own polls, or hyper's for an HTTP/2 stream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::wire::{ReadError, WireBody};

/// A request's body.
#[derive(Debug)]
pub enum RequestBody {
    H1(WireBody),
    H2(Incoming),
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    H1(#[from] ReadError),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RequestBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
            RequestBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::H1(b) => b.is_end_stream(),
            RequestBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::H1(b) => b.size_hint(),
            RequestBody::H2(b) => b.size_hint(),
        }
    }
}
