//! A small HTTP client on hyper's connection API: one fresh HTTP/1.1 connection per
//! request, whole answers or streaming bodies, chats started in tasks of their own, and
//! the admin API's configuration reads and writes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use super::note_sent;

pub const CHAT: &str =
    r#"{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}"#;
pub const CHAT_STREAM: &str = r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// Opens a fresh HTTP/1.1 connection and sends `req`; returns the response head and
/// its streaming body.
pub async fn send(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> hyper::Result<Response<Incoming>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    if req.uri().path().starts_with("/v1/") {
        note_sent(addr, 1);
    }
    tx.send_request(req).await
}

/// Builds a request to the sidecar.
pub fn req(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    head(method, addr, path, headers)
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("request")
}

/// A request's head: `method path` to the sidecar at `addr`, with `headers`.
fn head(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> http::request::Builder {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b
}

/// A whole answer.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI-shaped sidecar error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "body: {}", self.text());
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].as_str().is_some());
        assert_eq!(self.headers["content-type"], "application/json");
    }
}

impl Answer {
    /// Reads `resp`'s body to its end.
    async fn read(resp: Response<Incoming>) -> Self {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

/// Sends `r` on a fresh connection ([`send`]) and reads the answer whole.
pub async fn call(addr: SocketAddr, r: Request<Full<Bytes>>) -> Answer {
    Answer::read(send(addr, r).await.expect("response")).await
}

/// Sends `chunks` as a chunked body (no `Content-Length`, so nothing tells its size in
/// advance), frame by frame, on a fresh connection; the answer is read whole.
pub async fn send_chunked(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    chunks: Vec<Bytes>,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    if path.starts_with("/v1/") {
        note_sent(addr, 1);
    }
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, Infallible>(Frame::data(c)));
    let body = StreamBody::new(tokio_stream::iter(frames));
    let resp = tx
        .send_request(
            head(method, addr, path, headers)
                .body(body)
                .expect("request"),
        )
        .await
        .expect("response");
    Answer::read(resp).await
}

/// Starts a chat (`POST /v1/chat/completions` with `headers` and `body`) in a task of its
/// own; the task ends with the answer's status. Aborting the task hangs up.
pub fn spawn_chat(addr: SocketAddr, headers: &[(&str, &str)], body: &str) -> JoinHandle<u16> {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let body = body.to_owned();
    tokio::spawn(async move {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        call(
            addr,
            req("POST", addr, "/v1/chat/completions", &headers, &body),
        )
        .await
        .status
        .as_u16()
    })
}

/// Reads the next data frame of a streaming body, with a generous bound so a broken
/// proxy fails the test instead of hanging it.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(20), body.frame())
            .await
            .expect("a frame within 20 s")?;
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

// === The admin API ===

/// The admin API's configuration: `GET` reads it, `PATCH` (or `POST`) changes it.
pub const ADMIN_CONFIG: &str = "/api/admin/config";

/// `method /api/admin/config` with `headers` and `body`, whatever the answer.
pub async fn admin_call(
    addr: SocketAddr,
    method: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    call(addr, req(method, addr, ADMIN_CONFIG, headers, body)).await
}

/// `GET /api/admin/config` with `headers`, whatever the answer.
pub async fn admin_get(addr: SocketAddr, headers: &[(&str, &str)]) -> Answer {
    admin_call(addr, "GET", headers, "").await
}

/// `GET /api/admin/config` with `headers`, answered 200: the configuration it shows.
pub async fn admin_config(addr: SocketAddr, headers: &[(&str, &str)]) -> serde_json::Value {
    let a = admin_get(addr, headers).await;
    assert_eq!(a.status, 200, "GET {ADMIN_CONFIG}: {}", a.text());
    a.json()
}

/// `PATCH /api/admin/config` with `body`, authorized by `bearer` (the whole
/// `Authorization` value, `Bearer <token>`), whatever the answer.
pub async fn admin_patch(addr: SocketAddr, bearer: &str, body: &str) -> Answer {
    admin_call(addr, "PATCH", &[("authorization", bearer)], body).await
}
