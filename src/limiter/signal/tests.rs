//! Every header form, refusal kind and message the classifier reads, and that no input
//! makes it panic.
use std::time::UNIX_EPOCH;

use proptest::prelude::*;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for &(name, value) in pairs {
        h.append(name, HeaderValue::from_static(value));
    }
    h
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap()
}

/// A fixed `now`: Sun, 06 Nov 1994 08:49:37 GMT minus 3 s.
fn before_rfc_example() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(784_111_777 - 3)
}

const OPENAI_RPM: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on requests per min (RPM): Limit 60, Used 60, Requested 1. Please try again in 1.8s. Visit https://platform.openai.com/account/rate-limits to learn more.","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
const OPENAI_TPM: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-abc on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 2.4s.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
const OPENAI_BILLING: &str = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","param":null,"code":"insufficient_quota"}}"#;
const NVIDIA_429: &str = r#"{"status":429,"title":"Too Many Requests"}"#;
const NVIDIA_WORKER: &str = r#"{"status":429,"title":"Too Many Requests","detail":"Worker local total request limit reached (32/32)"}"#;

// === Dialect ===

#[test]
fn dialect_names_round_trip_and_unknown_names_are_refused() {
    for d in [Dialect::OpenAi, Dialect::None] {
        assert_eq!(Dialect::parse(d.as_str()), Some(d));
    }
    assert_eq!(Dialect::parse(" OpenAI "), Some(Dialect::OpenAi));
    assert_eq!(Dialect::parse("groq"), None);
    assert_eq!(Dialect::parse(""), None);
    assert_eq!(Dialect::default(), Dialect::OpenAi);
}

// === quota ===

#[test]
fn openai_request_headers_give_limit_remaining_and_time_until_full() {
    let h = headers(&[
        ("x-ratelimit-limit-requests", "5000"),
        ("x-ratelimit-remaining-requests", "4999"),
        ("x-ratelimit-reset-requests", "12ms"),
    ]);
    assert_eq!(
        quota(&h, Dialect::OpenAi),
        Some(Quota {
            limit_rpm: Some(5000),
            remaining: Some(4999),
            reset: Some(ms(12)),
            tokens: None,
        })
    );
}

#[test]
fn bare_headers_give_the_remaining_count_and_reset_but_not_a_limit_of_no_named_period() {
    let h = headers(&[
        ("x-ratelimit-limit", "40"),
        ("x-ratelimit-remaining", "0"),
        ("x-ratelimit-reset", "1.250"),
    ]);
    assert_eq!(
        quota(&h, Dialect::OpenAi),
        Some(Quota {
            limit_rpm: None,
            remaining: Some(0),
            reset: Some(ms(1250)),
            tokens: None,
        })
    );
}

#[test]
fn request_specific_headers_win_over_bare_ones_field_by_field() {
    let h = headers(&[
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-limit", "99"),
        ("x-ratelimit-remaining", "7"),
        ("x-ratelimit-reset-requests", "6m0s"),
        ("x-ratelimit-reset", "1"),
    ]);
    assert_eq!(
        quota(&h, Dialect::OpenAi),
        Some(Quota {
            limit_rpm: Some(60),
            remaining: Some(7),
            reset: Some(Duration::from_secs(360)),
            tokens: None,
        })
    );
}

#[test]
fn negative_garbage_and_zero_limits_are_absent() {
    // Azure's "no figure": -1 everywhere.
    let h = headers(&[
        ("x-ratelimit-limit-requests", "-1"),
        ("x-ratelimit-remaining-requests", "-1"),
    ]);
    assert_eq!(quota(&h, Dialect::OpenAi), None);
    // A limit of 0 is absent and voids the 0 remaining beside it.
    let h = headers(&[
        ("x-ratelimit-limit-requests", "0"),
        ("x-ratelimit-remaining-requests", "0"),
    ]);
    assert_eq!(quota(&h, Dialect::OpenAi), None);
    let h = headers(&[
        ("x-ratelimit-limit-requests", "lots"),
        ("x-ratelimit-remaining-requests", "1.5"),
        ("x-ratelimit-reset-requests", "-1s"),
        ("x-ratelimit-reset", "soon"),
    ]);
    assert_eq!(quota(&h, Dialect::OpenAi), None);
    // A Unix time as a reset is over a day away.
    let h = headers(&[("x-ratelimit-reset", "1730000000")]);
    assert_eq!(quota(&h, Dialect::OpenAi), None);
}

