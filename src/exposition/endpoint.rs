//! The metrics listener's one route: `GET /metrics`.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::body::ProxyBody;
use crate::reply::Reply;

/// Answers a request on the metrics listener.
pub fn serve<B>(app: &Arc<App>, req: &Request<B>) -> Response<ProxyBody> {
    let (status, message, code) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            let body = ProxyBody::full(super::render::render(app));
            return Reply::new(StatusCode::OK, super::render::CONTENT_TYPE, body).into_response();
        }
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "use GET /metrics",
            "method_not_allowed",
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "the metrics listener serves GET /metrics only",
            "not_found",
        ),
    };
    Reply::error(status, message, "invalid_request_error", code).into_response()
}
