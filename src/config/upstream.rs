//! An upstream base URL, parsed once: scheme, host, port, `Host` value and path prefix.
//!
//! The base URL includes the API version (`https://integrate.api.nvidia.com/v1`), as
//! an OpenAI SDK's `base_url` does; the proxy maps its own `/v1/<rest>` onto
//! `<base path>/<rest>`. Also the extra CA certificates trusted for upstream TLS.

use http::uri::{Authority, Uri};
use rustls::pki_types::CertificateDer;

use super::error::ConfigError;

/// Transport to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

/// A validated upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// Value of the `Host` header / `:authority` sent upstream.
    pub authority: Authority,
    /// Path prefix without a trailing slash (`/v1`, or empty).
    pub base_path: String,
    /// Hash of scheme and authority, computed once: a cheap first test of "same origin".
    pub fingerprint: u64,
}

impl UpstreamUrl {
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        const EXPECTED: &str =
            "an http:// or https:// URL with a host, e.g. https://integrate.api.nvidia.com/v1";
        let uri: Uri = raw.trim().parse().map_err(|_| EXPECTED)?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::Http,
            Some("https") => Scheme::Https,
            _ => return Err(EXPECTED),
        };
        let authority = uri.authority().ok_or(EXPECTED)?.clone();
        if authority.as_str().contains('@') {
            return Err("a URL without user:password@ (put the key in upstream_api_key)");
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(EXPECTED);
        }
        if uri.query().is_some() {
            return Err("a base URL without a query string");
        }
        let port = authority.port_u16().unwrap_or(match scheme {
            Scheme::Http => 80,
            Scheme::Https => 443,
        });
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            scheme.hash(&mut h);
            authority.hash(&mut h);
            h.finish()
        };
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            fingerprint,
        })
    }

    /// The upstream path and query for a client path below `/v1/` (`rest` has no leading slash).
    pub fn path_for(&self, rest: &str, query: Option<&str>) -> String {
        let mut out = String::with_capacity(
            self.base_path.len() + rest.len() + 2 + query.map_or(0, str::len),
        );
        out.push_str(&self.base_path);
        out.push('/');
        out.push_str(rest);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }

    /// `scheme://authority/base` for logs and the admin view (no secrets live in it).
    pub fn display(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}{}", self.authority, self.base_path)
    }
}

/// The certificates of `upstream_ca_file` (empty path: none), trusted besides the
/// webpki roots.
pub(super) fn ca_certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    if path.is_empty() {
        return Ok(Vec::new());
    }
    const EXPECTED: &str = "a readable PEM file with at least one CERTIFICATE";
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path).and_then(|it| it.collect());
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(ConfigError::invalid("upstream_ca_file", path, EXPECTED)),
        Err(e) => Err(ConfigError::unreadable(
            "upstream_ca_file",
            path,
            EXPECTED,
            e,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_base_url_maps_v1_rest_onto_its_path() {
        let u = UpstreamUrl::parse("https://integrate.api.nvidia.com/v1").unwrap();
        assert_eq!(u.scheme, Scheme::Https);
        assert_eq!(u.port, 443);
        assert_eq!(u.host, "integrate.api.nvidia.com");
        assert_eq!(u.path_for("chat/completions", None), "/v1/chat/completions");
        assert_eq!(u.path_for("models", Some("a=1")), "/v1/models?a=1");
    }

    #[test]
    fn trailing_slash_and_explicit_port_are_normalised() {
        let u = UpstreamUrl::parse("http://127.0.0.1:9000/openai/v1/").unwrap();
        assert_eq!(u.port, 9000);
        assert_eq!(u.authority.as_str(), "127.0.0.1:9000");
        assert_eq!(u.path_for("embeddings", None), "/openai/v1/embeddings");
        let bare = UpstreamUrl::parse("http://[::1]:81").unwrap();
        assert_eq!(bare.host, "::1");
        assert_eq!(bare.path_for("models", None), "/models");
    }

    #[test]
    fn bad_urls_are_refused_with_what_is_accepted() {
        for bad in [
            "",
            "integrate.api.nvidia.com/v1",
            "ftp://x/v1",
            "http://u:p@h/v1",
            "http://h/v1?x=1",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
