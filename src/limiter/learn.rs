//! Limit learning: the provider's real per-window limit, from what it says and refuses.
//!
//! Counts are sends per provider window (W). The *ceiling* comes from `rate_rpm`; the
//! *learned* limit is what the provider has shown, never above the ceiling; the window
//! guard enforces `limit()` (the learned limit, or the ceiling during a probe).
//!
//! - **Headers.** A stated limit (`x-ratelimit-limit-requests`) is taken as it is,
//!   when it changes.
//! - **A 429 on the k-th send of its window** proves the limit is below k: the learned
//!   limit becomes `k - 1` (never raised by a later 429 of the same burst, whose count is
//!   at least k).
//! - **A 429 at a count already proven safe** (a send at that count was answered without
//!   a 429 since the limit last changed) means the limit fell, or the provider is
//!   overloaded: nothing is learned from it; the caller sends nothing until the window
//!   it counts in is empty, and the first 429 on a send after that teaches the new
//!   limit from a clean count. If no 429 comes for three windows, the old limit stands.
//! - **Probing.** Only while demand exceeds the learned limit, at most once per
//!   `probe_interval`, the limit is lifted to the ceiling for one window: a 429 during
//!   it teaches its count; none teaches the count sent. A limit stated by headers is not
//!   probed.
//!
//! Plain owned state (`&mut self`), driven by the controller with explicit clock
//! nanoseconds: every rule is a unit test on numbers.

use std::fmt;
use std::time::Duration;

use crate::clock::nanos;

/// Where the limit in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The configured `rate_rpm`: nothing learned yet.
    Config = 0,
    /// Stated by the provider's rate-limit headers.
    Header = 1,
    /// Learned from the count at a 429.
    Learned429 = 2,
    /// Probing now, or found by the last probe.
    Probe = 3,
    /// Restored from the state file at start-up.
    State = 4,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Self::Config,
        Self::Header,
        Self::Learned429,
        Self::Probe,
        Self::State,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Header => "header",
            Self::Learned429 => "learned_429",
            Self::Probe => "probe",
            Self::State => "state",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Why the limit changed: the reason in the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The provider's headers stated this many requests per minute.
    Header { limit_rpm: u64 },
    /// A 429 came on the `count`-th send of its window.
    Refused { count: u32 },
    /// After the limit fell, a 429 on the `count`-th send of a fresh window.
    Relearned { count: u32 },
    /// Demand exceeded the learned limit: lifted to the ceiling for one window.
    ProbeStart,
    /// The probe window passed without a 429 with `sent` sends.
    ProbeHeld { sent: u32 },
    /// A 429 on the `count`-th send of the probe window.
    ProbeRefused { count: u32 },
    /// The configured ceiling changed (admin or reload).
    Ceiling,
    /// An operator asked to forget what was learned.
    Forgotten,
    /// Restored from the state file.
    Restored,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Why::Header { limit_rpm } => write!(
                f,
                "the provider's headers state {limit_rpm} requests per minute"
            ),
            Why::Refused { count } => write!(
                f,
                "a 429 on send {count} of its window: the limit is below {count}"
            ),
            Why::Relearned { count } => {
                write!(f, "the limit fell: a 429 on send {count} of a fresh window")
            }
            Why::ProbeStart => f.write_str(
                "probing: demand exceeds the learned limit, lifted to the ceiling for one window",
            ),
            Why::ProbeHeld { sent } => {
                write!(f, "probe held: {sent} sent in one window without a 429")
            }
            Why::ProbeRefused { count } => write!(
                f,
                "probe refused: a 429 on send {count} of the probe window"
            ),
            Why::Ceiling => f.write_str("the configured rate changed"),
            Why::Forgotten => f.write_str("learned limit forgotten by an operator"),
            Why::Restored => f.write_str("restored from the state file"),
        }
    }
}

/// A change of the limit in force, for the log line and the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub from: u32,
    pub to: u32,
    pub source: Source,
    pub why: Why,
}

/// What a rate-limit 429 changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Refused {
    pub change: Option<Change>,
    /// Send nothing before this (the window the provider counts in must empty first).
    pub pause_until: Option<u64>,
}

