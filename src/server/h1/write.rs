//! Writing an answer: its head, then its body framed by length, by chunks or by the
//! close, as the body arrives.
//!
//! The head and whatever of the body is ready with it go out in one write from the
//! worker's scratch buffer (the usual small JSON answer: one `write` in all). A body
//! still coming (a stream of events) is written frame by frame as each arrives, so
//! nothing waits behind a buffer. Only what the socket does not take at once is copied
//! out of the scratch buffer, into the connection's queue; a large frame goes into the
//! queue as it is, without a copy.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body::Body;

use super::head::Refusal;
use super::wire::Wire;
use crate::body::BoxError;
use crate::http1::Maps;

/// Frames larger than this are queued as they are rather than copied.
const INLINE_FRAME: usize = 8 * 1024;
/// Ready frames gathered into one write up to about this much.
const GATHER: usize = 32 * 1024;

/// What the worker's connections share to write: one scratch buffer (no connection
/// holds it across a wait) and the `Date` of this second.
#[derive(Debug, Default)]
pub struct Scratch {
    out: RefCell<Vec<u8>>,
    date: Date,
}

/// The `Date` header's value, formatted once a second.
#[derive(Debug, Default)]
struct Date {
    secs: Cell<u64>,
    text: RefCell<String>,
}

impl Date {
    fn write(&self, out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut text = self.text.borrow_mut();
        if secs != self.secs.get() || text.is_empty() {
            *text = httpdate::fmt_http_date(now);
            self.secs.set(secs);
        }
        out.extend_from_slice(text.as_bytes());
    }
}

/// What the request said that shapes its answer.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// A `HEAD` request: the answer has no body, whatever it says.
    pub head: bool,
    pub http10: bool,
    /// Close after this answer (the client, the server or the request's framing asks).
    pub close: bool,
}

/// How the answer's body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the close (an HTTP/1.0 client, length unknown).
    Close,
}

/// Why an answer was not written whole.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing the answer failed: {0}")]
    Io(#[from] io::Error),
    #[error("the client went away")]
    Gone,
    #[error("the answer's body failed: {0}")]
    Body(BoxError),
    #[error("the answer's body did not match its Content-Length")]
    Length,
}

/// Bytes owed to the socket, in order.
#[derive(Debug, Default)]
pub struct Queue {
    parts: VecDeque<Bytes>,
}

