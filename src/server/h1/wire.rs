//! The socket of one HTTP/1 connection, shared by the connection's loop and the body
//! of its current request.
//!
//! The request body is read by whoever polls it (the handler, in the connection's own
//! task), straight from the socket: there is no channel and no second task. The loop
//! reads heads and watches for the client going away; the body reads its own bytes.
//! Both go through [`Wire`], which holds what was read and not yet used (`pending`) and
//! how far the current body has been read.
//!
//! Reads land in the worker's [`Arena`]: one buffer from which each read is split off
//! as shared `Bytes`, so a request's head and body cost no allocation of their own and
//! an idle connection holds no buffer at all.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::head::Framing;
use crate::http1::chunked::{ChunkError, Decoder, Step};

/// Size of each arena buffer, and the least free room kept for a read.
const ARENA: usize = 32 * 1024;
const ARENA_ROOM: usize = 4 * 1024;
/// Bytes of a chunked body read at a time.
const CHUNKED_READ: usize = 16 * 1024;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A worker's read buffer. Each read is split off the front as `Bytes` sharing the
/// buffer; a new buffer replaces it when less than [`ARENA_ROOM`] is left. A buffer is
/// freed once nothing split from it is held.
#[derive(Debug, Default)]
pub struct Arena {
    buf: RefCell<BytesMut>,
}

impl Arena {
    /// One read of at most `max` bytes: what was read (empty at the end of the
    /// stream). tokio's read marks the socket drained after a short read, so the next
    /// read waits for the poller instead of trying the socket for nothing.
    pub fn poll_read(
        &self,
        stream: &RefCell<TcpStream>,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<io::Result<Bytes>> {
        let mut buf = self.buf.borrow_mut();
        if buf.capacity() < ARENA_ROOM {
            *buf = BytesMut::with_capacity(ARENA);
        }
        let mut stream = stream.borrow_mut();
        let n = ready!(poll_read_buf(
            Pin::new(&mut *stream),
            cx,
            &mut (&mut *buf).limit(max)
        ))?;
        Poll::Ready(Ok(buf.split_to(n).freeze()))
    }
}

/// How far the current request's body has been read.
#[derive(Debug)]
enum BodyState {
    /// Read to its end (or there was none).
    Done,
    /// This many bytes to go.
    Length(u64),
    /// Chunked: the decoder and the bytes it has not used yet.
    Chunked(Decoder, BytesMut),
    /// Broken (the client closed, or sent a bad chunk): the connection cannot be reused.
    Failed,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the request body failed: {0}")]
    Io(#[from] io::Error),
    #[error("the client closed the connection before the end of the body")]
    Closed,
    #[error("invalid chunked request body: {0}")]
    Chunked(#[from] ChunkError),
}

/// The connection's socket and what was read from it.
#[derive(Debug)]
pub struct Wire {
    /// Borrowed only inside a poll, never across a wait.
    stream: RefCell<TcpStream>,
    arena: Rc<Arena>,
    /// Read and not used yet: the rest of a read that held a head (a body's start, a
    /// pipelined request).
    pending: RefCell<Bytes>,
    body: RefCell<BodyState>,
    /// Bytes of `100 Continue` still to write before the body is read; `None` when
    /// the client did not ask for it or it was sent.
    continue_at: Cell<Option<usize>>,
}

impl Wire {
    pub fn new(stream: TcpStream, arena: Rc<Arena>) -> Self {
        Self {
            stream: RefCell::new(stream),
            arena,
            pending: RefCell::default(),
            body: RefCell::new(BodyState::Done),
            continue_at: Cell::new(None),
        }
    }

    /// One read into the worker's arena (see [`Arena::poll_read`]).
    pub fn poll_read(&self, cx: &mut Context<'_>, max: usize) -> Poll<io::Result<Bytes>> {
        self.arena.poll_read(&self.stream, cx, max)
    }

    /// One read appended to `buf` (a head in pieces, a chunked body).
    pub fn poll_read_into(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        max: usize,
    ) -> Poll<io::Result<usize>> {
        buf.reserve(max);
        let mut stream = self.stream.borrow_mut();
        poll_read_buf(Pin::new(&mut *stream), cx, &mut buf.limit(max))
    }

    /// One write of what the socket takes of `buf`.
    pub fn poll_write(&self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.stream.borrow_mut()).poll_write(cx, buf)
    }

    /// Stops writing: the client reads the end of the stream after the answer.
    pub fn shutdown_write(&self) {
        let stream = self.stream.borrow();
        let _ = socket2::SockRef::from(&*stream).shutdown(std::net::Shutdown::Write);
    }

    /// Bytes read and not used yet.
    pub fn pending(&self) -> std::cell::RefMut<'_, Bytes> {
        self.pending.borrow_mut()
    }

    /// A request's head was read: its body starts with what is pending.
    pub fn start_body(&self, framing: Framing, expect_continue: bool) {
        let state = match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => {
                let rest = std::mem::take(&mut *self.pending.borrow_mut());
                BodyState::Chunked(Decoder::default(), BytesMut::from(&rest[..]))
            }
        };
        let waits = expect_continue && !matches!(state, BodyState::Done);
        // Bytes already sent behind the head mean the client did not wait.
        let waits = waits && self.pending.borrow().is_empty();
        self.continue_at.set(waits.then_some(0));
        *self.body.borrow_mut() = state;
    }

    /// The body was read to its end.
    pub fn body_done(&self) -> bool {
        matches!(*self.body.borrow(), BodyState::Done)
    }

