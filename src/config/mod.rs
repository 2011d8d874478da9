//! Typed configuration, parsed and validated once at start-up.
//!
//! Layers, lowest first: built-in defaults < TOML file (`--config`) < environment (the
//! process environment over `.env`) < command-line flags. The merged [`Settings`] are
//! then turned into a [`Config`] whose fields can only hold valid values; every bad
//! value is reported as one [`ConfigError`] line naming the setting, the value and what
//! is accepted. Nothing after start-up reads a raw string or an environment variable.
//!
//! This file only assembles: [`settings`] lists the settings, [`file`] reads the TOML
//! file, [`source`] the environment and [`origin`] remembers where each value came
//! from; the steps of [`Config::build`] live with what they check ([`server`],
//! [`provider`], [`pacing`], [`redis`], [`upstream`]), on the shared checks of
//! [`validate`]; [`runtime`] is the table of the fields that change while the sidecar
//! runs, and [`restart`] names the others when they change.

mod error;
mod file;
mod origin;
mod pacing;
mod provider;
mod redis;
mod restart;
pub mod runtime;
mod secret;
mod server;
mod settings;
mod source;
mod typed;
mod upstream;
mod validate;

use std::path::Path;
use std::sync::Arc;

pub use self::redis::{RedisConfig, RedisUrl};
pub use error::ConfigError;
pub use file::{FileConfig, ProviderFile};
pub use origin::{Origin, Origins};
pub use restart::needs_restart;
pub use secret::Secret;
pub use settings::{
    markdown_table, secret_flags, unknown_variable, Merged, ParseSetting, SettingDoc, Settings,
    SETTINGS,
};
pub use source::{EnvSource, ProcessEnv};
pub use typed::{
    Config, Fairness, LimitScope, Limits, LogFormat, ProviderConfig, Timeouts, TokenCharge,
};
pub use upstream::{Scheme, UpstreamUrl};
pub use validate::Range;

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
    merged.overlay(Settings::from_env(env).map_err(|e| origins.rename(e))?);
    merged.overlay(flags);
    let mut config = Config::build(merged, file, env).map_err(|e| origins.rename(e))?;
    config.origins = Arc::new(origins);
    Ok(config)
}

impl Config {
    /// Validates merged settings (every field `Some`, as after [`Settings::defaults`]),
    /// one step at a time; the first refused value is the error.
    pub fn build(s: Settings, file: &FileConfig, env: &dyn EnvSource) -> Result<Self, ConfigError> {
        let s = s.merged();
        let (listen, metrics_listen) = server::listeners(&s)?;
        let workers = server::workers(&s)?;
        let (log_level, log_format) = server::logs(&s)?;
        let timeouts = server::timeouts(&s)?;
        let limits = server::limits(&s)?;
        let fairness = server::fairness(&s, &limits)?;

        let global_key = secret::secret_or_file(
            ("upstream_api_key", s.upstream_api_key.clone()),
            ("upstream_api_key_file", s.upstream_api_key_file.clone()),
        )?
        .or_else(|| env.var("NVIDIA_API_KEY").and_then(Secret::new));
        let admin_token = secret::secret_or_file(
            ("admin_token", s.admin_token.clone()),
            ("admin_token_file", s.admin_token_file.clone()),
        )?;
        let inherit = provider::inherited(&s);
        let (providers, default_provider) = provider::providers(file, &inherit, global_key, env)?;

        let retreat = pacing::retreat(&s)?;
        let upstream_429_retries = pacing::upstream_429_retries(&s)?;
        let client_priorities = pacing::client_priorities(&file.client_priorities)?;
        let upstream_ca = upstream::ca_certificates(&s.upstream_ca_file)?;
        let margin = pacing::margin(&s)?;
        let state_file = pacing::state_file(&s)?;

        let redis = redis::build(&s)?;
        if redis.is_some() {
            provider::shareable(&providers, !file.providers.is_empty())?;
        }

        Ok(Config {
            origins: Default::default(),
            redis,
            margin,
            probe_interval: validate::seconds("probe_interval", s.probe_interval)?,
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
            admin_loopback_reads: s.admin_loopback_reads,
            timeouts,
            limits,
            fairness,
            fallback_enabled_passthrough: s.fallback_enabled_passthrough,
            ready_cache: validate::seconds("ready_cache", s.ready_cache)?,
            snapshot_interval: validate::seconds_in(
                "snapshot_interval",
                s.snapshot_interval,
                Range::Seconds {
                    min: 0.05,
                    max: 60.0,
                },
            )?,
            providers,
            default_provider,
        })
    }
}

#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;
