//! What an upstream answer says about its limits: rate-limit headers, `Retry-After`, and
//! which kind of refusal a 429 is. Pure functions of the answer (and of `now` where a
//! date must become a delay); they never read a clock, never panic, scan at most
//! [`SCAN_LIMIT`] bytes of a body, and [`quota`] / [`retry_after`] do not allocate.
//!
//! **OpenAI's dialect** (`rate_limit_headers = "openai"`):
//! - `x-ratelimit-limit-requests`: requests per minute the provider allows.
//! - `x-ratelimit-remaining-requests`: requests left now.
//! - `x-ratelimit-reset-requests`: time until the quota is *full again* (a Go duration,
//!   `6m0s`, `12ms`), not a window boundary: live values fit continuous refill,
//!   `(limit - remaining) · 60 s / limit` (12 ms at 5000/min is one request's refill).
//!
//! The bare `x-ratelimit-limit` / `-remaining` / `-reset` (plain seconds), which the
//! simulated upstream and some providers send, are read as the same three figures; the
//! `-requests` forms win when both are present. `-1`, negative or garbage figures are
//! absent, and so is a limit of 0, which also voids the remaining count beside it (Azure
//! has sent `-1` and `0` where it had no figure).
//!
//! **On a 429, `Retry-After` beats the reset.** `Retry-After` (and OpenAI's
//! `retry-after-ms`) is the provider's answer about *this* refusal. The reset describes
//! only the request quota and says when it is full, which under continuous refill
//! overstates the wait for one request, and says nothing when the refusal came from the
//! tokens, a per-day limit or a concurrency cap. `Retry-After` is HTTP, not a dialect: it
//! is read whatever the provider's setting.
//!
//! **Tokens** (the token budget's): `x-ratelimit-limit-tokens` (tokens per minute),
//! `-remaining-tokens` and `-reset-tokens` are read by the same pass into
//! [`Quota::tokens`], by the same rules (`-1`, `0` limits are absent); a 429 about tokens
//! is told apart from one about requests by its body (`error.type` or `code` naming
//! tokens, "tokens per min (TPM)", "Request too large"), and its message's figures are
//! read by [`token_refusal`] (`signal/tokens.rs`).
//!
//! **Deliberately not parsed.** `-tokens_usage_based`. Groq's
//! `x-ratelimit-limit-requests` counts per *day*: another dialect, not supported (set
//! such providers to `none`, or the daily figure would be read per minute). Anthropic's
//! `anthropic-ratelimit-*` are not read. A reset given as a Unix time is over a day away
//! and so absent.

use std::time::{Duration, SystemTime};

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use http::StatusCode;
use memchr::memmem;

/// Bytes of a body [`classify`] and [`stated`] look at, whatever they are given.
pub const SCAN_LIMIT: usize = 16 * 1024;

/// What the names of the quota headers [`quota`] reads start with.
const RATELIMIT_PREFIX: &str = "x-ratelimit-";
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");

/// Anthropic's "overloaded" status.
const STATUS_OVERLOADED: u16 = 529;

/// Delays of a day or more are absent: no provider means them, and a Unix time sent as a
/// reset lands here.
const DAY_NANOS: u128 = 86_400 * NANOS_PER_SEC;
const NANOS_PER_SEC: u128 = 1_000_000_000;
const NANOS_PER_MILLI: u128 = 1_000_000;

/// Which rate-limit header family a provider speaks (per-provider setting
/// `rate_limit_headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    OpenAi,
    None,
}

/// The request quota an answer reports (OpenAI's `x-ratelimit-*-requests`, or the bare
/// `x-ratelimit-limit` / `-remaining` / `-reset`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Quota {
    /// Requests per minute the provider allows (`x-ratelimit-limit-requests`), if sent.
    pub limit_rpm: Option<u64>,
    /// Requests left now.
    pub remaining: Option<u64>,
    /// Time until the quota is full again.
    pub reset: Option<Duration>,
    /// The token quota (`x-ratelimit-*-tokens`), if any figure of it was sent.
    pub tokens: Option<TokenQuota>,
}

/// The token quota an answer reports (OpenAI's `x-ratelimit-*-tokens`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TokenQuota {
    /// Tokens per minute the provider allows.
    pub limit_tpm: Option<u64>,
    /// Tokens left now.
    pub remaining: Option<u64>,
    /// Time until the token quota is full again.
    pub reset: Option<Duration>,
}

