//! One budget's task: keeps the pot filled, heartbeats, reports what the provider
//! answered, carries admin changes, and falls back when Redis is lost.
//!
//! It runs on the `budget` thread, never on a worker, and every Redis call is bounded by
//! `redis_timeout`: a stalled Redis stalls this task only, and the replica is on its
//! fallback share one timeout later.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::conn::{self, Conn};
use super::script::{self, Keys, Reply};
use super::view::Record;
use super::{Budget, Command};
use crate::app::App;
use crate::config::RedisConfig;
use crate::limiter::learn::{per_window, rpm_of};
use crate::limiter::{
    ClusterPacing, Event, Limiter, Mode, PauseReason, Refusal, RetreatState, Source,
};

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

pub struct Task {
    app: Weak<App>,
    b: Arc<Budget>,
    conn: Conn,
    script: redis::Script,
    keys: Keys,
    rid: Arc<str>,
    replicas_configured: u32,
    fallback_for: Duration,
    redis_cfg: RedisConfig,
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
    give_back: Option<(String, u32)>,
    pending: VecDeque<Op>,
    // Rates of this replica (per second), from the pot's counters.
    rate: f64,
    offered: f64,
    last_counts: (u64, u64, Instant),
    /// The cluster's per-window limit in the last reply.
    last_limit: u32,
}

