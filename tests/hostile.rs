//! Hostile and careless clients: refusals that arrive (an oversized upload gets its 413,
//! not a reset, and the answer says the connection closes), every answer the sidecar
//! makes carries `X-Request-Id`, and requests framed wrong (no `Host`, a foreign
//! absolute-form target, a method the provider has no use for) are refused, never
//! forwarded.
//!
//! The clients here are raw sockets that send a whole request before reading a byte
//! (as simple clients and many SDKs do), hyper's own client over HTTP/1.1 and h2c, and
//! a small keep-alive pool.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

const MIB: usize = 1 << 20;

/// A sidecar that accepts bodies of at most 1 MiB.
fn one_mib_stack() -> Stack {
    stack(unlimited_mock(), &[("SIDECAR_MAX_BODY_BYTES", "1048576")])
}

// === raw HTTP/1.1 over a blocking socket ===

/// One response as read off the wire.
struct Raw {
    status: u16,
    /// Header names lowercased, in order.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?} {}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body).into_owned()
            )
        })
    }

    /// An OpenAI-shaped sidecar error with this status and code, and a request id.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert!(self.header("x-request-id").is_some(), "{self:?}");
    }
}

/// Parses one response (head and a Content-Length body) from the front of `buf`.
fn parse(buf: &[u8]) -> Option<(Raw, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map_or(0, |(_, v)| v.parse().unwrap_or(0));
    let total = end + 4 + len;
    (buf.len() >= total).then(|| {
        let raw = Raw {
            status,
            headers,
            body: buf[end + 4..total].to_vec(),
        };
        (raw, total)
    })
}

/// A socket whose send buffer is small, as on a real network (where a client has a
/// bandwidth-delay product in flight, not the megabytes loopback buffers hold).
fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    socket2::SockRef::from(&s)
        .set_send_buffer_size(32 * 1024)
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends `request` whole, without reading, then reads until the server closes. Any
/// error on the way (a reset while sending or reading) is returned as such.
fn send_then_read_to_close(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<Raw>> {
    let mut s = connect(addr);
    s.write_all(request)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((raw, used)) = parse(&buf[at..]) {
        out.push(raw);
        at += used;
    }
    Ok(out)
}

/// Sends `request` (which should say `Connection: close`) and returns the status of
/// its answer, which may have no body (a `HEAD`'s).
fn status_of(addr: SocketAddr, request: &str) -> u16 {
    let mut s = connect(addr);
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let head = String::from_utf8_lossy(&buf);
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head}"))
}

/// Sends `request` (which should say `Connection: close`) and returns its one answer.
fn exchange(addr: SocketAddr, request: &str) -> Raw {
    let mut all = send_then_read_to_close(addr, request.as_bytes()).expect("an answer");
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

fn upload_head(addr: SocketAddr, framing: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{framing}\r\n"
    )
}

/// `len` bytes of a JSON body (which never gets far enough to be parsed).
fn filler(len: usize) -> Vec<u8> {
    let mut body = br#"{"model":"m","input":""#.to_vec();
    body.resize(len - 2, b'x');
    body.extend_from_slice(b"\"}");
    body
}

fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 10 + 16);
    for c in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Sends `n` oversized uploads, each on its own connection, without reading until sent;
/// returns how many got their 413 (with `Connection: close` and a request id), and
/// what the others got.
fn uploads_refused(addr: SocketAddr, n: usize, request: &[u8]) -> (usize, Vec<String>) {
    let mut ok = 0;
    let mut failures = Vec::new();
    for _ in 0..n {
        match send_then_read_to_close(addr, request) {
            Ok(answers) => match answers.as_slice() {
                [a] if a.status == 413
                    && a.closes()
                    && a.header("x-request-id").is_some()
                    && a.json()["error"]["code"] == "request_too_large" =>
                {
                    ok += 1
                }
                [a] => failures.push(format!(
                    "{} close: {} id: {}",
                    a.status,
                    a.closes(),
                    a.header("x-request-id").is_some()
                )),
                other => failures.push(format!("{other:?}")),
            },
            Err(e) => failures.push(format!("{:?}: {e}", e.kind())),
        }
    }
    (ok, failures)
}

// === refusals that arrive ===

#[test]
fn an_upload_over_the_limit_gets_its_413_before_the_connection_closes() {
    let s = one_mib_stack();
    let body = filler(2 * MIB);
    let mut request =
        upload_head(s.addr, &format!("Content-Length: {}\r\n", body.len())).into_bytes();
    request.extend_from_slice(&body);
    let (ok, failures) = uploads_refused(s.addr, 10, &request);
    assert_eq!(ok, 10, "with Content-Length: {failures:?}");
    assert_eq!(s.mock.requests(), 0);
    s.stop();
}

