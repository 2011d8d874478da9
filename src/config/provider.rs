//! The steps that check the providers: each `[[providers]]` table (or the one implicit
//! provider, "nvidia", built from the global settings), the default provider, and what
//! a provider may not do when its budget is shared through Redis.
//!
//! A provider field left unset inherits the global setting of the same name; an error
//! names the provider's key (`providers[1].rate_rpm`), which [`super::origin`] turns
//! back into the global key when the value was inherited.

use crate::limiter::signal::Dialect;

use super::error::ConfigError;
use super::file::{FileConfig, ProviderFile};
use super::runtime::ROWS;
use super::secret::{secret_or_file, Secret};
use super::settings::Merged;
use super::source::EnvSource;
use super::typed::{LimitScope, ProviderConfig, TokenCharge};
use super::upstream::UpstreamUrl;
use super::validate::{count_in, seconds, Range};
use crate::tokens::{BytesPerToken, Rules};

/// What `default_completion_tokens` accepts.
const COMPLETION_TOKENS: Range = Range::Integer {
    min: 1,
    max: 1_000_000,
};

/// The bytes per token `bytes_per_token` accepts: no byte-level tokenizer makes more than
/// a token of a byte, so below 1 only over-reserves; above 8, no tokenizer packs text.
const BYTES_PER_TOKEN: (f64, f64) = (1.0, 8.0);

/// The global settings every provider inherits, as a provider table (named "nvidia", for
/// the implicit provider).
pub fn inherited(s: &Merged) -> ProviderFile {
    ProviderFile {
        name: "nvidia".into(),
        upstream_url: Some(s.upstream_url.clone()),
        rate_rpm: Some(s.rate_rpm),
        bucket_capacity: Some(s.bucket_capacity),
        queue_max_size: Some(s.queue_max_size),
        low_priority_timeout: Some(s.low_priority_timeout),
        provider_window: Some(s.provider_window),
        rate_limit_headers: Some(s.rate_limit_headers.clone()),
        limit_scope: Some(s.limit_scope.clone()),
        tokens_per_minute: Some(s.tokens_per_minute),
        token_charge: Some(s.token_charge.clone()),
        request_usage: Some(s.request_usage),
        default_completion_tokens: Some(s.default_completion_tokens),
        bytes_per_token: Some(s.bytes_per_token),
        models: vec!["*".into()],
        ..ProviderFile::default()
    }
}

