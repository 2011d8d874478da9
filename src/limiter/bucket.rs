//! The atomic token bucket, in its GCRA form: the whole state is one `AtomicU64`.
//!
//! The word holds the *theoretical arrival time* (TAT, clock nanoseconds): the time at
//! which the bucket would be full again if nothing more were admitted, shifted by one
//! interval. With `T` the interval between tokens (60 s / rate) and `b` the capacity,
//! a request at `now` is admitted iff `max(TAT, now) - now <= (b - 1)·T`, and then
//! `TAT := max(TAT, now) + T`. Refill is implicit in the passage of time (lazy, inside
//! the CAS loop), so there is no refill task and no lock.
//!
//! **Guarantee.** Over any window of length `t`, at most `t / T + b` requests are
//! admitted, i.e. `admitted ≤ rate × t + capacity`. After an idle period the bucket
//! holds at most `b` tokens: idling never earns extra.
//!
//! **Changes at run time.** [`TokenBucket::set_rate`] converts the state so that the
//! number of tokens available (and any waiting debt) is preserved: no reset to full, no
//! burst, a partial token stays partial. Capacity shrinks clip the tokens; growth adds
//! none. [`TokenBucket::pause_until`] blocks admission until a time (used when the
//! provider says `Retry-After`); after the pause exactly one token is available.
//!
//! **Orderings.** `set_rate` stores the new parameters, then publishes the converted
//! TAT with `Release`; `acquire` loads the TAT with `Acquire` before reading the
//! parameters, so a decision made on a converted TAT always uses the new parameters.
//! A decision on a pre-change TAT may use either; its CAS then races with the
//! conversion and one of them retries.

use std::time::Duration;

use super::sync::{AtomicU64, Ordering};

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

/// A lock-free token bucket shared by every worker.
#[derive(Debug)]
pub struct TokenBucket {
    tat: AtomicU64,
    interval: AtomicU64,
    capacity: AtomicU64,
}

impl TokenBucket {
    /// A full bucket admitting `rpm` per minute with bursts of `capacity`.
    pub fn new(rpm: f64, capacity: u32) -> Self {
        Self {
            tat: AtomicU64::new(0),
            interval: AtomicU64::new(interval_nanos(rpm)),
            capacity: AtomicU64::new(u64::from(capacity.max(1))),
        }
    }

    fn params(&self) -> (u64, u64) {
        // Relaxed: ordered by the Acquire load of `tat` that precedes every call.
        (
            self.interval.load(Ordering::Relaxed),
            self.capacity.load(Ordering::Relaxed),
        )
    }

    /// The pure admission rule: the new TAT if a request at `now` is admitted, or how
    /// long until it would be.
    #[inline]
    fn decide(tat: u64, now: u64, interval: u64, capacity: u64) -> Result<u64, u64> {
        let tolerance = (capacity - 1).saturating_mul(interval);
        let base = tat.max(now);
        let ahead = base - now;
        if ahead <= tolerance {
            Ok(base.saturating_add(interval))
        } else {
            Err(ahead - tolerance)
        }
    }

    /// Takes one token at `now` (clock nanoseconds), or says how long until one is free.
    #[inline]
    pub fn try_acquire(&self, now: u64) -> Result<(), Duration> {
        // Acquire: pairs with set_rate's Release so the parameters read next are at
        // least as new as the TAT.
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            let (interval, capacity) = self.params();
            let next = Self::decide(cur, now, interval, capacity).map_err(Duration::from_nanos)?;
            // Release on success publishes nothing but the TAT itself; Acquire on
            // failure keeps the pairing with set_rate for the retry.
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Time until a token is free at `now`, without taking it (zero if one is free).
    pub fn wait_time(&self, now: u64) -> Duration {
        let cur = self.tat.load(Ordering::Acquire);
        let (interval, capacity) = self.params();
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
        let (interval, capacity) = self.params();
        let tolerance = (capacity - 1).saturating_mul(interval);
        // AcqRel: a read-modify-write on the one word; later acquires see the pause.
        self.tat
            .fetch_max(until.saturating_add(tolerance), Ordering::AcqRel);
    }

    /// Tokens available at `now` (fractional; negative while a pause or debt lasts).
    pub fn tokens(&self, now: u64) -> f64 {
        let cur = self.tat.load(Ordering::Acquire);
        let (interval, capacity) = self.params();
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

    /// Changes rate and capacity at `now`, keeping the tokens (or the wait) there are.
    pub fn set_rate(&self, rpm: f64, capacity: u32, now: u64) {
        let new_interval = interval_nanos(rpm);
        let new_capacity = u64::from(capacity.max(1));
        let old_interval = self.interval.swap(new_interval, Ordering::Relaxed);
        let old_capacity = self.capacity.swap(new_capacity, Ordering::Relaxed);
        let mut cur = self.tat.load(Ordering::Acquire);
        loop {
            let fill = Self::fill(cur, now, old_interval, old_capacity).min(new_capacity as f64);
            let next = if fill >= 0.0 {
                // Keep the tokens: the new TAT leaves exactly `fill` of them at `now`.
                let missing = (new_capacity as f64 - fill) * new_interval as f64;
                now.saturating_add(missing as u64)
            } else {
                // A pause or debt: keep how long it still lasts, in time.
                let full_at = now.saturating_add(old_capacity.saturating_mul(old_interval));
                let debt = cur.saturating_sub(full_at);
                now.saturating_add(new_capacity.saturating_mul(new_interval))
                    .saturating_add(debt)
            };
            // Release: publishes the parameters stored above with the new TAT.
            match self
                .tat
                .compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
