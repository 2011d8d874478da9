//! The simulated provider's token limit: at most `max` tokens charged in any rolling
//! `window`, as "tokens per minute" means at a provider.
//!
//! Each charge sits in a queue with its time; a charge at `t` counts while `now - t <
//! window`. Two charge models ([`TokenCharge`]): `reserved` (OpenAI's) charges a request
//! its prompt plus its completion bound when it arrives, and admits it only while `used +
//! requested ≤ max`; `actual` charges what the request used when its answer ends, and
//! admits while `used < max` (so requests in flight can overshoot, as at such a provider).
//! Under both, a request whose `requested` alone exceeds `max` never fits and is refused
//! as too large. The limit can change at run time and keeps its history, like the request
//! window (`limit.rs`); an unlimited window still records. It is a test double: it lives
//! under the gate's lock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a provider charges tokens (`--token-charge`): the same two models the sidecar's
/// `token_charge` setting names.
pub use crate::config::TokenCharge;

/// What is left of the token window (sent as `x-ratelimit-*-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenQuota {
    pub max: u64,
    pub window: Duration,
    pub remaining: u64,
    /// Until the window is back to its full limit: the newest charge leaves it.
    pub reset: Duration,
}

/// A refusal of the token window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenRefusal {
    pub max: u64,
    pub window: Duration,
    /// Tokens charged in the window now.
    pub used: u64,
    /// The request's prompt plus its completion bound.
    pub requested: u64,
    /// Until the window admits it; `None`: it never fits (larger than `max`).
    pub wait: Option<Duration>,
}

/// The token limit at one moment, as the control endpoint reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLimitState {
    /// `None`: unlimited.
    pub max: Option<u64>,
    pub window: Duration,
    /// Tokens charged in the window (as of the last decision or `state_at`).
    pub used: u64,
    pub charge: TokenCharge,
}

impl TokenLimitState {
    /// Tokens per minute (`max × 60 / window`, rounded down); 0 when unlimited.
    pub fn per_minute(&self) -> u64 {
        self.max.map_or(0, |m| per_minute(m, self.window))
    }
}

/// `max` tokens per `window`, expressed per minute and rounded down.
pub fn per_minute(max: u64, window: Duration) -> u64 {
    let w = window.as_secs_f64();
    if w <= 0.0 {
        return 0;
    }
    (max as f64 * 60.0 / w + 1e-9).floor() as u64
}

/// Rolling-window token limit (unlocked: the gate holds it under its lock).
#[derive(Debug)]
pub struct TokenWindow {
    /// `u64::MAX`: unlimited (the window still records).
    max: u64,
    window: Duration,
    charge: TokenCharge,
    /// Charges still inside the window, oldest first, and their sum.
    charges: VecDeque<(Instant, u64)>,
    used: u64,
}

impl TokenWindow {
    /// `max` tokens (at least 1) per rolling `window`; `None`: unlimited.
    pub fn new(max: Option<u64>, window: Duration, charge: TokenCharge) -> Self {
        Self {
            max: max.map_or(u64::MAX, |m| m.max(1)),
            window,
            charge,
            charges: VecDeque::new(),
            used: 0,
        }
    }

    pub fn is_limited(&self) -> bool {
        self.max != u64::MAX
    }

    pub fn charge_model(&self) -> TokenCharge {
        self.charge
    }

    /// Changes the limit (`None`: unlimited) keeping the charges on record: a lowered
    /// limit refuses until enough old charges leave, a raised one admits at once.
    pub fn set(&mut self, max: Option<u64>, window: Duration) {
        self.max = max.map_or(u64::MAX, |m| m.max(1));
        self.window = window;
    }

    /// Forgets charges that have left the window.
    pub fn prune(&mut self, now: Instant) {
        while let Some(&(t, n)) = self.charges.front() {
            if now.saturating_duration_since(t) < self.window {
                break;
            }
            self.charges.pop_front();
            self.used = self.used.saturating_sub(n);
        }
    }

    /// After `prune(now)`: whether a request of `requested` tokens is admitted under the
    /// charge model, and if not, how long until it would be (`None`: never).
    pub fn check(&self, now: Instant, requested: u64) -> Result<(), TokenRefusal> {
        if !self.is_limited() {
            return Ok(());
        }
        let refusal = |wait| TokenRefusal {
            max: self.max,
            window: self.window,
            used: self.used,
            requested,
            wait,
        };
        if requested > self.max {
            return Err(refusal(None));
        }
        let fits = |used: u64| match self.charge {
            TokenCharge::Reserved => used.saturating_add(requested) <= self.max,
            TokenCharge::Actual => used < self.max,
        };
        if fits(self.used) {
            return Ok(());
        }
        // The charge whose departure makes it fit; with all gone it fits, as `requested`
        // is at most `max`.
        let mut used = self.used;
        let leaving = self
            .charges
            .iter()
            .find(|(_, n)| {
                used = used.saturating_sub(*n);
                fits(used)
            })
            .map_or(now, |(t, _)| *t);
        Err(refusal(Some(
            self.window
                .saturating_sub(now.saturating_duration_since(leaving)),
        )))
    }

    /// Records `tokens` charged at `now` (times never go backwards: the gate's lock).
    pub fn charge(&mut self, now: Instant, tokens: u64) {
        if tokens == 0 {
            return;
        }
        self.used = self.used.saturating_add(tokens);
        self.charges.push_back((now, tokens));
    }

