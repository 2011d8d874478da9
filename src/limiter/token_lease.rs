//! Tokens of a token budget leased from the shared budget (cluster mode), for the
//! request path to take without a round trip: the token twin of the request pot
//! ([`super::lease::LeasePot`], which holds this one and wakes its task).
//!
//! The budget task leases `n` tokens at a time from Redis (`tlease`): Redis counts the
//! grant in the cluster's token log for the lease time plus the provider's window and
//! margin, so whatever a replica sends with it is counted while the provider counts it.
//! A request in cluster mode takes its estimated cost from here as well as from its own
//! limiter's budget.
//!
//! **Why the lease's number rides with the tokens.** A reservation's charge changes
//! after it leaves the pot: it is given back unsent, or settled from the answer's usage
//! (higher or lower than the estimate). Each change must move the count of the grant it
//! was taken from, no other: a grant counts exactly as long as the provider's window
//! around the sends it paid for, and moving a later grant instead would leave the shared
//! log short after the earlier one leaves. So the count and the lease's number share one
//! word (one CAS takes tokens *of a lease*), the number rides in the reservation, and
//! every change is queued here as an [`Adjustment`] of that lease for the task to report
//! (batched with its next call). A reservation given back while its lease is still in
//! hand goes straight back into the pot.

use std::time::Duration;

use crossbeam_queue::SegQueue;
use crossbeam_utils::CachePadded;

use super::sync::{AtomicBool, AtomicU64, Ordering};

/// Bits of the word holding the count; the lease number has the rest (24 bits).
const COUNT_BITS: u32 = 40;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Lease numbers run 1..=MAX_LEASE and wrap; 0 means "no lease".
pub const MAX_LEASE: u32 = (1 << (64 - COUNT_BITS)) - 1;

/// A change of the tokens charged to lease `lease` (positive: more), to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Adjustment {
    pub lease: u32,
    pub delta: i64,
}

/// Tokens of lease `lease` sent at `at` (clock nanoseconds), after the lease's time
/// was over: its grant may leave the shared log before the provider stops counting
/// them, so they are counted again from their send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateSend {
    pub lease: u32,
    pub tokens: u64,
    pub at: u64,
}

/// Leases whose expiry is remembered for [`TokenPot::sent`] (the last so many).
const EXPIRIES: usize = 64;

/// What the provider said about its token limit, for the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenReport {
    /// A 429 about tokens: the limit it stated (per window), and how long to hold.
    Refused {
        stated: Option<u64>,
        hold: Option<Duration>,
    },
    /// `x-ratelimit-limit-tokens`, per window.
    Stated { per_window: u64 },
}

fn split(word: u64) -> (u32, u64) {
    ((word >> COUNT_BITS) as u32, word & COUNT_MASK)
}

fn join(lease: u32, tokens: u64) -> u64 {
    (u64::from(lease) << COUNT_BITS) | tokens.min(COUNT_MASK)
}

/// The leased tokens in hand and what the request path tells the task about them.
#[derive(Debug)]
pub struct TokenPot {
    /// Whether the shared budget keeps a token budget for this provider (set by the
    /// task from the cluster's record): without one, requests take no tokens here.
    enabled: AtomicBool,
    /// The lease's number (high bits) and the tokens left of it.
    word: CachePadded<AtomicU64>,
    /// Clock nanoseconds after which the tokens in hand may no longer be taken.
    expires: AtomicU64,
    /// The largest cost that found the pot short since the task last looked: the least
    /// worth leasing.
    short: AtomicU64,
    /// Tokens taken (ever) and the takes, for the task's rate and mean cost.
    taken: CachePadded<AtomicU64>,
    takes: AtomicU64,
    adjustments: SegQueue<Adjustment>,
    reports: SegQueue<TokenReport>,
    /// The expiry of the last leases, by number modulo [`EXPIRIES`].
    expiries: [AtomicU64; EXPIRIES],
    late: SegQueue<LateSend>,
}

impl Default for TokenPot {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenPot {
    pub fn new() -> Self {
        Self {
            enabled: AtomicBool::new(false),
            word: CachePadded::new(AtomicU64::new(0)),
            expires: AtomicU64::new(0),
            short: AtomicU64::new(0),
            taken: CachePadded::new(AtomicU64::new(0)),
            takes: AtomicU64::new(0),
            adjustments: SegQueue::new(),
            reports: SegQueue::new(),
            expiries: std::array::from_fn(|_| AtomicU64::new(0)),
            late: SegQueue::new(),
        }
    }

