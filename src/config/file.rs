//! The TOML file (`--config`): global settings at the top level, then `[[providers]]`
//! tables, the default provider and the client priorities.
//!
//! The file is deserialised straight from its text, so a syntax or schema error names
//! its line; the line of every key is kept too, for the errors validation finds later.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use super::error::ConfigError;
use super::settings::{FileLayout, Settings};

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
    pub tokens_per_minute: Option<u64>,
    pub token_charge: Option<String>,
    pub request_usage: Option<bool>,
    pub default_completion_tokens: Option<u32>,
    pub bytes_per_token: Option<f64>,
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
        let mut layout: FileLayout<ProviderFile> =
            toml::from_str(text).map_err(|source| ConfigError::Toml {
                path: path.to_owned(),
                line: source.span().map_or(1, |s| line_of(text, s.start)),
                message: explain_toml_error(source.message()),
                source: Box::new(source),
            })?;
        Ok(Self {
            path: path.to_owned(),
            lines: key_lines(text),
            settings: layout.take_settings(),
            providers: layout.providers,
            default_provider: layout.default_provider,
            client_priorities: layout.client_priorities,
        })
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }
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