/// What kind of refusal an answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A request-rate limit: teaches the learned limit.
    RateLimit,
    /// A per-model concurrency cap shared by all keys (NVIDIA's hosted models answer 429
    /// with "Worker local total request limit reached (32/32)", also seen as
    /// "ResourceExhausted"): lowers concurrency / pauses, never the learned rate.
    Concurrency,
    /// A token-per-minute (or per-day) limit: not a request-rate signal.
    Tokens,
    /// Billing or quota exhausted (`insufficient_quota`, or 402): never a pacing signal,
    /// never retried.
    Billing,
    /// 503 or 529 (provider overloaded): pause and slow down, never lower the learned rate.
    Overload,
}

/// What one upstream answer said, as the proxy read it (see [`answer`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Answer {
    /// A 2xx answer.
    pub ok: bool,
    pub refusal: Option<Refusal>,
    /// The provider's `Retry-After` (or `retry-after-ms`).
    pub retry_after: Option<Duration>,
    pub quota: Option<Quota>,
    /// What a 429 about tokens says in its message ([`token_refusal`]).
    pub token_refusal: Option<TokenRefusal>,
}

/// Limit figures an OpenAI-style 429 message states.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stated {
    /// "Limit 60" of a message about requests per minute (RPM).
    pub limit_rpm: Option<u64>,
    /// "Used 60" of the same message.
    pub used: Option<u64>,
    /// "Please try again in 1.8s" (or Azure's "Please retry after 6 seconds").
    pub try_again: Option<Duration>,
}

// === impl Dialect ===

impl Dialect {
    /// `"openai"` or `"none"`, in any case.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("openai") {
            Some(Self::OpenAi)
        } else if s.eq_ignore_ascii_case("none") {
            Some(Self::None)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::None => "none",
        }
    }
}

// === a whole answer ===

/// What an upstream answer says about the provider's limits: its refusal kind (from
/// `body`, the start of its body), `Retry-After` (read only for a refusal, against the
/// wall clock `now`) and quota headers.
pub fn answer(
    status: StatusCode,
    h: &HeaderMap,
    body: &[u8],
    dialect: Dialect,
    now: SystemTime,
) -> Answer {
    let refusal = classify(status, h, body);
    Answer {
        ok: status.is_success(),
        refusal,
        retry_after: refusal.and_then(|_| retry_after(h, now)),
        quota: quota(h, dialect),
        token_refusal: token_refusal(refusal, body),
    }
}

// === headers ===

/// The request quota the headers report; `None` when the dialect is `None` or no figure
/// is present.
///
/// One pass over the headers picks out the six `x-ratelimit-*` figures: this runs on every
/// answer, most of which carry none of them, and six `HeaderMap::get`s hash six names
/// (about 1,100 instructions per request) where the pass compares a prefix per header.
/// The first value of a name is the one taken, as `HeaderMap::get` would (iteration yields
/// a name's values in order, its first one first).
pub fn quota(h: &HeaderMap, dialect: Dialect) -> Option<Quota> {
    if dialect == Dialect::None {
        return None;
    }
    // limit, remaining, reset: `-requests` forms, the bare ones, then `-tokens`.
    let mut found: [Option<&HeaderValue>; 9] = [None; 9];
    for (name, value) in h {
        let Some(rest) = name.as_str().strip_prefix(RATELIMIT_PREFIX) else {
            continue;
        };
        let slot = match rest {
            "limit-requests" => 0,
            "remaining-requests" => 1,
            "reset-requests" => 2,
            "limit" => 3,
            "remaining" => 4,
            "reset" => 5,
            "limit-tokens" => 6,
            "remaining-tokens" => 7,
            "reset-tokens" => 8,
            _ => continue,
        };
        found[slot].get_or_insert(value);
    }
    if found == [None; 9] {
        return None;
    }
    let specific = family(found[0], found[1], found[2]);
    let bare = family(found[3], found[4], found[5]);
    let tokens = family(found[6], found[7], found[8]);
    let tokens = TokenQuota {
        limit_tpm: tokens.limit_rpm,
        remaining: tokens.remaining,
        reset: tokens.reset,
    };
    let q = Quota {
        // The bare `x-ratelimit-limit` names no period (per minute here, per window or
        // per hour elsewhere), so only its remaining count and reset are taken.
        limit_rpm: specific.limit_rpm,
        remaining: specific.remaining.or(bare.remaining),
        reset: specific.reset.or(bare.reset),
        tokens: (tokens != TokenQuota::default()).then_some(tokens),
    };
    (q != Quota::default()).then_some(q)
}

