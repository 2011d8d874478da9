//! Retreat: the adaptive effective rate of one provider.
//!
//! States `normal → retreating → recovering → normal`. An upstream 429 cuts the
//! effective rate multiplicatively (not below the floor) and moves to `retreating`; a
//! burst of 429s from requests already in flight cuts once, not once each (cuts are at
//! least `cut_spacing` apart). After `quiet_period` with no 429 the state becomes
//! `recovering`, and every `recovery_interval` the rate climbs by `recovery_step × base`
//! until it reaches the base rate (`normal`). A 429 while recovering retreats again.
//!
//! All state is atomics: a 429 is handled on the request path, which takes no lock.
//! `tick` is called by the dispatcher thread only. The caller applies the returned
//! rate to the bucket; this module knows nothing of buckets or clocks.

use std::sync::atomic::AtomicU8;
use std::time::Duration;

use atomic_float::AtomicF64;

use super::sync::{AtomicU64, Ordering};
use super::window::SlidingCount;

/// Retreat tuning (validated by the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetreatConfig {
    /// Effective rate multiplier on a 429 (0 < f < 1).
    pub decrease_factor: f64,
    /// Lowest effective rate, as a fraction of the base rate.
    pub floor_fraction: f64,
    /// Time without a 429 before recovery starts.
    pub quiet_period: Duration,
    /// Rate added per step while recovering, as a fraction of the base rate.
    pub recovery_step: f64,
    /// Time between recovery steps.
    pub recovery_interval: Duration,
    /// Pause after a 429 that names no `Retry-After`.
    pub default_pause: Duration,
}

impl Default for RetreatConfig {
    fn default() -> Self {
        Self {
            decrease_factor: 0.5,
            floor_fraction: 0.1,
            quiet_period: Duration::from_secs(30),
            recovery_step: 0.1,
            recovery_interval: Duration::from_secs(10),
            default_pause: Duration::from_secs(1),
        }
    }
}

/// The three states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetreatState {
    Normal = 0,
    Retreating = 1,
    Recovering = 2,
}

impl RetreatState {
    pub const ALL: [RetreatState; 3] = [Self::Normal, Self::Retreating, Self::Recovering];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Retreating => "retreating",
            Self::Recovering => "recovering",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Retreating,
            2 => Self::Recovering,
            _ => Self::Normal,
        }
    }
}

/// A state change, for the log line and the counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    pub from: RetreatState,
    pub to: RetreatState,
    pub effective_rpm: f64,
}

/// What a 429 changed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// The new effective rate, when this 429 cut it.
    pub effective_rpm: Option<f64>,
    pub transition: Option<Transition>,
}

/// Copied view for metrics and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetreatView {
    pub state: RetreatState,
    pub base_rpm: f64,
    pub effective_rpm: f64,
    pub upstream_429_last_minute: u64,
    pub responses_last_minute: u64,
    /// 429s per response over the last minute (0 when there were none).
    pub rate_429: f64,
    /// Times each state was entered.
    pub entered: [u64; 3],
}

/// One provider's retreat state.
#[derive(Debug)]
pub struct Retreat {
    config: RetreatConfig,
    base_rpm: AtomicF64,
    effective_rpm: AtomicF64,
    state: AtomicU8,
    /// Clock nanoseconds + 1 of the last 429 and the last cut (0: never).
    last_429: AtomicU64,
    last_cut: AtomicU64,
    last_step: AtomicU64,
    entered: [AtomicU64; 3],
    window_429: SlidingCount,
    window_all: SlidingCount,
}

impl Retreat {
    pub fn new(base_rpm: f64, config: RetreatConfig) -> Self {
        Self {
            config,
            base_rpm: AtomicF64::new(base_rpm),
            effective_rpm: AtomicF64::new(base_rpm),
            state: AtomicU8::new(RetreatState::Normal as u8),
            last_429: AtomicU64::new(0),
            last_cut: AtomicU64::new(0),
            last_step: AtomicU64::new(0),
            entered: Default::default(),
            window_429: SlidingCount::default(),
            window_all: SlidingCount::default(),
        }
    }

    pub fn config(&self) -> RetreatConfig {
        self.config
    }

