//! The admission phase: the one place a request is let through to its provider.
//!
//! Fast path: nobody waits and a token is free → go. Otherwise the request is parked
//! in its priority queue and waits for the dispatcher's grant, bounded by the request
//! timeout (504) and, for low priority, by `low_priority_timeout` (503, or the
//! passthrough route when fallback is on). A full queue answers 429 with
//! `Retry-After`, or takes the passthrough route when fallback is on. A client that
//! leaves while parked drops its ticket: the slot frees at once and no token is spent.

use std::time::Duration;

use tokio::time::Instant;

use crate::app::{App, Provider};
use crate::error::ProxyError;
use crate::hot::Hot;
use crate::limiter::{Decision, Ticket};
use crate::priority::Priority;
use crate::record::{Record, Route};
use crate::stats::ProviderStats;

/// How a parked request's wait ended, when it did not fail.
enum Waited {
    Granted,
    /// A low-priority request's deadline passed (the caller picks 503 or passthrough).
    LowPriorityDeadline,
}

/// Decides the route of a new request.
pub async fn admit(
    app: &App,
    hot: &Hot,
    provider: &Provider,
    record: &mut Record,
    deadline: Instant,
) -> Result<Route, ProxyError> {
    ProviderStats::inc(&provider.stats.total);
    let now = app.clock.now_nanos();
    let ticket = match provider.limiter.admit(record.priority, now) {
        Decision::Admitted => return Ok(limited(provider)),
        Decision::Full(full) => {
            ProviderStats::inc(&provider.stats.queue_full);
            if hot.fallback_enabled_passthrough {
                return Ok(passthrough(provider));
            }
            ProviderStats::inc(&provider.stats.rate_limited);
            return Err(ProxyError::QueueFull {
                provider: provider.name.to_string(),
                ahead: full.ahead,
                retry_after: provider.limiter.retry_after(full.ahead, now),
            });
        }
        Decision::Queued(t) => t,
    };
    // Boxed: only parked requests pay for the waiting future's size.
    match Box::pin(wait(app, hot, provider, ticket, record, deadline)).await? {
        Waited::Granted => Ok(limited(provider)),
        Waited::LowPriorityDeadline => Ok(passthrough(provider)),
    }
}

/// Parks a request the upstream answered 429 at the head of its priority and waits.
pub async fn readmit(
    app: &App,
    hot: &Hot,
    provider: &Provider,
    record: &mut Record,
    deadline: Instant,
) -> Result<Route, ProxyError> {
    let ticket = match provider.limiter.requeue(record.priority) {
        Ok(t) => t,
        Err(full) => {
            ProviderStats::inc(&provider.stats.queue_full);
            ProviderStats::inc(&provider.stats.rate_limited);
            return Err(ProxyError::QueueFull {
                provider: provider.name.to_string(),
                ahead: full.ahead,
                retry_after: provider
                    .limiter
                    .retry_after(full.ahead, app.clock.now_nanos()),
            });
        }
    };
    match Box::pin(wait(app, hot, provider, ticket, record, deadline)).await? {
        Waited::Granted => Ok(Route::Limited),
        Waited::LowPriorityDeadline => Ok(passthrough(provider)),
    }
}

fn limited(provider: &Provider) -> Route {
    ProviderStats::inc(&provider.stats.limited);
    Route::Limited
}

fn passthrough(provider: &Provider) -> Route {
    ProviderStats::inc(&provider.stats.passthrough);
    Route::Passthrough
}

/// Waits for the grant; adds the time waited to `record.queue_wait`.
async fn wait(
    app: &App,
    hot: &Hot,
    provider: &Provider,
    mut ticket: Ticket,
    record: &mut Record,
    deadline: Instant,
) -> Result<Waited, ProxyError> {
    let started = Instant::now();
    let low_deadline = (record.priority == Priority::Low)
        .then(|| started + hot.providers[provider.index].low_priority_timeout)
        .filter(|d| *d < deadline);
    let until = low_deadline.unwrap_or(deadline);
    let outcome = tokio::select! {
        () = &mut ticket => Ok(Waited::Granted),
        () = tokio::time::sleep_until(until) => {
            if ticket.cancel() {
                Err(until)
            } else {
                Ok(Waited::Granted) // the grant won the race with the deadline
            }
        }
        () = app.shutdown.hard_stop.cancelled() => {
            drop(ticket);
            return Err(ProxyError::ShuttingDown);
        }
    };
    let waited = started.elapsed();
    record.queue_wait += waited;
    match outcome {
        Ok(w) => Ok(w),
        Err(_) if low_deadline.is_some() => {
            ProviderStats::inc(&provider.stats.dropped_low_priority);
            if hot.fallback_enabled_passthrough {
                Ok(Waited::LowPriorityDeadline)
            } else {
                Err(ProxyError::LowPriorityDropped {
                    provider: provider.name.to_string(),
                    waited: round_ms(waited),
                })
            }
        }
        Err(_) => {
            ProviderStats::inc(&provider.stats.dropped_timeout);
            Err(ProxyError::QueueTimeout {
                provider: provider.name.to_string(),
                waited: round_ms(waited),
            })
        }
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
