//! A request head, parsed from the bytes read so far: `httparse` straight into the
//! request's parts, header values sharing the read buffer.
//!
//! Pure (no I/O), so it is unit-tested and fuzzed alone. It decides what the
//! connection needs beyond the parts: how the body is framed (RFC 9112 §6.3), whether
//! the client keeps the connection, whether it waits for `100 Continue`. What it
//! refuses it says as a [`Refusal`] (status, code, message) for the connection to write.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version};

use crate::http1::{same_name, Maps};

/// Header slots on the stack; a limit above it parses into slots on the heap.
const INLINE_HEADERS: usize = 200;

/// What the server accepts before the handler sees a request. The handler's own checks
/// (`proxy::headers::check_limits`) are tighter, so that a request just over them gets
/// the handler's answer (with its request id); these bound what the server holds.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_headers: usize,
    pub max_head_bytes: usize,
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Length(u64),
    Chunked,
}

/// A parsed head and what the connection must know of it.
#[derive(Debug)]
pub struct Head {
    pub request: Request<()>,
    pub framing: Framing,
    /// The client keeps the connection after this exchange.
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
    /// The head was framed in a way that must not be trusted for a next request
    /// (both `Transfer-Encoding` and `Content-Length`): close after the answer.
    pub close_after: bool,
    /// Bytes of the buffer the head used.
    pub len: usize,
}

/// A request the server answers itself, then closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "malformed_request",
            message: message.into(),
        }
    }

    fn too_large(limits: &HeadLimits) -> Self {
        Self {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            code: "headers_too_large",
            message: format!(
                "request head over the server's bound ({} headers, {} bytes)",
                limits.max_headers, limits.max_head_bytes
            ),
        }
    }
}

/// Parses the head at the start of `buf`. `Ok(None)`: not complete yet (and still
/// within bounds).
pub fn parse(buf: &Bytes, limits: &HeadLimits, maps: &Maps) -> Result<Option<Head>, Refusal> {
    if limits.max_headers <= INLINE_HEADERS {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; INLINE_HEADERS];
        parse_into(buf, limits, maps, &mut slots[..limits.max_headers])
    } else {
        let mut slots = Vec::with_capacity(limits.max_headers);
        slots.resize_with(limits.max_headers, MaybeUninit::uninit);
        parse_into(buf, limits, maps, &mut slots)
    }
}

fn parse_into<'b>(
    buf: &'b Bytes,
    limits: &HeadLimits,
    maps: &Maps,
    slots: &mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<Head>, Refusal> {
    let mut req = httparse::Request::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head_bytes => {
            return Err(Refusal::too_large(limits))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refusal::too_large(limits)),
        Err(e) => return Err(Refusal::bad(format!("malformed request head: {e}"))),
    };
    if len > limits.max_head_bytes {
        return Err(Refusal::too_large(limits));
    }
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let method = req.method.unwrap_or_default();
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| Refusal::bad("invalid request method"))?;
    let path = req.path.unwrap_or_default();
    let uri = Uri::from_maybe_shared(buf.slice_ref(path.as_bytes()))
        .map_err(|_| Refusal::bad("invalid request target"))?;

    let mut headers = maps.take(req.headers.len());
    let mut seen = Seen::default();
    for h in req.headers.iter() {
        let raw = h.name.as_bytes();
        let kind = Kind::of(raw);
        seen.note(kind, h.value)?;
        let name = match kind {
            Kind::ContentLength => header::CONTENT_LENGTH,
            Kind::Host => header::HOST,
            Kind::ContentType => header::CONTENT_TYPE,
            Kind::Authorization => header::AUTHORIZATION,
            Kind::Accept => header::ACCEPT,
            Kind::AcceptEncoding => header::ACCEPT_ENCODING,
            Kind::UserAgent => header::USER_AGENT,
            _ => HeaderName::from_bytes(raw)
                .map_err(|_| Refusal::bad(format!("invalid header name {:?}", h.name)))?,
        };
        let value = HeaderValue::from_maybe_shared(buf.slice_ref(h.value))
            .map_err(|_| Refusal::bad(format!("invalid value of header {}", h.name)))?;
        headers.append(name, value);
    }
    let http10 = version == Version::HTTP_10;
    let (framing, close_after) = match (seen.chunked, seen.length) {
        (Some(_), _) if http10 => {
            return Err(Refusal::bad("Transfer-Encoding in an HTTP/1.0 request"))
        }
        (Some(false), _) => {
            return Err(Refusal {
                status: StatusCode::NOT_IMPLEMENTED,
                code: "unsupported_transfer_encoding",
                message: "only the chunked transfer coding is understood".into(),
            })
        }
        // RFC 9112 §6.3: chunked wins over a length, and the connection closes after.
        (Some(true), length) => {
            if length.is_some() {
                headers.remove(header::CONTENT_LENGTH);
            }
            (Framing::Chunked, length.is_some())
        }
        (None, length) => (Framing::Length(length.unwrap_or(0)), false),
    };
    let keep_alive = if http10 { seen.keep_alive } else { !seen.close };
    let expect_continue = seen.expect_continue && !http10 && framing != Framing::Length(0);
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some(Head {
        request,
        framing,
        keep_alive,
        expect_continue,
        close_after,
        len,
    }))
}

