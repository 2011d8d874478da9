//! The metrics listener's one route: `GET /metrics`.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::app::App;
use crate::error::error_json;

/// Answers a request on the metrics listener.
pub fn serve<B>(app: &Arc<App>, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (
            StatusCode::OK,
            super::exposition::CONTENT_TYPE,
            Bytes::from(super::exposition::render(app)),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "application/json",
            error_json(
                "use GET /metrics",
                "invalid_request_error",
                "method_not_allowed",
            ),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            error_json(
                "the metrics listener serves GET /metrics only",
                "invalid_request_error",
                "not_found",
            ),
        ),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}
