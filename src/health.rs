//! Liveness and readiness.
//!
//! `/healthz` answers 200 while the process serves requests. `/readyz` answers 200 while
//! the default provider's upstream answers, 503 with the reason otherwise, and says in
//! `"probe"` what it did:
//!
//! - `cached`: the verdict of a check less than `ready_cache` seconds old, answered again.
//! - `not_needed`: a request was answered within `ready_cache` seconds. Real traffic is
//!   proof, so under load readiness sends nothing.
//! - `sent`: `GET <upstream>/models` with the provider's key went out over the worker's
//!   pooled connections, admitted like a request but never waiting
//!   ([`Limiter::try_admit_now`]): a token (in cluster mode from the lease, so the shared
//!   budget counts it) and a window slot, taken only when both are free and nobody
//!   waits. It is stamped in the window guard, and its answer is recorded like a
//!   request's: a 429 teaches the limit, pauses, and counts as an upstream 429.
//! - `skipped_no_token`: none was free, so nothing was sent and the last verdict stands:
//!   the last probe's, or ready when a request was answered since it or nothing is
//!   known yet.
//! - `in_flight`: another check's probe is on its way (one at a time); the last verdict
//!   stands.
//!
//! A skipped probe keeps the last verdict rather than answering 503: a full window is the
//! sidecar pacing, not the upstream failing, and readiness that flapped under load would
//! take a busy Pod out of its Services when it is needed most. The probe takes a token
//! rather than only opening a connection because TCP and TLS prove neither the key (a
//! revoked key still connects) nor the provider's HTTP front (a wall of 5xx still
//! handshakes). Waiting its turn, it spends only a token a request could have used at
//! that moment and never pushes the provider over its window; the price is up to one
//! request per `ready_cache` seconds while idle.

use std::rc::Rc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;

use crate::app::{App, Provider};
use crate::body::ProxyBody;
use crate::limiter::{signal, Limiter, Permit};
use crate::reply::Reply;
use crate::stats::ProviderStats;
use crate::upstream::{Pool, RequestHead, SendError, KEEP_ALL};

/// The readiness verdicts, shared by all workers (only `/readyz` touches them).
#[derive(Debug, Default)]
pub struct Readiness {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The last verdict reached from an answer (a probe's or a request's), and when
    /// (clock nanoseconds): answered again for `ready_cache`.
    reached: Option<(u64, Verdict)>,
    /// The last probe's verdict, and when its answer came.
    probed: Option<(u64, Verdict)>,
    /// A probe is on its way.
    in_flight: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct Verdict {
    ready: bool,
    /// What made it ready, or the reason it is not.
    text: String,
}

/// What a readiness check did (`"probe"` in its answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Cached,
    NotNeeded,
    Sent,
    SkippedNoToken,
    InFlight,
}

/// Why a probe was not sent, before the verdict that stands.
const NO_TOKEN: &str =
    "not probed: no token or window slot is free now (the quota is paced to requests)";
const IN_FLIGHT: &str = "not probed: another check's probe is on its way";

