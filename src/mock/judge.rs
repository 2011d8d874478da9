//! The judge's record: every decision a rolling-window limit took, and every token
//! charge, so tests count what the provider saw instead of trusting the sidecar's own
//! gauges.
//!
//! Each entry is `(time since the mock started, model or none, what happened, tokens)`,
//! in the order the windows took them (they are recorded under the global window's lock,
//! so times never go backwards). What happened is an admission (with the tokens charged
//! on arrival: the request's under `reserved`, 0 under `actual`), a refusal and which
//! limit refused (requests, tokens, or a request too large for the token window), or a
//! charge at the end of an answer (`actual`), which is not a decision. The log keeps the
//! last [`LOG_CAP`] entries (a charge above `u32::MAX` tokens is logged as that); totals
//! count all of them exactly. Worker-limit refusals are not decisions of a window and are
//! not here. The counting functions are pure and work on plain slices.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Entries kept in memory (16 bytes each).
pub const LOG_CAP: usize = 1_000_000;

/// Distinct model names the log tells apart; later ones are counted as [`OTHER_MODELS`].
const NAME_CAP: usize = 4096;

/// The name the log gives models past the first [`NAME_CAP`].
pub const OTHER_MODELS: &str = "(other models)";

/// Admissions and refusals in one fixed window `[index × w, (index + 1) × w)` since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct WindowCount {
    pub index: u64,
    pub admitted: u64,
    pub refused: u64,
}

/// Tokens charged in one fixed window, and the refusals of the token limit in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct TokenCount {
    pub index: u64,
    pub tokens: u64,
    /// 429s of the token limit, too-large requests included.
    pub refused: u64,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Requests,
    Tokens,
    /// Larger than the whole token window: it never fits.
    TooLarge,
}

/// What the judge records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Admitted by every window, charged `tokens` on arrival.
    Admitted {
        tokens: u64,
    },
    Refused(Cause),
    /// Tokens charged when an answer ended (`actual`): not a decision.
    Charged {
        tokens: u64,
    },
}

/// Which decisions a question is about.
#[derive(Debug, Clone, Copy)]
pub enum Filter<'a> {
    All,
    Model(&'a str),
}

/// What the judge answers about one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdicts {
    pub windows: Vec<WindowCount>,
    pub max_in_rolling: usize,
    pub admitted: u64,
    /// Every refusal of a window, whichever limit it was.
    pub refused: u64,
    /// Refusals of a request window.
    pub refused_requests: u64,
    /// Refusals of the token window, too-large requests included.
    pub refused_tokens: u64,
    /// Requests larger than the whole token window (also in `refused_tokens`).
    pub too_large: u64,
    /// Entries of this filter no longer in the log (the first windows are then short).
    pub dropped: u64,
    pub tokens: TokenVerdicts,
}

/// The tokens part of [`Verdicts`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenVerdicts {
    /// Tokens charged per fixed window, windows 0 through now.
    pub windows: Vec<TokenCount>,
    /// The most tokens charged in any rolling window.
    pub max_in_rolling: u64,
    /// Tokens charged since start.
    pub charged: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Admitted,
    RefusedRequests,
    RefusedTokens,
    TooLarge,
    Charged,
}

impl Kind {
    fn is_decision(self) -> bool {
        self != Self::Charged
    }

