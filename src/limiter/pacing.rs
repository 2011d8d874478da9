//! How a limiter is paced: the window it counts in, the window guard's margin and how
//! often it may probe above a learned limit; and [`nanos`], the one conversion of these
//! durations to the clock nanoseconds every rule works in.

use std::time::Duration;

use super::guard::Margin;

/// How a provider is paced: the window it counts in and how limits are learned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacing {
    /// The window the provider counts requests in.
    pub window: Duration,
    /// Safety margin of the window guard.
    pub margin: Margin,
    /// Least time between two probes above the learned limit.
    pub probe_interval: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            margin: Margin {
                fraction: 0.005,
                floor: Duration::from_millis(50),
            },
            probe_interval: Duration::from_secs(600),
        }
    }
}
