//! The simulated provider's limit: at most `max` requests in any rolling `window`.
//!
//! This is what "40 requests a minute" means at a provider, and deliberately not the
//! sidecar's own algorithm, so the tests measure the sidecar against an independent
//! judge. The admission times still inside the window sit in a queue; a request is
//! allowed while fewer than `max` of them are younger than `window`. The limit can change
//! at run time ([`WindowLimit::set`]) and keeps its history: a lowered limit refuses until
//! enough old admissions have left, a raised one admits at once. An unlimited window
//! refuses nothing but still records, so a limit installed later counts what came before.
//! It is a test double: a mutex is fine here.

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

/// A refusal: the limit in force and how long until the window admits again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub max: usize,
    pub window: Duration,
    pub wait: Duration,
}

/// The limit of one window at one moment, as the control endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    /// `None`: unlimited.
    pub max: Option<usize>,
    pub window: Duration,
    /// Admissions younger than `window` (as of the last decision or `state_at`).
    pub in_window: usize,
}

impl LimitState {
    /// The limit per minute, as OpenAI states it (`max × 60 / window`, rounded down); 0
    /// when unlimited.
    pub fn per_minute(&self) -> u64 {
        self.max.map_or(0, |m| per_minute(m, self.window))
    }
}

/// `max` admissions per `window`, expressed per minute and rounded down.
pub fn per_minute(max: usize, window: Duration) -> u64 {
    let w = window.as_secs_f64();
    if w <= 0.0 {
        return 0;
    }
    (max as f64 * 60.0 / w + 1e-9).floor() as u64
}

/// The admissions a window of `window` holds at `rpm` requests a minute: `rpm × window /
/// 60 s` rounded down, at least 1; `None` (unlimited) for `rpm` ≤ 0 or not a number.
pub fn max_for(rpm: f64, window: Duration) -> Option<usize> {
    // Capped far below `usize::MAX`, which marks an unlimited window.
    (rpm > 0.0).then(|| {
        ((rpm * window.as_secs_f64() / 60.0 + 1e-9).floor() as usize).clamp(1, u32::MAX as usize)
    })
}

/// Windows shorter than a millisecond or longer than a day are clamped to those bounds.
pub fn clamp_window(window: Duration) -> Duration {
    window.clamp(Duration::from_millis(1), Duration::from_secs(86_400))
}

/// Rolling-window request limit.
#[derive(Debug)]
pub struct WindowLimit {
    inner: Mutex<Window>,
}

/// The unlocked state: the limit and the admissions still inside the window, oldest first.
#[derive(Debug)]
pub(super) struct Window {
    /// `usize::MAX`: unlimited (the window still records).
    max: usize,
    window: Duration,
    times: VecDeque<Instant>,
}

impl WindowLimit {
    /// `rpm` rounded down (at least 1) per rolling minute.
    pub fn per_minute(rpm: f64) -> Self {
        Self::new(rpm, Duration::from_secs(60))
    }

    /// `rpm × window / 60 s` requests (at least 1) per rolling `window`: a short window
    /// lets tests provoke and clear 429s in seconds.
    pub fn new(rpm: f64, window: Duration) -> Self {
        Self::with_max(max_for(rpm, window).unwrap_or(1), window)
    }

    /// At most `max` (at least 1) admissions per rolling `window`.
    pub fn with_max(max: usize, window: Duration) -> Self {
        let max = max.max(1);
        Self {
            inner: Mutex::new(Window {
                max,
                window,
                times: VecDeque::with_capacity(max.min(1 << 16)),
            }),
        }
    }

    /// A window that refuses nothing but records admissions, for a limit set later.
    pub fn unlimited(window: Duration) -> Self {
        Self {
            inner: Mutex::new(Window {
                max: usize::MAX,
                window,
                times: VecDeque::new(),
            }),
        }
    }

    /// The admissions allowed per window (`usize::MAX` when unlimited).
    pub fn max(&self) -> usize {
        self.inner.lock().max
    }

    pub fn window(&self) -> Duration {
        self.inner.lock().window
    }

    pub fn is_limited(&self) -> bool {
        self.inner.lock().max != usize::MAX
    }

    /// Changes the limit to `max` (at least 1) per `window`, keeping the admissions on
    /// record: a lowered limit refuses until fewer than `max` are younger than `window`, a
    /// raised one admits at once. Admissions already older than the previous window were
    /// forgotten, so a lengthened window counts only what the old one still held.
    pub fn set(&self, max: usize, window: Duration) {
        let mut w = self.inner.lock();
        w.max = max.max(1);
        w.window = window;
    }

    /// Lifts the limit; admissions are still recorded, for a limit set later.
    pub fn set_unlimited(&self, window: Duration) {
        let mut w = self.inner.lock();
        w.max = usize::MAX;
        w.window = window;
    }

    /// The limit and the admissions inside the window at `now`.
    pub fn state_at(&self, now: Instant) -> LimitState {
        let mut w = self.inner.lock();
        w.prune(now);
        w.state()
    }

    /// Admits now, or says how long until the window admits again.
    pub fn try_acquire(&self) -> Result<Quota, Duration> {
        self.try_acquire_at(Instant::now())
    }

    /// Admits at `now` and tells what is left of the window, or how long to wait.
    pub fn try_acquire_at(&self, now: Instant) -> Result<Quota, Duration> {
        let mut w = self.inner.lock();
        w.prune(now);
        w.check(now).map_err(|r| r.wait)?;
        Ok(w.admit(now))
    }

