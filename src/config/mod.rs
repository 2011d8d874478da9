//! Typed configuration, parsed and validated once at start-up.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`) < environment (the
//! process environment over `.env`) < command-line flags. The merged [`Settings`] are
//! then turned into a [`Config`] whose fields can only hold valid values; every bad
//! value is reported as one [`ConfigError`] line naming the setting, the value and what
//! is accepted. Nothing after start-up reads a raw string or an environment variable.

mod origin;
mod redis;
mod settings;
mod source;
mod upstream;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::limiter::signal::Dialect;
use crate::limiter::{Margin, RetreatConfig};
use crate::priority::Priority;
use std::collections::HashMap;

pub use self::redis::{RedisConfig, RedisUrl};
pub use origin::{Origin, Origins};
pub use settings::{markdown_table, ParseSetting, SettingDoc, Settings, SETTINGS};
pub use source::{EnvSource, ProcessEnv};
pub use upstream::{Scheme, UpstreamUrl};

/// A configuration error: one line, naming the setting, the value and what is accepted.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {setting}={value:?}{at}: expected {expected}")]
    Invalid {
        /// The setting as the user wrote it: a key, a variable or a flag.
        setting: String,
        value: String,
        expected: String,
        /// Where it was written, when the name does not say (" (app.toml line 3)").
        at: String,
    },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path} (line {line}): {message}")]
    Toml {
        path: String,
        line: usize,
        message: String,
    },
    #[error("invalid .env file {path}: {reason}")]
    DotEnv { path: String, reason: String },
}

impl ConfigError {
    pub fn invalid(setting: impl Into<String>, value: impl ToString, expected: &str) -> Self {
        Self::Invalid {
            setting: setting.into(),
            value: value.to_string(),
            expected: expected.to_owned(),
            at: String::new(),
        }
    }

    /// The same error with its setting named as the user wrote it (see [`Origins`]).
    pub fn named(self, origins: &Origins) -> Self {
        match self {
            Self::Invalid {
                setting,
                value,
                expected,
                at,
            } if at.is_empty() => {
                let (setting, at) = origins.name(&setting);
                Self::Invalid {
                    setting,
                    value,
                    expected,
                    at,
                }
            }
            other => other,
        }
    }
}

/// A secret (API key, admin token). `Debug` and [`Secret::masked`] show 4 characters.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// `None` for an empty string: an empty key means "no key".
    pub fn new(value: String) -> Option<Self> {
        (!value.is_empty()).then_some(Self(value))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// First four characters followed by `****`; a secret of 8 characters or fewer
    /// shows none, since four would be half of it.
    pub fn masked(&self) -> String {
        if self.0.chars().count() <= 8 {
            return "****".to_owned();
        }
        let head: String = self.0.chars().take(4).collect();
        format!("{head}****")
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.masked())
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Client-facing server limits; each maps to a hyper builder setting or a check of ours.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_header_list_size: u32,
    pub keep_alive: bool,
}

/// How client connections share the connection cap (see `server::fairness`).
#[derive(Debug, Clone, Copy)]
pub struct Fairness {
    /// How long a new connection may stay silent before its first byte:
    /// `first_byte_timeout`, or the header read timeout when that is shorter.
    pub first_byte_timeout: Duration,
    /// Most connections open at once from one client address (`None`: no cap).
    pub max_connections_per_ip: Option<NonZeroUsize>,
}

impl Fairness {
    /// For a server without these settings (the simulated upstream): a silent
    /// connection lasts the header read timeout, and no address is capped.
    pub fn lenient(limits: &Limits) -> Self {
        Self {
            first_byte_timeout: limits.header_read_timeout,
            max_connections_per_ip: None,
        }
    }
}

/// Timeouts of the request path.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Arrival to response headers (queue wait included).
    pub request: Duration,
    pub connect: Duration,
    /// Longest silence inside a response body.
    pub stream_idle: Duration,
    pub shutdown_grace: Duration,
}

