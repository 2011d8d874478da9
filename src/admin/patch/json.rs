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

/// The deepest nesting of objects and arrays read (the body itself is level 1).
pub const MAX_DEPTH: usize = 16;

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

/// What is wrong at a position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Problem {
    #[error("the body must be a JSON object of fields to change, not {0}")]
    NotAnObject(&'static str),
    #[error("unexpected {found}; expected {expected}")]
    Unexpected { found: Found, expected: Expected },
    #[error("the body ends early; expected {0}")]
    EndsEarly(Expected),
    #[error("unexpected character {} after the end of the JSON value", Shown(*.0))]
    Trailing(char),
    #[error("unterminated string; close it with `\"`")]
    UnterminatedString,
    #[error(r#"invalid escape {0} in a string; use \" \\ \/ \b \f \n \r \t or \uXXXX"#)]
    InvalidEscape(Escape),
    #[error(r#"invalid \u escape in a string; write \u and four hex digits (a surrogate pair for characters beyond U+FFFF)"#)]
    InvalidUnicodeEscape,
    #[error(r#"control character U+{0:04X} in a string; write it as an escape such as \t, \n or \u0000"#)]
    ControlCharacter(u8),
    #[error("invalid UTF-8 (byte 0x{0:02X}); send the body as UTF-8")]
    InvalidUtf8(u8),
    #[error("invalid number `{0}`; write numbers such as 40, 0.5 or 1e3")]
    InvalidNumber(String),
    #[error("integer `{0}` does not fit in 64 bits; write it with an exponent, such as 1.8e19")]
    IntegerTooLarge(String),
    #[error("non-finite number `{0}`; send a finite number (JSON has no NaN or Infinity; the largest is about 1.8e308)")]
    NonFinite(String),
    #[error("number `{0}` has an exponent beyond ±9999; write it with a smaller exponent")]
    ExponentTooLarge(String),
    #[error("duplicate field `{0}`; each field may appear once")]
    DuplicateField(String),
    #[error("nesting too deep; at most {MAX_DEPTH} levels of objects and arrays")]
    TooDeep,
    /// simd-json refused a body [`scan`](super::scan::scan) accepts (the fuzz target checks this never
    /// happens); the position is simd-json's.
    #[error("the body is not valid JSON")]
    Refused,
}

/// What was found where something else was expected.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Char(char),
    /// A run of letters that is not `true`, `false` or `null`.
    Word(String),
}

impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Found::Char(c) => write!(f, "character {}", Shown(*c)),
            Found::Word(w) => write!(f, "word `{w}`"),
        }
    }
}

/// What the grammar allows at a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Value,
    ValueOrClose,
    Key,
    KeyOrClose,
    Colon,
    CommaOrBrace,
    CommaOrBracket,
}

impl fmt::Display for Expected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expected::Value => "a value",
            Expected::ValueOrClose => "a value or `]`",
            Expected::Key => "a field name in double quotes",
            Expected::KeyOrClose => "a field name in double quotes or `}`",
            Expected::Colon => "`:` after the field name",
            Expected::CommaOrBrace => "`,` or `}`",
            Expected::CommaOrBracket => "`,` or `]`",
        })
    }
}

/// The character after a backslash that starts no escape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escape(pub char);

impl fmt::Display for Escape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if quotable(self.0) {
            write!(f, "`\\{}`", self.0)
        } else {
            write!(f, "`\\` before U+{:04X}", u32::from(self.0))
        }
    }
}

/// A character as a message shows it: `x` when it is visible ASCII, U+XXXX otherwise
/// (so no message carries a control character, a backtick or a look-alike).
struct Shown(char);

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if quotable(self.0) {
            write!(f, "`{}`", self.0)
        } else {
            write!(f, "U+{:04X}", u32::from(self.0))
        }
    }
}

fn quotable(c: char) -> bool {
    c.is_ascii_graphic() && c != '`'
}

/// Text from the body as a message quotes it: backslashes, control and invisible
/// characters escaped (`\\`, `\n`, `\u{200b}`), at most `max` characters in all.
pub fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut len = 0;
    for c in s.chars() {
        let piece: String = match c {
            '"' | '\'' => c.into(),
            _ => c.escape_debug().collect(),
        };
        len += piece.chars().count();
        if len > max {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// Checks that `body` is a JSON object with no duplicate field and nesting within
/// [`MAX_DEPTH`]; every refusal names the first problem in reading order.
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
    let starts = super::scan::scan(body).map_err(at)?;
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

    #[test]
    fn a_quoted_piece_of_the_body_is_one_short_line() {
        assert_eq!(printable("a\nb\u{200b}`\"", 20), "a\\nb\\u{200b}`\"");
        assert_eq!(printable(&"x".repeat(50), 4), "xxxx…");
        assert_eq!(printable(&"\u{7f}".repeat(50), 13), "\\u{7f}\\u{7f}…");
        assert_eq!(Shown('`').to_string(), "U+0060");
        assert_eq!(Escape('\n').to_string(), "`\\` before U+000A");
    }
}