/// One scope's learned limit.
#[derive(Debug, Clone)]
pub struct Learner {
    window: u64,
    probe_interval: u64,
    ceiling: u32,
    learned: Option<u32>,
    source: Source,
    /// The last limit stated by headers, so a header that repeats does not undo a 429.
    last_header: Option<u32>,
    probe_until: Option<u64>,
    next_probe_at: u64,
    /// After a 429 at a proven count: a 429 on a send at or after `.0` teaches, until `.1`.
    relearn: Option<(u64, u64)>,
}

/// Sends per window for `rpm` requests per minute: `floor(rpm × window / 60 s)`, at least 1.
pub fn per_window(rpm: f64, window: Duration) -> u32 {
    let n = (rpm * window.as_secs_f64() / 60.0).floor();
    if n.is_finite() && n >= 1.0 {
        n.min(u32::MAX as f64) as u32
    } else {
        1
    }
}

/// Tokens per window for `tokens_per_minute`, by the rule [`per_window`] scales requests
/// by: `floor(tokens_per_minute × window / 60 s)`, at least 1; `None` for 0 (no token
/// budget). Exact integer arithmetic, saturating.
pub fn tokens_per_window(tokens_per_minute: u64, window: Duration) -> Option<u64> {
    if tokens_per_minute == 0 {
        return None;
    }
    let n = u128::from(tokens_per_minute) * window.as_nanos() / 60_000_000_000;
    Some(u64::try_from(n).unwrap_or(u64::MAX).max(1))
}

/// Requests per minute of `n` sends per `window`.
pub fn rpm_of(n: u32, window: Duration) -> f64 {
    f64::from(n) * 60.0 / window.as_secs_f64().max(1e-9)
}

impl Learner {
    pub fn new(ceiling: u32, window: Duration, probe_interval: Duration, now: u64) -> Self {
        let probe_interval = nanos(probe_interval);
        Self {
            window: nanos(window),
            probe_interval,
            ceiling: ceiling.max(1),
            learned: None,
            source: Source::Config,
            last_header: None,
            probe_until: None,
            next_probe_at: now.saturating_add(probe_interval),
            relearn: None,
        }
    }

    /// The limit in force: the ceiling while probing, else the learned limit.
    pub fn limit(&self) -> u32 {
        if self.probe_until.is_some() {
            self.ceiling
        } else {
            self.learned()
        }
    }

    /// The learned limit (the ceiling when nothing was learned).
    pub fn learned(&self) -> u32 {
        self.learned
            .unwrap_or(self.ceiling)
            .min(self.ceiling)
            .max(1)
    }

    pub fn ceiling(&self) -> u32 {
        self.ceiling
    }

    pub fn source(&self) -> Source {
        if self.probe_until.is_some() {
            Source::Probe
        } else {
            self.source
        }
    }

    pub fn probing(&self) -> bool {
        self.probe_until.is_some()
    }

    /// When the next probe may start (it starts only while demand exceeds the limit).
    pub fn next_probe_at(&self) -> Option<u64> {
        (self.learned() < self.ceiling && self.source != Source::Header)
            .then_some(self.next_probe_at)
    }

    /// Whether a 429 at a proven count was seen and the next one will relearn.
    pub fn relearning(&self) -> bool {
        self.relearn.is_some()
    }

    /// Runs `f` and reports the change it made to the limit in force or, when that
    /// stays (a probe that ends at the ceiling), to the learned limit.
    fn changed(&mut self, why: Why, f: impl FnOnce(&mut Self)) -> Option<Change> {
        let (limit, learned) = (self.limit(), self.learned());
        f(self);
        let (from, to) = if self.limit() != limit {
            (limit, self.limit())
        } else {
            (learned, self.learned())
        };
        (from != to).then_some(Change {
            from,
            to,
            source: self.source(),
            why,
        })
    }

    fn set_learned(&mut self, n: u32, source: Source) {
        self.learned = Some(n.max(1));
        self.source = source;
    }

    /// The configured rate changed: the ceiling moves, and what was learned is kept but
    /// never above it.
    pub fn set_ceiling(&mut self, ceiling: u32) -> Option<Change> {
        self.changed(Why::Ceiling, |s| {
            s.ceiling = ceiling.max(1);
            if let Some(l) = s.learned {
                s.learned = Some(l.min(s.ceiling));
            }
        })
    }