/// One upstream provider and the models routed to it.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub upstream: UpstreamUrl,
    pub api_key: Option<Secret>,
    pub rate_rpm: f64,
    pub bucket_capacity: u32,
    pub queue_max_size: usize,
    pub low_priority_timeout: Duration,
    /// Glob patterns (`*` wildcard) of the models routed here; empty: only as default.
    pub models: Vec<String>,
    pub fallback: Option<UpstreamUrl>,
    /// The window the provider counts requests in.
    pub window: Duration,
    /// The rate-limit header dialect the provider speaks.
    pub rate_limit_headers: Dialect,
    /// What a learned limit applies to.
    pub limit_scope: LimitScope,
    /// Name of the budget shared with other replicas through Redis (`budget` in the
    /// provider's table; default: the provider's name).
    pub budget: String,
}

/// What a learned limit (and its window guard) applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimitScope {
    /// The provider key as a whole.
    #[default]
    Key,
    /// Each model on its own, with the key's budget on top.
    Model,
}

impl LimitScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Model => "model",
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub workers: NonZeroUsize,
    pub log_level: tracing::Level,
    pub log_format: LogFormat,
    pub admin_token: Option<Secret>,
    /// Admin reads from a loopback peer need no token (`admin_loopback_reads`).
    pub admin_loopback_reads: bool,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub fairness: Fairness,
    pub fallback_enabled_passthrough: bool,
    pub ready_cache: Duration,
    /// Period of the dashboard snapshot publisher.
    pub snapshot_interval: Duration,
    pub providers: Vec<ProviderConfig>,
    /// Index into `providers` of the route for unmatched models.
    pub default_provider: usize,
    pub retreat: RetreatConfig,
    /// Re-queues of a request the upstream answered 429, before the 429 is passed on.
    pub upstream_429_retries: u32,
    /// Client bearer token → default priority (`X-Priority` overrides it).
    pub client_priorities: HashMap<String, Priority>,
    /// Extra CA certificates trusted for upstream TLS (from `upstream_ca_file`).
    pub upstream_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Window guard margin and probe interval, shared by the providers.
    pub margin: Margin,
    pub probe_interval: Duration,
    /// Where learned limits are kept across restarts.
    pub state_file: Option<std::path::PathBuf>,
    /// The Redis backend of the budgets shared across replicas; `None` (no URL): this
    /// replica paces alone.
    pub redis: Option<RedisConfig>,
    /// Where each setting was written, to name it in later errors as the user wrote it.
    pub origins: std::sync::Arc<Origins>,
}

/// One `[[providers]]` table of the TOML file; unset fields inherit the global settings.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub name: String,
    pub upstream_url: Option<String>,
    pub api_key: Option<String>,
    pub api_key_env: Option<String>,
    /// File holding the key (its first non-empty line).
    pub api_key_file: Option<String>,
    pub rate_rpm: Option<f64>,
    pub bucket_capacity: Option<u32>,
    pub queue_max_size: Option<usize>,
    pub low_priority_timeout: Option<f64>,
    #[serde(default)]
    pub models: Vec<String>,
    pub fallback_url: Option<String>,
    pub provider_window: Option<f64>,
    pub rate_limit_headers: Option<String>,
    pub limit_scope: Option<String>,
    /// Budget shared through Redis with the replicas that use the same name.
    pub budget: Option<String>,
}

/// The TOML file: global settings at the top level, then providers.
#[derive(Debug, Default, Clone)]
pub struct FileConfig {
    /// The file's path as given (empty: no file).
    pub path: String,
    /// The line of every key written in the file: `rate_rpm`, `providers[0].rate_rpm`.
    pub lines: HashMap<String, usize>,
    pub settings: Settings,
    pub providers: Vec<ProviderFile>,
    pub default_provider: Option<String>,
    pub client_priorities: std::collections::BTreeMap<String, String>,
}

