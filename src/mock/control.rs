//! The mock's own endpoints, for a load test that runs it as a separate process:
//!
//! - `GET /mock/stats`: counters, the 429s per limit (`refused_requests`,
//!   `refused_tokens`, `too_large`) and the tokens charged.
//! - `GET /mock/limit`: the limits in force, global, per model and tokens.
//! - `POST /mock/limit` with `{"rpm": 30, "window_secs": 6}`, `{"model": "m", "rpm": 20,
//!   "window_secs": 6}` or `{"tpm": 6000, "window_secs": 6}` (`rpm` or `tpm` 0: unlimited;
//!   both may be given; `window_secs` defaults to each limit's current window; the token
//!   limit is global): changes limits, keeping their history, and answers the limits in
//!   force.
//! - `GET /mock/windows?window_secs=6[&model=m]`: the judge's counts per fixed window
//!   since start, the most admissions in any rolling window, and the totals; once a
//!   token limit exists, also `tokens`: tokens charged per fixed window (with the token
//!   limit's 429s in each), the most in any rolling window, and the total.
//!
//! Bad input is a 400 whose message names the field.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use serde_json::{json, Value};

use super::admit::LimitsState;
use super::judge::Filter;
use super::limit::LimitState;
use super::respond::{error, json_response, MockBody};
use super::shared::MockShared;

/// Most windows `/mock/windows` lists (a tiny window over a long run would be huge).
const MAX_WINDOWS: u64 = 1_000_000;

/// Why a control request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid JSON body for /mock/limit (expected {{\"rpm\": 30, \"window_secs\": 6}} with an optional \"model\", or {{\"tpm\": 6000}}): {0}")]
    Json(#[source] serde_json::Error),
    #[error("/mock/limit needs \"rpm\" or \"tpm\" (or both)")]
    NoLimit,
    #[error("{field} must be {expected}, got {got}")]
    Value {
        field: &'static str,
        expected: &'static str,
        got: String,
    },
    #[error("window_secs={window_secs} over {elapsed_secs:.0} s since start would list more than {MAX_WINDOWS} windows")]
    TooManyWindows { window_secs: f64, elapsed_secs: f64 },
}

/// `POST /mock/limit`'s body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLimit {
    model: Option<String>,
    rpm: Option<f64>,
    tpm: Option<f64>,
    window_secs: Option<f64>,
}

/// Answers `/mock/*`; `None` when the path is not one of them.
pub fn route(
    s: &MockShared,
    method: &Method,
    path: &str,
    query: &str,
    body: &Bytes,
) -> Option<Response<MockBody>> {
    let resp = match (method, path) {
        (&Method::GET, "/mock/stats") => stats(s),
        (&Method::GET, "/mock/limit") => limits(s),
        (&Method::POST, "/mock/limit") => set_limit(s, body).map_or_else(bad, |()| limits(s)),
        (&Method::GET, "/mock/windows") => windows(s, query).unwrap_or_else(bad),
        (_, "/mock/stats" | "/mock/limit" | "/mock/windows") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} not allowed on {path}"),
        ),
        _ => return None,
    };
    Some(resp)
}

fn stats(s: &MockShared) -> Response<MockBody> {
    let st = &s.stats;
    let limits = s.gate.state_at(Instant::now());
    let (requests, tokens, too_large) = s.gate.judge.refusals();
    json_response(
        StatusCode::OK,
        &json!({
            "requests": st.requests.load(Ordering::Relaxed),
            "rate_limited": st.rate_limited.load(Ordering::Relaxed),
            "errors": st.errors.load(Ordering::Relaxed),
            "unauthorized": st.unauthorized.load(Ordering::Relaxed),
            "streams": st.streams.load(Ordering::Relaxed),
            "worker_limited": st.worker_limited.load(Ordering::Relaxed),
            "stream_options_refused": st.stream_options_refused.load(Ordering::Relaxed),
            "rpm_limit": limits.global.per_minute(),
            "tpm_limit": limits.tokens.per_minute(),
            "token_charge": limits.tokens.charge.as_str(),
            "judging": s.gate.is_judging(),
            "admitted": s.gate.judge.admitted_total(),
            "refused": s.gate.judge.refused_total(),
            "refused_requests": requests,
            "refused_tokens": tokens,
            "too_large": too_large,
            "tokens_charged": s.gate.judge.tokens_total(),
        }),
    )
}

fn bad(e: ControlError) -> Response<MockBody> {
    error(StatusCode::BAD_REQUEST, &e.to_string())
}