    /// Bytes of a length-framed body left unread, if that is what is left.
    pub fn body_left(&self) -> Option<u64> {
        match *self.body.borrow() {
            BodyState::Done => Some(0),
            BodyState::Length(n) => Some(n),
            _ => None,
        }
    }

    /// Whether the client was told to send its body (or never asked to wait). A body
    /// the client still holds back can be skipped; one it may be sending cannot.
    pub fn body_withheld(&self) -> bool {
        self.continue_at.get() == Some(0)
    }

    /// Forgets the rest of the body (the client withheld it, awaiting `100 Continue`
    /// that will not come).
    pub fn skip_withheld_body(&self) {
        self.continue_at.set(None);
        *self.body.borrow_mut() = BodyState::Done;
    }

    /// Reads the next frame of the request body.
    pub fn poll_body(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, ReadError>>> {
        if let Some(at) = self.continue_at.get() {
            match self.poll_continue(cx, at) {
                Poll::Ready(Ok(())) => self.continue_at.set(None),
                Poll::Ready(Err(e)) => return self.fail(e.into()),
                Poll::Pending => return Poll::Pending,
            }
        }
        let mut body = self.body.borrow_mut();
        loop {
            match &mut *body {
                BodyState::Done | BodyState::Failed => return Poll::Ready(None),
                BodyState::Length(left) => {
                    let mut pending = self.pending.borrow_mut();
                    if !pending.is_empty() {
                        let n = (pending.len() as u64).min(*left) as usize;
                        let data = pending.split_to(n);
                        *left -= n as u64;
                        if *left == 0 {
                            *body = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(data)));
                    }
                    let max = (*left).min(usize::MAX as u64) as usize;
                    match self.poll_read(cx, max) {
                        Poll::Ready(Ok(data)) if data.is_empty() => {
                            *body = BodyState::Failed;
                            return Poll::Ready(Some(Err(ReadError::Closed)));
                        }
                        Poll::Ready(Ok(data)) => *pending = data,
                        Poll::Ready(Err(e)) => {
                            *body = BodyState::Failed;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                BodyState::Chunked(decoder, buf) => match decoder.decode(buf) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(data))),
                    Ok(Step::Done) => {
                        // What follows the body is the next request's.
                        *self.pending.borrow_mut() = buf.split().freeze();
                        *body = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::More) => match self.poll_read_into(cx, buf, CHUNKED_READ) {
                        Poll::Ready(Ok(0)) => {
                            *body = BodyState::Failed;
                            return Poll::Ready(Some(Err(ReadError::Closed)));
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => {
                            *body = BodyState::Failed;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                        Poll::Pending => return Poll::Pending,
                    },
                    Err(e) => {
                        *body = BodyState::Failed;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
            }
        }
    }

    fn fail(&self, e: ReadError) -> Poll<Option<Result<Bytes, ReadError>>> {
        *self.body.borrow_mut() = BodyState::Failed;
        Poll::Ready(Some(Err(e)))
    }

    fn poll_continue(&self, cx: &mut Context<'_>, mut at: usize) -> Poll<io::Result<()>> {
        while at < CONTINUE.len() {
            match ready!(self.poll_write(cx, &CONTINUE[at..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => {
                    at += n;
                    self.continue_at.set(Some(at));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// While an answer is awaited or written: whether the client went away (its side
    /// closed, or the socket failed). Only once the body is read: before, the body's
    /// own reads see it. Bytes that arrive meanwhile (a pipelined request) are kept for
    /// later, and then nothing more is read, so a client's close is seen only by writes.
    pub fn poll_gone(&self, cx: &mut Context<'_>) -> bool {
        if !self.body_done() || !self.pending.borrow().is_empty() {
            return false;
        }
        match self.poll_read(cx, ARENA_ROOM) {
            Poll::Pending => false,
            Poll::Ready(Ok(data)) if data.is_empty() => true,
            Poll::Ready(Ok(data)) => {
                *self.pending.borrow_mut() = data;
                false
            }
            Poll::Ready(Err(_)) => true,
        }
    }
}

/// The body of a request on an HTTP/1 connection: reads from the connection's socket
/// when polled.
#[derive(Debug)]
pub struct WireBody(Rc<Wire>);

impl WireBody {
    pub fn new(wire: Rc<Wire>) -> Self {
        Self(wire)
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        self.0.poll_body(cx).map(|f| f.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.0.body_done()
    }

    fn size_hint(&self) -> SizeHint {
        match *self.0.body.borrow() {
            BodyState::Done | BodyState::Failed => SizeHint::with_exact(0),
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Chunked(..) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_splits_reads_off_one_buffer_and_renews_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (s, _) = l.accept().await.unwrap();
            let arena = Arena::default();
            let mut got = Vec::new();
            let total = 3 * ARENA;
            let sent = vec![7u8; total];
            tokio::io::AsyncWriteExt::write_all(&mut c, &sent)
                .await
                .unwrap();
            let s = RefCell::new(s);
            let mut n = 0;
            while n < total {
                let b = std::future::poll_fn(|cx| arena.poll_read(&s, cx, 1000))
                    .await
                    .unwrap();
                assert!(!b.is_empty() && b.len() <= 1000);
                n += b.len();
                got.push(b);
            }
            assert!(got.iter().all(|b| b.iter().all(|&x| x == 7)));
            drop(c);
            let end = std::future::poll_fn(|cx| arena.poll_read(&s, cx, 10)).await;
            assert!(end.unwrap().is_empty(), "end of stream");
        });
    }
}