#[test]
fn an_answer_without_rate_limit_headers_has_no_quota() {
    assert_eq!(quota(&HeaderMap::new(), Dialect::OpenAi), None);
    let h = headers(&[("content-type", "application/json")]);
    assert_eq!(quota(&h, Dialect::OpenAi), None);
}

#[test]
fn a_repeated_quota_header_is_read_by_its_first_value_among_any_others() {
    // `quota` reads the headers in one pass; `HeaderMap::get`, which it replaced, gave the
    // first value of a name, whatever came between.
    let h = headers(&[
        ("x-ratelimit-remaining", "7"),
        ("content-type", "application/json"),
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining", "9"),
        ("x-ratelimit-limit-requests", "0"),
        ("x-ratelimit-reset", "2"),
    ]);
    assert_eq!(
        quota(&h, Dialect::OpenAi),
        Some(Quota {
            limit_rpm: Some(60),
            remaining: Some(7),
            reset: Some(Duration::from_secs(2)),
            tokens: None,
        })
    );
}

#[test]
fn token_headers_are_read_as_the_token_quota_not_the_request_quota() {
    let h = headers(&[
        ("x-ratelimit-limit-tokens", "160000"),
        ("x-ratelimit-remaining-tokens", "159976"),
        ("x-ratelimit-reset-tokens", "6m0s"),
    ]);
    assert_eq!(
        quota(&h, Dialect::OpenAi),
        Some(Quota {
            tokens: Some(TokenQuota {
                limit_tpm: Some(160_000),
                remaining: Some(159_976),
                reset: Some(Duration::from_secs(360)),
            }),
            ..Quota::default()
        })
    );
}

#[test]
fn a_token_limit_of_minus_one_or_zero_is_absent_and_voids_its_remaining_count() {
    for limit in ["-1", "0"] {
        let h = headers(&[
            ("x-ratelimit-limit-tokens", limit),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "12ms"),
        ]);
        let t = quota(&h, Dialect::OpenAi).and_then(|q| q.tokens).unwrap();
        assert_eq!((t.limit_tpm, t.remaining), (None, None), "limit {limit}");
        assert_eq!(t.reset, Some(ms(12)));
    }
    let h = headers(&[("x-ratelimit-limit-tokens", "-1")]);
    assert_eq!(quota(&h, Dialect::OpenAi), None);
}

#[test]
fn dialect_none_ignores_rate_limit_headers_but_not_retry_after() {
    let h = headers(&[
        ("x-ratelimit-limit-requests", "60"),
        ("x-ratelimit-remaining-requests", "0"),
        ("retry-after", "3"),
    ]);
    assert_eq!(quota(&h, Dialect::None), None);
    assert_eq!(retry_after(&h, UNIX_EPOCH), Some(ms(3000)));
}

// === retry_after ===

#[test]
fn retry_after_ms_wins_over_retry_after() {
    let h = headers(&[("retry-after-ms", "1500.5"), ("retry-after", "30")]);
    assert_eq!(
        retry_after(&h, UNIX_EPOCH),
        Some(Duration::from_micros(1_500_500))
    );
}

#[test]
fn a_garbage_retry_after_ms_falls_back_to_retry_after() {
    let h = headers(&[("retry-after-ms", "-5"), ("retry-after", "2")]);
    assert_eq!(retry_after(&h, UNIX_EPOCH), Some(ms(2000)));
}

#[test]
fn retry_after_reads_integer_and_fractional_seconds() {
    for (raw, want) in [("2", ms(2000)), (" 1.5 ", ms(1500)), ("0", Duration::ZERO)] {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static(raw));
        assert_eq!(retry_after(&h, UNIX_EPOCH), Some(want), "{raw:?}");
    }
}

