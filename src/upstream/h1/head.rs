//! The heads of an HTTP/1.1 exchange: the request's, written from borrowed parts, and
//! the response's, parsed with `httparse` straight into the client's header map.
//!
//! The response's hop-by-hop headers (RFC 9110 §7.6.1, and those its `Connection`
//! lists) are read for framing and keep-alive, then left out of the map: the client
//! never sees them, and nothing is inserted only to be removed again. Header values
//! share the head's buffer (no copy per value).

use std::mem::MaybeUninit;

use crate::http1::{same_name, Maps};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// Most response headers accepted (hyper's client default is 100).
pub const MAX_HEADERS: usize = 100;
/// Most bytes of a response head; past this the upstream is answered as broken.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A request head, borrowed from the request being forwarded: the client's headers as
/// they came, less those `skip` names, then those the proxy `set`s. Nothing is copied
/// into a new map or removed from the client's (each of those rehashes the map); the
/// filter runs as the head is written.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// Origin form: path and query.
    pub target: &'a str,
    pub host: &'a HeaderValue,
    /// The client's headers; a `Host` among them is always left out (`host` says it).
    pub headers: &'a HeaderMap,
    pub skip: &'a dyn Fn(&HeaderName) -> bool,
    pub set: &'a [(&'a HeaderName, &'a HeaderValue)],
}

/// A `skip` that keeps every header.
pub const KEEP_ALL: &dyn Fn(&HeaderName) -> bool = &|_| false;

impl RequestHead<'_> {
    /// The headers as sent, in a map of their own (for hyper's HTTP/2 client).
    pub fn to_map(&self) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(self.headers.len() + self.set.len() + 1);
        out.insert(header::HOST, self.host.clone());
        for (name, value) in self.headers {
            if name != header::HOST && !(self.skip)(name) {
                out.append(name, value.clone());
            }
        }
        for (name, value) in self.set {
            out.insert(*name, (*value).clone());
        }
        out
    }
}

/// Writes `head` in HTTP/1.1 form into `out`.
pub fn encode(head: &RequestHead<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(if head.target.is_empty() {
        b"/"
    } else {
        head.target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(head.host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.headers {
        if name == header::HOST || (head.skip)(name) {
            continue;
        }
        line(out, name, value);
    }
    for (name, value) in head.set {
        line(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

#[inline(always)]
fn line(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    let (name, value) = (name.as_str().as_bytes(), value.as_bytes());
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (a HEAD request, 204, 304, or `Content-Length: 0`).
    Empty,
    Length(u64),
    Chunked,
    /// Read until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    /// End-to-end headers only.
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection may carry another request after this response's body.
    pub keep_alive: bool,
}

/// Why a response head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("invalid response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("response head larger than {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("invalid response header {0}")]
    Header(String),
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("status {0} without a switch of protocol asked for")]
    Upgrade(u16),
}

/// Parses a response head at the start of `buf`, consuming it. `None`: not complete
/// yet. `head_request`: the request was `HEAD` (the answer has no body whatever it says).
/// The answer's header map comes from `maps`.
pub fn parse(
    buf: &mut BytesMut,
    head_request: bool,
    maps: &Maps,
) -> Result<Option<ResponseHead>, HeadError> {
    // Uninitialised slots: zeroing 100 headers' worth on every response is measurable.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)?;
    let len = match parsed {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial if buf.len() > MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
        httparse::Status::Partial => return Ok(None),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| HeadError::Header(format!("status {code}")))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Where each name and value lies in the head (offsets fit: the head is at most
    // MAX_HEAD_BYTES), so the values can share its buffer once it is frozen.
    let base = buf.as_ptr() as usize;
    let mut spans = [Span::default(); MAX_HEADERS];
    let count = resp.headers.len();
    for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = Span {
            name: (n as u32, (n + h.name.len()) as u32),
            value: (v as u32, (v + h.value.len()) as u32),
            kind: Kind::of(h.name.as_bytes()),
        };
    }
    let head = buf.split_to(len).freeze();
    read_headers(&head, &spans[..count], status, version, head_request, maps).map(Some)
}

/// Where a header's name and value lie in the head, and what the name is.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
    kind: Kind,
}

/// What a response header is to the client: framing, hop-by-hop, or a name known
/// without `HeaderName::from_bytes` (which lowercases and matches every standard name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Kind {
    #[default]
    Other,
    Connection,
    TransferEncoding,
    ContentLength,
    /// Another hop-by-hop header (RFC 9110 §7.6.1).
    Hop,
    ContentType,
    Date,
    Server,
}

impl Kind {
    /// One switch on the length, then one case-insensitive compare.
    fn of(name: &[u8]) -> Kind {
        let is = |s: &[u8]| same_name(name, s);
        match name.len() {
            2 if is(b"te") => Kind::Hop,
            4 if is(b"date") => Kind::Date,
            6 if is(b"server") => Kind::Server,
            7 if is(b"trailer") || is(b"upgrade") => Kind::Hop,
            10 if is(b"connection") => Kind::Connection,
            10 if is(b"keep-alive") => Kind::Hop,
            12 if is(b"content-type") => Kind::ContentType,
            14 if is(b"content-length") => Kind::ContentLength,
            16 if is(b"proxy-connection") => Kind::Hop,
            17 if is(b"transfer-encoding") => Kind::TransferEncoding,
            18 if is(b"proxy-authenticate") => Kind::Hop,
            19 if is(b"proxy-authorization") => Kind::Hop,
            _ => Kind::Other,
        }
    }

    fn is_hop_by_hop(self) -> bool {
        matches!(self, Kind::Connection | Kind::TransferEncoding | Kind::Hop)
    }

    fn name(self, raw: &[u8]) -> Result<HeaderName, HeaderError> {
        Ok(match self {
            Kind::ContentLength => header::CONTENT_LENGTH,
            Kind::ContentType => header::CONTENT_TYPE,
            Kind::Date => header::DATE,
            Kind::Server => header::SERVER,
            _ => HeaderName::from_bytes(raw).map_err(|_| HeaderError)?,
        })
    }
}

struct HeaderError;

impl Span {
    fn name<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.name.0 as usize..self.name.1 as usize]
    }

    fn value<'h>(&self, head: &'h [u8]) -> &'h [u8] {
        &head[self.value.0 as usize..self.value.1 as usize]
    }
}

