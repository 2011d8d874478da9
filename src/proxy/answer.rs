//! The `on_upstream_answer` phase: what each upstream answer teaches the limiter.
//!
//! A limited request's answer goes to the limiter that granted it (with when it was
//! sent and how many were in its window): a 429 proves the window's count was over
//! the provider's limit, a success that it was not, and the quota headers say what the
//! provider counts. When limits are per model, the key counts the answer and takes its
//! quota headers, and the model's limiter learns from it. A passthrough answer is
//! counted but teaches nothing about the paced limit.

use std::pin::Pin;
use std::time::SystemTime;

use bytes::Bytes;
use http::response::Parts;
use http::StatusCode;
use http_body_util::BodyExt;
use tokio::time::Sleep;

use crate::app::Provider;
use crate::limiter::signal::{self, Dialect};
use crate::limiter::{Answer, Limiter, Permit, Quota, Refusal};
use crate::metrics::ErrorKind;
use crate::record::Record;
use crate::stats::ProviderStats;
use crate::upstream::RespBody;

/// Most bytes of a 429's body read to classify it (the rest streams to the client).
pub const REFUSAL_PREFIX: usize = 4096;

/// Records the answer `head` (and the start of its body, `prefix`) to a request sent on
/// the claims `key` (and `model`, when limits are per model), at clock time `now`, that
/// reserved `tokens` (its estimate, when its provider has a token budget). Returns
/// whether it is a 429 that waiting could cure (not a billing refusal, not a request too
/// large ever to fit), so the request may be parked again and re-sent.
#[allow(clippy::too_many_arguments)]
pub fn on_upstream_answer(
    provider: &Provider,
    scope: Option<&Limiter>,
    (key, model): (Option<Permit<'_>>, Option<Permit<'_>>),
    tokens: Option<u64>,
    head: &Parts,
    prefix: &[u8],
    record: &mut Record,
    now: u64,
) -> bool {
    let limiter = &provider.limiter;
    let status = head.status;
    if status.is_server_error() {
        record.error = Some(ErrorKind::Status5xx);
    }
    let refused = status == StatusCode::TOO_MANY_REQUESTS;
    let Some(sent) = key else {
        // Passthrough: counted, teaches nothing about the paced limit.
        limiter.answers.on_response(now);
        if refused {
            limiter.answers.on_429(now);
            ProviderStats::inc(&provider.stats.upstream_429);
        }
        return false;
    };
    let (sent_at, sent_count) = (sent.sent_at().unwrap_or(now), sent.count());
    drop(sent);
    let answer = read_answer(head, prefix, provider.config.rate_limit_headers);
    match (model, scope) {
        (Some(m), Some(model)) => {
            limiter.observe(now, &answer);
            // The request quota is the key's; a token quota is the model's, whose
            // budget the request was charged to.
            let own = Answer {
                quota: answer.quota.and_then(|q| q.tokens).map(|t| Quota {
                    tokens: Some(t),
                    ..Quota::default()
                }),
                ..answer
            };
            model.observe(now, &own);
            model.learn_costed(now, sent_at, m.count(), tokens, &own);
            hint_token_setting(provider, model);
        }
        _ => limiter.on_answer_with_tokens(now, sent_at, sent_count, tokens, &answer),
    }
    hint_token_setting(provider, limiter);
    if !refused {
        return false;
    }
    ProviderStats::inc(&provider.stats.upstream_429);
    answer.refusal != Some(Refusal::Billing) && !answer.token_refusal.is_some_and(|t| t.too_large)
}

/// The provider showed a token limit (headers, a 429 about tokens) while no token
/// budget is set: said once, with the setting that paces it.
fn hint_token_setting(provider: &Provider, limiter: &Limiter) {
    let signals = limiter.token_signals();
    if signals.seen() && signals.take_first() {
        tracing::warn!(
            provider = &*provider.name,
            "the provider limits tokens per minute (its rate-limit headers or a 429 say so), \
             and tokens_per_minute is not set: requests are paced, tokens are not, so its \
             token limit may still answer 429; set tokens_per_minute (SIDECAR_TOKENS_PER_MINUTE) \
             for this provider"
        );
    }
}

