//! The simulated provider's limit: at most `n` requests in any rolling 60 seconds.
//!
//! This is what "40 requests a minute" means at a provider, and deliberately not the
//! sidecar's own algorithm, so the tests measure the sidecar against an independent
//! judge. The last `n` admission times sit in a ring; a request is allowed when the
//! oldest of them is at least 60 s old. It is a test double: a mutex is fine here.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

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
    pub fn try_acquire(&self) -> Result<usize, Duration> {
        self.try_acquire_at(Instant::now())
    }

    /// `Ok(remaining)` after admitting at `now`.
    pub fn try_acquire_at(&self, now: Instant) -> Result<usize, Duration> {
        let mut times = self.times.lock();
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        if times.len() < self.max {
            times.push_back(now);
            Ok(self.max - times.len())
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
        assert_eq!(l.try_acquire_at(t0), Ok(2));
        assert_eq!(l.try_acquire_at(t0 + Duration::from_secs(10)), Ok(1));
        assert_eq!(l.try_acquire_at(t0 + Duration::from_secs(20)), Ok(0));
        assert_eq!(
            l.try_acquire_at(t0 + Duration::from_secs(30)),
            Err(Duration::from_secs(30))
        );
        assert!(l.try_acquire_at(t0 + Duration::from_secs(60)).is_ok());
        assert!(l.try_acquire_at(t0 + Duration::from_secs(61)).is_err());
    }
}