    fn is_token_refusal(self) -> bool {
        matches!(self, Self::RefusedTokens | Self::TooLarge)
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    nanos: u64,
    tokens: u32,
    /// 0: no model; otherwise an index + 1 into `Log::names`.
    model: u16,
    kind: Kind,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    admitted: u64,
    refused: u64,
    refused_tokens: u64,
    too_large: u64,
    tokens: u64,
    dropped: u64,
}

#[derive(Debug, Default)]
struct Log {
    entries: VecDeque<Entry>,
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u16>,
    /// Per model id (0: no model).
    tallies: Vec<Tally>,
    all: Tally,
}

/// The decision log of one mock.
#[derive(Debug)]
pub struct Judge {
    start: Instant,
    log: Mutex<Log>,
}

impl Judge {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            log: Mutex::new(Log {
                tallies: vec![Tally::default()],
                ..Log::default()
            }),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Records what happened at `at` to a request for `model`.
    pub fn record(&self, at: Instant, model: Option<&str>, event: Event) {
        let nanos =
            u64::try_from(at.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let (kind, tokens) = match event {
            Event::Admitted { tokens } => (Kind::Admitted, tokens),
            Event::Refused(Cause::Requests) => (Kind::RefusedRequests, 0),
            Event::Refused(Cause::Tokens) => (Kind::RefusedTokens, 0),
            Event::Refused(Cause::TooLarge) => (Kind::TooLarge, 0),
            Event::Charged { tokens } => (Kind::Charged, tokens),
        };
        let mut guard = self.log.lock();
        let log = &mut *guard;
        let model = model.map_or(0, |m| log.id(m));
        for t in [&mut log.all, &mut log.tallies[usize::from(model)]] {
            t.tokens = t.tokens.saturating_add(tokens);
            match kind {
                Kind::Admitted => t.admitted += 1,
                Kind::Charged => {}
                refused => {
                    t.refused += 1;
                    if refused.is_token_refusal() {
                        t.refused_tokens += 1;
                    }
                    if refused == Kind::TooLarge {
                        t.too_large += 1;
                    }
                }
            }
        }
        if log.entries.len() >= LOG_CAP {
            if let Some(old) = log.entries.pop_front() {
                log.all.dropped += 1;
                log.tallies[usize::from(old.model)].dropped += 1;
            }
        }
        log.entries.push_back(Entry {
            nanos,
            tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
            model,
            kind,
        });
    }

    /// Counts per fixed `window` from start to `now`, the most admissions and tokens in
    /// any rolling `window`, and the totals, for the decisions `filter` selects.
    pub fn verdicts(&self, filter: Filter<'_>, window: Duration, now: Instant) -> Verdicts {
        let now =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let window = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1);
        let log = self.log.lock();
        let (wanted, tally) = match filter {
            Filter::All => (None, log.all),
            Filter::Model(m) => match log.find(m) {
                Some(id) => (Some(id), log.tallies[usize::from(id)]),
                None => (Some(u16::MAX), Tally::default()),
            },
        };
        let entries: Vec<Entry> = log
            .entries
            .iter()
            .filter(|e| wanted.is_none_or(|w| w == e.model))
            .copied()
            .collect();
        drop(log);
        let decisions: Vec<(u64, bool)> = entries
            .iter()
            .filter(|e| e.kind.is_decision())
            .map(|e| (e.nanos, e.kind == Kind::Admitted))
            .collect();
        let admissions: Vec<u64> = decisions
            .iter()
            .filter(|(_, a)| *a)
            .map(|(t, _)| *t)
            .collect();
        let charges: Vec<(u64, u64)> = entries
            .iter()
            .filter(|e| e.tokens > 0)
            .map(|e| (e.nanos, u64::from(e.tokens)))
            .collect();
        let token_refusals: Vec<u64> = entries
            .iter()
            .filter(|e| e.kind.is_token_refusal())
            .map(|e| e.nanos)
            .collect();
        Verdicts {
            windows: window_counts(&decisions, window, now),
            max_in_rolling: max_in_rolling(&admissions, window),
            admitted: tally.admitted,
            refused: tally.refused,
            refused_requests: tally.refused - tally.refused_tokens,
            refused_tokens: tally.refused_tokens,
            too_large: tally.too_large,
            dropped: tally.dropped,
            tokens: TokenVerdicts {
                windows: token_counts(&charges, &token_refusals, window, now),
                max_in_rolling: max_tokens_in_rolling(&charges, window),
                charged: tally.tokens,
            },
        }
    }

    /// Refusals by any window since start.
    pub fn refused_total(&self) -> u64 {
        self.log.lock().all.refused
    }

    /// Admissions by every window since start.
    pub fn admitted_total(&self) -> u64 {
        self.log.lock().all.admitted
    }

    /// Tokens charged since start.
    pub fn tokens_total(&self) -> u64 {
        self.log.lock().all.tokens
    }

    /// Refusals since start of a request window, of the token window (too-large
    /// requests included), and of those the too-large ones.
    pub fn refusals(&self) -> (u64, u64, u64) {
        let all = self.log.lock().all;
        (
            all.refused - all.refused_tokens,
            all.refused_tokens,
            all.too_large,
        )
    }
}

impl Log {
    fn find(&self, model: &str) -> Option<u16> {
        self.ids.get(model).copied()
    }