/// What an upstream answer says about the provider's limits.
fn read_answer(head: &Parts, prefix: &[u8], dialect: Dialect) -> Answer {
    let refusal = signal::classify(head.status, &head.headers, prefix);
    Answer {
        ok: head.status.is_success(),
        refusal,
        // Read only where it applies (a refusal): it may need the wall clock.
        retry_after: refusal.and_then(|_| signal::retry_after(&head.headers, SystemTime::now())),
        quota: signal::quota(&head.headers, dialect),
        token_refusal: signal::token_refusal(refusal, prefix),
    }
}

/// Reads the first frames of `body`, up to about `max` bytes, before `timer` fires. What
/// is read is sent to the client first (`UpstreamBody::with_prefix`).
pub async fn read_prefix(body: &mut RespBody, max: usize, mut timer: Pin<&mut Sleep>) -> Bytes {
    let mut out = bytes::BytesMut::new();
    while out.len() < max && !http_body::Body::is_end_stream(body) {
        let frame = tokio::select! {
            biased;
            f = body.frame() => f,
            _ = &mut timer => break,
        };
        match frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    out.extend_from_slice(d);
                }
            }
            // An error or the end: what was read is all there is; the rest of the
            // stream reports its own end.
            _ => break,
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::App;
    use crate::config::testing::config;
    use crate::limiter::Decision;
    use crate::priority::Priority;
    use http::{HeaderValue, Method};
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    fn app() -> Arc<App> {
        App::new(config("", &[("SIDECAR_RATE_RPM", "600")]))
    }

    fn answer(status: u16) -> Parts {
        http::Response::builder()
            .status(status)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    fn record() -> Record {
        Record::new(
            HeaderValue::from_static("id"),
            Method::POST,
            http::Uri::from_static("/v1/x"),
        )
    }

    /// Sends one limited request's claim and hands it `status` with body `prefix`.
    fn limited(app: &App, status: u16, prefix: &[u8]) -> (bool, Record) {
        let p = &app.providers[0];
        let now = app.clock.now_nanos();
        let Decision::Admitted(claim) = p.limiter.admit(Priority::Normal, None, now) else {
            panic!("a token is free");
        };
        let mut permit = Permit::new(&p.limiter, claim);
        permit.stamp(now);
        let mut rec = record();
        let retry = on_upstream_answer(
            p,
            None,
            (Some(permit), None),
            None,
            &answer(status),
            prefix,
            &mut rec,
            now,
        );
        (retry, rec)
    }

    #[test]
    fn a_rate_429_may_be_retried_and_a_billing_one_may_not() {
        // A fresh provider each: a 429 pauses admission.
        let counted = |app: &App| app.providers[0].stats.upstream_429.load(Ordering::Relaxed);
        let ok = app();
        assert!(!limited(&ok, 200, b"").0, "a success is not retried");
        assert_eq!(counted(&ok), 0);
        let rate = app();
        assert!(limited(&rate, 429, br#"{"error":"rate limit"}"#).0);
        assert_eq!(counted(&rate), 1);
        let billing = app();
        let (retry, _) = limited(&billing, 429, br#"{"error":{"code":"insufficient_quota"}}"#);
        assert!(!retry, "waiting does not cure a billing refusal");
        assert_eq!(counted(&billing), 1);
    }

    #[test]
    fn a_server_error_is_marked_on_the_record() {
        let app = app();
        let (retry, rec) = limited(&app, 503, b"");
        assert!(!retry);
        assert_eq!(rec.error, Some(ErrorKind::Status5xx));
    }

    #[test]
    fn a_passthrough_429_is_counted_but_never_retried() {
        let app = app();
        let p = &app.providers[0];
        let mut rec = record();
        let now = app.clock.now_nanos();
        let retry = on_upstream_answer(
            p,
            None,
            (None, None),
            None,
            &answer(429),
            b"",
            &mut rec,
            now,
        );
        assert!(!retry);
        assert_eq!(p.stats.upstream_429.load(Ordering::Relaxed), 1);
    }
}
