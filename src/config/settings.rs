//! The one list of global settings.
//!
//! `settings!` expands the table below into things that therefore cannot drift apart:
//! [`Settings`] (all-`Option` fields, deserialised from the TOML file and filled from
//! command-line flags by clap), [`Merged`] (every field set, what validation reads),
//! [`Settings::from_env`] (the environment layer) and [`SETTINGS`] (name, variable,
//! default and meaning, used by the README table test and `.env.example` check).

use super::error::ConfigError;
use super::source::EnvSource;

/// How one setting is documented: derived from the same table as the struct.
#[derive(Debug, Clone, Copy)]
pub struct SettingDoc {
    pub key: &'static str,
    pub env: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Parses an environment string into a setting's value; the error says what is accepted.
pub trait ParseSetting: Sized {
    fn parse_setting(raw: &str) -> Result<Self, &'static str>;
}

impl ParseSetting for String {
    fn parse_setting(raw: &str) -> Result<Self, &'static str> {
        Ok(raw.to_owned())
    }
}

impl ParseSetting for bool {
    fn parse_setting(raw: &str) -> Result<Self, &'static str> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            _ => Err("true or false (also 1/0, yes/no, on/off)"),
        }
    }
}

macro_rules! parse_number {
    ($($t:ty => $what:literal),* $(,)?) => {$(
        impl ParseSetting for $t {
            fn parse_setting(raw: &str) -> Result<Self, &'static str> {
                raw.trim().parse::<$t>().map_err(|_| $what)
            }
        }
    )*};
}
parse_number!(u16 => "an integer from 0 to 65535", u32 => "a non-negative integer", u64 => "a non-negative integer", usize => "a non-negative integer", f64 => "a number");

