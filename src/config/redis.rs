//! The Redis backend of the budget shared across replicas: its URL (validated once,
//! printed only masked) and the settings that go with it.
//!
//! The URL is `redis://[user:password@]host[:port][/db]` or `rediss://` (TLS). It can
//! come from `redis_url`, from the file named by `redis_url_file` (which wins) and its
//! password from the file named by `redis_password_file`. No URL: `Config.redis` is
//! `None` and the sidecar paces alone, as before.

use std::fmt;
use std::net::Ipv6Addr;
use std::time::Duration;

use super::error::ConfigError;
use super::secret::first_line;
use super::settings::Merged;
use super::validate::{count_in, seconds_in, Range};

/// What a Redis URL may look like, as every URL error says.
pub const URL_EXPECTED: &str = "redis://[user:password@]host[:port][/db] or rediss://... for TLS, \
     e.g. redis://:password@redis:6379/0 (port 1-65535, db a non-negative integer, \
     special characters of the password percent-encoded)";
const USER_NEEDS_PASSWORD: &str =
    "user:password@ or :password@ before the host (a user alone needs redis_password_file)";
const NO_QUERY: &str =
    "a URL without ?query or #fragment: redis://[user:password@]host[:port][/db]";
const NO_WILDCARD: &str =
    "a host to connect to, not the wildcard address 0.0.0.0 or [::] (e.g. redis://127.0.0.1:6379)";
/// Shown instead of a value that may hold a password and cannot be masked reliably.
pub const REDACTED: &str = "<redacted>";

/// The backend of the shared budget (`Config.redis`).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    pub url: RedisUrl,
    /// Prefix of every key.
    pub prefix: String,
    /// Longest any Redis call may take before the replica treats Redis as down.
    pub timeout: Duration,
    /// Replicas assumed while Redis is down by a replica that never saw the cluster.
    pub replicas: u32,
    /// How long a replica cut off from Redis keeps sending on its fallback share.
    pub fallback_for: Duration,
}

/// A validated Redis URL. `Debug` and `Display` show only [`RedisUrl::masked`].
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// The whole URL, password included (normalised: port and db always written).
    full: String,
    /// The same with the password replaced by `****`.
    masked: String,
    tls: bool,
    /// The user as written (percent-encoded), empty for none.
    user: String,
    /// Host as written; an IPv6 address without its brackets.
    host: String,
    port: u16,
    db: u32,
}

/// The pieces of a Redis URL, split but not yet validated.
struct Parts<'a> {
    tls: bool,
    user: &'a str,
    /// Percent-encoded, as in the URL.
    password: Option<String>,
    host: &'a str,
    port: Option<&'a str>,
    db: Option<&'a str>,
    query_or_fragment: bool,
}

