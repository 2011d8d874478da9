//! The token limit in force: the configured one (the ceiling), capped by what the
//! provider states and by what its token 429s teach, as the request side learns.
//!
//! - **Stated** (`x-ratelimit-limit-tokens`, or the "Limit L" of a token 429's
//!   message): taken when it changes, per minute scaled to the window; a new statement
//!   replaces what 429s taught (it is the provider's own figure).
//! - **A 429 about tokens** on a send dated when the window held `charged` tokens (its
//!   own charge `cost` included) proves the limit is below `charged`: the learned limit
//!   becomes what the window held before it, `charged - cost` (at most halving per
//!   429, so one refusal whose cause the sidecar cannot see does not collapse the
//!   budget), never raised by a 429. With nothing charged there is nothing to learn
//!   from (the provider counts tokens the sidecar did not send): only the hold applies.
//! - **Probes**, as the request side's: a limit learned from 429s (not a stated one)
//!   is tried at the configured limit again for one window, at most once per probe
//!   interval and only while requests wait for tokens. A 429 in it teaches the limit
//!   anew (one refusal per interval at most); a window without one proves the provider
//!   took its limit back up, so a lowered limit is not kept for ever.
//!
//! Plain owned state, driven by the controller under its mutex.

use std::fmt;
use std::time::Duration;

/// Tokens per `window` for `tpm` tokens per minute: `floor(tpm × window / 60 s)`, at
/// least 1.
pub fn per_window_tokens(tpm: u64, window: Duration) -> u64 {
    crate::limiter::learn::tokens_per_window(tpm, window).unwrap_or(1)
}

/// Why the token limit changed: the reason in the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenWhy {
    /// The provider stated this many tokens per minute (headers or a 429's message).
    Stated { limit_tpm: u64 },
    /// A 429 about tokens with `charged` tokens in its window.
    Refused { charged: u64 },
    /// The configured limit changed.
    Ceiling,
    /// A learned limit is tried at the configured one for a window.
    Probe,
    /// An operator asked to forget what was learned.
    Forgotten,
}

impl fmt::Display for TokenWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Stated { limit_tpm } => {
                write!(f, "the provider states {limit_tpm} tokens per minute")
            }
            Self::Refused { charged } => write!(
                f,
                "a 429 about tokens with {charged} tokens charged in its window"
            ),
            Self::Ceiling => f.write_str("the configured token limit changed"),
            Self::Probe => f.write_str("probing the configured token limit for a window"),
            Self::Forgotten => f.write_str("learned token limit forgotten by an operator"),
        }
    }
}

/// A change of the token limit in force (tokens per window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenChange {
    pub from: u64,
    pub to: u64,
    pub why: TokenWhy,
}

/// One limiter's token limit.
#[derive(Debug, Clone)]
pub struct TokenLearner {
    window: Duration,
    probe_interval: Duration,
    ceiling: u64,
    /// Per window, and the per-minute figure it came from.
    stated: Option<(u64, u64)>,
    learned: Option<u64>,
    /// Clock nanoseconds from which a learned limit may be probed.
    next_probe: u64,
    /// The probe in progress ends then (`None`: none).
    probing_until: Option<u64>,
}

impl TokenLearner {
    /// `ceiling`: the configured limit, tokens per `window`; a learned limit is probed
    /// at most once per `probe_interval`.
    pub fn new(ceiling: u64, window: Duration, probe_interval: Duration) -> Self {
        Self {
            window,
            probe_interval,
            ceiling: ceiling.max(1),
            stated: None,
            learned: None,
            next_probe: 0,
            probing_until: None,
        }
    }

    /// Whether a probe is in progress.
    pub fn probing(&self) -> bool {
        self.probing_until.is_some()
    }

    /// The controller's step at `now`: ends a probe whose window passed without a 429
    /// (the limit stays at the configured one), or starts one when a learned limit has
    /// held for a probe interval and requests wait for tokens (`waiting`).
    pub fn tick(&mut self, now: u64, waiting: bool) -> Option<TokenChange> {
        if let Some(until) = self.probing_until {
            if now >= until {
                self.probing_until = None;
            }
            return None;
        }
        if self.learned.is_none() || !waiting || now < self.next_probe {
            return None;
        }
        let window = crate::clock::nanos(self.window);
        self.changed(TokenWhy::Probe, |s| {
            s.learned = None;
            s.probing_until = Some(now.saturating_add(window));
            s.next_probe = now.saturating_add(crate::clock::nanos(s.probe_interval));
        })
    }

    /// The limit in force, tokens per window.
    pub fn limit(&self) -> u64 {
        let stated = self.stated.map_or(u64::MAX, |(n, _)| n);
        self.ceiling
            .min(stated)
            .min(self.learned.unwrap_or(u64::MAX))
            .max(1)
    }

    pub fn ceiling(&self) -> u64 {
        self.ceiling
    }

    /// The provider's stated limit per window, if any.
    pub fn stated(&self) -> Option<u64> {
        self.stated.map(|(n, _)| n)
    }

    fn changed(&mut self, why: TokenWhy, f: impl FnOnce(&mut Self)) -> Option<TokenChange> {
        let from = self.limit();
        f(self);
        let to = self.limit();
        (from != to).then_some(TokenChange { from, to, why })
    }

