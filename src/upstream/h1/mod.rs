//! A lean HTTP/1.1 client connection, driven inside the request's own task.
//!
//! hyper's client runs each connection in a task of its own and hands requests and
//! responses across a channel: per request a send, a task wake-up on each side, a
//! oneshot for the head and a channel for the body. Here the request's task writes the
//! head and body itself and reads the answer straight from the socket; the response body
//! is read by the same task as the client pulls it. Only what a proxy of
//! OpenAI-compatible APIs needs is spoken: one request at a time on a connection
//! (no pipelining), bodies sent whole with their length, answers framed by length,
//! chunks or close, interim 1xx answers skipped, no upgrades.
//!
//! What crosses the wire is bounded: a response head is at most
//! [`head::MAX_HEAD_BYTES`] and [`head::MAX_HEADERS`] headers, a chunk-size line and
//! the trailers have limits of their own ([`chunked`]).

pub mod head;

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use http::Method;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use super::io::Io;
use crate::http1::chunked::{ChunkError, Decoder, Step};
use crate::http1::Maps;
use head::{Framing, HeadError, RequestHead, ResponseHead};

/// Bodies up to this size are copied behind the head and sent in one write.
const INLINE_BODY: usize = 16 * 1024;
/// Free room kept in the read buffer before a read.
const READ_ROOM: usize = 4 * 1024;
/// What the read buffer grows by.
const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The request could not be written: it did not reach the upstream whole, so it
    /// may be sent again on another connection.
    #[error("writing the request failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading the answer failed: {0}")]
    Read(#[source] io::Error),
    #[error("connection closed before an answer")]
    ClosedBeforeAnswer,
    #[error("connection closed in the middle of the response head")]
    ClosedMidHead,
    #[error("connection closed before the end of the body")]
    ClosedMidBody,
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("invalid chunked body: {0}")]
    Chunked(#[from] ChunkError),
}

impl H1Error {
    /// Whether the request surely did not reach the upstream (it may be sent again).
    pub fn unsent(&self) -> bool {
        matches!(self, H1Error::Write(_))
    }
}

/// Where a response body is.
#[derive(Debug, Clone)]
pub enum BodyState {
    Length(u64),
    Chunked(Decoder),
    Close,
    Done,
}

impl BodyState {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Decoder::default()),
            Framing::Close => BodyState::Close,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self, BodyState::Done)
    }
}

/// One upstream HTTP/1.1 connection.
pub struct Conn {
    io: Io,
    read: BytesMut,
    /// The request head (and a small body) as written; kept for the next request.
    write: Vec<u8>,
    /// The pool's sweep count when it was last put back idle.
    pub idle_since: u32,
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            idle_since: 0,
        }
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed
    /// it nor sent anything unasked. One non-blocking read attempt, no waiting.
    pub fn is_reusable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut buf),
            Poll::Pending
        )
    }

    /// Whether what was read so far is exactly one answer (nothing left over): only
    /// then may the connection carry another request.
    pub fn is_clean(&self) -> bool {
        self.read.is_empty()
    }

    /// Writes the request and reads the answer's head (interim 1xx answers skipped).
    pub async fn send(
        &mut self,
        head: &RequestHead<'_>,
        body: &Bytes,
        maps: &Maps,
    ) -> Result<ResponseHead, H1Error> {
        self.write.clear();
        head::encode(head, &mut self.write);
        let inline = body.len() <= INLINE_BODY;
        if inline {
            self.write.extend_from_slice(body);
        }
        self.io
            .write_all(&self.write)
            .await
            .map_err(H1Error::Write)?;
        if !inline {
            self.io.write_all(body).await.map_err(H1Error::Write)?;
        }
        self.io.flush().await.map_err(H1Error::Write)?;
        if self.write.capacity() > 4 * INLINE_BODY {
            // One request with huge headers does not pin its buffer for the connection's life.
            self.write = Vec::new();
        }
        let head_request = *head.method == Method::HEAD;
        loop {
            if !self.read.is_empty() {
                if let Some(answer) = head::parse(&mut self.read, head_request, maps)? {
                    if answer.status.is_informational() {
                        continue;
                    }
                    return Ok(answer);
                }
            }
            if poll_fn(|cx| self.poll_fill(cx))
                .await
                .map_err(H1Error::Read)?
                == 0
            {
                return Err(if self.read.is_empty() {
                    H1Error::ClosedBeforeAnswer
                } else {
                    H1Error::ClosedMidHead
                });
            }
        }
    }

    /// Takes the whole body at once when it has already been read (a short answer
    /// usually comes in the head's read).
    pub fn take_whole(&mut self, state: &mut BodyState) -> Option<Bytes> {
        match *state {
            BodyState::Length(n) if self.read.len() as u64 >= n => {
                *state = BodyState::Done;
                Some(self.read.split_to(n as usize).freeze())
            }
            _ => None,
        }
    }

    /// The next piece of the response body; `None` at its end.
    pub fn poll_body(
        &mut self,
        state: &mut BodyState,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, H1Error>>> {
        loop {
            match state {
                BodyState::Done => return Poll::Ready(None),
                BodyState::Length(left) => {
                    if !self.read.is_empty() {
                        let n = (self.read.len() as u64).min(*left);
                        let data = self.read.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            *state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut self.read) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Step::Done) => {
                        *state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => {}
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
                BodyState::Close => {
                    if !self.read.is_empty() {
                        return Poll::Ready(Some(Ok(self.read.split().freeze())));
                    }
                }
            }
            match ready!(self.poll_fill(cx)) {
                Err(e) => return Poll::Ready(Some(Err(H1Error::Read(e)))),
                Ok(0) if matches!(state, BodyState::Close) => {
                    *state = BodyState::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(H1Error::ClosedMidBody))),
                Ok(_) => {}
            }
        }
    }

    /// Reads what the socket has into the read buffer; `Ok(0)` at the end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_ROOM {
            self.read.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}
