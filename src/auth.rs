//! Who may use the admin API.
//!
//! - A token configured (`SIDECAR_ADMIN_TOKEN`): writes need `Authorization: Bearer
//!   <token>` (missing: 401 with `WWW-Authenticate`; wrong: 403); reads need it too,
//!   except from a loopback peer while `admin_loopback_reads` is true (the default).
//!   Tokens are compared in constant time on their SHA-256 digests, so neither the bytes
//!   nor the length of the configured token leak.
//! - No token, listener on loopback, `admin_loopback_reads` true: read-only from
//!   loopback; every write is refused with 403 saying how to enable writes.
//! - No token otherwise (listener reachable from other hosts, or `admin_loopback_reads`
//!   false): the admin routes are off (404), and start-up says why.
//!
//! `admin_loopback_reads = false` is for a sidecar behind a proxy on the same host,
//! where every client looks local: a loopback peer is then treated like any other.
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
    /// A token is configured.
    Token {
        /// The SHA-256 digest of the configured token.
        digest: [u8; 32],
        /// Reads from a loopback peer need no token.
        loopback_reads: bool,
    },
    /// No token, loopback listener, loopback reads allowed.
    ReadOnlyLoopback,
    /// No token, listener reachable from other hosts.
    Off,
    /// No token, and `admin_loopback_reads` is false: nobody may read without one.
    OffLoopbackReadsDisabled,
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
    /// Answered alike for both off modes ([`Mode::describe`] at start-up says which).
    #[error("the admin API is off: no SIDECAR_ADMIN_TOKEN is set, and reads without one are not allowed (the listener is reachable from other hosts, or admin_loopback_reads is false)")]
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
    /// `loopback_reads` is the `admin_loopback_reads` setting: whether a loopback peer
    /// may read without the token.
    pub fn new(token: Option<&Secret>, listen: IpAddr, loopback_reads: bool) -> Self {
        match token {
            Some(t) => Mode::Token {
                digest: sha256(t.expose().as_bytes()),
                loopback_reads,
            },
            None if !listen.is_loopback() => Mode::Off,
            None if !loopback_reads => Mode::OffLoopbackReadsDisabled,
            None => Mode::ReadOnlyLoopback,
        }
    }

    /// Whether every admin request is refused.
    pub fn is_off(&self) -> bool {
        matches!(self, Mode::Off | Mode::OffLoopbackReadsDisabled)
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> &'static str {
        match self {
            Mode::Token { loopback_reads: true, .. } => "token: reads and writes with the bearer token (reads also from loopback without it)",
            Mode::Token { loopback_reads: false, .. } => "token: reads and writes with the bearer token, from every peer (admin_loopback_reads is false, so loopback is not exempt)",
            Mode::ReadOnlyLoopback => "read-only from loopback: set SIDECAR_ADMIN_TOKEN to allow changes",
            Mode::Off => "off: the listener is not loopback and SIDECAR_ADMIN_TOKEN is not set",
            Mode::OffLoopbackReadsDisabled => "off: admin_loopback_reads is false and SIDECAR_ADMIN_TOKEN is not set (set a token to use the admin API)",
        }
    }

    /// Decides whether a request from `remote` with `headers` may do `access`.
    pub fn check(
        &self,
        access: Access,
        headers: &HeaderMap,
        remote: SocketAddr,
    ) -> Result<(), Denied> {
        if self.is_off() {
            return Err(Denied::Off);
        }
        check_origin(headers)?;
        let loopback = remote.ip().to_canonical().is_loopback();
        let presented = bearer(headers);
        match (self, access) {
            (Mode::Off | Mode::OffLoopbackReadsDisabled, _) => Err(Denied::Off),
            (Mode::ReadOnlyLoopback, Access::Write) => Err(Denied::WritesDisabled),
            (Mode::ReadOnlyLoopback, Access::Read) if loopback => Ok(()),
            (Mode::ReadOnlyLoopback, Access::Read) => Err(Denied::NotLoopback),
            (
                Mode::Token {
                    digest,
                    loopback_reads,
                },
                _,
            ) => match presented {
                Some(token) => {
                    if bool::from(sha256(token).ct_eq(digest)) {
                        Ok(())
                    } else {
                        Err(Denied::WrongToken)
                    }
                }
                None if access == Access::Read && loopback && *loopback_reads => Ok(()),
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
        token_mode_with(true)
    }

    /// A token, with `admin_loopback_reads` set to `loopback_reads`.
    fn token_mode_with(loopback_reads: bool) -> Mode {
        Mode::new(
            Secret::new("s3cret-admin-token".into()).as_ref(),
            "0.0.0.0".parse().unwrap(),
            loopback_reads,
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
        let strict = token_mode_with(false);
        let ro = Mode::new(None, "127.0.0.1".parse().unwrap(), true);
        let off = Mode::new(None, "0.0.0.0".parse().unwrap(), true);
        let off_local = Mode::new(None, "127.0.0.1".parse().unwrap(), false);
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
            // admin_loopback_reads = false: a loopback peer is like any other.
            (&strict, Read, &none, LOCAL, Err(Denied::MissingToken)),
            (&strict, Read, &none, REMOTE, Err(Denied::MissingToken)),
            (&strict, Read, &wrong, LOCAL, Err(Denied::WrongToken)),
            (&strict, Read, &right, LOCAL, Ok(())),
            (&strict, Read, &right, REMOTE, Ok(())),
            (&strict, Write, &none, LOCAL, Err(Denied::MissingToken)),
            (&strict, Write, &right, LOCAL, Ok(())),
            (&ro, Read, &none, LOCAL, Ok(())),
            (&ro, Read, &none, REMOTE, Err(Denied::NotLoopback)),
            (&ro, Write, &none, LOCAL, Err(Denied::WritesDisabled)),
            (&ro, Write, &right, LOCAL, Err(Denied::WritesDisabled)),
            (&off, Read, &none, LOCAL, Err(Denied::Off)),
            (&off, Write, &right, LOCAL, Err(Denied::Off)),
            (&off_local, Read, &none, LOCAL, Err(Denied::Off)),
            (&off_local, Read, &right, LOCAL, Err(Denied::Off)),
            (&off_local, Write, &right, LOCAL, Err(Denied::Off)),
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
    fn the_loopback_reads_setting_picks_the_mode_and_the_description_says_why() {
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let public: IpAddr = "0.0.0.0".parse().unwrap();
        assert!(matches!(
            Mode::new(None, local, true),
            Mode::ReadOnlyLoopback
        ));
        let off = Mode::new(None, local, false);
        assert!(off.is_off(), "{off:?}");
        assert!(
            off.describe().contains("admin_loopback_reads is false")
                && off.describe().contains("SIDECAR_ADMIN_TOKEN"),
            "{off:?}"
        );
        // A public listener without a token is off whatever the setting; the reason
        // given is the listener.
        for reads in [true, false] {
            let m = Mode::new(None, public, reads);
            assert!(matches!(m, Mode::Off), "{m:?}");
            assert!(m.describe().contains("not loopback"), "{m:?}");
        }
        let strict = token_mode_with(false);
        assert!(!strict.is_off() && !token_mode().is_off());
        assert!(
            strict.describe().contains("admin_loopback_reads is false"),
            "{strict:?}"
        );
        assert!(
            !token_mode().describe().contains("admin_loopback_reads"),
            "{:?}",
            token_mode()
        );
    }

    #[test]
    fn the_mode_never_shows_the_token() {
        for mode in [token_mode(), token_mode_with(false)] {
            let shown = format!("{mode:?} {}", mode.describe());
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }
}
