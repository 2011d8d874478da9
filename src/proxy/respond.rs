//! The `respond` phase: the upstream's answer, made the client's (the request id is set
//! on every answer by `sidecar::dispatch`), and the body streams through `stream::UpstreamBody`,
//! which finishes the request's [`Record`] however it ends.

use http::header;
use http::{Response, Version};

use super::forward::Forwarded;
use super::route::model_of;
use super::stream::UpstreamBody;
use crate::app::App;
use crate::record::Record;

/// The client's response to a request `fwd` answered; `body` is the request's (read
/// for the model of a failure when routing did not read it).
// Inlined: called once per request, and out of line it moves the `Record` and the
// answer's head by value.
#[inline(always)]
pub fn respond(
    app: &App,
    provider: &crate::app::Provider,
    fwd: Forwarded,
    mut record: Record,
    body: &bytes::Bytes,
    model_read: bool,
) -> Response<UpstreamBody> {
    let Forwarded {
        mut head,
        body: incoming,
        prefix,
        sent_at,
        // Taken by the caller, which hands them to the body.
        tokens: _,
        asked_usage: _,
    } = fwd;
    if !model_read && head.status.is_server_error() {
        // A failure is logged at `warn` with its model even when the access log is off.
        record.model = model_of(body);
    }
    let now = tokio::time::Instant::now();
    record.upstream_latency = Some(now.saturating_duration_since(sent_at));
    record.status = head.status.as_u16();
    if head.status.as_u16() < 500 {
        provider.mark_success(app.clock.now_nanos());
    }
    // The upstream's hop-by-hop headers were never put in the map (`upstream::h1`), and
    // HTTP/2 has none.
    head.version = Version::HTTP_11;
    let sse = head
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let shutdown = sse.then(|| app.shutdown.hard_stop.clone().cancelled_owned());
    let stream = UpstreamBody::new(
        incoming,
        sse,
        app.config.timeouts.stream_idle,
        shutdown,
        record,
        now,
    )
    .with_prefix(prefix);
    Response::from_parts(head, stream)
}
