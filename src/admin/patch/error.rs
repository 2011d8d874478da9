//! Why a patch was refused, and the shape of every message that says so.

use crate::config::runtime::{self, Refused};

use super::json::JsonError;

/// Why a patch was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PatchError {
    /// The body is not a JSON object of fields (the answer's code is `invalid_json`).
    #[error(transparent)]
    Malformed(#[from] JsonError),
    #[error("unknown field \"{field}\"; accepted: {accepted}")]
    UnknownField { field: String, accepted: String },
    #[error("{field}: {problem}; accepted: {accepted}")]
    Invalid {
        field: String,
        problem: String,
        accepted: String,
    },
    #[error("unknown provider \"{name}\"; configured: {configured}")]
    UnknownProvider { name: String, configured: String },
    #[error("the patch changes nothing: send at least one of {}", top_fields())]
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
    "the patch changes nothing: send at least one of rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout, tokens_per_minute, request_timeout, fallback_enabled_passthrough, log_level, providers",
];

impl PatchError {
    /// The message is one line and has one of the shapes of [`MESSAGES`].
    pub fn is_documented(&self) -> bool {
        let message = self.to_string();
        !message.contains(['\n', '\r']) && MESSAGES.iter().any(|m| shape_fits(m, &message))
    }
}

/// Whether `message` has the shape `shape` (placeholders as in [`MESSAGES`]).
pub(super) fn shape_fits(shape: &str, message: &str) -> bool {
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

impl From<Refused> for PatchError {
    fn from(r: Refused) -> Self {
        PatchError::Invalid {
            field: r.field,
            problem: r.problem,
            accepted: r.accepted,
        }
    }
}

/// The fields a patch may set at the top level: every run-time field, and `providers`.
pub(super) fn top_fields() -> String {
    format!("{}, providers", runtime::names(None).join(", "))
}
