//! A configuration change: parsed with simd-json into typed structs, validated whole,
//! then turned into the next [`Hot`] value.
//!
//! Every problem is a [`PatchError`] with a one-line message: a body that is not a JSON
//! object of fields says what is wrong and at which line and column ([`json`]); a field
//! problem names the field (its full path, such as `providers.nvidia.rate_rpm`) and what
//! it accepts. [`MESSAGES`] lists every message's shape. Nothing is applied unless every
//! field is valid.

mod json;
mod scan;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_path_to_error::Segment;

use crate::config;
use crate::hot::{Hot, HotProvider};

pub use json::{Escape, Expected, Found, JsonError, Position, Problem, MAX_DEPTH};

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
    /// The body is not a JSON object of fields (the answer's code is `invalid_json`).
    #[error(transparent)]
    Malformed(#[from] JsonError),
    #[error("unknown field \"{field}\"; accepted: {accepted}")]
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
    #[error("unknown provider \"{name}\"; configured: {configured}")]
    UnknownProvider { name: String, configured: String },
    #[error("the patch changes nothing: send at least one of {TOP_FIELDS}")]
    Empty,
}

/// The shape of every message a [`PatchError`] can carry: `<n>` is a number, `<a|b>` one
/// of the alternatives, any other `<...>` a piece of the body or the configuration (one
/// line). The fuzz target checks every refusal against this list, so a message added
/// without documenting it here fails fuzzing.
pub const MESSAGES: &[&str] = &[
    "malformed JSON: the body is empty; send a JSON object of fields to change",
    "malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it",
    "malformed JSON at line <n>, column <n>: the body must be a JSON object of fields to change, not <an array|a string|a number|true|false|null>",
    "malformed JSON at line <n>, column <n>: unexpected <character|word> <found>; expected <a value|a value or `]`|a field name in double quotes|a field name in double quotes or `}`|`:` after the field name|`,` or `}`|`,` or `]`>",
    "malformed JSON at line <n>, column <n>: the body ends early; expected <a value|a value or `]`|a field name in double quotes|a field name in double quotes or `}`|`:` after the field name|`,` or `}`|`,` or `]`>",
    "malformed JSON at line <n>, column <n>: unexpected character <found> after the end of the JSON value",
    "malformed JSON at line <n>, column <n>: unterminated string; close it with `\"`",
    r#"malformed JSON at line <n>, column <n>: invalid escape <escape> in a string; use \" \\ \/ \b \f \n \r \t or \uXXXX"#,
    r#"malformed JSON at line <n>, column <n>: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#,
    r#"malformed JSON at line <n>, column <n>: control character U+00<hex> in a string; write it as an escape such as \t, \n or \u0000"#,
    "malformed JSON at line <n>, column <n>: invalid UTF-8 (byte 0x<hex>); send the body as UTF-8",
    "malformed JSON at line <n>, column <n>: invalid number `<number>`; write numbers such as 40, 0.5 or 1e3",
    "malformed JSON at line <n>, column <n>: integer `<number>` does not fit in 64 bits; write it with an exponent, such as 1.8e19",
    "malformed JSON at line <n>, column <n>: non-finite number `<number>`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)",
    "malformed JSON at line <n>, column <n>: number `<number>` has an exponent beyond ±9999; write it with a smaller exponent",
    "malformed JSON at line <n>, column <n>: duplicate field `<path>`; each field may appear once",
    "malformed JSON at line <n>, column <n>: nesting too deep; at most 16 levels of objects and arrays",
    "malformed JSON at line <n>, column <n>: the body is not valid JSON",
    "unknown field <\"path\">; accepted: <fields>",
    "<path>: wrong type: expected <a number|true or false|a string|an object>; accepted: <what>",
    "<path>: <number> is out of range; accepted: <what>",
    "log_level: <\"value\"> is not a level; accepted: one of \"error\", \"warn\", \"info\", \"debug\", \"trace\"",
    "unknown provider <\"name\">; configured: <names>",
    "the patch changes nothing: send at least one of rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout, request_timeout, fallback_enabled_passthrough, log_level, providers",
];

impl PatchError {
    /// The message is one line and has one of the shapes of [`MESSAGES`].
    pub fn is_documented(&self) -> bool {
        let message = self.to_string();
        !message.contains(['\n', '\r']) && MESSAGES.iter().any(|m| shape_fits(m, &message))
    }
}

