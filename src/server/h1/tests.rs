//! The HTTP/1 connection against a raw client on a real socket: framing both ways,
//! keep-alive and pipelining, timeouts, lingering, the client leaving, the drain.

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::super::connection::{serve, Setup};
use super::super::conns::Conns;
use super::super::RequestBody;
use super::{HeadLimits, H1};
use crate::body::{BoxError, ProxyBody};
use crate::http1::Maps;

struct Server {
    addr: SocketAddr,
    conns: Rc<Conns>,
    draining: CancellationToken,
    /// Answers dropped before they were ready (the client went away).
    dropped: Rc<Cell<usize>>,
    /// The worker's spare header maps.
    maps: Rc<Maps>,
}

/// Counts its drop unless it was answered.
struct DropFlag(Rc<Cell<usize>>, bool);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1 {
            self.0.set(self.0.get() + 1);
        }
    }
}

/// A body of frames, each after `gap`, length unknown.
struct Drip {
    frames: Vec<Bytes>,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Drip {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.frames.is_empty() {
            return Poll::Ready(None);
        }
        let gap = self.gap;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(gap)));
        std::task::ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        let f = self.frames.remove(0);
        Poll::Ready(Some(Ok(Frame::data(f))))
    }
}

use std::future::Future;

/// A server on this thread's `LocalSet`: `/echo` answers the body, `/slow` after 2.5 s,
/// `/stream` three frames 200 ms apart, `/big` 1 MiB, `/noread` a 413 without reading,
/// `/wait` never (until the client leaves), `/short` a body shorter than its length,
/// `/recycle` hands its head's map back and answers with a map from the spares (as the
/// proxy does); anything else the path.
async fn server(timeout: Duration) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Rc::new(Conns::new());
    let draining = CancellationToken::new();
    let dropped = Rc::new(Cell::new(0));
    let d = Rc::clone(&dropped);
    let maps = Rc::new(Maps::default());
    let spares = Rc::clone(&maps);
    let handler = move |req: Request<RequestBody>, _remote: SocketAddr| {
        let d = Rc::clone(&d);
        let spares = Rc::clone(&spares);
        async move {
            let path = req.uri().path().to_owned();
            let full = |b: Bytes| Response::new(ProxyBody::full(b));
            match path.as_str() {
                "/recycle" => {
                    let (parts, _) = req.into_parts();
                    spares.put(parts.headers);
                    let mut r = full(Bytes::from_static(b"ok"));
                    *r.headers_mut() = spares.take(1);
                    r.headers_mut()
                        .insert("x-kind", http::HeaderValue::from_static("recycled"));
                    r
                }
                "/echo" => {
                    let body = req.into_body().collect().await;
                    match body {
                        Ok(b) => full(b.to_bytes()),
                        Err(e) => full(Bytes::from(format!("error: {e}"))),
                    }
                }
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    full(Bytes::from(path))
                }
                "/stream" => Response::new(ProxyBody::stream(Drip {
                    frames: vec!["a".into(), "bb".into(), "ccc".into()],
                    gap: Duration::from_millis(200),
                    sleep: None,
                })),
                "/big" => full(Bytes::from(vec![b'x'; 1 << 20])),
                "/noread" => {
                    let mut r = full(Bytes::from_static(b"too large"));
                    *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                    r
                }
                "/wait" => {
                    let mut flag = DropFlag(d, false);
                    std::future::pending::<()>().await;
                    flag.1 = true;
                    full(Bytes::new())
                }
                "/short" => {
                    let mut r = full(Bytes::from_static(b"abc"));
                    r.headers_mut()
                        .insert(http::header::CONTENT_LENGTH, 10.into());
                    r
                }
                _ => full(Bytes::from(path)),
            }
        }
    };
    let limits = HeadLimits {
        max_headers: 20,
        max_head_bytes: 4096,
    };
    let setup = Rc::new(Setup {
        handler,
        h1: H1::new(limits, timeout, true, 1 << 20, Rc::clone(&maps)),
        h2: hyper::server::conn::http2::Builder::new(super::super::LocalExec),
        first_byte: timeout,
        draining: draining.clone(),
        conns: Rc::clone(&conns),
    });
    tokio::task::spawn_local(async move {
        loop {
            let (stream, remote) = listener.accept().await.unwrap();
            let silent = setup.conns.silent.enter();
            tokio::task::spawn_local(serve(Rc::clone(&setup), stream, remote, silent, ()));
        }
    });
    Server {
        addr,
        conns,
        draining,
        dropped,
        maps,
    }
}

