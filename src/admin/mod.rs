//! The admin API, on the proxy's listener (authentication: see [`auth`]):
//!
//! - `GET /api/admin/config`: the effective configuration, keys masked, with its
//!   `version` (also the `ETag`);
//! - `POST` or `PATCH /api/admin/config`: a JSON patch of the run-time fields
//!   ([`patch::Patch`]), all or nothing; `If-Match: <version>` makes it conditional
//!   (412 when the configuration moved on). The answer lists each change, old → new.
//! - `POST /api/admin/providers/{name}/forget`: forgets the limit learned for provider
//!   `name` (from 429s, headers, probes or the state file): it is paced at its configured
//!   `rate_rpm` again. Authenticated like a write; answers the provider's new `pacing`
//!   (as in `GET /api/admin/config`), 404 for an unknown provider.
//!
//! A change is validated whole, then applied under one writer lock: rates and queue
//! bounds go into the limiters (a rate keeps the bucket's tokens; a smaller queue
//! bound refuses new arrivals until the depth falls under it, dropping nobody), the log
//! level changes at once, and the new [`Hot`] value is swapped in for the requests
//! that follow. Every attempt to change (a forget included) is written to the audit log
//! (remote address, fields, old → new; never the token) and counted in
//! `sidecar_admin_changes_total`.
//! SIGHUP reloads go through [`reload`], with the same validation and the same log.

mod apply;
pub mod patch;
mod view;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};

use crate::app::App;
use crate::auth::{Access, Denied};
use crate::body::{BoxError, ProxyBody};
use crate::reply::Reply;
use apply::{apply, audit, publish};
use patch::PatchError;

pub use apply::{apply_cluster, reload, ReloadError};

const CONFIG_PATH: &str = "/api/admin/config";
const PROVIDERS_PATH: &str = "/api/admin/providers/";
const FORGET_SUFFIX: &str = "/forget";

/// The provider named by `/api/admin/providers/{name}/forget`.
fn forget_target(path: &str) -> Option<&str> {
    let name = path
        .strip_prefix(PROVIDERS_PATH)?
        .strip_suffix(FORGET_SUFFIX)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// Routes `/api/admin/*`.
pub async fn serve<B>(app: &Arc<App>, req: Request<B>, remote: SocketAddr) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let path = req.uri().path();
    if let Some(name) = forget_target(path) {
        let name = name.to_owned();
        return forget(app, &req, remote, &name);
    }
    if path != CONFIG_PATH {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no admin route {path:?}; the admin API serves {CONFIG_PATH} and {PROVIDERS_PATH}{{name}}{FORGET_SUFFIX}"),
            "not_found",
        );
    }
    let access = match *req.method() {
        Method::GET | Method::HEAD => Access::Read,
        Method::POST | Method::PATCH => Access::Write,
        _ => {
            let mut resp = error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!(
                    "method {} is not allowed on /api/admin/config; use GET, POST or PATCH",
                    req.method()
                ),
                "method_not_allowed",
            );
            resp.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PATCH"),
            );
            return resp;
        }
    };
    if let Some(refused) = check(app, access, req.headers(), remote) {
        return refused;
    }
    match access {
        Access::Read => read(app),
        Access::Write => write(app, req, remote).await,
    }
}

/// Authenticates `access`: the answer when it is refused. A refused write is counted
/// and written to the audit log.
fn check(
    app: &App,
    access: Access,
    headers: &http::HeaderMap,
    remote: SocketAddr,
) -> Option<Response<ProxyBody>> {
    let denied = app.admin.check(access, headers, remote).err()?;
    if access == Access::Write {
        app.admin_changes.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(target: crate::logging::AUDIT_TARGET, remote = %remote, reason = %denied, "admin change refused");
    }
    Some(denied_response(&denied))
}

/// `POST /api/admin/providers/{name}/forget`: back to the configured rate.
fn forget<B>(app: &App, req: &Request<B>, remote: SocketAddr, name: &str) -> Response<ProxyBody> {
    if req.method() != Method::POST {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!(
                "method {} is not allowed on {PROVIDERS_PATH}{{name}}{FORGET_SUFFIX}; use POST",
                req.method()
            ),
            "method_not_allowed",
        );
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    if let Some(refused) = check(app, Access::Write, req.headers(), remote) {
        return refused;
    }
    let Some(provider) = app.providers.iter().find(|p| &*p.name == name) else {
        app.admin_changes.rejected.fetch_add(1, Ordering::Relaxed);
        let message = format!(
            "no provider {name:?}; configured: {}",
            app.provider_names().join(", ")
        );
        tracing::warn!(target: crate::logging::AUDIT_TARGET, remote = %remote, status = 404, reason = %message, "admin change refused");
        return error(StatusCode::NOT_FOUND, &message, "unknown_provider");
    };
    let now = app.clock.now_nanos();
    let change = provider.limiter.forget(now);
    if let Some(b) = &provider.budget {
        b.command(crate::budget::Command::Forget);
    }
    app.admin_changes.applied.fetch_add(1, Ordering::Relaxed);
    let limit = |n: Option<u32>| n.map_or_else(|| "unchanged".to_owned(), |n| n.to_string());
    tracing::info!(
        target: crate::logging::AUDIT_TARGET,
        remote = %remote,
        source = "admin",
        provider = name,
        from = %limit(change.map(|c| c.from)),
        to = %limit(change.map(|c| c.to)),
        "learned limit forgotten"
    );
    if let Some(c) = change {
        tracing::warn!(
            provider = name,
            from = c.from,
            to = c.to,
            source = c.source.as_str(),
            why = %c.why,
            "learned limit change"
        );
    }
    let body = serde_json::json!({
        "provider": name,
        "changed": change.map(|c| serde_json::json!({"from": c.from, "to": c.to})),
        "pacing": view::pacing(&provider.limiter.pacing_view(now), now),
    });
    json_response(StatusCode::OK, &body, app.hot.get().version)
}

