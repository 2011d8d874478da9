//! The request path of `/v1/*`, as phases, each a function of its own file:
//!
//! 1. `request`: framing, method, header limits, priority (`check`), and the body,
//!    read once (`read_body`);
//! 2. `route`: the provider (and the model's limiter) the request goes to;
//! 3. `admit`: the one place a request is let through (token, queue, passthrough);
//! 4. `forward`: the send, and the 429s waiting can cure (parked again, re-sent);
//! 5. `answer`: what each upstream answer teaches the limiter (`on_upstream_answer`);
//! 6. `respond`: the upstream's answer streamed to the client (`stream`);
//! 7. `local`: the record of a request the sidecar answers itself.
//!
//! A [`Record`] is filled in along the way and finished exactly once: by the response
//! body when the upstream answered, by [`local::local_error`] otherwise. Every accepted
//! request gets exactly one answer: the upstream's response streamed through, or one of
//! the sidecar's OpenAI-shaped errors ([`ProxyError`](crate::error::ProxyError)).

mod admit;
mod answer;
mod ctx;
mod forward;
pub mod headers;
mod local;
pub mod outgoing;
mod request;
mod respond;
mod route;
mod stream;
mod tokens;

pub use ctx::Ctx;
pub use stream::UpstreamBody;

use crate::server::RequestBody;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderValue, Response};

use crate::body::ProxyBody;
use crate::record::Record;
use forward::Deadline;
use local::local_error;
use outgoing::{Outgoing, Rules};

/// The body of an answer to a `/v1/` request: the upstream's, streamed through, or one
/// of the sidecar's.
///
/// The upstream's is boxed: with its record and the upstream connection it is about
/// 600 bytes, and the answer is moved from layer to layer on its way to the writer
/// (the proxy, the dispatch, the server's exchange) about eight times. Inline, those
/// moves cost more than the allocation (measured 25,957 → 25,454 instructions per
/// request; the allocation is paid back by the header maps the worker recycles).
pub enum Answer {
    Upstream(Box<UpstreamBody>),
    Local(ProxyBody),
}

impl http_body::Body for Answer {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match self.get_mut() {
            Answer::Upstream(b) => std::pin::Pin::new(b).poll_frame(cx),
            Answer::Local(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Upstream(b) => b.is_end_stream(),
            Answer::Local(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Answer::Upstream(b) => b.size_hint(),
            Answer::Local(b) => b.size_hint(),
        }
    }
}

/// Answers one `/v1/` request (`parts` and `body`). `unread` holds the request body until it has been read
/// whole (the caller drains what is left once the answer is out). The caller sets the
/// request id on the answer.
pub async fn handle(
    ctx: &Ctx<'_>,
    parts: &Parts,
    body: RequestBody,
    request_id: &HeaderValue,
    unread: &mut Option<RequestBody>,
) -> Response<Answer> {
    let app = ctx.app;
    let body = unread.insert(body);
    let mut record = Record::new(request_id.clone(), parts.method.clone(), parts.uri.clone());
    record.arrive(ctx.metrics, app.config.default_provider);
    // One version of the run-time settings for the whole request.
    let hot = app.hot.load();
    let at = record.started + hot.request_timeout;
    // One timer for the request's whole deadline (reading the body, then the upstream).
    let timer = tokio::time::sleep_until(at);
    tokio::pin!(timer);
    let mut deadline = Deadline { at, timer };

    if let Err(e) = request::check(app, parts, &mut record) {
        return local_error(record, e).map(Answer::Local);
    }
    let limit = app.config.limits.max_body_bytes;
    let read = request::read_body(body, &parts.headers, limit, deadline.timer.as_mut());
    let body = match read.await {
        Ok(b) => b,
        Err(e) => return local_error(record, e).map(Answer::Local),
    };
    *unread = None;

    let routed = route::route(app, &body, &mut record);
    let provider = routed.provider;
    let scope = routed.scope.as_deref();
    // With a token budget: the estimate its admission reserves.
    let priced = tokens::price(
        provider,
        scope,
        &body,
        parts.uri.path(),
        record.model.as_deref(),
    );

    let admitted = admit::admit(
        app,
        &hot,
        provider,
        scope,
        priced.as_deref(),
        &mut record,
        at,
    );
    let mut admitted = match admitted.await {
        Ok(a) => a,
        Err(e) => return local_error(record, e).map(Answer::Local),
    };
    record.route = admitted.route;

    let out = Outgoing {
        rules: Rules::new(
            &parts.headers,
            provider.auth_header.as_ref(),
            request_id,
            body.len(),
        ),
        parts,
        body: &body,
    };
    // `request_usage`: the stream's usage chunk asked for on the client's behalf.
    let asking = priced
        .as_deref()
        .filter(|p| tokens::asks_usage(provider, p))
        .and_then(|_| tokens::with_include_usage(&body));
    let asked = asking
        .as_ref()
        .map(|b| asked_outgoing(parts, b, provider, request_id));
    let sent = forward::forward(
        ctx,
        &hot,
        forward::Bodies {
            plain: &out,
            asked: asked.as_ref(),
        },
        &routed,
        priced.as_deref(),
        &mut admitted,
        &mut record,
        &mut deadline,
    );
    match sent.await {
        Ok(mut fwd) => {
            let tokens = fwd.tokens.take().zip(priced);
            let asked_usage = fwd.asked_usage;
            let mut resp = respond::respond(app, provider, fwd, record, &body, routed.model_read);
            if let Some((settlement, priced)) = tokens {
                let sse = resp.body().is_sse();
                resp.body_mut().settle_with(tokens::Settle::new(
                    Arc::clone(ctx.app),
                    provider.index,
                    *settlement,
                    *priced,
                    sse,
                    asked_usage,
                ));
            }
            resp.map(|b| Answer::Upstream(Box::new(b)))
        }
        Err(e) => local_error(record, e).map(Answer::Local),
    }
}

/// The request as sent when the sidecar asks for the stream's usage chunk: `body` is the
/// client's with `stream_options.include_usage` added.
#[cold]
fn asked_outgoing<'r>(
    parts: &'r Parts,
    body: &'r bytes::Bytes,
    provider: &'r crate::app::Provider,
    request_id: &'r HeaderValue,
) -> Outgoing<'r> {
    Outgoing {
        rules: Rules::new(
            &parts.headers,
            provider.auth_header.as_ref(),
            request_id,
            body.len(),
        ),
        parts,
        body,
    }
}
