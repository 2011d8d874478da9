//! A configuration change: parsed with simd-json into typed structs, validated whole,
//! then turned into the next [`Hot`] value.
//!
//! The fields a patch may set, and what each accepts, are the rows of the run-time table
//! ([`crate::config::runtime`]), the same the configuration checks. Every problem is a
//! [`PatchError`] with a one-line message: a body that is not a JSON object of fields
//! says what is wrong and at which line and column ([`json`]); a field problem names the
//! field (its full path, such as `providers.nvidia.rate_rpm`) and what it accepts.
//! [`MESSAGES`] lists every message's shape. Nothing is applied unless every field is
//! valid.

mod error;
mod json;
mod problem;
mod scan;

use serde_path_to_error::Segment;

use crate::config::runtime::{self, Scope};
use crate::hot::Hot;

pub use crate::config::runtime::{Patch, ProviderPatch};
pub use error::{PatchError, MESSAGES};
pub use json::{JsonError, Position};
pub use problem::{Escape, Expected, Found, Problem, MAX_DEPTH};

/// Largest accepted body.
pub const MAX_BODY: usize = 64 * 1024;

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
                runtime::names(Some(Scope::Provider)).join(", ")
            } else {
                error::top_fields()
            };
            return PatchError::UnknownField {
                field: problem::printable(&shown, 100),
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
        ["providers"] => (
            "an object",
            "an object of provider name to fields".to_owned(),
        ),
        ["providers", _] => {
            let mut fields = runtime::names(Some(Scope::Provider));
            let last = fields.pop().unwrap_or_default();
            let fields = format!("{} or {last}", fields.join(", "));
            ("an object", format!("an object with {fields}"))
        }
        // A known field: an unknown one was named above.
        [field] | ["providers", _, field] => match runtime::field(field) {
            Some(f) => (f.range.kind(), f.range.accepted()),
            None => ("an object", String::new()),
        },
        // The root: not reached, the body is known to be an object.
        _ => ("an object", "a JSON object of fields to change".to_owned()),
    };
    PatchError::Invalid {
        field: problem::printable(&shown, 100),
        problem: format!("wrong type: expected {expected}"),
        accepted,
    }
}

impl Patch {
    /// The value `old` becomes under this patch; `names` are the providers in order.
    /// Validates every field before returning anything.
    pub fn apply_to(&self, old: &Hot, names: &[&str]) -> Result<Hot, PatchError> {
        if self.is_empty() {
            return Err(PatchError::Empty);
        }
        let mut new = old.clone();
        new.patch_global(self)?;
        let all = self.all();
        new.defaults.patch("", &all)?;
        for p in &mut new.providers {
            p.patch("", &all)?;
        }
        for (name, patch) in self.providers.iter().flatten() {
            let Some(i) = names.iter().position(|n| n == name) else {
                return Err(PatchError::UnknownProvider {
                    name: problem::printable(name, 100),
                    configured: names.join(", "),
                });
            };
            new.providers[i].patch(&format!("providers.{name}."), patch)?;
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

/// The fields that differ between `old` and `new`: the global ones, then the provider
/// fields of the defaults and of each provider (`providers.<name>.<field>`).
pub fn diff(old: &Hot, new: &Hot, names: &[&str]) -> Vec<Change> {
    let mut out = Vec::new();
    changed("", old.shown(), new.shown(), &mut out);
    changed("", old.defaults.shown(), new.defaults.shown(), &mut out);
    for ((a, b), name) in old.providers.iter().zip(&new.providers).zip(names) {
        changed(
            &format!("providers.{name}."),
            a.shown(),
            b.shown(),
            &mut out,
        );
    }
    out
}

/// Adds to `out` each field of `old` whose value differs in `new` (both as shown, in
/// the table's order), named with `prefix`.
fn changed(prefix: &str, old: Shown, new: Shown, out: &mut Vec<Change>) {
    for ((field, old), (_, new)) in old.into_iter().zip(new) {
        if old != new {
            out.push(Change {
                field: format!("{prefix}{field}"),
                old,
                new,
            });
        }
    }
}

/// Fields with their values as the admin API shows them.
type Shown = Vec<(&'static str, serde_json::Value)>;

#[cfg(test)]
mod tests;