fn error(status: StatusCode, message: &str, code: &str) -> Response<ProxyBody> {
    let kind = match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "authentication_error",
        _ => "invalid_request_error",
    };
    Reply::error(status, message, kind, code)
        .no_store()
        .into_response()
}

fn denied_response(d: &Denied) -> Response<ProxyBody> {
    let (status, code) = match d {
        Denied::Off => (StatusCode::NOT_FOUND, "admin_off"),
        Denied::MissingToken => (StatusCode::UNAUTHORIZED, "missing_token"),
        Denied::WrongToken => (StatusCode::FORBIDDEN, "wrong_token"),
        Denied::WritesDisabled => (StatusCode::FORBIDDEN, "writes_disabled"),
        Denied::ForeignOrigin { .. } => (StatusCode::FORBIDDEN, "foreign_origin"),
        Denied::NotLoopback => (StatusCode::FORBIDDEN, "not_loopback"),
    };
    let mut resp = error(status, &d.to_string(), code);
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"nvidia-sidecar admin\""),
        );
    }
    resp
}

fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    version: u64,
) -> Response<ProxyBody> {
    let mut reply = Reply::json(status, body.to_string()).no_store();
    if let Ok(v) = HeaderValue::try_from(format!("\"{version}\"")) {
        reply = reply.header(header::ETAG, v);
    }
    reply.into_response()
}

fn read(app: &App) -> Response<ProxyBody> {
    let hot = app.hot.get();
    json_response(StatusCode::OK, &view::config(app, &hot), hot.version)
}

/// The version an `If-Match` asks for: `"7"`, `7` or `W/"7"`; `*` matches any.
fn if_match(headers: &http::HeaderMap) -> Result<Option<u64>, ()> {
    let Some(v) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let s = v.to_str().map_err(|_| ())?.trim();
    if s == "*" {
        return Ok(None);
    }
    let s = s.strip_prefix("W/").unwrap_or(s).trim_matches('"');
    s.parse().map(Some).map_err(|_| ())
}

/// Why a write failed after authentication.
enum WriteError {
    TooLarge,
    Body(String),
    Patch(PatchError),
    Precondition { want: u64, have: u64 },
    BadIfMatch,
}

async fn write<B>(app: &Arc<App>, req: Request<B>, remote: SocketAddr) -> Response<ProxyBody>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let result = async {
        let want = if_match(&parts.headers).map_err(|()| WriteError::BadIfMatch)?;
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > patch::MAX_BODY as u64) {
            return Err(WriteError::TooLarge);
        }
        let bytes = match Limited::new(body, patch::MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(WriteError::TooLarge)
            }
            Err(e) => return Err(WriteError::Body(e.to_string())),
        };
        let patch = patch::parse(&bytes).map_err(WriteError::Patch)?;
        let names = app.provider_names();
        app.hot
            .update(
                |old| {
                    if let Some(want) = want.filter(|w| *w != old.version) {
                        return Err(WriteError::Precondition {
                            want,
                            have: old.version,
                        });
                    }
                    patch.apply_to(old, &names).map_err(WriteError::Patch)
                },
                |old, new| apply(app, old, new),
            )
            .map(|(old, new)| {
                publish(app, &old, &new);
                (patch::diff(&old, &new, &names), new)
            })
    }
    .await;
    match result {
        Ok((changes, new)) => {
            app.admin_changes.applied.fetch_add(1, Ordering::Relaxed);
            audit(&remote.to_string(), "admin", &changes, new.version);
            let body = serde_json::json!({"version": new.version.to_string(), "changed": changes});
            json_response(StatusCode::OK, &body, new.version)
        }
        Err(e) => {
            app.admin_changes.rejected.fetch_add(1, Ordering::Relaxed);
            let (status, message, code) = match e {
                WriteError::TooLarge => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the patch exceeds the limit of {} bytes", patch::MAX_BODY),
                    "body_too_large",
                ),
                WriteError::Body(m) => (StatusCode::BAD_REQUEST, format!("could not read the body: {m}"), "bad_body"),
                WriteError::BadIfMatch => (
                    StatusCode::BAD_REQUEST,
                    "If-Match must be a configuration version, such as \"7\"".to_owned(),
                    "bad_if_match",
                ),
                WriteError::Precondition { want, have } => (
                    StatusCode::PRECONDITION_FAILED,
                    format!("the configuration is at version {have}, not {want}: read it again and retry"),
                    "version_mismatch",
                ),
                WriteError::Patch(p) => {
                    let code = match p {
                        PatchError::Malformed(_) => "invalid_json",
                        PatchError::UnknownField { .. } => "unknown_field",
                        PatchError::Invalid { .. } => "invalid_value",
                        PatchError::UnknownProvider { .. } => "unknown_provider",
                        PatchError::Empty => "empty_patch",
                    };
                    (StatusCode::BAD_REQUEST, p.to_string(), code)
                }
            };
            tracing::warn!(target: crate::logging::AUDIT_TARGET, remote = %remote, status = status.as_u16(), reason = %message, "admin change refused");
            error(status, &message, code)
        }
    }
}
