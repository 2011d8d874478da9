//! Tokens leased from a shared budget, for the request path to take without a round trip.
//!
//! In cluster mode (`redis_url` set) a provider's limiter takes its tokens here instead of
//! from its own bucket: the budget task (`crate::budget`) keeps the pot filled with leases
//! granted by Redis and says which [`Mode`] the replica is in. The request path only ever
//! touches atomics: one load for the mode, one CAS for a token. When the pot runs low it
//! raises a flag and wakes the task, which leases more before the last token goes.

use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;

use super::control::Event;
use super::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use super::token_lease::{TokenPot, TokenReport};

/// How a replica in cluster mode gets its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Redis is reachable: tokens come from leases.
    Shared = 0,
    /// Redis is lost (or not reached yet): the local bucket and guard, at the share of the
    /// limit this replica may use alone.
    Fallback = 1,
    /// Redis was lost for longer than a vanished replica's share is kept for it: nothing is
    /// sent with the shared key until Redis answers again.
    Isolated = 2,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Self::Shared, Self::Fallback, Self::Isolated];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Shared => "shared",
            Self::Fallback => "fallback",
            Self::Isolated => "isolated",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Shared,
            2 => Self::Isolated,
            _ => Self::Fallback,
        }
    }
}

/// The tokens of the current lease and the signals between the request path and the task.
#[derive(Debug)]
pub struct LeasePot {
    mode: AtomicU8,
    /// Its own cache line: every admission CASes it, the counters below are only added to.
    tokens: CachePadded<AtomicU32>,
    /// Clock nanoseconds from which, and after which no longer, the tokens in hand may
    /// be taken (a lease may be scheduled behind other replicas').
    not_before: AtomicU64,
    expires: AtomicU64,
    /// Take no token while fewer than this remain... below it, ask for the next lease.
    low_water: AtomicU32,
    /// Tokens taken (ever), for the task's rate estimate.
    taken: CachePadded<AtomicU64>,
    /// Requests offered (ever), for the demand the task reports.
    offered: CachePadded<AtomicU64>,
    want: AtomicBool,
    /// Something else for the task (a mode change, an admin change).
    kick: AtomicBool,
    waker: AtomicWaker,
    /// What the provider answered, for the task to report to the shared budget.
    pub(crate) outbox: SegQueue<Event>,
    /// Tokens of the token budget, leased as the requests are (when the cluster keeps
    /// a token budget for this provider).
    pub token_pot: TokenPot,
}

impl Default for LeasePot {
    fn default() -> Self {
        Self::new()
    }
}

impl LeasePot {
    /// A pot in fallback mode, empty.
    pub fn new() -> Self {
        Self {
            mode: AtomicU8::new(Mode::Fallback as u8),
            tokens: CachePadded::new(AtomicU32::new(0)),
            not_before: AtomicU64::new(0),
            expires: AtomicU64::new(0),
            low_water: AtomicU32::new(0),
            taken: CachePadded::new(AtomicU64::new(0)),
            offered: CachePadded::new(AtomicU64::new(0)),
            want: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            outbox: SegQueue::new(),
            token_pot: TokenPot::new(),
        }
    }

    #[inline]
    pub fn mode(&self) -> Mode {
        // Acquire: a switch to `Shared` is published after the pot was filled.
        Mode::from_u8(self.mode.load(Ordering::Acquire))
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
        self.wake();
    }

    /// One token at `now`, or none (the task is asked for more).
    #[inline]
    pub fn try_take(&self, now: u64) -> bool {
        // Relaxed: the count is the only shared state; the expiry is a bound the task
        // sets before it adds the tokens (both with the lease).
        let mut n = self.tokens.load(Ordering::Relaxed);
        loop {
            if n == 0 || now >= self.expires.load(Ordering::Relaxed) {
                self.ask();
                return false;
            }
            if now < self.not_before.load(Ordering::Relaxed) {
                return false;
            }
            match self
                .tokens
                .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => n = actual,
            }
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        if n - 1 <= self.low_water.load(Ordering::Relaxed) {
            self.ask();
        }
        true
    }

    /// A token taken but not used after all.
    pub fn put_back(&self) {
        self.tokens.fetch_add(1, Ordering::AcqRel);
        self.taken.fetch_sub(1, Ordering::Relaxed);
    }

    /// A request arrived (counted for the demand the task reports).
    #[inline]
    pub fn offer(&self) {
        self.offered.fetch_add(1, Ordering::Relaxed);
    }

