//! Header rules of the client's request: limits, the request id kept, the names the proxy reads
//! (what goes upstream is `outgoing`'s; what comes back, `upstream::h1::head`'s).

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::Limits;
use crate::error::ProxyError;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_PRIORITY: HeaderName = HeaderName::from_static("x-priority");

/// 431 when the request has more headers, or more header bytes, than allowed.
pub fn check_limits(headers: &HeaderMap, limits: &Limits) -> Result<(), ProxyError> {
    let too_large = || ProxyError::HeadersTooLarge {
        max_headers: limits.max_headers,
        max_bytes: limits.max_header_bytes,
    };
    if headers.len() > limits.max_headers {
        return Err(too_large());
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if bytes > limits.max_header_bytes {
        return Err(too_large());
    }
    Ok(())
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
        assert!(check_limits(&h, &limits()).is_ok());
        h.insert("x-10", HeaderValue::from_static("v"));
        assert!(matches!(
            check_limits(&h, &limits()),
            Err(ProxyError::HeadersTooLarge { .. })
        ));
        let mut big = HeaderMap::new();
        big.insert("x-big", HeaderValue::from_str(&"a".repeat(1100)).unwrap());
        assert!(check_limits(&big, &limits()).is_err());
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