impl<'a> Parts<'a> {
    fn split(raw: &'a str) -> Result<Self, &'static str> {
        let (scheme, rest) = raw.split_once("://").ok_or(URL_EXPECTED)?;
        let tls = match scheme {
            "redis" => false,
            "rediss" => true,
            _ => return Err(URL_EXPECTED),
        };
        // As the WHATWG parser (the `url` crate, which the client uses) does: the
        // authority ends at the first '/', '?' or '#', and its last '@' ends the userinfo.
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (userinfo, hostport) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (user, password) = match userinfo {
            None => ("", None),
            Some(u) => match u.split_once(':') {
                Some((user, pw)) => (user, Some(pw.to_owned())),
                None => (u, None),
            },
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (inside, after) = v6.split_once(']').ok_or(URL_EXPECTED)?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or(URL_EXPECTED)?),
            };
            (inside, port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        let (path, query_or_fragment) = match tail.find(['?', '#']) {
            Some(i) => (&tail[..i], true),
            None => (tail, false),
        };
        let db = match path {
            "" | "/" => None,
            p => Some(&p[1..]),
        };
        Ok(Self {
            tls,
            user,
            password,
            host,
            port,
            db,
            query_or_fragment,
        })
    }

    fn validate(self) -> Result<RedisUrl, &'static str> {
        if self.query_or_fragment {
            return Err(NO_QUERY);
        }
        let ipv6 = self.host.parse::<Ipv6Addr>().ok();
        let host_ok = ipv6.is_some()
            || (!self.host.is_empty()
                && self
                    .host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)));
        if !host_ok {
            return Err(URL_EXPECTED);
        }
        if self.host == "0.0.0.0" || ipv6.is_some_and(|a| a.is_unspecified()) {
            return Err(NO_WILDCARD);
        }
        let port = match self.port {
            None => 6379,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n >= 1 && p.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(URL_EXPECTED),
            },
        };
        let db = match self.db {
            None => 0,
            Some(d) => match d.parse::<u32>() {
                Ok(n) if d.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(URL_EXPECTED),
            },
        };
        if !userinfo_ok(self.user) {
            return Err(URL_EXPECTED);
        }
        match &self.password {
            None if !self.user.is_empty() => return Err(USER_NEEDS_PASSWORD),
            Some(pw) if pw.is_empty() => return Err(USER_NEEDS_PASSWORD),
            Some(pw) if !userinfo_ok(pw) => return Err(URL_EXPECTED),
            _ => {}
        }
        let url = RedisUrl::assemble(
            self.tls,
            self.user,
            self.password.as_deref(),
            self.host,
            port,
            db,
        );
        url.confirm_with_client(self.password.is_some())?;
        Ok(url)
    }
}

/// A user or password as it may appear in the URL: printable, no space, no `@ / ? #`,
/// every `%` starting a `%XX` escape.
fn userinfo_ok(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if i + 2 >= b.len()
                    || !(b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit())
                {
                    return false;
                }
                i += 3;
                continue;
            }
            c if c.is_ascii_control() || c == b' ' || b"@/?#[]".contains(&c) => return false,
            _ => {}
        }
        i += 1;
    }
    true
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl RedisUrl {
    /// Validates `raw` (surrounding whitespace ignored); the error says what is accepted.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        Parts::split(raw.trim())?.validate()
    }

    /// `raw` with its password replaced by `password` (taken literally, encoded here).
    /// Unlike [`RedisUrl::parse`], a user without a password is accepted in `raw`.
    pub fn parse_with_password(raw: &str, password: &str) -> Result<Self, &'static str> {
        let mut parts = Parts::split(raw.trim())?;
        parts.password = Some(encode(password));
        parts.validate()
    }

    fn assemble(
        tls: bool,
        user: &str,
        password: Option<&str>,
        host: &str,
        port: u16,
        db: u32,
    ) -> Self {
        let scheme = if tls { "rediss" } else { "redis" };
        let bracketed = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        let (full, masked) = match password {
            Some(pw) => (
                format!("{scheme}://{user}:{pw}@{bracketed}:{port}/{db}"),
                format!("{scheme}://{user}:****@{bracketed}:{port}/{db}"),
            ),
            None => {
                let u = format!("{scheme}://{bracketed}:{port}/{db}");
                (u.clone(), u)
            }
        };
        Self {
            full,
            masked,
            tls,
            user: user.to_owned(),
            host: host.to_owned(),
            port,
            db,
        }
    }

    /// The redis client must read the URL as we do.
    fn confirm_with_client(&self, has_password: bool) -> Result<(), &'static str> {
        use ::redis::{ConnectionAddr, IntoConnectionInfo};
        let info = self
            .full
            .as_str()
            .into_connection_info()
            .map_err(|_| URL_EXPECTED)?;
        let (host, port, tls) = match info.addr() {
            ConnectionAddr::Tcp(h, p) => (h, *p, false),
            ConnectionAddr::TcpTls { host, port, .. } => (host, *port, true),
            _ => return Err(URL_EXPECTED),
        };
        let same_host = match (host.parse::<Ipv6Addr>(), self.host.parse::<Ipv6Addr>()) {
            (Ok(a), Ok(b)) => a == b,
            _ => *host == self.host,
        };
        let r = info.redis_settings();
        let same = same_host
            && port == self.port
            && tls == self.tls
            && r.db() == i64::from(self.db)
            && r.password().is_some() == has_password;
        same.then_some(()).ok_or(URL_EXPECTED)
    }

    /// The whole URL, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.full
    }

    /// `redis://user:****@host:6379/0`: the password replaced, nothing else hidden.
    pub fn masked(&self) -> &str {
        &self.masked
    }

    /// `rediss://`: TLS (rustls).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host, an IPv6 address without brackets (the TLS server name).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn db(&self) -> u32 {
        self.db
    }

    /// The same URL with `password` (taken literally, encoded here) as its password;
    /// the user is kept.
    pub fn with_password(&self, password: &str) -> Self {
        Self::assemble(
            self.tls,
            &self.user,
            Some(&encode(password)),
            &self.host,
            self.port,
            self.db,
        )
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked)
    }
}