#[test]
fn retry_after_as_an_http_date_is_the_time_until_then() {
    let now = UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
    let date = httpdate::fmt_http_date(now + Duration::from_secs(5));
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
    // The date has whole seconds: up to one second short.
    let d = retry_after(&h, now).unwrap();
    assert!(d > ms(4000) && d <= ms(5000), "{d:?}");
}

#[test]
fn a_retry_after_date_in_the_past_is_zero() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let date = httpdate::fmt_http_date(now - Duration::from_secs(60));
    let mut h = HeaderMap::new();
    h.insert(RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
    assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
}

#[test]
fn the_obsolete_date_forms_are_read_too() {
    for raw in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ] {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static(raw));
        assert_eq!(
            retry_after(&h, before_rfc_example()),
            Some(ms(3000)),
            "{raw:?}"
        );
    }
}

#[test]
fn retry_after_of_a_day_or_more_negative_or_garbage_is_absent() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let far = httpdate::fmt_http_date(now + Duration::from_secs(2 * 86_400));
    for raw in [
        "86400",
        "-1",
        "soon",
        "1s",
        "",
        "inf",
        "NaN",
        "1e3",
        far.as_str(),
    ] {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(raw).unwrap());
        assert_eq!(retry_after(&h, now), None, "{raw:?}");
    }
    assert_eq!(retry_after(&HeaderMap::new(), now), None);
}

// === parse_delay ===

#[test]
fn go_durations_and_plain_seconds_parse_exactly() {
    for (raw, want) in [
        ("6m0s", ms(360_000)),
        ("1m30.5s", ms(90_500)),
        ("12ms", ms(12)),
        ("1h", ms(3_600_000)),
        ("250ms", ms(250)),
        ("1.5", ms(1500)),
        ("2", ms(2000)),
        ("0", Duration::ZERO),
        ("1s", ms(1000)),
        ("1.5s", ms(1500)),
        ("1h2m3s", ms(3_723_000)),
        ("2h18m0.576s", ms(8_280_576)),
        (".5s", ms(500)),
        ("1.5µs", Duration::from_nanos(1500)),
        ("3us", Duration::from_micros(3)),
        ("7ns", Duration::from_nanos(7)),
        (" 1.5 ", ms(1500)),
        (
            "23h59m59.999999999s",
            Duration::from_nanos(86_400 * 1_000_000_000 - 1),
        ),
    ] {
        assert_eq!(parse_delay(raw), Some(want), "{raw:?}");
    }
}

#[test]
fn garbage_signs_and_a_day_or_more_are_absent() {
    for raw in [
        "",
        "   ",
        "soon",
        "-1",
        "-1s",
        "+1s",
        "1x",
        "s",
        "1s2",
        "1m30",
        "1.2.3s",
        ".",
        ".s",
        "NaN",
        "inf",
        "1e3",
        "86400",
        "24h",
        "1440m",
        "23h60m",
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "99999999999999999999999999999999999999999h",
    ] {
        assert_eq!(parse_delay(raw), None, "{raw:?}");
    }
}

// === classify ===

#[test]
fn nvidias_plain_429_is_a_rate_limit() {
    let h = HeaderMap::new();
    let c = classify(status(429), &h, NVIDIA_429.as_bytes());
    assert_eq!(c, Some(Refusal::RateLimit));
}

#[test]
fn a_429_with_an_empty_truncated_or_binary_body_is_a_rate_limit() {
    let h = HeaderMap::new();
    for body in [
        &b""[..],
        b"Too Many Requests",
        b"{\"error\":{\"mess",
        b"\xff\xfe\x00\x80",
    ] {
        assert_eq!(classify(status(429), &h, body), Some(Refusal::RateLimit));
    }
}

#[test]
fn nvidias_worker_limit_is_a_concurrency_cap() {
    let h = HeaderMap::new();
    for body in [
        NVIDIA_WORKER,
        "ResourceExhausted: Worker local total request limit reached (32/32)",
        "grpc status ResourceExhausted",
    ] {
        assert_eq!(
            classify(status(429), &h, body.as_bytes()),
            Some(Refusal::Concurrency),
            "{body}"
        );
    }
}

