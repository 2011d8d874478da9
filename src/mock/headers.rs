//! The rate-limit headers and 429 bodies of the simulated provider, in the dialects real
//! providers speak.
//!
//! - bare (default): `x-ratelimit-limit` (admissions per window), `-remaining`, `-reset`
//!   (seconds), and `Retry-After` on 429s.
//! - OpenAI (`--openai-headers`): `x-ratelimit-limit-requests` (per minute),
//!   `-remaining-requests`, `-reset-requests` as a Go duration (`"1s"`, `"250ms"`,
//!   `"6m0s"`). OpenAI's reset is "until the limit is back to its initial state"; a
//!   rolling window has no such instant that helps a client, so we send the time until
//!   the oldest admission leaves (one slot frees), which is also what `Retry-After` says.
//!   With a token limit, also `x-ratelimit-limit-tokens` (per minute),
//!   `-remaining-tokens` and `-reset-tokens`, on admitted answers and every 429; the
//!   token reset is OpenAI's literally: until the window is back to its full limit (the
//!   newest charge leaves it).
//! - none on 429s (`--bare-429`): NVIDIA's hosted API by public reports sends no
//!   rate-limit headers; the body is `{"status":429,"title":"Too Many Requests"}`, for
//!   the token limit too.
//!
//! A 429 of the token limit names it as OpenAI does, in any dialect but `--bare-429`:
//! `error.type` `tokens`, code `rate_limit_exceeded`, "Rate limit reached for M in
//! organization org-mock on tokens per min (TPM): Limit L, Used U, Requested R. Please try
//! again in 1.8s." (the limit per minute, as `x-ratelimit-limit-tokens` says it; used and
//! requested are the window's tokens), or for
//! a request larger than the whole window "Request too large for M … Limit L, Requested
//! R." with no `Retry-After` (it never fits). A request window's 429 keeps its plain body.
//!
//! `Retry-After` is whole seconds rounded up, or with `--retry-after-date` an IMF-fixdate
//! rounded up to the next whole second.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::json;

use super::admit::{Admission, Binding, Refused};
use super::config::MockConfig;
use super::limit::{per_minute, Refusal};
use super::respond::{error, json_response, MockBody};
use super::tokens::{self, TokenQuota, TokenRefusal};

/// The organization OpenAI's 429 messages name.
pub const ORGANIZATION: &str = "org-mock";

/// Which headers the mock sends, fixed at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderPolicy {
    pub openai: bool,
    /// Quota headers on admitted answers.
    pub on_admitted: bool,
    /// Rate-limit headers and `Retry-After` on 429s (off: NVIDIA's bare 429).
    pub on_refused: bool,
    pub retry_after_date: bool,
}

impl HeaderPolicy {
    pub fn from(c: &MockConfig) -> Self {
        Self {
            openai: c.openai_headers,
            on_admitted: !c.no_quota_headers && !c.no_headers_at_all,
            on_refused: !c.no_headers_at_all,
            retry_after_date: c.retry_after_date,
        }
    }
}

/// Quota headers on an admitted answer.
pub fn admitted(h: &mut HeaderMap, policy: HeaderPolicy, a: Admission) {
    if !policy.on_admitted {
        return;
    }
    if let Some(b) = a.requests {
        if policy.openai {
            openai(h, b.max, b.window, b.quota.remaining, b.quota.reset);
        } else {
            h.insert("x-ratelimit-limit", HeaderValue::from(b.max));
            h.insert(
                "x-ratelimit-remaining",
                HeaderValue::from(b.quota.remaining),
            );
            if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", b.quota.reset.as_secs_f64())) {
                h.insert("x-ratelimit-reset", v);
            }
        }
    }
    if let (true, Some(q)) = (policy.openai, a.tokens) {
        openai_tokens(h, q);
    }
}

/// The 429 of a rolling window (a request window or the token window); `model` is named
/// in the token limit's message.
pub fn rate_limited(policy: HeaderPolicy, r: Refused, model: Option<&str>) -> Response<MockBody> {
    match r {
        Refused::Requests { refusal, tokens } => {
            let mut resp = requests_limited(policy, refusal);
            if let (true, true, Some(q)) = (policy.on_refused, policy.openai, tokens) {
                openai_tokens(resp.headers_mut(), q);
            }
            resp
        }
        Refused::Tokens {
            refusal,
            requests,
            tokens,
        } => tokens_limited(policy, refusal, requests, tokens, model),
    }
}

/// The 429 of a request window.
fn requests_limited(policy: HeaderPolicy, r: Refusal) -> Response<MockBody> {
    if !policy.on_refused {
        return nvidia_429(None);
    }
    let mut resp = error(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests");
    let secs = ceil_secs(r.wait).max(1);
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, retry_after(policy, r.wait));
    if policy.openai {
        openai(h, r.max, r.window, 0, r.wait);
    } else {
        h.insert("x-ratelimit-limit", HeaderValue::from(r.max));
        h.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
        h.insert("x-ratelimit-reset", HeaderValue::from(secs));
    }
    resp
}

