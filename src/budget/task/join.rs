//! Joining the budget (creating it from this replica's settings, or taking the
//! cluster's), and reporting this replica's recent sends to a new generation or after a
//! spell on its fallback share, so the shared window log counts them.

use super::{Task, SEED_BUCKETS};
use crate::budget::inputs::{Settings, SharedSettings};
use crate::budget::script::Reply;

impl Task {
    pub(super) async fn join(&mut self, settings: &dyn Settings) -> Option<Reply> {
        let window = self.provider_window;
        let margin = self.margin.of(window);
        let rc = self.retreat;
        // After Redis lost the record, the cluster's last values are put back, not this
        // replica's file.
        let shared = if self.joined {
            SharedSettings::of(&self.record)
        } else {
            SharedSettings::local(&settings.current(), self.b.index)
        };
        let mut args: Vec<String> = [
            ("rate_rpm", shared.rate_rpm.to_string()),
            ("capacity", shared.bucket_capacity.to_string()),
            ("window_ms", window.as_millis().to_string()),
            ("margin_ms", margin.as_millis().to_string()),
            ("fallback", u8::from(shared.fallback).to_string()),
            (
                "probe_interval_ms",
                self.probe_interval.as_millis().to_string(),
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
        // The token setting as given and its window's tokens: the cluster's after Redis
        // lost the record, else this replica's.
        let tokens = if self.joined {
            self.record
                .tokens_per_minute
                .map(|t| (t, self.record.tokens_limit))
        } else {
            let t = settings.current().providers[self.b.index].tokens_per_minute;
            Some((t, self.configured_tokens(settings)))
        };
        if let Some((per_minute, per_window)) = tokens.filter(|&(_, w)| w > 0) {
            args.extend([
                "tokens_per_minute".to_owned(),
                per_minute.to_string(),
                "tokens_limit".to_owned(),
                per_window.to_string(),
            ]);
        }
        if self.joined && self.record.learned > 0 {
            args.extend([
                "learned".to_owned(),
                self.record.learned.to_string(),
                "source".to_owned(),
                self.record.source.clone(),
            ]);
        }
        let r = self.raw(settings, "join", -1, &args).await?;
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
                self.log_differences(settings);
            }
        }
        Some(r)
    }

    /// A replica that joins an existing budget takes the cluster's values; it says where
    /// they differ from its own.
    fn log_differences(&mut self, settings: &dyn Settings) {
        let local = SharedSettings::local(&settings.current(), self.b.index);
        let window = self.provider_window;
        let mut diffs = Vec::new();
        if (local.rate_rpm - self.record.rate_rpm).abs() > 1e-9 {
            diffs.push(format!(
                "rate_rpm {} -> {}",
                local.rate_rpm, self.record.rate_rpm
            ));
        }
        if local.bucket_capacity != self.record.bucket_capacity {
            diffs.push(format!(
                "bucket_capacity {} -> {}",
                local.bucket_capacity, self.record.bucket_capacity
            ));
        }
        if local.fallback != self.record.fallback {
            diffs.push(format!(
                "fallback_enabled_passthrough {} -> {}",
                local.fallback, self.record.fallback
            ));
        }
        match (local.tokens_per_minute, self.record.tokens_per_minute) {
            (Some(mine), Some(theirs)) if mine != theirs => {
                diffs.push(format!("tokens_per_minute {mine} -> {theirs}"));
            }
            (Some(mine), None) if mine > 0 => {
                // A budget made without a token setting (by a replica without one, or
                // before the cluster shared tokens) takes this replica's.
                let per_window = self.configured_tokens(settings);
                tracing::info!(
                    provider = &*self.b.provider,
                    tokens_per_minute = mine,
                    "the shared budget had no token setting: this replica's is now the cluster's"
                );
                self.pending
                    .push_back(super::Op::from(crate::budget::handle::Command::Tokens {
                        tokens_per_minute: mine,
                        tokens_per_window: per_window,
                    }));
            }
            _ => {}
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
    pub(super) async fn seed(&mut self, settings: &dyn Settings, gen: &str) -> Option<()> {
        let mut args = vec![gen.to_owned()];
        args.extend(self.sends_by_bucket(None));
        args.extend(self.tokens_by_bucket(None));
        let old = std::mem::replace(&mut self.gen, gen.to_owned());
        match self.raw(settings, "seed", self.version, &args).await {
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
    pub(super) async fn report_fallback_sends(
        &mut self,
        settings: &dyn Settings,
        since: u64,
    ) -> Option<()> {
        let mut args = vec![self.gen.clone()];
        args.extend(self.sends_by_bucket(Some(since)));
        args.extend(self.tokens_by_bucket(Some(since)));
        let version = self.version;
        self.raw(settings, "seed", version, &args).await.map(|_| ())
    }

    /// This replica's sends over the guard's span (or since clock time `since`), in
    /// [`SEED_BUCKETS`] buckets counted back from now: pairs of how long ago the bucket
    /// ends (ms) and its sends, for buckets with any.
    fn sends_by_bucket(&self, since: Option<u64>) -> Vec<String> {
        let guard = &self.limiter.guard;
        self.by_bucket(guard.span_nanos(), since, |end, len| {
            u64::from(guard.sent_in(end, len))
        })
    }

    /// What `count(end, len)` counts in [`SEED_BUCKETS`] buckets of `span` counted back
    /// from now (or since clock time `since`): pairs of how long ago each bucket ends
    /// (ms) and its count, for buckets with any.
    pub(super) fn by_bucket(
        &self,
        span: u64,
        since: Option<u64>,
        count: impl Fn(u64, u64) -> u64,
    ) -> Vec<String> {
        let now = self.clock.now_nanos();
        let bucket = (span / SEED_BUCKETS).max(1);
        let mut pairs = Vec::new();
        for i in 0..SEED_BUCKETS {
            let end = now.saturating_sub(i * bucket);
            let len = match since {
                Some(since) if end <= since => break,
                Some(since) => bucket.min(end - since),
                None => bucket,
            };
            let n = count(end, len);
            if n > 0 {
                pairs.push((i * bucket / 1_000_000).to_string());
                pairs.push(n.to_string());
            }
        }
        pairs
    }
}