#[test]
fn openais_request_429_is_a_rate_limit() {
    let h = HeaderMap::new();
    assert_eq!(
        classify(status(429), &h, OPENAI_RPM.as_bytes()),
        Some(Refusal::RateLimit)
    );
}

#[test]
fn openais_token_429_is_a_token_limit() {
    let h = HeaderMap::new();
    for body in [
        OPENAI_TPM,
        r#"{"error":{"message":"limit hit","type" : "tokens_usage_based","code":null}}"#,
        r#"{"error":{"message":"Request too large for gpt-4 on tokens per min (TPM): Limit 10000, Requested 36055."}}"#,
        r#"{"error":{"message":"x","code":"tokens_exceeded"}}"#,
        // Anthropic: the message says tokens per minute.
        r#"{"type":"error","error":{"type":"rate_limit_error","message":"exceeds 50,000 input tokens per minute"}}"#,
        // Truncated before the message ends: the type alone tells.
        r#"{"error":{"type":"tokens","message":"Rate limit reached for gpt-4o in orga"#,
    ] {
        assert_eq!(
            classify(status(429), &h, body.as_bytes()),
            Some(Refusal::Tokens),
            "{body}"
        );
    }
}

#[test]
fn a_429_whose_headers_show_tokens_spent_but_requests_left_is_a_token_limit() {
    let h = headers(&[
        ("x-ratelimit-remaining-requests", "12"),
        ("x-ratelimit-remaining-tokens", "0"),
    ]);
    assert_eq!(classify(status(429), &h, b""), Some(Refusal::Tokens));
    let h = headers(&[
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-remaining-tokens", "0"),
    ]);
    assert_eq!(classify(status(429), &h, b""), Some(Refusal::RateLimit));
    // The body's word beats the headers.
    let h = headers(&[
        ("x-ratelimit-remaining-requests", "12"),
        ("x-ratelimit-remaining-tokens", "0"),
    ]);
    assert_eq!(
        classify(status(429), &h, OPENAI_RPM.as_bytes()),
        Some(Refusal::RateLimit)
    );
}

#[test]
fn insufficient_quota_and_402_are_billing() {
    let h = HeaderMap::new();
    assert_eq!(
        classify(status(429), &h, OPENAI_BILLING.as_bytes()),
        Some(Refusal::Billing)
    );
    assert_eq!(classify(status(402), &h, b""), Some(Refusal::Billing));
}

#[test]
fn a_503_or_529_is_overload() {
    let h = HeaderMap::new();
    assert_eq!(classify(status(503), &h, b""), Some(Refusal::Overload));
    let anthropic =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    assert_eq!(
        classify(status(529), &h, anthropic),
        Some(Refusal::Overload)
    );
}

#[test]
fn other_statuses_are_not_refusals_whatever_the_body() {
    let h = headers(&[("x-ratelimit-remaining-requests", "0")]);
    for code in [200, 400, 401, 404, 500, 502, 504] {
        for body in [OPENAI_RPM, OPENAI_BILLING, NVIDIA_WORKER] {
            assert_eq!(classify(status(code), &h, body.as_bytes()), None, "{code}");
        }
    }
}

#[test]
fn only_the_first_scan_limit_bytes_of_a_body_are_read() {
    let mut body = vec![b' '; SCAN_LIMIT];
    body.extend_from_slice(b"insufficient_quota");
    let h = HeaderMap::new();
    assert_eq!(classify(status(429), &h, &body), Some(Refusal::RateLimit));
}

// === stated ===

#[test]
fn stated_reads_limit_used_and_wait_from_openais_request_message() {
    assert_eq!(
        stated(OPENAI_RPM.as_bytes()),
        Some(Stated {
            limit_rpm: Some(60),
            used: Some(60),
            try_again: Some(ms(1800)),
        })
    );
}

#[test]
fn stated_gives_only_the_wait_for_token_and_per_day_messages() {
    assert_eq!(
        stated(OPENAI_TPM.as_bytes()),
        Some(Stated {
            try_again: Some(ms(2400)),
            ..Stated::default()
        })
    );
    let rpd = b"Rate limit reached for o1 on requests per day (RPD): Limit 200, Used 200, Requested 1. Please try again in 7m12s.";
    assert_eq!(
        stated(rpd),
        Some(Stated {
            try_again: Some(ms(432_000)),
            ..Stated::default()
        })
    );
}

