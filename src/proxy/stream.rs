//! An upstream response body on its way to the client, with the proxy's guarantees.
//!
//! An upstream body is passed through frame by frame, never buffered, so an SSE token
//! reaches the client as soon as it arrives. The wrapper adds what a proxy owes its
//! client on top: an idle timeout between frames (not a total deadline), an upstream
//! failure that stays a failure (for SSE a final `event: error` before the connection is
//! aborted, never a clean end), a clean `event: error` end of SSE streams when the
//! shutdown grace period runs out, the upstream connection's return to the pool once
//! the body is complete, and exactly one [`Record`] per request however the body ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::body::BoxError;
use crate::record::{End, Record};
use crate::reply;
use crate::upstream::RespBody;

use super::tokens::Settle;

enum State {
    Streaming,
    /// An error frame was sent to an SSE client. hyper drops unflushed output when a
    /// body fails, so the next poll yields once (letting hyper flush the event) and
    /// the one after aborts the stream.
    AbortNext {
        message: String,
        yielded: bool,
    },
    Done,
}

/// A streamed upstream response body with the proxy's guarantees.
pub struct UpstreamBody {
    inner: RespBody,
    sse: bool,
    idle: Duration,
    /// Armed the first time the upstream makes us wait: a body that arrives whole
    /// never touches the timer wheel.
    idle_timer: Option<Pin<Box<Sleep>>>,
    last_frame: Instant,
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    record: Option<Record>,
    state: State,
    bytes: u64,
    /// The last two bytes sent, to end a half-written SSE event before an error event.
    tail: [u8; 2],
    /// The start of the body, already read by the proxy (a 429's, to classify it).
    prefix: Option<Bytes>,
    /// The request's token reservation, settled from the usage the body carries.
    tokens: Option<Box<Settle>>,
}

impl UpstreamBody {
    /// Wraps `inner`. `shutdown` fires when the grace period ends (SSE streams then end
    /// with an error event). `now`: when the answer's head came.
    pub fn new(
        inner: RespBody,
        sse: bool,
        idle: Duration,
        shutdown: Option<WaitForCancellationFutureOwned>,
        record: Record,
        now: Instant,
    ) -> Self {
        Self {
            inner,
            sse,
            idle,
            idle_timer: None,
            last_frame: now,
            shutdown: if sse { shutdown.map(Box::pin) } else { None },
            record: Some(record),
            state: State::Streaming,
            bytes: 0,
            tail: *b"\n\n",
            prefix: None,
            tokens: None,
        }
    }

    /// Whether the answer is an event stream.
    pub fn is_sse(&self) -> bool {
        self.sse
    }

    /// The request's token reservation is settled by this body: from the usage it
    /// carries, whenever and however it ends.
    pub fn settle_with(&mut self, settle: Settle) {
        self.tokens = Some(Box::new(settle));
    }