/// One header family's figures (the values of its limit, remaining and reset headers);
/// a limit of zero or less voids the remaining count too.
fn family(
    limit: Option<&HeaderValue>,
    remaining: Option<&HeaderValue>,
    reset: Option<&HeaderValue>,
) -> Quota {
    let limit = limit.and_then(integer);
    let void = limit.is_some_and(|n| n <= 0);
    let count = |v: Option<i64>| v.and_then(|n| u64::try_from(n).ok());
    Quota {
        limit_rpm: count(limit).filter(|&n| n > 0),
        remaining: count(remaining.and_then(integer)).filter(|_| !void),
        reset: reset.and_then(|v| v.to_str().ok()).and_then(parse_delay),
        tokens: None,
    }
}

/// A header's value as an integer, sign allowed (`-1` must read as a number so that it
/// can void its family).
fn integer(v: &HeaderValue) -> Option<i64> {
    let s = v.as_bytes().trim_ascii();
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0i64, |n, d| n * 10 + i64::from(d - b'0'));
    Some(if negative { -n } else { n })
}

/// How long the provider asked us to wait: `retry-after-ms` (float milliseconds) first,
/// then `retry-after` as seconds (integer or float) or as an HTTP date relative to `now`
/// (a past date is zero). A day or more, negative or garbage is absent; a garbage
/// `retry-after-ms` falls back to `retry-after`.
pub fn retry_after(h: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(d) = h
        .get(&RETRY_AFTER_MS)
        .and_then(|v| decimal(v.as_bytes().trim_ascii(), NANOS_PER_MILLI))
    {
        return Some(d);
    }
    let v = h.get(&RETRY_AFTER)?.to_str().ok()?.trim();
    if let Some(d) = decimal(v.as_bytes(), NANOS_PER_SEC) {
        return Some(d);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let d = at.duration_since(now).unwrap_or(Duration::ZERO);
    (d.as_nanos() < DAY_NANOS).then_some(d)
}

// === durations ===

/// A Go-style duration (`6m0s`, `1m30.5s`, `12ms`, `1h`, `1.5µs`) or plain seconds (`2`,
/// `1.5`), surrounding whitespace ignored; `None` for garbage, a sign, or a day or more.
pub fn parse_delay(raw: &str) -> Option<Duration> {
    let s = raw.trim().as_bytes();
    if let Some(d) = decimal(s, NANOS_PER_SEC) {
        return Some(d);
    }
    if s.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let (value, tail) = leading_decimal(rest)?;
        let (unit, next) = leading_unit(tail)?;
        total = total.saturating_add(value.saturating_mul(unit) / NANOS_PER_SEC);
        if total >= DAY_NANOS {
            return None;
        }
        rest = next;
    }
    nanos(total)
}

/// `s`, all of it, as an unsigned decimal count of `unit` nanoseconds.
fn decimal(s: &[u8], unit: u128) -> Option<Duration> {
    match leading_decimal(s)? {
        (value, []) => nanos(value.saturating_mul(unit) / NANOS_PER_SEC),
        _ => None,
    }
}

