//! One budget's task: keeps the pot filled, heartbeats, reports what the provider
//! answered, carries admin changes, and falls back when Redis is lost.
//!
//! It runs on the `budget` thread, never on a worker, and every Redis call is bounded by
//! `redis_timeout`: a stalled Redis stalls this task only, and the replica is on its
//! fallback share one timeout later.
//!
//! This file holds the task's state and its loop (one [`Task::step`] per wake-up); the
//! phases live beside it: `call` (script calls and what a reply changes), `join`
//! (joining, and seeding a new generation), `lease` (asking for tokens and giving them
//! back), `fallback` (Redis lost: the fallback share, then isolation) and `report` (the
//! provider's refusals and the admin's changes as script ops).

mod call;
mod fallback;
mod join;
mod lease;
mod leases;
mod report;
mod tokens;

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use super::handle::Budget;
use super::inputs::{Feed, Inputs, Settings};
use super::script::{self, Keys};
use super::view::Record;
use crate::clock::{nanos, SharedClock};
use crate::config::RedisConfig;
use crate::limiter::{Limiter, Margin, Mode, RetreatConfig};

/// How often a replica says it is alive (Redis forgets it after 3 s of silence).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest wait between two tries to reach a lost Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Buckets the local send log is reported in after Redis lost the state.
const SEED_BUCKETS: u64 = 10;

/// An op for the script that must reach Redis (kept while it is down).
#[derive(Debug, Clone)]
struct Op {
    name: &'static str,
    args: Vec<String>,
}

/// A lease in hand.
#[derive(Debug, Clone)]
struct Lease {
    member: String,
}

/// One budget's task: its inputs, what it knows of the budget, and its connection and
/// lease state.
pub struct Task {
    settings: Weak<dyn Settings>,
    b: Arc<Budget>,
    limiter: Arc<Limiter>,
    /// The provider's configured window.
    provider_window: Duration,
    clock: SharedClock,
    conn: Conn,
    script: redis::Script,
    keys: Keys,
    rid: Arc<str>,
    replicas_configured: u32,
    fallback_for: Duration,
    redis_cfg: RedisConfig,
    // Announced when joining.
    margin: Margin,
    retreat: RetreatConfig,
    probe_interval: Duration,
    // What this replica knows of the budget.
    gen: String,
    version: i64,
    record: Record,
    joined: bool,
    live: u32,
    share: u32,
    ttl: Duration,
    mode: Mode,
    // Connection state.
    started: Instant,
    last_ok: Option<Instant>,
    failures: u32,
    retry_at: Instant,
    last_call: Option<Instant>,
    offset_ms: i64,
    /// Since when Redis has failed (`None`: it answered the last call).
    down_since: Option<Instant>,
    /// Clock time this replica left shared mode for its fallback share: the sends made
    /// alone since then go into the shared log before it leases again.
    fallback_since: Option<u64>,
    // Leases.
    lease: Option<Lease>,
    /// The number of the last lease put into the pot.
    lease_number: u32,
    give_back: Option<(String, u32)>,
    /// Sends made after their lease's time (Redis ms), for the next lease call.
    late_sends: Vec<u64>,
    pending: VecDeque<Op>,
    // Rates of this replica (per second), from the pot's counters.
    rate: f64,
    offered: f64,
    last_counts: (u64, u64, Instant),
    /// The cluster's per-window limit in the last reply.
    last_limit: u32,
    /// Token leases (when the cluster keeps a token budget).
    tl: leases::TokenLeases,
}