/// Framing facts gathered from the hop-by-hop headers.
#[derive(Default)]
struct Hop {
    close: bool,
    keep_alive: bool,
    chunked: bool,
    other_coding: bool,
    length: Option<u64>,
}

fn read_headers(
    head: &Bytes,
    spans: &[Span],
    status: StatusCode,
    version: Version,
    head_request: bool,
    maps: &Maps,
) -> Result<ResponseHead, HeadError> {
    let mut hop = Hop::default();
    // Names the `Connection` header lists (besides close and keep-alive): rare.
    let mut listed: Vec<&[u8]> = Vec::new();
    for span in spans {
        let value = span.value(head);
        match span.kind {
            Kind::Connection => {
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        hop.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        hop.keep_alive = true;
                    } else {
                        listed.push(token);
                    }
                }
            }
            Kind::TransferEncoding => {
                // Only a final `chunked` delimits the body; any other coding reads to the
                // close.
                let last = tokens(value).last();
                hop.chunked = last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
                hop.other_coding |= !hop.chunked;
            }
            Kind::ContentLength => {
                for token in tokens(value) {
                    let n = parse_length(token).ok_or(HeadError::ContentLength)?;
                    if hop.length.is_some_and(|m| m != n) {
                        return Err(HeadError::ContentLength);
                    }
                    hop.length = Some(n);
                }
            }
            _ => {}
        }
    }
    // A length beside a transfer coding is the coding's to decide (RFC 9112 §6.3).
    let coded = hop.chunked || hop.other_coding;
    let mut headers = maps.take(spans.len());
    for span in spans {
        let raw = span.name(head);
        if span.kind.is_hop_by_hop()
            || (coded && span.kind == Kind::ContentLength)
            || (!listed.is_empty() && listed.iter().any(|l| l.eq_ignore_ascii_case(raw)))
        {
            continue;
        }
        let name = span
            .kind
            .name(raw)
            .map_err(|_| HeadError::Header(String::from_utf8_lossy(raw).into_owned()))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(span.value(head)))
            .map_err(|_| HeadError::Header(name.to_string()))?;
        headers.append(name, value);
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Empty
    } else if hop.chunked {
        Framing::Chunked
    } else if hop.other_coding {
        Framing::Close
    } else {
        match hop.length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let keep_alive =
        framing != Framing::Close && !hop.close && (version == Version::HTTP_11 || hop.keep_alive);
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(HeadError::Upgrade(101));
    }
    Ok(ResponseHead {
        status,
        version,
        headers,
        framing,
        keep_alive,
    })
}

