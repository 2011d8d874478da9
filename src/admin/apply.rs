//! Applying a new [`Hot`] value: from the admin API, a SIGHUP reload or the shared
//! budget of another replica.
//!
//! Each field reaches the running parts as its row of the run-time table says
//! ([`Applies`]): rates into the limiters, queue bounds into the queues, the level into
//! the log filter; the rest is read by each request from the value it loaded. Every
//! change is written to the audit log and counted.

use std::sync::atomic::Ordering;

use crate::app::App;
use crate::config::runtime::Applies;
use crate::config::{needs_restart, Config};
use crate::hot::Hot;

use super::patch::{self, Change};

/// Sends the shared fields of a change made here to every replica of each shared
/// budget (through Redis).
pub(super) fn publish(app: &App, old: &Hot, new: &Hot) {
    for ((provider, a), b) in app.providers.iter().zip(&old.providers).zip(&new.providers) {
        let Some(budget) = &provider.budget else {
            continue;
        };
        if a.rate_rpm != b.rate_rpm
            || a.bucket_capacity != b.bucket_capacity
            || a.tokens_per_minute != b.tokens_per_minute
            || old.fallback_enabled_passthrough != new.fallback_enabled_passthrough
        {
            budget.command(crate::budget::Command::Configure {
                rate_rpm: b.rate_rpm,
                bucket_capacity: b.bucket_capacity,
                fallback: new.fallback_enabled_passthrough,
                tokens_per_minute: b.tokens_per_minute,
                tokens_per_window: crate::limiter::learn::tokens_per_window(
                    b.tokens_per_minute,
                    provider.config.window,
                )
                .unwrap_or(0),
            });
        }
    }
}

/// Applies the shared budget's values for provider `index` here: a change made at
/// another replica (or the budget's record, which wins over this replica's file).
pub fn apply_cluster(
    app: &App,
    index: usize,
    rate_rpm: f64,
    bucket_capacity: u32,
    fallback: bool,
    tokens_per_minute: Option<u64>,
) {
    let names = app.provider_names();
    let Ok((old, new)) = app.hot.update(
        |old| -> Result<Hot, std::convert::Infallible> {
            let mut new = old.clone();
            new.providers[index].rate_rpm = rate_rpm;
            new.providers[index].bucket_capacity = bucket_capacity;
            new.fallback_enabled_passthrough = fallback;
            if let Some(t) = tokens_per_minute {
                new.providers[index].tokens_per_minute = t;
            }
            Ok(new)
        },
        |old, new| apply(app, old, new),
    );
    let changes = patch::diff(&old, &new, &names);
    if !changes.is_empty() {
        app.admin_changes.applied.fetch_add(1, Ordering::Relaxed);
        audit("-", "cluster", &changes, new.version);
    }
}

/// Pushes a new value into the running parts, each changed field as its row says.
/// Called under the writer lock, before the value becomes current.
pub(super) fn apply(app: &App, old: &Hot, new: &Hot) {
    let now = app.clock.now_nanos();
    for ((provider, a), b) in app.providers.iter().zip(&old.providers).zip(&new.providers) {
        if a.differs(b, Applies::Limiter) {
            let change = provider
                .limiter
                .set_rate(b.rate_rpm, b.bucket_capacity, now);
            if let Some(c) = change {
                tracing::warn!(
                    provider = &*provider.name,
                    from = c.from,
                    to = c.to,
                    source = c.source.as_str(),
                    why = %c.why,
                    "learned limit change"
                );
            }
        }
        if a.differs(b, Applies::QueueBound) {
            provider.limiter.set_queue_max(b.queue_max_size);
        }
        if a.differs(b, Applies::TokenBudget) {
            set_tokens(provider, b.tokens_per_minute);
        }
    }
    if old.differs(new, Applies::LogFilter) {
        if let Some(handle) = app.log_level.get() {
            if let Err(e) = crate::logging::set_level(handle, new.log_level) {
                tracing::error!(error = %e, "cannot change the log level");
            }
        }
    }
}

/// A new `tokens_per_minute` into the provider's token budget; 0 lifts the limit. A
/// provider started without a budget gets none at run time (the request path would
/// have to start estimating): that takes a restart, and says so.
fn set_tokens(provider: &crate::app::Provider, tokens_per_minute: u64) {
    if provider.limiter.token_budget().is_none() {
        if tokens_per_minute > 0 {
            tracing::warn!(
                provider = &*provider.name,
                tokens_per_minute,
                "tokens_per_minute set at run time on a provider started without it: \
                 it takes effect at the next restart"
            );
        }
        return;
    }
    let per_window =
        crate::limiter::learn::tokens_per_window(tokens_per_minute, provider.config.window)
            .unwrap_or(u64::MAX / 4);
    provider.limiter.set_token_limit(per_window);
}

/// Writes an applied change to the audit log.
pub(super) fn audit(remote: &str, source: &str, changes: &[Change], version: u64) {
    let fields: Vec<String> = changes
        .iter()
        .map(|c| format!("{}: {} -> {}", c.field, c.old, c.new))
        .collect();
    tracing::info!(
        target: crate::logging::AUDIT_TARGET,
        remote,
        source,
        version,
        changes = %fields.join("; "),
        "configuration changed"
    );
}

/// Why a reload left the configuration as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "the providers changed (running: {}; file: {}); adding, removing or renaming providers needs a restart",
        .running.join(", "),
        .file.join(", ")
    )]
    Providers {
        /// The running providers, in order.
        running: Vec<String>,
        /// The providers of the loaded configuration, in order.
        file: Vec<String>,
    },
}

/// Applies the run-time fields of a freshly loaded configuration (SIGHUP). Settings
/// that need a restart and differ are named in the log and left alone.
pub fn reload(app: &App, config: &Config) -> Result<Vec<Change>, ReloadError> {
    let names = app.provider_names();
    let new_names: Vec<&str> = config.providers.iter().map(|p| p.name.as_str()).collect();
    if names != new_names {
        return Err(ReloadError::Providers {
            running: names.iter().map(|n| n.to_string()).collect(),
            file: new_names.iter().map(|n| n.to_string()).collect(),
        });
    }
    let restart = needs_restart(&app.config, config);
    if !restart.is_empty() {
        tracing::warn!(settings = %restart.join(", "), "reload: these settings change only on restart; kept as they are");
    }
    let fresh = Hot::of(config);
    let current = app.hot.get();
    if (Hot {
        version: current.version,
        ..fresh.clone()
    }) == *current
    {
        tracing::info!(
            version = current.version,
            "reload: the run-time settings are unchanged"
        );
        return Ok(Vec::new());
    }
    let (old, new) = app.hot.update(
        |old| -> Result<Hot, ReloadError> {
            Ok(Hot {
                version: old.version,
                ..fresh
            })
        },
        |old, new| apply(app, old, new),
    )?;
    publish(app, &old, &new);
    let changes = patch::diff(&old, &new, &names);
    app.admin_changes.applied.fetch_add(1, Ordering::Relaxed);
    audit("-", "sighup", &changes, new.version);
    Ok(changes)
}