/// Reads an unsigned decimal (`12`, `1.5`, `.5`, `5.`) off the front of `s`: its value
/// in billionths (exact to nine decimals, saturating) and the rest of `s`.
fn leading_decimal(s: &[u8]) -> Option<(u128, &[u8])> {
    let int_len = s.iter().take_while(|b| b.is_ascii_digit()).count();
    let (int, rest) = s.split_at(int_len);
    let (frac, rest) = match rest.split_first() {
        Some((b'.', after)) => {
            let n = after.iter().take_while(|b| b.is_ascii_digit()).count();
            after.split_at(n)
        }
        _ => (&[][..], rest),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let whole = int.iter().fold(0u128, |n, d| {
        n.saturating_mul(10).saturating_add(u128::from(d - b'0'))
    });
    let mut part = 0u128;
    let mut scale = NANOS_PER_SEC;
    for d in frac.iter().take(9) {
        scale /= 10;
        part += u128::from(d - b'0') * scale;
    }
    Some((
        whole.saturating_mul(NANOS_PER_SEC).saturating_add(part),
        rest,
    ))
}

/// Reads a Go duration unit off the front of `s`: its length in nanoseconds and the rest.
fn leading_unit(s: &[u8]) -> Option<(u128, &[u8])> {
    const UNITS: [(&[u8], u128); 8] = [
        (b"ns", 1),
        (b"us", 1_000),
        ("\u{b5}s".as_bytes(), 1_000),  // micro sign
        ("\u{3bc}s".as_bytes(), 1_000), // Greek mu
        (b"ms", NANOS_PER_MILLI),
        (b"s", NANOS_PER_SEC),
        (b"m", 60 * NANOS_PER_SEC),
        (b"h", 3_600 * NANOS_PER_SEC),
    ];
    UNITS
        .iter()
        .find_map(|&(name, ns)| s.strip_prefix(name).map(|rest| (ns, rest)))
}

fn nanos(n: u128) -> Option<Duration> {
    if n >= DAY_NANOS {
        return None;
    }
    u64::try_from(n).ok().map(Duration::from_nanos)
}

// === bodies ===

/// What kind of refusal an answer is; `None` when it is not one. `body` may be empty,
/// truncated, not JSON or not UTF-8; only its first [`SCAN_LIMIT`] bytes are read, and
/// only for a 429.
pub fn classify(status: StatusCode, h: &HeaderMap, body: &[u8]) -> Option<Refusal> {
    match status.as_u16() {
        429 => {}
        402 => return Some(Refusal::Billing),
        503 | STATUS_OVERLOADED => return Some(Refusal::Overload),
        _ => return None,
    }
    let text = lowered(body);
    let has = |needle: &[u8]| memmem::find(&text, needle).is_some();
    if has(b"insufficient_quota") {
        return Some(Refusal::Billing);
    }
    if has(b"worker local total request limit") || has(b"resourceexhausted") {
        return Some(Refusal::Concurrency);
    }
    match body_limit(&text) {
        Some(Counted::Tokens) => return Some(Refusal::Tokens),
        Some(Counted::Requests) => return Some(Refusal::RateLimit),
        None => {}
    }
    // No word in the body: OpenAI's headers still tell a spent token budget.
    let tokens_left = h.get(&REMAINING_TOKENS).and_then(integer);
    let requests_left = h
        .get(&REMAINING_REQUESTS)
        .or_else(|| h.get(&REMAINING))
        .and_then(integer);
    let requests_spent = matches!(requests_left, Some(n) if n <= 0);
    if tokens_left == Some(0) && !requests_spent {
        return Some(Refusal::Tokens);
    }
    Some(Refusal::RateLimit)
}

/// What a 429 body says was counted.
enum Counted {
    Requests,
    Tokens,
}

/// OpenAI's `error.type` (`"tokens"`, `"tokens_usage_based"`, `"requests"`), a `code`
/// naming tokens, or the message's "on tokens per min (TPM)" / "… tokens per minute".
/// `text` is lowered.
fn body_limit(text: &[u8]) -> Option<Counted> {
    let mut requests = false;
    for value in string_values(text, b"\"type\"") {
        if value.starts_with(b"tokens") {
            return Some(Counted::Tokens);
        }
        requests |= value.starts_with(b"requests");
    }
    let tokens_code =
        string_values(text, b"\"code\"").any(|v| memmem::find(v, b"tokens").is_some());
    if tokens_code
        || memmem::find(text, b"on tokens per").is_some()
        || memmem::find(text, b"tokens per min").is_some()
        || memmem::find(text, TOO_LARGE).is_some()
    {
        return Some(Counted::Tokens);
    }
    (requests || memmem::find(text, b"on requests per").is_some()).then_some(Counted::Requests)
}

/// The string values (their first 64 bytes) of a JSON key wherever it occurs in `text`,
/// found without parsing, so a truncated body still yields them.
fn string_values<'a>(text: &'a [u8], key: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    memmem::find_iter(text, key).filter_map(move |at| {
        let rest = skip_space(&text[at + key.len()..]);
        let rest = skip_space(rest.strip_prefix(b":")?);
        let rest = rest.strip_prefix(b"\"")?;
        let rest = &rest[..rest.len().min(64)];
        Some(&rest[..memchr::memchr(b'"', rest).unwrap_or(rest.len())])
    })
}