/// The providers of `file`, or the implicit one (with `global_key`) when it declares
/// none; and the index of the default provider.
pub fn providers(
    file: &FileConfig,
    inherit: &ProviderFile,
    global_key: Option<Secret>,
    env: &dyn EnvSource,
) -> Result<(Vec<ProviderConfig>, usize), ConfigError> {
    if file.providers.is_empty() {
        let p = provider(inherit, inherit, global_key, "", env)?;
        if let Some(name) = file.default_provider.as_deref().filter(|n| *n != p.name) {
            return Err(ConfigError::invalid(
                "default_provider",
                name,
                "the name of a [[providers]] entry (none declared; the implicit one is \"nvidia\")",
            ));
        }
        return Ok((vec![p], 0));
    }
    let mut out: Vec<ProviderConfig> = Vec::with_capacity(file.providers.len());
    for (i, raw) in file.providers.iter().enumerate() {
        let prefix = format!("providers[{i}].");
        let p = provider(raw, inherit, None, &prefix, env)?;
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
    Ok((out, default))
}

/// A budget shared across replicas is per key: no provider may learn per model.
/// `declared`: the providers come from `[[providers]]` tables (else the implicit one).
pub fn shareable(providers: &[ProviderConfig], declared: bool) -> Result<(), ConfigError> {
    let Some((i, p)) = providers
        .iter()
        .enumerate()
        .find(|(_, p)| p.limit_scope == LimitScope::Model)
    else {
        return Ok(());
    };
    let setting = if declared {
        format!("providers[{i}].limit_scope")
    } else {
        "limit_scope".to_owned()
    };
    Err(ConfigError::invalid(
        setting,
        p.limit_scope.as_str(),
        "key (limit_scope = \"model\" is not shared across replicas; unset redis_url or use key)",
    ))
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
    let url = raw
        .upstream_url
        .as_deref()
        .or(inherit.upstream_url.as_deref())
        .unwrap_or_default();
    let upstream = UpstreamUrl::parse(url)
        .map_err(|e| ConfigError::invalid(format!("{prefix}upstream_url"), url, e))?;
    let fallback = match &raw.fallback_url {
        None => None,
        Some(u) => Some(
            UpstreamUrl::parse(u)
                .map_err(|e| ConfigError::invalid(format!("{prefix}fallback_url"), u, e))?,
        ),
    };
    let api_key = api_key(raw, implicit_key, prefix, env)?;

    // The run-time fields, checked against their rows.
    let rate_rpm = raw.rate_rpm.or(inherit.rate_rpm).unwrap_or_default();
    let rate_rpm = ROWS
        .rate_rpm
        .configured(&format!("{prefix}rate_rpm"), &rate_rpm, rate_rpm)?;
    let capacity = raw.bucket_capacity.or(inherit.bucket_capacity).unwrap_or(1);
    let bucket_capacity = ROWS.bucket_capacity.configured(
        &format!("{prefix}bucket_capacity"),
        &f64::from(capacity),
        capacity,
    )?;
    let queue = raw
        .queue_max_size
        .or(inherit.queue_max_size)
        .unwrap_or_default();
    let queue_max_size = ROWS.queue_max_size.configured(
        &format!("{prefix}queue_max_size"),
        &(queue as f64),
        queue,
    )?;
    let low = raw
        .low_priority_timeout
        .or(inherit.low_priority_timeout)
        .unwrap_or_default();
    let low_priority_timeout = ROWS.low_priority_timeout.configured(
        &format!("{prefix}low_priority_timeout"),
        &low,
        low,
    )?;

    let window = seconds(
        &format!("{prefix}provider_window"),
        raw.provider_window
            .or(inherit.provider_window)
            .unwrap_or_default(),
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
    let tokens = raw
        .tokens_per_minute
        .or(inherit.tokens_per_minute)
        .unwrap_or_default();
    let tokens_per_minute = ROWS.tokens_per_minute.configured(
        &format!("{prefix}tokens_per_minute"),
        &(tokens as f64),
        tokens,
    )?;
    let charge_raw = raw
        .token_charge
        .as_deref()
        .or(inherit.token_charge.as_deref())
        .unwrap_or("reserved");
    let token_charge = TokenCharge::parse(charge_raw).ok_or_else(|| {
        ConfigError::invalid(
            format!("{prefix}token_charge"),
            charge_raw,
            "reserved or actual",
        )
    })?;
    let completion = raw
        .default_completion_tokens
        .or(inherit.default_completion_tokens)
        .unwrap_or_default();
    let completion = count_in(
        &format!("{prefix}default_completion_tokens"),
        completion,
        COMPLETION_TOKENS,
    )?;
    let bytes = raw
        .bytes_per_token
        .or(inherit.bytes_per_token)
        .unwrap_or_default();
    let (least, most) = BYTES_PER_TOKEN;
    let bytes_per_token = BytesPerToken::new(bytes)
        .filter(|_| (least..=most).contains(&bytes))
        .ok_or_else(|| {
            ConfigError::invalid(
                format!("{prefix}bytes_per_token"),
                bytes,
                &format!("a number of bytes per token from {least} to {most}"),
            )
        })?;
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
        tokens_per_minute,
        token_charge,
        request_usage: raw.request_usage.or(inherit.request_usage).unwrap_or(false),
        token_rules: Rules {
            bytes_per_token,
            default_completion: u64::from(completion),
            ..Rules::default()
        },
    })
}

/// The provider's key: from `api_key`, the variable `api_key_env` names, or the file
/// `api_key_file` names (one of them at most); else `implicit` (the global key, for the
/// implicit provider).
fn api_key(
    raw: &ProviderFile,
    implicit: Option<Secret>,
    prefix: &str,
    env: &dyn EnvSource,
) -> Result<Option<Secret>, ConfigError> {
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
    Ok(match (&raw.api_key, &raw.api_key_env, &raw.api_key_file) {
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
        (None, None, None) => implicit,
    })
}
