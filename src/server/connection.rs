//! One client connection, from its first byte to its close.
//!
//! The protocol is told from the first bytes (peeked, not read): the HTTP/2 preface
//! means h2c, anything else HTTP/1. An HTTP/1 connection that sits idle is *parked*
//! (see `park`): hyper is asked to close gracefully (it does at once when idle), the
//! socket is taken back without a shutdown (`into_parts`), and the task waits for the
//! next byte; the next request gets a fresh hyper connection. Bytes hyper had read but
//! not yet parsed (the start of a pipelined request) are handed to that connection
//! first, so nothing is lost. A parked connection is closed after the header read
//! timeout, as hyper closed idle ones before.
//!
//! A new connection is *silent* until its first byte: it waits at most the first-byte
//! timeout for it, and meanwhile holds its place among its worker's silent connections,
//! which may be shed near the connection cap (see `fairness`).
//!
//! Draining: an HTTP/1 connection notices it on its next wake (at worst its park timer)
//! and closes once its request is answered; a parked one closes at once; HTTP/2 gets a
//! GOAWAY.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::exec::LocalExec;
use super::fairness::Silent;
use super::handler::Handler;
use super::park::{Activity, Answer, Busy, Conns, Open, ParkIo};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection, or of a parked one's next request, say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Http1,
    Http2,
    /// Closed by the client, timed out, failed, or the server is draining.
    Close,
}

/// A new connection's wait for its first byte: at most `limit`, holding its place
/// among the silent connections until the byte comes.
struct FirstByte {
    limit: Duration,
    silent: Silent,
}

/// Waits (up to `limit`) for the client's next bytes without reading them; a new
/// connection waits for the first of them as `first` says.
async fn next_request(
    stream: &TcpStream,
    limit: Duration,
    first: Option<FirstByte>,
    draining: &CancellationToken,
) -> Next {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        let mut n = 0;
        if let Some(FirstByte { limit, silent }) = first {
            n = match tokio::time::timeout(limit, stream.peek(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return Next::Close,
            };
            drop(silent);
        }
        loop {
            if n == 0 {
                n = match stream.peek(&mut buf).await {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(n) => n,
                };
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Next::Http1;
            }
            if n == H2_PREFACE.len() {
                return Next::Http2;
            }
            // A partial preface: the rest is on its way (peek would return at once).
            tokio::time::sleep(Duration::from_millis(1)).await;
            n = 0;
        }
    };
    tokio::select! {
        biased;
        _ = draining.cancelled() => Next::Close,
        r = tokio::time::timeout(limit, sniff) => r.unwrap_or(Next::Close),
    }
}