    fn ask(&self) {
        if !self.want.load(Ordering::Relaxed) && !self.want.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Wakes the task (an admin change to carry, a mode change).
    pub fn wake(&self) {
        self.kick.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// `cost` tokens of the leased token budget at `now` (see [`TokenPot::take`]); the
    /// task is asked for more when the pot is short.
    #[inline]
    pub fn take_tokens(&self, cost: u64, now: u64) -> Option<u32> {
        let got = self.token_pot.take(cost, now);
        if got.is_none() {
            self.ask();
        }
        got
    }

    /// Reports what the provider said of its token limit to the shared budget.
    pub fn report_tokens(&self, r: TokenReport) {
        self.token_pot.report(r);
        self.wake();
    }

    /// Reports `ev` to the shared budget.
    pub fn report(&self, ev: Event) {
        self.outbox.push(ev);
        self.waker.wake();
    }

    /// For the task: ready when the request path asked for tokens or reported something.
    pub fn poll_wanted(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        let kicked = self.kick.swap(false, Ordering::AcqRel);
        if self.want.swap(false, Ordering::AcqRel) || kicked || !self.outbox.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// For the task: the tokens of a new lease, usable from `not_before` until
    /// `expires`; returns the tokens of the previous lease that were left (the task gives
    /// them back).
    pub fn fill(&self, tokens: u32, not_before: u64, expires: u64, low_water: u32) -> u32 {
        self.not_before.store(not_before, Ordering::Relaxed);
        self.expires.store(expires, Ordering::Relaxed);
        self.low_water.store(low_water, Ordering::Relaxed);
        self.tokens.swap(tokens, Ordering::AcqRel)
    }

    /// For the task: empties the pot, returning what was left.
    pub fn drain(&self) -> u32 {
        self.tokens.swap(0, Ordering::AcqRel)
    }

    pub fn tokens(&self) -> u32 {
        self.tokens.load(Ordering::Relaxed)
    }

    pub fn expires(&self) -> u64 {
        self.expires.load(Ordering::Relaxed)
    }

    /// Time from `now` until the tokens in hand may be taken (zero: now, or none).
    pub fn usable_in(&self, now: u64) -> std::time::Duration {
        if self.tokens() == 0 {
            return std::time::Duration::ZERO;
        }
        std::time::Duration::from_nanos(self.not_before.load(Ordering::Relaxed).saturating_sub(now))
    }

    /// `(taken, offered)` so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.taken.load(Ordering::Relaxed),
            self.offered.load(Ordering::Relaxed),
        )
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    #[test]
    fn takes_what_was_leased_until_it_expires() {
        let p = LeasePot::new();
        assert!(!p.try_take(0), "an empty pot gives nothing");
        assert_eq!(p.fill(3, 0, 100, 0), 0);
        assert!(p.try_take(10));
        assert!(p.try_take(10));
        assert_eq!(p.tokens(), 1);
        assert!(!p.try_take(100), "expired tokens are not taken");
        assert_eq!(p.drain(), 1);
        assert_eq!(p.counts().0, 2);
    }

    #[test]
    fn asks_for_more_at_the_low_water_mark() {
        let p = LeasePot::new();
        p.fill(4, 0, u64::MAX, 2);
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        assert!(p.poll_wanted(&mut cx).is_pending());
        assert!(p.try_take(0));
        assert!(
            p.poll_wanted(&mut cx).is_pending(),
            "3 left, above the mark"
        );
        assert!(p.try_take(0));
        assert!(
            p.poll_wanted(&mut cx).is_ready(),
            "2 left: ask for the next lease"
        );
        assert!(p.poll_wanted(&mut cx).is_pending(), "asked once");
    }

    #[test]
    fn a_scheduled_lease_waits_for_its_start() {
        let p = LeasePot::new();
        p.fill(2, 50, 100, 0);
        assert!(!p.try_take(10), "not before its start");
        assert_eq!(p.usable_in(10), std::time::Duration::from_nanos(40));
        assert!(p.try_take(50));
    }

    #[test]
    fn a_refill_returns_the_leftover_of_the_last_lease() {
        let p = LeasePot::new();
        p.fill(5, 0, u64::MAX, 0);
        assert!(p.try_take(0));
        assert_eq!(p.fill(2, 0, u64::MAX, 0), 4);
        assert_eq!(p.tokens(), 2);
    }

    #[test]
    fn every_token_goes_to_exactly_one_taker() {
        let p = std::sync::Arc::new(LeasePot::new());
        p.fill(10_000, 0, u64::MAX, 0);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = std::sync::Arc::clone(&p);
                std::thread::spawn(move || (0..5_000).filter(|_| p.try_take(0)).count())
            })
            .collect();
        let got: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(got, 10_000);
        assert_eq!(p.tokens(), 0);
    }

    fn futures_task_noop() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