/// Whether `message` has the shape `shape` (placeholders as in [`MESSAGES`]).
fn shape_fits(shape: &str, message: &str) -> bool {
    let Some(open) = shape.find('<') else {
        return shape == message;
    };
    let Some(message) = message.strip_prefix(&shape[..open]) else {
        return false;
    };
    let Some(close) = shape[open..].find('>') else {
        return false;
    };
    let (hole, rest) = (&shape[open + 1..open + close], &shape[open + close + 1..]);
    match hole {
        "n" => {
            let n = message.bytes().take_while(u8::is_ascii_digit).count();
            n > 0 && shape_fits(rest, &message[n..])
        }
        "hex" => {
            let n = message.bytes().take_while(u8::is_ascii_hexdigit).count();
            n > 0 && shape_fits(rest, &message[n..])
        }
        _ if hole.contains('|') => hole
            .split('|')
            .any(|a| message.strip_prefix(a).is_some_and(|m| shape_fits(rest, m))),
        // Any text on one line, at least one character.
        _ => message
            .char_indices()
            .take_while(|&(_, c)| c != '\n' && c != '\r')
            .any(|(i, c)| shape_fits(rest, &message[i + c.len_utf8()..])),
    }
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

/// The type each field holds, for messages.
fn kind(field: &str) -> &'static str {
    match field {
        "fallback_enabled_passthrough" => "true or false",
        "log_level" => "a string",
        "providers" => "an object",
        _ => "a number",
    }
}

/// Parses a body: first [`json::check`] (an object, well-formed, no duplicate field, not
/// too deep), then the typed fields. simd-json parses in place, so the body is copied
/// into an owned buffer first.
pub fn parse(body: &[u8]) -> Result<Patch, PatchError> {
    json::check(body)?;
    let mut buf = body.to_vec();
    let mut de =
        simd_json::Deserializer::from_slice(&mut buf).map_err(|e| json::refused(body, &e))?;
    serde_path_to_error::deserialize(&mut de).map_err(|e| classify(e.path(), e.inner()))
}

