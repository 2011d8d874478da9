//! Retreat: the fallback for refusals that teach nothing about the rate.
//!
//! A 503/529 (provider overloaded) or a per-model concurrency refusal says "slow down"
//! without saying how far, so it cannot move the learned limit. Retreat scales the
//! pacing rate *below* the learned limit instead: states `normal → retreating →
//! recovering → normal`. A refusal cuts the factor multiplicatively (not below the
//! floor) and moves to `retreating`; refusals of requests already in flight are one
//! signal (cuts at least `cut_spacing` apart, which follows the provider window). After
//! `quiet_period` without one the state becomes `recovering`, and every
//! `recovery_interval` the factor climbs by `recovery_step` until it is 1: the learned
//! limit, never above it.
//!
//! Plain owned state: the controller changes it together with the learned limit and
//! publishes the rate once, so a tick, a refusal and an admin change cannot interleave
//! (the race of the atomic version: a refusal between the last recovery step and the
//! switch to `normal` left a cut rate in `normal`).

use std::time::Duration;

use super::window::SlidingCount;

/// Retreat tuning (validated by the configuration).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetreatConfig {
    /// Factor multiplier per refusal that teaches nothing (0 < f < 1).
    pub decrease_factor: f64,
    /// Lowest factor: the pacing rate never falls below this share of the learned limit.
    pub floor_fraction: f64,
    /// Time without such a refusal before recovery starts.
    pub quiet_period: Duration,
    /// Factor added per step while recovering (back to 1: the learned limit).
    pub recovery_step: f64,
    /// Time between recovery steps.
    pub recovery_interval: Duration,
    /// Pause after a 429, 503 or 529 that names no `Retry-After`.
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
}

/// A state change, for the log line and the counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    pub from: RetreatState,
    pub to: RetreatState,
    /// The factor of the learned rate after the change.
    pub factor: f64,
}

/// One scope's retreat state, owned by its controller.
#[derive(Debug, Clone)]
pub struct Retreat {
    config: RetreatConfig,
    state: RetreatState,
    factor: f64,
    /// Clock time of the last cut and of the last refusal (`None`: never).
    last_cut: Option<u64>,
    last_refusal: u64,
    last_step: u64,
    cut_spacing: u64,
    entered: [u64; 3],
}

impl Retreat {
    /// `window`: the provider's window; cuts are at least a sixtieth of it apart (1 s
    /// for a minute), so the refusals of one burst cut once.
    pub fn new(config: RetreatConfig, window: Duration) -> Self {
        Self {
            config,
            state: RetreatState::Normal,
            factor: 1.0,
            last_cut: None,
            last_refusal: 0,
            last_step: 0,
            cut_spacing: u64::try_from(window.as_nanos() / 60).unwrap_or(u64::MAX),
            entered: [0; 3],
        }
    }

    pub fn config(&self) -> RetreatConfig {
        self.config
    }

    pub fn state(&self) -> RetreatState {
        self.state
    }

    /// The share of the learned rate paced now (1 in `normal`).
    pub fn factor(&self) -> f64 {
        self.factor
    }

    /// Times each state was entered.
    pub fn entered(&self) -> [u64; 3] {
        self.entered
    }

    fn enter(&mut self, to: RetreatState) -> Option<Transition> {
        let from = std::mem::replace(&mut self.state, to);
        (from != to).then(|| {
            self.entered[to as usize] += 1;
            Transition {
                from,
                to,
                factor: self.factor,
            }
        })
    }

    /// A refusal that teaches nothing at `now`: cut (at most once per spacing), retreat.
    pub fn on_refusal(&mut self, now: u64) -> Option<Transition> {
        self.last_refusal = self.last_refusal.max(now);
        let due = self
            .last_cut
            .is_none_or(|last| now >= last.saturating_add(self.cut_spacing));
        let cut = due.then(|| {
            self.last_cut = Some(now);
            self.factor =
                (self.factor * self.config.decrease_factor).max(self.config.floor_fraction);
        });
        match self.enter(RetreatState::Retreating) {
            Some(t) => Some(t),
            // Already retreating: a further cut is still worth a line.
            None => cut.map(|()| Transition {
                from: RetreatState::Retreating,
                to: RetreatState::Retreating,
                factor: self.factor,
            }),
        }
    }

    /// Advances recovery at `now`.
    pub fn tick(&mut self, now: u64) -> Option<Transition> {
        if self.state == RetreatState::Normal {
            return None;
        }
        let quiet = u64::try_from(self.config.quiet_period.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.last_refusal) < quiet {
            return None;
        }
        if self.state == RetreatState::Retreating {
            self.last_step = now;
            return self.enter(RetreatState::Recovering);
        }
        let every = u64::try_from(self.config.recovery_interval.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(self.last_step) < every {
            return None;
        }
        self.last_step = now;
        self.factor = (self.factor + self.config.recovery_step).min(1.0);
        if self.factor >= 1.0 {
            self.enter(RetreatState::Normal)
        } else {
            Some(Transition {
                from: RetreatState::Recovering,
                to: RetreatState::Recovering,
                factor: self.factor,
            })
        }
    }
}

/// Copied view for metrics and the dashboard.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetreatView {
    pub state: RetreatState,
    /// The configured rate (the ceiling).
    pub base_rpm: f64,
    /// The rate paced now: learned limit × retreat factor, or zero while paused.
    pub effective_rpm: f64,
    pub upstream_429_last_minute: u64,
    pub responses_last_minute: u64,
    /// 429s per response over the last minute (0 when there were none).
    pub rate_429: f64,
    /// Times each state was entered.
    pub entered: [u64; 3],
}