pub fn healthz() -> Response<ProxyBody> {
    json(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
}

fn json(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    Reply::json(status, body).no_store().into_response()
}

/// Why a probe found the upstream unavailable before it answered.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("cannot build probe: {0}")]
    Build(#[source] http::Error),
    #[error("{0}")]
    Send(#[source] SendError),
    #[error("probe timed out after {0:?}")]
    Timeout(Duration),
}

/// `GET /readyz`: see the module doc. `pool` is the worker's; `readiness` is shared by
/// all workers.
pub async fn readyz(app: &App, pool: &Rc<Pool>, readiness: &Readiness) -> Response<ProxyBody> {
    let ttl = app.config.ready_cache;
    let now = app.clock.now_nanos();
    let provider = app.default_provider();
    if let Some(v) = readiness.fresh(now, ttl) {
        return respond(provider, &v, Probe::Cached);
    }
    if app.shutdown.draining.is_cancelled() {
        return json(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(br#"{"status":"unavailable","reason":"shutting down"}"#),
        );
    }
    if provider.answered_within(now, ttl) {
        let v = Verdict::ready("answered a request within the cache window");
        readiness.reached(now, &v);
        return respond(provider, &v, Probe::NotNeeded);
    }
    let Some(flight) = readiness.take_off() else {
        return respond(
            provider,
            &readiness.standing(provider, now, IN_FLIGHT),
            Probe::InFlight,
        );
    };
    let Some(permit) = admit(&provider.limiter, now) else {
        drop(flight);
        return respond(
            provider,
            &readiness.standing(provider, now, NO_TOKEN),
            Probe::SkippedNoToken,
        );
    };
    let v = match probe(app, pool, provider, permit).await {
        Ok(v) => v,
        Err(e) => Verdict::unavailable(e.to_string()),
    };
    flight.land(app.clock.now_nanos(), &v);
    respond(provider, &v, Probe::Sent)
}

/// A probe's admission: a token and a window slot when both are free at `now` and
/// nobody waits; never queued.
fn admit(limiter: &Limiter, now: u64) -> Option<Permit<'_>> {
    limiter
        .try_admit_now(now)
        .map(|claim| Permit::new(limiter, claim))
}

fn respond(provider: &Provider, v: &Verdict, how: Probe) -> Response<ProxyBody> {
    let status = if v.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if v.ready { "ready" } else { "unavailable" },
        "provider": &*provider.name,
        "upstream": provider.config.upstream.display(),
        if v.ready { "detail" } else { "reason" }: v.text,
        "probe": how.as_str(),
    });
    json(status, Bytes::from(body.to_string()))
}

/// `GET <upstream>/models` with the provider's key, sent on `permit`; any answer but
/// 401/403 or 5xx is "reachable" (a 429 still proves the upstream is there).
async fn probe(
    app: &App,
    pool: &Rc<Pool>,
    provider: &Provider,
    mut permit: Permit<'_>,
) -> Result<Verdict, ProbeError> {
    let timeout = app.config.timeouts.connect;
    let up = &provider.config.upstream;
    let path = up.path_for("models", None);
    let mut headers = HeaderMap::new();
    if let Some(auth) = &provider.auth_header {
        headers.insert(header::AUTHORIZATION, auth.clone());
    }
    let host = match HeaderValue::from_str(up.authority.as_str()) {
        Ok(h) => h,
        Err(e) => {
            permit.give_back(app.clock.now_nanos());
            return Err(ProbeError::Build(e.into()));
        }
    };
    let head = RequestHead {
        method: &Method::GET,
        target: &path,
        host: &host,
        headers: &headers,
        skip: KEEP_ALL,
        set: &[],
    };
    permit.stamp(app.clock.now_nanos());
    let answered = tokio::time::timeout(timeout, async {
        let resp = pool
            .send(up, &head, &Bytes::new())
            .await
            .map_err(ProbeError::Send)?;
        let (head, body) = resp.into_parts();
        // Read to the end so the connection can go back to the pool (the list is small);
        // a 429's body says which limit it is.
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => Bytes::new(),
        };
        Ok::<_, ProbeError>((head.status, head.headers, body))
    })
    .await;
    // A send that failed or timed out stays counted: it may have reached the provider.
    let (status, headers, body) = match answered {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(ProbeError::Timeout(timeout)),
    };
    record(
        provider,
        &permit,
        app.clock.now_nanos(),
        status,
        &headers,
        &body,
    );
    Ok(match status.as_u16() {
        401 | 403 => Verdict::unavailable(format!(
            "upstream refused the API key (HTTP {})",
            status.as_u16()
        )),
        s if s >= 500 => Verdict::unavailable(format!("upstream answered HTTP {s}")),
        429 => Verdict::ready("answered the probe with HTTP 429"),
        _ => Verdict::ready("answered the probe"),
    })
}