impl Task {
    pub fn new(feed: Feed, conn: Conn, inputs: &Inputs) -> Self {
        let redis = &inputs.redis;
        let view = feed.budget.view();
        let now = Instant::now();
        Self {
            keys: Keys::new(&redis.prefix, &view.budget),
            rid: Arc::clone(&view.replica),
            settings: Weak::clone(&inputs.settings),
            b: feed.budget,
            limiter: feed.limiter,
            provider_window: feed.window,
            clock: Arc::clone(&inputs.clock),
            conn,
            script: script::script(),
            replicas_configured: redis.replicas.max(1),
            fallback_for: redis.fallback_for,
            redis_cfg: redis.clone(),
            margin: inputs.margin,
            retreat: inputs.retreat,
            probe_interval: inputs.probe_interval,
            gen: String::new(),
            version: -1,
            record: Record::default(),
            joined: false,
            live: redis.replicas.max(1),
            share: 0,
            ttl: Duration::from_millis(600),
            mode: Mode::Fallback,
            started: now,
            last_ok: None,
            failures: 0,
            retry_at: now,
            last_call: None,
            offset_ms: 0,
            down_since: None,
            fallback_since: None,
            lease: None,
            lease_number: 0,
            give_back: None,
            late_sends: Vec::new(),
            pending: VecDeque::new(),
            rate: 0.0,
            offered: 0.0,
            last_counts: (0, 0, now),
            last_limit: u32::MAX,
            tl: leases::TokenLeases::new(now),
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        if let Some(settings) = self.settings.upgrade() {
            self.enter_fallback(&*settings);
        }
        loop {
            let Some(settings) = self.settings.upgrade() else {
                return;
            };
            if shutdown.is_cancelled() {
                self.leave(&*settings).await;
                return;
            }
            self.step(&*settings).await;
            let next = self.next_wake();
            drop(settings);
            let pot = self.b.pot();
            tokio::select! {
                () = std::future::poll_fn(|cx| pot.poll_wanted(cx)) => {}
                () = tokio::time::sleep(next) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    /// The window the budget is kept over: the cluster's, once known.
    fn window(&self) -> Duration {
        if self.record.window.is_zero() {
            self.provider_window
        } else {
            self.record.window
        }
    }

    /// Rates of taking and offering (per second), sampled at least 50 ms apart.
    fn sample(&mut self) {
        let (taken, offered) = self.b.pot.counts();
        let (t0, o0, at) = self.last_counts;
        let dt = at.elapsed().as_secs_f64();
        if dt < 0.05 {
            return;
        }
        // Over about a quarter second: a flood is seen within a few leases.
        let a = (dt / 0.25).min(1.0);
        self.rate += a * ((taken.saturating_sub(t0)) as f64 / dt - self.rate);
        self.offered += a * ((offered.saturating_sub(o0)) as f64 / dt - self.offered);
        self.last_counts = (taken, offered, Instant::now());
    }

    async fn step(&mut self, settings: &dyn Settings) {
        self.sample();
        while let Some(c) = self.b.commands.pop() {
            self.pending.push_back(Op::from(c));
        }
        while let Some(ev) = self.b.pot.outbox.pop() {
            if let Some(op) = self.report_op(ev) {
                self.pending.push_back(op);
            }
        }
        self.token_reports();
        self.collect_late_sends();
        let now = Instant::now();
        if self.mode != Mode::Shared && now < self.retry_at {
            self.check_isolation();
            return;
        }
        if !self.joined && self.join(settings).await.is_none() {
            return;
        }
        if let Some(since) = self.fallback_since {
            if self.report_fallback_sends(settings, since).await.is_none() {
                return;
            }
            self.fallback_since = None;
        }
        while let Some(op) = self.pending.pop_front() {
            if self.call(settings, op.name, &op.args).await.is_none() {
                self.pending.push_front(op);
                return;
            }
        }
        let pot = self.b.pot();
        let clock_now = self.clock.now_nanos();
        if pot.tokens() > 0 && clock_now >= pot.expires() {
            self.drain_lease();
        }
        let queued = self.limiter.queues.counts().total;
        let ttl = self.ttl.as_secs_f64();
        // What this replica will take over one lease time: the rate it takes at, or the
        // rate requests arrive at when that is higher (a flood, or the first second).
        let steady = (self.rate.max(self.offered) * ttl).ceil();
        let low = self.low_water();
        // The next lease is asked for when the one in hand (perhaps scheduled to start
        // later) is down to its low-water mark; what is left of it goes back with the call.
        let need = pot.tokens() <= low && (queued > 0 || steady >= 1.0);
        let heartbeat_due = self.last_call.is_none_or(|t| t.elapsed() >= HEARTBEAT);
        if need && now >= self.retry_at {
            let max = (self.record.limit / 100).max(1);
            let want = (queued as f64 + steady).clamp(1.0, f64::from(max)) as u32;
            self.lease_call(settings, want, queued, heartbeat_due).await;
        } else if heartbeat_due || self.give_back.is_some() || !self.late_sends.is_empty() {
            self.lease_call(settings, 0, queued, true).await;
        }
        self.token_step(settings).await;
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut next = self
            .last_call
            .map_or(Duration::ZERO, |t| HEARTBEAT.saturating_sub(t.elapsed()));
        if self.mode != Mode::Shared || self.limiter.queues.counts().total > 0 {
            next = next.min(self.retry_at.saturating_duration_since(now));
        }
        let pot = self.b.pot();
        if pot.tokens() > 0 {
            let left = pot.expires().saturating_sub(self.clock.now_nanos());
            next = next.min(Duration::from_nanos(left));
        }
        if self.mode == Mode::Fallback {
            let down = self.last_ok.unwrap_or(self.started).elapsed();
            next = next.min(self.fallback_for.saturating_sub(down));
        }
        if let Some(d) = self.tl.adjust_due() {
            next = next.min(d);
        } else if self.b.pot.token_pot.has_adjustments() {
            next = next.min(leases::ADJUST_EVERY);
        }
        let tokens = &self.b.pot.token_pot;
        if tokens.tokens() > 0 {
            let left = tokens.expires().saturating_sub(self.clock.now_nanos());
            next = next.min(Duration::from_nanos(left));
        }
        next.max(Duration::from_millis(1))
    }

    async fn leave(&mut self, settings: &dyn Settings) {
        if self.mode != Mode::Shared {
            return;
        }
        self.drain_lease();
        let (member, n) = self.give_back.take().unwrap_or_default();
        let _ = self
            .raw(settings, "leave", self.version, &[member, n.to_string()])
            .await;
    }
}
