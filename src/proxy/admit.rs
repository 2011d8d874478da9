//! The admission phase: the one place a request is let through to its provider.
//!
//! Fast path: nobody waits and a token is free → go. Otherwise the request is parked
//! in its priority queue and waits for the dispatcher's grant, bounded by the request
//! timeout (504) and, for low priority, by `low_priority_timeout` (503, or the
//! passthrough route when fallback is on). A full queue answers 429 with
//! `Retry-After`, or takes the passthrough route when fallback is on. So does a request
//! that the queue ahead of it, drained at the rate paced now (the learned limit, not the
//! configured one), could not serve before its deadline: it is refused at once with an
//! honest `Retry-After` instead of waiting for a 504. A request whose token estimate is
//! larger than the whole token budget of a window is refused (413) at admission, or
//! while parked if the limit falls below it. A client that leaves while parked drops its
//! ticket: the slot frees at once and no token is spent.

use std::time::Duration;

use tokio::time::Instant;

use super::tokens::Priced;
use crate::app::{App, Provider};
use crate::error::ProxyError;
use crate::hot::Hot;
use crate::limiter::{Cost, Decision, DropReason, Grant, Limiter, Permit, Ticket, TooLarge};
use crate::metrics::Lane;
use crate::priority::Priority;
use crate::record::Record;
use crate::stats::ProviderStats;

/// `Retry-After` of a request refused because the shared budget is out of reach.
const BUDGET_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Least time left before its deadline for a request to be sent upstream.
pub(super) const MIN_TIME_TO_SEND: Duration = Duration::from_millis(50);

/// The route a request takes, with the window claims of a limited one: the key's, and
/// the model's when limits are per model. Dropped unsent, they are released.
#[derive(Debug)]
pub struct Admitted<'a> {
    pub route: Lane,
    pub key: Option<Permit<'a>>,
    pub model: Option<Permit<'a>>,
}

/// How a parked request's wait ended, when it did not fail.
enum Waited {
    Granted(Grant),
    /// The token limit fell below the request's cost while it waited.
    TooLarge(TooLarge),
    /// A low-priority request's deadline passed (the caller picks 503 or passthrough).
    LowPriorityDeadline,
}

/// How one limiter let a request through.
enum Stage {
    Claim(Grant),
    Passthrough,
}

/// Decides the route of a new request: through its model's limiter first (`scope`,
/// when limits are per model), then the key's. A request `priced` reserves its token
/// estimate in the limiter whose budget it counts in.
pub async fn admit<'a>(
    app: &App,
    hot: &Hot,
    provider: &'a Provider,
    scope: Option<&'a Limiter>,
    priced: Option<&Priced>,
    record: &mut Record,
    deadline: Instant,
) -> Result<Admitted<'a>, ProxyError> {
    ProviderStats::inc(&provider.stats.total);
    through(app, hot, provider, scope, priced, record, deadline, false).await
}

/// Parks a request the upstream answered 429 at the head of its priority and waits.
pub async fn readmit<'a>(
    app: &App,
    hot: &Hot,
    provider: &'a Provider,
    scope: Option<&'a Limiter>,
    priced: Option<&Priced>,
    record: &mut Record,
    deadline: Instant,
) -> Result<Admitted<'a>, ProxyError> {
    through(app, hot, provider, scope, priced, record, deadline, true).await
}

#[allow(clippy::too_many_arguments)]
async fn through<'a>(
    app: &App,
    hot: &Hot,
    provider: &'a Provider,
    scope: Option<&'a Limiter>,
    priced: Option<&Priced>,
    record: &mut Record,
    deadline: Instant,
    retry: bool,
) -> Result<Admitted<'a>, ProxyError> {
    let mut requeue = retry;
    let on_model = priced.is_some_and(|p| p.on_model);
    let cost = priced.map(|p| p.cost);
    let (model_cost, key_cost) = if on_model { (cost, None) } else { (None, cost) };
    loop {
        let model = match scope {
            Some(m) => {
                match stage(app, hot, provider, m, model_cost, record, deadline, requeue).await? {
                    Stage::Claim(c) => Some(Permit::new(m, c)),
                    Stage::Passthrough => return Ok(passthrough(provider)),
                }
            }
            None => None,
        };
        let key = &provider.limiter;
        let claim =
            match stage(app, hot, provider, key, key_cost, record, deadline, requeue).await? {
                Stage::Claim(c) => Permit::new(key, c),
                Stage::Passthrough => return Ok(passthrough(provider)),
            };
        // While this request waited for the key, a 429 may have taught its model a lower
        // limit: a model claim granted under the old one would be sent into a window
        // now known to be full. It goes back to the head of its model's queue instead
        // (dropping both claims releases them).
        if scope.is_some_and(|m| m.over_limit(app.clock.now_nanos())) {
            requeue = true;
            continue;
        }
        if !retry {
            ProviderStats::inc(&provider.stats.limited);
        }
        return Ok(Admitted {
            route: Lane::Limited,
            key: Some(claim),
            model,
        });
    }
}

