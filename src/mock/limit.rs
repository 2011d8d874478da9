//! The simulated provider's limit: at most `n` requests in any rolling 60 seconds.
//!
//! This is what "40 requests a minute" means at a provider, and deliberately not the
//! sidecar's own algorithm, so the tests measure the sidecar against an independent
//! judge. The last `n` admission times sit in a ring; a request is allowed when the
//! oldest of them is at least 60 s old. It is a test double: a mutex is fine here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// What is left of the window after an admission (sent as `x-ratelimit-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub remaining: usize,
    /// Until the oldest admission in the window leaves it.
    pub reset: Duration,
}

/// Rolling-window request limit.
#[derive(Debug)]
pub struct WindowLimit {
    max: usize,
    window: Duration,
    times: Mutex<VecDeque<Instant>>,
}

impl WindowLimit {
    /// `rpm` rounded down (at least 1) per rolling minute.
    pub fn per_minute(rpm: f64) -> Self {
        Self::new(rpm, Duration::from_secs(60))
    }

    /// `rpm × window / 60 s` requests (at least 1) per rolling `window`: a short window
    /// lets tests provoke and clear 429s in seconds.
    pub fn new(rpm: f64, window: Duration) -> Self {
        let max = ((rpm * window.as_secs_f64() / 60.0).floor() as usize).max(1);
        Self {
            max,
            window,
            times: Mutex::new(VecDeque::with_capacity(max.min(1 << 20))),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Admits now, or says how long until the oldest admission leaves the window.
    pub fn try_acquire(&self) -> Result<Quota, Duration> {
        self.try_acquire_at(Instant::now())
    }

    /// Admits at `now` and tells what is left of the window, or how long to wait.
    pub fn try_acquire_at(&self, now: Instant) -> Result<Quota, Duration> {
        let mut times = self.times.lock();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        if times.len() < self.max {
            times.push_back(now);
            let oldest = times.front().copied().unwrap_or(now);
            Ok(Quota {
                remaining: self.max - times.len(),
                reset: self
                    .window
                    .saturating_sub(now.saturating_duration_since(oldest)),
            })
        } else {
            let oldest = times.front().copied().unwrap_or(now);
            Err(self
                .window
                .saturating_sub(now.saturating_duration_since(oldest)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn n_per_rolling_minute_then_wait_for_the_oldest() {
        let l = WindowLimit::per_minute(3.0);
        let t0 = Instant::now();
        let q = |remaining, reset| {
            Ok(Quota {
                remaining,
                reset: Duration::from_secs(reset),
            })
        };
        assert_eq!(l.try_acquire_at(t0), q(2, 60));
        assert_eq!(l.try_acquire_at(t0 + Duration::from_secs(10)), q(1, 50));
        assert_eq!(l.try_acquire_at(t0 + Duration::from_secs(20)), q(0, 40));
        assert_eq!(
            l.try_acquire_at(t0 + Duration::from_secs(30)),
            Err(Duration::from_secs(30))
        );
        assert!(l.try_acquire_at(t0 + Duration::from_secs(60)).is_ok());
        assert!(l.try_acquire_at(t0 + Duration::from_secs(61)).is_err());
    }
}
