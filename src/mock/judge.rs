//! The judge's record: every decision a rolling-window limit took, so tests count what
//! the provider saw instead of trusting the sidecar's own gauges.
//!
//! Each decision is `(time since the mock started, model or none, admitted)`, in the
//! order the windows took them (they are recorded under the global window's lock, so
//! times never go backwards). The log keeps the last [`LOG_CAP`] decisions; totals count
//! all of them. Worker-limit refusals are not decisions of a window and are not here.
//! The counting functions are pure and work on plain slices.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Decisions kept in memory (16 bytes each).
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
    pub refused: u64,
    /// Decisions of this filter no longer in the log (the first windows are then short).
    pub dropped: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    nanos: u64,
    /// 0: no model; otherwise an index + 1 into `Log::names`.
    model: u32,
    admitted: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    admitted: u64,
    refused: u64,
    dropped: u64,
}

#[derive(Debug, Default)]
struct Log {
    entries: VecDeque<Entry>,
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, u32>,
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

    /// Records a decision taken at `at` about a request for `model`.
    pub fn record(&self, at: Instant, model: Option<&str>, admitted: bool) {
        let nanos =
            u64::try_from(at.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let mut guard = self.log.lock();
        let log = &mut *guard;
        let model = model.map_or(0, |m| log.id(m));
        for t in [&mut log.all, &mut log.tallies[model as usize]] {
            if admitted {
                t.admitted += 1;
            } else {
                t.refused += 1;
            }
        }
        if log.entries.len() >= LOG_CAP {
            if let Some(old) = log.entries.pop_front() {
                log.all.dropped += 1;
                log.tallies[old.model as usize].dropped += 1;
            }
        }
        log.entries.push_back(Entry {
            nanos,
            model,
            admitted,
        });
    }

    /// Counts per fixed `window` from start to `now`, the most admissions in any rolling
    /// `window`, and the totals, for the decisions `filter` selects.
    pub fn verdicts(&self, filter: Filter<'_>, window: Duration, now: Instant) -> Verdicts {
        let now =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX);
        let window = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX).max(1);
        let log = self.log.lock();
        let (wanted, tally) = match filter {
            Filter::All => (None, log.all),
            Filter::Model(m) => match log.find(m) {
                Some(id) => (Some(id), log.tallies[id as usize]),
                None => (Some(u32::MAX), Tally::default()),
            },
        };
        let decisions: Vec<(u64, bool)> = log
            .entries
            .iter()
            .filter(|e| match wanted {
                None => true,
                Some(w) => w == e.model,
            })
            .map(|e| (e.nanos, e.admitted))
            .collect();
        drop(log);
        let admissions: Vec<u64> = decisions
            .iter()
            .filter(|(_, a)| *a)
            .map(|(t, _)| *t)
            .collect();
        Verdicts {
            windows: window_counts(&decisions, window, now),
            max_in_rolling: max_in_rolling(&admissions, window),
            admitted: tally.admitted,
            refused: tally.refused,
            dropped: tally.dropped,
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
}

impl Log {
    fn find(&self, model: &str) -> Option<u32> {
        self.ids.get(model).copied()
    }

    fn id(&mut self, model: &str) -> u32 {
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
        let id = self.names.len() as u32;
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
        j.record(at(0), Some("a"), true);
        j.record(at(10), Some("b"), true);
        j.record(at(20), Some("a"), false);
        j.record(at(1200), None, true);
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
}