#[test]
fn stated_reads_go_durations_and_azures_seconds() {
    let go = b"on requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in 20ms.";
    assert_eq!(
        stated(go),
        Some(Stated {
            limit_rpm: Some(3),
            used: Some(3),
            try_again: Some(ms(20)),
        })
    );
    let azure = b"Requests to the ChatCompletions_Create Operation have exceeded call rate limit of your current OpenAI S0 pricing tier. Please retry after 6 seconds.";
    assert_eq!(
        stated(azure),
        Some(Stated {
            try_again: Some(ms(6000)),
            ..Stated::default()
        })
    );
}

#[test]
fn stated_is_none_without_figures() {
    for body in [
        NVIDIA_429.as_bytes(),
        NVIDIA_WORKER.as_bytes(),
        b"",
        b"please try again later",
        b"\xff\xfe try again in \xff",
    ] {
        assert_eq!(stated(body), None);
    }
}

// === totality ===

const FRAGMENTS: [&str; 16] = [
    "try again in ",
    "retry after ",
    " second",
    "on requests per min",
    "limit ",
    "used ",
    "\"type\"",
    ":",
    "\"tokens",
    "\"code\"",
    "1.8s",
    "99999999999999999999999",
    "µ",
    ".",
    "ms",
    "insufficient_quota",
];

proptest! {
    #[test]
    fn body_readers_never_panic_on_any_bytes(
        code in 100u16..1000,
        body in any::<Vec<u8>>(),
    ) {
        let _ = classify(status(code), &HeaderMap::new(), &body);
        let _ = classify(status(429), &HeaderMap::new(), &body);
        let _ = stated(&body);
    }

    #[test]
    fn body_readers_never_panic_on_near_miss_messages(
        parts in prop::collection::vec(prop::sample::select(FRAGMENTS.to_vec()), 0..24),
    ) {
        let body = parts.concat();
        let _ = classify(status(429), &HeaderMap::new(), body.as_bytes());
        if let Some(s) = stated(body.as_bytes()) {
            prop_assert!(s.try_again.is_none_or(|d| d < Duration::from_secs(86_400)));
        }
    }

    #[test]
    fn parse_delay_never_panics_and_stays_below_a_day(raw in any::<String>()) {
        if let Some(d) = parse_delay(&raw) {
            prop_assert!(d < Duration::from_secs(86_400));
        }
    }

    #[test]
    fn parse_delay_reads_back_any_go_formatted_millisecond_count(n in 0u64..86_400_000) {
        let (h, m, s, frac) = (n / 3_600_000, n / 60_000 % 60, n / 1000 % 60, n % 1000);
        let go = format!("{h}h{m}m{s}.{frac:03}s");
        prop_assert_eq!(parse_delay(&go), Some(ms(n)));
        prop_assert_eq!(parse_delay(&format!("{}.{frac:03}", n / 1000)), Some(ms(n)));
    }

    #[test]
    fn header_readers_never_panic_on_any_value(raw in any::<String>(), secs in any::<u64>()) {
        let Ok(v) = HeaderValue::from_str(&raw) else { return Ok(()) };
        let mut h = HeaderMap::new();
        let limit = HeaderName::from_static("x-ratelimit-limit-requests");
        let reset = HeaderName::from_static("x-ratelimit-reset");
        for name in [RETRY_AFTER_MS, RETRY_AFTER, limit, REMAINING, reset, REMAINING_TOKENS] {
            h.insert(name, v.clone());
        }
        let now = UNIX_EPOCH.checked_add(Duration::from_secs(secs)).unwrap_or(UNIX_EPOCH);
        let _ = retry_after(&h, now);
        let _ = quota(&h, Dialect::OpenAi);
        let _ = classify(status(429), &h, raw.as_bytes());
        h.remove(RETRY_AFTER_MS);
        let _ = retry_after(&h, now);
    }
}