impl FileConfig {
    /// Parses TOML text; `path` only names the file in errors, with the line.
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        let layout: settings::FileLayout = toml::from_str(text).map_err(|e| ConfigError::Toml {
            path: path.to_owned(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: explain_toml_error(e.message()),
        })?;
        let (_, mut file) = layout.split();
        file.path = path.to_owned();
        file.lines = key_lines(text);
        Ok(file)
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// A `SIDECAR_*` variable no setting reads (a typo, or a setting of another version):
/// the variable and the closest known one, if any is close.
pub fn unknown_variable(name: &str) -> Option<(String, Option<&'static str>)> {
    if !name.starts_with("SIDECAR_") || SETTINGS.iter().any(|s| s.env == name) {
        return None;
    }
    let closest = SETTINGS
        .iter()
        .map(|s| (strsim::damerau_levenshtein(name, s.env), s.env))
        .min()
        .filter(|(d, _)| *d <= 3)
        .map(|(_, env)| env);
    Some((name.to_owned(), closest))
}

/// The secrets given as command-line flags, which every user of the machine can read
/// (`ps`, `/proc/<pid>/cmdline`): each flag with the settings to use instead.
pub fn secret_flags(flags: &Settings) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if flags.upstream_api_key.is_some() {
        out.push((
            "--upstream-api-key",
            "SIDECAR_UPSTREAM_API_KEY_FILE or SIDECAR_UPSTREAM_API_KEY",
        ));
    }
    if flags.admin_token.is_some() {
        out.push((
            "--admin-token",
            "SIDECAR_ADMIN_TOKEN_FILE or SIDECAR_ADMIN_TOKEN",
        ));
    }
    out
}

/// Loads the configuration from all layers.
pub fn load(
    file: Option<&Path>,
    env: &dyn EnvSource,
    flags: Settings,
) -> Result<Config, ConfigError> {
    let file = match file {
        Some(p) => FileConfig::read(p)?,
        None => FileConfig::default(),
    };
    from_file(&file, env, flags)
}

/// Builds the configuration from an already parsed file: defaults < file < environment
/// < flags.
pub fn from_file(
    file: &FileConfig,
    env: &dyn EnvSource,
    flags: Settings,
) -> Result<Config, ConfigError> {
    let origins = Origins::new(file, env, &flags);
    let mut merged = Settings::defaults();
    merged.overlay(file.settings.clone());
    merged.overlay(Settings::from_env(env).map_err(|e| e.named(&origins))?);
    merged.overlay(flags);
    let mut config = Config::build(merged, file, env).map_err(|e| e.named(&origins))?;
    config.origins = std::sync::Arc::new(origins);
    Ok(config)
}

/// The TOML error on one line; an unknown key names the closest known one instead of
/// listing them all (serde's "unknown field `x`, expected one of `a`, `b`, ...").
fn explain_toml_error(message: &str) -> String {
    let message = message.replace('\n', " ");
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((unknown, known)) = rest.split_once('`') else {
        return message;
    };
    let known: Vec<&str> = known.split('`').skip(1).step_by(2).collect();
    let closest = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(unknown, k), *k))
        .min()
        .filter(|(d, k)| *d <= 3.max(k.len() / 3))
        .map(|(_, k)| k);
    match closest {
        Some(k) => format!("unknown key `{unknown}`: did you mean `{k}`?"),
        None => format!("unknown key `{unknown}` (known here: {})", known.join(", ")),
    }
}

