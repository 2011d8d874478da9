//! Tokens leased from a shared budget, for the request path to take without a round trip.
//!
//! In cluster mode (`redis_url` set) a provider's limiter takes its tokens here instead of
//! from its own bucket: the budget task (`crate::budget`) keeps the pot filled with leases
//! granted by Redis and says which [`Mode`] the replica is in. The request path only ever
//! touches atomics: one load for the mode, one CAS for a token. When the pot runs low it
//! raises a flag and wakes the task, which leases more before the last token goes.
//!
//! **Why the lease's number rides with the tokens.** Redis counts a grant for its lease
//! time plus the provider's window and margin: a send is counted while the provider counts
//! it only if it goes out within its own lease's time. So the count and the lease's number
//! share one word (one CAS takes a token *of a lease*, and a refill can never be mistaken
//! for the lease it replaced), the number rides in the claim, and
//! - a token given back unsent returns to the pot only while its lease is the one in hand
//!   (put into a later lease it would go out after its own grant stopped counting);
//! - a send written after its lease's time (a busy machine between the grant and the
//!   write) is reported to the task, which has it counted again from its send.
//!
//! A lease's times live in a small ring by number, written before its tokens are
//! published, so a take always checks the times of the lease it takes from.

use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;

use super::control::Event;
use super::sync::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use super::token_lease::{TokenPot, TokenReport};

/// Bits of the pot's word holding the count; the lease number has the high 32.
const COUNT_BITS: u32 = 32;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Leases whose times are kept, by number modulo this (a power of two).
const RING: usize = 64;

fn split(word: u64) -> (u32, u32) {
    ((word >> COUNT_BITS) as u32, (word & COUNT_MASK) as u32)
}

fn join(lease: u32, tokens: u32) -> u64 {
    (u64::from(lease) << COUNT_BITS) | u64::from(tokens)
}

/// A lease for the pot: its number (never 0), its tokens and its times (clock
/// nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PotLease {
    pub number: u32,
    pub tokens: u32,
    /// Its tokens may be taken from then (a lease may be scheduled behind other
    /// replicas')...
    pub not_before: u64,
    /// ...and until then.
    pub expires: u64,
    /// A send made after this is no longer counted by the grant while the provider
    /// counts it: a late send.
    pub covers_until: u64,
}

#[cfg(test)]
impl PotLease {
    /// Lease `number` of `tokens`, usable at once and for ever (tests).
    pub fn open(number: u32, tokens: u32) -> Self {
        Self {
            number,
            tokens,
            not_before: 0,
            expires: u64::MAX,
            covers_until: u64::MAX,
        }
    }
}

/// The times of one lease, in the ring.
#[derive(Debug)]
struct Times {
    number: AtomicU32,
    not_before: AtomicU64,
    expires: AtomicU64,
    covers_until: AtomicU64,
}

