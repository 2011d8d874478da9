//! What a request must look like before it is routed, and what becomes of a body the
//! sidecar answers before reading.
//!
//! - **Host** (RFC 9112 §3.2): an HTTP/1.1 request carries exactly one `Host`, a valid
//!   `host[:port]`; HTTP/1.0 at most one. HTTP/2 names its authority in `:authority`
//!   and is not checked here.
//! - **Target** (RFC 9112 §3.2.2): an absolute-form target (`GET http://host/path`) is
//!   served only when its authority is the sidecar's own — the listen address; also
//!   `localhost`, and loopback addresses when it listens on all — and then its `Host`
//!   is ignored. A matching `Host` does not make a foreign target local: the client
//!   writes both. A listener on port 0 (tests) does not know its port here, so the
//!   port is then not compared. CONNECT (authority-form) opens no tunnel.
//! - **Methods**: under `/v1/` only [`FORWARDED_METHODS`] are forwarded.
//! - **Lingering** ([`linger`]): a request answered before its body was read whole (a
//!   413, or any refusal that comes first) has the rest of its body read and discarded
//!   in the background, up to [`linger_bytes`] and [`LINGER_TIME`], whichever comes
//!   first, like nginx's lingering close. A client that sends its whole body before
//!   reading then gets its answer instead of a reset, and the answer says
//!   `Connection: close` (on HTTP/1; an HTTP/2 refusal ends only its stream).
//!
//! hyper refuses some framing itself, before any of this runs, with a bare 400 and a
//! close: a malformed request line or header, `Content-Length` values that disagree,
//! a `Transfer-Encoding` other than chunked. A request with both `Content-Length` and
//! chunked it reads as chunked, and closes the connection after the answer.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Buf;
use http::request::Parts;
use http::{header, HeaderValue, Method, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;

/// The methods forwarded under `/v1/`, as the `Allow` header of a 405 lists them.
pub const FORWARDED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// Longest a refused body is read after the answer.
pub const LINGER_TIME: Duration = Duration::from_secs(5);

/// Why a request's framing is refused (400).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error("an HTTP/1.1 request needs a Host header (RFC 9112 §3.2)")]
    MissingHost,
    #[error("the request has {count} Host headers; exactly one is allowed (RFC 9112 §3.2)")]
    DuplicateHost { count: usize },
    #[error("the Host header {value:?} is not a valid host[:port]")]
    InvalidHost { value: String },
    #[error("the request target names {authority}, which is not this sidecar; send an origin-form target such as /v1/chat/completions (the sidecar is not a forward proxy)")]
    ForeignAuthority { authority: String },
    #[error("CONNECT {authority}: the sidecar opens no tunnels (it is not a forward proxy)")]
    Connect { authority: String },
}

impl FramingError {
    /// The OpenAI `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingHost => "missing_host",
            Self::DuplicateHost { .. } => "duplicate_host",
            Self::InvalidHost { .. } => "invalid_host",
            Self::ForeignAuthority { .. } => "foreign_authority",
            Self::Connect { .. } => "connect_not_supported",
        }
    }
}

// === framing ===

/// Checks a request's `Host` and target against the sidecar listening on `listen`.
pub fn check(req: &Parts, listen: SocketAddr) -> Result<(), FramingError> {
    let mut hosts = req.headers.get_all(header::HOST).iter();
    check_hosts(req, listen, hosts.next(), hosts.next().is_some())
}

/// [`check`], given the request's first `Host` and whether it has another (found by a
/// pass over the headers the caller makes anyway).
pub fn check_hosts(
    req: &Parts,
    listen: SocketAddr,
    host: Option<&HeaderValue>,
    more_hosts: bool,
) -> Result<(), FramingError> {
    let version = req.version;
    if !matches!(
        version,
        Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11
    ) {
        return Ok(());
    }
    match (host, more_hosts) {
        (None, _) if version == Version::HTTP_11 => return Err(FramingError::MissingHost),
        (None, _) => {}
        (Some(_), true) => {
            return Err(FramingError::DuplicateHost {
                count: req.headers.get_all(header::HOST).iter().count(),
            })
        }
        (Some(host), false) => {
            if !valid_host(host.as_bytes()) {
                return Err(FramingError::InvalidHost {
                    value: String::from_utf8_lossy(host.as_bytes())
                        .chars()
                        .take(256)
                        .collect(),
                });
            }
        }
    }
    let uri = &req.uri;
    let Some(authority) = uri.authority() else {
        return Ok(());
    };
    let authority = authority.as_str().chars().take(256).collect();
    if uri.scheme().is_none() {
        // Authority-form: only CONNECT has it.
        return Err(FramingError::Connect { authority });
    }
    if !is_own(uri, listen) {
        return Err(FramingError::ForeignAuthority { authority });
    }
    Ok(())
}

