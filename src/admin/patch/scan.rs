//! One pass over a patch body that finds the first problem with it as JSON, and where.
//!
//! A validator, not a parser: it builds no values (simd-json does that) and keeps only
//! the stack of open objects and arrays. Beyond RFC 8259 it refuses what simd-json cannot
//! hold or reads wrongly: non-finite numbers, integers beyond 64 bits, exponents beyond
//! ±9999 (simd-json truncates them: it reads `1e-4294967295` as 10), lone surrogates
//! (simd-json reads one as U+0000); and nesting deeper than [`MAX_DEPTH`] (a patch needs
//! 3 levels). On a body it accepts it returns where each value and field name starts,
//! in the order of simd-json's tape.

use super::problem::{printable, Escape, Expected, Found, Problem, MAX_DEPTH};

/// Longest piece of the body (a number, a word) quoted in a message.
const QUOTE_MAX: usize = 40;

/// Reads `body` as JSON without building values. Returns where each value and field
/// name starts, in reading order (the order of simd-json's tape), or the first problem
/// and the byte where it is.
pub fn scan(body: &[u8]) -> Result<Vec<usize>, (usize, Problem)> {
    Scanner {
        b: body,
        i: 0,
        starts: Vec::new(),
    }
    .run()
}

struct Scanner<'a> {
    b: &'a [u8],
    /// The next byte to read.
    i: usize,
    starts: Vec<usize>,
}

type Scan<T> = Result<T, (usize, Problem)>;

