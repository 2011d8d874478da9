//! A configuration change: parsed with simd-json into typed structs, validated whole,
//! then turned into the next [`Hot`] value.
//!
//! Every problem is a [`PatchError`] naming the field (its full path, such as
//! `providers.nvidia.rate_rpm`) and what it accepts; nothing is applied unless every
//! field is valid.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config;
use crate::hot::{Hot, HotProvider};

/// Largest accepted body.
pub const MAX_BODY: usize = 64 * 1024;

/// Fields a patch may set for every provider (top level) or for one.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderPatch {
    pub rate_rpm: Option<f64>,
    pub bucket_capacity: Option<f64>,
    pub queue_max_size: Option<f64>,
    pub low_priority_timeout: Option<f64>,
}

/// A change to the run-time settings. Top-level provider fields apply to every provider
/// (and become the global defaults); `providers.<name>` fields win for that provider.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub rate_rpm: Option<f64>,
    pub bucket_capacity: Option<f64>,
    pub queue_max_size: Option<f64>,
    pub low_priority_timeout: Option<f64>,
    pub request_timeout: Option<f64>,
    pub fallback_enabled_passthrough: Option<bool>,
    pub log_level: Option<String>,
    pub providers: Option<BTreeMap<String, ProviderPatch>>,
}

/// Why a patch was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("unknown field {field:?}; accepted: {accepted}")]
    UnknownField {
        field: String,
        accepted: &'static str,
    },
    #[error("{field}: {problem}; accepted: {accepted}")]
    Invalid {
        field: String,
        problem: String,
        accepted: &'static str,
    },
    #[error("unknown provider {name:?}; configured: {configured}")]
    UnknownProvider { name: String, configured: String },
    #[error("the patch changes nothing: send at least one of {TOP_FIELDS}")]
    Empty,
}

const TOP_FIELDS: &str = "rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout, request_timeout, fallback_enabled_passthrough, log_level, providers";
const PROVIDER_FIELDS: &str = "rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout";

/// What each field accepts, for messages.
fn accepted(field: &str) -> &'static str {
    match field {
        "rate_rpm" => "a number of requests per minute above 0, at most 6000000",
        "bucket_capacity" => "an integer from 1 to 1000000",
        "queue_max_size" => "an integer from 0 to 1000000",
        "low_priority_timeout" | "request_timeout" => "a number of seconds from 0.001 to 86400",
        "fallback_enabled_passthrough" => "true or false",
        "log_level" => "one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
        "providers" => "an object of provider name to fields",
        _ => "",
    }
}

/// Parses a body. simd-json parses in place, so the body is copied into an owned buffer
/// first.
pub fn parse(body: &[u8]) -> Result<Patch, PatchError> {
    if body.trim_ascii().is_empty() {
        return Err(PatchError::Malformed(
            "the body is empty; send a JSON object of fields to change".into(),
        ));
    }
    let mut buf = body.to_vec();
    let mut de = simd_json::Deserializer::from_slice(&mut buf)
        .map_err(|e| PatchError::Malformed(e.to_string()))?;
    let patch: Patch = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        classify(&path, e.inner())
    })?;
    Ok(patch)
}

/// Turns a deserialisation error at `path` into a message that names the field.
fn classify(path: &str, e: &simd_json::Error) -> PatchError {
    use simd_json::ErrorType as T;
    // The root, or inside a root that is not an object (an array).
    let top = path.is_empty() || path == "." || path.starts_with('[');
    let not_object =
        || PatchError::Malformed("the body must be a JSON object of fields to change".into());
    let problem = match e.error() {
        T::Serde(msg) => {
            if msg.starts_with("unknown field `") {
                // The path already ends with the unknown field's name.
                let accepted = if path.contains('.') {
                    PROVIDER_FIELDS
                } else {
                    TOP_FIELDS
                };
                return PatchError::UnknownField {
                    field: path.chars().take(200).collect(),
                    accepted,
                };
            }
            if top {
                return not_object();
            }
            msg.clone()
        }
        _ if top => return not_object(),
        T::ExpectedFloat | T::ExpectedInteger | T::ExpectedSigned | T::ExpectedUnsigned => {
            "wrong type: expected a number".to_owned()
        }
        T::ExpectedBoolean => "wrong type: expected true or false".to_owned(),
        T::ExpectedString => "wrong type: expected a string".to_owned(),
        T::ExpectedMap => "wrong type: expected an object".to_owned(),
        other => format!("wrong type ({other:?})"),
    };
    let last = path.rsplit('.').next().unwrap_or(path);
    PatchError::Invalid {
        field: path.to_owned(),
        problem,
        accepted: accepted(last),
    }
}