/// Upstream answers and 429s over the last minute, counted on the request path.
#[derive(Debug, Default)]
pub struct AnswerCounts {
    all: SlidingCount,
    refused: SlidingCount,
}

impl AnswerCounts {
    pub fn on_response(&self, now: u64) {
        self.all.record(now);
    }

    pub fn on_429(&self, now: u64) {
        self.refused.record(now);
    }

    /// `(429s, answers, 429s per answer)` over the last minute.
    pub fn last_minute(&self, now: u64) -> (u64, u64, f64) {
        let c429 = self.refused.total(now);
        let all = self.all.total(now);
        let rate = if all == 0 {
            0.0
        } else {
            c429 as f64 / all as f64
        };
        (c429, all, rate)
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn retreat() -> Retreat {
        Retreat::new(
            RetreatConfig {
                decrease_factor: 0.5,
                floor_fraction: 0.1,
                quiet_period: Duration::from_secs(30),
                recovery_step: 0.25,
                recovery_interval: Duration::from_secs(10),
                default_pause: Duration::from_secs(1),
            },
            Duration::from_secs(60),
        )
    }

    #[test]
    fn a_refusal_halves_the_factor_and_retreats() {
        let mut r = retreat();
        assert_eq!(
            r.on_refusal(S),
            Some(Transition {
                from: RetreatState::Normal,
                to: RetreatState::Retreating,
                factor: 0.5
            })
        );
        assert_eq!(r.state(), RetreatState::Retreating);
    }

    #[test]
    fn refusals_of_one_burst_cut_once_and_spacing_follows_the_window() {
        let mut r = retreat();
        r.on_refusal(S);
        for i in 0..9 {
            assert_eq!(r.on_refusal(S + i * 100_000_000), None);
        }
        assert_eq!(r.factor(), 0.5);
        assert_eq!(r.on_refusal(2 * S).map(|t| t.factor), Some(0.25));
        let mut short = Retreat::new(RetreatConfig::default(), Duration::from_secs(6));
        short.on_refusal(0);
        assert_eq!(
            short.on_refusal(100_000_000).map(|t| t.factor),
            Some(0.25),
            "6 s window: 0.1 s apart"
        );
    }

    #[test]
    fn the_factor_never_falls_below_the_floor() {
        let mut r = retreat();
        for i in 0..20 {
            r.on_refusal(i * 100 * S);
        }
        assert_eq!(r.factor(), 0.1);
    }

    #[test]
    fn recovery_starts_after_the_quiet_period_and_climbs_back_to_the_learned_rate_not_above() {
        let mut r = retreat();
        r.on_refusal(0);
        assert_eq!(r.tick(29 * S), None, "still inside the quiet period");
        assert_eq!(r.tick(30 * S).map(|t| t.to), Some(RetreatState::Recovering));
        assert_eq!(r.tick(35 * S), None, "steps are 10 s apart");
        assert_eq!(r.tick(40 * S).map(|t| t.factor), Some(0.75));
        let t = r.tick(50 * S).expect("back to normal");
        assert_eq!((t.to, t.factor), (RetreatState::Normal, 1.0));
        assert_eq!(r.entered(), [1, 1, 1]);
        assert_eq!(r.tick(100 * S), None);
    }

    #[test]
    fn a_refusal_while_recovering_retreats_again_and_restarts_the_quiet_period() {
        let mut r = retreat();
        r.on_refusal(0);
        r.tick(30 * S);
        r.tick(40 * S); // 0.75
        let t = r.on_refusal(41 * S).expect("retreat again");
        assert_eq!((t.to, t.factor), (RetreatState::Retreating, 0.375));
        assert_eq!(
            r.tick(70 * S),
            None,
            "quiet period counts from the last refusal"
        );
        assert_eq!(r.tick(71 * S).map(|t| t.to), Some(RetreatState::Recovering));
    }

    #[test]
    fn answers_and_429s_are_counted_over_the_last_minute() {
        let c = AnswerCounts::default();
        for i in 0..10 {
            c.on_response(i * S);
        }
        c.on_429(5 * S);
        let (n429, all, rate) = c.last_minute(9 * S);
        assert_eq!((n429, all), (1, 10));
        assert!((rate - 0.1).abs() < 1e-9);
        assert_eq!(c.last_minute(100 * S).2, 0.0);
    }
}