impl Scanner<'_> {
    fn run(mut self) -> Scan<Vec<usize>> {
        // The open objects (`{`) and arrays (`[`), innermost last.
        let mut open: Vec<u8> = Vec::new();
        let mut expected = Expected::Value;
        loop {
            // A value.
            self.space();
            match self.peek() {
                None => return Err((self.i, Problem::EndsEarly(expected))),
                Some(c @ (b'{' | b'[')) => {
                    if open.len() == MAX_DEPTH {
                        return Err((self.i, Problem::TooDeep));
                    }
                    self.starts.push(self.i);
                    self.i += 1;
                    open.push(c);
                    self.space();
                    let close = if c == b'{' { b'}' } else { b']' };
                    if self.peek() != Some(close) {
                        if c == b'{' {
                            self.name(Expected::KeyOrClose)?;
                            expected = Expected::Value;
                        } else {
                            expected = Expected::ValueOrClose;
                        }
                        continue;
                    }
                    self.i += 1;
                    open.pop();
                }
                Some(b'"') => {
                    self.starts.push(self.i);
                    self.string()?;
                }
                Some(_) => {
                    self.starts.push(self.i);
                    self.scalar(expected)?;
                }
            }
            // After a value: close what it completes, then a comma or the end.
            loop {
                self.space();
                let Some(&inner) = open.last() else {
                    return match self.char_here() {
                        None => Ok(self.starts),
                        Some(Ok(c)) => Err((self.i, Problem::Trailing(c))),
                        Some(Err(p)) => Err((self.i, p)),
                    };
                };
                let (close, what) = if inner == b'{' {
                    (b'}', Expected::CommaOrBrace)
                } else {
                    (b']', Expected::CommaOrBracket)
                };
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        break;
                    }
                    Some(c) if c == close => {
                        self.i += 1;
                        open.pop();
                    }
                    _ => return Err(self.unexpected(what)),
                }
            }
            if open.last() == Some(&b'{') {
                self.name(Expected::Key)?;
            }
            expected = Expected::Value;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// The character at `i`: `None` at the end, an error for invalid UTF-8.
    fn char_at(&self, i: usize) -> Option<Result<char, Problem>> {
        let b = *self.b.get(i)?;
        let end = (i + 4).min(self.b.len());
        let valid = match std::str::from_utf8(&self.b[i..end]) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&self.b[i..i + e.valid_up_to()]).unwrap_or_default(),
        };
        Some(valid.chars().next().ok_or(Problem::InvalidUtf8(b)))
    }

    fn char_here(&self) -> Option<Result<char, Problem>> {
        self.char_at(self.i)
    }

    /// The problem with the byte at `i`, where `expected` was wanted.
    fn unexpected(&self, expected: Expected) -> (usize, Problem) {
        let problem = match self.char_here() {
            None => Problem::EndsEarly(expected),
            Some(Ok(c)) => Problem::Unexpected {
                found: Found::Char(c),
                expected,
            },
            Some(Err(p)) => p,
        };
        (self.i, problem)
    }

    /// A field name and its colon, after `{` or a comma (whitespace skipped).
    fn name(&mut self, expected: Expected) -> Scan<()> {
        self.space();
        if self.peek() != Some(b'"') {
            return Err(self.unexpected(expected));
        }
        self.starts.push(self.i);
        self.string()?;
        self.space();
        if self.peek() != Some(b':') {
            return Err(self.unexpected(Expected::Colon));
        }
        self.i += 1;
        Ok(())
    }

    /// A string, from its opening quote at `i`.
    fn string(&mut self) -> Scan<()> {
        let open = self.i;
        let mut j = open + 1;
        loop {
            let Some(&c) = self.b.get(j) else {
                return Err((open, Problem::UnterminatedString));
            };
            match c {
                b'"' => {
                    self.i = j + 1;
                    return Ok(());
                }
                b'\\' => j = self.escape(open, j)?,
                0..=0x1F => return Err((j, Problem::ControlCharacter(c))),
                0x20..=0x7F => j += 1,
                _ => match self.char_at(j) {
                    Some(Ok(ch)) => j += ch.len_utf8(),
                    Some(Err(p)) => return Err((j, p)),
                    None => return Err((open, Problem::UnterminatedString)),
                },
            }
        }
    }

    /// An escape at `j` (a backslash) in the string opened at `open`; returns the byte
    /// after it.
    fn escape(&self, open: usize, j: usize) -> Scan<usize> {
        match self.b.get(j + 1) {
            None => Err((open, Problem::UnterminatedString)),
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(j + 2),
            Some(b'u') => {
                let bad = (j, Problem::InvalidUnicodeEscape);
                let unit = self.hex4(j + 2).ok_or(bad.clone())?;
                match unit {
                    // A high surrogate must be followed by an escaped low one.
                    0xD800..=0xDBFF => {
                        let low = (self.b.get(j + 6..j + 8) == Some(b"\\u"))
                            .then(|| self.hex4(j + 8))
                            .flatten();
                        match low {
                            Some(0xDC00..=0xDFFF) => Ok(j + 12),
                            _ => Err(bad),
                        }
                    }
                    0xDC00..=0xDFFF => Err(bad),
                    _ => Ok(j + 6),
                }
            }
            Some(_) => match self.char_at(j + 1) {
                Some(Ok(c)) => Err((j, Problem::InvalidEscape(Escape(c)))),
                Some(Err(p)) => Err((j + 1, p)),
                None => Err((open, Problem::UnterminatedString)),
            },
        }
    }

    fn hex4(&self, at: usize) -> Option<u16> {
        let digits = std::str::from_utf8(self.b.get(at..at + 4)?).ok()?;
        if !digits.bytes().all(|d| d.is_ascii_hexdigit()) {
            return None;
        }
        u16::from_str_radix(digits, 16).ok()
    }

    /// A number, `true`, `false` or `null` at `i` (or what stands in their place).
    fn scalar(&mut self, expected: Expected) -> Scan<()> {
        let start = self.i;
        let first = self.b[start];
        if !(first.is_ascii_alphanumeric() || matches!(first, b'-' | b'+' | b'.')) {
            return Err(self.unexpected(expected));
        }
        // The whole run of characters a number or a word can hold (ASCII only).
        let len = self.b[start..]
            .iter()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'+' | b'.'))
            .count();
        self.i = start + len;
        let token = std::str::from_utf8(&self.b[start..start + len]).unwrap_or_default();
        let quoted = || printable(token, QUOTE_MAX);
        let unsigned = token.strip_prefix(['-', '+']).unwrap_or(token);
        if ["nan", "inf", "infinity"]
            .iter()
            .any(|w| unsigned.eq_ignore_ascii_case(w))
        {
            return Err((start, Problem::NonFinite(quoted())));
        }
        if first.is_ascii_alphabetic() {
            return match token {
                "true" | "false" | "null" => Ok(()),
                _ => Err((
                    start,
                    Problem::Unexpected {
                        found: Found::Word(quoted()),
                        expected,
                    },
                )),
            };
        }
        if !is_number(token) {
            return Err((start, Problem::InvalidNumber(quoted())));
        }
        if !token.contains(['.', 'e', 'E']) {
            // simd-json holds integers as i64 or u64.
            let fits = if token.starts_with('-') {
                token.parse::<i64>().is_ok()
            } else {
                token.parse::<u64>().is_ok()
            };
            if !fits {
                return Err((start, Problem::IntegerTooLarge(quoted())));
            }
        } else if token.parse::<f64>().is_ok_and(f64::is_infinite) {
            return Err((start, Problem::NonFinite(quoted())));
        } else if exponent_digits(token) > 4 {
            // simd-json refuses exponents beyond about 2^32 and truncates smaller large
            // ones (it would read 1e-4294967295 as 10).
            return Err((start, Problem::ExponentTooLarge(quoted())));
        }
        Ok(())
    }
}