/// The probe's answer, recorded like a request's: counted, and taught to the limiter.
fn record(
    provider: &Provider,
    permit: &Permit<'_>,
    now: u64,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
) {
    let dialect = provider.config.rate_limit_headers;
    let answer = signal::answer(status, headers, body, dialect, SystemTime::now());
    let sent_at = permit.sent_at().unwrap_or(now);
    provider
        .limiter
        .on_answer(now, sent_at, permit.count(), &answer);
    if status == StatusCode::TOO_MANY_REQUESTS {
        ProviderStats::inc(&provider.stats.upstream_429);
    }
}

/// The verdict that stands when no probe is sent: the last probe's, unless a request
/// was answered since (`answered_since(at)`); ready when nothing is known, so a sidecar
/// busy pacing never reads as failing. `why` says why nothing was sent.
fn standing(
    probed: Option<(u64, Verdict)>,
    answered_since: impl Fn(u64) -> bool,
    now: u64,
    why: &str,
) -> Verdict {
    match probed {
        Some((at, v)) if !answered_since(at) => Verdict {
            ready: v.ready,
            text: format!(
                "{why}; the last probe, {:.1} s ago: {}",
                Duration::from_nanos(now.saturating_sub(at)).as_secs_f64(),
                v.text
            ),
        },
        Some(_) => Verdict::ready(format!(
            "{why}; the upstream answered a request since the last probe"
        )),
        None if answered_since(0) => {
            Verdict::ready(format!("{why}; the upstream answered a request before"))
        }
        None => Verdict::ready(format!("{why}; no answer seen yet")),
    }
}

// === impl Readiness ===

impl Readiness {
    /// The verdict reached less than `ttl` before `now`.
    fn fresh(&self, now: u64, ttl: Duration) -> Option<Verdict> {
        let s = self.state.lock();
        let (at, v) = s.reached.as_ref()?;
        (now.saturating_sub(*at) < ttl.as_nanos() as u64).then(|| v.clone())
    }

    fn reached(&self, at: u64, v: &Verdict) {
        self.state.lock().reached = Some((at, v.clone()));
    }

    /// The right to send the one probe on its way, unless another check holds it.
    fn take_off(&self) -> Option<Flight<'_>> {
        let mut s = self.state.lock();
        if s.in_flight {
            return None;
        }
        s.in_flight = true;
        Some(Flight(self))
    }

    fn standing(&self, provider: &Provider, now: u64, why: &str) -> Verdict {
        let probed = self.state.lock().probed.clone();
        let answered_since =
            |at: u64| provider.answered_within(now, Duration::from_nanos(now.saturating_sub(at)));
        standing(probed, answered_since, now, why)
    }
}

/// The probe on its way; dropped (its check cancelled, or nothing sent), another may go.
struct Flight<'a>(&'a Readiness);

impl Flight<'_> {
    /// The probe's verdict, reached at `at`.
    fn land(self, at: u64, v: &Verdict) {
        let mut s = self.0.state.lock();
        s.probed = Some((at, v.clone()));
        s.reached = Some((at, v.clone()));
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.0.state.lock().in_flight = false;
    }
}

// === impl Verdict ===

impl Verdict {
    fn ready(text: impl Into<String>) -> Self {
        Self {
            ready: true,
            text: text.into(),
        }
    }

    fn unavailable(text: impl Into<String>) -> Self {
        Self {
            ready: false,
            text: text.into(),
        }
    }
}

