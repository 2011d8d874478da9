//! Liveness and readiness.
//!
//! `/healthz` answers 200 while the process serves requests. `/readyz` answers 200
//! while the default provider's upstream answers, 503 with the reason otherwise. Real
//! traffic counts as proof: an upstream that answered a request within the cache
//! window is ready without a probe, so readiness costs no provider quota under load.
//! Otherwise a cheap `GET <upstream>/models` goes out over the worker's pooled
//! connections, and its result is cached for `ready_cache` seconds. The probe uses the
//! provider's key, so it takes a token and a window slot like a request: when none is
//! free (requests are waiting, or the window is full) it is not sent, and the sidecar
//! counts as ready — it is pacing real traffic.

use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;

use crate::app::Provider;
use crate::body::ProxyBody;
use crate::server::Worker;

/// The cached readiness verdict, shared by all workers (only `/readyz` touches it).
#[derive(Debug, Default)]
pub struct Readiness {
    cached: Mutex<Option<(u64, Verdict)>>,
}

#[derive(Debug, Clone)]
struct Verdict {
    ready: bool,
    body: bytes::Bytes,
}

pub fn healthz() -> Response<ProxyBody> {
    json(
        StatusCode::OK,
        bytes::Bytes::from_static(br#"{"status":"ok"}"#),
    )
}

fn json(status: StatusCode, body: bytes::Bytes) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub async fn readyz(worker: &Worker) -> Response<ProxyBody> {
    let app = &worker.app;
    let ttl = app.config.ready_cache;
    let now = app.clock.now_nanos();
    if let Some((at, v)) = app.readiness.cached.lock().as_ref() {
        if now.saturating_sub(*at) < ttl.as_nanos() as u64 {
            return verdict_response(v);
        }
    }
    if app.shutdown.draining.is_cancelled() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            bytes::Bytes::from_static(br#"{"status":"unavailable","reason":"shutting down"}"#),
        );
    }
    let provider = app.default_provider();
    let check = if provider.answered_within(now, ttl) {
        Ok("answered a request within the cache window")
    } else if let Some(claim) = provider.limiter.try_admit_now(now) {
        let mut permit = crate::limiter::Permit::new(&provider.limiter, claim);
        permit.stamp(app.clock.now_nanos());
        probe(worker, provider, app.config.timeouts.connect).await
    } else {
        Ok("no token or window slot is free (the provider's quota is in use); not probed")
    };
    let verdict = match check {
        Ok(how) => Verdict {
            ready: true,
            body: body(true, provider, how),
        },
        Err(reason) => Verdict {
            ready: false,
            body: body(false, provider, &reason),
        },
    };
    *app.readiness.cached.lock() = Some((app.clock.now_nanos(), verdict.clone()));
    verdict_response(&verdict)
}

fn body(ready: bool, provider: &Provider, detail: &str) -> bytes::Bytes {
    let v = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "provider": &*provider.name,
        "upstream": provider.config.upstream.display(),
        if ready { "detail" } else { "reason" }: detail,
    });
    bytes::Bytes::from(v.to_string())
}

fn verdict_response(v: &Verdict) -> Response<ProxyBody> {
    let status = if v.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, v.body.clone())
}

/// `GET <upstream>/models` with the provider's key; any answer but 401/403 or 5xx is
/// "reachable" (a 429 still proves the upstream is there).
async fn probe(
    worker: &Worker,
    provider: &Provider,
    timeout: Duration,
) -> Result<&'static str, String> {
    let up = &provider.config.upstream;
    let mut req = Request::get(up.path_for("models", None))
        .header(header::HOST, up.authority.as_str())
        .body(Full::new(bytes::Bytes::new()))
        .map_err(|e| format!("cannot build probe: {e}"))?;
    if let Some(auth) = &provider.auth_header {
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
    }
    let sent = tokio::time::timeout(timeout, async {
        let (resp, lease) = worker.pool.send(up, req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read the (small) body to the end so the connection can go back to the pool.
        if resp.into_body().collect().await.is_ok() {
            if let Some(l) = lease {
                l.release();
            }
        }
        Ok::<_, String>(status)
    })
    .await
    .map_err(|_| format!("probe timed out after {timeout:?}"))??;
    match sent.as_u16() {
        401 | 403 => Err(format!(
            "upstream refused the API key (HTTP {})",
            sent.as_u16()
        )),
        s if s >= 500 => Err(format!("upstream answered HTTP {s}")),
        _ => Ok("answered the probe"),
    }
}