fn set_limit(s: &MockShared, body: &[u8]) -> Result<(), ControlError> {
    let req: SetLimit = serde_json::from_slice(body).map_err(ControlError::Json)?;
    if req.rpm.is_none() && req.tpm.is_none() {
        return Err(ControlError::NoLimit);
    }
    for (field, value) in [("rpm", req.rpm), ("tpm", req.tpm)] {
        if let Some(v) = value.filter(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(ControlError::Value {
                field,
                expected: "a number >= 0 (0: unlimited)",
                got: v.to_string(),
            });
        }
    }
    if req.model.as_deref() == Some("") {
        return Err(ControlError::Value {
            field: "model",
            expected: "a model name",
            got: "\"\"".into(),
        });
    }
    if let (Some(_), Some(tpm)) = (&req.model, req.tpm) {
        return Err(ControlError::Value {
            field: "tpm",
            expected: "given without \"model\" (the token limit is global)",
            got: tpm.to_string(),
        });
    }
    let given = req.window_secs.map(window_secs).transpose()?;
    // Each limit keeps its current window unless one is given; a new model's is the
    // start-up one.
    let st = s.gate.state_at(Instant::now());
    let window = |current: Duration| given.map_or(current, Duration::from_secs_f64);
    if let Some(rpm) = req.rpm {
        match &req.model {
            Some(m) => {
                let current = st
                    .models
                    .iter()
                    .find(|(n, _)| n == m)
                    .map_or(s.window, |(_, l)| l.window);
                s.gate.set_model_limit(m, rpm, window(current));
            }
            None => s.gate.set_limit(rpm, window(st.global.window)),
        }
    }
    if let Some(tpm) = req.tpm {
        s.gate.set_token_limit(tpm, window(st.tokens.window));
    }
    Ok(())
}

fn window_secs(w: f64) -> Result<f64, ControlError> {
    if w.is_finite() && (0.001..=86_400.0).contains(&w) {
        Ok(w)
    } else {
        Err(ControlError::Value {
            field: "window_secs",
            expected: "a number of seconds from 0.001 to 86400",
            got: w.to_string(),
        })
    }
}

fn limits(s: &MockShared) -> Response<MockBody> {
    json_response(
        StatusCode::OK,
        &limits_json(&s.gate.state_at(Instant::now())),
    )
}

fn limit_json(l: &LimitState) -> Value {
    json!({
        "rpm": l.per_minute(),
        "max": l.max,
        "window_secs": l.window.as_secs_f64(),
        "in_window": l.in_window,
    })
}

pub fn limits_json(st: &LimitsState) -> Value {
    let models: serde_json::Map<String, Value> = st
        .models
        .iter()
        .map(|(m, l)| (m.clone(), limit_json(l)))
        .collect();
    let t = &st.tokens;
    let tokens = json!({
        "tpm": t.per_minute(),
        "max": t.max,
        "window_secs": t.window.as_secs_f64(),
        "in_window": t.used,
        "charge": t.charge.as_str(),
    });
    json!({"global": limit_json(&st.global), "models": models, "tokens": tokens})
}

fn windows(s: &MockShared, query: &str) -> Result<Response<MockBody>, ControlError> {
    let mut window = s.window.as_secs_f64();
    let mut model = None;
    for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "window_secs" => {
                let w = v.parse().map_err(|_| ControlError::Value {
                    field: "window_secs",
                    expected: "a number of seconds",
                    got: v.to_owned(),
                })?;
                window = window_secs(w)?;
            }
            "model" => model = Some(percent_decode(v)),
            _ => {}
        }
    }
    let now = Instant::now();
    let elapsed = now
        .saturating_duration_since(s.gate.judge.start())
        .as_secs_f64();
    if elapsed / window > MAX_WINDOWS as f64 {
        return Err(ControlError::TooManyWindows {
            window_secs: window,
            elapsed_secs: elapsed,
        });
    }
    let filter = model.as_deref().map_or(Filter::All, Filter::Model);
    let v = s
        .gate
        .judge
        .verdicts(filter, Duration::from_secs_f64(window), now);
    let mut answer = json!({
        "window_secs": window,
        "model": model,
        "judging": s.gate.is_judging(),
        "windows": v.windows,
        "max_in_rolling": v.max_in_rolling,
        "admitted": v.admitted,
        "refused": v.refused,
        "refused_requests": v.refused_requests,
        "refused_tokens": v.refused_tokens,
        "too_large": v.too_large,
        "dropped": v.dropped,
    });
    // Only once a token limit exists: the list would double a long run's answer.
    if s.gate.is_token_judging() {
        answer["tokens"] = json!({
            "windows": v.tokens.windows,
            "max_in_rolling": v.tokens.max_in_rolling,
            "charged": v.tokens.charged,
        });
    }
    Ok(json_response(StatusCode::OK, &answer))
}

/// `%XX` escapes and `+` as a space, as HTML forms and Python's `urlencode` write them.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(c: u8) -> Option<u8> {
    char::from(c).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("meta%2Fllama-3.1"), "meta/llama-3.1");
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%41"), "A");
    }
}