impl Task {
    pub fn new(app: Weak<App>, b: Arc<Budget>, conn: Conn, redis: &RedisConfig) -> Self {
        let view = b.view();
        let now = Instant::now();
        Self {
            keys: Keys::new(&redis.prefix, &view.budget),
            rid: Arc::clone(&view.replica),
            app,
            b,
            conn,
            script: script::script(),
            replicas_configured: redis.replicas.max(1),
            fallback_for: redis.fallback_for,
            redis_cfg: redis.clone(),
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
            give_back: None,
            pending: VecDeque::new(),
            rate: 0.0,
            offered: 0.0,
            last_counts: (0, 0, now),
            last_limit: u32::MAX,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        if let Some(app) = self.app.upgrade() {
            self.enter_fallback(&app);
        }
        loop {
            let Some(app) = self.app.upgrade() else {
                return;
            };
            if shutdown.is_cancelled() {
                self.leave(&app).await;
                return;
            }
            self.step(&app).await;
            let next = self.next_wake(&app);
            drop(app);
            let pot = self.b.pot();
            tokio::select! {
                () = std::future::poll_fn(|cx| pot.poll_wanted(cx)) => {}
                () = tokio::time::sleep(next) => {}
                () = shutdown.cancelled() => {}
            }
        }
    }

    fn limiter<'a>(&self, app: &'a App) -> &'a Arc<Limiter> {
        &app.providers[self.b.index].limiter
    }

    fn window(&self, app: &App) -> Duration {
        if self.record.window.is_zero() {
            app.providers[self.b.index].config.window
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

    async fn step(&mut self, app: &App) {
        self.sample();
        while let Some(c) = self.b.commands.pop() {
            self.pending.push_back(command_op(c));
        }
        while let Some(ev) = self.b.pot.outbox.pop() {
            if let Some(op) = self.report_op(app, ev) {
                self.pending.push_back(op);
            }
        }
        let now = Instant::now();
        if self.mode != Mode::Shared && now < self.retry_at {
            self.check_isolation(app);
            return;
        }
        if !self.joined && self.join(app).await.is_none() {
            return;
        }
        if let Some(since) = self.fallback_since {
            if self.report_fallback_sends(app, since).await.is_none() {
                return;
            }
            self.fallback_since = None;
        }
        while let Some(op) = self.pending.pop_front() {
            if self.call(app, op.name, &op.args).await.is_none() {
                self.pending.push_front(op);
                return;
            }
        }
        let pot = self.b.pot();
        let clock_now = app.clock.now_nanos();
        if pot.tokens() > 0 && clock_now >= pot.expires() {
            self.drain_lease();
        }
        let queued = self.limiter(app).queues.counts().total;
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
            self.lease_call(app, want, queued, heartbeat_due).await;
        } else if heartbeat_due || self.give_back.is_some() {
            self.lease_call(app, 0, queued, true).await;
        }
    }

    fn low_water(&self) -> u32 {
        let steady = (self.rate.max(self.offered) * self.ttl.as_secs_f64()).ceil();
        (steady / 4.0) as u32
    }

    /// The lease in hand goes back (unused), with the next call.
    fn drain_lease(&mut self) {
        let left = self.b.pot.drain();
        if let Some(l) = self.lease.take() {
            if left > 0 {
                self.give_back = Some((l.member, left));
                self.b.update(|v| v.leases.returned += u64::from(left));
            }
        }
    }

    async fn lease_call(&mut self, app: &App, want: u32, queued: usize, shares: bool) {
        if want > 0 {
            // What is left of the last lease goes back with this call.
            self.drain_lease();
        }
        // Offered per window plus those waiting now: in proportion to offered load for
        // open traffic, and converging to equal parts for clients that wait for each
        // answer before the next request (whose arrivals follow what they are served).
        let window = self.window(app).as_secs_f64();
        let demand = self.offered.max(self.rate) * window + queued as f64;
        let (member, n) = self.give_back.clone().unwrap_or_default();
        let args = vec![
            want.to_string(),
            format!("{demand:.3}"),
            queued.to_string(),
            member,
            n.to_string(),
            self.live.to_string(),
            if shares { "1" } else { "0" }.to_owned(),
        ];
        let sent = app.clock.now_nanos();
        let Some(r) = self.call(app, "lease", &args).await else {
            return;
        };
        self.give_back = None;
        tracing::debug!(
            provider = &*self.b.provider,
            want,
            granted = r.granted,
            wait_ms = r.wait.as_millis() as u64,
            limit = r.limit,
            live = r.live,
            learning = r.learning,
            "lease"
        );
        if want == 0 {
            return;
        }
        let limiter = self.limiter(app);
        self.b.update(|v| match r.granted {
            0 => v.leases.empty += 1,
            g if g < want => v.leases.partial += 1,
            _ => v.leases.granted += 1,
        });
        if r.granted > 0 {
            // Usable from its start for 90% of the lease time, counted from before the
            // call (the grant was made after it).
            let start = sent.saturating_add(nanos(r.start_in));
            let expires = start.saturating_add(nanos(r.ttl.mul_f64(0.9)));
            // A token put back between the drain and now is lost to this replica; it
            // stays counted in the shared log until its lease time ends (safe).
            let _ = self.b.pot.fill(r.granted, start, expires, self.low_water());
            self.lease = Some(Lease { member: r.member });
            limiter.wake_dispatcher();
        }
        if r.granted < want {
            // Never longer than a heartbeat: a wait for the window is only an estimate.
            self.retry_at = Instant::now() + r.wait.clamp(Duration::from_millis(1), HEARTBEAT);
        }
    }

    /// A script call; `lost`, `gen` and `seed` answers are dealt with (join, seed) and
    /// the call made again. `None`: Redis failed (the replica is on its fallback share).
    async fn call(&mut self, app: &App, op: &'static str, args: &[String]) -> Option<Reply> {
        for _ in 0..4 {
            let r = self.raw(app, op, self.version, args).await?;
            match r.status.as_str() {
                "lost" => {
                    tracing::warn!(
                        provider = &*self.b.provider,
                        budget = &*self.b.view.lock().budget,
                        "Redis lost the shared budget's state: starting a new generation"
                    );
                    self.join(app).await?;
                }
                "gen" | "seed" => {
                    let gen = r.generation.clone();
                    self.seed(app, &gen).await?;
                }
                _ => return Some(r),
            }
        }
        None
    }

    async fn raw(
        &mut self,
        app: &App,
        op: &'static str,
        version: i64,
        args: &[String],
    ) -> Option<Reply> {
        let started = Instant::now();
        let mut conn = self.conn.manager.clone();
        let res = tokio::time::timeout(
            self.conn.timeout,
            script::call(
                &mut conn,
                &self.script,
                &self.keys,
                op,
                script::Caller {
                    rid: &self.rid,
                    gen: &self.gen,
                    version,
                },
                args,
            ),
        )
        .await;
        let took = started.elapsed();
        self.last_call = Some(Instant::now());
        self.b.update(|v| v.round_trips += 1);
        self.b.record_round_trip(took);
        let err = match res {
            Ok(Ok(v)) => match Reply::parse(&v) {
                Ok(r) => {
                    self.on_reply(app, &r, took);
                    return Some(r);
                }
                Err(e) => e.to_string(),
            },
            Ok(Err(e)) => conn::masked(&e, &self.redis_cfg),
            Err(_) => format!("no answer within redis_timeout ({:?})", self.conn.timeout),
        };
        self.on_error(app, &err);
        None
    }

    async fn join(&mut self, app: &App) -> Option<Reply> {
        let hot = app.hot.get();
        let h = &hot.providers[self.b.index];
        let p = &app.providers[self.b.index];
        let window = p.config.window;
        let margin = app.config.margin.of(window);
        let rc = app.config.retreat;
        // After Redis lost the record, the cluster's last values are put back, not this
        // replica's file.
        let (rate, capacity, fallback) = if self.joined {
            (
                self.record.rate_rpm,
                self.record.bucket_capacity,
                self.record.fallback,
            )
        } else {
            (
                h.rate_rpm,
                h.bucket_capacity,
                hot.fallback_enabled_passthrough,
            )
        };
        let mut args: Vec<String> = [
            ("rate_rpm", rate.to_string()),
            ("capacity", capacity.to_string()),
            ("window_ms", window.as_millis().to_string()),
            ("margin_ms", margin.as_millis().to_string()),
            ("fallback", u8::from(fallback).to_string()),
            (
                "probe_interval_ms",
                app.config.probe_interval.as_millis().to_string(),
            ),
            ("default_pause_ms", rc.default_pause.as_millis().to_string()),
            ("retreat_factor", rc.decrease_factor.to_string()),
            ("retreat_floor", rc.floor_fraction.to_string()),
            ("quiet_ms", rc.quiet_period.as_millis().to_string()),
            ("step", rc.recovery_step.to_string()),
            ("recovery_ms", rc.recovery_interval.as_millis().to_string()),
            ("fallback_for_ms", self.fallback_for.as_millis().to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect();
        if self.joined && self.record.learned > 0 {
            args.extend([
                "learned".to_owned(),
                self.record.learned.to_string(),
                "source".to_owned(),
                self.record.source.clone(),
            ]);
        }
        let r = self.raw(app, "join", -1, &args).await?;
        let first = !self.joined;
        self.joined = true;
        if first {
            if r.status == "created" {
                tracing::info!(
                    provider = &*self.b.provider,
                    budget = &*self.b.view.lock().budget,
                    replica = &*self.rid,
                    "created the shared budget in Redis from this replica's configuration"
                );
            } else {
                self.log_differences(app);
            }
        }
        Some(r)
    }

    /// A replica that joins an existing budget takes the cluster's values; it says where
    /// they differ from its own.
    fn log_differences(&mut self, app: &App) {
        let hot = app.hot.get();
        let h = &hot.providers[self.b.index];
        let window = app.providers[self.b.index].config.window;
        let mut diffs = Vec::new();
        if (h.rate_rpm - self.record.rate_rpm).abs() > 1e-9 {
            diffs.push(format!(
                "rate_rpm {} -> {}",
                h.rate_rpm, self.record.rate_rpm
            ));
        }
        if h.bucket_capacity != self.record.bucket_capacity {
            diffs.push(format!(
                "bucket_capacity {} -> {}",
                h.bucket_capacity, self.record.bucket_capacity
            ));
        }
        if hot.fallback_enabled_passthrough != self.record.fallback {
            diffs.push(format!(
                "fallback_enabled_passthrough {} -> {}",
                hot.fallback_enabled_passthrough, self.record.fallback
            ));
        }
        if !self.record.window.is_zero() && window != self.record.window {
            diffs.push(format!(
                "provider_window {}s -> {}s (used for the shared window now; locally after a restart with the same value)",
                window.as_secs_f64(),
                self.record.window.as_secs_f64()
            ));
        }
        self.log_learned_on_join();
        if !diffs.is_empty() {
            tracing::warn!(
                provider = &*self.b.provider,
                budget = &*self.b.view.lock().budget,
                differences = %diffs.join(", "),
                "this replica's configuration differs from the shared budget's: the cluster's values apply"
            );
        }
    }

    fn log_learned_on_join(&self) {
        if self.record.learned > 0 {
            tracing::info!(
                provider = &*self.b.provider,
                learned = self.record.learned,
                source = %self.record.source,
                "joined the shared budget with a learned limit"
            );
        }
    }

    /// Reports this replica's sends still in the span to a new generation.
    async fn seed(&mut self, app: &App, gen: &str) -> Option<()> {
        let limiter = self.limiter(app);
        let now = app.clock.now_nanos();
        let span = limiter.guard.span_nanos();
        let bucket = (span / SEED_BUCKETS).max(1);
        let mut args = vec![gen.to_owned()];
        for i in 0..SEED_BUCKETS {
            let end = now.saturating_sub(i * bucket);
            let n = limiter.guard.sent_in(end, bucket);
            if n > 0 {
                args.push((i * bucket / 1_000_000).to_string());
                args.push(n.to_string());
            }
        }
        let old = std::mem::replace(&mut self.gen, gen.to_owned());
        match self.raw(app, "seed", self.version, &args).await {
            Some(r) if r.status == "seeded" => {
                if !old.is_empty() && old != gen {
                    tracing::warn!(provider = &*self.b.provider, generation = gen, "the shared budget starts a new generation: one window of learning mode, each replica at most its share");
                }
                Some(())
            }
            Some(r) => {
                // The generation moved again; the next call sees it.
                self.gen = r.generation;
                Some(())
            }
            None => {
                self.gen = old;
                None
            }
        }
    }

    /// Back from the fallback share in the same generation: the sends made alone since
    /// `since` are added to the shared log (a new generation is seeded whole instead).
    async fn report_fallback_sends(&mut self, app: &App, since: u64) -> Option<()> {
        let limiter = self.limiter(app);
        let now = app.clock.now_nanos();
        let span = limiter.guard.span_nanos();
        let bucket = (span / SEED_BUCKETS).max(1);
        let mut args = vec![self.gen.clone()];
        for i in 0..SEED_BUCKETS {
            let end = now.saturating_sub(i * bucket);
            if end <= since {
                break;
            }
            let n = limiter.guard.sent_in(end, bucket.min(end - since));
            if n > 0 {
                args.push((i * bucket / 1_000_000).to_string());
                args.push(n.to_string());
            }
        }
        let version = self.version;
        self.raw(app, "seed", version, &args).await.map(|_| ())
    }

    fn on_reply(&mut self, app: &App, r: &Reply, took: Duration) {
        let now = app.clock.now_nanos();
        self.offset_ms = i64::try_from(r.now_ms).unwrap_or(i64::MAX)
            - i64::try_from((now - nanos(took) / 2) / 1_000_000).unwrap_or(0);
        if r.status != "lost" {
            if !r.record.is_empty() {
                self.version = r.version;
            }
            let before = self.record.clone();
            r.update(&mut self.record);
            if !r.record.is_empty() {
                self.apply_record(app, &before);
            }
            self.live = r.live.max(1);
            self.share = r.share;
            // A grant's own lease time may be shorter (tokens for waiting requests).
            if r.granted == 0 && !r.ttl.is_zero() {
                self.ttl = r.ttl;
            }
        }
        self.failures = 0;
        let was_down = self.mode != Mode::Shared;
        self.last_ok = Some(Instant::now());
        let joined = self.joined || r.status == "created" || r.status == "joined";
        let down = if r.status == "lost" {
            self.down_since
        } else {
            self.down_since.take()
        };
        if was_down && r.status != "lost" && joined {
            if let Some(since) = down {
                tracing::warn!(
                    provider = &*self.b.provider,
                    replicas = self.live,
                    down_secs = since.elapsed().as_secs_f64(),
                    "Redis answers again: back on the shared budget"
                );
            } else {
                tracing::info!(
                    provider = &*self.b.provider,
                    replicas = self.live,
                    replica = &*self.rid,
                    "on the shared budget"
                );
            }
            self.mode = Mode::Shared;
            self.b.pot.set_mode(Mode::Shared);
        }
        let limiter = self.limiter(app);
        if r.pause_until_ms > r.now_ms {
            let until = now.saturating_add((r.pause_until_ms - r.now_ms) * 1_000_000);
            let reason = match r.pause_reason.as_str() {
                "quota" => PauseReason::Quota,
                "overload" => PauseReason::Overload,
                _ => PauseReason::RetryAfter,
            };
            limiter.pause(until, reason);
        }
        if self.mode == Mode::Shared {
            // The cluster's limit fell (a 429 somewhere): tokens in hand, perhaps
            // scheduled ahead, were granted under the old one and go back unused.
            if r.limit < self.last_limit && r.granted == 0 {
                self.drain_lease();
            }
            self.last_limit = r.limit;
            limiter.set_cluster(Some(self.pacing(r.limit, r.rpm)), now);
        }
        let shares: Vec<(Arc<str>, u32)> = r
            .shares
            .iter()
            .filter(|(k, _)| k != "all")
            .map(|(k, v)| (Arc::from(k.as_str()), *v))
            .collect();
        let record = self.record.clone();
        let (mode, live, gen) = (self.mode, self.live, self.gen.clone());
        let admitted = self.b.pot.counts().0;
        self.b.update(|v| {
            v.admitted = admitted;
            v.mode = mode;
            v.backend_up = true;
            v.down_for = None;
            v.replicas = live;
            v.fallback_limit = r.share.max(1);
            v.reserved = r.reserved;
            v.learning = r.learning;
            v.generation = gen;
            v.record = record;
            if r.shares.iter().any(|(k, _)| k == "all") || !shares.is_empty() {
                v.shares = shares;
            }
        });
    }

    /// The local pacing for `limit` per window at `rpm` for the cluster: the guard at the
    /// cluster's limit (local sends never exceed the cluster's grants); the bucket at this
    /// replica's part of the rate, which is what its waits are estimated with.
    fn pacing(&self, limit: u32, rpm: f64) -> ClusterPacing {
        let own = self.b.view.lock().own_share();
        let part = own.max(1.0 / f64::from(self.live.max(1)));
        ClusterPacing {
            limit: limit.max(1),
            learned: self.record.learned,
            rpm: (rpm * part).max(1e-3),
            source: source_of(&self.record.source),
            probing: self.record.probing,
            retreat_state: if self.record.retreat_factor < 1.0 && self.record.retreat_factor > 0.0 {
                RetreatState::Retreating
            } else {
                RetreatState::Normal
            },
            retreat_factor: if self.record.retreat_factor > 0.0 {
                self.record.retreat_factor
            } else {
                1.0
            },
            changes: self.record.changes,
        }
    }

    /// The cluster's values become this replica's (rate, capacity, fallback).
    fn apply_record(&mut self, app: &App, before: &Record) {
        let r = &self.record;
        if r.rate_rpm <= 0.0 {
            return;
        }
        let hot = app.hot.get();
        let h = &hot.providers[self.b.index];
        let differs = (h.rate_rpm - r.rate_rpm).abs() > 1e-9
            || h.bucket_capacity != r.bucket_capacity
            || hot.fallback_enabled_passthrough != r.fallback;
        if differs {
            crate::admin::apply_cluster(
                app,
                self.b.index,
                r.rate_rpm,
                r.bucket_capacity.max(1),
                r.fallback,
            );
        }
        if before.learned != r.learned && before.version != 0 {
            tracing::warn!(
                provider = &*self.b.provider,
                from = before.learned,
                to = r.learned,
                source = %r.source,
                "shared learned limit change"
            );
        }
    }

    fn on_error(&mut self, app: &App, err: &str) {
        self.failures = self.failures.saturating_add(1);
        self.down_since.get_or_insert_with(Instant::now);
        let backoff = Duration::from_millis(100)
            .saturating_mul(1 << self.failures.min(6))
            .min(MAX_BACKOFF);
        self.retry_at = Instant::now() + backoff;
        if self.mode == Mode::Shared {
            self.fallback_since = Some(app.clock.now_nanos());
            tracing::warn!(
                provider = &*self.b.provider,
                error = %err,
                fallback_limit = self.fallback_limit(app),
                replicas = self.live,
                for_secs = self.fallback_for.as_secs_f64(),
                "Redis is unreachable: this replica sends at most its fallback share until it answers"
            );
            self.enter_fallback(app);
        } else if self.failures == 1 && self.last_ok.is_none() {
            tracing::warn!(
                provider = &*self.b.provider,
                error = %err,
                fallback_limit = self.fallback_limit(app),
                replicas = self.live,
                "Redis not reached yet: this replica sends at most its fallback share"
            );
        }
        let down = self.last_ok.unwrap_or(self.started).elapsed();
        self.b.update(|v| {
            v.backend_up = false;
            v.down_for = Some(down);
            v.leases.error += 1;
        });
        self.check_isolation(app);
    }

    /// Per window: what this replica may send alone.
    fn fallback_limit(&self, app: &App) -> u32 {
        if self.joined && self.share > 0 {
            return self.share;
        }
        let window = app.providers[self.b.index].config.window;
        let rate = app.hot.get().providers[self.b.index].rate_rpm;
        (per_window(rate, window) / self.replicas_configured).max(1)
    }

    fn enter_fallback(&mut self, app: &App) {
        self.drain_lease();
        self.mode = Mode::Fallback;
        self.b.pot.set_mode(Mode::Fallback);
        let window = app.providers[self.b.index].config.window;
        let limit = self.fallback_limit(app);
        let pacing = ClusterPacing {
            rpm: rpm_of(limit, window),
            ..self.pacing(limit, rpm_of(limit, window))
        };
        let limiter = self.limiter(app);
        limiter.set_cluster(Some(pacing), app.clock.now_nanos());
        limiter.wake_dispatcher();
        let mode = self.mode;
        self.b.update(|v| {
            v.mode = mode;
            v.fallback_limit = limit;
        });
    }

    /// A replica cut off from Redis longer than its share is reserved stops sending.
    fn check_isolation(&mut self, app: &App) {
        if self.mode != Mode::Fallback {
            return;
        }
        let down = self.last_ok.unwrap_or(self.started).elapsed();
        if down >= self.fallback_for {
            tracing::error!(
                provider = &*self.b.provider,
                down_secs = down.as_secs_f64(),
                "Redis unreachable for longer than redis_fallback_for: this replica stops sending with the shared key until Redis answers (requests get 503 budget_unavailable)"
            );
            self.mode = Mode::Isolated;
            self.b.pot.set_mode(Mode::Isolated);
            self.limiter(app).wake_dispatcher();
            self.b.update(|v| v.mode = Mode::Isolated);
        }
    }

    fn next_wake(&self, app: &App) -> Duration {
        let now = Instant::now();
        let mut next = self
            .last_call
            .map_or(Duration::ZERO, |t| HEARTBEAT.saturating_sub(t.elapsed()));
        if self.mode != Mode::Shared || self.limiter(app).queues.counts().total > 0 {
            next = next.min(self.retry_at.saturating_duration_since(now));
        }
        let pot = self.b.pot();
        if pot.tokens() > 0 {
            let left = pot.expires().saturating_sub(app.clock.now_nanos());
            next = next.min(Duration::from_nanos(left));
        }
        if self.mode == Mode::Fallback {
            let down = self.last_ok.unwrap_or(self.started).elapsed();
            next = next.min(self.fallback_for.saturating_sub(down));
        }
        next.max(Duration::from_millis(1))
    }

    fn report_op(&self, app: &App, ev: Event) -> Option<Op> {
        let ms = |d: Option<Duration>| {
            d.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        };
        let args = match ev {
            Event::Refused {
                sent_at,
                kind,
                retry_after,
                ..
            } => match kind {
                Refusal::RateLimit => vec![
                    "rate".to_owned(),
                    (i64::try_from(sent_at / 1_000_000).unwrap_or(0) + self.offset_ms).to_string(),
                    ms(retry_after).to_string(),
                ],
                Refusal::Concurrency | Refusal::Overload => {
                    vec![
                        "retreat".to_owned(),
                        "0".to_owned(),
                        ms(retry_after).to_string(),
                    ]
                }
                // Token limits are paused locally; billing is passed on.
                Refusal::Tokens | Refusal::Billing => return None,
            },
            Event::HeaderLimit { limit_rpm } => vec![
                "header".to_owned(),
                per_window(limit_rpm as f64, self.window(app)).to_string(),
                "-1".to_owned(),
            ],
            Event::QuotaSpent { reset } => {
                vec![
                    "quota".to_owned(),
                    "0".to_owned(),
                    ms(Some(reset)).to_string(),
                ]
            }
        };
        Some(Op {
            name: "refused",
            args,
        })
    }

    async fn leave(&mut self, app: &App) {
        if self.mode != Mode::Shared {
            return;
        }
        self.drain_lease();
        let (member, n) = self.give_back.take().unwrap_or_default();
        let _ = self
            .raw(app, "leave", self.version, &[member, n.to_string()])
            .await;
    }
}

fn command_op(c: Command) -> Op {
    match c {
        Command::Configure {
            rate_rpm,
            bucket_capacity,
            fallback,
        } => Op {
            name: "configure",
            args: vec![
                "rate_rpm".into(),
                rate_rpm.to_string(),
                "capacity".into(),
                bucket_capacity.to_string(),
                "fallback".into(),
                u8::from(fallback).to_string(),
            ],
        },
        Command::Forget => Op {
            name: "forget",
            args: Vec::new(),
        },
    }
}

fn source_of(s: &str) -> Source {
    match s {
        "header" => Source::Header,
        "learned_429" => Source::Learned429,
        "probe" => Source::Probe,
        _ => Source::Config,
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
