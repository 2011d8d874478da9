//! Configurations for unit tests across the crate, built as the binary builds them.

use std::collections::HashMap;

use super::{from_file, Config, ConfigError, FileConfig, Settings};

/// The environment map `pairs` stands for.
pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The configuration of the TOML `toml` (may be empty) under the variables `pairs`.
pub fn configured(toml: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let file = FileConfig::parse(toml, "sidecar.toml")?;
    from_file(&file, &env(pairs), Settings::default())
}

/// [`configured`], on ephemeral ports; panics on a bad configuration.
pub fn config(toml: &str, pairs: &[(&str, &str)]) -> Config {
    let mut all = vec![("SIDECAR_LISTEN_PORT", "0"), ("SIDECAR_METRICS_PORT", "0")];
    all.extend_from_slice(pairs);
    configured(toml, &all).unwrap_or_else(|e| panic!("{toml:?} {pairs:?}: {e}"))
}