impl Probe {
    fn as_str(self) -> &'static str {
        match self {
            Self::Cached => "cached",
            Self::NotNeeded => "not_needed",
            Self::Sent => "sent",
            Self::SkippedNoToken => "skipped_no_token",
            Self::InFlight => "in_flight",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{LeasePot, Mode, RetreatConfig};
    use std::sync::Arc;

    const S: u64 = 1_000_000_000;

    fn limiter(rpm: f64, burst: u32) -> Limiter {
        Limiter::new(rpm, burst, 16, RetreatConfig::default())
    }

    #[test]
    fn a_probe_takes_a_free_token_and_slot_and_never_queues() {
        let l = limiter(60.0, 1);
        let mut p = admit(&l, S).expect("a token is free");
        p.stamp(S);
        drop(p);
        assert_eq!(l.guard.in_span(S), 1, "the probe is counted in the window");
        assert!(admit(&l, S).is_none(), "the burst is spent");
        assert!(l.queues.is_empty(), "a skipped probe waits for nothing");
    }

    #[test]
    fn a_probe_never_jumps_waiting_requests() {
        let l = limiter(60.0, 1);
        let _first = admit(&l, 0).expect("a token is free");
        let _waiting = l.admit(crate::priority::Priority::Low, None, 0);
        assert_eq!(l.queues.len(), 1);
        // A token is free again, but it is the waiting request's.
        assert!(admit(&l, 2 * S).is_none());
        assert_eq!(l.queues.len(), 1);
    }

    #[test]
    fn in_cluster_mode_a_probe_takes_its_token_from_the_lease() {
        let pot = Arc::new(LeasePot::new());
        pot.set_mode(Mode::Shared);
        let l = limiter(60.0, 10).leased(Arc::clone(&pot));
        assert!(
            admit(&l, S).is_none(),
            "no leased token: nothing is sent, though the local bucket is full"
        );
        pot.fill(crate::limiter::PotLease::open(1, 1), 0);
        let p = admit(&l, S).expect("the leased token");
        assert_eq!(pot.tokens(), 0, "taken from the shared budget's lease");
        drop(p);
        pot.set_mode(Mode::Isolated);
        pot.fill(crate::limiter::PotLease::open(1, 1), 0);
        assert!(
            admit(&l, S).is_none(),
            "cut off from the budget: nothing is sent"
        );
    }

    #[test]
    fn a_skipped_probe_keeps_the_last_probes_verdict_until_a_request_is_answered() {
        let failing = Verdict::unavailable("upstream answered HTTP 500");
        let never = |_: u64| false;
        let v = standing(Some((S, failing.clone())), never, 3 * S, NO_TOKEN);
        assert!(!v.ready);
        assert!(v.text.starts_with("not probed"), "{}", v.text);
        assert!(
            v.text.ends_with("2.0 s ago: upstream answered HTTP 500"),
            "{}",
            v.text
        );

        let after = |at: u64| at <= 2 * S;
        let v = standing(Some((S, failing)), after, 3 * S, NO_TOKEN);
        assert!(v.ready, "a request answered since the probe");
        assert!(v.text.contains("answered a request"), "{}", v.text);
    }

    #[test]
    fn a_skipped_probe_with_nothing_known_is_ready() {
        let v = standing(None, |_| false, S, NO_TOKEN);
        assert!(v.ready, "a full window is pacing, not failure");
        assert!(v.text.contains("no answer seen yet"), "{}", v.text);
        let v = standing(None, |_| true, S, IN_FLIGHT);
        assert!(v.ready);
        assert!(v.text.contains("answered a request before"), "{}", v.text);
    }

    #[test]
    fn one_probe_is_on_its_way_at_a_time() {
        let r = Readiness::default();
        let f = r.take_off().expect("the first check probes");
        assert!(
            r.take_off().is_none(),
            "the second answers the standing verdict"
        );
        drop(f);
        let f = r.take_off().expect("a cancelled check frees the way");
        f.land(S, &Verdict::ready("answered the probe"));
        assert!(r.take_off().is_some());
        assert_eq!(
            r.fresh(S + S / 2, Duration::from_secs(1)),
            Some(Verdict::ready("answered the probe"))
        );
        assert_eq!(r.fresh(2 * S, Duration::from_secs(1)), None);
    }
}
