//! Who may use the admin API.
//!
//! - A token configured (`SIDECAR_ADMIN_TOKEN`): writes need `Authorization: Bearer
//!   <token>` (missing: 401 with `WWW-Authenticate`; wrong: 403); reads need it too,
//!   except from a loopback peer. Tokens are compared in constant time on their SHA-256
//!   digests, so neither the bytes nor the length of the configured token leak.
//! - No token, listener on loopback: read-only from loopback; every write is refused
//!   with 403 saying how to enable writes.
//! - No token, listener reachable from other hosts: the admin routes are off (404), and
//!   start-up says so.
//!
//! Whatever the mode, a browser request from another origin is refused (403), so a
//! page elsewhere cannot drive the API through an operator's browser.

use std::net::{IpAddr, SocketAddr};

use http::{header, HeaderMap};
use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// How the admin API is exposed, decided once at start-up.
#[derive(Clone)]
pub enum Mode {
    /// The SHA-256 digest of the configured token.
    Token([u8; 32]),
    /// No token, loopback listener.
    ReadOnlyLoopback,
    /// No token, listener reachable from other hosts.
    Off,
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("the admin API is off: the listener is reachable from other hosts and no SIDECAR_ADMIN_TOKEN is set")]
    Off,
    #[error("cross-origin admin requests are refused (Origin {origin:?} is not this sidecar)")]
    ForeignOrigin { origin: String },
    #[error("admin writes are disabled: set SIDECAR_ADMIN_TOKEN and send it as 'Authorization: Bearer <token>'")]
    WritesDisabled,
    #[error("this admin request needs 'Authorization: Bearer <token>' (SIDECAR_ADMIN_TOKEN)")]
    MissingToken,
    #[error("the admin token is wrong")]
    WrongToken,
    #[error("without SIDECAR_ADMIN_TOKEN the admin API answers loopback clients only")]
    NotLoopback,
}

impl Mode {
    pub fn new(token: Option<&Secret>, listen: IpAddr) -> Self {
        match token {
            Some(t) => Mode::Token(sha256(t.expose().as_bytes())),
            None if listen.is_loopback() => Mode::ReadOnlyLoopback,
            None => Mode::Off,
        }
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> &'static str {
        match self {
            Mode::Token(_) => "token: reads and writes with the bearer token (reads also from loopback without it)",
            Mode::ReadOnlyLoopback => "read-only from loopback: set SIDECAR_ADMIN_TOKEN to allow changes",
            Mode::Off => "off: the listener is not loopback and SIDECAR_ADMIN_TOKEN is not set",
        }
    }

    /// Decides whether a request from `remote` with `headers` may do `access`.
    pub fn check(
        &self,
        access: Access,
        headers: &HeaderMap,
        remote: SocketAddr,
    ) -> Result<(), Denied> {
        if matches!(self, Mode::Off) {
            return Err(Denied::Off);
        }
        check_origin(headers)?;
        let loopback = remote.ip().to_canonical().is_loopback();
        let presented = bearer(headers);
        match (self, access) {
            (Mode::Off, _) => Err(Denied::Off),
            (Mode::ReadOnlyLoopback, Access::Write) => Err(Denied::WritesDisabled),
            (Mode::ReadOnlyLoopback, Access::Read) if loopback => Ok(()),
            (Mode::ReadOnlyLoopback, Access::Read) => Err(Denied::NotLoopback),
            (Mode::Token(want), _) => match presented {
                Some(token) => {
                    if bool::from(sha256(token).ct_eq(want)) {
                        Ok(())
                    } else {
                        Err(Denied::WrongToken)
                    }
                }
                None if access == Access::Read && loopback => Ok(()),
                None => Err(Denied::MissingToken),
            },
        }
    }
}

/// The bearer token of `Authorization`, if any (any other scheme counts as none).
fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, rest) = v.split_at(v.len().min(7));
    scheme
        .eq_ignore_ascii_case(b"bearer ")
        .then(|| rest.trim_ascii())
}