    pub fn state(&self) -> RetreatState {
        RetreatState::from_u8(self.state.load(std::sync::atomic::Ordering::Acquire))
    }

    pub fn effective_rpm(&self) -> f64 {
        self.effective_rpm
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn base_rpm(&self) -> f64 {
        self.base_rpm.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn floor(&self) -> f64 {
        self.base_rpm() * self.config.floor_fraction
    }

    fn enter(&self, to: RetreatState) -> Option<Transition> {
        let from = RetreatState::from_u8(
            self.state
                .swap(to as u8, std::sync::atomic::Ordering::AcqRel),
        );
        (from != to).then(|| {
            self.entered[to as usize].fetch_add(1, Ordering::Relaxed);
            Transition {
                from,
                to,
                effective_rpm: self.effective_rpm(),
            }
        })
    }

    /// Counts an upstream answer (for the 429 rate).
    pub fn on_response(&self, now: u64) {
        self.window_all.record(now);
    }

    /// An upstream 429 at `now`: cut the rate (at most once per `cut_spacing`), retreat.
    pub fn on_429(&self, now: u64) -> Cut {
        self.window_429.record(now);
        self.last_429.fetch_max(now + 1, Ordering::Relaxed);
        let eff = self.effective_rpm();
        // Cuts at least one effective interval (and one second) apart: the 429s of
        // requests already in flight when the first arrived are one signal.
        let spacing = Duration::from_secs_f64((60.0 / eff).max(1.0)).as_nanos() as u64;
        let last = self.last_cut.load(Ordering::Relaxed);
        let due = last == 0 || now + 1 >= last.saturating_add(spacing);
        let mut effective = None;
        if due
            && self
                .last_cut
                .compare_exchange(last, now + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let floor = self.floor();
            let factor = self.config.decrease_factor;
            let _ = self.effective_rpm.fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |e| Some((e * factor).max(floor)),
            );
            effective = Some(self.effective_rpm());
        }
        Cut {
            effective_rpm: effective,
            transition: self.enter(RetreatState::Retreating),
        }
    }

    /// Advances recovery at `now`; returns the transition and the new effective rate
    /// when either changed. Called by one thread (the dispatcher).
    pub fn tick(&self, now: u64) -> (Option<Transition>, Option<f64>) {
        let state = self.state();
        if state == RetreatState::Normal {
            return (None, None);
        }
        let last_429 = self.last_429.load(Ordering::Relaxed).saturating_sub(1);
        let quiet = self.config.quiet_period.as_nanos() as u64;
        if now.saturating_sub(last_429) < quiet {
            return (None, None);
        }
        let mut transition = None;
        if state == RetreatState::Retreating {
            self.last_step.store(now, Ordering::Relaxed);
            transition = self.enter(RetreatState::Recovering);
            return (transition, None);
        }
        let step_every = self.config.recovery_interval.as_nanos() as u64;
        if now.saturating_sub(self.last_step.load(Ordering::Relaxed)) < step_every {
            return (None, None);
        }
        self.last_step.store(now, Ordering::Relaxed);
        let base = self.base_rpm();
        let step = base * self.config.recovery_step;
        let _ = self.effective_rpm.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |e| Some((e + step).min(base)),
        );
        let eff = self.effective_rpm();
        if eff >= base {
            transition = self.enter(RetreatState::Normal);
        }
        (transition, Some(eff))
    }

    /// A new base rate (admin change): the effective rate follows at once in `normal`
    /// and is capped by it otherwise. Returns the new effective rate.
    pub fn set_base(&self, rpm: f64) -> f64 {
        self.base_rpm
            .store(rpm, std::sync::atomic::Ordering::Relaxed);
        let normal = self.state() == RetreatState::Normal;
        let _ = self.effective_rpm.fetch_update(
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
            |e| Some(if normal { rpm } else { e.min(rpm) }),
        );
        self.effective_rpm()
    }