/// Whether `tail` (the last three bytes before a read, then the read) may end a head:
/// it holds an empty line. A head in pieces is parsed again only then, so a client
/// sending a byte at a time costs linear work, not quadratic.
pub fn may_end(tail: &[u8]) -> bool {
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Headers the server reads for itself, or knows without `HeaderName::from_bytes` (the
/// names every client sends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Other,
    Connection,
    ContentLength,
    TransferEncoding,
    Expect,
    Host,
    ContentType,
    Authorization,
    Accept,
    AcceptEncoding,
    UserAgent,
}

impl Kind {
    /// One switch on the length, then one case-insensitive compare.
    fn of(name: &[u8]) -> Kind {
        let is = |s: &[u8]| same_name(name, s);
        match name.len() {
            4 if is(b"host") => Kind::Host,
            6 if is(b"accept") => Kind::Accept,
            6 if is(b"expect") => Kind::Expect,
            10 if is(b"connection") => Kind::Connection,
            10 if is(b"user-agent") => Kind::UserAgent,
            12 if is(b"content-type") => Kind::ContentType,
            13 if is(b"authorization") => Kind::Authorization,
            14 if is(b"content-length") => Kind::ContentLength,
            15 if is(b"accept-encoding") => Kind::AcceptEncoding,
            17 if is(b"transfer-encoding") => Kind::TransferEncoding,
            _ => Kind::Other,
        }
    }
}

/// What the framing headers said, over all their lines.
#[derive(Debug, Default)]
struct Seen {
    /// `Some(last coding is chunked)` once a `Transfer-Encoding` was seen.
    chunked: Option<bool>,
    length: Option<u64>,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
}

impl Seen {
    fn note(&mut self, kind: Kind, value: &[u8]) -> Result<(), Refusal> {
        match kind {
            Kind::Connection => {
                for token in tokens(value) {
                    self.close |= token.eq_ignore_ascii_case(b"close");
                    self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            Kind::TransferEncoding => {
                // Only a final `chunked` frames the body (RFC 9112 §6.3); a later line
                // continues the list.
                if let Some(last) = tokens(value).last() {
                    self.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
                }
            }
            Kind::ContentLength => {
                // Repeated lines (or a list) are accepted only when they all agree.
                for token in value.split(|&b| b == b',') {
                    let n = parse_length(trim(token))
                        .ok_or_else(|| Refusal::bad("invalid Content-Length"))?;
                    if self.length.is_some_and(|m| m != n) {
                        return Err(Refusal::bad("conflicting Content-Length values"));
                    }
                    self.length = Some(n);
                }
            }
            Kind::Expect => {
                self.expect_continue = trim(value).eq_ignore_ascii_case(b"100-continue")
            }
            _ => {}
        }
        Ok(())
    }
}

/// The comma-separated tokens of a header value, trimmed, empty ones skipped.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim)
        .filter(|t| !t.is_empty())
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

/// Digits only (no sign, no space inside), at most 19 of them.
fn parse_length(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    b.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_headers: 8,
        max_head_bytes: 512,
    };

    fn head(raw: &str) -> Result<Option<Head>, Refusal> {
        parse(
            &Bytes::copy_from_slice(raw.as_bytes()),
            &LIMITS,
            &Maps::default(),
        )
    }

    fn whole(raw: &str) -> Head {
        head(raw).unwrap().expect("a complete head")
    }

    fn refused(raw: &str) -> Refusal {
        head(raw).expect_err("refused")
    }

    #[test]
    fn a_plain_post_is_parsed_with_its_length_and_headers() {
        let raw = "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Custom: v \r\n\r\n{\"model\":1}";
        let h = whole(raw);
        assert_eq!(h.request.method(), Method::POST);
        assert_eq!(h.request.uri().path(), "/v1/chat/completions");
        assert_eq!(h.request.uri().query(), Some("x=1"));
        assert_eq!(h.request.version(), Version::HTTP_11);
        assert_eq!(h.request.headers()["host"], "a");
        assert_eq!(h.request.headers()["x-custom"], "v");
        assert_eq!(h.framing, Framing::Length(12));
        assert!(h.keep_alive && !h.expect_continue && !h.close_after);
        assert_eq!(h.len, raw.len() - 11);
    }

    #[test]
    fn a_partial_head_waits_for_more_until_the_byte_bound() {
        assert!(head("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().is_none());
        assert!(head("").unwrap().is_none());
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(600));
        assert_eq!(
            refused(&long).status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let whole_but_long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(600));
        assert_eq!(
            refused(&whole_but_long).status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    #[test]
    fn more_headers_than_the_bound_get_a_431() {
        let mut raw = "GET / HTTP/1.1\r\n".to_owned();
        for i in 0..9 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let r = refused(&raw);
        assert_eq!((r.status.as_u16(), r.code), (431, "headers_too_large"));
        let mut ok = "GET / HTTP/1.1\r\n".to_owned();
        for i in 0..8 {
            ok.push_str(&format!("X-{i}: v\r\n"));
        }
        ok.push_str("\r\n");
        assert_eq!(whole(&ok).request.headers().len(), 8);
    }

    #[test]
    fn a_limit_above_the_inline_slots_parses_on_the_heap() {
        let limits = HeadLimits {
            max_headers: 300,
            max_head_bytes: 64 * 1024,
        };
        let mut raw = "GET / HTTP/1.1\r\n".to_owned();
        for i in 0..250 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        let h = parse(&Bytes::from(raw), &limits, &Maps::default())
            .unwrap()
            .unwrap();
        assert_eq!(h.request.headers().len(), 250);
    }

    #[test]
    fn garbage_is_a_400() {
        for raw in [
            "G@T / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET /\u{1} HTTP/1.1\r\n\r\n",
        ] {
            let r = refused(raw);
            assert_eq!(
                (r.status.as_u16(), r.code),
                (400, "malformed_request"),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn content_length_must_be_digits_and_agree() {
        assert_eq!(
            whole("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").framing,
            Framing::Length(3)
        );
        assert_eq!(
            whole("POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n").framing,
            Framing::Length(3)
        );
        for bad in [
            "1\r\nContent-Length: 2",
            "+3",
            "-1",
            "3 3",
            "",
            "99999999999999999999",
            "0x10",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(refused(&raw).status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn transfer_encoding_frames_by_its_last_coding() {
        let h = whole("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.close_after);
        let r = refused("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(
            (r.status.as_u16(), r.code),
            (501, "unsupported_transfer_encoding")
        );
        let r = refused(
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        );
        assert_eq!(r.status.as_u16(), 501);
        let r = refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(r.status.as_u16(), 400);
    }

    #[test]
    fn chunked_with_a_length_drops_the_length_and_closes_after() {
        let h = whole("POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.close_after);
        assert!(h.request.headers().get("content-length").is_none());
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        assert!(whole("GET / HTTP/1.1\r\n\r\n").keep_alive);
        assert!(!whole("GET / HTTP/1.1\r\nConnection: upgrade, Close\r\n\r\n").keep_alive);
        assert!(!whole("GET / HTTP/1.0\r\n\r\n").keep_alive);
        let h = whole("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(h.keep_alive);
        assert_eq!(h.request.version(), Version::HTTP_10);
    }

    #[test]
    fn expect_continue_only_with_a_body_on_http11() {
        let post = |v: &str, len: u32| {
            format!("POST / {v}\r\nExpect: 100-Continue\r\nContent-Length: {len}\r\n\r\n")
        };
        assert!(whole(&post("HTTP/1.1", 4)).expect_continue);
        assert!(!whole(&post("HTTP/1.1", 0)).expect_continue);
        assert!(!whole(&post("HTTP/1.0", 4)).expect_continue);
    }

    #[test]
    fn other_request_targets_parse() {
        assert_eq!(whole("OPTIONS * HTTP/1.1\r\n\r\n").request.uri(), "*");
        let h = whole("CONNECT example.com:443 HTTP/1.1\r\n\r\n");
        assert_eq!(h.request.uri().authority().unwrap(), "example.com:443");
        let h = whole("GET http://a.example/v1/models HTTP/1.1\r\n\r\n");
        assert_eq!(h.request.uri().host(), Some("a.example"));
    }

    #[test]
    fn names_known_without_a_lookup_are_the_right_ones_whatever_their_case() {
        let h = whole("GET / HTTP/1.1\r\nUSER-agent: u\r\nAccept: a\r\naccept-ENCODING: e\r\nHost: h\r\nContent-Type: t\r\nAuthorization: z\r\nAccept-Language: l\r\n\r\n");
        for (name, value) in [
            ("user-agent", "u"),
            ("accept", "a"),
            ("accept-encoding", "e"),
            ("host", "h"),
            ("content-type", "t"),
            ("authorization", "z"),
            ("accept-language", "l"),
        ] {
            assert_eq!(h.request.headers()[name], value, "{name}");
        }
        assert_eq!(h.request.headers().len(), 7);
    }

    #[test]
    fn values_share_the_buffer() {
        let buf = Bytes::from_static(b"GET / HTTP/1.1\r\nX-A: hello\r\n\r\n");
        let h = parse(&buf, &LIMITS, &Maps::default()).unwrap().unwrap();
        let v = h.request.headers()["x-a"].as_bytes();
        let inside = buf.as_ptr_range();
        assert!(inside.contains(&v.as_ptr()), "not a copy");
    }
}