    /// What is left now (after `prune(now)`); `None` when unlimited.
    pub fn quota(&self, now: Instant) -> Option<TokenQuota> {
        self.is_limited().then(|| TokenQuota {
            max: self.max,
            window: self.window,
            remaining: self.max.saturating_sub(self.used),
            reset: self.charges.back().map_or(Duration::ZERO, |(t, _)| {
                self.window
                    .saturating_sub(now.saturating_duration_since(*t))
            }),
        })
    }

    pub fn state(&self) -> TokenLimitState {
        TokenLimitState {
            max: self.is_limited().then_some(self.max),
            window: self.window,
            used: self.used,
            charge: self.charge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn window(max: u64, charge: TokenCharge) -> (TokenWindow, Instant) {
        (TokenWindow::new(Some(max), 10 * S, charge), Instant::now())
    }

    /// Checks and, when admitted, charges `reserved` requests as the gate does.
    fn reserve(w: &mut TokenWindow, at: Instant, n: u64) -> Result<(), TokenRefusal> {
        w.prune(at);
        w.check(at, n)?;
        w.charge(at, n);
        Ok(())
    }

    #[test]
    fn reserved_admits_while_used_plus_requested_fits_then_waits_for_enough_to_leave() {
        let (mut w, t0) = window(100, TokenCharge::Reserved);
        reserve(&mut w, t0, 40).unwrap();
        reserve(&mut w, t0 + S, 30).unwrap();
        reserve(&mut w, t0 + 2 * S, 30).unwrap(); // exactly full
        let r = reserve(&mut w, t0 + 3 * S, 50).unwrap_err();
        // 50 more need 50 to leave: the 40 (at 0 s) and the 30 (at 1 s), at 11 s.
        assert_eq!((r.used, r.requested, r.wait), (100, 50, Some(8 * S)));
        assert_eq!(reserve(&mut w, t0 + 10 * S, 50).unwrap_err().wait, Some(S));
        reserve(&mut w, t0 + 11 * S, 50).unwrap();
        let q = w.quota(t0 + 11 * S).unwrap();
        assert_eq!((q.remaining, q.reset), (20, 10 * S));
    }

    #[test]
    fn actual_admits_while_below_the_limit_and_the_charge_comes_later() {
        let (mut w, t0) = window(100, TokenCharge::Actual);
        w.prune(t0);
        w.check(t0, 80).unwrap();
        w.check(t0, 80).unwrap(); // nothing charged yet: both admitted
        w.charge(t0 + S, 90);
        w.check(t0 + S, 80).unwrap(); // 90 < 100
        w.charge(t0 + 2 * S, 20);
        let r = w.check(t0 + 2 * S, 1).unwrap_err();
        assert_eq!((r.used, r.wait), (110, Some(9 * S)), "the 90 must leave");
        w.prune(t0 + 11 * S);
        w.check(t0 + 11 * S, 1).unwrap();
    }

    #[test]
    fn a_request_larger_than_the_window_never_fits_under_either_model() {
        for charge in [TokenCharge::Reserved, TokenCharge::Actual] {
            let (w, t0) = window(100, charge);
            let r = w.check(t0, 101).unwrap_err();
            assert_eq!((r.max, r.requested, r.wait), (100, 101, None), "{charge:?}");
            w.check(t0, 100).unwrap();
        }
    }

    #[test]
    fn the_limit_changes_keeping_the_charges_on_record() {
        let mut w = TokenWindow::new(None, 10 * S, TokenCharge::Reserved);
        let t0 = Instant::now();
        reserve(&mut w, t0, 500).unwrap();
        assert_eq!(w.quota(t0), None, "unlimited: no figures");
        assert_eq!(w.state().used, 500, "but it records");
        w.set(Some(600), 10 * S);
        assert_eq!(reserve(&mut w, t0 + S, 200).unwrap_err().wait, Some(9 * S));
        reserve(&mut w, t0 + S, 100).unwrap();
        w.set(Some(1000), 10 * S);
        reserve(&mut w, t0 + S, 400).unwrap();
        w.set(None, 10 * S);
        reserve(&mut w, t0 + S, 1 << 40).unwrap();
    }

    #[test]
    fn a_huge_charge_on_record_refuses_instead_of_overflowing() {
        // `max_tokens: 1e19` with n = 128 saturates the request's bound; unlimited, it is
        // still recorded, and a limit set afterwards must refuse, not overflow.
        let mut w = TokenWindow::new(None, 10 * S, TokenCharge::Reserved);
        let t0 = Instant::now();
        reserve(&mut w, t0, u64::MAX).unwrap();
        w.set(Some(100), 10 * S);
        let r = reserve(&mut w, t0 + S, 100).unwrap_err();
        assert_eq!((r.used, r.wait), (u64::MAX, Some(9 * S)));
    }

    #[test]
    fn tokens_per_minute_and_back() {
        assert_eq!(per_minute(1000, 6 * S), 10_000);
        assert_eq!(per_minute(7, 9 * S), 46);
        let w = TokenWindow::new(Some(1000), 6 * S, TokenCharge::Actual);
        assert_eq!(w.state().per_minute(), 10_000);
    }
}