impl Times {
    fn new() -> Self {
        Self {
            number: AtomicU32::new(0),
            not_before: AtomicU64::new(0),
            expires: AtomicU64::new(0),
            covers_until: AtomicU64::new(0),
        }
    }
}

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
    /// The lease's number (high half) and its tokens left; its own cache line: every
    /// admission CASes it, the counters below are only added to.
    word: CachePadded<AtomicU64>,
    /// The last leases' times, by number modulo [`RING`].
    times: [Times; RING],
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
    /// Sends made after their lease's time (clock nanoseconds), for the task to report.
    late: SegQueue<u64>,
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
            word: CachePadded::new(AtomicU64::new(0)),
            times: std::array::from_fn(|_| Times::new()),
            low_water: AtomicU32::new(0),
            taken: CachePadded::new(AtomicU64::new(0)),
            offered: CachePadded::new(AtomicU64::new(0)),
            want: AtomicBool::new(false),
            kick: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            outbox: SegQueue::new(),
            late: SegQueue::new(),
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

    fn times(&self, lease: u32) -> &Times {
        &self.times[lease as usize % RING]
    }

    /// One token at `now`: the number of the lease it came from, or `None` (the task is
    /// asked for more).
    #[inline]
    pub fn try_take(&self, now: u64) -> Option<u32> {
        // Acquire: the lease's times were written before its tokens were published.
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let (lease, n) = split(w);
            if n == 0 {
                self.ask();
                return None;
            }
            // Relaxed: published with the word read above; a refill since then changes
            // the word, and the CAS below fails.
            let t = self.times(lease);
            if now >= t.expires.load(Ordering::Relaxed) {
                self.ask();
                return None;
            }
            if now < t.not_before.load(Ordering::Relaxed) {
                return None;
            }
            match self.word.compare_exchange_weak(
                w,
                join(lease, n - 1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.taken.fetch_add(1, Ordering::Relaxed);
                    if n - 1 <= self.low_water.load(Ordering::Relaxed) {
                        self.ask();
                    }
                    return Some(lease);
                }
                Err(actual) => w = actual,
            }
        }
    }

    /// A token of lease `lease` taken but not used after all: back into the pot while
    /// that lease is in hand. Otherwise it is left unused: its grant still counts it in
    /// the shared log until its span ends (safe), and a later lease must not send it.
    pub fn put_back(&self, lease: u32) {
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let (held, n) = split(w);
            if held != lease || lease == 0 {
                return;
            }
            match self.word.compare_exchange_weak(
                w,
                join(held, n.saturating_add(1)),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.taken.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Err(actual) => w = actual,
            }
        }
    }

    /// A request with a token of lease `lease` is written upstream at `now`: when that is
    /// after the time its grant covers, the send is queued for the task to have counted
    /// again from `now`. `true`: late.
    #[inline]
    pub fn sent(&self, lease: u32, now: u64) -> bool {
        if lease == 0 {
            return false;
        }
        // Relaxed: written before the lease's tokens were published (read by the take
        // this send follows). A slot taken over by a lease 64 numbers later says late.
        let t = self.times(lease);
        let late = t.number.load(Ordering::Relaxed) != lease
            || now > t.covers_until.load(Ordering::Relaxed);
        if late {
            self.late.push(now);
            self.wake();
        }
        late
    }

    /// For the task: the next late send (its clock time).
    pub fn next_late(&self) -> Option<u64> {
        self.late.pop()
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
        if self.want.swap(false, Ordering::AcqRel)
            || kicked
            || !self.outbox.is_empty()
            || !self.late.is_empty()
        {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// For the task: lease `l` into the pot; returns the tokens left of the lease it
    /// replaces (the task gives them back).
    pub fn fill(&self, l: PotLease, low_water: u32) -> u32 {
        let t = self.times(l.number);
        t.number.store(l.number, Ordering::Relaxed);
        t.not_before.store(l.not_before, Ordering::Relaxed);
        t.expires.store(l.expires, Ordering::Relaxed);
        t.covers_until.store(l.covers_until, Ordering::Relaxed);
        self.low_water.store(low_water, Ordering::Relaxed);
        // Release (AcqRel): publishes the times above with the tokens.
        split(self.word.swap(join(l.number, l.tokens), Ordering::AcqRel)).1
    }

    /// For the task: empties the pot, returning what was left (the lease stays in hand:
    /// a token put back later is still of it).
    pub fn drain(&self) -> u32 {
        split(self.word.fetch_and(!COUNT_MASK, Ordering::AcqRel)).1
    }

    pub fn tokens(&self) -> u32 {
        split(self.word.load(Ordering::Relaxed)).1
    }

    /// When the lease in hand expires (0: none yet).
    pub fn expires(&self) -> u64 {
        let (lease, _) = split(self.word.load(Ordering::Acquire));
        if lease == 0 {
            return 0;
        }
        self.times(lease).expires.load(Ordering::Relaxed)
    }

    /// Time from `now` until the tokens in hand may be taken (zero: now, or none).
    pub fn usable_in(&self, now: u64) -> std::time::Duration {
        let (lease, n) = split(self.word.load(Ordering::Acquire));
        if n == 0 {
            return std::time::Duration::ZERO;
        }
        let at = self.times(lease).not_before.load(Ordering::Relaxed);
        std::time::Duration::from_nanos(at.saturating_sub(now))
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

    /// Lease `number` of `tokens`, usable from `not_before` until `expires`, its sends
    /// counted until 10 past.
    fn lease(number: u32, tokens: u32, not_before: u64, expires: u64) -> PotLease {
        PotLease {
            number,
            tokens,
            not_before,
            expires,
            covers_until: expires.saturating_add(10),
        }
    }

    #[test]
    fn takes_what_was_leased_until_it_expires() {
        let p = LeasePot::new();
        assert_eq!(p.try_take(0), None, "an empty pot gives nothing");
        assert_eq!(p.fill(lease(1, 3, 0, 100), 0), 0);
        assert_eq!(p.try_take(10), Some(1));
        assert_eq!(p.try_take(10), Some(1));
        assert_eq!(p.tokens(), 1);
        assert_eq!(p.try_take(100), None, "expired tokens are not taken");
        assert_eq!(p.drain(), 1);
        assert_eq!(p.counts().0, 2);
    }

    #[test]
    fn asks_for_more_at_the_low_water_mark() {
        let p = LeasePot::new();
        p.fill(lease(1, 4, 0, u64::MAX), 2);
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        assert!(p.poll_wanted(&mut cx).is_pending());
        assert!(p.try_take(0).is_some());
        assert!(
            p.poll_wanted(&mut cx).is_pending(),
            "3 left, above the mark"
        );
        assert!(p.try_take(0).is_some());
        assert!(
            p.poll_wanted(&mut cx).is_ready(),
            "2 left: ask for the next lease"
        );
        assert!(p.poll_wanted(&mut cx).is_pending(), "asked once");
    }

    #[test]
    fn a_scheduled_lease_waits_for_its_start() {
        let p = LeasePot::new();
        p.fill(lease(1, 2, 50, 100), 0);
        assert_eq!(p.try_take(10), None, "not before its start");
        assert_eq!(p.usable_in(10), std::time::Duration::from_nanos(40));
        assert_eq!(p.try_take(50), Some(1));
        assert_eq!(p.expires(), 100);
    }

    #[test]
    fn a_refill_returns_the_leftover_of_the_last_lease() {
        let p = LeasePot::new();
        p.fill(lease(1, 5, 0, u64::MAX), 0);
        assert!(p.try_take(0).is_some());
        assert_eq!(p.fill(lease(2, 2, 0, u64::MAX), 0), 4);
        assert_eq!(p.tokens(), 2);
    }

    #[test]
    fn a_token_goes_back_only_into_its_own_lease() {
        let p = LeasePot::new();
        p.fill(lease(1, 2, 0, 100), 0);
        let a = p.try_take(0).expect("a token of lease 1");
        p.put_back(a);
        assert_eq!(p.tokens(), 2, "lease 1 still in hand: back into the pot");
        let b = p.try_take(0).expect("again");
        p.drain();
        p.put_back(b);
        assert_eq!(
            p.tokens(),
            1,
            "drained, lease 1 still in hand: its token is back"
        );
        assert_eq!(p.try_take(200), None, "and expires with it");
        let c = p.try_take(50).expect("taken before the refill");
        p.fill(lease(2, 3, 100, 200), 0);
        p.put_back(c);
        assert_eq!(
            p.tokens(),
            3,
            "lease 1's token is not added to lease 2: it would go out after its grant's time"
        );
        assert_eq!(p.counts().0, 1, "the token not given back counts as taken");
    }

    #[test]
    fn a_send_after_its_lease_covers_it_is_reported_late() {
        let p = LeasePot::new();
        let waker = futures_task_noop();
        let mut cx = Context::from_waker(&waker);
        p.fill(lease(7, 2, 0, 100), 0);
        assert!(p.poll_wanted(&mut cx).is_pending());
        let n = p.try_take(90).expect("in time");
        assert!(
            !p.sent(n, 110),
            "within the lease's time: counted by its grant"
        );
        assert_eq!(p.next_late(), None);
        assert!(p.sent(n, 111), "after it: late");
        assert_eq!(p.next_late(), Some(111));
        assert!(
            p.poll_wanted(&mut cx).is_ready(),
            "the task is woken to report it"
        );
        assert!(
            !p.sent(0, u64::MAX),
            "no lease (the local bucket): nothing to report"
        );
        for k in 8..8 + RING as u32 {
            p.fill(lease(k, 1, 0, 100), 0);
        }
        assert!(
            p.sent(n, 50),
            "its times were overwritten 64 leases later: reported late, to be safe"
        );
    }

    #[test]
    fn every_token_goes_to_exactly_one_taker() {
        let p = std::sync::Arc::new(LeasePot::new());
        p.fill(lease(1, 10_000, 0, u64::MAX), 0);
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = std::sync::Arc::clone(&p);
                std::thread::spawn(move || (0..5_000).filter(|_| p.try_take(0).is_some()).count())
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