/// The number of significant digits in the exponent of a well-formed number.
fn exponent_digits(number: &str) -> usize {
    number
        .split_once(['e', 'E'])
        .map_or(0, |(_, e)| e.trim_start_matches(['+', '-', '0']).len())
}

/// RFC 8259's number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn is_number(s: &str) -> bool {
    fn digits(s: &[u8]) -> usize {
        s.iter().take_while(|c| c.is_ascii_digit()).count()
    }
    let s = s.as_bytes();
    let mut i = usize::from(s.first() == Some(&b'-'));
    let int = digits(&s[i..]);
    if int == 0 || (int > 1 && s[i] == b'0') {
        return false;
    }
    i += int;
    if s.get(i) == Some(&b'.') {
        let frac = digits(&s[i + 1..]);
        if frac == 0 {
            return false;
        }
        i += 1 + frac;
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let exp = digits(&s[i..]);
        if exp == 0 {
            return false;
        }
        i += exp;
    }
    i == s.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_follow_the_rfc_grammar() {
        for ok in ["0", "-0", "40", "0.5", "1e3", "1E+3", "-2.5e-3", "10"] {
            assert!(is_number(ok), "{ok}");
        }
        for bad in [
            "", "-", "01", "+1", ".5", "1.", "1e", "1e+", "0x1", "1.2.3", "--1",
        ] {
            assert!(!is_number(bad), "{bad}");
        }
    }

    #[test]
    fn the_scan_records_where_each_tape_node_starts() {
        let body = br#" {"a": [1, "x", {}], "b": {"c": null}} "#;
        let starts = scan(body).unwrap();
        let mut buf = body.to_vec();
        let tape = simd_json::to_tape(&mut buf).unwrap();
        assert_eq!(starts.len(), tape.0.len());
        let firsts: String = starts.iter().map(|&i| char::from(body[i])).collect();
        assert_eq!(firsts, r#"{"[1"{"{"n"#);
    }

    #[test]
    fn nesting_up_to_the_limit_is_read() {
        let at = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(scan(at(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            scan(at(MAX_DEPTH + 1).as_bytes()),
            Err((MAX_DEPTH, Problem::TooDeep))
        );
    }
}
