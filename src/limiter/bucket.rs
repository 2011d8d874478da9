//! The atomic token bucket, in its GCRA form: the whole state is one `AtomicU64`.
//!
//! The word holds the *theoretical arrival time* (TAT, clock nanoseconds): the time at
//! which the bucket would be full again if nothing more were admitted, shifted by one
//! interval. With `T` the interval between tokens (60 s / rate), `b` the capacity and
//! `base` the later of TAT and `now`, a request at `now` is admitted iff
//! `base - now <= (b - 1)·T`, and then `TAT := base + T`. Refill is implicit in the
//! passage of time (lazy, inside the CAS loop), so there is no refill task and no lock.
//!
//! **Slack.** When `now` is past the TAT by at most `s = min(T/4, 20 ms)`, `base` is the
//! TAT instead: the request counts as having come when its token was due. Waiters are
//! granted by a thread that wakes at the TAT and always wakes a little late; anchoring on
//! `now` lost that lateness for good on every grant (with `b = 1` the admitted rate fell
//! 1.7% short under load, 15.7% under heavy load). Scheduling delays are milliseconds,
//! so 20 ms covers them; more would only let a request follow the one before that much
//! sooner, which at low rates (`T` of seconds) is an early request, not a caught-up
//! delay. `T/4` keeps the slack a fraction of one token at high rates. Lateness past the
//! slack is not caught up: the bucket has then simply been full, and idling earns nothing.
//!
//! **Guarantee.** Over any window of length `t`, at most `(t + s) / T + b` requests are
//! admitted: each admission's base is at least one interval past the previous one's,
//! and at most `s` before the admission. Past the burst, consecutive admissions are at
//! least `T - s` apart, and a grant late by at most `s` costs nothing, so the long-run
//! rate is the configured one despite late wake-ups. The price: a window up to `s`
//! shorter than `n` intervals can hold `n + b` admissions, so a provider counting
//! exactly `rate` per rolling minute could see one request too many after a caught-up
//! grant; the window guard beside the bucket (`guard.rs`) is what rules that out. After
//! an idle period the bucket holds at
//! most `b` tokens; the slack's fraction of one interval only brings the token after
//! them up to `s` sooner.
//!
//! **Changes at run time.** [`TokenBucket::set_rate`] converts the state so that the
//! tokens available are preserved, fraction included (no reset to full, no burst; a
//! capacity shrink clips them, growth adds none; a full bucket's catch-up is dropped),
//! and a pause still ends exactly when the provider said. [`TokenBucket::pause_until`]
//! blocks admission until a time (used when the provider says `Retry-After`); after the
//! pause exactly one token is available, and not a nanosecond before: the slack only
//! applies once `now` is past the TAT. [`TokenBucket::refund`] fills the bucket at most
//! to full at `now`, so it never creates catch-up.
//!
//! **Consistency.** The rate and capacity live beside the TAT, guarded by a generation
//! counter (odd while `set_rate` runs): a decision uses a TAT and settings read within
//! one even generation (the slack is a function of the interval read there), and its
//! CAS on the TAT orders it against the conversion. No decision ever mixes old and new
//! settings (loom-checked).

use std::time::Duration;

use super::sync::{fence, AtomicU64, Ordering};

/// Nanoseconds between tokens for `rpm` requests per minute (at least 1 ns).
pub fn interval_nanos(rpm: f64) -> u64 {
    let ns = 60e9 / rpm;
    if ns.is_finite() && ns >= 1.0 {
        ns as u64
    } else if ns.is_finite() {
        1
    } else {
        u64::MAX / 4
    }
}

/// The most lateness a grant catches up, whatever the interval.
pub const MAX_SLACK: Duration = Duration::from_millis(20);

/// How late past its token a request may come and still be anchored on the token's due
/// time: a quarter interval, at most [`MAX_SLACK`].
pub fn slack_nanos(interval: u64) -> u64 {
    (interval / 4).min(MAX_SLACK.as_nanos() as u64)
}

/// A lock-free token bucket shared by every worker.
#[derive(Debug)]
pub struct TokenBucket {
    tat: AtomicU64,
    interval: AtomicU64,
    capacity: AtomicU64,
    /// The latest pause end, so a rate change can keep it exactly.
    paused_until: AtomicU64,
    /// Settings generation: odd while `set_rate` is changing them. A decision is made
    /// only on a TAT and settings read within one even generation.
    generation: AtomicU64,
}

impl TokenBucket {
    /// A full bucket admitting `rpm` per minute with bursts of `capacity`.
    pub fn new(rpm: f64, capacity: u32) -> Self {
        Self {
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(interval_nanos(rpm)),
            capacity: AtomicU64::new(u64::from(capacity.max(1))),
            generation: AtomicU64::new(0),
            paused_until: AtomicU64::new(0),
        }
    }

    /// Reads the TAT and the settings as one consistent view: retried while a
    /// `set_rate` is in progress or completed in between.
    #[inline]
    fn view(&self) -> (u64, u64, u64) {
        loop {
            // Acquire: pairs with set_rate's Release stores of the generation, so the
            // settings and TAT read next are at least as new as the generation.
            let g1 = self.generation.load(Ordering::Acquire);
            if g1 & 1 == 1 {
                super::sync::spin();
                continue;
            }
            let tat = self.tat.load(Ordering::Acquire);
            let (interval, capacity) = self.params();
            // Seqlock read side: if any read above saw a value set_rate stored after
            // entering its odd generation, this fence (pairing with set_rate's Release
            // fence) makes the re-check see that generation too.
            fence(Ordering::Acquire);
            if self.generation.load(Ordering::Relaxed) == g1 {
                return (tat, interval, capacity);
            }
        }
    }