#[test]
fn a_chunked_upload_over_the_limit_gets_its_413_before_the_connection_closes() {
    let s = one_mib_stack();
    let mut request = upload_head(s.addr, "Transfer-Encoding: chunked\r\n").into_bytes();
    request.extend_from_slice(&chunked(&filler(2 * MIB), 64 * 1024));
    let (ok, failures) = uploads_refused(s.addr, 10, &request);
    assert_eq!(ok, 10, "chunked: {failures:?}");
    assert_eq!(s.mock.requests(), 0);
    s.stop();
}

#[test]
fn a_client_that_never_stops_sending_gets_its_413_and_is_closed_within_the_bound() {
    let s = one_mib_stack();
    let mut w = connect(s.addr);
    let mut r = w.try_clone().unwrap();
    w.write_all(upload_head(s.addr, "Content-Length: 1073741824\r\n").as_bytes())
        .unwrap();
    // A slow sender: the time bound ends it, not the byte bound.
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1024];
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if w.write_all(&chunk).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    let t0 = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let answer = loop {
        let n = r.read(&mut chunk).expect("the 413 is readable");
        assert!(n > 0, "closed before the answer");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((a, _)) = parse(&buf) {
            break a;
        }
    };
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    answer.assert_error(413, "request_too_large");
    assert!(answer.closes(), "{answer:?}");
    // Then the sidecar stops reading and closes: the writer sees it.
    let closed = matches!(r.read(&mut chunk), Ok(0) | Err(_));
    assert!(closed);
    assert!(writer.join().unwrap(), "the sidecar kept reading for 30 s");
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    s.stop();
}

/// A keep-alive pool, as HTTP client libraries keep one: a connection goes back to the
/// pool after a complete answer unless the answer said `Connection: close`.
struct Pool {
    addr: SocketAddr,
    idle: Vec<SendRequest<Full<Bytes>>>,
    opened: usize,
}