/// `uri-host [":" port]`, without user information.
fn valid_host(value: &[u8]) -> bool {
    // The usual `name[:port]` or `a.b.c.d[:port]` (letters, digits, dots, hyphens, one
    // colon at most) is one `Authority` parses whole, so it is accepted without building
    // one: that copies the value into a new allocation, on every request.
    let mut colons = 0;
    let plain = value.iter().all(|&b| {
        colons += usize::from(b == b':');
        b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b':'
    });
    if plain && colons <= 1 && !value.is_empty() {
        return true;
    }
    !value.is_empty()
        && !value.contains(&b'@')
        && http::uri::Authority::try_from(value).is_ok_and(|a| a.as_str().len() == value.len())
}

/// Whether an absolute-form target names the sidecar itself.
fn is_own(uri: &Uri, listen: SocketAddr) -> bool {
    let Some(authority) = uri.authority() else {
        return true;
    };
    let default_port = match uri.scheme_str() {
        Some(s) if s.eq_ignore_ascii_case("http") => 80,
        Some(s) if s.eq_ignore_ascii_case("https") => 443,
        _ => return false,
    };
    if authority.as_str().contains('@') {
        return false;
    }
    let port = authority.port_u16().unwrap_or(default_port);
    if listen.port() != 0 && port != listen.port() {
        return false;
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let everywhere = listen.ip().is_unspecified();
    if host.eq_ignore_ascii_case("localhost") {
        return everywhere || listen.ip().is_loopback();
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => (everywhere && ip.is_loopback()) || (!everywhere && ip == listen.ip()),
        Err(_) => false,
    }
}

/// Whether `method` is forwarded under `/v1/`.
pub fn forwarded(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

// === lingering ===

/// Most bytes of a refused body read after the answer: four request bodies' worth,
/// between 8 and 64 MiB.
pub fn linger_bytes(max_body_bytes: usize) -> u64 {
    (max_body_bytes as u64)
        .saturating_mul(4)
        .clamp(8 << 20, 64 << 20)
}

/// Reads the rest of `body` in the background and discards it, until it ends,
/// `max_bytes` were read, [`LINGER_TIME`] passed or `stop` fires; then drops it, which
/// lets hyper close the connection. Runs on the worker's `LocalSet`.
pub fn linger<B>(body: B, max_bytes: u64, stop: CancellationToken)
where
    B: Body + Unpin + 'static,
{
    tokio::task::spawn_local(async move {
        tokio::select! {
            _ = tokio::time::timeout(LINGER_TIME, discard(body, max_bytes)) => {}
            _ = stop.cancelled() => {}
        }
    });
}

/// Reads `body` until it ends, fails, or `max_bytes` were read; returns the bytes read.
async fn discard<B: Body + Unpin>(mut body: B, max_bytes: u64) -> u64 {
    let mut read = 0u64;
    while read < max_bytes {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    read += d.remaining() as u64;
                }
            }
            _ => break,
        }
    }
    read
}

/// `s` cut to at most `max` bytes, on a character boundary (paths and models that are
/// logged, counted or echoed in an error are cut to 256 bytes).
pub fn truncate(s: &str, max: usize) -> String {
    cut(s, max).to_owned()
}

