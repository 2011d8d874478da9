//! The pool and its HTTP/1.1 client against a scripted upstream on a real socket: what
//! it reads, what it keeps, and that it never reuses a connection it should not.

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{Connector, Pool, RequestHead, SendError, KEEP_ALL};
use crate::config::UpstreamUrl;

/// One scripted answer: the bytes written, and whether the upstream closes after them.
struct Answer(&'static [u8], bool);

/// An upstream that answers each request with the next scripted answer, on whatever
/// connection it comes; returns its URL and the number of connections it accepted.
async fn scripted(script: Vec<Answer>) -> (UpstreamUrl, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = UpstreamUrl::parse(&format!("http://{}/v1", listener.local_addr().unwrap())).unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let script = Arc::new(tokio::sync::Mutex::new(script.into_iter()));
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let script = Arc::clone(&script);
            tokio::spawn(async move { answer_requests(sock, script).await });
        }
    });
    (url, accepted)
}

async fn answer_requests(
    mut sock: TcpStream,
    script: Arc<tokio::sync::Mutex<std::vec::IntoIter<Answer>>>,
) {
    let mut buf = Vec::new();
    loop {
        // One request: a head, then its Content-Length of body.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < end + length {
            let mut chunk = [0u8; 4096];
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + length);
        let Some(Answer(bytes, close)) = script.lock().await.next() else {
            return;
        };
        if sock.write_all(bytes).await.is_err() || close {
            return;
        }
    }
}

fn pool() -> Rc<Pool> {
    Pool::new(Connector::new(Duration::from_secs(2)), Rc::default())
}

/// Sends `method` with a small body and reads the whole answer: status and body.
async fn exchange(
    pool: &Rc<Pool>,
    url: &UpstreamUrl,
    method: Method,
) -> Result<(u16, Bytes), String> {
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("2"));
    let host = HeaderValue::from_str(url.authority.as_str()).unwrap();
    let path = url.path_for("chat/completions", None);
    let head = RequestHead {
        method: &method,
        target: &path,
        host: &host,
        headers: &headers,
        skip: KEEP_ALL,
        set: &[],
    };
    let resp = pool
        .send(url, &head, &Bytes::from_static(b"{}"))
        .await
        .map_err(|e: SendError| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes()))
}

fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

#[test]
fn answers_framed_by_length_chunks_or_close_arrive_whole_and_only_clean_ends_are_reused() {
    local(async {
        let (url, accepted) = scripted(vec![
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false),
            Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                false,
            ),
            Answer(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
                false,
            ),
            Answer(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the close", true),
            Answer(b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ])
        .await;
        let pool = pool();
        let got = exchange(&pool, &url, Method::POST).await.unwrap();
        assert_eq!(got, (200, Bytes::from_static(b"hello")));
        assert_eq!(
            pool.idle_connections(),
            1,
            "a complete answer frees its connection"
        );
        let got = exchange(&pool, &url, Method::POST).await.unwrap();
        assert_eq!(got, (200, Bytes::from_static(b"abcde")));
        let got = exchange(&pool, &url, Method::POST).await.unwrap();
        assert_eq!(
            got,
            (201, Bytes::from_static(b"ok")),
            "an interim 100 is skipped"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection so far");
        let got = exchange(&pool, &url, Method::POST).await.unwrap();
        assert_eq!(got, (200, Bytes::from_static(b"until the close")));
        assert_eq!(
            pool.idle_connections(),
            0,
            "a body read to the close ends its connection"
        );
        let got = exchange(&pool, &url, Method::POST).await.unwrap();
        assert_eq!(got, (204, Bytes::new()));
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn an_idle_connection_the_upstream_closed_is_never_used() {
    local(async {
        // The first connection answers once and closes; the request after it must go
        // out on a new connection, not fail on the dead one.
        let (url, accepted) = scripted(vec![
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", true),
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", false),
        ])
        .await;
        let pool = pool();
        assert_eq!(
            exchange(&pool, &url, Method::POST).await.unwrap(),
            (200, Bytes::from_static(b"a"))
        );
        assert_eq!(pool.idle_connections(), 1, "it said nothing of closing");
        // Let the upstream's FIN arrive.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            exchange(&pool, &url, Method::POST).await.unwrap(),
            (200, Bytes::from_static(b"b"))
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn a_body_dropped_early_or_broken_closes_its_connection() {
    local(async {
        let (url, accepted) = scripted(vec![
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", false),
            Answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                false,
            ),
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", true),
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        ])
        .await;
        let pool = pool();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        let host = HeaderValue::from_str(url.authority.as_str()).unwrap();
        let head = RequestHead {
            method: &Method::POST,
            target: "/v1/x",
            host: &host,
            headers: &headers,
            skip: KEEP_ALL,
            set: &[],
        };
        let resp = pool
            .send(&url, &head, &Bytes::from_static(b"{}"))
            .await
            .unwrap();
        drop(resp);
        assert_eq!(
            pool.idle_connections(),
            0,
            "an unread body cannot be skipped"
        );
        let err = exchange(&pool, &url, Method::POST).await.unwrap_err();
        assert!(err.contains("chunk"), "{err}");
        let err = exchange(&pool, &url, Method::POST).await.unwrap_err();
        assert!(err.contains("before the end of the body"), "{err}");
        assert_eq!(pool.idle_connections(), 0);
        assert_eq!(
            exchange(&pool, &url, Method::POST).await.unwrap(),
            (200, Bytes::from_static(b"ok"))
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    });
}

#[test]
fn a_head_request_reads_no_body_whatever_the_length_says() {
    local(async {
        let (url, accepted) = scripted(vec![
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n", false),
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", false),
        ])
        .await;
        let pool = pool();
        assert_eq!(
            exchange(&pool, &url, Method::HEAD).await.unwrap(),
            (200, Bytes::new())
        );
        assert_eq!(
            exchange(&pool, &url, Method::POST).await.unwrap(),
            (200, Bytes::from_static(b"x"))
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the connection was reused"
        );
    });
}

#[test]
fn the_sweep_drops_connections_closed_or_idle_too_long() {
    local(async {
        let (url, _) = scripted(vec![
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", true),
            Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb", false),
        ])
        .await;
        let pool = pool();
        exchange(&pool, &url, Method::POST).await.unwrap();
        assert_eq!(pool.idle_connections(), 1);
        // Let the upstream's FIN arrive: the sweep finds the connection closed.
        tokio::time::sleep(Duration::from_millis(100)).await;
        pool.idle.sweep();
        assert_eq!(pool.idle_connections(), 0);
        exchange(&pool, &url, Method::POST).await.unwrap();
        for _ in 1..super::idle::IDLE_SWEEPS {
            pool.idle.sweep();
            assert_eq!(pool.idle_connections(), 1, "an open connection is kept");
        }
        pool.idle.sweep();
        assert_eq!(
            pool.idle_connections(),
            0,
            "until it has been idle too long"
        );
    });
}
