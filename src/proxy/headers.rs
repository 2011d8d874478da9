//! Header rules of the client's request: limits, the request id kept, the names the proxy reads
//! (what goes upstream is `outgoing`'s; what comes back, `upstream::h1::head`'s).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Limits;
use crate::error::ProxyError;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");

/// What the request phase reads of a request's headers, found in one pass: their count
/// and bytes (for the limits), the `Host`s and the first `X-Priority`. (Looked up one by
/// one, each costs a hash of its name; `x-priority` is no standard name.)
#[derive(Debug)]
pub struct Scan<'a> {
    /// The first `Host`, and whether there is another.
    pub host: Option<&'a HeaderValue>,
    pub more_hosts: bool,
    /// The first `X-Priority`.
    pub priority: Option<&'a HeaderValue>,
    count: usize,
    bytes: usize,
}

impl Scan<'_> {
    /// 431 when the request has more headers, or more header bytes, than allowed.
    pub fn check_limits(&self, limits: &Limits) -> Result<(), ProxyError> {
        if self.count > limits.max_headers || self.bytes > limits.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                max_headers: limits.max_headers,
                max_bytes: limits.max_header_bytes,
            });
        }
        Ok(())
    }
}

/// One pass over `headers` (see [`Scan`]).
pub fn scan(headers: &HeaderMap) -> Scan<'_> {
    let mut found = Scan {
        host: None,
        more_hosts: false,
        priority: None,
        count: headers.len(),
        bytes: 0,
    };
    for (k, v) in headers {
        found.bytes += k.as_str().len() + v.len();
        if k == header::HOST {
            if found.host.is_some() {
                found.more_hosts = true;
            } else {
                found.host = Some(v);
            }
        } else if found.priority.is_none() && k == X_PRIORITY {
            found.priority = Some(v);
        }
    }
    found
}

/// A valid client `X-Request-Id` (visible ASCII, at most 128 bytes) to keep.
pub fn client_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let b = v.as_bytes();
    (!b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: std::time::Duration::from_secs(1),
            max_headers: 10,
            max_header_bytes: 1024,
            max_body_bytes: 1024,
            max_connections: 1,
            h2_max_concurrent_streams: 1,
            h2_max_header_list_size: 1024,
            keep_alive: true,
        }
    }

    #[test]
    fn header_count_and_bytes_are_limited() {
        let mut h = HeaderMap::new();
        for i in 0..10 {
            h.insert(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(scan(&h).check_limits(&limits()).is_ok());
        h.insert("x-10", HeaderValue::from_static("v"));
        assert!(matches!(
            scan(&h).check_limits(&limits()),
            Err(ProxyError::HeadersTooLarge { .. })
        ));
        let mut big = HeaderMap::new();
        big.insert("x-big", HeaderValue::from_str(&"a".repeat(1100)).unwrap());
        assert!(scan(&big).check_limits(&limits()).is_err());
    }

    #[test]
    fn a_scan_finds_what_lookups_would() {
        let mut h = HeaderMap::new();
        let scanned = scan(&h);
        assert!(scanned.host.is_none() && !scanned.more_hosts && scanned.priority.is_none());
        h.append("x-a", HeaderValue::from_static("1"));
        h.append(header::HOST, HeaderValue::from_static("a"));
        h.append(X_PRIORITY, HeaderValue::from_static("low"));
        h.append(X_PRIORITY, HeaderValue::from_static("high"));
        let scanned = scan(&h);
        assert_eq!(scanned.host, h.get(header::HOST));
        assert!(!scanned.more_hosts);
        assert_eq!(scanned.priority, h.get(X_PRIORITY));
        assert_eq!(scanned.priority.unwrap(), "low");
        h.append(header::HOST, HeaderValue::from_static("b"));
        let scanned = scan(&h);
        assert_eq!(scanned.host.unwrap(), "a");
        assert!(scanned.more_hosts);
        assert!(scanned.check_limits(&limits()).is_ok());
    }

    #[test]
    fn only_sane_client_request_ids_are_kept() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(
            client_request_id(&h).map(HeaderValue::as_bytes),
            Some(&b"abc-123"[..])
        );
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(client_request_id(&h).is_none());
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(129)).unwrap(),
        );
        assert!(client_request_id(&h).is_none());
    }
}
