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
    ceiling: u64,
    /// Per window, and the per-minute figure it came from.
    stated: Option<(u64, u64)>,
    learned: Option<u64>,
}

impl TokenLearner {
    /// `ceiling`: the configured limit, tokens per `window`.
    pub fn new(ceiling: u64, window: Duration) -> Self {
        Self {
            window,
            ceiling: ceiling.max(1),
            stated: None,
            learned: None,
        }
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
        })
    }

    /// A 429 about tokens on a send dated when its window held `charged` tokens, its own
    /// `cost` among them (`None`: unknown, counted as one token).
    pub fn on_refused(&mut self, charged: u64, cost: Option<u64>) -> Option<TokenChange> {
        if charged == 0 {
            return None;
        }
        let before = charged.saturating_sub(cost.unwrap_or(1).max(1));
        let n = before.max(charged / 2).max(1);
        self.changed(TokenWhy::Refused { charged }, |s| {
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
        })
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn the_limit_is_the_lowest_of_configured_stated_and_learned() {
        let mut l = TokenLearner::new(10_000, MIN);
        assert_eq!(l.limit(), 10_000);
        let ch = l.on_stated(8_000).unwrap();
        assert_eq!((ch.from, ch.to), (10_000, 8_000));
        assert_eq!(
            l.on_stated(8_000),
            None,
            "a repeated statement changes nothing"
        );
        assert_eq!(l.on_stated(20_000).map(|c| c.to), Some(10_000), "capped");
        let ch = l.on_refused(9_000, Some(2_000)).unwrap();
        assert_eq!(ch.to, 7_000, "what the window held before the refused send");
        assert_eq!(
            l.on_refused(9_500, Some(100)),
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
        let mut l = TokenLearner::new(10_000, MIN);
        assert_eq!(l.on_refused(6_000, Some(5_000)).map(|c| c.to), Some(3_000));
        assert_eq!(l.on_refused(0, Some(500)), None);
        assert_eq!(l.on_refused(2_000, None).map(|c| c.to), Some(1_999));
    }

    #[test]
    fn a_per_minute_figure_is_scaled_to_the_window() {
        assert_eq!(per_window_tokens(60_000, Duration::from_secs(6)), 6_000);
        let mut l = TokenLearner::new(1_000, Duration::from_secs(6));
        assert_eq!(l.on_stated(6_000).map(|c| c.to), Some(600));
    }
}
