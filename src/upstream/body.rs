//! An upstream answer's body: read from the worker's own HTTP/1.1 connection, or from
//! hyper's HTTP/2 client.
//!
//! An HTTP/1.1 body owns its connection while it is read and puts it back idle the
//! moment the body is complete (a short answer read whole with its head goes back
//! before the client has it); a body dropped early, or one that fails, closes its
//! connection, since an unread answer cannot be skipped.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::h1::{BodyState, Conn, H1Error};
use super::idle::Idle;

/// Why an answer's body could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    H1(#[from] H1Error),
    #[error(transparent)]
    H2(#[from] hyper::Error),
}

/// The body of an upstream answer.
pub enum RespBody {
    H1(H1Body),
    H2(Incoming),
}

/// An HTTP/1.1 answer's body.
pub struct H1Body {
    /// The body, when it was read whole with the head.
    whole: Option<Bytes>,
    conn: Option<Conn>,
    state: BodyState,
    keep_alive: bool,
    home: Rc<Idle>,
    slot: usize,
}

impl H1Body {
    /// The body of the answer just read on `conn`, which goes back to `home`'s `slot`
    /// once the body is complete (at once, when it is already whole).
    pub fn new(
        mut conn: Conn,
        mut state: BodyState,
        keep_alive: bool,
        home: Rc<Idle>,
        slot: usize,
    ) -> Self {
        let whole = conn.take_whole(&mut state);
        let mut body = Self {
            whole,
            conn: Some(conn),
            state,
            keep_alive,
            home,
            slot,
        };
        if body.state.is_done() {
            body.release();
        }
        body
    }

    /// The body is complete: its connection goes back idle when it may carry another
    /// request.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.is_clean() {
                self.home.put(self.slot, conn);
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, H1Error>>> {
        if let Some(data) = self.whole.take() {
            return Poll::Ready(Some(Ok(data)));
        }
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(None);
        };
        let next = conn.poll_body(&mut self.state, cx);
        match &next {
            Poll::Ready(Some(Err(_))) => self.conn = None,
            Poll::Ready(_) if self.state.is_done() => self.release(),
            _ => {}
        }
        next
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            RespBody::H1(b) => b
                .poll_data(cx)
                .map(|d| d.map(|d| d.map(Frame::data).map_err(BodyError::H1))),
            RespBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::H2))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::H1(b) => b.whole.is_none() && (b.state.is_done() || b.conn.is_none()),
            RespBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::H1(b) => {
                let whole = b.whole.as_ref().map_or(0, |w| w.len() as u64);
                match b.state {
                    BodyState::Done => SizeHint::with_exact(whole),
                    BodyState::Length(n) => SizeHint::with_exact(whole + n),
                    _ => SizeHint::default(),
                }
            }
            RespBody::H2(b) => b.size_hint(),
        }
    }
}