/// The 429 of the token window, worded as OpenAI's; `requests` and `tokens` are the
/// windows as they stand, for OpenAI's headers.
fn tokens_limited(
    policy: HeaderPolicy,
    r: TokenRefusal,
    requests: Option<Binding>,
    tokens: Option<TokenQuota>,
    model: Option<&str>,
) -> Response<MockBody> {
    if !policy.on_refused {
        return nvidia_429(None);
    }
    let model = model.unwrap_or("unknown");
    let message = match r.wait {
        Some(wait) => format!(
            "Rate limit reached for {model} in organization {ORGANIZATION} on tokens per min \
             (TPM): Limit {}, Used {}, Requested {}. Please try again in {}.",
            tokens::per_minute(r.max, r.window),
            r.used,
            r.requested,
            go_duration(wait)
        ),
        None => format!(
            "Request too large for {model} in organization {ORGANIZATION} on tokens per min \
             (TPM): Limit {}, Requested {}. The input or output tokens must be reduced in \
             order to run successfully.",
            tokens::per_minute(r.max, r.window),
            r.requested
        ),
    };
    let mut resp = json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &json!({"error": {
            "message": message,
            "type": "tokens",
            "param": null,
            "code": "rate_limit_exceeded",
        }}),
    );
    let h = resp.headers_mut();
    if let Some(wait) = r.wait {
        h.insert(header::RETRY_AFTER, retry_after(policy, wait));
    }
    if policy.openai {
        if let Some(b) = requests {
            openai(h, b.max, b.window, b.quota.remaining, b.quota.reset);
        }
        if let Some(q) = tokens {
            openai_tokens(h, q);
        }
    }
    resp
}

fn retry_after(policy: HeaderPolicy, wait: Duration) -> HeaderValue {
    if policy.retry_after_date {
        http_date_after(SystemTime::now(), wait)
    } else {
        HeaderValue::from(ceil_secs(wait).max(1))
    }
}

/// The 429 of a full worker (NVIDIA's wording), with no rate-limit headers.
pub fn worker_limited(limit: usize) -> Response<MockBody> {
    nvidia_429(Some(format!(
        "ResourceExhausted: Worker local total request limit reached ({limit}/{limit})"
    )))
}

fn nvidia_429(detail: Option<String>) -> Response<MockBody> {
    let body = match detail {
        Some(d) => json!({"status": 429, "title": "Too Many Requests", "detail": d}),
        None => json!({"status": 429, "title": "Too Many Requests"}),
    };
    json_response(StatusCode::TOO_MANY_REQUESTS, &body)
}

fn openai(h: &mut HeaderMap, max: usize, window: Duration, remaining: usize, reset: Duration) {
    h.insert(
        "x-ratelimit-limit-requests",
        HeaderValue::from(per_minute(max, window)),
    );
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(remaining),
    );
    if let Ok(v) = HeaderValue::from_str(&go_duration(reset)) {
        h.insert("x-ratelimit-reset-requests", v);
    }
}

fn openai_tokens(h: &mut HeaderMap, q: TokenQuota) {
    h.insert(
        "x-ratelimit-limit-tokens",
        HeaderValue::from(tokens::per_minute(q.max, q.window)),
    );
    h.insert(
        "x-ratelimit-remaining-tokens",
        HeaderValue::from(q.remaining),
    );
    if let Ok(v) = HeaderValue::from_str(&go_duration(q.reset)) {
        h.insert("x-ratelimit-reset-tokens", v);
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `Retry-After` as the IMF-fixdate of `now + wait`, rounded up to a whole second so a
/// client that obeys it never comes back early.
pub fn http_date_after(now: SystemTime, wait: Duration) -> HeaderValue {
    let at = now + wait;
    let since_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = UNIX_EPOCH + Duration::from_secs(ceil_secs(since_epoch));
    HeaderValue::from_str(&httpdate::fmt_http_date(at))
        .unwrap_or_else(|_| HeaderValue::from_static("1"))
}

/// A duration as Go's `time.Duration.String()` writes it, rounded up to a millisecond:
/// `"0s"`, `"250ms"`, `"1s"`, `"1.5s"`, `"6m0s"`, `"1h2m3.004s"`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if h > 0 || m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&s.to_string());
    if frac > 0 {
        let f = format!("{frac:03}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out.push('s');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_as_go_writes_them() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_nanos(1)), "1ms", "rounded up");
        assert_eq!(go_duration(ms(250)), "250ms");
        assert_eq!(go_duration(ms(1000)), "1s");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(17_280)), "17.28s");
        assert_eq!(go_duration(ms(59_999) + Duration::from_micros(1)), "1m0s");
        assert_eq!(go_duration(ms(360_000)), "6m0s");
        assert_eq!(go_duration(ms(90_050)), "1m30.05s");
        assert_eq!(go_duration(ms(3_723_004)), "1h2m3.004s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
    }

    #[test]
    fn http_date_is_rounded_up_to_the_next_second() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let v = http_date_after(now, Duration::from_millis(2_100));
        let at = httpdate::parse_http_date(v.to_str().unwrap()).unwrap();
        assert_eq!(at, UNIX_EPOCH + Duration::from_secs(1_700_000_003));
        assert_eq!(v, "Tue, 14 Nov 2023 22:13:23 GMT");
    }
}
