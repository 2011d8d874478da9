//! Whether a patch body is a JSON object of fields, and if not, why and where, in words.
//!
//! simd-json stays the parser (values, unescaping, the typed fields). Its refusals name
//! internal states (`InternalError(TapeError)`) at byte indexes that often point elsewhere
//! (0 for an unterminated string, the closing brace for trailing data), so [`check`] first
//! reads the body with [`scan`](super::scan::scan), which stops at the first problem in
//! reading order, then checks simd-json's tape for what the grammar allows but a patch
//! does not: a root that is not an object, a field name given twice (simd-json unescapes
//! the names; the scan says where each one starts). Every refusal is a [`JsonError`]: one
//! line, with the line and column of the problem.
//!
//! A byte-order mark is refused, not skipped: RFC 8259 §8.1 says senders must not add
//! one, and the message says how to send the body instead.

use std::collections::HashSet;
use std::fmt;

use simd_json::{Node, StaticNode};

use super::problem::{printable, Problem};
use super::scan::scan;

/// A place in the body: 1-based line and column; a column counts characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl Position {
    /// The position of byte `offset` of `body`.
    pub fn of(body: &[u8], offset: usize) -> Self {
        let before = &body[..offset.min(body.len())];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        Position {
            line: 1 + before.iter().filter(|&&b| b == b'\n').count(),
            // UTF-8 continuation bytes (0b10xx_xxxx) do not start a character.
            column: 1 + before[line_start..]
                .iter()
                .filter(|&&b| b & 0xC0 != 0x80)
                .count(),
        }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A body that is not a JSON object of fields.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JsonError {
    #[error("malformed JSON: the body is empty; send a JSON object of fields to change")]
    Empty,
    #[error("malformed JSON: the body starts with a byte-order mark (U+FEFF); send UTF-8 JSON without it")]
    ByteOrderMark,
    #[error("malformed JSON at {at}: {problem}")]
    At { at: Position, problem: Problem },
}

/// Checks that `body` is a JSON object with no duplicate field and nesting within
/// [`MAX_DEPTH`](super::MAX_DEPTH); every refusal names the first problem in reading order.
pub fn check(body: &[u8]) -> Result<(), JsonError> {
    if body.trim_ascii().is_empty() {
        return Err(JsonError::Empty);
    }
    // UTF-8's encoding of U+FEFF, and UTF-16's in either byte order.
    if [&[0xEF, 0xBB, 0xBF][..], &[0xFE, 0xFF], &[0xFF, 0xFE]]
        .iter()
        .any(|bom| body.starts_with(bom))
    {
        return Err(JsonError::ByteOrderMark);
    }
    let at = |(offset, problem): (usize, Problem)| JsonError::At {
        at: Position::of(body, offset),
        problem,
    };
    let starts = scan(body).map_err(at)?;
    // simd-json parses in place: a copy.
    let mut buf = body.to_vec();
    let tape = simd_json::to_tape(&mut buf).map_err(|e| refused(body, &e))?;
    debug_assert_eq!(starts.len(), tape.0.len(), "the scan and the tape disagree");
    shape(&tape.0, &starts).map_err(at)
}

/// A refusal by simd-json itself, at its position.
pub fn refused(body: &[u8], e: &simd_json::Error) -> JsonError {
    JsonError::At {
        at: Position::of(body, e.index()),
        problem: Problem::Refused,
    }
}

/// The root is an object, and no object repeats a field name. `nodes` is simd-json's
/// tape of the body; `starts[k]` is the byte where its node `k` starts.
fn shape(nodes: &[Node<'_>], starts: &[usize]) -> Result<(), (usize, Problem)> {
    let start = |k: usize| starts.get(k).copied().unwrap_or(0);
    let not = match nodes.first() {
        Some(Node::Object { .. }) | None => None,
        Some(Node::Array { .. }) => Some("an array"),
        Some(Node::String(_)) => Some("a string"),
        Some(Node::Static(StaticNode::Null)) => Some("null"),
        Some(Node::Static(StaticNode::Bool(true))) => Some("true"),
        Some(Node::Static(StaticNode::Bool(false))) => Some("false"),
        Some(Node::Static(_)) => Some("a number"),
    };
    if let Some(kind) = not {
        return Err((start(0), Problem::NotAnObject(kind)));
    }

    let mut open: Vec<Open<'_>> = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        if open.last().is_some_and(|o| o.at_name) {
            let Node::String(name) = *node else {
                continue;
            };
            let last = open.len() - 1;
            if !open[last].names.as_mut().is_none_or(|n| n.insert(name)) {
                let path = path(&open[..last], name);
                return Err((start(k), Problem::DuplicateField(printable(&path, 100))));
            }
            open[last].current = Ok(name);
            open[last].at_name = false;
            continue;
        }
        let (len, object) = match node {
            Node::Object { len, .. } => (*len, true),
            Node::Array { len, .. } => (*len, false),
            _ => (0, false),
        };
        if len > 0 {
            open.push(Open {
                left: len,
                names: object.then(HashSet::new),
                at_name: object,
                current: Err(0),
            });
            continue;
        }
        // A value ends here: count it in each container it completes.
        while let Some(o) = open.last_mut() {
            o.left -= 1;
            if o.left > 0 {
                o.at_name = o.names.is_some();
                if let Err(i) = &mut o.current {
                    *i += 1;
                }
                break;
            }
            open.pop();
        }
    }
    Ok(())
}

/// An object or array being read from the tape.
struct Open<'t> {
    /// Entries or elements not yet read.
    left: usize,
    /// For an object, the names read so far; `None` for an array.
    names: Option<HashSet<&'t str>>,
    /// The next node of an object is a name (not a value).
    at_name: bool,
    /// The entry being read: its name, or its index in an array.
    current: Result<&'t str, usize>,
}

/// The path of field `name` inside the containers `parents`: `providers.nvidia.rate_rpm`
/// (an empty name shows as `""`).
fn path(parents: &[Open<'_>], name: &str) -> String {
    let mut out = String::new();
    let names = parents.iter().map(|o| o.current).chain([Ok(name)]);
    for segment in names {
        match segment {
            Ok(n) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(if n.is_empty() { "\"\"" } else { n });
            }
            Err(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_count_lines_and_characters() {
        let body = "{\n  \"é\": 1,\r\n\tx".as_bytes();
        assert_eq!(Position::of(body, 0), Position { line: 1, column: 1 });
        let x = body.len() - 1;
        assert_eq!(Position::of(body, x), Position { line: 3, column: 2 });
        let one = body.iter().position(|&b| b == b'1').unwrap();
        assert_eq!(Position::of(body, one), Position { line: 2, column: 8 });
        assert_eq!(Position::of(body, body.len() + 5).line, 3);
    }
}