impl Queue {
    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// Writes what is queued; ready once all of it is written.
    fn poll_flush(&mut self, wire: &Wire, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(front) = self.parts.front_mut() {
            match ready!(wire.poll_write(cx, front))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => {
                    front.advance(n);
                    if front.is_empty() {
                        self.parts.pop_front();
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bytes` now, after what is queued, as far as the socket takes them;
    /// queues (copies) the rest.
    fn write_now(&mut self, wire: &Wire, cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<()> {
        let mut at = 0;
        if self.parts.is_empty() {
            while at < bytes.len() {
                match wire.poll_write(cx, &bytes[at..]) {
                    Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => at += n,
                    Poll::Ready(Err(e)) => return Err(e),
                    Poll::Pending => break,
                }
            }
        }
        if at < bytes.len() {
            self.parts.push_back(Bytes::copy_from_slice(&bytes[at..]));
        }
        Ok(())
    }

    pub async fn flush(&mut self, wire: &Wire) -> io::Result<()> {
        poll_fn(|cx| self.poll_flush(wire, cx)).await
    }
}

/// Writes `resp` as the answer to `ex`. `Ok(true)`: written whole and the connection
/// may carry the next request; `Ok(false)`: written whole, but it closes.
pub async fn answer<B>(
    wire: &Wire,
    scratch: &Scratch,
    maps: &Maps,
    queue: &mut Queue,
    resp: Response<B>,
    ex: Exchange,
) -> Result<bool, WriteError>
where
    B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let (framing, close) = {
        let mut out = scratch.out.borrow_mut();
        out.clear();
        encode_head(&mut out, scratch, &parts.status, &parts.headers, &body, ex)
    };
    maps.put(parts.headers);
    // The head waits in the scratch buffer for the first poll, which comes at once.
    let mut sending = Sending {
        framing,
        left: match framing {
            Framing::Length(n) => n,
            _ => 0,
        },
        head_out: true,
        ended: framing == Framing::None,
    };
    poll_fn(|cx| sending.poll(wire, scratch, queue, &mut body, cx)).await?;
    Ok(!close)
}

/// The body's progress onto the wire.
struct Sending {
    framing: Framing,
    /// Bytes still owed under `Length`.
    left: u64,
    /// The head is in the scratch buffer, not written yet.
    head_out: bool,
    ended: bool,
}

impl Sending {
    fn poll<B>(
        &mut self,
        wire: &Wire,
        scratch: &Scratch,
        queue: &mut Queue,
        body: &mut B,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>>
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin,
    {
        loop {
            ready!(queue.poll_flush(wire, cx))?;
            if self.ended && !self.head_out {
                // Written as far as it went; a body short of its length ends the
                // connection (the client sees it cut).
                let short = matches!(self.framing, Framing::Length(_)) && self.left > 0;
                return Poll::Ready(if short {
                    Err(WriteError::Length)
                } else {
                    Ok(())
                });
            }
            let mut out = scratch.out.borrow_mut();
            if !std::mem::take(&mut self.head_out) {
                out.clear();
            }
            let waiting = !self.ended && self.gather(&mut out, queue, body, cx)?;
            if !out.is_empty() {
                // After what a large frame queued, if any: `write_now` keeps the order.
                queue.write_now(wire, cx, &out)?;
                out.clear();
            }
            drop(out);
            if waiting && queue.is_empty() {
                // The body's poll holds the waker; a client that leaves meanwhile is
                // seen here rather than at the next write.
                if wire.poll_gone(cx) {
                    return Poll::Ready(Err(WriteError::Gone));
                }
                return Poll::Pending;
            }
        }
    }

    /// Puts the body's ready frames in `out` (a large one in `queue`, after `out`'s
    /// bytes). `Ok(true)`: the body has nothing ready.
    fn gather<B>(
        &mut self,
        out: &mut Vec<u8>,
        queue: &mut Queue,
        body: &mut B,
        cx: &mut Context<'_>,
    ) -> Result<bool, WriteError>
    where
        B: Body<Data = Bytes, Error: Into<BoxError>> + Unpin,
    {
        loop {
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Ok(true),
                Poll::Ready(None) => {
                    self.end(out);
                    return Ok(false);
                }
                Poll::Ready(Some(Err(e))) => return Err(WriteError::Body(e.into())),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let Ok(mut data) = frame.into_data() else {
                continue; // trailers: not sent
            };
            if data.is_empty() {
                continue;
            }
            if let Framing::Length(_) = self.framing {
                if data.len() as u64 > self.left {
                    return Err(WriteError::Length);
                }
                self.left -= data.len() as u64;
            }
            let chunked = self.framing == Framing::Chunked;
            if chunked {
                let _ = write!(out, "{:x}\r\n", data.len());
            }
            if data.len() > INLINE_FRAME {
                // The bytes before it, then the frame itself, are queued; the caller
                // writes the queue first.
                if !out.is_empty() {
                    queue.parts.push_back(Bytes::copy_from_slice(out));
                    out.clear();
                }
                queue.parts.push_back(std::mem::take(&mut data));
                if chunked {
                    queue.parts.push_back(Bytes::from_static(b"\r\n"));
                }
                return Ok(false);
            }
            out.extend_from_slice(&data);
            if chunked {
                out.extend_from_slice(b"\r\n");
            }
            if out.len() >= GATHER {
                return Ok(false);
            }
        }
    }

    fn end(&mut self, out: &mut Vec<u8>) {
        self.ended = true;
        if self.framing == Framing::Chunked {
            out.extend_from_slice(b"0\r\n\r\n");
        }
    }
}

/// Writes the status line and headers; returns the body's framing and whether the
/// connection closes after the answer.
fn encode_head<B: Body>(
    out: &mut Vec<u8>,
    scratch: &Scratch,
    status: &StatusCode,
    headers: &HeaderMap,
    body: &B,
    ex: Exchange,
) -> (Framing, bool) {
    let mut close = ex.close;
    let code = status.as_u16();
    let bodiless = ex.head || status.is_informational() || code == 204 || code == 304;
    let mut declared = None;
    let mut dated = false;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        match *name {
            header::CONNECTION => {
                close |= value
                    .as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
                continue;
            }
            header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH => {
                if code == 204 || status.is_informational() {
                    continue;
                }
                declared = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if declared.is_none() {
                    continue;
                }
            }
            header::DATE => dated = true,
            _ if name.as_str() == "keep-alive" => continue,
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = if bodiless {
        Framing::None
    } else if let Some(n) = declared {
        Framing::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        let _ = write!(out, "content-length: {n}\r\n");
        Framing::Length(n)
    } else if ex.http10 {
        close = true;
        Framing::Close
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if ex.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        scratch.date.write(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    // An empty body by length needs nothing more written.
    let framing = if framing == Framing::Length(0) {
        Framing::None
    } else {
        framing
    };
    (framing, close)
}

/// The answer to a request the server refuses itself: an OpenAI-style JSON error,
/// and the connection closes.
pub async fn refusal(
    wire: &Wire,
    scratch: &Scratch,
    queue: &mut Queue,
    r: &Refusal,
    request_id: Option<header::HeaderValue>,
) -> io::Result<()> {
    let body = serde_json::json!({
        "error": {"message": r.message, "type": "invalid_request_error", "code": r.code}
    })
    .to_string();
    let mut headers = HeaderMap::with_capacity(3);
    if let Some(id) = request_id {
        headers.insert(header::HeaderName::from_static("x-request-id"), id);
    }
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, body.len().into());
    let ex = Exchange {
        head: false,
        http10: false,
        close: true,
    };
    let head = {
        let mut out = scratch.out.borrow_mut();
        out.clear();
        encode_head(
            &mut out,
            scratch,
            &r.status,
            &headers,
            &http_body_util::Empty::<Bytes>::new(),
            ex,
        );
        out.extend_from_slice(body.as_bytes());
        Bytes::copy_from_slice(&out)
    };
    queue.parts.push_back(head);
    queue.flush(wire).await
}