/// The line of each key of the file that names a setting: the top-level keys, and
/// `providers[i].key` for the keys of the i-th `[[providers]]` table.
fn key_lines(text: &str) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    let Ok(doc) = toml_edit::ImDocument::parse(text) else {
        return out;
    };
    let mut add = |name: String, key: &toml_edit::Key| {
        if let Some(span) = key.span() {
            out.insert(name, line_of(text, span.start));
        }
    };
    for (name, item) in doc.as_table().iter() {
        if let Some((key, _)) = doc.as_table().get_key_value(name) {
            add(name.to_owned(), key);
        }
        if name != "providers" {
            continue;
        }
        for (i, table) in item.as_array_of_tables().into_iter().flatten().enumerate() {
            for (k, _) in table.iter() {
                if let Some((key, _)) = table.get_key_value(k) {
                    add(format!("providers[{i}].{k}"), key);
                }
            }
        }
    }
    out
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    let at = at.min(text.len());
    text.as_bytes()[..at]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

pub(crate) fn seconds(setting: &str, value: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && (0.001..=86_400.0).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::invalid(
            setting,
            value,
            "a number of seconds from 0.001 to 86400",
        ))
    }
}

fn snapshot_interval(value: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && (0.05..=60.0).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::invalid(
            "snapshot_interval",
            value,
            "a number of seconds from 0.05 to 60",
        ))
    }
}

pub(crate) fn rpm(setting: &str, value: f64) -> Result<f64, ConfigError> {
    if value.is_finite() && value > 0.0 && value <= 6_000_000.0 {
        Ok(value)
    } else {
        Err(ConfigError::invalid(
            setting,
            value,
            "requests per minute greater than 0 and at most 6000000",
        ))
    }
}

fn at_least<T: PartialOrd + std::fmt::Display + Copy>(
    setting: &str,
    value: T,
    min: T,
    expected: &str,
) -> Result<T, ConfigError> {
    if value >= min {
        Ok(value)
    } else {
        Err(ConfigError::invalid(setting, value, expected))
    }
}

fn listen_ip(value: &str) -> Result<IpAddr, ConfigError> {
    if value.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    value.parse().map_err(|_| {
        ConfigError::invalid(
            "listen_host",
            value,
            "an IP address such as 127.0.0.1, 0.0.0.0 or ::1 (or localhost)",
        )
    })
}

impl Config {
    /// Validates merged settings (every field `Some`, as after [`Settings::defaults`]).
    pub fn build(s: Settings, file: &FileConfig, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        // Every field was filled by `Settings::defaults()`, the lowest layer.
        macro_rules! get {
            ($f:ident) => {
                s.$f.clone().unwrap_or_default()
            };
        }
        let ip = listen_ip(&get!(listen_host))?;
        let listen = SocketAddr::new(ip, get!(listen_port));
        let metrics_listen = SocketAddr::new(ip, get!(metrics_port));
        if listen.port() != 0 && listen.port() == metrics_listen.port() {
            return Err(ConfigError::invalid(
                "metrics_port",
                metrics_listen.port(),
                "a port different from listen_port",
            ));
        }
        let workers = match get!(workers) {
            0 => std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            n if n <= 1024 => NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN),
            n => {
                return Err(ConfigError::invalid(
                    "workers",
                    n,
                    "0 (one per core) or a count up to 1024",
                ))
            }
        };
        let level_raw = get!(log_level);
        let log_level = level_raw.trim().parse::<tracing::Level>().map_err(|_| {
            ConfigError::invalid("log_level", &level_raw, "error, warn, info, debug or trace")
        })?;
        let format_raw = get!(log_format);
        let log_format = match format_raw.trim().to_ascii_lowercase().as_str() {
            "json" => LogFormat::Json,
            "pretty" | "text" => LogFormat::Pretty,
            _ => {
                return Err(ConfigError::invalid(
                    "log_format",
                    &format_raw,
                    "json or pretty",
                ))
            }
        };
        let timeouts = Timeouts {
            request: seconds("request_timeout", get!(request_timeout))?,
            connect: seconds("connect_timeout", get!(connect_timeout))?,
            stream_idle: seconds("stream_idle_timeout", get!(stream_idle_timeout))?,
            shutdown_grace: seconds("shutdown_grace", get!(shutdown_grace))?,
        };
        let limits = Limits {
            header_read_timeout: seconds("header_read_timeout", get!(header_read_timeout))?,
            max_headers: at_least(
                "max_headers",
                get!(max_headers),
                8,
                "an integer of at least 8",
            )?,
            max_header_bytes: at_least(
                "max_header_bytes",
                get!(max_header_bytes),
                1024,
                "an integer of at least 1024",
            )?,
            max_body_bytes: at_least(
                "max_body_bytes",
                get!(max_body_bytes),
                1024,
                "an integer of at least 1024",
            )?,
            max_connections: at_least(
                "max_connections",
                get!(max_connections),
                1,
                "an integer of at least 1",
            )?,
            h2_max_concurrent_streams: at_least(
                "h2_max_concurrent_streams",
                get!(h2_max_concurrent_streams),
                1,
                "an integer of at least 1",
            )?,
            h2_max_header_list_size: at_least(
                "h2_max_header_list_size",
                get!(h2_max_header_list_size),
                1024,
                "an integer of at least 1024",
            )?,
            keep_alive: get!(keep_alive),
        };
        let fairness = Fairness {
            first_byte_timeout: seconds("first_byte_timeout", get!(first_byte_timeout))?
                .min(limits.header_read_timeout),
            max_connections_per_ip: match get!(max_connections_per_ip) {
                n if n <= limits.max_connections => NonZeroUsize::new(n),
                n => {
                    return Err(ConfigError::invalid(
                        "max_connections_per_ip",
                        n,
                        "0 (no cap) or an integer up to max_connections",
                    ))
                }
            },
        };