    fn id(&mut self, model: &str) -> u16 {
        if let Some(id) = self.find(model) {
            return id;
        }
        let name: Arc<str> = if self.names.len() < NAME_CAP {
            Arc::from(model)
        } else if let Some(id) = self.find(OTHER_MODELS) {
            return id;
        } else {
            Arc::from(OTHER_MODELS)
        };
        self.names.push(Arc::clone(&name));
        self.tallies.push(Tally::default());
        // At most NAME_CAP + 1 names, far below u16::MAX.
        let id = self.names.len() as u16;
        self.ids.insert(name, id);
        id
    }
}

/// Admissions and refusals per fixed window of `window` nanoseconds, windows 0 through the
/// one holding `now` (empty ones included). `decisions` are `(nanos since start, admitted)`.
pub fn window_counts(decisions: &[(u64, bool)], window: u64, now: u64) -> Vec<WindowCount> {
    let window = window.max(1);
    let last = decisions
        .iter()
        .map(|(t, _)| *t)
        .max()
        .unwrap_or(0)
        .max(now)
        / window;
    let mut counts: Vec<WindowCount> = (0..=last)
        .map(|index| WindowCount {
            index,
            ..WindowCount::default()
        })
        .collect();
    for (t, admitted) in decisions {
        let c = &mut counts[(t / window) as usize];
        if *admitted {
            c.admitted += 1;
        } else {
            c.refused += 1;
        }
    }
    counts
}

/// The most admissions in any rolling window of `window` nanoseconds, as a provider
/// counts them: two admissions share a window when they are less than `window` apart.
/// `admissions` are sorted times.
pub fn max_in_rolling(admissions: &[u64], window: u64) -> usize {
    let mut best = 0;
    let mut first = 0;
    for (last, t) in admissions.iter().enumerate() {
        while t - admissions[first] >= window {
            first += 1;
        }
        best = best.max(last + 1 - first);
    }
    best
}

/// Tokens charged and token refusals per fixed window of `window` nanoseconds, windows 0
/// through the one holding `now`. `charges` are `(nanos since start, tokens)`,
/// `refusals` the times of the token window's refusals.
pub fn token_counts(
    charges: &[(u64, u64)],
    refusals: &[u64],
    window: u64,
    now: u64,
) -> Vec<TokenCount> {
    let window = window.max(1);
    let last = charges
        .iter()
        .map(|(t, _)| *t)
        .chain(refusals.iter().copied())
        .max()
        .unwrap_or(0)
        .max(now)
        / window;
    let mut counts: Vec<TokenCount> = (0..=last)
        .map(|index| TokenCount {
            index,
            ..TokenCount::default()
        })
        .collect();
    for (t, n) in charges {
        let c = &mut counts[(t / window) as usize];
        c.tokens = c.tokens.saturating_add(*n);
    }
    for t in refusals {
        counts[(t / window) as usize].refused += 1;
    }
    counts
}

/// The most tokens charged in any rolling window of `window` nanoseconds: two charges
/// share a window when they are less than `window` apart. `charges` are sorted by time.
pub fn max_tokens_in_rolling(charges: &[(u64, u64)], window: u64) -> u64 {
    let (mut best, mut sum, mut first) = (0u64, 0u64, 0);
    for (t, n) in charges {
        sum = sum.saturating_add(*n);
        while t - charges[first].0 >= window {
            sum -= charges[first].1;
            first += 1;
        }
        best = best.max(sum);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn fixed_windows_count_each_decision_once_including_empty_windows() {
        let d = [
            (0, true),
            (999 * MS, true),
            (1000 * MS, false), // the boundary belongs to the next window
            (1500 * MS, true),
            (3200 * MS, false),
        ];
        let c = window_counts(&d, 1000 * MS, 3500 * MS);
        let w = |index, admitted, refused| WindowCount {
            index,
            admitted,
            refused,
        };
        assert_eq!(c, vec![w(0, 2, 0), w(1, 1, 1), w(2, 0, 0), w(3, 0, 1)]);
        assert_eq!(window_counts(&[], 1000 * MS, 4500 * MS).len(), 5);
    }

    #[test]
    fn rolling_maximum_finds_the_burst_that_straddles_fixed_windows() {
        // Two per fixed second, but four within 300 ms around the 1 s boundary.
        let t = [800 * MS, 900 * MS, 1000 * MS, 1100 * MS];
        let d: Vec<(u64, bool)> = t.iter().map(|t| (*t, true)).collect();
        let fixed = window_counts(&d, 1000 * MS, 1999 * MS);
        assert!(fixed.iter().all(|w| w.admitted == 2), "{fixed:?}");
        assert_eq!(max_in_rolling(&t, 1000 * MS), 4);
        assert_eq!(max_in_rolling(&t, 250 * MS), 3);
        assert_eq!(
            max_in_rolling(&t, 300 * MS),
            3,
            "800 and 1100 are 300 apart"
        );
        assert_eq!(max_in_rolling(&t, 301 * MS), 4);
        // Exactly `window` apart: the first has left when the last arrives.
        assert_eq!(max_in_rolling(&[0, 1000 * MS], 1000 * MS), 1);
        assert_eq!(max_in_rolling(&[0, 999 * MS], 1000 * MS), 2);
        assert_eq!(max_in_rolling(&[], 1000 * MS), 0);
    }

    #[test]
    fn judge_tells_models_apart_and_keeps_totals() {
        let t0 = Instant::now();
        let j = Judge::new(t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        let yes = Event::Admitted { tokens: 0 };
        j.record(at(0), Some("a"), yes);
        j.record(at(10), Some("b"), yes);
        j.record(at(20), Some("a"), Event::Refused(Cause::Requests));
        j.record(at(1200), None, yes);
        let s = Duration::from_secs(1);
        let all = j.verdicts(Filter::All, s, at(1500));
        assert_eq!((all.admitted, all.refused, all.max_in_rolling), (3, 1, 2));
        assert_eq!(all.windows[0].admitted, 2);
        assert_eq!(all.windows[1].admitted, 1);
        let a = j.verdicts(Filter::Model("a"), s, at(1500));
        assert_eq!((a.admitted, a.refused, a.max_in_rolling), (1, 1, 1));
        assert_eq!(
            a.windows[0],
            WindowCount {
                index: 0,
                admitted: 1,
                refused: 1
            }
        );
        let none = j.verdicts(Filter::Model("never"), s, at(1500));
        assert_eq!((none.admitted, none.max_in_rolling), (0, 0));
        assert!(none.windows.iter().all(|w| w.admitted + w.refused == 0));
        assert_eq!((j.admitted_total(), j.refused_total()), (3, 1));
    }

    #[test]
    fn tokens_are_counted_per_window_and_at_their_worst_in_any_rolling_window() {
        let t0 = Instant::now();
        let j = Judge::new(t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        j.record(at(100), Some("a"), Event::Admitted { tokens: 300 });
        j.record(at(900), Some("a"), Event::Admitted { tokens: 0 }); // actual: later
        j.record(at(950), Some("b"), Event::Refused(Cause::Tokens));
        j.record(at(1050), Some("a"), Event::Charged { tokens: 500 });
        j.record(at(1100), None, Event::Refused(Cause::TooLarge));
        j.record(at(1200), None, Event::Refused(Cause::Requests));
        let s = Duration::from_secs(1);
        let v = j.verdicts(Filter::All, s, at(1500));
        assert_eq!(
            (
                v.admitted,
                v.refused,
                v.refused_requests,
                v.refused_tokens,
                v.too_large
            ),
            (2, 3, 1, 2, 1)
        );
        assert_eq!(v.max_in_rolling, 2, "a charge is not an admission");
        assert_eq!(v.windows[1].admitted + v.windows[1].refused, 2);
        let t = v.tokens;
        assert_eq!((t.charged, t.max_in_rolling), (800, 800), "950 ms apart");
        let w = |index, tokens, refused| TokenCount {
            index,
            tokens,
            refused,
        };
        assert_eq!(t.windows, vec![w(0, 300, 1), w(1, 500, 1)]);
        let a = j.verdicts(Filter::Model("a"), Duration::from_millis(900), at(1500));
        assert_eq!((a.tokens.charged, a.tokens.max_in_rolling), (800, 500));
        assert_eq!(j.tokens_total(), 800);
        assert_eq!(j.refusals(), (1, 2, 1));
        let c = [(0, 5), (10, 7), (20, 1)];
        assert_eq!(max_tokens_in_rolling(&c, 11), 12);
        assert_eq!(
            max_tokens_in_rolling(&c, 10),
            7,
            "exactly a window apart: gone"
        );
        assert_eq!(max_tokens_in_rolling(&[], 10), 0);
    }
}