/// Refuses a browser request sent from a page of another origin: `Origin` must name
/// this host (the `Host` the request was sent to), and `Sec-Fetch-Site`, when a browser
/// sends it, must not say `cross-site`.
fn check_origin(headers: &HeaderMap) -> Result<(), Denied> {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        let origin = headers
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("cross-site")
            .to_owned();
        return Err(Denied::ForeignOrigin { origin });
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).map(|h| h.as_bytes());
    let same = origin.to_str().ok().and_then(|o| {
        let rest = o
            .strip_prefix("http://")
            .or_else(|| o.strip_prefix("https://"))?;
        Some(Some(rest.as_bytes()) == host)
    });
    if same == Some(true) {
        Ok(())
    } else {
        Err(Denied::ForeignOrigin {
            origin: String::from_utf8_lossy(origin.as_bytes())
                .chars()
                .take(200)
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const LOCAL: &str = "127.0.0.1:5000";
    const REMOTE: &str = "10.1.2.3:5000";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn token_mode() -> Mode {
        Mode::new(
            Secret::new("s3cret-admin-token".into()).as_ref(),
            "0.0.0.0".parse().unwrap(),
        )
    }

    #[test]
    fn the_authentication_matrix() {
        use Access::*;
        let right = [("authorization", "Bearer s3cret-admin-token")];
        let wrong = [("authorization", "Bearer s3cret-admin-tokeN")];
        let short = [("authorization", "Bearer s")];
        let none: [(&str, &str); 0] = [];
        let t = token_mode();
        let ro = Mode::new(None, "127.0.0.1".parse().unwrap());
        let off = Mode::new(None, "0.0.0.0".parse().unwrap());
        #[rustfmt::skip]
        type Case<'a> = (&'a Mode, Access, &'a [(&'a str, &'a str)], &'a str, Result<(), Denied>);
        let cases: Vec<Case> = vec![
            (&t, Read, &none, LOCAL, Ok(())),
            (&t, Read, &none, REMOTE, Err(Denied::MissingToken)),
            (&t, Read, &wrong, LOCAL, Err(Denied::WrongToken)),
            (&t, Read, &right, REMOTE, Ok(())),
            (&t, Write, &none, LOCAL, Err(Denied::MissingToken)),
            (&t, Write, &none, REMOTE, Err(Denied::MissingToken)),
            (&t, Write, &wrong, LOCAL, Err(Denied::WrongToken)),
            (&t, Write, &short, LOCAL, Err(Denied::WrongToken)),
            (&t, Write, &right, LOCAL, Ok(())),
            (&t, Write, &right, REMOTE, Ok(())),
            (&ro, Read, &none, LOCAL, Ok(())),
            (&ro, Read, &none, REMOTE, Err(Denied::NotLoopback)),
            (&ro, Write, &none, LOCAL, Err(Denied::WritesDisabled)),
            (&ro, Write, &right, LOCAL, Err(Denied::WritesDisabled)),
            (&off, Read, &none, LOCAL, Err(Denied::Off)),
            (&off, Write, &right, LOCAL, Err(Denied::Off)),
        ];
        for (mode, access, h, remote, want) in cases {
            let got = mode.check(access, &headers(h), remote.parse().unwrap());
            assert_eq!(got, want, "{mode:?} {access:?} {h:?} from {remote}");
        }
    }

    #[test]
    fn a_foreign_origin_is_refused_even_with_the_right_token() {
        let t = token_mode();
        let auth = ("authorization", "Bearer s3cret-admin-token");
        let local = LOCAL.parse().unwrap();
        let same = headers(&[
            auth,
            ("host", "127.0.0.1:8080"),
            ("origin", "http://127.0.0.1:8080"),
        ]);
        assert_eq!(t.check(Access::Write, &same, local), Ok(()));
        for bad in [
            headers(&[
                auth,
                ("host", "127.0.0.1:8080"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[auth, ("host", "127.0.0.1:8080"), ("origin", "null")]),
            headers(&[auth, ("origin", "http://127.0.0.1:8080")]),
            headers(&[
                auth,
                ("host", "127.0.0.1:8080"),
                ("sec-fetch-site", "cross-site"),
            ]),
        ] {
            assert!(
                matches!(
                    t.check(Access::Read, &bad, local),
                    Err(Denied::ForeignOrigin { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_mode_never_shows_the_token() {
        let shown = format!("{:?} {}", token_mode(), token_mode().describe());
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