        let global_key = secret_or_file(
            ("upstream_api_key", get!(upstream_api_key)),
            ("upstream_api_key_file", get!(upstream_api_key_file)),
        )?
        .or_else(|| env.var("NVIDIA_API_KEY").and_then(Secret::new));
        let admin_token = secret_or_file(
            ("admin_token", get!(admin_token)),
            ("admin_token_file", get!(admin_token_file)),
        )?;
        let inherit = ProviderFile {
            name: "nvidia".into(),
            upstream_url: Some(get!(upstream_url)),
            rate_rpm: Some(get!(rate_rpm)),
            bucket_capacity: Some(get!(bucket_capacity)),
            queue_max_size: Some(get!(queue_max_size)),
            low_priority_timeout: Some(get!(low_priority_timeout)),
            provider_window: Some(get!(provider_window)),
            rate_limit_headers: Some(get!(rate_limit_headers)),
            limit_scope: Some(get!(limit_scope)),
            models: vec!["*".into()],
            ..ProviderFile::default()
        };
        let (providers, default_provider) = if file.providers.is_empty() {
            let p = provider(&inherit, &inherit, global_key.clone(), "", env)?;
            if let Some(name) = file.default_provider.as_deref().filter(|n| *n != p.name) {
                return Err(ConfigError::invalid(
                    "default_provider",
                    name,
                    "the name of a [[providers]] entry (none declared; the implicit one is \"nvidia\")",
                ));
            }
            (vec![p], 0)
        } else {
            let mut out: Vec<ProviderConfig> = Vec::with_capacity(file.providers.len());
            for (i, raw) in file.providers.iter().enumerate() {
                let prefix = format!("providers[{i}].");
                let p = provider(raw, &inherit, None, &prefix, env)?;
                if out.iter().any(|o| o.name == p.name) {
                    return Err(ConfigError::invalid(
                        format!("{prefix}name"),
                        &p.name,
                        "a name no other provider uses",
                    ));
                }
                out.push(p);
            }
            let default = match &file.default_provider {
                None => 0,
                Some(name) => out.iter().position(|p| &p.name == name).ok_or_else(|| {
                    let names: Vec<&str> = out.iter().map(|p| p.name.as_str()).collect();
                    ConfigError::invalid(
                        "default_provider",
                        name,
                        &format!("one of the declared providers: {}", names.join(", ")),
                    )
                })?,
            };
            (out, default)
        };