    #[inline]
    pub fn enabled(&self) -> bool {
        // Relaxed: a switch set by the task; a request that misses it takes its tokens
        // from its own budget only, as before the cluster had a token budget.
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// `cost` tokens at `now`: the number of the lease they came from, or `None` (the
    /// pot is short: the cost is remembered for the task).
    #[inline]
    pub fn take(&self, cost: u64, now: u64) -> Option<u32> {
        // Relaxed for the expiry: the task sets it before the tokens it bounds.
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let (lease, n) = split(w);
            if lease == 0 || n < cost || now >= self.expires.load(Ordering::Relaxed) {
                self.short.fetch_max(cost.max(1), Ordering::Relaxed);
                return None;
            }
            match self.word.compare_exchange_weak(
                w,
                join(lease, n - cost),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.taken.fetch_add(cost, Ordering::Relaxed);
                    self.takes.fetch_add(1, Ordering::Relaxed);
                    return Some(lease);
                }
                Err(actual) => w = actual,
            }
        }
    }

    /// `cost` tokens of lease `lease` not used after all: back into the pot while that
    /// lease is in hand, else reported.
    pub fn put_back(&self, lease: u32, cost: u64) {
        if lease == 0 || cost == 0 {
            return;
        }
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            let (held, n) = split(w);
            if held != lease {
                self.adjust(lease, -(cost.min(i64::MAX as u64) as i64));
                return;
            }
            match self.word.compare_exchange_weak(
                w,
                join(held, n + cost),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.taken.fetch_sub(cost, Ordering::Relaxed);
                    self.takes.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
                Err(actual) => w = actual,
            }
        }
    }

    /// The charge of tokens taken from lease `lease` changed by `delta`.
    pub fn adjust(&self, lease: u32, delta: i64) {
        if lease != 0 && delta != 0 {
            self.adjustments.push(Adjustment { lease, delta });
        }
    }

    /// `tokens` of lease `lease` were sent (or, under `actual`, charged) at `now`:
    /// reported when after the lease's time (a request granted in time but written late
    /// on a busy machine, an answer that ended later). `true`: reported.
    #[inline]
    pub fn sent(&self, lease: u32, tokens: u64, now: u64) -> bool {
        if lease == 0 {
            return false;
        }
        // Relaxed: the expiry was stored before the lease's tokens were published (the
        // word's AcqRel swap, read by the take that this send follows).
        let expires = self.expiries[lease as usize % EXPIRIES].load(Ordering::Relaxed);
        let late = now > expires;
        if late {
            self.late.push(LateSend {
                lease,
                tokens,
                at: now,
            });
        }
        late
    }

    /// For the task: the next late send to report.
    pub fn next_late(&self) -> Option<LateSend> {
        self.late.pop()
    }

    /// For the task: the next change to report.
    pub fn next_adjustment(&self) -> Option<Adjustment> {
        self.adjustments.pop()
    }

    pub fn has_adjustments(&self) -> bool {
        !self.adjustments.is_empty() || !self.late.is_empty()
    }

    pub fn report(&self, r: TokenReport) {
        self.reports.push(r);
    }

    /// For the task: the next report for the cluster.
    pub fn next_report(&self) -> Option<TokenReport> {
        self.reports.pop()
    }

    /// For the task: the largest cost found short since the last call (0: none).
    pub fn take_short(&self) -> u64 {
        self.short.swap(0, Ordering::Relaxed)
    }

    /// For the task: lease `lease` of `tokens`, usable until `expires`; returns the
    /// number and the tokens left of the lease it replaces (the task gives them back).
    pub fn fill(&self, lease: u32, tokens: u64, expires: u64) -> (u32, u64) {
        self.expires.store(expires, Ordering::Relaxed);
        self.expiries[lease as usize % EXPIRIES].store(expires, Ordering::Relaxed);
        split(self.word.swap(join(lease, tokens), Ordering::AcqRel))
    }

    /// For the task: empties the pot, returning the lease and what was left of it.
    pub fn drain(&self) -> (u32, u64) {
        split(self.word.swap(0, Ordering::AcqRel))
    }

    /// The lease in hand and its tokens left.
    pub fn held(&self) -> (u32, u64) {
        split(self.word.load(Ordering::Relaxed))
    }

    pub fn tokens(&self) -> u64 {
        self.held().1
    }

    pub fn expires(&self) -> u64 {
        self.expires.load(Ordering::Relaxed)
    }

    /// Tokens taken so far (net of those put back).
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Takes so far (net of those put back whole).
    pub fn takes(&self) -> u64 {
        self.takes.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use super::*;

    #[test]
    fn takes_tokens_of_the_lease_in_hand_until_it_expires() {
        let p = TokenPot::new();
        assert_eq!(p.take(10, 0), None, "nothing leased");
        assert_eq!(
            p.take_short(),
            10,
            "the cost found short is kept for the task"
        );
        assert_eq!(p.fill(7, 1_000, 100), (0, 0));
        assert_eq!(p.take(600, 10), Some(7));
        assert_eq!(p.take(600, 10), None, "400 left");
        assert_eq!(p.take(400, 10), Some(7));
        assert_eq!(p.tokens(), 0);
        p.fill(8, 50, 100);
        assert_eq!(p.take(10, 100), None, "expired");
        assert_eq!(p.taken(), 1_000);
        assert_eq!(p.take_short(), 600, "the largest short cost");
        assert_eq!(p.take_short(), 0);
    }

    #[test]
    fn a_refill_returns_the_last_lease_and_its_leftover() {
        let p = TokenPot::new();
        p.fill(1, 500, u64::MAX);
        assert_eq!(p.take(200, 0), Some(1));
        assert_eq!(p.fill(2, 900, u64::MAX), (1, 300));
        assert_eq!(p.held(), (2, 900));
        assert_eq!(p.drain(), (2, 900));
        assert_eq!(p.held(), (0, 0));
    }

    #[test]
    fn given_back_tokens_go_to_their_own_lease_only() {
        let p = TokenPot::new();
        p.fill(1, 500, u64::MAX);
        assert_eq!(p.take(200, 0), Some(1));
        p.put_back(1, 200);
        assert_eq!(p.tokens(), 500, "its lease is in hand: back into the pot");
        assert!(!p.has_adjustments());
        assert_eq!(p.take(300, 0), Some(1));
        p.fill(2, 100, u64::MAX);
        p.put_back(1, 300);
        assert_eq!(p.tokens(), 100, "another lease is in hand: not mixed in");
        assert_eq!(
            p.next_adjustment(),
            Some(Adjustment {
                lease: 1,
                delta: -300
            }),
            "reported against lease 1"
        );
        p.adjust(2, 40);
        p.adjust(2, 0);
        assert_eq!(
            p.next_adjustment(),
            Some(Adjustment {
                lease: 2,
                delta: 40
            })
        );
        assert_eq!(p.next_adjustment(), None, "a zero change is not reported");
    }

    #[test]
    fn the_largest_count_and_lease_number_fit_the_word() {
        let p = TokenPot::new();
        p.fill(MAX_LEASE, COUNT_MASK, u64::MAX);
        assert_eq!(p.held(), (MAX_LEASE, COUNT_MASK));
        assert_eq!(p.take(COUNT_MASK, 0), Some(MAX_LEASE));
        assert_eq!(p.held(), (MAX_LEASE, 0));
    }

    #[test]
    fn every_token_goes_to_exactly_one_taker() {
        let p = std::sync::Arc::new(TokenPot::new());
        p.fill(3, 100_000, u64::MAX);
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let p = std::sync::Arc::clone(&p);
                std::thread::spawn(move || {
                    let cost = 7 + i as u64;
                    let mut got = 0;
                    for _ in 0..5_000 {
                        if p.take(cost, 0).is_some() {
                            got += cost;
                            if got % 3 == 0 {
                                p.put_back(3, cost);
                                got -= cost;
                            }
                        }
                    }
                    got
                })
            })
            .collect();
        let got: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(got + p.tokens(), 100_000, "taken + left = leased");
        assert_eq!(p.taken(), got);
    }
}

#[cfg(all(test, sidecar_loom))]
mod loom_tests;
