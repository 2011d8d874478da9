//! The checks several settings share, each with the words its error uses.
//!
//! A [`Range`] is a set of accepted values with both bounds written down; the same range
//! checks a value and says what it accepts, so a message cannot name other bounds than
//! the ones checked.

use std::time::Duration;

use super::error::ConfigError;

/// The values a setting accepts. Every numeric range is closed at both ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    /// Requests per minute: above 0, at most `max`.
    Rate { max: f64 },
    /// An integer from `min` to `max`.
    Integer { min: u64, max: u64 },
    /// A number of seconds from `min` to `max`.
    Seconds { min: f64, max: f64 },
    /// `true` or `false`.
    Switch,
    /// A log level (see [`LEVELS`]).
    Level,
}

/// The durations most settings accept: from a millisecond to a day.
pub const SECONDS: Range = Range::Seconds {
    min: 0.001,
    max: 86_400.0,
};

/// The log levels, as the messages list them.
pub const LEVELS: &str = r#"one of "error", "warn", "info", "debug", "trace""#;

impl Range {
    /// Whether the number `v` is in the range (never for a switch or a level).
    pub fn admits(&self, v: f64) -> bool {
        match *self {
            Range::Rate { max } => v.is_finite() && v > 0.0 && v <= max,
            Range::Integer { min, max } => {
                v.is_finite() && v.fract() == 0.0 && v >= min as f64 && v <= max as f64
            }
            Range::Seconds { min, max } => v.is_finite() && (min..=max).contains(&v),
            Range::Switch | Range::Level => false,
        }
    }

    /// What the range accepts, in words: `an integer from 1 to 1000000`.
    pub fn accepted(&self) -> String {
        match *self {
            Range::Rate { max } => {
                format!("a number of requests per minute above 0, at most {max}")
            }
            Range::Integer { min, max } => format!("an integer from {min} to {max}"),
            Range::Seconds { min, max } => format!("a number of seconds from {min} to {max}"),
            Range::Switch => "true or false".to_owned(),
            Range::Level => LEVELS.to_owned(),
        }
    }

    /// What a configuration error says is accepted: [`Range::accepted`], but for the
    /// rate, whose configuration wording is older than the admin API's (the command
    /// line's messages keep it). Both name the same bound.
    pub fn expected(&self) -> String {
        match *self {
            Range::Rate { max } => format!("requests per minute greater than 0 and at most {max}"),
            _ => self.accepted(),
        }
    }

    /// What a value in the range is in JSON, for a wrong-type message.
    pub fn kind(&self) -> &'static str {
        match self {
            Range::Rate { .. } | Range::Integer { .. } | Range::Seconds { .. } => "a number",
            Range::Switch => "true or false",
            Range::Level => "a string",
        }
    }
}

/// A duration in [`SECONDS`].
pub fn seconds(setting: &str, value: f64) -> Result<Duration, ConfigError> {
    seconds_in(setting, value, SECONDS)
}

/// A duration in `range` (a [`Range::Seconds`]).
pub fn seconds_in(setting: &str, value: f64, range: Range) -> Result<Duration, ConfigError> {
    if range.admits(value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::invalid(setting, value, &range.expected()))
    }
}

/// A count in `range` (a [`Range::Integer`]).
pub fn count_in(setting: &str, value: u32, range: Range) -> Result<u32, ConfigError> {
    if range.admits(f64::from(value)) {
        Ok(value)
    } else {
        Err(ConfigError::invalid(setting, value, &range.expected()))
    }
}

/// A value of at least `min` (no upper bound but the type's).
pub fn at_least<T: PartialOrd + std::fmt::Display + Copy>(
    setting: &str,
    value: T,
    min: T,
    expected: &str,
) -> Result<T, ConfigError> {
    if value >= min {
        Ok(value)
    } else {
        Err(ConfigError::invalid(setting, value, expected))
    }
}

/// A fraction above 0, below 1 (`open_top`) or at most 1.
pub fn fraction(setting: &str, v: f64, open_top: bool) -> Result<f64, ConfigError> {
    let ok = v.is_finite() && v > 0.0 && if open_top { v < 1.0 } else { v <= 1.0 };
    if ok {
        Ok(v)
    } else {
        Err(ConfigError::invalid(
            setting,
            v,
            if open_top {
                "a fraction greater than 0 and less than 1"
            } else {
                "a fraction greater than 0 and at most 1"
            },
        ))
    }
}
