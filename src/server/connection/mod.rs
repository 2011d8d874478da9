//! One client connection, from its first byte to its close.
//!
//! The protocol is told from the first bytes (peeked, not read): the HTTP/2 preface
//! means h2c, served by hyper; anything else HTTP/1, served by the server's own
//! connection loop (`h1`).
//!
//! A new connection is *silent* until its first byte: it waits at most the first-byte
//! timeout for it, and meanwhile holds its place among its worker's silent connections,
//! which may be shed near the connection cap (see `fairness`).
//!
//! Draining: an idle HTTP/1 connection closes at once, one with a request in flight
//! once it is answered; HTTP/2 gets a GOAWAY.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

mod http1;

use super::body::RequestBody;
use super::conns::{Conns, Open};
use super::exec::LocalExec;
use super::fairness::Silent;
use super::h1::H1;
use super::handler::Handler;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Http1,
    Http2,
    /// Closed by the client, timed out, failed, or the server is draining.
    Close,
}

/// Waits for the first bytes of a new connection without reading them: the first
/// byte within `first_byte` (holding its place among the silent connections until
/// then), enough to tell the protocol within `limit` of the start. The timer and the
/// drain's waiter are the connection's own, used again by what serves it: one of each
/// in the task, which every idle connection holds.
async fn first_request(
    stream: &TcpStream,
    (first_byte, limit): (Duration, Duration),
    silent: Silent,
    mut sleep: Pin<&mut Sleep>,
    mut drain: Pin<&mut WaitForCancellationFutureOwned>,
) -> Next {
    let start = Instant::now();
    let mut silent = Some(silent);
    let mut deadline = start + first_byte;
    sleep.as_mut().reset(deadline);
    // A partial preface: the rest is on its way, looked for again after a nap (a peek
    // would return at once).
    let mut napping = false;
    let mut buf = [0u8; H2_PREFACE.len()];
    poll_fn(|cx| {
        if drain.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Next::Close);
        }
        loop {
            if napping {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                napping = false;
                sleep.as_mut().reset(deadline);
            }
            let mut peeked = ReadBuf::new(&mut buf);
            match stream.poll_peek(cx, &mut peeked) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Next::Close),
                Poll::Ready(Ok(n)) => {
                    if silent.take().is_some() {
                        deadline = start + limit;
                    }
                    if buf[..n] != H2_PREFACE[..n] {
                        return Poll::Ready(Next::Http1);
                    }
                    if n == H2_PREFACE.len() {
                        return Poll::Ready(Next::Http2);
                    }
                    if Instant::now() >= deadline {
                        return Poll::Ready(Next::Close);
                    }
                    napping = true;
                    sleep
                        .as_mut()
                        .reset(Instant::now() + Duration::from_millis(1));
                }
                Poll::Pending => {
                    return match sleep.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Next::Close),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    })
    .await
}

/// What the connections of one worker share.
pub(super) struct Setup<H> {
    pub(super) handler: H,
    pub(super) h1: H1,
    pub(super) h2: http2::Builder<LocalExec>,
    /// How long a new connection may wait before its first byte.
    pub(super) first_byte: Duration,
    pub(super) draining: CancellationToken,
    pub(super) conns: Rc<Conns>,
}

/// Serves one accepted connection until it closes; `silent` is its place among the
/// silent connections until its first byte, and `hold` (its connection permit) is
/// released when it closes.
pub(super) async fn serve<H: Handler, G>(
    setup: Rc<Setup<H>>,
    stream: TcpStream,
    remote: SocketAddr,
    silent: Silent,
    hold: G,
) {
    let _hold = hold;
    let _open = Open::new(Rc::clone(&setup.conns));
    let draining = &setup.draining;
    let sleep = tokio::time::sleep(setup.first_byte);
    tokio::pin!(sleep);
    let drain = draining.clone().cancelled_owned();
    tokio::pin!(drain);
    let limits = (setup.first_byte, setup.h1.timeout);
    match first_request(&stream, limits, silent, sleep.as_mut(), drain.as_mut()).await {
        Next::Close => {}
        Next::Http1 => {
            let ctx = http1::Ctx {
                h1: &setup.h1,
                handler: &setup.handler,
                draining,
                conns: &setup.conns,
                remote,
            };
            http1::serve(ctx, stream, sleep, drain).await;
        }
        Next::Http2 => {
            let s = Rc::clone(&setup);
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let answer = s.handler.call(req.map(RequestBody::H2), remote);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            // Boxed, like HTTP/1's answers: inline, hyper's h2 state would size every
            // connection's task, HTTP/1 ones included.
            let mut conn = Box::pin(setup.h2.serve_connection(TokioIo::new(stream), svc));
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = drain => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "h2 client connection ended with an error");
            }
        }
    }
}