    /// The body's first bytes were read already: they are sent first.
    pub fn with_prefix(mut self, prefix: Bytes) -> Self {
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// The upstream body ended cleanly.
    fn complete(&mut self) {
        self.finish(End::Complete);
        self.state = State::Done;
    }

    fn finish(&mut self, end: End) {
        if let Some(t) = self.tokens.take() {
            t.end();
        }
        if let Some(r) = self.record.take() {
            r.finish(end, self.bytes);
        }
    }

    /// Ends the stream as a failure: SSE clients get an error event first.
    fn fail(
        &mut self,
        cx: &mut Context<'_>,
        end: End,
        message: String,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.finish(end);
        if self.sse {
            self.state = State::AbortNext {
                message: message.clone(),
                yielded: false,
            };
            Poll::Ready(Some(Ok(Frame::data(
                self.sse_error(&message, "upstream_stream_error"),
            ))))
        } else {
            // Let hyper flush what the client already has, then abort (see `AbortNext`).
            self.state = State::AbortNext {
                message,
                yielded: true,
            };
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn sse_error(&self, message: &str, code: &str) -> Bytes {
        let json = reply::error_body(message, "upstream_error", code);
        let mut out = Vec::with_capacity(json.len() + 24);
        if &self.tail != b"\n\n" {
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"event: error\ndata: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }

    /// A piece of the body through the token settlement (which reads its usage, and
    /// may hold back or cut a usage chunk); at the `end`, with what it still held.
    #[inline(always)]
    fn through_tokens(&mut self, data: Bytes, end: bool) -> Bytes {
        match self.tokens.as_mut() {
            None => data,
            Some(t) => Self::settling(t, data, end),
        }
    }

    #[cold]
    fn settling(t: &mut Settle, data: Bytes, end: bool) -> Bytes {
        let data = t.pass(data);
        match end.then(|| t.flush()).flatten() {
            Some(rest) if data.is_empty() => rest,
            Some(rest) => [data, rest].concat().into(),
            None => data,
        }
    }

    fn note_data(&mut self, data: &Bytes) {
        self.bytes += data.len() as u64;
        match data.len() {
            0 => {}
            1 => self.tail = [self.tail[1], data[0]],
            n => self.tail = [data[n - 2], data[n - 1]],
        }
    }

    /// Polls the idle timer, re-arming it lazily from the last frame's time so a busy
    /// stream never touches the timer wheel per frame.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let due = self.last_frame + self.idle;
            let timer = self
                .idle_timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            ready!(timer.as_mut().poll(cx));
            if due <= Instant::now() {
                return Poll::Ready(());
            }
            timer.as_mut().reset(due);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // Dropped before the end: the client went away (or the server shut down).
        self.finish(End::ClientGone);
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match &mut this.state {
            State::Done => return Poll::Ready(None),
            State::AbortNext { message, yielded } => {
                if !*yielded {
                    *yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let msg = std::mem::take(message);
                this.state = State::Done;
                return Poll::Ready(Some(Err(msg.into())));
            }
            State::Streaming => {}
        }
        if let Some(sd) = this.shutdown.as_mut() {
            if sd.as_mut().poll(cx).is_ready() {
                this.finish(End::Shutdown);
                this.state = State::Done;
                let frame = this.sse_error(
                    "the sidecar is shutting down; the stream was cut at the end of the grace period",
                    "shutting_down",
                );
                return Poll::Ready(Some(Ok(Frame::data(frame))));
            }
        }
        if let Some(data) = this.prefix.take() {
            this.last_frame = Instant::now();
            if let Some(r) = this.record.as_mut() {
                r.first_byte.get_or_insert(this.last_frame);
            }
            let end = this.inner.is_end_stream();
            let data = this.through_tokens(data, end);
            this.note_data(&data);
            if end {
                this.complete();
            }
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = Instant::now();
                // hyper stops polling once a Content-Length body is complete, so the end
                // is detected here rather than by waiting for `None`.
                let end = this.inner.is_end_stream();
                let frame = match frame.into_data() {
                    Ok(data) => {
                        let came = !data.is_empty();
                        let data = this.through_tokens(data, end);
                        if came && data.is_empty() && !end {
                            // All of it held back (an event not ended yet) or cut:
                            // nothing to write; the next piece is read at once.
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        if let Some(r) = this.record.as_mut().filter(|_| !data.is_empty()) {
                            r.first_byte.get_or_insert(this.last_frame);
                        }
                        this.note_data(&data);
                        Frame::data(data)
                    }
                    Err(other) => other,
                };
                if end {
                    this.complete();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let msg = format!("upstream stream failed: {e}");
                this.fail(cx, End::UpstreamError, msg)
            }
            Poll::Ready(None) => {
                // What the token settlement held back of an unended last event.
                if let Some(rest) = this.tokens.as_mut().and_then(|t| t.flush()) {
                    this.note_data(&rest);
                    this.complete();
                    return Poll::Ready(Some(Ok(Frame::data(rest))));
                }
                this.complete();
                Poll::Ready(None)
            }
            Poll::Pending => {
                ready!(this.poll_idle(cx));
                let msg = format!("upstream stream idle for more than {:?}", this.idle);
                this.fail(cx, End::IdleTimeout, msg)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Streaming if !self.sse => {
                let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = self.inner.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + prefix);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + prefix);
                }
                hint
            }
            _ => SizeHint::default(),
        }
    }
}
