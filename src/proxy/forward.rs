//! The `forward` phase: send the request upstream, and absorb what waiting can cure.
//!
//! Each attempt is stamped in the provider's window at the moment it goes out (a send
//! with the provider's key counts whether or not it is answered). A limited request the
//! upstream answers 429 is parked again at the head of its priority and re-sent after
//! the pause, while `upstream_429_retries` and its deadline allow; the answer of every
//! attempt goes to `answer::on_upstream_answer` first. A request granted too close to
//! its deadline is not sent: it could not be answered in time, and a send the deadline
//! cuts off may or may not have reached the provider, which would make the window's
//! count (and what is learned from it) wrong.

use std::borrow::Cow;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderValue;
use http::StatusCode;
use tokio::time::{Instant, Sleep};

use super::admit::{self, round_ms, Admitted, MIN_TIME_TO_SEND};
use super::answer::{on_upstream_answer, read_prefix, REFUSAL_PREFIX};
use super::ctx::Ctx;
use super::outgoing::Outgoing;
use super::route::Routed;
use super::tokens::Priced;
use crate::app::Provider;
use crate::config::UpstreamUrl;
use crate::error::ProxyError;
use crate::hot::Hot;
use crate::limiter::Settlement;
use crate::metrics::Lane;
use crate::record::Record;
use crate::stats::ProviderStats;
use crate::upstream::{RequestHead, RespBody, SendError};

/// The request's deadline, and the one timer that fires at it.
pub struct Deadline<'t> {
    pub at: Instant,
    pub timer: Pin<&'t mut Sleep>,
}

/// The upstream's answer, as it came.
pub struct Forwarded {
    pub head: http::response::Parts,
    pub body: RespBody,
    /// The start of a 429's body, read to classify it.
    pub prefix: Bytes,
    /// When the last attempt was sent.
    pub sent_at: Instant,
    /// The answered attempt's token reservation, to settle when the body ends (boxed:
    /// one word when there is none).
    pub tokens: Option<Box<Settlement>>,
    /// The answered attempt asked for the stream's usage chunk on the client's behalf.
    pub asked_usage: bool,
}

/// The request as sent: as the client wrote it, and (`request_usage`) with the stream's
/// usage chunk asked for, which goes first. A model that answers 400 to the latter is
/// remembered, and the request is sent again as the client wrote it.
#[derive(Clone, Copy)]
pub struct Bodies<'o, 'r> {
    pub plain: &'o Outgoing<'r>,
    pub asked: Option<&'o Outgoing<'r>>,
}