fn skip_space(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// Limit figures an OpenAI-style 429 message states: "Rate limit reached for M in
/// organization O on requests per min (RPM): Limit 60, Used 60, Requested 1. Please try
/// again in 1.8s." gives limit 60, used 60, try again in 1.8 s. Limit and used are read
/// only from a message about requests per minute (a TPM or RPD message gives only the
/// wait). `None` when the message states none of them.
pub fn stated(body: &[u8]) -> Option<Stated> {
    let text = lowered(body);
    let per_minute = memmem::find(&text, b"on requests per min").is_some();
    let figure = |label: &[u8]| per_minute.then(|| labelled_count(&text, label)).flatten();
    let s = Stated {
        limit_rpm: figure(b"limit ").filter(|&n| n > 0),
        used: figure(b"used "),
        try_again: try_again(&text),
    };
    (s != Stated::default()).then_some(s)
}

/// The first count that directly follows `label` ("limit 60": 60).
fn labelled_count(text: &[u8], label: &[u8]) -> Option<u64> {
    memmem::find_iter(text, label).find_map(|at| {
        let rest = &text[at + label.len()..];
        let n = rest
            .iter()
            .take(20)
            .take_while(|b| b.is_ascii_digit())
            .count();
        std::str::from_utf8(&rest[..n]).ok()?.parse().ok()
    })
}

/// "try again in 1.8s" (a Go duration, sentence dot dropped) or "retry after 6 seconds".
fn try_again(text: &[u8]) -> Option<Duration> {
    const PHRASE: &[u8] = b"try again in ";
    let go = memmem::find_iter(text, PHRASE).find_map(|at| {
        let rest = &text[at + PHRASE.len()..];
        let n = rest
            .iter()
            .take(64)
            .take_while(|&&b| b.is_ascii_digit() || b".hmsun".contains(&b) || b >= 0x80)
            .count();
        let token = rest[..n].strip_suffix(b".").unwrap_or(&rest[..n]);
        parse_delay(std::str::from_utf8(token).ok()?)
    });
    go.or_else(|| {
        const AZURE: &[u8] = b"retry after ";
        memmem::find_iter(text, AZURE).find_map(|at| {
            let (value, rest) = leading_decimal(&text[at + AZURE.len()..])?;
            rest.strip_prefix(b" second")?;
            nanos(value)
        })
    })
}

/// The first [`SCAN_LIMIT`] bytes, ASCII lowered (other bytes kept as they are).
fn lowered(body: &[u8]) -> Vec<u8> {
    body[..body.len().min(SCAN_LIMIT)].to_ascii_lowercase()
}

#[cfg(all(test, not(sidecar_loom)))]
mod tokens;

// What a 429 about tokens says in its message (OpenAI's): "Rate limit reached for M in
// organization O on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000.
// Please try again in 2s." gives the limit per minute, the used and requested counts
// and the wait; "Request too large for M … on tokens per min (TPM): Limit 30000,
// Requested 36055" is a request that never fits, whatever the wait. Figures are read
// only from a per-minute message (a TPD message's limit is per day); the wait from any.

/// The figures of a 429 about tokens (`refusal` as [`classify`] told it; `None`
/// for any other answer). Only the first [`SCAN_LIMIT`] bytes of `body` are read.
#[inline]
pub fn token_refusal(refusal: Option<Refusal>, body: &[u8]) -> Option<TokenRefusal> {
    if refusal != Some(Refusal::Tokens) {
        return None;
    }
    read_token_refusal(body)
}

#[cold]
fn read_token_refusal(body: &[u8]) -> Option<TokenRefusal> {
    let text = lowered(body);
    let per_minute = memmem::find(&text, b"tokens per min").is_some();
    let figure = |label: &[u8]| per_minute.then(|| labelled_count(&text, label)).flatten();
    Some(TokenRefusal {
        limit_tpm: figure(b"limit ").filter(|&n| n > 0),
        used: figure(b"used "),
        requested: figure(b"requested "),
        too_large: memmem::find(&text, TOO_LARGE).is_some(),
        try_again: try_again(&text),
    })
}

/// OpenAI's message for a request larger than the whole per-minute budget.
const TOO_LARGE: &[u8] = b"request too large";

/// The figures of a 429 about tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenRefusal {
    /// "Limit 30000" of a tokens-per-minute message.
    pub limit_tpm: Option<u64>,
    /// "Used 29000".
    pub used: Option<u64>,
    /// "Requested 2000".
    pub requested: Option<u64>,
    /// "Request too large": it never fits; waiting does not help.
    pub too_large: bool,
    /// "Please try again in 2s".
    pub try_again: Option<Duration>,
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests;