/// A raw HTTP/1.1 client that reads answers one by one.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// An answer: its head (lowercased) and body (by length, chunks or the close).
#[derive(Debug)]
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> u16 {
        self.head[9..12].parse().unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            (n == name).then(|| v.trim())
        })
    }

    fn closes(&self) -> bool {
        self.header("connection") == Some("close")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
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

    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_lowercase();
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(
                self.fill().await,
                "closed before a whole head: {:?}",
                self.buf
            );
        }
    }

    /// The next answer to a request of `method`.
    async fn answer_to(&mut self, method: &str) -> Answer {
        let head = self.head().await;
        let mut a = Answer {
            head,
            body: Vec::new(),
        };
        if method == "HEAD" || a.status() == 204 || a.status() == 304 {
            return a;
        }
        if let Some(len) = a.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                assert!(self.fill().await, "closed inside a body");
            }
            a.body = self.buf.drain(..len).collect();
        } else if a.header("transfer-encoding") == Some("chunked") {
            loop {
                let line = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "closed inside a chunk size");
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.buf[..line]).unwrap(), 16)
                        .unwrap();
                while self.buf.len() < line + 2 + size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                a.body
                    .extend_from_slice(&self.buf[line + 2..line + 2 + size]);
                self.buf.drain(..line + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await {}
            a.body = std::mem::take(&mut self.buf);
        }
        a
    }

    async fn answer(&mut self) -> Answer {
        self.answer_to("GET").await
    }

    /// True when the server closed the connection (after anything still unread).
    async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(self.stream.read(&mut chunk).await, Ok(0) | Err(_))
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes()
}

fn local_test(f: impl Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

const T: Duration = Duration::from_secs(30);

#[test]
fn keep_alive_serves_request_after_request_and_an_idle_connection_is_parked() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        for path in ["/a", "/b", "/c"] {
            c.send(&get(path)).await;
            let a = c.answer().await;
            assert_eq!((a.status(), a.text().as_str()), (200, path));
            assert!(!a.closes(), "{a:?}");
            assert!(a.header("date").is_some(), "{a:?}");
            assert_eq!(a.header("content-length"), Some("2"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!((s.conns.open(), s.conns.parked()), (1, 1));
    });
}

#[test]
fn header_maps_are_recycled_from_answer_to_next_head() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        for _ in 0..5 {
            c.send(&get("/recycle")).await;
            let a = c.answer().await;
            assert_eq!((a.status(), a.header("x-kind")), (200, Some("recycled")));
        }
        // Each head filled the map the previous answer gave back: one map serves
        // every request (a head that made its own would leave one more each time).
        assert_eq!(s.maps.len(), 1);
    });
}

#[test]
fn pipelined_requests_are_answered_in_order_even_cut_anywhere() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nPOST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /y HTTP/1.1\r\nHo")
            .await;
        assert_eq!(c.answer().await.text(), "/x");
        assert_eq!(c.answer().await.text(), "abc");
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.send(b"st: x\r\n\r\n").await;
        assert_eq!(c.answer().await.text(), "/y");
        assert_eq!(s.conns.open(), 1);
    });
}

#[test]
fn a_head_sent_a_byte_at_a_time_is_read() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        for b in get("/bytes") {
            c.send(&[b]).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(c.answer().await.text(), "/bytes");
    });
}

#[test]
fn a_request_in_flight_is_never_closed_however_quiet() {
    local_test(async {
        let s = server(Duration::from_secs(1)).await;
        let mut c = Client::connect(s.addr).await;
        c.send(&get("/slow")).await;
        let a = c.answer().await;
        assert_eq!(a.text(), "/slow");
        assert!(!a.closes(), "{a:?}");
        c.send(&get("/after")).await;
        assert_eq!(c.answer().await.text(), "/after");
    });
}