/// Turns a deserialisation error at `path` into a message that names the field. The
/// body is known to be an object without duplicate fields, so the error is an unknown
/// field or a value of the wrong type.
fn classify(path: &serde_path_to_error::Path, e: &simd_json::Error) -> PatchError {
    let shown = path.to_string();
    if let simd_json::ErrorType::Serde(msg) = e.error() {
        if msg.starts_with("unknown field `") {
            // The path already ends with the unknown field's name.
            let accepted = if shown.contains('.') {
                PROVIDER_FIELDS
            } else {
                TOP_FIELDS
            };
            return PatchError::UnknownField {
                field: json::printable(&shown, 100),
                accepted,
            };
        }
    }
    let keys: Vec<&str> = path
        .iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    let (expected, accepted) = match keys.as_slice() {
        ["providers", _] => (
            "an object",
            "an object with rate_rpm, bucket_capacity, queue_max_size or low_priority_timeout",
        ),
        [field] | ["providers", _, field] => (kind(field), accepted(field)),
        // The root: not reached, the body is known to be an object.
        _ => ("an object", "a JSON object of fields to change"),
    };
    PatchError::Invalid {
        field: json::printable(&shown, 100),
        problem: format!("wrong type: expected {expected}"),
        accepted,
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
                        problem: format!(
                            "{:?} is not a level",
                            v.chars().take(40).collect::<String>()
                        ),
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
                    name: json::printable(name, 100),
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
            (br#"{"rate_rpm": 5,"#, "malformed JSON at line 1, column 16: "),
            (b"[]", "malformed JSON at line 1, column 1: the body must be a JSON object"),
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
        assert!(
            err.contains("line 1, column 16"),
            "the position is given: {err}"
        );
    }

    /// The whole message for each kind of malformed body.
    const MALFORMED: &[(&[u8], &str)] = &[
        (b"", "malformed JSON: the body is empty; send a JSON object of fields to change"),
        (b"\xef\xbb\xbf{\"rate_rpm\": 1}", "malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it"),
        (b"\xff\xfe{}", "malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it"),
        (b"[1, 2]", "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not an array"),
        (b" \"x\"", "malformed JSON at line 1, column 2: the body must be a JSON object of fields to change, not a string"),
        (b"-4.5", "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not a number"),
        (b"\n\ntrue", "malformed JSON at line 3, column 1: the body must be a JSON object of fields to change, not true"),
        (b"null", "malformed JSON at line 1, column 1: the body must be a JSON object of fields to change, not null"),
        (br#"{"rate_rpm": 5} x"#, "malformed JSON at line 1, column 17: unexpected character `x` after the end of the JSON value"),
        (br#"{"rate_rpm": 5}{}"#, "malformed JSON at line 1, column 16: unexpected character `{` after the end of the JSON value"),
        (br#"{"rate_rpm": 5 x}"#, "malformed JSON at line 1, column 16: unexpected character `x`; expected `,` or `}`"),
        (br#"{"rate_rpm" 5}"#, "malformed JSON at line 1, column 13: unexpected character `5`; expected `:` after the field name"),
        (br#"{rate_rpm: 5}"#, "malformed JSON at line 1, column 2: unexpected character `r`; expected a field name in double quotes or `}`"),
        (br#"{"rate_rpm": 5,}"#, "malformed JSON at line 1, column 16: unexpected character `}`; expected a field name in double quotes"),
        (br#"{"rate_rpm": [1,]}"#, "malformed JSON at line 1, column 17: unexpected character `]`; expected a value"),
        (br#"{"rate_rpm": [1 2]}"#, "malformed JSON at line 1, column 17: unexpected character `2`; expected `,` or `]`"),
        (br#"{"rate_rpm": }"#, "malformed JSON at line 1, column 14: unexpected character `}`; expected a value"),
        (b"{\"rate_rpm\": \x01}", "malformed JSON at line 1, column 14: unexpected character U+0001; expected a value"),
        (b"{\"rate_rpm\": \xc3\xa9}", "malformed JSON at line 1, column 14: unexpected character U+00E9; expected a value"),
        (br#"{"rate_rpm": tru}"#, "malformed JSON at line 1, column 14: unexpected word `tru`; expected a value"),
        (br#"{"rate_rpm": 5,"#, "malformed JSON at line 1, column 16: the body ends early; expected a field name in double quotes"),
        (b"{\"rate_rpm\":", "malformed JSON at line 1, column 13: the body ends early; expected a value"),
        (b"{\n  \"rate_rpm\": 5\n", "malformed JSON at line 3, column 1: the body ends early; expected `,` or `}`"),
        (br#"{"log_level": "debug"#, "malformed JSON at line 1, column 15: unterminated string; close it with `\"`"),
        (br#"{"log_l"#, "malformed JSON at line 1, column 2: unterminated string; close it with `\"`"),
        (br#"{"log_level": "de\qbug"}"#, r#"malformed JSON at line 1, column 18: invalid escape `\q` in a string; use \" \\ \/ \b \f \n \r \t or \uXXXX"#),
        (br#"{"log_level": "\u12"}"#, r#"malformed JSON at line 1, column 16: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#),
        (br#"{"log_level": "\ud800"}"#, r#"malformed JSON at line 1, column 16: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#),
        (br#"{"log_level": "x\udc00"}"#, r#"malformed JSON at line 1, column 17: invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#),
        (b"{\"log_level\": \"\xff\"}", "malformed JSON at line 1, column 16: invalid UTF-8 (byte 0xFF); send the body as UTF-8"),
        (b"{\"log_level\": \"\xc3\xa9\xc3\"}", "malformed JSON at line 1, column 17: invalid UTF-8 (byte 0xC3); send the body as UTF-8"),
        (b"{\"log_level\": \"a\tb\"}", r#"malformed JSON at line 1, column 17: control character U+0009 in a string; write it as an escape such as \t, \n or \u0000"#),
        (b"{\"log_level\": \"a\nb\"}", r#"malformed JSON at line 1, column 17: control character U+000A in a string; write it as an escape such as \t, \n or \u0000"#),
        (br#"{"rate_rpm": 01}"#, "malformed JSON at line 1, column 14: invalid number `01`; write numbers such as 40, 0.5 or 1e3"),
        (br#"{"rate_rpm": +1}"#, "malformed JSON at line 1, column 14: invalid number `+1`; write numbers such as 40, 0.5 or 1e3"),
        (br#"{"rate_rpm": 1.}"#, "malformed JSON at line 1, column 14: invalid number `1.`; write numbers such as 40, 0.5 or 1e3"),
        (br#"{"rate_rpm": -}"#, "malformed JSON at line 1, column 14: invalid number `-`; write numbers such as 40, 0.5 or 1e3"),
        (br#"{"rate_rpm": 18446744073709551616}"#, "malformed JSON at line 1, column 14: integer `18446744073709551616` does not fit in 64 bits; write it with an exponent, such as 1.8e19"),
        (br#"{"rate_rpm": NaN}"#, "malformed JSON at line 1, column 14: non-finite number `NaN`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": nan}"#, "malformed JSON at line 1, column 14: non-finite number `nan`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": Infinity}"#, "malformed JSON at line 1, column 14: non-finite number `Infinity`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": -Infinity}"#, "malformed JSON at line 1, column 14: non-finite number `-Infinity`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": +inf}"#, "malformed JSON at line 1, column 14: non-finite number `+inf`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": 1e999}"#, "malformed JSON at line 1, column 14: non-finite number `1e999`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": -1.8e308}"#, "malformed JSON at line 1, column 14: non-finite number `-1.8e308`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)"),
        (br#"{"rate_rpm": 1e-4294967295}"#, "malformed JSON at line 1, column 14: number `1e-4294967295` has an exponent beyond ±9999; write it with a smaller exponent"),
        (br#"{"rate_rpm": 1e-4000000000000000000}"#, "malformed JSON at line 1, column 14: number `1e-4000000000000000000` has an exponent beyond ±9999; write it with a smaller exponent"),
        (br#"{"rate_rpm": 1, "rate_rpm": 2}"#, "malformed JSON at line 1, column 17: duplicate field `rate_rpm`; each field may appear once"),
        (br#"{"rate_rpm": 1, "rate_r\u0070m": 2}"#, "malformed JSON at line 1, column 17: duplicate field `rate_rpm`; each field may appear once"),
        (b"{\n  \"providers\": {\"nvidia\": {\"rate_rpm\": 1, \"rate_rpm\": 2}}\n}", "malformed JSON at line 2, column 43: duplicate field `providers.nvidia.rate_rpm`; each field may appear once"),
        (br#"{"providers": {"other": {"rate_rpm": 3}, "other": {"bucket_capacity": 4}}}"#, "malformed JSON at line 1, column 42: duplicate field `providers.other`; each field may appear once"),
        (br#"{"": 1, "": 2}"#, r#"malformed JSON at line 1, column 9: duplicate field `""`; each field may appear once"#),
        (br#"{"providers": {"": {}, "": {}}}"#, r#"malformed JSON at line 1, column 24: duplicate field `providers.""`; each field may appear once"#),
        (br#"{"x\ny": 1, "x\ny": 2}"#, r#"malformed JSON at line 1, column 13: duplicate field `x\ny`; each field may appear once"#),
        (br#"{"rate_rpm": [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]}"#, "malformed JSON at line 1, column 29: nesting too deep; at most 16 levels of objects and arrays"),
    ];

    #[test]
    fn malformed_bodies_are_named_in_words_with_line_and_column() {
        let mut failures = Vec::new();
        for (body, want) in MALFORMED {
            let got = match parse(body) {
                Ok(p) => format!("accepted: {p:?}"),
                Err(e) => e.to_string(),
            };
            if got != *want {
                failures.push(format!(
                    "{:?}\n   got: {got}\n  want: {want}",
                    String::from_utf8_lossy(body)
                ));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn no_message_shows_an_internal_type_or_spans_lines() {
        let more: &[&[u8]] = &[
            br#"{"providers": {"nvidia": 5}}"#,
            br#"{"providers": {"nvidia": []}}"#,
            br#"{"providers": []}"#,
            br#"{"rate_rpm": [1]}"#,
            br#"{"rate_rpm": {"a": 1}}"#,
            br#"{"log_level": 5}"#,
            br#"{"fallback_enabled_passthrough": "yes"}"#,
            br#"{"providers": {"a\nb": {"rate_rpm": "x"}}}"#,
        ];
        let long = "\\u007f\\u200b".repeat(300);
        let long_name = [
            format!(r#"{{"{long}": 1}}"#),
            format!(r#"{{"providers": {{"a": {{"{long}": 1}}}}}}"#),
            format!(r#"{{"{long}": 1, "{long}": 2}}"#),
            format!(r#"{{"providers": {{"{long}": {{"rate_rpm": "x"}}}}}}"#),
        ];
        let bodies = MALFORMED
            .iter()
            .map(|(b, _)| *b)
            .chain(more.iter().copied());
        let mut messages: Vec<String> = bodies
            .chain(long_name.iter().map(|b| b.as_bytes()))
            .map(|body| parse(body).unwrap_err().to_string())
            .collect();
        let unknown = format!(r#"{{"providers": {{"{long}": {{"rate_rpm": 5}}}}}}"#);
        let unknown = parse(unknown.as_bytes()).unwrap().apply_to(&hot(), &NAMES);
        messages.push(unknown.unwrap_err().to_string());
        for got in messages {
            for internal in [
                "InternalError",
                "TapeError",
                "ErrorType",
                "Some(",
                "struct ",
            ] {
                assert!(!got.contains(internal), "{internal} in {got:?}");
            }
            assert!(!got.contains('\n'), "one line: {got:?}");
            assert!(got.chars().count() <= 400, "short: {got:?}");
        }
    }

    #[test]
    fn every_refusal_has_a_documented_shape() {
        let mut errors: Vec<PatchError> = MALFORMED
            .iter()
            .map(|(body, _)| parse(body).unwrap_err())
            .collect();
        let fields: &[&[u8]] = &[
            br#"{"zzz": 1}"#,
            br#"{"providers": {"nvidia": {"zzz": 1}}}"#,
            br#"{"rate_rpm": "fast"}"#,
            br#"{"log_level": 5}"#,
            br#"{"providers": []}"#,
            br#"{"providers": {"nvidia": 5}}"#,
            br#"{"fallback_enabled_passthrough": 1}"#,
        ];
        errors.extend(fields.iter().map(|body| parse(body).unwrap_err()));
        let applied: &[&[u8]] = &[
            br#"{"rate_rpm": 0}"#,
            br#"{"providers": {"openai": {"bucket_capacity": 0.5}}}"#,
            br#"{"log_level": "loud\n"}"#,
            br#"{"providers": {"nope": {"rate_rpm": 5}}}"#,
            br#"{"providers": {}}"#,
        ];
        errors.extend(
            applied
                .iter()
                .map(|body| parse(body).unwrap().apply_to(&hot(), &NAMES).unwrap_err()),
        );
        errors.push(PatchError::Malformed(JsonError::At {
            at: Position { line: 1, column: 1 },
            problem: Problem::Refused,
        }));
        for e in &errors {
            assert!(e.is_documented(), "not in MESSAGES: {e}");
        }
        // Each shape is used.
        for shape in MESSAGES {
            assert!(
                errors.iter().any(|e| shape_fits(shape, &e.to_string())),
                "no test gives {shape}"
            );
        }
    }

    #[test]
    fn an_internal_or_multi_line_message_is_not_documented() {
        assert!(!MESSAGES.iter().any(|m| shape_fits(
            m,
            "malformed JSON: InternalError(TapeError) at character 12"
        )));
        assert!(shape_fits("a <x>; b", "a one; b"));
        assert!(!shape_fits("a <x>; b", "a one\ntwo; b"));
        assert!(!shape_fits("line <n>", "line 1x"));
        assert!(shape_fits("<a|b> c", "b c"));
        let two_lines = PatchError::Invalid {
            field: "rate_rpm".into(),
            problem: "5 is out of range\n".into(),
            accepted: "x",
        };
        assert!(!two_lines.is_documented());
    }

    #[test]
    fn a_provider_entry_of_the_wrong_type_says_what_it_accepts() {
        let got = parse(br#"{"providers": {"nvidia": 5}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            got,
            "providers.nvidia: wrong type: expected an object; accepted: an object with rate_rpm, bucket_capacity, queue_max_size or low_priority_timeout"
        );
        let got = parse(br#"{"providers": {"a\nb": {"rate_rpm": "x"}}}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            got,
            r#"providers.a\nb.rate_rpm: wrong type: expected a number; accepted: a number of requests per minute above 0, at most 6000000"#
        );
    }
}
