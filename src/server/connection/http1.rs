//! The HTTP/1 connection loop: read a head, answer it, wait for the next; the pieces
//! it drives (head parsing, the socket the body shares, the answer's writing) are
//! `server::h1`'s. See `server::h1` for what is spoken and the limits.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http::{Method, Request, StatusCode, Version};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::super::body::RequestBody;
use super::super::conns::Conns;
use super::super::h1::head::{self, Head, Refusal};
use super::super::h1::wire::{Wire, WireBody};
use super::super::h1::write::{self, Exchange, Queue};
use super::super::h1::H1;
use super::super::handler::Handler;
use crate::framing;

/// Most bytes one read for a head takes (the rest waits in the socket).
const HEAD_READ: usize = 16 * 1024;

/// What a connection needs from its server.
pub(super) struct Ctx<'a, H> {
    pub(super) h1: &'a H1,
    pub(super) handler: &'a H,
    pub(super) draining: &'a CancellationToken,
    pub(super) conns: &'a Conns,
    pub(super) remote: SocketAddr,
}

/// Serves an HTTP/1 connection until it closes.
pub(super) async fn serve<H: Handler>(
    ctx: Ctx<'_, H>,
    stream: TcpStream,
    sleep: Pin<&mut Sleep>,
    drain: Pin<&mut WaitForCancellationFutureOwned>,
) {
    let h1 = ctx.h1;
    let wire = Rc::new(Wire::new(stream, Rc::clone(&h1.arena)));
    let mut queue = Queue::default();
    let mut waits = Waits {
        sleep,
        deadline: Instant::now() + h1.timeout,
        armed: false,
        drain,
        watching_drain: false,
        draining: ctx.draining,
    };
    loop {
        // Boxed: inline, the handler's future and the answer's body would size every
        // connection's task for its whole life, idle or not (one allocation a request,
        // as the handler's future alone would take). Made in a block of its own, so
        // the head is not kept in the task beside it.
        let answering = {
            let next = match read_head(&wire, h1, &mut waits, ctx.conns).await {
                Ok(Some(head)) => Ok(head),
                Ok(None) => return,
                Err(refusal) => Err(refusal),
            };
            Box::pin(respond(&ctx, &wire, &mut queue, next))
        };
        match answering.await {
            Ended::KeepAlive => {}
            Ended::Close => {
                Box::pin(linger_close(&wire, h1.linger_bytes)).await;
                return;
            }
            Ended::Abort => return,
        }
        waits.deadline = Instant::now() + h1.timeout;
    }
}

/// A head read, or refused.
async fn respond<H: Handler>(
    ctx: &Ctx<'_, H>,
    wire: &Rc<Wire>,
    queue: &mut Queue,
    next: Result<Head, Refusal>,
) -> Ended {
    match next {
        Ok(head) => exchange(ctx, wire, queue, head).await,
        Err(refusal) => {
            refuse(ctx, wire, queue, refusal).await;
            Ended::Abort
        }
    }
}

/// How an exchange left the connection.
enum Ended {
    KeepAlive,
    /// Answered; the connection closes (lingering).
    Close,
    /// The client went away, or the answer could not be written whole.
    Abort,
}

/// One request: the handler's answer, written.
async fn exchange<H: Handler>(
    ctx: &Ctx<'_, H>,
    wire: &Rc<Wire>,
    queue: &mut Queue,
    head: Head,
) -> Ended {
    let Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        close_after,
        ..
    } = head;
    let (parts, ()) = request.into_parts();
    let mut ex = Exchange {
        head: parts.method == Method::HEAD,
        http10: parts.version == Version::HTTP_10,
        close: !keep_alive || !ctx.h1.keep_alive || close_after,
    };
    wire.start_body(framing, expect_continue);
    let body = RequestBody::H1(WireBody::new(Rc::clone(wire)));
    let answer = ctx
        .handler
        .call(Request::from_parts(parts, body), ctx.remote);
    let mut answer = std::pin::pin!(answer);
    let resp = poll_fn(|cx| match answer.as_mut().poll(cx) {
        Poll::Ready(r) => Poll::Ready(Some(r)),
        Poll::Pending if wire.poll_gone(cx) => Poll::Ready(None),
        Poll::Pending => Poll::Pending,
    })
    .await;
    // The client went away: the handler's future is dropped, which cancels it.
    let Some(resp) = resp else {
        return Ended::Abort;
    };
    // A body left unread (a refusal before reading it, a 413) ends the connection.
    ex.close |= !wire.body_done() || ctx.draining.is_cancelled();
    match write::answer(wire, &ctx.h1.scratch, &ctx.h1.maps, queue, resp, ex).await {
        Ok(true) => Ended::KeepAlive,
        Ok(false) => Ended::Close,
        Err(e) => {
            tracing::debug!(error = %e, "client connection ended while answering");
            Ended::Abort
        }
    }
}

/// A request the server refuses itself: the answer, then the close.
async fn refuse<H: Handler>(ctx: &Ctx<'_, H>, wire: &Wire, queue: &mut Queue, refusal: Refusal) {
    let id = ctx.handler.request_id();
    if write::refusal(wire, &ctx.h1.scratch, queue, &refusal, id)
        .await
        .is_ok()
    {
        linger_close(wire, ctx.h1.linger_bytes).await;
    }
}

