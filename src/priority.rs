//! Request priority, from the `X-Priority` header.
//!
//! Accepted: `high`, `normal`, `low` (any case) or `0`, `1`, `2`; absent means
//! `normal`. Anything else is a client error that says what is accepted.

use std::fmt;

/// Three levels, highest first; the discriminant is the queue index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    High = 0,
    Normal = 1,
    Low = 2,
}

/// The header value was not a priority.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid X-Priority {value:?}: expected high, normal or low (or 0, 1, 2)")]
pub struct InvalidPriority {
    pub value: String,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Parses a header value (raw bytes: a non-UTF-8 value is invalid, not a panic).
    pub fn parse(raw: &[u8]) -> Result<Self, InvalidPriority> {
        let trimmed = raw.trim_ascii();
        let p = if trimmed.eq_ignore_ascii_case(b"high") || trimmed == b"0" {
            Priority::High
        } else if trimmed.eq_ignore_ascii_case(b"normal") || trimmed == b"1" {
            Priority::Normal
        } else if trimmed.eq_ignore_ascii_case(b"low") || trimmed == b"2" {
            Priority::Low
        } else {
            let value = String::from_utf8_lossy(raw).chars().take(64).collect();
            return Err(InvalidPriority { value });
        };
        Ok(p)
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_parse_in_any_case() {
        assert_eq!(Priority::parse(b"HIGH"), Ok(Priority::High));
        assert_eq!(Priority::parse(b" low "), Ok(Priority::Low));
        assert_eq!(Priority::parse(b"1"), Ok(Priority::Normal));
        assert_eq!(Priority::parse(b"0"), Ok(Priority::High));
        assert_eq!(Priority::parse(b"2"), Ok(Priority::Low));
    }

    #[test]
    fn anything_else_is_refused_with_the_accepted_values() {
        for bad in [&b"urgent"[..], b"3", b"", b"\xff\xfe", b"hi gh"] {
            let e = Priority::parse(bad).unwrap_err();
            assert!(e.to_string().contains("expected high, normal or low"));
        }
    }
}