    /// The provider states `limit_tpm` tokens per minute.
    pub fn on_stated(&mut self, limit_tpm: u64) -> Option<TokenChange> {
        if limit_tpm == 0 || self.stated.is_some_and(|(_, tpm)| tpm == limit_tpm) {
            return None;
        }
        let n = per_window_tokens(limit_tpm, self.window);
        self.changed(TokenWhy::Stated { limit_tpm }, |s| {
            s.stated = Some((n, limit_tpm));
            s.learned = None;
            s.probing_until = None;
        })
    }

    /// A 429 about tokens at `now` on a send dated when its window held `charged`
    /// tokens, its own `cost` among them (`None`: unknown, counted as one token). It
    /// ends a probe, and the next is a probe interval away.
    pub fn on_refused(&mut self, charged: u64, cost: Option<u64>, now: u64) -> Option<TokenChange> {
        if charged == 0 {
            return None;
        }
        let before = charged.saturating_sub(cost.unwrap_or(1).max(1));
        let n = before.max(charged / 2).max(1);
        let next = now.saturating_add(crate::clock::nanos(self.probe_interval));
        self.changed(TokenWhy::Refused { charged }, |s| {
            s.probing_until = None;
            s.next_probe = next;
            if n < s.limit() {
                s.learned = Some(n);
            }
        })
    }

    /// The configured limit changed: what was learned stays, under the new ceiling.
    pub fn set_ceiling(&mut self, ceiling: u64) -> Option<TokenChange> {
        self.changed(TokenWhy::Ceiling, |s| s.ceiling = ceiling.max(1))
    }

    /// Back to the configured limit.
    pub fn forget(&mut self) -> Option<TokenChange> {
        self.changed(TokenWhy::Forgotten, |s| {
            s.stated = None;
            s.learned = None;
            s.probing_until = None;
        })
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn the_limit_is_the_lowest_of_configured_stated_and_learned() {
        let mut l = TokenLearner::new(10_000, MIN, 10 * MIN);
        assert_eq!(l.limit(), 10_000);
        let ch = l.on_stated(8_000).unwrap();
        assert_eq!((ch.from, ch.to), (10_000, 8_000));
        assert_eq!(
            l.on_stated(8_000),
            None,
            "a repeated statement changes nothing"
        );
        assert_eq!(l.on_stated(20_000).map(|c| c.to), Some(10_000), "capped");
        let ch = l.on_refused(9_000, Some(2_000), 0).unwrap();
        assert_eq!(ch.to, 7_000, "what the window held before the refused send");
        assert_eq!(
            l.on_refused(9_500, Some(100), 0),
            None,
            "a 429 never raises it"
        );
        assert_eq!(
            l.on_stated(9_000).map(|c| c.to),
            Some(9_000),
            "a new statement replaces it"
        );
        assert_eq!(l.forget().map(|c| c.to), Some(10_000));
    }

    #[test]
    fn one_token_429_at_most_halves_the_limit_and_one_with_nothing_charged_teaches_nothing() {
        let mut l = TokenLearner::new(10_000, MIN, 10 * MIN);
        assert_eq!(
            l.on_refused(6_000, Some(5_000), 0).map(|c| c.to),
            Some(3_000)
        );
        assert_eq!(l.on_refused(0, Some(500), 0), None);
        assert_eq!(l.on_refused(2_000, None, 0).map(|c| c.to), Some(1_999));
    }

    #[test]
    fn a_per_minute_figure_is_scaled_to_the_window() {
        assert_eq!(per_window_tokens(60_000, Duration::from_secs(6)), 6_000);
        let mut l = TokenLearner::new(1_000, Duration::from_secs(6), MIN);
        assert_eq!(l.on_stated(6_000).map(|c| c.to), Some(600));
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_learned_limit_is_probed_once_per_interval_while_requests_wait() {
        let mut l = TokenLearner::new(10_000, MIN, 10 * MIN);
        assert_eq!(l.tick(0, true), None, "nothing learned: nothing to probe");
        assert_eq!(
            l.on_refused(8_000, Some(2_000), 0).map(|c| c.to),
            Some(6_000)
        );
        assert_eq!(l.tick(599 * S, true), None, "before the interval");
        assert_eq!(l.tick(600 * S, false), None, "nobody waits");
        let ch = l.tick(600 * S, true).expect("a probe");
        assert_eq!((ch.from, ch.to, ch.why), (6_000, 10_000, TokenWhy::Probe));
        assert!(l.probing());
        // A 429 in the probe: learned anew, the next probe an interval later.
        assert_eq!(
            l.on_refused(7_000, Some(500), 610 * S).map(|c| c.to),
            Some(6_500)
        );
        assert!(!l.probing());
        assert_eq!(l.tick(1_209 * S, true), None);
        assert_eq!(l.tick(1_210 * S, true).map(|c| c.to), Some(10_000));
        // A window without a 429: the configured limit holds, nothing more to probe.
        assert_eq!(l.tick(1_270 * S, true), None);
        assert!(!l.probing());
        assert_eq!(l.limit(), 10_000);
        assert_eq!(l.tick(2_000 * S, true), None);
    }

    #[test]
    fn a_stated_limit_is_never_probed() {
        let mut l = TokenLearner::new(10_000, MIN, MIN);
        l.on_stated(6_000);
        assert_eq!(l.tick(3_600 * S, true), None);
        assert_eq!(l.limit(), 6_000);
    }
}