/// Sends `out` to `routed.provider` on the claims `admitted` holds (and the token
/// reservation of `cost`, when its provider has a token budget), until an answer that
/// is not retried.
#[allow(clippy::too_many_arguments)]
pub async fn forward<'a>(
    ctx: &Ctx<'_>,
    hot: &Hot,
    bodies: Bodies<'_, '_>,
    routed: &'a Routed<'a>,
    cost: Option<&Priced>,
    admitted: &mut Admitted<'a>,
    record: &mut Record,
    deadline: &mut Deadline<'_>,
) -> Result<Forwarded, ProxyError> {
    let app = ctx.app;
    let provider = routed.provider;
    let scope = routed.scope.as_deref();
    let rest = &bodies.plain.parts.uri.path()["/v1/".len()..];
    let mut asking = bodies.asked;
    loop {
        let out = asking.unwrap_or(bodies.plain);
        let target = match admitted.route {
            Lane::Passthrough => provider
                .config
                .fallback
                .as_ref()
                .unwrap_or(&provider.config.upstream),
            _ => &provider.config.upstream,
        };
        let may_retry =
            admitted.route == Lane::Limited && record.retries < app.config.upstream_429_retries;
        let (path, host) = addressed(out.parts, rest, provider, target)?;
        let (set, n) = out.rules.set();
        let request = RequestHead {
            method: &out.parts.method,
            target: &path,
            host: &host,
            headers: &out.parts.headers,
            skip: &|name| out.rules.skip(name),
            set: &set[..n],
        };
        let sent_at = Instant::now();
        if deadline.at.saturating_duration_since(sent_at) < MIN_TIME_TO_SEND {
            let now = app.clock.now_nanos();
            for p in [admitted.key.take(), admitted.model.take()]
                .into_iter()
                .flatten()
            {
                p.give_back(now);
            }
            ProviderStats::inc(&provider.stats.dropped_timeout);
            return Err(ProxyError::QueueTimeout {
                provider: provider.name.to_string(),
                waited: round_ms(record.queue_wait),
            });
        }
        stamp(provider, target, admitted, app.clock.now_nanos());
        let result = tokio::select! {
            biased;
            r = ctx.pool.send(target, &request, out.body) => r,
            _ = deadline.timer.as_mut() => return Err(ProxyError::UpstreamTimeout {
                provider: provider.name.to_string(),
                timeout: hot.request_timeout,
            }),
            _ = app.shutdown.hard_stop.cancelled() => return Err(ProxyError::ShuttingDown),
        };
        let resp = result.map_err(|e| {
            let provider = provider.name.to_string();
            match e {
                SendError::Connect(source) => ProxyError::UpstreamConnect { provider, source },
                SendError::Request(source) => ProxyError::UpstreamFailed { provider, source },
            }
        })?;
        let (head, mut body) = resp.into_parts();
        // A 429's body says which limit it is (rate, tokens, a model's concurrency).
        let prefix = if head.status == StatusCode::TOO_MANY_REQUESTS {
            read_prefix(&mut body, REFUSAL_PREFIX, deadline.timer.as_mut()).await
        } else {
            Bytes::new()
        };
        // The reservation rides in whichever claim's limiter holds the budget (none
        // without a token cost: nothing to look for).
        let (tokens, owner) = match cost {
            None => (None, None),
            Some(_) => match admitted.model.as_mut().and_then(|p| p.take_tokens()) {
                Some(r) => (Some(r), routed.scope.as_ref()),
                None => (
                    admitted.key.as_mut().and_then(|p| p.take_tokens()),
                    Some(&provider.limiter),
                ),
            },
        };
        let reserved = tokens.as_ref().map(|r| r.cost().total());
        let claims = (admitted.key.take(), admitted.model.take());
        let now = app.clock.now_nanos();
        let retryable = on_upstream_answer(
            provider, scope, claims, reserved, &head, &prefix, record, now,
        );
        let refused_usage = asking.is_some() && head.status == StatusCode::BAD_REQUEST;
        if refused_usage {
            // The model refuses `stream_options`, as some do: remembered, and the
            // request goes again as the client wrote it.
            if let Some(p) = cost {
                provider.remember_usage_refused(&p.model);
                tracing::info!(
                    provider = &*provider.name,
                    model = %p.model,
                    "the model refused stream_options.include_usage: its streams settle at their estimate"
                );
            }
            asking = None;
        } else if retryable && may_retry && Instant::now() < deadline.at {
            record.retries += 1;
            ProviderStats::inc(&provider.stats.retries);
        } else {
            return Ok(Forwarded {
                head,
                body,
                prefix,
                sent_at,
                tokens: tokens
                    .zip(owner)
                    .and_then(|(r, l)| r.detach(Arc::clone(l)))
                    .map(Box::new),
                asked_usage: asking.is_some(),
            });
        }
        // Sent again. The refused attempt keeps its place in the window and its
        // estimate (dropped unsettled): the provider may have counted it.
        drop((head, body, tokens));
        if refused_usage && admitted.route == Lane::Passthrough {
            // Unmetered: sent again at once.
            continue;
        }
        *admitted = Box::pin(admit::readmit(
            app,
            hot,
            provider,
            scope,
            cost,
            record,
            deadline.at,
        ))
        .await?;
        record.route = admitted.route;
    }
}

/// Every send with the provider's key is counted in its window, stamped `now`.
fn stamp(provider: &Provider, target: &UpstreamUrl, admitted: &mut Admitted<'_>, now: u64) {
    match admitted.key.as_mut() {
        Some(p) => p.stamp(now),
        None if std::ptr::eq(target, &provider.config.upstream) => {
            provider.limiter.record_forced_send(now)
        }
        None => {}
    }
    if let Some(p) = admitted.model.as_mut() {
        p.stamp(now);
    }
}

/// Where one attempt goes: the origin-form target under the upstream's base path, and
/// its `Host`. The client's own path is used as it is when the upstream's base is
/// `/v1` (nothing is built); the provider's `Host` is prepared once.
fn addressed<'a>(
    parts: &'a http::request::Parts,
    rest: &str,
    provider: &'a Provider,
    upstream: &UpstreamUrl,
) -> Result<(Cow<'a, str>, Cow<'a, HeaderValue>), ProxyError> {
    let path = match parts.uri.path_and_query() {
        Some(pq) if upstream.base_path == "/v1" && parts.uri.authority().is_none() => {
            Cow::Borrowed(pq.as_str())
        }
        _ => {
            let path = upstream.path_for(rest, parts.uri.query());
            http::uri::PathAndQuery::try_from(path.as_str()).map_err(|e| {
                ProxyError::BadRequest {
                    reason: format!("request path cannot be forwarded: {e}"),
                }
            })?;
            Cow::Owned(path)
        }
    };
    let host = if std::ptr::eq(upstream, &provider.config.upstream) {
        Cow::Borrowed(&provider.host_header)
    } else {
        Cow::Owned(
            HeaderValue::from_str(upstream.authority.as_str()).map_err(|e| {
                ProxyError::BadRequest {
                    reason: format!("upstream authority: {e}"),
                }
            })?,
        )
    };
    Ok((path, host))
}