/// A possibly malformed URL as an error may show it: everything up to the last `@`
/// after the scheme is replaced by `****`, and so is a query or fragment; without a
/// recognisable `scheme://`, [`REDACTED`].
pub fn mask_raw(raw: &str) -> String {
    let raw = raw.trim();
    let Some((scheme, rest)) = raw.split_once("://") else {
        return REDACTED.to_owned();
    };
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if !scheme_ok {
        return REDACTED.to_owned();
    }
    let rest = match rest.rfind('@') {
        Some(at) => format!("****@{}", &rest[at + 1..]),
        None => rest.to_owned(),
    };
    match rest.find(['?', '#']) {
        Some(i) => format!("{scheme}://{}{}****", &rest[..i], &rest[i..=i]),
        None => format!("{scheme}://{rest}"),
    }
}

/// Validates every Redis setting (also without a URL, so a typo shows at once);
/// `None` when no URL is set.
pub(super) fn build(s: &Merged) -> Result<Option<RedisConfig>, ConfigError> {
    let prefix = s.redis_prefix.clone();
    let prefix_ok = (1..=64).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
    if !prefix_ok {
        return Err(ConfigError::invalid(
            "redis_prefix",
            &prefix,
            "1 to 64 printable ASCII characters without spaces, '{' or '}'",
        ));
    }
    let timeout = seconds_in(
        "redis_timeout",
        s.redis_timeout,
        Range::Seconds {
            min: 0.01,
            max: 5.0,
        },
    )?;
    let replicas = count_in(
        "redis_replicas",
        s.redis_replicas,
        Range::Integer { min: 1, max: 1000 },
    )?;
    let fallback_for = seconds_in(
        "redis_fallback_for",
        s.redis_fallback_for,
        Range::Seconds {
            min: 1.0,
            max: 3600.0,
        },
    )?;

    // Where the URL comes from: the file wins over the setting.
    let (raw, source) = match s.redis_url_file.trim() {
        "" => (s.redis_url.trim().to_owned(), "redis_url"),
        path => {
            let name = "redis_url_file";
            const EXPECTED: &str = "a readable file whose first non-empty line is the Redis URL";
            match first_line(path) {
                Ok(Some(line)) => (line, name),
                Ok(None) => return Err(ConfigError::invalid(name, path, EXPECTED)),
                Err(e) => return Err(ConfigError::unreadable(name, path, EXPECTED, e)),
            }
        }
    };
    let password = match s.redis_password_file.trim() {
        "" => None,
        path => {
            let name = "redis_password_file";
            const EXPECTED: &str =
                "a readable file whose first non-empty line is the Redis password";
            match first_line(path) {
                Ok(Some(pw)) => Some(pw),
                Ok(None) => return Err(ConfigError::invalid(name, path, EXPECTED)),
                Err(e) => return Err(ConfigError::unreadable(name, path, EXPECTED, e)),
            }
        }
    };
    if raw.is_empty() {
        return Ok(None);
    }
    let url = match &password {
        None => RedisUrl::parse(&raw),
        Some(pw) => RedisUrl::parse_with_password(&raw, pw),
    }
    .map_err(|expected| ConfigError::invalid(source, mask_raw(&raw), expected))?;
    Ok(Some(RedisConfig {
        url,
        prefix,
        timeout,
        replicas,
        fallback_for,
    }))
}