/// What the connections of one worker share.
pub(super) struct Setup<H> {
    pub(super) handler: H,
    pub(super) h1: http1::Builder,
    pub(super) h2: http2::Builder<LocalExec>,
    /// How long a new connection may wait before its first byte.
    pub(super) first_byte: Duration,
    /// How long a parked connection waits for its next request.
    pub(super) idle_limit: Duration,
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
    let open = Open::new(Rc::clone(&setup.conns));
    let activity = Rc::new(Activity::default());
    let (shared, s) = (Rc::clone(&activity), Rc::clone(&setup));
    let mut svc = service_fn(move |req| Answer {
        fut: Box::pin(s.handler.call(req, remote)),
        busy: Some(Busy::new(&shared)),
    });
    let (h1, h2, draining) = (&setup.h1, &setup.h2, &setup.draining);
    // hyper's header timer starts only once it reads a request: a client that
    // connects and sends nothing is closed here after the first-byte timeout.
    let first = FirstByte {
        limit: setup.first_byte,
        silent,
    };
    match next_request(&stream, setup.idle_limit, Some(first), draining).await {
        Next::Close => return,
        Next::Http2 => {
            // Boxed, like HTTP/1's: inline, hyper's h2 state would size every
            // connection's task, HTTP/1 ones included.
            let mut conn = Box::pin(h2.serve_connection(TokioIo::new(stream), svc));
            let r = tokio::select! {
                r = conn.as_mut() => r,
                _ = draining.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "h2 client connection ended with an error");
            }
            return;
        }
        Next::Http1 => {}
    }
    let mut io = ParkIo {
        stream,
        replay: Bytes::new(),
        conns: Rc::clone(&setup.conns),
        activity: Rc::clone(&activity),
        timer: None,
        armed_at: 0,
    };
    loop {
        // Boxed: while parked, the task holds only the socket, not hyper's state.
        let mut conn = Box::new(h1.serve_connection(TokioIo::new(io), svc));
        let mut closing = false;
        let done = std::future::poll_fn(|cx| {
            if !closing && (activity.park.get() || draining.is_cancelled()) {
                closing = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            conn.poll_without_shutdown(cx)
        })
        .await;
        if let Err(e) = done {
            tracing::debug!(error = %e, "client connection ended with an error");
            return;
        }
        let parts = (*conn).into_parts();
        io = parts.io.into_inner();
        svc = parts.service;
        // A copy (rare: a pipelined request's start), and hyper's Bytes dropped before
        // any wait: it keeps hyper's whole 8 KiB read buffer alive, even when empty.
        let leftover = parts.read_buf;
        io.replay = if leftover.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&leftover)
        };
        drop(leftover);
        if !activity.park.replace(false) || draining.is_cancelled() {
            // The client closed, or keep-alive is off, or the server is draining.
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io.stream).await;
            return;
        }
        io.timer = None;
        activity.partial.set(!io.replay.is_empty());
        if io.replay.is_empty() {
            let conns = &open.0;
            conns.parked.set(conns.parked.get() + 1);
            let next = next_request(&io.stream, setup.idle_limit, None, draining).await;
            conns.parked.set(conns.parked.get().saturating_sub(1));
            if next == Next::Close {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::park::{CROWDED, PARK_AFTER};
    use super::*;
    use http::{Request, Response};
    use http_body_util::Full;
    use hyper::body::Incoming;
    use std::future::Future;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Server {
        addr: SocketAddr,
        conns: Rc<Conns>,
        draining: CancellationToken,
    }

    /// A server on this thread's `LocalSet` answering each path with itself; `/slow`
    /// answers after 2.5 s of silence.
    async fn server(idle_limit: Duration) -> Server {
        server_with(idle_limit, CROWDED).await
    }

    async fn server_with(idle_limit: Duration, crowded: usize) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Rc::new(Conns::new(crowded));
        let draining = CancellationToken::new();
        let handler = |req: Request<Incoming>, _remote: SocketAddr| async move {
            let path = req.uri().path().to_owned();
            if path == "/slow" {
                tokio::time::sleep(Duration::from_millis(2500)).await;
            }
            Response::new(Full::new(Bytes::from(path)))
        };
        let mut h1 = http1::Builder::new();
        h1.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        let setup = Rc::new(Setup {
            handler,
            h1,
            h2: http2::Builder::new(super::super::LocalExec),
            first_byte: idle_limit,
            idle_limit,
            draining: draining.clone(),
            conns: Rc::clone(&conns),
        });
        tokio::task::spawn_local(async move {
            loop {
                let (stream, remote) = listener.accept().await.unwrap();
                let silent = setup.conns.silent.enter();
                let task = serve(Rc::clone(&setup), stream, remote, silent, ());
                tokio::task::spawn_local(task);
            }
        });
        Server {
            addr,
            conns,
            draining,
        }
    }

    /// A raw HTTP/1.1 client that reads responses one by one.
    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Client {
        async fn connect(addr: SocketAddr) -> Self {
            Self {
                stream: TcpStream::connect(addr).await.unwrap(),
                buf: Vec::new(),
            }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).await.unwrap();
        }

        /// The next response's head and body (by Content-Length).
        async fn response(&mut self) -> (String, String) {
            loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if self.buf.len() >= end + 4 + len {
                        let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len]);
                        let body = body.into_owned();
                        self.buf.drain(..end + 4 + len);
                        return (head, body);
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed before a whole response");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// True when the server closed the connection.
        async fn closed(&mut self) -> bool {
            let mut chunk = [0u8; 64];
            matches!(self.stream.read(&mut chunk).await, Ok(0) | Err(_))
        }
    }

    fn get(path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
    }

    /// Longest a connection idles before it is parked, plus a margin.
    const PARKED: Duration = Duration::from_millis(2 * PARK_AFTER.as_millis() as u64 + 500);

    fn local_test(f: impl Future<Output = ()>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f);
    }

    #[test]
    fn an_idle_keep_alive_connection_is_parked_and_serves_its_next_request() {
        local_test(async {
            let s = server(Duration::from_secs(30)).await;
            let mut c = Client::connect(s.addr).await;
            c.send(&get("/a")).await;
            assert_eq!(c.response().await.1, "/a");
            assert_eq!(s.conns.parked(), 0, "parked at once");
            tokio::time::sleep(PARKED).await;
            assert_eq!((s.conns.open(), s.conns.parked()), (1, 1));
            c.send(&get("/b")).await;
            let (head, body) = c.response().await;
            assert_eq!(body, "/b");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(s.conns.parked(), 0);
            // Parked again, and again served.
            tokio::time::sleep(PARKED).await;
            assert_eq!(s.conns.parked(), 1);
            c.send(&get("/c")).await;
            assert_eq!(c.response().await.1, "/c");
        });
    }

    #[test]
    fn a_pipelined_request_cut_in_half_survives_parking() {
        local_test(async {
            let s = server(Duration::from_secs(30)).await;
            let mut c = Client::connect(s.addr).await;
            c.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHo")
                .await;
            assert_eq!(c.response().await.1, "/first");
            tokio::time::sleep(PARKED).await;
            c.send(b"st: x\r\n\r\n").await;
            assert_eq!(c.response().await.1, "/second");
            assert_eq!(s.conns.open(), 1);
        });
    }

    #[test]
    fn a_crowded_worker_parks_idle_connections_at_once() {
        local_test(async {
            let s = server_with(Duration::from_secs(30), 1).await;
            let mut a = Client::connect(s.addr).await;
            let mut b = Client::connect(s.addr).await;
            for (i, c) in [&mut a, &mut b].into_iter().enumerate() {
                c.send(&get(&format!("/{i}"))).await;
                assert_eq!(c.response().await.1, format!("/{i}"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!((s.conns.open(), s.conns.parked()), (2, 2));
            // Pipelined requests still each get their answer.
            a.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            assert_eq!(a.response().await.1, "/x");
            assert_eq!(a.response().await.1, "/y");
            b.send(&get("/z")).await;
            assert_eq!(b.response().await.1, "/z");
        });
    }

    #[test]
    fn a_request_in_flight_is_never_parked_however_quiet() {
        local_test(async {
            let s = server(Duration::from_secs(30)).await;
            let mut c = Client::connect(s.addr).await;
            c.send(&get("/slow")).await;
            let (head, body) = c.response().await;
            assert_eq!(body, "/slow");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(s.conns.parked(), 0);
            c.send(&get("/after")).await;
            assert_eq!(c.response().await.1, "/after");
        });
    }

    #[test]
    fn parked_connections_close_after_the_idle_limit_and_on_drain() {
        local_test(async {
            let s = server(Duration::from_millis(600)).await;
            let mut idle = Client::connect(s.addr).await;
            idle.send(&get("/a")).await;
            idle.response().await;
            let t0 = tokio::time::Instant::now();
            assert!(idle.closed().await);
            assert!(
                t0.elapsed() < PARKED + Duration::from_secs(1),
                "{:?}",
                t0.elapsed()
            );

            let s = server(Duration::from_secs(30)).await;
            let mut parked = Client::connect(s.addr).await;
            parked.send(&get("/a")).await;
            parked.response().await;
            tokio::time::sleep(PARKED).await;
            assert_eq!(s.conns.parked(), 1);
            s.draining.cancel();
            tokio::time::timeout(Duration::from_secs(1), s.conns.none_left())
                .await
                .expect("a parked connection outlived the drain");
            assert!(parked.closed().await);
        });
    }
}