/// One limiter's admission (with the token `cost` its budget reserves, if any): the
/// fast path, or a parked wait.
#[allow(clippy::too_many_arguments)]
async fn stage(
    app: &App,
    hot: &Hot,
    provider: &Provider,
    limiter: &Limiter,
    cost: Option<Cost>,
    record: &mut Record,
    deadline: Instant,
    retry: bool,
) -> Result<Stage, ProxyError> {
    let now = app.clock.now_nanos();
    let parked = if retry {
        limiter.requeue(record.priority, cost, now)
    } else {
        match limiter.admit(record.priority, cost, now) {
            Decision::Admitted(claim) => return Ok(Stage::Claim(claim)),
            Decision::Queued(t) => Ok(t),
            Decision::Full(full) => Err(full),
            Decision::Isolated => {
                ProviderStats::inc(&provider.stats.rate_limited);
                return Err(ProxyError::BudgetUnavailable {
                    provider: provider.name.to_string(),
                    retry_after: BUDGET_RETRY_AFTER,
                });
            }
            Decision::TooLarge { limit, estimate } => {
                return Err(too_large(provider, limiter, TooLarge { limit, estimate }));
            }
        }
    };
    let mut ticket = match parked {
        Ok(t) => t,
        Err(full) => {
            // The tokens ahead of it, with its own.
            let tokens = full.tokens.saturating_add(cost.map_or(0, |c| c.total()));
            return overflow(hot, provider, || ProxyError::QueueFull {
                provider: provider.name.to_string(),
                ahead: full.ahead,
                retry_after: limiter.retry_after(full.ahead, tokens, now),
            });
        }
    };
    if let Some(decided) = beyond_deadline(
        hot,
        provider,
        limiter,
        cost,
        record,
        &mut ticket,
        deadline,
        now,
    ) {
        return decided;
    }
    // Boxed: only parked requests pay for the waiting future's size.
    match Box::pin(wait(app, hot, provider, ticket, record, deadline)).await? {
        Waited::Granted(claim) => Ok(Stage::Claim(claim)),
        Waited::TooLarge(t) => Err(too_large(provider, limiter, t)),
        Waited::LowPriorityDeadline => Ok(Stage::Passthrough),
    }
}

/// Larger than a whole window's token budget (at admission, or the limit fell below it
/// while it waited): waiting cannot cure it.
fn too_large(provider: &Provider, limiter: &Limiter, t: TooLarge) -> ProxyError {
    provider.stats.refuse_tokens_too_large();
    ProxyError::TokensTooLarge {
        provider: provider.name.to_string(),
        limit: t.limit,
        estimate: t.estimate,
        window: limiter.pacing().window,
    }
}

/// A parked request the queue ahead of it could not serve before its deadline, at the
/// rate paced now: refused at once (or sent through when fallback is on). `None`: it
/// may wait.
#[allow(clippy::too_many_arguments)]
fn beyond_deadline(
    hot: &Hot,
    provider: &Provider,
    limiter: &Limiter,
    cost: Option<Cost>,
    record: &Record,
    ticket: &mut Ticket,
    deadline: Instant,
    now: u64,
) -> Option<Result<Stage, ProxyError>> {
    let ahead = limiter.queues.ahead_of(record.priority).saturating_sub(1);
    // Requests, or the tokens ahead with its own (it is parked: they count it), or its
    // own cost's wait, whichever frees later.
    let tokens = limiter.queues.cost_ahead_of(record.priority);
    let expected = limiter
        .expected_wait(ahead, tokens, now)
        .max(limiter.token_wait(cost, now));
    // Time to send it must be left (a request granted later is not sent).
    let mut budget = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(MIN_TIME_TO_SEND);
    if record.priority == Priority::Low {
        budget = budget.min(hot.providers[provider.index].low_priority_timeout);
    }
    if expected <= budget {
        return None;
    }
    if !ticket.cancel(DropReason::BeyondDeadline) {
        // Answered meanwhile: granted, it goes; refused, the 413.
        return ticket.answer().map(|a| match a {
            Ok(claim) => Ok(Stage::Claim(claim)),
            Err(t) => Err(too_large(provider, limiter, t)),
        });
    }
    Some(overflow(hot, provider, || {
        ProxyError::QueueBeyondDeadline {
            provider: provider.name.to_string(),
            ahead,
            wait: round_ms(expected),
            budget: round_ms(budget),
            retry_after: expected,
        }
    }))
}

/// The queue cannot take (or keep) the request: the passthrough route when fallback is
/// on, else the refusal.
fn overflow(
    hot: &Hot,
    provider: &Provider,
    refusal: impl FnOnce() -> ProxyError,
) -> Result<Stage, ProxyError> {
    ProviderStats::inc(&provider.stats.queue_full);
    if hot.fallback_enabled_passthrough {
        return Ok(Stage::Passthrough);
    }
    ProviderStats::inc(&provider.stats.rate_limited);
    Err(refusal())
}

fn passthrough(provider: &Provider) -> Admitted<'static> {
    ProviderStats::inc(&provider.stats.passthrough);
    Admitted {
        route: Lane::Passthrough,
        key: None,
        model: None,
    }
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
    let why = if low_deadline.is_some() {
        DropReason::LowPriorityDeadline
    } else {
        DropReason::Timeout
    };
    let outcome = tokio::select! {
        answer = &mut ticket => Ok(Waited::from(answer)),
        () = tokio::time::sleep_until(until) => {
            if ticket.cancel(why) {
                Err(until)
            } else {
                // The dispatcher's answer won the race with the deadline.
                ticket.answer().map(Waited::from).ok_or(until)
            }
        }
        () = app.shutdown.hard_stop.cancelled() => {
            ticket.abandon(DropReason::Shutdown);
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

impl From<Result<Grant, TooLarge>> for Waited {
    fn from(answer: Result<Grant, TooLarge>) -> Self {
        match answer {
            Ok(claim) => Self::Granted(claim),
            Err(t) => Self::TooLarge(t),
        }
    }
}

/// `d` in whole milliseconds, as error messages show it.
pub(super) fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
