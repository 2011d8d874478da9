//! Script calls: one round trip bounded by `redis_timeout`, the answers that need a
//! join or a seed first, and what a reply changes here (the record, the mode, the
//! limiter's pacing and pause, the view).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{nanos, Task};
use crate::budget::conn;
use crate::budget::inputs::{Settings, SharedSettings};
use crate::budget::script::{self, Reply};
use crate::budget::view::Record;
use crate::limiter::{ClusterPacing, Mode, PauseReason, RetreatState, Source};

impl Task {
    /// A script call; `lost`, `gen` and `seed` answers are dealt with (join, seed) and
    /// the call made again. `None`: Redis failed (the replica is on its fallback share).
    pub(super) async fn call(
        &mut self,
        settings: &dyn Settings,
        op: &'static str,
        args: &[String],
    ) -> Option<Reply> {
        for _ in 0..4 {
            let r = self.raw(settings, op, self.version, args).await?;
            match r.status.as_str() {
                "lost" => {
                    tracing::warn!(
                        provider = &*self.b.provider,
                        budget = &*self.b.view.lock().budget,
                        "Redis lost the shared budget's state: starting a new generation"
                    );
                    self.join(settings).await?;
                }
                "gen" | "seed" => {
                    let gen = r.generation.clone();
                    self.seed(settings, &gen).await?;
                }
                _ => return Some(r),
            }
        }
        None
    }

    pub(super) async fn raw(
        &mut self,
        settings: &dyn Settings,
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
                    self.on_reply(settings, &r, took);
                    return Some(r);
                }
                Err(e) => e.to_string(),
            },
            Ok(Err(e)) => conn::masked(&e, &self.redis_cfg),
            Err(_) => format!("no answer within redis_timeout ({:?})", self.conn.timeout),
        };
        self.on_error(settings, &err);
        None
    }

    fn on_reply(&mut self, settings: &dyn Settings, r: &Reply, took: Duration) {
        let now = self.clock.now_nanos();
        self.offset_ms = i64::try_from(r.now_ms).unwrap_or(i64::MAX)
            - i64::try_from((now - nanos(took) / 2) / 1_000_000).unwrap_or(0);
        if r.status != "lost" {
            if !r.record.is_empty() {
                self.version = r.version;
            }
            let before = self.record.clone();
            r.update(&mut self.record);
            if !r.record.is_empty() {
                self.apply_record(settings, &before);
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
        if r.pause_until_ms > r.now_ms {
            let until = now.saturating_add((r.pause_until_ms - r.now_ms) * 1_000_000);
            let reason = match r.pause_reason.as_str() {
                "quota" => PauseReason::Quota,
                "overload" => PauseReason::Overload,
                _ => PauseReason::RetryAfter,
            };
            self.limiter.pause(until, reason);
        }
        if self.mode == Mode::Shared {
            // The cluster's limit fell (a 429 somewhere): tokens in hand, perhaps
            // scheduled ahead, were granted under the old one and go back unused.
            if r.limit < self.last_limit && r.granted == 0 {
                self.drain_lease();
            }
            self.last_limit = r.limit;
            self.limiter
                .set_cluster(Some(self.pacing(r.limit, r.rpm)), now);
        }
        if r.status != "lost" {
            self.on_token_reply(r);
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
    pub(super) fn pacing(&self, limit: u32, rpm: f64) -> ClusterPacing {
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
    fn apply_record(&mut self, settings: &dyn Settings, before: &Record) {
        let r = &self.record;
        if r.rate_rpm <= 0.0 {
            return;
        }
        let local = SharedSettings::local(&settings.current(), self.b.index);
        let differs = (local.rate_rpm - r.rate_rpm).abs() > 1e-9
            || local.bucket_capacity != r.bucket_capacity
            || local.fallback != r.fallback
            || r.tokens_per_minute
                .is_some_and(|t| Some(t) != local.tokens_per_minute);
        if differs {
            settings.adopt(
                self.b.index,
                SharedSettings {
                    bucket_capacity: r.bucket_capacity.max(1),
                    ..SharedSettings::of(r)
                },
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
}

fn source_of(s: &str) -> Source {
    match s {
        "header" => Source::Header,
        "learned_429" => Source::Learned429,
        "probe" => Source::Probe,
        _ => Source::Config,
    }
}
