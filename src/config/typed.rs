//! The validated configuration: types whose fields can only hold checked values.
//!
//! Nothing here checks anything; the steps that build these values ([`super::server`],
//! [`super::provider`], [`super::pacing`], assembled by [`Config::build`]) check every
//! field, and name the setting when one is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::limiter::learn::tokens_per_window;
use crate::limiter::signal::Dialect;
use crate::limiter::{Margin, RetreatConfig};
use crate::priority::Priority;
use crate::tokens::Rules;

use super::origin::Origins;
use super::redis::RedisConfig;
use super::secret::Secret;
use super::upstream::UpstreamUrl;

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Client-facing server limits; each maps to a hyper builder setting or a check of ours.
#[derive(Debug, Clone, PartialEq)]
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
#[derive(Debug, Clone, Copy, PartialEq)]
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
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// Arrival to response headers (queue wait included).
    pub request: Duration,
    pub connect: Duration,
    /// Longest silence inside a response body.
    pub stream_idle: Duration,
    pub shutdown_grace: Duration,
}

/// One upstream provider and the models routed to it.
#[derive(Debug, Clone, PartialEq)]
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
    /// Tokens per minute the provider allows; 0: no token budget (see
    /// [`ProviderConfig::tokens_per_window`]).
    pub tokens_per_minute: u64,
    /// How the provider charges a request's tokens.
    pub token_charge: TokenCharge,
    /// Add `stream_options.include_usage` to streamed requests (`request_usage`).
    pub request_usage: bool,
    /// How a request's tokens are estimated before it is sent: `bytes_per_token` and
    /// `default_completion_tokens`; images at the rule's own figures.
    pub token_rules: Rules,
}

impl ProviderConfig {
    /// Tokens the provider allows in one of its windows, scaled like the request limit
    /// ([`tokens_per_window`]); `None` without a token budget.
    pub fn tokens_per_window(&self) -> Option<u64> {
        tokens_per_window(self.tokens_per_minute, self.window)
    }
}

/// How a provider charges tokens against its per-minute limit (`token_charge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TokenCharge {
    /// Prompt plus the completion bound (`max_tokens`, else the model's), charged on
    /// arrival; the charge stays (OpenAI's way).
    #[default]
    Reserved,
    /// Prompt plus the completion generated, charged when the answer ends.
    Actual,
}

impl TokenCharge {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reserved => "reserved",
            Self::Actual => "actual",
        }
    }

    /// `reserved` or `actual`, in any case, spaces around ignored.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "reserved" => Some(Self::Reserved),
            "actual" => Some(Self::Actual),
            _ => None,
        }
    }
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

impl Config {
    /// The provider for unmatched models.
    pub fn default_provider(&self) -> &ProviderConfig {
        &self.providers[self.default_provider]
    }
}
