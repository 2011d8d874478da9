//! The request as it goes upstream, made from the client's without copying it.
//!
//! The client's headers stay where hyper parsed them. What the upstream must not see
//! (hop-by-hop headers and those `Connection` lists, `X-Priority`, the client's key when
//! the provider has one, a stale `Content-Length`) is skipped as the head is written,
//! and what the proxy sets (the provider's key, the request id, the body's length) is
//! written after. Inserting and removing in the client's map instead cost a rehash or
//! two and a copy for every 429 retry; here every attempt borrows the same parts.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::headers::{X_PRIORITY, X_REQUEST_ID};

static AUTHORIZATION: HeaderName = header::AUTHORIZATION;
static CONTENT_LENGTH: HeaderName = header::CONTENT_LENGTH;
static REQUEST_ID: HeaderName = X_REQUEST_ID;

/// The request as it goes upstream: the client's head and body, and the rules that
/// turn its headers into the upstream's.
pub struct Outgoing<'r> {
    pub parts: &'r http::request::Parts,
    pub body: &'r Bytes,
    pub rules: Rules<'r>,
}

/// What changes between the client's headers and the upstream's.
pub struct Rules<'r> {
    /// The provider's key, replacing the client's `Authorization` (none: the client's
    /// passes).
    auth: Option<&'r HeaderValue>,
    request_id: &'r HeaderValue,
    /// The body's length, when the client's `Content-Length` does not already say it.
    length: Option<HeaderValue>,
    /// The client's `Content-Length` is wrong or moot (no body): left out.
    drop_length: bool,
    /// Names the client's `Connection` lists, besides the standard hop-by-hop ones.
    listed: Vec<&'r [u8]>,
}

impl<'r> Rules<'r> {
    // Inlined: out of line (it has two callers) it cost about 240 instructions a request.
    #[inline(always)]
    pub fn new(
        headers: &'r HeaderMap,
        auth: Option<&'r HeaderValue>,
        request_id: &'r HeaderValue,
        body_len: usize,
    ) -> Self {
        // Usually the client's own Content-Length already says it: it is kept as it is.
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|v| v.parse::<usize>().ok());
        let right = body_len > 0 && declared == Some(body_len);
        let mut listed = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                // `keep-alive` and `close` name hop-by-hop headers already left out.
                if !token.is_empty() && !HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(token)) {
                    listed.push(token);
                }
            }
        }
        Self {
            auth,
            request_id,
            length: (body_len > 0 && !right).then(|| HeaderValue::from(body_len)),
            drop_length: !right,
            listed,
        }
    }

    /// Whether the client's header `name` is left out.
    pub fn skip(&self, name: &HeaderName) -> bool {
        let s = name.as_str();
        hop_by_hop_lowercase(s.as_bytes())
            || name == X_PRIORITY
            || name == X_REQUEST_ID
            || (self.auth.is_some() && name == header::AUTHORIZATION)
            || (self.drop_length && name == header::CONTENT_LENGTH)
            || (!self.listed.is_empty()
                && self
                    .listed
                    .iter()
                    .any(|l| l.eq_ignore_ascii_case(s.as_bytes())))
    }

    /// The headers the proxy sets: the first `n` of the array.
    pub fn set(&self) -> ([(&HeaderName, &HeaderValue); 3], usize) {
        let mut out = [(&REQUEST_ID, self.request_id); 3];
        let mut n = 1;
        if let Some(auth) = self.auth {
            out[n] = (&AUTHORIZATION, auth);
            n += 1;
        }
        if let Some(length) = &self.length {
            out[n] = (&CONTENT_LENGTH, length);
            n += 1;
        }
        (out, n)
    }
}

/// Connection-level headers (RFC 9110 §7.6.1), and `close`, which `Connection` may list.
const HOP_BY_HOP: [&[u8]; 10] = [
    b"connection",
    b"keep-alive",
    b"close",
    b"proxy-connection",
    b"proxy-authenticate",
    b"proxy-authorization",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
];

/// [`HOP_BY_HOP`] for a lowercase name (every `HeaderName` is): one `match`, which
/// compiles to a length switch and a compare or two.
fn hop_by_hop_lowercase(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection"
            | b"keep-alive"
            | b"close"
            | b"proxy-connection"
            | b"proxy-authenticate"
            | b"proxy-authorization"
            | b"te"
            | b"trailer"
            | b"transfer-encoding"
            | b"upgrade"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::upstream::{bearer, RequestHead};

    /// The headers the upstream gets for `client`'s, as a map.
    fn sent(
        client: &HeaderMap,
        auth: Option<&HeaderValue>,
        rid: &HeaderValue,
        len: usize,
    ) -> HeaderMap {
        let rules = Rules::new(client, auth, rid, len);
        let (set, n) = rules.set();
        RequestHead {
            method: &http::Method::POST,
            target: "/v1/x",
            host: &HeaderValue::from_static("up"),
            headers: client,
            skip: &|name| rules.skip(name),
            set: &set[..n],
        }
        .to_map()
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
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(X_PRIORITY, HeaderValue::from_static("high"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("client-id"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        let key = Secret::new("nvapi-provider".into()).and_then(|k| bearer(&k));
        let out = sent(&h, key.as_ref(), &HeaderValue::from_static("rid"), 5);
        assert_eq!(out[header::AUTHORIZATION], "Bearer nvapi-provider");
        assert!(out[header::AUTHORIZATION].is_sensitive());
        assert_eq!(out.get_all(header::AUTHORIZATION).iter().count(), 1);
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
        assert_eq!(out[X_REQUEST_ID], "rid");
        assert_eq!(out.get_all(X_REQUEST_ID).iter().count(), 1);
        assert_eq!(out[header::CONTENT_LENGTH], "5");
        assert_eq!(out[header::HOST], "up");
    }

    #[test]
    fn content_length_says_the_length_of_the_body_sent() {
        let rid = HeaderValue::from_static("rid");
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        let out = sent(&h, None, &rid, 5);
        assert_eq!(out.get_all(header::CONTENT_LENGTH).iter().count(), 1);
        assert_eq!(out[header::CONTENT_LENGTH], "5");
        let mut stale = HeaderMap::new();
        stale.insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        let out = sent(&stale, None, &rid, 5);
        assert_eq!(out.get_all(header::CONTENT_LENGTH).iter().count(), 1);
        assert_eq!(out[header::CONTENT_LENGTH], "5");
        let out = sent(&HeaderMap::new(), None, &rid, 12);
        assert_eq!(out[header::CONTENT_LENGTH], "12");
    }

    #[test]
    fn the_fast_hop_by_hop_test_knows_every_name_of_the_list() {
        for name in HOP_BY_HOP {
            assert!(
                hop_by_hop_lowercase(name),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        assert!(!hop_by_hop_lowercase(b"content-type"));
    }

    #[test]
    fn without_a_provider_key_the_client_authorization_passes() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer own"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let out = sent(&h, None, &HeaderValue::from_static("rid"), 0);
        assert_eq!(out[header::AUTHORIZATION], "Bearer own");
        assert!(!out.contains_key(header::CONTENT_LENGTH));
    }
}