    /// Back to the configured rate, as if nothing had been learned.
    pub fn forget(&mut self, now: u64) -> Option<Change> {
        self.changed(Why::Forgotten, |s| {
            s.learned = None;
            s.source = Source::Config;
            s.last_header = None;
            s.probe_until = None;
            s.relearn = None;
            s.next_probe_at = now.saturating_add(s.probe_interval);
        })
    }

    /// A limit from the state file, as learned before a restart.
    pub fn restore(&mut self, learned: u32) -> Option<Change> {
        self.changed(Why::Restored, |s| s.set_learned(learned, Source::State))
    }

    /// The provider's headers state `limit_rpm` requests per minute.
    pub fn on_header_limit(&mut self, limit_rpm: u64) -> Option<Change> {
        let n = per_window(limit_rpm as f64, Duration::from_nanos(self.window));
        if self.last_header == Some(n) {
            return None;
        }
        self.changed(Why::Header { limit_rpm }, |s| {
            s.last_header = Some(n);
            s.probe_until = None;
            s.relearn = None;
            s.set_learned(n, Source::Header);
        })
    }

    /// A rate-limit 429 at `now` on a send made at `sent_at` that was the `count`-th in
    /// its window (not counting sends the provider refused: it does not count them). `proven` is the highest count answered without a 429 since the limit
    /// last changed; `empty_at` is when the window the sidecar counts in will hold none of
    /// the sends made so far.
    pub fn on_refused(
        &mut self,
        now: u64,
        sent_at: u64,
        count: u32,
        proven: u32,
        empty_at: u64,
    ) -> Refused {
        let count = count.max(1);
        if self.probing() {
            let change = self.changed(Why::ProbeRefused { count }, |s| {
                s.probe_until = None;
                s.next_probe_at = now.saturating_add(s.probe_interval);
                s.set_learned(count - 1, Source::Probe);
            });
            return Refused {
                change,
                pause_until: None,
            };
        }
        if let Some((from, until)) = self.relearn {
            if now >= until {
                self.relearn = None;
            } else if sent_at < from {
                // A send from the window that drew the first 429: the same signal.
                return Refused::default();
            } else {
                let change = self.changed(Why::Relearned { count }, |s| {
                    s.relearn = None;
                    s.set_learned(count - 1, Source::Learned429);
                    // Just learned: a probe now would only draw the next 429.
                    s.next_probe_at = now.saturating_add(s.probe_interval);
                });
                return Refused {
                    change,
                    pause_until: None,
                };
            }
        }
        if count <= proven && count <= self.limit() {
            // This count was answered before: the limit fell, or the provider is
            // overloaded. Let the window empty, then learn from a clean count.
            let pause_until = empty_at.max(now);
            self.relearn = Some((pause_until, pause_until.saturating_add(3 * self.window)));
            return Refused {
                change: None,
                pause_until: Some(pause_until),
            };
        }
        let limit = self.limit();
        let change = self.changed(Why::Refused { count }, |s| {
            if count - 1 < limit {
                s.set_learned(count - 1, Source::Learned429);
                s.next_probe_at = now.saturating_add(s.probe_interval);
            }
        });
        Refused {
            change,
            pause_until: None,
        }
    }

    /// Starts and ends probes. `demand`: requests waited for the limit within the last
    /// window; `sent` the sends of the last window (for a probe that ends without a 429).
    pub fn tick(&mut self, now: u64, demand: bool, sent: u32) -> Option<Change> {
        if let Some(until) = self.probe_until {
            if now < until {
                return None;
            }
            let learned = self.learned();
            return self.changed(Why::ProbeHeld { sent }, |s| {
                s.probe_until = None;
                s.next_probe_at = now.saturating_add(s.probe_interval);
                if sent > learned {
                    s.set_learned(sent.min(s.ceiling), Source::Probe);
                }
            });
        }
        if self.relearn.is_some_and(|(_, until)| now >= until) {
            self.relearn = None;
        }
        let may_probe = self.learned() < self.ceiling
            && self.source != Source::Header
            && self.relearn.is_none()
            && now >= self.next_probe_at;
        if may_probe && demand {
            return self.changed(Why::ProbeStart, |s| {
                s.probe_until = Some(now.saturating_add(s.window));
            });
        }
        None
    }
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;
