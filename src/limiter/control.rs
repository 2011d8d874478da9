//! The controller of one limiter: the learned limit and the retreat, changed together.
//!
//! Both are plain owned state ([`Control`]) behind one mutex that only the dispatcher
//! thread and the admin path take; the request path never does. It reports what the
//! provider answered as [`Event`]s in a lock-free inbox (and applies pauses to the
//! bucket itself, at once); the dispatcher drains the inbox, lets the learner and the
//! retreat decide, and publishes the result — the guard's limit and the bucket's rate —
//! in one step under the mutex. So a tick, a refusal and an admin change are applied in
//! some order, each on the state the previous one left, and the published rate is
//! always the one the final state implies.
//!
//! This module holds the state and the messages; the step that drives them with the
//! limiter's atomics is `provider/control.rs`.

use std::collections::VecDeque;
use std::time::Duration;

use super::learn::{per_window, rpm_of, Change, Learner, Source};
use super::pacing::Pacing;
use super::retreat::{Retreat, RetreatConfig, RetreatState, Transition};
use super::signal::Refusal;
use super::token_budget::{TokenChange, TokenLearner};

/// Why admission is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PauseReason {
    /// A 429 (its `Retry-After`, or the configured default pause).
    RetryAfter = 1,
    /// `x-ratelimit-remaining-requests: 0`: the quota is spent until its reset.
    Quota = 2,
    /// A 429 at a count that was fine before: the window must empty before the limit
    /// is learned again.
    Window = 3,
    /// The provider is overloaded (503/529, concurrency cap).
    Overload = 4,
}

impl PauseReason {
    pub const ALL: [PauseReason; 4] = [Self::RetryAfter, Self::Quota, Self::Window, Self::Overload];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetryAfter => "retry_after",
            Self::Quota => "quota",
            Self::Window => "window",
            Self::Overload => "overload",
        }
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == v)
    }
}

/// What the request path reports to the controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// A refusal at `at` of a send made at `sent_at`, the `count`-th of its window.
    Refused {
        at: u64,
        sent_at: u64,
        count: u32,
        kind: Refusal,
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The provider's headers stated a new limit, in requests per minute.
    HeaderLimit { limit_rpm: u64 },
    /// `x-ratelimit-remaining-requests: 0`: the quota is spent for `reset` (applied
    /// locally at once; reported so a shared budget pauses every replica).
    QuotaSpent { reset: Duration },
}

/// Something worth a log line, reported by the controller step (`Limiter::control`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Note {
    Limit(Change),
    Retreat(Transition),
    /// Admission paused until `until` (clock nanoseconds); `now` for the duration.
    Pause {
        reason: PauseReason,
        until: u64,
        now: u64,
    },
    /// 429s about tokens while no token budget is configured.
    TokenLimit,
    /// The token limit in force changed.
    Tokens(TokenChange),
}

/// Learned limit and retreat of one limiter, with what was last published.
#[derive(Debug)]
pub struct Control {
    pub learner: Learner,
    pub retreat: Retreat,
    /// The configured `rate_rpm`: paced exactly while nothing lower was learned.
    pub ceiling_rpm: f64,
    pub capacity: u32,
    pub window: Duration,
    /// `(limit, rpm, capacity)` last given to the guard and the bucket.
    pub published: Option<(u32, f64, u32)>,
    /// Limit changes so far.
    pub changes: u64,
    /// End of the last pause that was logged.
    pub logged_pause: u64,
    /// Send times of the rate-limit refusals still in the guard's span, oldest first.
    pub refused: VecDeque<u64>,
    /// Cluster mode: what the shared budget decided, which replaces the local learner
    /// and retreat (they only run alone).
    pub cluster: Option<ClusterPacing>,
    /// The token limit, when the limiter has a token budget.
    pub tokens: Option<TokenLearner>,
}

/// The pacing a shared budget decided for this replica (cluster mode).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClusterPacing {
    /// Per window: the guard's limit here (the cluster's, or this replica's fallback
    /// share), and the cluster's learned limit (0: none).
    pub limit: u32,
    pub learned: u32,
    /// The rate the bucket paces at here.
    pub rpm: f64,
    pub source: Source,
    pub probing: bool,
    pub retreat_state: RetreatState,
    pub retreat_factor: f64,
    pub changes: u64,
}

/// Most refusals remembered (a provider refusing faster than this per span is already
/// being paused).
const REFUSED_KEPT: usize = 4096;

impl Control {
    /// The state of a new limiter at `now`: nothing learned, the configured rate
    /// published.
    pub fn new(
        rate_rpm: f64,
        capacity: u32,
        retreat: RetreatConfig,
        pacing: &Pacing,
        now: u64,
    ) -> Self {
        let ceiling = per_window(rate_rpm, pacing.window);
        Self {
            learner: Learner::new(ceiling, pacing.window, pacing.probe_interval, now),
            retreat: Retreat::new(retreat, pacing.window),
            ceiling_rpm: rate_rpm,
            capacity,
            window: pacing.window,
            published: Some((ceiling, rate_rpm, capacity)),
            changes: 0,
            logged_pause: 0,
            refused: VecDeque::new(),
            cluster: None,
            tokens: None,
        }
    }

    /// A refused send at `sent_at`, reported at `now`.
    pub fn note_refused(&mut self, sent_at: u64, now: u64, span: u64) {
        self.forget_refused_before(now, span);
        if self.refused.len() == REFUSED_KEPT {
            self.refused.pop_front();
        }
        let at = self.refused.partition_point(|&t| t <= sent_at);
        self.refused.insert(at, sent_at);
    }

    /// Drops the refusals that left the span ending at `now`.
    pub fn forget_refused_before(&mut self, now: u64, span: u64) {
        while self
            .refused
            .front()
            .is_some_and(|&t| t.saturating_add(span) <= now)
        {
            self.refused.pop_front();
        }
    }

    /// The guard's limit and the bucket's rate the state implies: the learned limit
    /// spread evenly over the window, times the retreat factor.
    pub fn targets(&self) -> (u32, f64, u32) {
        if let Some(p) = &self.cluster {
            return (p.limit.max(1), p.rpm, self.capacity);
        }
        let limit = self.learner.limit();
        let base = if limit >= self.learner.ceiling() {
            self.ceiling_rpm
        } else {
            rpm_of(limit, self.window).min(self.ceiling_rpm)
        };
        (limit, base * self.retreat.factor(), self.capacity)
    }
}

/// The pacing state of one limiter, copied for metrics, the dashboard and the admin view.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacingView {
    pub window: Duration,
    /// Per window: the limit the guard enforces, the learned limit, the ceiling.
    pub limit: u32,
    pub learned: u32,
    pub ceiling: u32,
    pub learned_rpm: f64,
    pub ceiling_rpm: f64,
    pub source: Source,
    pub probing: bool,
    /// Clock nanoseconds of the next possible probe (`None`: nothing to probe).
    pub next_probe_at: Option<u64>,
    pub relearning: bool,
    /// Admission paused until (clock nanoseconds), and why; `None` when not paused.
    pub pause: Option<(PauseReason, u64)>,
    /// Sends stamped in the last window.
    pub sent_in_window: u32,
    pub retreat_state: RetreatState,
    pub retreat_factor: f64,
    /// Limit changes since start.
    pub changes: u64,
}