fn invalid(field: &str, value: impl std::fmt::Display, short: &str) -> PatchError {
    PatchError::Invalid {
        field: field.to_owned(),
        problem: format!("{value} is out of range"),
        accepted: accepted(short),
    }
}

fn integer(field: &str, short: &str, v: f64, min: u64, max: u64) -> Result<u64, PatchError> {
    if v.is_finite() && v.fract() == 0.0 && v >= min as f64 && v <= max as f64 {
        Ok(v as u64)
    } else {
        Err(invalid(field, v, short))
    }
}

fn seconds(field: &str, short: &str, v: f64) -> Result<Duration, PatchError> {
    config::seconds(field, v).map_err(|_| invalid(field, v, short))
}

/// Applies one provider patch (fields under `prefix`) to `into`.
fn apply_provider(
    prefix: &str,
    p: &ProviderPatch,
    into: &mut HotProvider,
) -> Result<(), PatchError> {
    let f = |name: &str| format!("{prefix}{name}");
    if let Some(v) = p.rate_rpm {
        into.rate_rpm =
            config::rpm("rate_rpm", v).map_err(|_| invalid(&f("rate_rpm"), v, "rate_rpm"))?;
    }
    if let Some(v) = p.bucket_capacity {
        into.bucket_capacity =
            integer(&f("bucket_capacity"), "bucket_capacity", v, 1, 1_000_000)? as u32;
    }
    if let Some(v) = p.queue_max_size {
        into.queue_max_size =
            integer(&f("queue_max_size"), "queue_max_size", v, 0, 1_000_000)? as usize;
    }
    if let Some(v) = p.low_priority_timeout {
        into.low_priority_timeout = seconds(&f("low_priority_timeout"), "low_priority_timeout", v)?;
    }
    Ok(())
}

impl Patch {
    /// The top-level provider fields.
    fn all(&self) -> ProviderPatch {
        ProviderPatch {
            rate_rpm: self.rate_rpm,
            bucket_capacity: self.bucket_capacity,
            queue_max_size: self.queue_max_size,
            low_priority_timeout: self.low_priority_timeout,
        }
    }

    fn is_empty(&self) -> bool {
        self.all() == ProviderPatch::default()
            && self.request_timeout.is_none()
            && self.fallback_enabled_passthrough.is_none()
            && self.log_level.is_none()
            && self
                .providers
                .iter()
                .flat_map(|m| m.values())
                .all(|p| *p == ProviderPatch::default())
    }

    /// The value `old` becomes under this patch; `names` are the providers in order.
    /// Validates every field before returning anything.
    pub fn apply_to(&self, old: &Hot, names: &[&str]) -> Result<Hot, PatchError> {
        if self.is_empty() {
            return Err(PatchError::Empty);
        }
        let mut new = old.clone();
        if let Some(v) = self.request_timeout {
            new.request_timeout = seconds("request_timeout", "request_timeout", v)?;
        }
        if let Some(v) = self.fallback_enabled_passthrough {
            new.fallback_enabled_passthrough = v;
        }
        if let Some(v) = &self.log_level {
            new.log_level =
                v.trim()
                    .parse::<tracing::Level>()
                    .map_err(|_| PatchError::Invalid {
                        field: "log_level".into(),
                        problem: format!("{v:?} is not a level"),
                        accepted: accepted("log_level"),
                    })?;
        }
        let all = self.all();
        apply_provider("", &all, &mut new.defaults)?;
        for p in &mut new.providers {
            apply_provider("", &all, p)?;
        }
        for (name, patch) in self.providers.iter().flatten() {
            let Some(i) = names.iter().position(|n| n == name) else {
                return Err(PatchError::UnknownProvider {
                    name: name.chars().take(100).collect(),
                    configured: names.join(", "),
                });
            };
            apply_provider(&format!("providers.{name}."), patch, &mut new.providers[i])?;
        }
        Ok(new)
    }
}

/// One changed field, for the answer and the audit log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Change {
    pub field: String,
    pub old: serde_json::Value,
    pub new: serde_json::Value,
}

