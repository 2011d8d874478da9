//! The fault knobs of one request: the start-up values, each overridden by its
//! `x-mock-*` header (which passes through the sidecar), so one test can slow or break
//! a single answer.

use std::time::Duration;

use http::{HeaderMap, StatusCode};

use super::config::MockConfig;

/// Per-request knobs: start-up values overridden by `x-mock-*` headers.
#[derive(Debug, Clone)]
pub struct Knobs {
    pub latency: Duration,
    pub header_delay: Duration,
    pub token_delay: Duration,
    pub tokens: usize,
    pub status: Option<StatusCode>,
    pub reset_after: Option<usize>,
    /// `x-mock-refuse-include-usage: 1`: answer 400 to a body with `stream_options`, as
    /// some models do (also per model, `--refuse-include-usage`).
    pub refuse_stream_options: bool,
}

impl Knobs {
    pub fn from(config: &MockConfig, h: &HeaderMap) -> Self {
        let num = |name: &str| -> Option<u64> {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok())
        };
        let forced = num("x-mock-status")
            .and_then(|s| u16::try_from(s).ok())
            .and_then(|s| StatusCode::from_u16(s).ok());
        let random_error = config.error_rate > 0.0 && fastrand::f64() < config.error_rate;
        Self {
            latency: Duration::from_millis(num("x-mock-latency-ms").unwrap_or(config.latency_ms)),
            header_delay: Duration::from_millis(
                num("x-mock-header-delay-ms").unwrap_or(config.header_delay_ms),
            ),
            token_delay: Duration::from_millis(
                num("x-mock-token-delay-ms").unwrap_or(config.token_delay_ms),
            ),
            tokens: num("x-mock-tokens").map_or(config.tokens, |n| n.min(100_000) as usize),
            status: forced.or(random_error.then_some(StatusCode::INTERNAL_SERVER_ERROR)),
            reset_after: num("x-mock-reset-after")
                .map(|n| n as usize)
                .or(config.reset_after),
            refuse_stream_options: num("x-mock-refuse-include-usage").is_some_and(|n| n != 0),
        }
    }
}