#[test]
fn an_idle_connection_closes_after_the_timeout_and_on_drain() {
    local_test(async {
        let s = server(Duration::from_millis(600)).await;
        let mut idle = Client::connect(s.addr).await;
        idle.send(&get("/a")).await;
        idle.answer().await;
        let t0 = tokio::time::Instant::now();
        assert!(idle.closed().await);
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(500), "{waited:?}");

        let s = server(T).await;
        let mut parked = Client::connect(s.addr).await;
        parked.send(&get("/a")).await;
        parked.answer().await;
        let mut busy = Client::connect(s.addr).await;
        busy.send(&get("/slow")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.conns.parked(), 1);
        s.draining.cancel();
        assert!(parked.closed().await, "an idle connection closes at once");
        let a = busy.answer().await;
        assert_eq!(a.text(), "/slow");
        assert!(a.closes(), "the answer in flight says it closes: {a:?}");
        assert!(busy.closed().await);
        tokio::time::timeout(Duration::from_secs(1), s.conns.none_left())
            .await
            .expect("connections outlived the drain");
    });
}

#[test]
fn a_head_that_never_ends_gets_a_408_and_the_close() {
    local_test(async {
        let s = server(Duration::from_millis(500)).await;
        let mut c = Client::connect(s.addr).await;
        c.send(b"GET /x HTTP/1.1\r\nHost: x\r\n").await;
        let a = c.answer().await;
        assert_eq!(a.status(), 408, "{a:?}");
        assert!(a.closes());
        assert!(
            a.text().contains("\"code\":\"request_timeout\""),
            "{}",
            a.text()
        );
        assert!(c.closed().await);
    });
}

#[test]
fn malformed_and_oversized_heads_get_json_errors_and_the_close() {
    local_test(async {
        let s = server(T).await;
        let mut many = "GET / HTTP/1.1\r\n".to_owned();
        for i in 0..21 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let cases = [
            (
                "G@T / HTTP/1.1\r\n\r\n".to_owned(),
                400,
                "malformed_request",
            ),
            (
                "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".into(),
                400,
                "malformed_request",
            ),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n".into(),
                501,
                "unsupported_transfer_encoding",
            ),
            (many, 431, "headers_too_large"),
            (
                format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(5000)),
                431,
                "headers_too_large",
            ),
        ];
        for (raw, status, code) in cases {
            let mut c = Client::connect(s.addr).await;
            c.send(raw.as_bytes()).await;
            let a = c.answer().await;
            assert_eq!(a.status(), status, "{raw:?}");
            assert!(a.closes(), "{raw:?}");
            let json: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
            assert_eq!(json["error"]["code"], code, "{raw:?}");
            assert_eq!(json["error"]["type"], "invalid_request_error");
            assert!(c.closed().await, "{raw:?}");
        }
    });
}

#[test]
fn a_chunked_upload_is_read_whole_and_the_connection_kept() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.send(b"4\r\ndefg\r\n0\r\nX-Trailer: t\r\n\r\n").await;
        let a = c.answer().await;
        assert_eq!(a.text(), "abcdefg");
        assert!(!a.closes());
        c.send(&get("/next")).await;
        assert_eq!(c.answer().await.text(), "/next");
        // A broken chunk: the handler sees an error.
        c.send(b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .await;
        let a = c.answer().await;
        assert!(a.text().starts_with("error:"), "{a:?}");
    });
}

#[test]
fn expect_continue_gets_its_100_before_the_body_is_read() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .await;
        let interim = c.head().await;
        assert_eq!(interim, "http/1.1 100 continue");
        c.send(b"hello").await;
        assert_eq!(c.answer().await.text(), "hello");
        // Refused before reading: no 100, the final answer, and the close.
        c.send(b"POST /noread HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .await;
        let a = c.answer().await;
        assert_eq!(a.status(), 413);
        assert!(a.closes());
    });
}

#[test]
fn an_unread_upload_gets_its_answer_before_the_lingering_close() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        let body = vec![b'x'; 600 * 1024];
        c.send(
            format!(
                "POST /noread HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .await;
        // The whole body goes out (the server reads and discards it) ...
        c.send(&body).await;
        // ... and the answer is there to read, then the close.
        let a = c.answer().await;
        assert_eq!(a.status(), 413);
        assert!(a.closes(), "{a:?}");
        assert!(c.closed().await);
    });
}