        let fraction = |setting: &str, v: f64, open_top: bool| {
            let ok = v.is_finite() && v > 0.0 && if open_top { v < 1.0 } else { v <= 1.0 };
            if ok {
                Ok(v)
            } else {
                Err(ConfigError::invalid(
                    setting,
                    v,
                    if open_top {
                        "a fraction greater than 0 and less than 1"
                    } else {
                        "a fraction greater than 0 and at most 1"
                    },
                ))
            }
        };
        let retreat = RetreatConfig {
            decrease_factor: fraction("retreat_factor", get!(retreat_factor), true)?,
            floor_fraction: fraction("retreat_floor", get!(retreat_floor), false)?,
            quiet_period: seconds("retreat_quiet_period", get!(retreat_quiet_period))?,
            recovery_step: fraction("recovery_step", get!(recovery_step), false)?,
            recovery_interval: seconds("recovery_interval", get!(recovery_interval))?,
            default_pause: seconds("retreat_default_pause", get!(retreat_default_pause))?,
        };
        let upstream_429_retries = get!(upstream_429_retries);
        if upstream_429_retries > 100 {
            return Err(ConfigError::invalid(
                "upstream_429_retries",
                upstream_429_retries,
                "an integer from 0 to 100",
            ));
        }
        let mut client_priorities = HashMap::new();
        for (key, value) in &file.client_priorities {
            let p = Priority::parse(value.as_bytes()).map_err(|_| {
                ConfigError::invalid(
                    format!("client_priorities[{:?}]", Secret(key.clone()).masked()),
                    value,
                    "high, normal or low (or 0, 1, 2)",
                )
            })?;
            client_priorities.insert(key.clone(), p);
        }

        let upstream_ca = match get!(upstream_ca_file).as_str() {
            "" => Vec::new(),
            path => {
                use rustls::pki_types::pem::PemObject;
                let certs: Result<Vec<_>, _> =
                    rustls::pki_types::CertificateDer::pem_file_iter(path)
                        .and_then(|it| it.collect());
                match certs {
                    Ok(c) if !c.is_empty() => c,
                    _ => {
                        return Err(ConfigError::invalid(
                            "upstream_ca_file",
                            path,
                            "a readable PEM file with at least one CERTIFICATE",
                        ))
                    }
                }
            }
        };

        let margin = Margin {
            fraction: {
                let v = get!(window_margin);
                if v.is_finite() && (0.0..0.5).contains(&v) {
                    v
                } else {
                    return Err(ConfigError::invalid(
                        "window_margin",
                        v,
                        "a fraction from 0 to less than 0.5 of the provider window",
                    ));
                }
            },
            floor: {
                let v = get!(window_margin_floor);
                if v.is_finite() && (0.0..=60.0).contains(&v) {
                    Duration::from_secs_f64(v)
                } else {
                    return Err(ConfigError::invalid(
                        "window_margin_floor",
                        v,
                        "a number of seconds from 0 to 60",
                    ));
                }
            },
        };
        let state_file = match get!(state_file).trim() {
            "" => None,
            path => {
                let p = std::path::PathBuf::from(path);
                let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
                if dir.is_some_and(|d| !d.is_dir()) || p.is_dir() {
                    return Err(ConfigError::invalid(
                        "state_file",
                        path,
                        "a file path in an existing directory (the file is created when a limit is learned)",
                    ));
                }
                Some(p)
            }
        };