/// The comma-separated tokens of a header value, trimmed.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Connection-level headers (RFC 9110 §7.6.1), never passed to the client.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    Kind::of(name).is_hop_by_hop()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(raw: &[u8], head_request: bool) -> (ResponseHead, BytesMut) {
        let mut buf = BytesMut::from(raw);
        let head = parse(&mut buf, head_request, &Maps::default())
            .unwrap()
            .expect("complete");
        (head, buf)
    }

    #[test]
    fn a_request_head_is_written_with_the_host_first_the_skipped_left_out_and_the_set_last() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("client.example"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        let mut out = Vec::new();
        encode(
            &RequestHead {
                method: &Method::POST,
                target: "/v1/chat/completions?x=1",
                host: &HeaderValue::from_static("up.example:8000"),
                headers: &headers,
                skip: &|n| n == "x-a",
                set: &[(
                    &header::AUTHORIZATION,
                    &HeaderValue::from_static("Bearer k"),
                )],
            },
            &mut out,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: up.example:8000\r\n\
             content-length: 2\r\nauthorization: Bearer k\r\n\r\n"
        );
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_left_out_and_the_rest_kept_in_order() {
        let (head, rest) = parse_all(
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive, X-Hop\r\n\
              X-Hop: secret\r\nKeep-Alive: timeout=5\r\nContent-Length: 4\r\n\
              Set-Cookie: a\r\nSet-Cookie: b\r\n\r\nbody",
            false,
        );
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.framing, Framing::Length(4));
        assert!(head.keep_alive);
        assert_eq!(&rest[..], b"body");
        let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["server", "content-length", "set-cookie"]);
        let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a", "b"]);
    }

    #[test]
    fn names_known_without_parsing_are_the_names_parsing_would_give() {
        for raw in [
            &b"Content-Type"[..],
            b"content-length",
            b"DATE",
            b"Server",
            b"x-ratelimit-remaining-requests",
            b"Contents-Type",
        ] {
            let fast = Kind::of(raw).name(raw).ok().unwrap();
            assert_eq!(fast, HeaderName::from_bytes(raw).unwrap(), "{raw:?}");
        }
        for hop in [
            &b"Connection"[..],
            b"TE",
            b"Upgrade",
            b"Keep-Alive",
            b"Transfer-Encoding",
        ] {
            assert!(is_hop_by_hop(hop), "{hop:?}");
        }
        assert!(!is_hop_by_hop(b"Trailers"));
    }

    #[test]
    fn names_compare_whatever_their_case_and_only_equal_ones() {
        assert!(same_name(b"Content-Length", b"content-length"));
        assert!(same_name(b"TRANSFER-ENCODING", b"transfer-encoding"));
        assert!(same_name(b"te", b"te"));
        assert!(!same_name(b"content-lengtH2", b"content-length"));
        assert!(!same_name(b"content_length", b"content-length"));
        assert!(!same_name(b"content-lenght", b"content-length"));
        assert!(!same_name(b"date", b"dare"));
        for raw in [
            &b"Connection"[..],
            b"x-ratelimit-limit",
            b"Keep-Alive",
            b"DATE",
        ] {
            for lower in [&b"connection"[..], b"keep-alive", b"date", b"server"] {
                assert_eq!(same_name(raw, lower), raw.eq_ignore_ascii_case(lower));
            }
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |raw: &[u8], head_request| parse_all(raw, head_request).0.framing;
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n";
        assert_eq!(framing(chunked, false), Framing::Chunked);
        assert!(!parse_all(chunked, false)
            .0
            .headers
            .contains_key("content-length"));
        let coded = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
        assert_eq!(framing(coded, false), Framing::Close);
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\n\r\n", false), Framing::Close);
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", false),
            Framing::Empty
        );
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\n\r\n", false),
            Framing::Empty
        );
        assert_eq!(
            framing(
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                false
            ),
            Framing::Empty
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Framing::Empty
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", false),
            Framing::Length(5)
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let ka = |raw: &[u8]| parse_all(raw, false).0.keep_alive;
        assert!(ka(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!ka(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(!ka(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(ka(
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(
            !ka(b"HTTP/1.1 200 OK\r\n\r\n"),
            "a body read to the close ends the connection"
        );
    }

    #[test]
    fn broken_heads_are_errors_and_partial_ones_wait() {
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse(&mut partial, false, &Maps::default())
            .unwrap()
            .is_none());
        assert_eq!(
            partial.len(),
            27,
            "nothing is consumed until the head is whole"
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
        ] {
            assert!(
                parse(&mut BytesMut::from(bad), false, &Maps::default()).is_err(),
                "{bad:?}"
            );
        }
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        huge.extend_from_slice(&b"x-a: b\r\n".repeat(MAX_HEAD_BYTES / 8 + 1));
        assert!(matches!(
            parse(&mut huge, false, &Maps::default()),
            Err(HeadError::TooLarge) | Err(HeadError::Parse(_))
        ));
    }
}