/// The longest start of `s` of at most `max` bytes that ends on a character boundary.
pub fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn request(version: Version, target: &str, hosts: &[&str]) -> Parts {
        let mut b = http::Request::get(target).version(version);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn listen(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    proptest::proptest! {
        #[test]
        fn valid_host_agrees_with_parsing_an_authority(value in "[a-zA-Z0-9.:@%/\\[\\]_ -]{0,12}") {
            let value = value.as_bytes();
            let parsed = !value.is_empty()
                && !value.contains(&b'@')
                && http::uri::Authority::try_from(value).is_ok_and(|a| a.as_str().len() == value.len());
            proptest::prop_assert_eq!(valid_host(value), parsed);
        }
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        let at = listen("127.0.0.1:8080");
        let ok = |hosts: &[&str]| check(&request(Version::HTTP_11, "/v1/x", hosts), at);
        assert!(ok(&["sidecar:8080"]).is_ok());
        assert!(ok(&["[::1]:8080"]).is_ok());
        assert!(matches!(ok(&[]), Err(FramingError::MissingHost)));
        assert!(matches!(
            ok(&["a", "a"]),
            Err(FramingError::DuplicateHost { count: 2 })
        ));
        for bad in ["", "user@host", "host/path", "host:port:x"] {
            assert!(
                matches!(ok(&[bad]), Err(FramingError::InvalidHost { .. })),
                "{bad}"
            );
        }
        let v10 = |hosts: &[&str]| check(&request(Version::HTTP_10, "/v1/x", hosts), at);
        assert!(v10(&[]).is_ok());
        assert!(v10(&["a", "b"]).is_err());
        assert!(check(&request(Version::HTTP_2, "/v1/x", &[]), at).is_ok());
    }

    #[test]
    fn an_absolute_target_must_name_the_sidecar() {
        let own = |target: &str, at: &str| {
            check(
                &request(Version::HTTP_11, target, &["evil.example"]),
                listen(at),
            )
            .is_ok()
        };
        let loopback = "127.0.0.1:8080";
        assert!(own("http://127.0.0.1:8080/healthz", loopback));
        assert!(own("http://localhost:8080/healthz", loopback));
        assert!(own("http://LOCALHOST:8080/healthz", loopback));
        assert!(!own("http://[::1]:8080/healthz", loopback));
        assert!(own("http://[::1]:8080/healthz", "[::1]:8080"));
        assert!(own("http://localhost:8080/healthz", "[::1]:8080"));
        assert!(!own("http://127.0.0.1:8081/healthz", loopback));
        assert!(!own("http://127.0.0.1/healthz", loopback));
        assert!(!own("http://evil.example:8080/healthz", loopback));
        assert!(!own("http://10.0.0.5:8080/healthz", loopback));
        assert!(!own("ftp://127.0.0.1:8080/healthz", loopback));
        assert!(!own("http://u@127.0.0.1:8080/healthz", loopback));
        assert!(own("http://127.0.0.1:80/healthz", "127.0.0.1:80"));
        assert!(own("http://127.0.0.1/healthz", "127.0.0.1:80"));
        // A specific address: that address, not loopback (which cannot reach it).
        let lan = "10.0.0.5:8080";
        assert!(own("http://10.0.0.5:8080/x", lan));
        assert!(!own("http://127.0.0.1:8080/x", lan));
        assert!(!own("http://localhost:8080/x", lan));
        // All addresses: loopback forms only (the others are not known here).
        let any = "0.0.0.0:8080";
        assert!(own("http://localhost:8080/x", any));
        assert!(own("http://127.0.0.1:8080/x", any));
        assert!(own("http://[::1]:8080/x", "[::]:8080"));
        assert!(!own("http://0.0.0.0:8080/x", any));
        assert!(!own("http://10.0.0.5:8080/x", any));
        // Port 0: the bound port is not known, so not compared.
        assert!(own("http://127.0.0.1:41234/x", "127.0.0.1:0"));
        assert!(!own("http://evil.example:41234/x", "127.0.0.1:0"));
        // Origin form is always the sidecar's.
        assert!(own("/v1/models", loopback));
    }

    #[test]
    fn connect_opens_no_tunnel() {
        let mut req = request(Version::HTTP_11, "/", &["127.0.0.1:8080"]);
        req.method = Method::CONNECT;
        req.uri = Uri::from_static("127.0.0.1:8080");
        assert!(matches!(
            check(&req, listen("127.0.0.1:8080")),
            Err(FramingError::Connect { .. })
        ));
    }

    #[test]
    fn only_the_usual_methods_are_forwarded() {
        for m in FORWARDED_METHODS.split(", ") {
            assert!(forwarded(&Method::from_bytes(m.as_bytes()).unwrap()), "{m}");
        }
        for m in ["TRACE", "CONNECT", "FOO", "PROPFIND"] {
            assert!(
                !forwarded(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }

    #[test]
    fn lingering_reads_at_most_its_bound() {
        assert_eq!(linger_bytes(1 << 20), 8 << 20);
        assert_eq!(linger_bytes(4 << 20), 16 << 20);
        assert_eq!(linger_bytes(usize::MAX), 64 << 20);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let chunks = || {
            let frames = (0..10).map(|_| {
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![
                    0u8;
                    1000
                ])))
            });
            http_body_util::StreamBody::new(tokio_stream::iter(frames))
        };
        assert_eq!(rt.block_on(discard(chunks(), 2500)), 3000);
        assert_eq!(rt.block_on(discard(chunks(), 1 << 20)), 10_000);
    }
}