    pub(super) fn lock(&self) -> parking_lot::MutexGuard<'_, Window> {
        self.inner.lock()
    }
}

// === impl Window ===

impl Window {
    /// Forgets admissions that have left the window: one at `t` counts while `now - t <
    /// window`.
    pub(super) fn prune(&mut self, now: Instant) {
        while self
            .times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            self.times.pop_front();
        }
    }

    pub(super) fn is_limited(&self) -> bool {
        self.max != usize::MAX
    }

    /// After `prune(now)`: whether one more admission fits, and if not, how long until
    /// enough old ones leave that it does (after a lowered limit, more than the oldest).
    pub(super) fn check(&self, now: Instant) -> Result<(), Refusal> {
        let held = self.times.len();
        if held < self.max {
            return Ok(());
        }
        // Admitting needs `held - max + 1` departures; the last of them is this one.
        let leaving = self.times[held - self.max];
        Err(Refusal {
            max: self.max,
            window: self.window,
            wait: self
                .window
                .saturating_sub(now.saturating_duration_since(leaving)),
        })
    }

    /// Records an admission at `now` (after a successful `check`).
    pub(super) fn admit(&mut self, now: Instant) -> Quota {
        self.times.push_back(now);
        let oldest = self.times.front().copied().unwrap_or(now);
        Quota {
            remaining: self.max.saturating_sub(self.times.len()),
            reset: self
                .window
                .saturating_sub(now.saturating_duration_since(oldest)),
        }
    }

    /// What is left of the window at `now` (after `prune(now)`) without admitting: what
    /// a refusal by another limit reports about this one.
    pub(super) fn peek(&self, now: Instant) -> Quota {
        Quota {
            remaining: self.max.saturating_sub(self.times.len()),
            reset: self.times.front().map_or(Duration::ZERO, |oldest| {
                self.window
                    .saturating_sub(now.saturating_duration_since(*oldest))
            }),
        }
    }

    pub(super) fn state(&self) -> LimitState {
        LimitState {
            max: self.is_limited().then_some(self.max),
            window: self.window,
            in_window: self.times.len(),
        }
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }

    pub(super) fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

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

    #[test]
    fn lowered_limit_refuses_until_the_window_holds_fewer_than_the_new_max() {
        let l = WindowLimit::with_max(5, 10 * S);
        let t0 = Instant::now();
        for i in 0..4 {
            l.try_acquire_at(t0 + i * S).unwrap(); // at 0, 1, 2, 3 s
        }
        l.set(2, 10 * S);
        // Four on record, two allowed: admitting needs three to leave; the third (at 2 s)
        // leaves at 12 s.
        assert_eq!(l.try_acquire_at(t0 + 4 * S), Err(8 * S));
        assert_eq!(l.try_acquire_at(t0 + 11 * S), Err(S));
        let q = l.try_acquire_at(t0 + 12 * S).unwrap();
        assert_eq!(q.remaining, 0, "the 3 s admission and this one fill it");
        assert_eq!(l.try_acquire_at(t0 + 12 * S), Err(S));
    }

    #[test]
    fn raised_limit_admits_at_once_and_counts_the_history() {
        let l = WindowLimit::with_max(2, 10 * S);
        let t0 = Instant::now();
        l.try_acquire_at(t0).unwrap();
        l.try_acquire_at(t0 + S).unwrap();
        assert!(l.try_acquire_at(t0 + 2 * S).is_err());
        l.set(3, 10 * S);
        assert_eq!(l.try_acquire_at(t0 + 2 * S).unwrap().remaining, 0);
        assert!(l.try_acquire_at(t0 + 3 * S).is_err());
    }

    #[test]
    fn shortened_window_releases_old_admissions() {
        let l = WindowLimit::with_max(2, 60 * S);
        let t0 = Instant::now();
        l.try_acquire_at(t0).unwrap();
        l.try_acquire_at(t0 + S).unwrap();
        assert_eq!(l.try_acquire_at(t0 + 5 * S), Err(55 * S));
        l.set(2, 5 * S);
        assert_eq!(l.try_acquire_at(t0 + 5 * S).unwrap().remaining, 0);
    }

    #[test]
    fn unlimited_window_records_for_a_limit_set_later() {
        let l = WindowLimit::unlimited(10 * S);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(l.try_acquire_at(t0 + i * S).is_ok());
        }
        assert_eq!(l.state_at(t0 + 5 * S).max, None);
        assert_eq!(l.state_at(t0 + 5 * S).in_window, 5);
        l.set(3, 10 * S);
        // Five on record, three allowed: the third (at 2 s) must leave, at 12 s.
        assert_eq!(l.try_acquire_at(t0 + 5 * S), Err(7 * S));
        l.set_unlimited(10 * S);
        assert!(l.try_acquire_at(t0 + 5 * S).is_ok());
    }

    #[test]
    fn rpm_converts_to_admissions_per_window_and_back() {
        assert_eq!(max_for(30.0, 6 * S), Some(3));
        assert_eq!(max_for(40.0, 60 * S), Some(40));
        assert_eq!(max_for(1.0, 6 * S), Some(1), "at least one");
        assert_eq!(max_for(0.0, 6 * S), None);
        assert_eq!(max_for(f64::NAN, 6 * S), None);
        // 100 × 10.2 / 60 is 16.999… in floating point: still 17.
        assert_eq!(max_for(100.0, Duration::from_millis(10_200)), Some(17));
        assert_eq!(per_minute(3, 6 * S), 30);
        assert_eq!(per_minute(7, 9 * S), 46);
    }
}