#[test]
fn head_and_bodiless_answers_have_no_body() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(b"HEAD /abc HTTP/1.1\r\n\r\n").await;
        let a = c.answer_to("HEAD").await;
        assert_eq!(a.status(), 200);
        assert!(a.body.is_empty());
        c.send(&get("/after")).await;
        assert_eq!(
            c.answer().await.text(),
            "/after",
            "nothing of the HEAD's body was sent"
        );
    });
}

#[test]
fn http10_closes_unless_asked_and_streams_until_the_close() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(b"GET /a HTTP/1.0\r\n\r\n").await;
        let a = c.answer().await;
        assert!(a.closes(), "{a:?}");
        assert!(c.closed().await);

        let mut c = Client::connect(s.addr).await;
        c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let a = c.answer().await;
        assert_eq!(a.header("connection"), Some("keep-alive"));
        c.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let a = c.answer().await;
        assert!(
            a.closes() && a.header("transfer-encoding").is_none(),
            "{a:?}"
        );
        assert_eq!(a.text(), "abbccc");
    });
}

#[test]
fn a_streamed_answer_is_chunked_and_each_frame_goes_out_as_it_comes() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(&get("/stream")).await;
        let head = c.head().await;
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        // The first frame arrives before the last is made.
        while !c.buf.ends_with(b"1\r\na\r\n") {
            assert!(c.fill().await);
        }
        assert!(!c.buf.windows(3).any(|w| w == b"ccc"));
        c.buf.clear();
        c.send(&get("/after")).await;
        let mut rest = Vec::new();
        while !rest.ends_with(b"/after") {
            let mut chunk = [0u8; 1024];
            let n = c.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            rest.extend_from_slice(&chunk[..n]);
        }
        let rest = String::from_utf8_lossy(&rest);
        assert!(
            rest.starts_with("2\r\nbb\r\n3\r\nccc\r\n0\r\n\r\nHTTP/1.1 200 OK"),
            "{rest}"
        );
    });
}

#[test]
fn a_large_answer_reaches_a_slow_reader_whole() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(&get("/big")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let a = c.answer().await;
        assert_eq!(a.body.len(), 1 << 20);
        assert!(a.body.iter().all(|&b| b == b'x'));
        c.send(&get("/after")).await;
        assert_eq!(c.answer().await.text(), "/after");
    });
}

#[test]
fn a_client_that_leaves_while_waiting_cancels_its_request() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(&get("/wait")).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.dropped.get(), 0);
        drop(c);
        tokio::time::timeout(Duration::from_secs(2), async {
            while s.dropped.get() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the request was not cancelled");
        tokio::time::timeout(Duration::from_secs(1), s.conns.none_left())
            .await
            .expect("the connection stayed open");
    });
}

#[test]
fn an_answer_shorter_than_its_length_ends_the_connection() {
    local_test(async {
        let s = server(T).await;
        let mut c = Client::connect(s.addr).await;
        c.send(&get("/short")).await;
        let head = c.head().await;
        assert!(head.contains("content-length: 10"), "{head}");
        while c.fill().await {}
        assert_eq!(c.buf, b"abc");
    });
}

/// Every open connection's task is this future, idle or not: what one costs at rest.
/// The handler's future and the answer are boxed per request, the head is not kept
/// beside them, and one timer and one drain waiter serve the connection's life.
#[test]
fn a_connection_task_stays_small() {
    local_test(async {
        let s = server(T).await;
        let stream = TcpStream::connect(s.addr).await.unwrap();
        let conns = Rc::new(Conns::new());
        let setup = Rc::new(Setup {
            handler: |_req: Request<RequestBody>, _remote: SocketAddr| async {
                Response::new(ProxyBody::full(Bytes::new()))
            },
            h1: H1::new(
                HeadLimits {
                    max_headers: 100,
                    max_head_bytes: 65536,
                },
                T,
                true,
                1 << 20,
                Rc::default(),
            ),
            h2: hyper::server::conn::http2::Builder::new(super::super::LocalExec),
            first_byte: T,
            draining: CancellationToken::new(),
            conns: Rc::clone(&conns),
        });
        let silent = conns.silent.enter();
        let task = serve(setup, stream, s.addr, silent, ());
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "{size} bytes");
    });
}