    fn params(&self) -> (u64, u64) {
        // Relaxed: `view` validates these reads against the generation.
        (
            self.interval.load(Ordering::Relaxed),
            self.capacity.load(Ordering::Relaxed),
        )
    }

    /// The pure admission rule: the new TAT if a request at `now` is admitted, or how
    /// long until it would be. The slack derives from `interval`, so it comes from the
    /// same consistent view as the TAT.
    #[inline]
    fn decide(tat: u64, now: u64, interval: u64, capacity: u64) -> Result<u64, u64> {
        let tolerance = (capacity - 1).saturating_mul(interval);
        // Past the TAT by at most the slack: anchor on the TAT, so a late grant costs no
        // rate. Later than that the bucket has been full a while: anchor on now.
        let base = if now <= tat.saturating_add(slack_nanos(interval)) {
            tat
        } else {
            now
        };
        let ahead = base.saturating_sub(now);
        if ahead <= tolerance {
            Ok(base.saturating_add(interval))
        } else {
            Err(ahead - tolerance)
        }
    }

    /// Takes one token at `now` (clock nanoseconds), or says how long until one is free.
    #[inline]
    pub fn try_acquire(&self, now: u64) -> Result<(), Duration> {
        loop {
            let (cur, interval, capacity) = self.view();
            let next = Self::decide(cur, now, interval, capacity).map_err(Duration::from_nanos)?;
            // AcqRel/Acquire: the TAT is the one word the decision rests on. A set_rate
            // that began after `view` either converts this new TAT (it runs its CAS
            // after ours) or made ours fail (it ran first), and we retry on its state.
            if self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(());
            }
        }
    }

    /// Time until a token is free at `now`, without taking it (zero if one is free).
    pub fn wait_time(&self, now: u64) -> Duration {
        let (cur, interval, capacity) = self.view();
        match Self::decide(cur, now, interval, capacity) {
            Ok(_) => Duration::ZERO,
            Err(ns) => Duration::from_nanos(ns),
        }
    }

    /// Gives back a token taken at `now` but not used (its request never went out).
    pub fn refund(&self, now: u64) {
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            if cur <= now {
                return; // already full
            }
            let (interval, _) = self.params();
            let next = cur.saturating_sub(interval).max(now);
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// No token before `until` (clock nanoseconds); at `until` exactly one is free.
    pub fn pause_until(&self, until: u64) {
        // Relaxed: read back only by set_rate, inside its generation.
        self.paused_until.fetch_max(until, Ordering::Relaxed);
        let (_, interval, capacity) = self.view();
        let tolerance = (capacity - 1).saturating_mul(interval);
        // AcqRel: a read-modify-write on the one word; later acquires see the pause.
        self.tat
            .fetch_max(until.saturating_add(tolerance), Ordering::AcqRel);
    }

    /// Tokens available at `now` (fractional; negative while a pause or debt lasts).
    pub fn tokens(&self, now: u64) -> f64 {
        let (cur, interval, capacity) = self.view();
        Self::fill(cur, now, interval, capacity)
    }

    fn fill(tat: u64, now: u64, interval: u64, capacity: u64) -> f64 {
        let full_at = now as f64 + (capacity as f64) * interval as f64;
        ((full_at - tat as f64) / interval as f64).min(capacity as f64)
    }

    /// Current `(rate_rpm, capacity)`.
    pub fn rate(&self) -> (f64, u32) {
        let (interval, capacity) = self.params();
        (
            60e9 / interval as f64,
            u32::try_from(capacity).unwrap_or(u32::MAX),
        )
    }

    /// Changes rate and capacity at `now`, keeping the tokens there are (and any pause).
    pub fn set_rate(&self, rpm: f64, capacity: u32, now: u64) {
        let new_interval = interval_nanos(rpm);
        let new_capacity = u64::from(capacity.max(1));
        // Enter an odd generation (one changer at a time; others spin — admin path).
        let mut g = self.generation.load(Ordering::Acquire);
        loop {
            if g & 1 == 1 {
                super::sync::spin();
                g = self.generation.load(Ordering::Acquire);
                continue;
            }
            // AcqRel: readers that see the odd generation retry; we see earlier changes.
            match self.generation.compare_exchange_weak(
                g,
                g + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => g = actual,
            }
        }
        // Seqlock write side: the odd generation is ordered before the stores below.
        fence(Ordering::Release);
        let old_interval = self.interval.swap(new_interval, Ordering::Relaxed);
        let old_capacity = self.capacity.swap(new_capacity, Ordering::Relaxed);
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            // Keep the tokens, fraction included, capped by the new capacity. Acquires
            // never take the fill below zero; only a pause does, and it is re-applied
            // below from its own record, so it ends exactly when it said.
            let fill =
                Self::fill(cur, now, old_interval, old_capacity).clamp(0.0, new_capacity as f64);
            let missing = (new_capacity as f64 - fill) * new_interval as f64;
            let next = now.saturating_add(missing as u64);
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        let paused = self.paused_until.load(Ordering::Relaxed);
        if paused > now {
            self.tat.fetch_max(
                paused.saturating_add((new_capacity - 1).saturating_mul(new_interval)),
                Ordering::AcqRel,
            );
        }
        // Release: the new settings and TAT are visible to whoever sees the even
        // generation.
        self.generation.store(g + 2, Ordering::Release);
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