        let redis = self::redis::RedisSettings {
            url: get!(redis_url),
            url_file: get!(redis_url_file),
            password_file: get!(redis_password_file),
            prefix: get!(redis_prefix),
            timeout: get!(redis_timeout),
            replicas: get!(redis_replicas),
            fallback_for: get!(redis_fallback_for),
        }
        .build()?;
        if redis.is_some() {
            // The shared budget is per key: per-model scopes are not shared (yet).
            let declared = !file.providers.is_empty();
            for (i, p) in providers.iter().enumerate() {
                if p.limit_scope == LimitScope::Model {
                    let setting = if declared {
                        format!("providers[{i}].limit_scope")
                    } else {
                        "limit_scope".to_owned()
                    };
                    return Err(ConfigError::invalid(
                        setting,
                        p.limit_scope.as_str(),
                        "key (limit_scope = \"model\" is not shared across replicas; unset redis_url or use key)",
                    ));
                }
            }
        }

        Ok(Config {
            origins: Default::default(),
            redis,
            margin,
            probe_interval: seconds("probe_interval", get!(probe_interval))?,
            state_file,
            upstream_ca,
            retreat,
            upstream_429_retries,
            client_priorities,
            listen,
            metrics_listen,
            workers,
            log_level,
            log_format,
            admin_token,
            admin_loopback_reads: get!(admin_loopback_reads),
            timeouts,
            limits,
            fairness,
            fallback_enabled_passthrough: get!(fallback_enabled_passthrough),
            ready_cache: seconds("ready_cache", get!(ready_cache))?,
            snapshot_interval: snapshot_interval(get!(snapshot_interval))?,
            providers,
            default_provider,
        })
    }

    /// The provider for unmatched models.
    pub fn default_provider(&self) -> &ProviderConfig {
        &self.providers[self.default_provider]
    }
}

/// A secret given either inline or as a file holding it (its first non-empty line, the
/// Docker and Kubernetes secrets convention); both at once is an error, as is a file that
/// cannot be read or holds no such line.
fn secret_or_file(
    (key, value): (&str, String),
    (file_key, path): (&str, String),
) -> Result<Option<Secret>, ConfigError> {
    let path = path.trim();
    if path.is_empty() {
        return Ok(Secret::new(value));
    }
    if !value.is_empty() {
        return Err(ConfigError::invalid(
            file_key,
            path,
            &format!("either {key} or {file_key}, not both"),
        ));
    }
    match self::redis::first_line(path) {
        Ok(Some(line)) => Ok(Secret::new(line)),
        Ok(None) => Err(ConfigError::invalid(
            file_key,
            path,
            "a file whose first non-empty line is the secret (this one is empty)",
        )),
        Err(e) => Err(ConfigError::invalid(
            file_key,
            path,
            &format!("a readable file holding the secret ({e})"),
        )),
    }
}