/// The connection's timer and its view of the drain. The timer is armed once and
/// moved only when it fires early (the deadline moved on meanwhile), so a busy
/// connection does not touch the timer wheel on every request; the drain's waker is
/// registered once for the connection's life.
struct Waits<'a> {
    sleep: Pin<&'a mut Sleep>,
    /// When the current wait times out: the idle limit after the last answer, or the
    /// header read timeout after a head's first byte.
    deadline: Instant,
    /// The timer holds this task's waker and the latest deadline it was set to.
    armed: bool,
    drain: Pin<&'a mut WaitForCancellationFutureOwned>,
    watching_drain: bool,
    draining: &'a CancellationToken,
}

/// Why a wait for the client's bytes ended without them.
#[derive(Debug, PartialEq, Eq)]
enum Woken {
    TimedOut,
    Draining,
}

impl Waits<'_> {
    /// After a read found nothing (its poll holds the waker): whether the wait ends.
    fn poll(&mut self, idle: bool, cx: &mut Context<'_>) -> Poll<Woken> {
        if idle && self.draining.is_cancelled() {
            return Poll::Ready(Woken::Draining);
        }
        if !self.watching_drain {
            self.watching_drain = true;
            if self.drain.as_mut().poll(cx).is_ready() && idle {
                return Poll::Ready(Woken::Draining);
            }
        }
        if !self.armed || self.sleep.is_elapsed() {
            if self.sleep.deadline() < self.deadline || !self.armed {
                self.sleep.as_mut().reset(self.deadline);
            } else {
                return Poll::Ready(Woken::TimedOut);
            }
            self.armed = true;
            if self.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woken::TimedOut);
            }
        }
        Poll::Pending
    }
}

/// What one read for a head found.
enum Got<T> {
    Read(T),
    Failed,
    Woken(Woken),
}

/// Reads the next request head. `Ok(None)`: the connection ends without one (the
/// client closed, it stayed idle too long, the server is draining).
async fn read_head(
    wire: &Wire,
    h1: &H1,
    waits: &mut Waits<'_>,
    conns: &Conns,
) -> Result<Option<Head>, Refusal> {
    // A pipelined request's start, read with the previous one.
    let mut acc = {
        let mut pending = wire.pending();
        if pending.is_empty() {
            None
        } else {
            match head::parse(&pending, &h1.limits, &h1.maps)? {
                Some(head) => {
                    pending.advance(head.len);
                    return Ok(Some(head));
                }
                None => Some(BytesMut::from(&std::mem::take(&mut *pending)[..])),
            }
        }
    };
    if acc.is_none() {
        // The usual case: the head arrives whole in one read, parsed where it landed
        // in the arena.
        conns.parked.set(conns.parked.get() + 1);
        let got = poll_fn(|cx| match wire.poll_read(cx, HEAD_READ) {
            Poll::Ready(Ok(data)) => Poll::Ready(Got::Read(data)),
            Poll::Ready(Err(_)) => Poll::Ready(Got::Failed),
            Poll::Pending => waits.poll(true, cx).map(Got::Woken),
        })
        .await;
        conns.parked.set(conns.parked.get().saturating_sub(1));
        let data = match got {
            Got::Read(data) if !data.is_empty() => data,
            // Closed, failed, idle too long, or draining.
            _ => return Ok(None),
        };
        if let Some(head) = head::parse(&data, &h1.limits, &h1.maps)? {
            *wire.pending() = data.slice(head.len..);
            return Ok(Some(head));
        }
        acc = Some(BytesMut::from(&data[..]));
    }
    // A head in pieces: gathered, and parsed again only once an empty line may have
    // arrived (a client sending a byte at a time costs linear work), within the
    // header read timeout from now.
    waits.deadline = Instant::now() + h1.timeout;
    let mut buf = acc.unwrap_or_default();
    loop {
        let from = buf.len().saturating_sub(3);
        let got = poll_fn(|cx| match wire.poll_read_into(cx, &mut buf, HEAD_READ) {
            Poll::Ready(Ok(n)) => Poll::Ready(Got::Read(n)),
            Poll::Ready(Err(_)) => Poll::Ready(Got::Failed),
            Poll::Pending => waits.poll(false, cx).map(Got::Woken),
        })
        .await;
        match got {
            Got::Read(0) | Got::Failed | Got::Woken(Woken::Draining) => return Ok(None),
            Got::Woken(Woken::TimedOut) => {
                return Err(Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    code: "request_timeout",
                    message: format!(
                        "request head not received within {} s",
                        h1.timeout.as_secs_f64()
                    ),
                })
            }
            Got::Read(_) => {}
        }
        if head::may_end(&buf[from..]) || buf.len() >= h1.limits.max_head_bytes {
            let all = std::mem::take(&mut buf).freeze();
            match head::parse(&all, &h1.limits, &h1.maps)? {
                Some(head) => {
                    *wire.pending() = all.slice(head.len..);
                    return Ok(Some(head));
                }
                None => buf = BytesMut::from(&all[..]),
            }
        }
    }
}

/// Closes after an answer that said so. When the client may still be sending (a body
/// left unread, bytes after the request), the server first stops writing and reads
/// and discards what comes, up to `max` bytes and [`framing::LINGER_TIME`], so that
/// closing with unread bytes does not reset the connection before the client has read
/// its answer.
async fn linger_close(wire: &Wire, max: u64) {
    wire.shutdown_write();
    if wire.body_done() && wire.pending().is_empty() && !wire.body_withheld() {
        return;
    }
    let mut read = 0u64;
    let discard = poll_fn(|cx| {
        while read < max {
            match std::task::ready!(wire.poll_read(cx, HEAD_READ)) {
                Ok(data) if !data.is_empty() => read += data.len() as u64,
                _ => break,
            }
        }
        Poll::Ready(())
    });
    let _ = tokio::time::timeout(framing::LINGER_TIME, discard).await;
}
