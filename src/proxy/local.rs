//! The `record` phase of a request the sidecar answers itself: the error's status,
//! outcome and length go into its [`Record`], which is finished (logged and counted)
//! here. A request the upstream answers is finished by its body (`stream`).

use http::Response;

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::record::{End, Record};

/// Answers `record`'s request with `err`, and records it.
pub fn local_error(mut record: Record, err: ProxyError) -> Response<ProxyBody> {
    record.status = err.status().as_u16();
    let (outcome, kind) = err.outcome();
    record.outcome = Some(outcome);
    record.error = record.error.or(kind);
    let resp = err.into_response();
    let len = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    record.finish(End::Local, len);
    resp
}
