//! The mock's own endpoints, for a load test that runs it as a separate process:
//!
//! - `GET /mock/stats`: counters.
//! - `GET /mock/limit`: the limits in force, global and per model.
//! - `POST /mock/limit` with `{"rpm": 30, "window_secs": 6}` or `{"model": "m", "rpm": 20,
//!   "window_secs": 6}` (`rpm` 0: unlimited; `window_secs` defaults to the limit's current
//!   window): changes a limit, keeping its history, and answers the limits in force.
//! - `GET /mock/windows?window_secs=6[&model=m]`: the judge's counts per fixed window
//!   since start, the most admissions in any rolling window, and the totals.
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
    #[error("invalid JSON body for /mock/limit (expected {{\"rpm\": 30, \"window_secs\": 6}} with an optional \"model\"): {0}")]
    Json(#[source] serde_json::Error),
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
    rpm: f64,
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
    json_response(
        StatusCode::OK,
        &json!({
            "requests": st.requests.load(Ordering::Relaxed),
            "rate_limited": st.rate_limited.load(Ordering::Relaxed),
            "errors": st.errors.load(Ordering::Relaxed),
            "unauthorized": st.unauthorized.load(Ordering::Relaxed),
            "streams": st.streams.load(Ordering::Relaxed),
            "worker_limited": st.worker_limited.load(Ordering::Relaxed),
            "rpm_limit": s.gate.state_at(Instant::now()).global.per_minute(),
            "judging": s.gate.is_judging(),
            "admitted": s.gate.judge.admitted_total(),
            "refused": s.gate.judge.refused_total(),
        }),
    )
}

fn bad(e: ControlError) -> Response<MockBody> {
    error(StatusCode::BAD_REQUEST, &e.to_string())
}

fn set_limit(s: &MockShared, body: &[u8]) -> Result<(), ControlError> {
    let req: SetLimit = serde_json::from_slice(body).map_err(ControlError::Json)?;
    if !(req.rpm.is_finite() && req.rpm >= 0.0) {
        return Err(ControlError::Value {
            field: "rpm",
            expected: "a number >= 0 (0: unlimited)",
            got: req.rpm.to_string(),
        });
    }
    if req.model.as_deref() == Some("") {
        return Err(ControlError::Value {
            field: "model",
            expected: "a model name",
            got: "\"\"".into(),
        });
    }
    let window = match req.window_secs {
        Some(w) => Duration::from_secs_f64(window_secs(w)?),
        None => {
            // The limit's current window; a new model's is the start-up one.
            let st = s.gate.state_at(Instant::now());
            match &req.model {
                None => st.global.window,
                Some(m) => st
                    .models
                    .iter()
                    .find(|(n, _)| n == m)
                    .map_or(s.window, |(_, l)| l.window),
            }
        }
    };
    match &req.model {
        Some(m) => s.gate.set_model_limit(m, req.rpm, window),
        None => s.gate.set_limit(req.rpm, window),
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
    json!({"global": limit_json(&st.global), "models": models})
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
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "window_secs": window,
            "model": model,
            "judging": s.gate.is_judging(),
            "windows": v.windows,
            "max_in_rolling": v.max_in_rolling,
            "admitted": v.admitted,
            "refused": v.refused,
            "dropped": v.dropped,
        }),
    ))
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