impl Pool {
    async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<(StatusCode, HeaderMap), String> {
        let mut tx = loop {
            match self.idle.pop() {
                Some(mut tx) => {
                    if tx.ready().await.is_ok() {
                        break tx;
                    }
                }
                None => {
                    let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
                    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(conn);
                    self.opened += 1;
                    break tx;
                }
            }
        };
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        body.collect().await.map_err(|e| e.to_string())?;
        let closes = parts
            .headers
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        if !closes {
            self.idle.push(tx);
        }
        Ok((parts.status, parts.headers))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_pool_sees_no_transport_error_around_413s() {
    let s = one_mib_stack();
    let mut pool = Pool {
        addr: s.addr,
        idle: Vec::new(),
        opened: 0,
    };
    let big = Bytes::from(filler(2 * MIB));
    let mut errors = Vec::new();
    let (mut refused, mut served, mut silent_closes) = (0, 0, 0);
    for _ in 0..20 {
        let small = req("POST", s.addr, "/v1/chat/completions", &[], CHAT);
        let mut large = req("POST", s.addr, "/v1/chat/completions", &[], "");
        *large.body_mut() = Full::new(big.clone());
        for r in [small, large] {
            match pool.send(r).await {
                Ok((StatusCode::OK, _)) => served += 1,
                Ok((StatusCode::PAYLOAD_TOO_LARGE, h)) => {
                    assert!(h.contains_key("x-request-id"));
                    if h.get("connection").is_none_or(|v| v != "close") {
                        silent_closes += 1;
                    }
                    refused += 1;
                }
                Ok((status, _)) => errors.push(format!("status {status}")),
                Err(e) => errors.push(e),
            }
        }
    }
    assert!(
        errors.is_empty(),
        "{} transport errors ({silent_closes} 413s without Connection: close): {errors:?}",
        errors.len()
    );
    assert_eq!((served, refused, silent_closes), (20, 20, 0));
    // Keep-alive still works for the answers that do not close.
    assert!(pool.opened <= 21, "{} connections", pool.opened);
    assert_eq!(s.mock.requests(), 20);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upload_over_the_limit_gets_its_413_on_the_stream() {
    let s = one_mib_stack();
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let big = Bytes::from(filler(2 * MIB));
    let url = format!("http://{}/v1/chat/completions", s.addr);
    for _ in 0..10 {
        let r = Request::post(&url).body(Full::new(big.clone())).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(20), tx.send_request(r))
            .await
            .expect("answered")
            .expect("a response on the stream, not a reset");
        assert_eq!(resp.status(), 413);
        assert!(resp.headers().contains_key("x-request-id"));
        assert!(!resp.headers().contains_key("connection"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "request_too_large");
    }
    // The connection itself is fine: the refusal was the stream's alone.
    let r = Request::post(&url)
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
        .unwrap();
    assert_eq!(tx.send_request(r).await.unwrap().status(), 200);
    assert_eq!(s.mock.requests(), 1);
    s.stop();
}

#[test]
fn an_admin_patch_over_its_limit_gets_a_413_with_a_request_id_and_a_close() {
    let s = stack(
        unlimited_mock(),
        &[("SIDECAR_ADMIN_TOKEN", "adm-hostile-token-1")],
    );
    let a = exchange(
        s.addr,
        &format!(
            "PATCH /api/admin/config HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer adm-hostile-token-1\r\nContent-Length: 1000000\r\n\r\n",
            s.addr
        ),
    );
    assert_eq!(a.status, 413, "{a:?}");
    assert!(a.header("x-request-id").is_some(), "{a:?}");
    assert!(a.closes(), "{a:?}");
    s.stop();
}

/// The admin API's body is drained like the proxy's: 10 of 10 admin uploads of 2 MiB
/// (its limit is far smaller) get their 413 instead of a reset, with and without
/// Content-Length.
#[test]
fn admin_uploads_over_the_limit_get_their_413_before_the_connection_closes() {
    let s = stack(
        unlimited_mock(),
        &[("SIDECAR_ADMIN_TOKEN", "adm-hostile-token-1")],
    );
    let head = |framing: &str| {
        format!(
            "PATCH /api/admin/config HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer adm-hostile-token-1\r\nContent-Type: application/json\r\n{framing}\r\n",
            s.addr
        )
        .into_bytes()
    };
    let body = filler(2 * MIB);
    let mut with_length = head(&format!("Content-Length: {}\r\n", body.len()));
    with_length.extend_from_slice(&body);
    let mut with_chunks = head("Transfer-Encoding: chunked\r\n");
    with_chunks.extend_from_slice(&chunked(&body, 64 * 1024));
    for (what, request) in [("Content-Length", with_length), ("chunked", with_chunks)] {
        let mut ok = 0;
        let mut failures = Vec::new();
        for _ in 0..10 {
            match send_then_read_to_close(s.addr, &request) {
                Ok(answers) => match answers.as_slice() {
                    [a] if a.status == 413 && a.closes() && a.header("x-request-id").is_some() => {
                        ok += 1
                    }
                    other => failures.push(format!("{other:?}")),
                },
                Err(e) => failures.push(format!("{:?}: {e}", e.kind())),
            }
        }
        assert_eq!(ok, 10, "admin, {what}: {failures:?}");
    }
    s.stop();
}

#[test]
fn every_answer_the_sidecar_makes_carries_a_request_id() {
    let s = stack(
        unlimited_mock(),
        &[("SIDECAR_ADMIN_TOKEN", "adm-hostile-token-1")],
    );
    let host = s.addr;
    for (request, status) in [
        ("GET /nowhere HTTP/1.1", 404),
        ("POST /healthz HTTP/1.1", 405),
        ("GET /healthz HTTP/1.1", 200),
        ("PUT /api/dashboard HTTP/1.1", 405),
        ("GET /api/admin/nowhere HTTP/1.1", 404),
        ("PATCH /api/admin/config HTTP/1.1", 401),
        ("DELETE /api/admin/config HTTP/1.1", 405),
        ("GET /v1/models HTTP/1.1", 200),
    ] {
        let a = exchange(
            s.addr,
            &format!("{request}\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(a.status, status, "{request}: {a:?}");
        let id = a
            .header("x-request-id")
            .unwrap_or_else(|| panic!("{request}: {a:?}"));
        assert_eq!(id.len(), 32, "{request}: {id}");
    }
    // The client's own id, when it is a sane one, is kept.
    let a = exchange(
        s.addr,
        &format!("GET /nowhere HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: trace-42\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(a.header("x-request-id"), Some("trace-42"));
    // Every 405 of a read-only route says what it allows (RFC 9110 §15.5.6).
    for target in [
        "/healthz",
        "/readyz",
        "/api/dashboard",
        "/api/dashboard/stream",
    ] {
        let a = exchange(
            s.addr,
            &format!("POST {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(a.status, 405, "{target}: {a:?}");
        assert_eq!(a.header("allow"), Some("GET, HEAD"), "{target}: {a:?}");
    }
    s.stop();
}

// === framing ===

#[test]
fn an_http11_request_without_one_valid_host_is_refused() {
    let s = stack(unlimited_mock(), &[]);
    let a = exchange(
        s.addr,
        "GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    a.assert_error(400, "missing_host");
    let a = exchange(s.addr, "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
    a.assert_error(400, "missing_host");
    let a = exchange(
        s.addr,
        &format!(
            "GET /v1/models HTTP/1.1\r\nHost: {0}\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            s.addr
        ),
    );
    a.assert_error(400, "duplicate_host");
    for bad in ["", "user@example.com", "a b", "example.com/path"] {
        let a = exchange(
            s.addr,
            &format!("GET /v1/models HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n"),
        );
        a.assert_error(400, "invalid_host");
    }
    assert_eq!(s.mock.requests(), 0);
    // HTTP/1.0 may leave Host out.
    let a = exchange(s.addr, "GET /v1/models HTTP/1.0\r\n\r\n");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(s.mock.requests(), 1);
    s.stop();
}

#[test]
fn only_the_usual_methods_are_forwarded() {
    let s = stack(unlimited_mock(), &[]);
    for method in ["FOO", "TRACE", "CONNECT", "PROPFIND"] {
        let a = exchange(
            s.addr,
            &format!(
                "{method} /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                s.addr
            ),
        );
        a.assert_error(405, "method_not_allowed");
        assert_eq!(
            a.header("allow"),
            Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            "{method}"
        );
    }
    assert_eq!(s.mock.requests(), 0);
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let status = status_of(
            s.addr,
            &format!(
                "{method} /v1/models HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                s.addr
            ),
        );
        assert_ne!(status, 405, "{method}");
    }
    assert_eq!(s.mock.requests(), 7);
    s.stop();
}

#[test]
fn an_absolute_form_target_is_served_only_for_the_sidecars_own_authority() {
    let s = stack(unlimited_mock(), &[]);
    let port = s.addr.port();
    for target in [
        "http://evil.example/healthz",
        "http://evil.example/v1/models",
        "http://10.255.255.1:1/v1/models",
        "http://user@127.0.0.1/v1/models",
    ] {
        let a = exchange(
            s.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
        );
        a.assert_error(400, "foreign_authority");
    }
    assert_eq!(s.mock.requests(), 0);
    for target in [
        format!("http://127.0.0.1:{port}/healthz"),
        format!("http://localhost:{port}/healthz"),
        format!("http://127.0.0.1:{port}/v1/models"),
    ] {
        // RFC 9112 §3.2.2: the target's authority wins over Host.
        let a = exchange(
            s.addr,
            &format!(
                "GET {target} HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(a.status, 200, "{target}: {a:?}");
    }
    assert_eq!(s.mock.requests(), 1);
    let a = exchange(
        s.addr,
        &format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            s.addr
        ),
    );
    a.assert_error(400, "connect_not_supported");
    s.stop();
}

/// What the server refuses before the sidecar's handler runs: an OpenAI-style JSON
/// error with a request id, like every answer, and the connection closes, saying so.
#[test]
fn what_the_server_refuses_itself_gets_a_json_error_and_a_close() {
    let s = stack(unlimited_mock(), &[]);
    let a = s.addr;
    for (request, status, code) in [
        (format!("POST /v1/models HTTP/1.1\r\nHost: {a}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy"), 400, "malformed_request"),
        // RFC 9112 §6.1: a transfer coding the server does not know is a 501.
        (format!("POST /v1/models HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: gzip\r\n\r\nxy"), 501, "unsupported_transfer_encoding"),
        (format!("G@T /v1/models HTTP/1.1\r\nHost: {a}\r\n\r\n"), 400, "malformed_request"),
        (format!("GET /v1/models HTTP/1.1\r\nHost: {a}\r\nBad Header: x\r\n\r\n"), 400, "malformed_request"),
    ] {
        let answers = send_then_read_to_close(a, request.as_bytes()).expect("an answer");
        assert_eq!(answers.len(), 1, "{request:?}: {answers:?}");
        answers[0].assert_error(status, code);
        assert!(answers[0].closes(), "{request:?}: {answers:?}");
    }
    // Both Content-Length and chunked: served as chunked, then closed (RFC 9112 §6.3).
    let answers = send_then_read_to_close(
        a,
        format!("POST /v1/embeddings HTTP/1.1\r\nHost: {a}\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").as_bytes(),
    )
    .expect("an answer");
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0].closes(), "{answers:?}");
    assert_eq!(s.mock.requests(), 1);
    s.stop();
}