/// Validates one provider; unset fields come from `inherit` (the global settings).
fn provider(
    raw: &ProviderFile,
    inherit: &ProviderFile,
    implicit_key: Option<Secret>,
    prefix: &str,
    env: &dyn EnvSource,
) -> Result<ProviderConfig, ConfigError> {
    let name = raw.name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ConfigError::invalid(
            format!("{prefix}name"),
            name,
            "a non-empty name of letters, digits, '-', '_' or '.'",
        ));
    }
    let key_setting = format!("{prefix}upstream_url");
    let url = raw
        .upstream_url
        .as_deref()
        .or(inherit.upstream_url.as_deref())
        .unwrap_or_default();
    let upstream =
        UpstreamUrl::parse(url).map_err(|e| ConfigError::invalid(&key_setting, url, e))?;
    let fallback = match &raw.fallback_url {
        None => None,
        Some(u) => Some(
            UpstreamUrl::parse(u)
                .map_err(|e| ConfigError::invalid(format!("{prefix}fallback_url"), u, e))?,
        ),
    };
    let given = [
        raw.api_key.is_some(),
        raw.api_key_env.is_some(),
        raw.api_key_file.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        let (key, value) = match &raw.api_key_file {
            Some(f) => ("api_key_file", f.as_str()),
            None => (
                "api_key_env",
                raw.api_key_env.as_deref().unwrap_or_default(),
            ),
        };
        return Err(ConfigError::invalid(
            format!("{prefix}{key}"),
            value,
            "one of api_key, api_key_env or api_key_file, not several",
        ));
    }
    let api_key = match (&raw.api_key, &raw.api_key_env, &raw.api_key_file) {
        (_, _, Some(path)) => secret_or_file(
            (&format!("{prefix}api_key"), String::new()),
            (&format!("{prefix}api_key_file"), path.clone()),
        )?,
        (Some(k), _, None) => Secret::new(k.clone()),
        (None, Some(var), None) => match env.var(var).and_then(Secret::new) {
            Some(k) => Some(k),
            None => {
                return Err(ConfigError::invalid(
                    format!("{prefix}api_key_env"),
                    var,
                    "the name of an environment variable that is set and not empty",
                ))
            }
        },
        (None, None, None) => implicit_key,
    };
    let pick = |own: Option<f64>, inh: Option<f64>| own.or(inh).unwrap_or_default();
    let rate_rpm = rpm(
        &format!("{prefix}rate_rpm"),
        pick(raw.rate_rpm, inherit.rate_rpm),
    )?;
    let bucket_capacity = at_least(
        &format!("{prefix}bucket_capacity"),
        raw.bucket_capacity.or(inherit.bucket_capacity).unwrap_or(1),
        1,
        "an integer of at least 1",
    )?;
    let queue_max_size = raw
        .queue_max_size
        .or(inherit.queue_max_size)
        .unwrap_or_default();
    if queue_max_size > 1_000_000 {
        return Err(ConfigError::invalid(
            format!("{prefix}queue_max_size"),
            queue_max_size,
            "an integer from 0 to 1000000",
        ));
    }
    let low_priority_timeout = seconds(
        &format!("{prefix}low_priority_timeout"),
        pick(raw.low_priority_timeout, inherit.low_priority_timeout),
    )?;
    let window = seconds(
        &format!("{prefix}provider_window"),
        pick(raw.provider_window, inherit.provider_window),
    )?;
    let dialect_raw = raw
        .rate_limit_headers
        .as_deref()
        .or(inherit.rate_limit_headers.as_deref())
        .unwrap_or("openai");
    let rate_limit_headers = Dialect::parse(dialect_raw).ok_or_else(|| {
        ConfigError::invalid(
            format!("{prefix}rate_limit_headers"),
            dialect_raw,
            "openai or none",
        )
    })?;
    let scope_raw = raw
        .limit_scope
        .as_deref()
        .or(inherit.limit_scope.as_deref())
        .unwrap_or("key");
    let limit_scope = match scope_raw.trim().to_ascii_lowercase().as_str() {
        "key" => LimitScope::Key,
        "model" => LimitScope::Model,
        _ => {
            return Err(ConfigError::invalid(
                format!("{prefix}limit_scope"),
                scope_raw,
                "key or model",
            ))
        }
    };
    let budget = raw.budget.as_deref().unwrap_or(name);
    if !(1..=128).contains(&budget.len())
        || !budget
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(ConfigError::invalid(
            format!("{prefix}budget"),
            budget,
            "1 to 128 letters, digits, '.', '_' or '-'",
        ));
    }
    for m in &raw.models {
        if m.trim().is_empty() || m.chars().any(char::is_whitespace) {
            return Err(ConfigError::invalid(
                format!("{prefix}models"),
                m,
                "model patterns without spaces, '*' as wildcard (e.g. \"meta/*\")",
            ));
        }
    }
    Ok(ProviderConfig {
        name: name.to_owned(),
        upstream,
        api_key,
        rate_rpm,
        bucket_capacity,
        queue_max_size,
        low_priority_timeout,
        models: raw.models.clone(),
        fallback,
        window,
        rate_limit_headers,
        limit_scope,
        budget: budget.to_owned(),
    })
}

#[cfg(test)]
mod tests;