/// The fields that differ between `old` and `new`.
pub fn diff(old: &Hot, new: &Hot, names: &[&str]) -> Vec<Change> {
    use serde_json::json;
    let mut out = Vec::new();
    let mut push = |field: String, a: serde_json::Value, b: serde_json::Value| {
        if a != b {
            out.push(Change {
                field,
                old: a,
                new: b,
            });
        }
    };
    push(
        "request_timeout".into(),
        json!(old.request_timeout.as_secs_f64()),
        json!(new.request_timeout.as_secs_f64()),
    );
    push(
        "fallback_enabled_passthrough".into(),
        json!(old.fallback_enabled_passthrough),
        json!(new.fallback_enabled_passthrough),
    );
    push(
        "log_level".into(),
        json!(old.log_level.as_str().to_ascii_lowercase()),
        json!(new.log_level.as_str().to_ascii_lowercase()),
    );
    let mut provider = |prefix: &str, a: &HotProvider, b: &HotProvider| {
        push(
            format!("{prefix}rate_rpm"),
            json!(a.rate_rpm),
            json!(b.rate_rpm),
        );
        push(
            format!("{prefix}bucket_capacity"),
            json!(a.bucket_capacity),
            json!(b.bucket_capacity),
        );
        push(
            format!("{prefix}queue_max_size"),
            json!(a.queue_max_size),
            json!(b.queue_max_size),
        );
        push(
            format!("{prefix}low_priority_timeout"),
            json!(a.low_priority_timeout.as_secs_f64()),
            json!(b.low_priority_timeout.as_secs_f64()),
        );
    };
    provider("", &old.defaults, &new.defaults);
    for ((a, b), name) in old.providers.iter().zip(&new.providers).zip(names) {
        provider(&format!("providers.{name}."), a, b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hot() -> Hot {
        let p = HotProvider {
            rate_rpm: 40.0,
            bucket_capacity: 1,
            queue_max_size: 64,
            low_priority_timeout: Duration::from_secs(30),
        };
        Hot {
            version: 3,
            request_timeout: Duration::from_secs(120),
            fallback_enabled_passthrough: false,
            log_level: tracing::Level::INFO,
            defaults: p,
            providers: vec![p, p],
        }
    }

    const NAMES: [&str; 2] = ["nvidia", "openai"];

    #[test]
    fn top_level_fields_apply_to_every_provider_and_named_ones_win() {
        let patch = parse(
            br#"{"rate_rpm": 100, "providers": {"openai": {"rate_rpm": 7, "queue_max_size": 0}}}"#,
        )
        .unwrap();
        let new = patch.apply_to(&hot(), &NAMES).unwrap();
        assert_eq!(new.defaults.rate_rpm, 100.0);
        assert_eq!(new.providers[0].rate_rpm, 100.0);
        assert_eq!(new.providers[1].rate_rpm, 7.0);
        assert_eq!(new.providers[1].queue_max_size, 0);
        assert_eq!(new.version, 3, "the caller numbers versions");
        let changed: Vec<String> = diff(&hot(), &new, &NAMES)
            .into_iter()
            .map(|c| c.field)
            .collect();
        assert_eq!(
            changed,
            [
                "rate_rpm",
                "providers.nvidia.rate_rpm",
                "providers.openai.rate_rpm",
                "providers.openai.queue_max_size"
            ]
        );
    }

    #[test]
    fn one_bad_field_rejects_the_whole_patch() {
        let patch =
            parse(br#"{"request_timeout": 5, "providers": {"openai": {"bucket_capacity": 0}}}"#)
                .unwrap();
        let err = patch.apply_to(&hot(), &NAMES).unwrap_err();
        assert_eq!(
            err.to_string(),
            "providers.openai.bucket_capacity: 0 is out of range; accepted: an integer from 1 to 1000000"
        );
    }

    #[test]
    fn errors_name_the_field_and_what_it_accepts() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"foo": 1}"#, "unknown field \"foo\"; accepted: rate_rpm, bucket_capacity"),
            (br#"{"providers": {"nvidia": {"zzz": 1}}}"#, "unknown field \"providers.nvidia.zzz\"; accepted: rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout"),
            (br#"{"rate_rpm": "fast"}"#, "rate_rpm: wrong type: expected a number; accepted: a number of requests per minute above 0, at most 6000000"),
            (br#"{"fallback_enabled_passthrough": 1}"#, "fallback_enabled_passthrough: wrong type: expected true or false"),
            (br#"{"rate_rpm": 5,"#, "malformed JSON: "),
            (b"[]", "malformed JSON: the body must be a JSON object"),
            (b"  ", "malformed JSON: the body is empty"),
        ];
        for (body, want) in cases {
            let got = parse(body).unwrap_err().to_string();
            assert!(
                got.starts_with(want),
                "{}: {got}",
                String::from_utf8_lossy(body)
            );
        }
        let err = parse(br#"{"rate_rpm": 5,"#).unwrap_err().to_string();
        assert!(err.contains("character"), "the position is given: {err}");
    }
}
