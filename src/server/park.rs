//! Parking: an idle HTTP/1 connection gives hyper's buffers back.
//!
//! hyper keeps a connection's read and write buffers (8 KiB each, not configurable
//! lower) and its state for the connection's whole life, about 28 KiB per idle
//! keep-alive connection; parked, one costs little more than its socket. This file holds
//! what decides when a connection is idle: the worker's count of open and parked
//! connections ([`Conns`]), each connection's [`Activity`] (requests in flight, bytes
//! moved), the guards that keep a request counted until its response body is gone
//! ([`Busy`], [`Tracked`], [`Answer`]), and the socket hyper reads ([`ParkIo`]), whose park
//! timer fires after [`PARK_AFTER`] with nothing in flight and nothing moved. The
//! connection loop (`connection.rs`) then closes hyper's side and waits for the next
//! byte. Above [`CROWDED`] open connections a worker parks idle ones at once.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::Response;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::fairness::SilentSet;

/// it is parked. It is parked between one and two of these after its last activity.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Open connections on one worker above which an idle connection is parked at once.
pub const CROWDED: usize = 512;

/// The connections of one worker: how many are open and how many parked, and which
/// are silent. The worker waits for none to be left when it drains.
#[derive(Debug)]
pub(super) struct Conns {
    crowded: usize,
    pub(super) open: Cell<usize>,
    pub(super) parked: Cell<usize>,
    pub(super) silent: Rc<SilentSet>,
    none_left: tokio::sync::Notify,
}

impl Conns {
    /// Above `crowded` open connections, idle ones are parked at once.
    pub(super) fn new(crowded: usize) -> Self {
        Self {
            crowded,
            open: Cell::new(0),
            parked: Cell::new(0),
            silent: Rc::default(),
            none_left: tokio::sync::Notify::new(),
        }
    }

    /// Connections open now.
    pub(super) fn open(&self) -> usize {
        self.open.get()
    }

    /// Connections parked now.
    pub(super) fn parked(&self) -> usize {
        self.parked.get()
    }

    /// Resolves once no connection is open.
    pub(super) async fn none_left(&self) {
        while self.open.get() > 0 {
            self.none_left.notified().await;
        }
    }
}

/// One open connection in its worker's count, released when dropped.
pub(super) struct Open(pub(super) Rc<Conns>);

impl Open {
    pub(super) fn new(conns: Rc<Conns>) -> Self {
        conns.open.set(conns.open.get() + 1);
        Self(conns)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let n = self.0.open.get().saturating_sub(1);
        self.0.open.set(n);
        if n == 0 {
            self.0.none_left.notify_one();
        }
    }
}

/// What the parts of one connection share (all on the worker's thread).
#[derive(Default)]
pub(super) struct Activity {
    /// Requests whose response has not been dropped yet.
    pub(super) in_flight: Cell<usize>,
    /// Reads and writes that moved bytes, ever.
    pub(super) moves: Cell<u64>,
    /// Set by the park timer; the connection loop then closes hyper's side.
    pub(super) park: Cell<bool>,
    /// hyper's connection started on a partial request left by the last one: it is
    /// not parked again before that request is read, so its header timer runs out.
    pub(super) partial: Cell<bool>,
    /// The connection's task, when it must look again once no request is in flight.
    pub(super) waiter: Cell<Option<std::task::Waker>>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("in_flight", &self.in_flight.get())
            .field("park", &self.park.get())
            .finish_non_exhaustive()
    }
}

impl Activity {
    fn moved(&self) {
        self.moves.set(self.moves.get().wrapping_add(1));
    }
}

/// Counts a request in flight from the service call until its response body is gone.
#[derive(Debug)]
pub(super) struct Busy(Rc<Activity>);

impl Busy {
    pub(super) fn new(activity: &Rc<Activity>) -> Self {
        activity.in_flight.set(activity.in_flight.get() + 1);
        activity.partial.set(false);
        Self(Rc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let n = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(n);
        if n == 0 {
            if let Some(w) = self.0.waiter.take() {
                w.wake();
            }
        }
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _busy: Option<Busy>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The handler's future, boxed (hyper keeps the slot of a connection's service future
/// for the connection's life: a few KiB if unboxed), and never failing.
pub(super) struct Answer<F> {
    pub(super) fut: Pin<Box<F>>,
    pub(super) busy: Option<Busy>,
}

impl<F, B> Future for Answer<F>
where
    F: Future<Output = Response<B>>,
{
    type Output = Result<Response<Tracked<B>>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = std::task::ready!(self.fut.as_mut().poll(cx));
        let busy = self.busy.take();
        Poll::Ready(Ok(resp.map(|body| Tracked { body, _busy: busy })))
    }
}

/// The socket as hyper sees it: counts bytes moved, replays bytes a previous hyper
/// connection read but did not parse, and runs the park timer while hyper waits for
/// a request with none in flight.
pub(super) struct ParkIo {
    pub(super) stream: TcpStream,
    pub(super) conns: Rc<Conns>,
    pub(super) replay: Bytes,
    pub(super) activity: Rc<Activity>,
    pub(super) timer: Option<Pin<Box<Sleep>>>,
    /// `activity.moves` when the timer was last armed.
    pub(super) armed_at: u64,
}

impl ParkIo {
    /// hyper's read is pending: with nothing in flight, the connection is idle, and
    /// a timer that fires with no byte moved since it was armed parks it.
    fn idle(&mut self, cx: &mut Context<'_>) {
        let a = &self.activity;
        if a.park.get() || a.partial.get() {
            return;
        }
        if self.conns.open.get() > self.conns.crowded {
            if a.in_flight.get() == 0 {
                a.park.set(true);
                cx.waker().wake_by_ref();
            } else {
                // hyper may not read again once the response is done: look then.
                a.waiter.set(Some(cx.waker().clone()));
            }
            return;
        }
        // The timer runs whether or not a request is in flight (hyper may not read
        // again when one ends); it parks only a connection quiet since it was armed.
        let moves = a.moves.get();
        let quiet = a.in_flight.get() == 0 && moves == self.armed_at;
        if self.timer.is_none() {
            self.timer = Some(Box::pin(tokio::time::sleep(PARK_AFTER)));
            self.armed_at = moves;
            if let Some(timer) = self.timer.as_mut() {
                let _ = timer.as_mut().poll(cx);
            }
            return;
        }
        let Some(timer) = self.timer.as_mut() else {
            return;
        };
        // An armed timer already holds this task's waker (registered by the poll that
        // armed it, or re-armed it below; the socket is only ever read by this
        // connection's task), so it is polled again only once it has fired: polling it
        // on every pending read (several per request) re-registered the same waker for
        // about a hundred instructions each time.
        if !timer.is_elapsed() || timer.as_mut().poll(cx).is_pending() {
            return;
        }
        if quiet {
            self.activity.park.set(true);
            cx.waker().wake_by_ref();
        } else {
            self.armed_at = moves;
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + PARK_AFTER);
            let _ = timer.as_mut().poll(cx);
        }
    }
}

impl AsyncRead for ParkIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            this.activity.moved();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.activity.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                this.idle(cx);
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for ParkIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.moved();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