    pub fn view(&self, now: u64) -> RetreatView {
        let c429 = self.window_429.total(now);
        let all = self.window_all.total(now);
        RetreatView {
            state: self.state(),
            base_rpm: self.base_rpm(),
            effective_rpm: self.effective_rpm(),
            upstream_429_last_minute: c429,
            responses_last_minute: all,
            rate_429: if all == 0 {
                0.0
            } else {
                c429 as f64 / all as f64
            },
            entered: [0, 1, 2].map(|i| self.entered[i].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn retreat() -> Retreat {
        Retreat::new(
            100.0,
            RetreatConfig {
                decrease_factor: 0.5,
                floor_fraction: 0.1,
                quiet_period: Duration::from_secs(30),
                recovery_step: 0.25,
                recovery_interval: Duration::from_secs(10),
                default_pause: Duration::from_secs(1),
            },
        )
    }

    #[test]
    fn a_429_halves_the_rate_and_retreats() {
        let r = retreat();
        let cut = r.on_429(S);
        assert_eq!(cut.effective_rpm, Some(50.0));
        assert_eq!(
            cut.transition,
            Some(Transition {
                from: RetreatState::Normal,
                to: RetreatState::Retreating,
                effective_rpm: 50.0
            })
        );
        assert_eq!(r.state(), RetreatState::Retreating);
    }

    #[test]
    fn a_burst_of_429s_from_requests_in_flight_cuts_once() {
        let r = retreat();
        r.on_429(S);
        // 50 rpm: cuts are at least 1.2 s apart.
        for i in 0..10 {
            assert_eq!(r.on_429(S + i * 100_000_000).effective_rpm, None);
        }
        assert_eq!(r.effective_rpm(), 50.0);
        assert_eq!(r.on_429(S + 1_300_000_000).effective_rpm, Some(25.0));
    }

    #[test]
    fn the_rate_never_falls_below_the_floor() {
        let r = retreat();
        for i in 0..20 {
            r.on_429(i * 100 * S);
        }
        assert_eq!(r.effective_rpm(), 10.0);
    }

    #[test]
    fn recovery_starts_after_the_quiet_period_and_climbs_additively_to_base() {
        let r = retreat();
        r.on_429(0); // 50 rpm
        assert_eq!(
            r.tick(29 * S),
            (None, None),
            "still inside the quiet period"
        );
        let (t, _) = r.tick(30 * S);
        assert_eq!(t.map(|t| t.to), Some(RetreatState::Recovering));
        assert_eq!(r.tick(35 * S), (None, None), "steps are 10 s apart");
        assert_eq!(r.tick(40 * S).1, Some(75.0));
        let (t, eff) = r.tick(50 * S);
        assert_eq!(eff, Some(100.0));
        assert_eq!(t.map(|t| t.to), Some(RetreatState::Normal));
        assert_eq!(r.view(50 * S).entered, [1, 1, 1]);
    }

    #[test]
    fn a_429_while_recovering_retreats_again_and_restarts_the_quiet_period() {
        let r = retreat();
        r.on_429(0);
        r.tick(30 * S);
        r.tick(40 * S); // 75
        let cut = r.on_429(41 * S);
        assert_eq!(cut.effective_rpm, Some(37.5));
        assert_eq!(cut.transition.map(|t| t.to), Some(RetreatState::Retreating));
        assert_eq!(
            r.tick(70 * S).0,
            None,
            "quiet period counts from the last 429"
        );
        assert_eq!(
            r.tick(71 * S).0.map(|t| t.to),
            Some(RetreatState::Recovering)
        );
    }

    #[test]
    fn the_429_rate_is_measured_over_the_last_minute() {
        let r = retreat();
        for i in 0..10 {
            r.on_response(i * S);
        }
        r.on_429(5 * S);
        let v = r.view(9 * S);
        assert_eq!(v.upstream_429_last_minute, 1);
        assert!((v.rate_429 - 0.1).abs() < 1e-9);
        assert_eq!(r.view(100 * S).rate_429, 0.0);
    }

    #[test]
    fn a_new_base_rate_is_followed_in_normal_and_caps_a_retreat() {
        let r = retreat();
        assert_eq!(r.set_base(200.0), 200.0);
        r.on_429(0); // 100
        assert_eq!(r.set_base(80.0), 80.0);
        assert_eq!(r.set_base(300.0), 80.0, "a retreat keeps its lower rate");
    }
}
