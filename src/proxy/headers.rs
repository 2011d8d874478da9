//! Header rules of the forwarding path: limits, hop-by-hop stripping, key injection.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Limits;
use crate::error::ProxyError;

/// Connection-level headers (RFC 9110 §7.6.1) never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

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

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name == header::UPGRADE
}

/// Names listed in `Connection:` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// A valid client `X-Request-Id` (visible ASCII, at most 128 bytes) to keep.
pub fn client_request_id(headers: &HeaderMap) -> Option<&HeaderValue> {
    let v = headers.get(X_REQUEST_ID)?;
    let b = v.as_bytes();
    (!b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())).then_some(v)
}

/// Turns the client's headers into the upstream request's, in place: drops hop-by-hop
/// headers (and those `Connection` lists), `X-Priority` and a stale `Content-Length`;
/// sets the provider's key (replacing the client's, when the provider has one), the
/// request id and the body length. `Host` is set per attempt, since a
/// passthrough may go to another upstream. One pass to find what to drop: most
/// requests drop nothing, and nothing is rehashed.
#[inline]
pub fn upstream_request_headers(
    mut headers: HeaderMap,
    auth: Option<&HeaderValue>,
    request_id: &HeaderValue,
    body_len: usize,
) -> HeaderMap {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name)
            || name == X_PRIORITY
            || (body_len == 0 && name == header::CONTENT_LENGTH)
        {
            doomed.push(name.clone());
        }
    }
    if headers.contains_key(header::CONNECTION) {
        doomed.extend(connection_listed(&headers));
    }
    for name in doomed {
        headers.remove(name);
    }
    if let Some(auth) = auth {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    // Usually the client's own Content-Length already says it: keep it as it is.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.parse::<usize>().ok());
    if body_len > 0 && declared != Some(body_len) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    headers
}

/// Removes hop-by-hop headers from an upstream response in place (one pass to find
/// them; usually only `Transfer-Encoding` or `Connection`).
pub fn strip_response(headers: &mut HeaderMap) {
    let mut doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    if headers.contains_key(header::CONNECTION) {
        doomed.extend(connection_listed(headers));
    }
    for name in doomed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::upstream::bearer;

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
    fn client_key_hop_by_hop_and_listed_headers_are_replaced_or_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client-key"),
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(X_PRIORITY, HeaderValue::from_static("high"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let key = Secret::new("nvapi-provider".into()).and_then(|k| bearer(&k));
        let prepared =
            upstream_request_headers(h, key.as_ref(), &HeaderValue::from_static("rid"), 5);
        let out = prepared;
        assert_eq!(out[header::AUTHORIZATION], "Bearer nvapi-provider");
        assert!(out[header::AUTHORIZATION].is_sensitive());
        for gone in [
            "connection",
            "x-secret-hop",
            "keep-alive",
            "te",
            "x-priority",
        ] {
            assert!(!out.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(out["x-app"], "kept");
        assert_eq!(out[header::CONTENT_LENGTH], "5");
    }

    #[test]
    fn content_length_says_the_length_of_the_body_sent() {
        let rid = HeaderValue::from_static("rid");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let out = upstream_request_headers(h, None, &rid, 5);
        assert_eq!(out[header::CONTENT_LENGTH], "5");
        let mut stale = HeaderMap::new();
        stale.insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        let out = upstream_request_headers(stale, None, &rid, 5);
        assert_eq!(out[header::CONTENT_LENGTH], "5");
        let out = upstream_request_headers(HeaderMap::new(), None, &rid, 12);
        assert_eq!(out[header::CONTENT_LENGTH], "12");
    }

    #[test]
    fn without_a_provider_key_the_client_authorization_passes() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer own"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let out = upstream_request_headers(h, None, &HeaderValue::from_static("rid"), 0);
        assert_eq!(out[header::AUTHORIZATION], "Bearer own");
        assert!(!out.contains_key(header::CONTENT_LENGTH));
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