macro_rules! settings {
    ($( $(#[doc = $help:literal])+ $key:ident : $ty:ty = $default:literal, env $env:literal; )*) => {
        /// Global settings as read from one layer: `None` means "not set here".
        #[derive(Debug, Default, Clone, serde::Deserialize, clap::Args)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $(
                $(#[doc = $help])+
                #[arg(long, value_name = "VALUE")]
                pub $key: Option<$ty>,
            )*
        }

        /// Every setting after all layers: the defaults fill what no layer set.
        #[derive(Debug, Clone)]
        pub struct Merged {
            $(
                $(#[doc = $help])+
                pub $key: $ty,
            )*
        }

        /// The TOML file as written: the global settings at the top level, then the
        /// providers (`P`, one `[[providers]]` table). Deserialised straight from the
        /// text so every error has a position.
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct FileLayout<P> {
            $( $key: Option<$ty>, )*
            #[serde(default = "Vec::new")]
            pub providers: Vec<P>,
            pub default_provider: Option<String>,
            /// Client key (the bearer token the app sends) → default priority.
            #[serde(default)]
            pub client_priorities: std::collections::BTreeMap<String, String>,
        }

        impl<P> FileLayout<P> {
            /// Takes the global settings out of the file, leaving the rest.
            pub fn take_settings(&mut self) -> Settings {
                Settings { $( $key: self.$key.take(), )* }
            }
        }

        /// Every global setting with its variable, default and meaning.
        pub const SETTINGS: &[SettingDoc] = &[
            $(SettingDoc {
                key: stringify!($key),
                env: $env,
                default: $default,
                help: concat!($($help),+),
            },)*
        ];

        impl Settings {
            /// Every setting at its documented default (parsed from [`SETTINGS`]).
            pub fn defaults() -> Settings {
                Settings {
                    $($key: Some(<$ty as ParseSetting>::parse_setting($default)
                        .expect(concat!("default of ", stringify!($key), " parses"))),)*
                }
            }

            /// The value of every setting: this layer's, else the type's default (a
            /// layer over [`Settings::defaults`] sets every one).
            pub fn merged(self) -> Merged {
                Merged { $( $key: self.$key.unwrap_or_default(), )* }
            }

            /// The keys this layer sets.
            pub fn set_keys(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $( if self.$key.is_some() { out.push(stringify!($key)); } )*
                out
            }

            /// Overlay `other`'s set values onto `self` (later layer wins).
            pub fn overlay(&mut self, other: Settings) {
                $( if other.$key.is_some() { self.$key = other.$key; } )*
            }

            /// Read every setting's variable from `env`.
            pub fn from_env(env: &dyn EnvSource) -> Result<Settings, ConfigError> {
                let mut out = Settings::default();
                $(
                    if let Some(raw) = env.var($env) {
                        out.$key = Some(<$ty as ParseSetting>::parse_setting(&raw).map_err(|expected| {
                            ConfigError::invalid($env, &raw, expected)
                        })?);
                    }
                )*
                Ok(out)
            }
        }
    };
}

settings! {
    /// Address the proxy listens on.
    listen_host: String = "127.0.0.1", env "SIDECAR_LISTEN_HOST";
    /// Port the proxy listens on (0 picks a free port).
    listen_port: u16 = "8080", env "SIDECAR_LISTEN_PORT";
    /// Port of the Prometheus metrics listener (on the listen host).
    metrics_port: u16 = "9090", env "SIDECAR_METRICS_PORT";
    /// Upstream base URL including /v1, as an OpenAI SDK's base_url; /v1/<rest> maps to <url>/<rest>.
    upstream_url: String = "https://integrate.api.nvidia.com/v1", env "SIDECAR_UPSTREAM_URL";
    /// Provider API key injected as Authorization: Bearer (falls back to NVIDIA_API_KEY).
    upstream_api_key: String = "", env "SIDECAR_UPSTREAM_API_KEY";
    /// File holding the provider API key (its first non-empty line): the Docker and Kubernetes secrets convention; not together with upstream_api_key.
    upstream_api_key_file: String = "", env "SIDECAR_UPSTREAM_API_KEY_FILE";
    /// PEM file of extra CA certificates trusted for upstream TLS, besides the webpki roots.
    upstream_ca_file: String = "", env "SIDECAR_UPSTREAM_CA_FILE";
    /// Requests per minute sent to the upstream at most: the ceiling (above 0, at most 6000000). The sidecar paces at the provider's learned limit when that is lower.
    rate_rpm: f64 = "40", env "SIDECAR_RATE_RPM";
    /// Token bucket capacity: the largest burst admitted after an idle period (1 to 1000000).
    bucket_capacity: u32 = "1", env "SIDECAR_BUCKET_CAPACITY";
    /// Seconds a request may take from arrival to response headers, queue wait included (0.001 to 86400).
    request_timeout: f64 = "120", env "SIDECAR_REQUEST_TIMEOUT";
    /// Most requests waiting for a token per provider, all priorities together (0 to 1000000).
    queue_max_size: usize = "64", env "SIDECAR_QUEUE_MAX_SIZE";
    /// Seconds a low-priority request may wait in the queue before it is dropped (0.001 to 86400).
    low_priority_timeout: f64 = "30", env "SIDECAR_LOW_PRIORITY_TIMEOUT";
    /// Send requests the queue cannot take to the fallback upstream (or unmetered) instead of refusing them.
    fallback_enabled_passthrough: bool = "false", env "SIDECAR_FALLBACK_ENABLED_PASSTHROUGH";
    /// Log level: error, warn, info, debug or trace.
    log_level: String = "info", env "SIDECAR_LOG_LEVEL";
    /// Log format: json (one object per line) or pretty.
    log_format: String = "json", env "SIDECAR_LOG_FORMAT";
    /// Bearer token for the admin API (empty: admin writes disabled).
    admin_token: String = "", env "SIDECAR_ADMIN_TOKEN";
    /// File holding the admin token (its first non-empty line); not together with admin_token.
    admin_token_file: String = "", env "SIDECAR_ADMIN_TOKEN_FILE";
    /// Admin reads from a loopback peer need no token. Set false when clients reach the sidecar through a proxy on the same host (they all look local), or to test the dashboard as a remote user would.
    admin_loopback_reads: bool = "true", env "SIDECAR_ADMIN_LOOPBACK_READS";
    /// Worker threads, each with its own runtime, listener and upstream pool (0: one per core).
    workers: usize = "0", env "SIDECAR_WORKERS";
    /// Seconds allowed to open a TCP (and TLS) connection to the upstream.
    connect_timeout: f64 = "10", env "SIDECAR_CONNECT_TIMEOUT";
    /// Seconds a response stream may stay silent before it is ended as an error.
    stream_idle_timeout: f64 = "120", env "SIDECAR_STREAM_IDLE_TIMEOUT";
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    shutdown_grace: f64 = "20", env "SIDECAR_SHUTDOWN_GRACE";
    /// Seconds a client may take to send a request's headers (HTTP/1.1); also how long an idle keep-alive connection stays open.
    header_read_timeout: f64 = "10", env "SIDECAR_HEADER_READ_TIMEOUT";
    /// Seconds a new connection may stay silent before its first byte (the header read timeout when shorter). Near max_connections the oldest silent connections are closed first to make room.
    first_byte_timeout: f64 = "5", env "SIDECAR_FIRST_BYTE_TIMEOUT";
    /// Most request headers accepted (431 above).
    max_headers: usize = "100", env "SIDECAR_MAX_HEADERS";
    /// Most bytes of request header names and values together (431 above).
    max_header_bytes: usize = "32768", env "SIDECAR_MAX_HEADER_BYTES";
    /// Most bytes in a request body (413 above).
    max_body_bytes: usize = "16777216", env "SIDECAR_MAX_BODY_BYTES";
    /// Most client connections open at once. Above 95% of it each new connection closes the oldest one that has not sent a byte yet; accepting pauses at the cap.
    max_connections: usize = "8192", env "SIDECAR_MAX_CONNECTIONS";
    /// Most client connections open at once from one address; more are closed as soon as accepted (0: no cap).
    max_connections_per_ip: usize = "0", env "SIDECAR_MAX_CONNECTIONS_PER_IP";
    /// HTTP/2: most concurrent streams per client connection.
    h2_max_concurrent_streams: u32 = "256", env "SIDECAR_H2_MAX_CONCURRENT_STREAMS";
    /// HTTP/2: most bytes of decoded request headers.
    h2_max_header_list_size: u32 = "65536", env "SIDECAR_H2_MAX_HEADER_LIST_SIZE";
    /// HTTP/1.1 keep-alive for client connections.
    keep_alive: bool = "true", env "SIDECAR_KEEP_ALIVE";
    /// Seconds a /readyz verdict is kept; also the most often an idle sidecar spends a request on its probe.
    ready_cache: f64 = "5", env "SIDECAR_READY_CACHE";
    /// Seconds between dashboard snapshots (and SSE frames), from 0.05 to 60.
    snapshot_interval: f64 = "1", env "SIDECAR_SNAPSHOT_INTERVAL";
    /// Retreat (after 503, 529 and concurrency refusals, which teach nothing about the limit): pacing-rate multiplier per refusal (between 0 and 1).
    retreat_factor: f64 = "0.5", env "SIDECAR_RETREAT_FACTOR";
    /// Retreat: lowest pacing rate, as a fraction of the learned limit.
    retreat_floor: f64 = "0.1", env "SIDECAR_RETREAT_FLOOR";
    /// Retreat: seconds without such a refusal before the rate starts to recover.
    retreat_quiet_period: f64 = "30", env "SIDECAR_RETREAT_QUIET_PERIOD";
    /// Seconds to pause admission after a 429, 503 or 529 without Retry-After.
    retreat_default_pause: f64 = "1", env "SIDECAR_RETREAT_DEFAULT_PAUSE";
    /// Recovery: rate added per step, as a fraction of the learned limit (never above it).
    recovery_step: f64 = "0.1", env "SIDECAR_RECOVERY_STEP";
    /// Recovery: seconds between steps.
    recovery_interval: f64 = "10", env "SIDECAR_RECOVERY_INTERVAL";
    /// Seconds of the window the provider counts requests in; the sidecar never sends more than rate_rpm × provider_window / 60 (at least 1) in any such window.
    provider_window: f64 = "60", env "SIDECAR_PROVIDER_WINDOW";
    /// Window guard safety margin for jitter, as a fraction of the provider window (the larger of this and window_margin_floor applies).
    window_margin: f64 = "0.005", env "SIDECAR_WINDOW_MARGIN";
    /// Window guard safety margin floor, in seconds.
    window_margin_floor: f64 = "0.05", env "SIDECAR_WINDOW_MARGIN_FLOOR";
    /// Least seconds between two probes above a learned limit (a probe runs only while demand exceeds the limit).
    probe_interval: f64 = "600", env "SIDECAR_PROBE_INTERVAL";
    /// Rate-limit headers the provider sends: openai (x-ratelimit-*-requests) or none (learn from 429s alone).
    rate_limit_headers: String = "openai", env "SIDECAR_RATE_LIMIT_HEADERS";
    /// What a learned limit applies to: key (the whole provider) or model (each model its own, under the key's).
    limit_scope: String = "key", env "SIDECAR_LIMIT_SCOPE";
    /// File that keeps learned limits across restarts (empty: not kept).
    state_file: String = "", env "SIDECAR_STATE_FILE";
    /// Times a request answered 429 by the upstream is queued again (at the head of its priority) before the 429 is passed on.
    upstream_429_retries: u32 = "2", env "SIDECAR_UPSTREAM_429_RETRIES";
    /// Tokens per minute the provider allows (0 to 10000000000), 0: no token budget. Scaled to provider_window like rate_rpm: a window holds tokens_per_minute × provider_window / 60 (at least 1).
    tokens_per_minute: u64 = "0", env "SIDECAR_TOKENS_PER_MINUTE";
    /// How the provider charges tokens: reserved (a request's prompt plus its max_tokens bound, on arrival, as OpenAI does) or actual (the usage it reports when the answer ends).
    token_charge: String = "reserved", env "SIDECAR_TOKEN_CHARGE";
    /// Add stream_options.include_usage to streamed requests, so each is settled by the usage the provider counted (the extra chunk is not passed to a client that did not ask for it).
    request_usage: bool = "false", env "SIDECAR_REQUEST_USAGE";
    /// Completion tokens reserved for a request that sets no max_tokens or max_completion_tokens (1 to 1000000).
    default_completion_tokens: u32 = "4096", env "SIDECAR_DEFAULT_COMPLETION_TOKENS";
    /// Bytes of prompt text per estimated token (1 to 8): 3 over-counts English, code and chat text; where a model's usage shows more tokens, its estimates rise.
    bytes_per_token: f64 = "3", env "SIDECAR_BYTES_PER_TOKEN";
    /// Redis of the budget shared across replicas: redis://[user:password@]host[:port][/db], or rediss:// for TLS (empty: this replica paces alone, no Redis).
    redis_url: String = "", env "SIDECAR_REDIS_URL";
    /// File holding the Redis URL (its first non-empty line); wins over redis_url.
    redis_url_file: String = "", env "SIDECAR_REDIS_URL_FILE";
    /// File holding the Redis password (its first non-empty line); replaces the password of the URL.
    redis_password_file: String = "", env "SIDECAR_REDIS_PASSWORD_FILE";
    /// Prefix of every Redis key: 1 to 64 printable ASCII characters without spaces, '{' or '}'.
    redis_prefix: String = "nvidia-sidecar:", env "SIDECAR_REDIS_PREFIX";
    /// Seconds any Redis call may take (0.01 to 5) before the replica treats Redis as down.
    redis_timeout: f64 = "0.25", env "SIDECAR_REDIS_TIMEOUT";
    /// Replicas assumed while Redis is down by a replica that never saw the cluster (1 to 1000).
    redis_replicas: u32 = "1", env "SIDECAR_REDIS_REPLICAS";
    /// Seconds a replica cut off from Redis keeps sending on its fallback share (1 to 3600), then stops until Redis is back; Redis keeps a vanished replica's share reserved this long plus one window.
    redis_fallback_for: f64 = "120", env "SIDECAR_REDIS_FALLBACK_FOR";
}

/// The settings table of the README, generated from [`SETTINGS`] (a test keeps the
/// README equal to it).
pub fn markdown_table() -> String {
    let mut out = String::from("| Variable | Flag | Default | Meaning |\n|---|---|---|---|\n");
    for s in SETTINGS {
        let default = match s.default {
            "" => "(none)".to_owned(),
            d => format!("`{d}`"),
        };
        out.push_str(&format!(
            "| `{}` | `--{}` | {} | {} |\n",
            s.env,
            s.key.replace('_', "-"),
            default,
            s.help.trim()
        ));
    }
    out
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
