//! What is wrong with a patch body as JSON, in words: the problems [`scan`](super::scan)
//! finds and the tape check of [`json`](super::json) adds, each one line, quoting the body
//! only through [`printable`].

use std::fmt;

/// The deepest nesting of objects and arrays read (the body itself is level 1).
pub const MAX_DEPTH: usize = 16;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quoted_piece_of_the_body_is_one_short_line() {
        assert_eq!(printable("a\nb\u{200b}`\"", 20), "a\\nb\\u{200b}`\"");
        assert_eq!(printable(&"x".repeat(50), 4), "xxxx…");
        assert_eq!(printable(&"\u{7f}".repeat(50), 13), "\\u{7f}\\u{7f}…");
        assert_eq!(Shown('`').to_string(), "U+0060");
        assert_eq!(Escape('\n').to_string(), "`\\` before U+000A");
    }
}
