//! The admin API end to end (`/api/admin/config`): bad patches are refused whole with a
//! message naming the field, the authentication modes, what a change does to the
//! running limiter, concurrent changes under traffic, and secrets in the answers.
//!
//! The log level (process-global logging) is tested with the real binary in
//! `tests/reload.rs`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, StatusCode};
use nvidia_sidecar::clock::Clock;
use serde_json::Value;

const TOKEN: &str = "adm-t0ken-integration-7c41e9";
const BEARER: &str = "Bearer adm-t0ken-integration-7c41e9";
const PROVIDER_KEY: &str = "nvapi-provider-key-0001";

fn with_token(env: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut all = vec![("SIDECAR_ADMIN_TOKEN", TOKEN)];
    all.extend_from_slice(env);
    all
}

/// The version of a `GET` answer, as a number.
fn version(v: &Value) -> u64 {
    v["version"]
        .as_str()
        .unwrap_or_else(|| panic!("version is a string: {v}"))
        .parse()
        .expect("a numeric version")
}

async fn admin_changes(metrics: SocketAddr) -> (f64, f64) {
    let text = metrics_text(metrics).await;
    let get = |result: &str| {
        sample(
            &text,
            &format!("sidecar_admin_changes_total{{result=\"{result}\"}}"),
        )
        .unwrap_or_else(|| panic!("no sidecar_admin_changes_total{{result={result:?}}}: {text}"))
    };
    (get("applied"), get("rejected"))
}

fn message(a: &Answer) -> String {
    a.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// One refused write: the body (sent whole, or chunked without `Content-Length`), extra
/// headers, and what the answer must be.
struct Bad {
    body: String,
    chunked: bool,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    code: &'static str,
    /// Substrings the error message must contain.
    says: Vec<&'static str>,
}

fn bad(body: &str, status: u16, code: &'static str, says: &[&'static str]) -> Bad {
    Bad {
        body: body.to_owned(),
        chunked: false,
        headers: Vec::new(),
        status,
        code,
        says: says.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_patches_are_refused_whole_with_a_message_naming_the_field_and_change_nothing() {
    let s = stack(unlimited_mock(), &with_token(&[]));
    let before = admin_get(s.addr, &[]).await;
    assert_eq!(before.status, 200);
    let before = before.json();
    assert_eq!(before["version"], "1");
    const RATE: &str = "a number of requests per minute above 0, at most 6000000";
    const SECONDS: &str = "a number of seconds from 0.001 to 86400";
    let big = format!(r#"{{"rate_rpm": 100, "pad": "{}"}}"#, "x".repeat(70 * 1024));
    let mut table = vec![
        // Unknown names.
        bad(
            r#"{"zzz": 1}"#,
            400,
            "unknown_field",
            &[
                "\"zzz\"",
                "accepted: rate_rpm, bucket_capacity",
                "providers",
            ],
        ),
        bad(
            r#"{"providers": {"nvidia": {"zzz": 1}}}"#,
            400,
            "unknown_field",
            &[
                "\"providers.nvidia.zzz\"",
                "accepted: rate_rpm, bucket_capacity, queue_max_size, low_priority_timeout",
            ],
        ),
        bad(
            r#"{"providers": {"openai": {"rate_rpm": 5}}}"#,
            400,
            "unknown_provider",
            &["\"openai\"", "configured: nvidia"],
        ),
        // Wrong types.
        bad(
            r#"{"rate_rpm": "fast"}"#,
            400,
            "invalid_value",
            &["rate_rpm", "expected a number", RATE],
        ),
        bad(
            r#"{"providers": {"nvidia": {"queue_max_size": "big"}}}"#,
            400,
            "invalid_value",
            &[
                "providers.nvidia.queue_max_size",
                "expected a number",
                "an integer from 0 to 1000000",
            ],
        ),
        bad(
            r#"{"fallback_enabled_passthrough": 1}"#,
            400,
            "invalid_value",
            &["fallback_enabled_passthrough", "expected true or false"],
        ),
        bad(
            r#"{"log_level": 5}"#,
            400,
            "invalid_value",
            &["log_level", "expected a string", "\"warn\""],
        ),
        bad(
            r#"{"providers": 5}"#,
            400,
            "invalid_value",
            &["providers", "expected an object"],
        ),
        // Out of range, each numeric field at both ends.
        bad(
            r#"{"rate_rpm": 0}"#,
            400,
            "invalid_value",
            &["rate_rpm: 0 is out of range", RATE],
        ),
        bad(
            r#"{"rate_rpm": 6000001}"#,
            400,
            "invalid_value",
            &["rate_rpm: 6000001 is out of range", RATE],
        ),
        bad(
            r#"{"rate_rpm": -1}"#,
            400,
            "invalid_value",
            &["rate_rpm: -1 is out of range"],
        ),
        bad(
            r#"{"providers": {"nvidia": {"rate_rpm": 0}}}"#,
            400,
            "invalid_value",
            &["providers.nvidia.rate_rpm: 0 is out of range", RATE],
        ),
        bad(
            r#"{"bucket_capacity": 0}"#,
            400,
            "invalid_value",
            &[
                "bucket_capacity: 0 is out of range",
                "an integer from 1 to 1000000",
            ],
        ),
        bad(
            r#"{"bucket_capacity": 1.5}"#,
            400,
            "invalid_value",
            &[
                "bucket_capacity: 1.5 is out of range",
                "an integer from 1 to 1000000",
            ],
        ),
        bad(
            r#"{"bucket_capacity": 1000001}"#,
            400,
            "invalid_value",
            &["bucket_capacity: 1000001 is out of range"],
        ),
        bad(
            r#"{"queue_max_size": -1}"#,
            400,
            "invalid_value",
            &[
                "queue_max_size: -1 is out of range",
                "an integer from 0 to 1000000",
            ],
        ),
        bad(
            r#"{"queue_max_size": 1000001}"#,
            400,
            "invalid_value",
            &[
                "queue_max_size: 1000001 is out of range",
                "an integer from 0 to 1000000",
            ],
        ),
        bad(
            r#"{"queue_max_size": 2.5}"#,
            400,
            "invalid_value",
            &["queue_max_size: 2.5 is out of range"],
        ),
        bad(
            r#"{"tokens_per_minute": 10000000001}"#,
            400,
            "invalid_value",
            &[
                "tokens_per_minute: 10000000001 is out of range",
                "an integer from 0 to 10000000000",
            ],
        ),
        bad(
            r#"{"providers": {"nvidia": {"tokens_per_minute": -1}}}"#,
            400,
            "invalid_value",
            &["providers.nvidia.tokens_per_minute: -1 is out of range"],
        ),
        bad(
            r#"{"request_timeout": 0}"#,
            400,
            "invalid_value",
            &["request_timeout: 0 is out of range", SECONDS],
        ),
        bad(
            r#"{"request_timeout": 86401}"#,
            400,
            "invalid_value",
            &["request_timeout: 86401 is out of range", SECONDS],
        ),
        bad(
            r#"{"low_priority_timeout": 0}"#,
            400,
            "invalid_value",
            &["low_priority_timeout: 0 is out of range", SECONDS],
        ),
        bad(
            r#"{"low_priority_timeout": 86401}"#,
            400,
            "invalid_value",
            &["low_priority_timeout: 86401 is out of range", SECONDS],
        ),
        bad(
            r#"{"providers": {"nvidia": {"low_priority_timeout": 0}}}"#,
            400,
            "invalid_value",
            &[
                "providers.nvidia.low_priority_timeout: 0 is out of range",
                SECONDS,
            ],
        ),
        // Bad level.
        bad(
            r#"{"log_level": "verbose"}"#,
            400,
            "invalid_value",
            &[
                "log_level",
                "\"verbose\" is not a level",
                "\"error\", \"warn\", \"info\", \"debug\", \"trace\"",
            ],
        ),
        // Not JSON, or not an object. (NaN cannot be written in JSON.)
        bad(
            r#"{"rate_rpm": 5 x}"#,
            400,
            "invalid_json",
            &["malformed JSON at line 1, column "],
        ),
        bad(
            r#"{"rate_rpm": NaN}"#,
            400,
            "invalid_json",
            &[
                "malformed JSON at line 1, column 14",
                "non-finite number `NaN`",
            ],
        ),
        bad(
            r#"{"rate_rpm": 5,"#,
            400,
            "invalid_json",
            &["malformed JSON"],
        ),
        bad(
            "",
            400,
            "invalid_json",
            &["malformed JSON", "the body is empty"],
        ),
        bad(
            " \n ",
            400,
            "invalid_json",
            &["malformed JSON", "the body is empty"],
        ),
        bad(
            "[]",
            400,
            "invalid_json",
            &["malformed JSON", "the body must be a JSON object"],
        ),
        bad(
            "null",
            400,
            "invalid_json",
            &["malformed JSON", "the body must be a JSON object"],
        ),
        bad("42", 400, "invalid_json", &["malformed JSON"]),
        bad(r#""rate_rpm""#, 400, "invalid_json", &["malformed JSON"]),
        // Nothing to change.
        bad("{}", 400, "empty_patch", &["changes nothing", "rate_rpm"]),
        bad(
            r#"{"providers": {}}"#,
            400,
            "empty_patch",
            &["changes nothing"],
        ),
        bad(
            r#"{"providers": {"nvidia": {}}}"#,
            400,
            "empty_patch",
            &["changes nothing"],
        ),
        // One valid field and one invalid: nothing is applied.
        bad(
            r#"{"request_timeout": 5, "bucket_capacity": 0}"#,
            400,
            "invalid_value",
            &["bucket_capacity: 0 is out of range"],
        ),
        bad(
            r#"{"log_level": "debug", "rate_rpm": 50, "providers": {"nvidia": {"queue_max_size": 1000001}}}"#,
            400,
            "invalid_value",
            &["providers.nvidia.queue_max_size: 1000001 is out of range"],
        ),
        bad(
            r#"{"fallback_enabled_passthrough": true, "queue_max_size": 3, "providers": {"nope": {"rate_rpm": 5}}}"#,
            400,
            "unknown_provider",
            &["\"nope\""],
        ),
        // Too large: with Content-Length, and chunked without it.
        bad(&big, 413, "body_too_large", &["65536 bytes"]),
        Bad {
            chunked: true,
            ..bad(&big, 413, "body_too_large", &["65536 bytes"])
        },
        // Conditional writes.
        Bad {
            headers: vec![("if-match", "\"abc\"")],
            ..bad(
                r#"{"rate_rpm": 100}"#,
                400,
                "bad_if_match",
                &["If-Match", "version"],
            )
        },
        Bad {
            headers: vec![("if-match", "\"7\"")],
            ..bad(
                r#"{"rate_rpm": 100}"#,
                412,
                "version_mismatch",
                &["at version 1, not 7"],
            )
        },
        Bad {
            headers: vec![("if-match", "0")],
            ..bad(
                r#"{"rate_rpm": 100}"#,
                412,
                "version_mismatch",
                &["at version 1, not 0"],
            )
        },
    ];
    // A body just under the limit is read (and refused for what it says, not its size).
    let under = format!(r#"{{"rate_rpm": 100, "pad": "{}"}}"#, "x".repeat(60 * 1024));
    table.push(bad(&under, 400, "unknown_field", &["\"pad\""]));
    let mut failures = Vec::new();
    for case in &table {
        let a = if case.chunked {
            let chunks = case
                .body
                .as_bytes()
                .chunks(8 * 1024)
                .map(Bytes::copy_from_slice)
                .collect();
            let mut h = vec![("authorization", BEARER)];
            h.extend_from_slice(&case.headers);
            send_chunked(s.addr, "PATCH", ADMIN_CONFIG, &h, chunks).await
        } else {
            let mut h = vec![("authorization", BEARER)];
            h.extend_from_slice(&case.headers);
            admin_call(s.addr, "PATCH", &h, &case.body).await
        };
        let shown: String = case.body.chars().take(80).collect();
        let ok_status = a.status.as_u16() == case.status;
        let json: Option<Value> = serde_json::from_slice(&a.body).ok();
        let code = json
            .as_ref()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
        let msg = json
            .as_ref()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let missing: Vec<&str> = case
            .says
            .iter()
            .copied()
            .filter(|w| !msg.contains(w))
            .collect();
        if !ok_status || code.as_deref() != Some(case.code) || !missing.is_empty() {
            failures.push(format!(
                "{shown:?} (chunked: {}, headers: {:?}): got {} {:?} {msg:?}; want {} {:?} containing {missing:?}",
                case.chunked, case.headers, a.status, code, case.status, case.code
            ));
            continue;
        }
        a.assert_error(case.status, case.code);
        assert_eq!(a.headers["cache-control"], "no-store", "{shown:?}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad patches were not answered as expected:\n{}",
        failures.len(),
        table.len(),
        failures.join("\n")
    );
    // All or nothing: the configuration, the version and the limiter are as they were.
    let after = admin_get(s.addr, &[]).await;
    assert_eq!(after.headers["etag"], "\"1\"");
    assert_eq!(after.json(), before, "a refused patch changed something");
    let limiter = &s.app.providers[0].limiter;
    assert_eq!(limiter.queues.max(), 64);
    assert_eq!(limiter.bucket.rate().1, 1000);
    assert_eq!(s.app.hot.load().version, 1);
    let (applied, rejected) = admin_changes(s.metrics_addr).await;
    assert_eq!((applied, rejected), (0.0, table.len() as f64));
    // The same patch without the bad field is accepted: the table's bodies were refused
    // for the reason given.
    let ok = admin_patch(s.addr, BEARER, r#"{"request_timeout": 5}"#).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["version"], "2");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authentication_matrix_with_a_token() {
    let s = stack(unlimited_mock(), &with_token(&[]));
    let addr = s.addr;
    let body = r#"{"request_timeout": 60}"#;
    let mut applied = 0.0;
    let mut rejected = 0.0;

    // Reads: no token from loopback is fine; a wrong token is not.
    let a = admin_get(addr, &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["etag"], "\"1\"");
    assert_eq!(a.headers["cache-control"], "no-store");
    admin_get(addr, &[("authorization", "Bearer nope")])
        .await
        .assert_error(403, "wrong_token");
    let a = admin_get(addr, &[("authorization", BEARER)]).await;
    assert_eq!(a.status, 200);
    let a = admin_call(addr, "HEAD", &[], "").await;
    assert_eq!(a.status, 200);
    let a = admin_call(addr, "DELETE", &[("authorization", BEARER)], "").await;
    a.assert_error(405, "method_not_allowed");
    assert_eq!(a.headers["allow"], "GET, HEAD, POST, PATCH");
    call(addr, req("GET", addr, "/api/admin/other", &[], ""))
        .await
        .assert_error(404, "not_found");

    // Writes without a token: 401 with a challenge.
    for method in ["PATCH", "POST"] {
        let a = admin_call(addr, method, &[], body).await;
        a.assert_error(401, "missing_token");
        let challenge = a.headers["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Bearer realm="), "{challenge}");
        rejected += 1.0;
    }
    // Another scheme is no token.
    let basic = format!("Basic {TOKEN}");
    admin_call(addr, "PATCH", &[("authorization", &basic)], body)
        .await
        .assert_error(401, "missing_token");
    rejected += 1.0;
    // Wrong tokens: different, a prefix, longer, empty.
    let prefix = format!("Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let longer = format!("Bearer {TOKEN}0");
    let other_case = format!("Bearer {}", TOKEN.to_uppercase());
    for wrong in [
        "Bearer not-the-token",
        prefix.as_str(),
        longer.as_str(),
        other_case.as_str(),
        "Bearer a",
    ] {
        let a = admin_call(addr, "PATCH", &[("authorization", wrong)], body).await;
        a.assert_error(403, "wrong_token");
        assert!(!a.text().contains(TOKEN), "{}", a.text());
        rejected += 1.0;
    }
    // A foreign origin is refused even with the right token.
    for origin in ["https://evil.example", "null", "http://127.0.0.1:1"] {
        let a = admin_call(
            addr,
            "PATCH",
            &[("authorization", BEARER), ("origin", origin)],
            body,
        )
        .await;
        a.assert_error(403, "foreign_origin");
        rejected += 1.0;
    }
    let a = admin_call(
        addr,
        "PATCH",
        &[("authorization", BEARER), ("sec-fetch-site", "cross-site")],
        body,
    )
    .await;
    a.assert_error(403, "foreign_origin");
    rejected += 1.0;
    // A cross-origin read is refused too (not counted: it is no change).
    admin_get(addr, &[("origin", "https://evil.example")])
        .await
        .assert_error(403, "foreign_origin");
    assert_eq!(
        s.app.hot.load().version,
        1,
        "no refused write changed anything"
    );

    // The right token, with and without a same-origin Origin; POST works like PATCH.
    let same_origin = format!("http://{addr}");
    let a = admin_call(
        addr,
        "PATCH",
        &[("authorization", BEARER), ("origin", &same_origin)],
        r#"{"request_timeout": 61}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    applied += 1.0;
    let a = admin_patch(addr, BEARER, r#"{"request_timeout": 62}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    applied += 1.0;
    let a = admin_call(
        addr,
        "POST",
        &[("authorization", BEARER)],
        r#"{"request_timeout": 63}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    applied += 1.0;
    let lower = format!("bearer {TOKEN}");
    let a = admin_call(
        addr,
        "PATCH",
        &[("authorization", &lower)],
        r#"{"request_timeout": 64}"#,
    )
    .await;
    assert_eq!(
        a.status,
        200,
        "the scheme is case-insensitive: {}",
        a.text()
    );
    applied += 1.0;
    assert_eq!(a.json()["version"], "5");

    // Reads never change anything.
    for _ in 0..50 {
        let a = admin_get(addr, &[]).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.json()["version"], "5");
    }
    assert_eq!(s.app.hot.load().version, 5);
    assert_eq!(
        admin_get(addr, &[]).await.json()["global"]["request_timeout"],
        64.0
    );
    assert_eq!(admin_changes(s.metrics_addr).await, (applied, rejected));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_is_read_only_on_loopback() {
    let s = stack(unlimited_mock(), &[]);
    let addr = s.addr;
    assert!(addr.ip().is_loopback());
    let a = admin_get(addr, &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["version"], "1");
    for headers in [vec![], vec![("authorization", BEARER)]] {
        let a = admin_call(addr, "PATCH", &headers, r#"{"rate_rpm": 5}"#).await;
        a.assert_error(403, "writes_disabled");
        let m = message(&a);
        assert!(
            m.contains("SIDECAR_ADMIN_TOKEN") && m.contains("Authorization: Bearer"),
            "the message says how to enable writes: {m}"
        );
    }
    assert_eq!(admin_get(addr, &[]).await.json()["version"], "1");
    assert_eq!(admin_changes(s.metrics_addr).await, (0.0, 2.0));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_on_a_public_listener_the_admin_api_is_off() {
    let s = stack(unlimited_mock(), &[("SIDECAR_LISTEN_HOST", "0.0.0.0")]);
    let addr = SocketAddr::from(([127, 0, 0, 1], s.addr.port()));
    admin_get(addr, &[]).await.assert_error(404, "admin_off");
    admin_call(addr, "PATCH", &[], r#"{"rate_rpm": 5}"#)
        .await
        .assert_error(404, "admin_off");
    admin_call(
        addr,
        "PATCH",
        &[("authorization", BEARER)],
        r#"{"rate_rpm": 5}"#,
    )
    .await
    .assert_error(404, "admin_off");
    // The proxy itself still works.
    assert_eq!(
        call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT))
            .await
            .status,
        200
    );
    assert_eq!(s.app.hot.load().version, 1);
    let metrics = SocketAddr::from(([127, 0, 0, 1], s.metrics_addr.port()));
    let (applied, _) = admin_changes(metrics).await;
    assert_eq!(applied, 0.0);
    assert_ledger(&s, sent_to(addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_loopback_reads_off_a_loopback_reader_needs_the_token_like_any_other() {
    // The default: a loopback peer reads without the token.
    let s = stack(unlimited_mock(), &with_token(&[]));
    assert!(s.addr.ip().is_loopback());
    let a = admin_get(s.addr, &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();

    let s = stack(
        unlimited_mock(),
        &with_token(&[("SIDECAR_ADMIN_LOOPBACK_READS", "false")]),
    );
    let addr = s.addr;
    assert!(addr.ip().is_loopback());
    let a = admin_get(addr, &[]).await;
    a.assert_error(401, "missing_token");
    assert!(
        a.headers.contains_key("www-authenticate"),
        "a 401 names the scheme: {:?}",
        a.headers
    );
    assert!(
        message(&a).contains("SIDECAR_ADMIN_TOKEN"),
        "the message names the token: {}",
        message(&a)
    );
    assert_eq!(admin_call(addr, "HEAD", &[], "").await.status, 401);
    admin_get(addr, &[("authorization", "Bearer nope")])
        .await
        .assert_error(403, "wrong_token");
    let a = admin_get(addr, &[("authorization", BEARER)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["version"], "1");
    assert!(
        v["admin"]
            .as_str()
            .is_some_and(|m| m.contains("admin_loopback_reads is false")),
        "the mode says loopback is not exempt: {v:#}"
    );
    // Writes are unchanged: the token, and nothing else, allows them.
    admin_call(addr, "PATCH", &[], r#"{"rate_rpm": 5}"#)
        .await
        .assert_error(401, "missing_token");
    let a = admin_patch(addr, BEARER, r#"{"rate_rpm": 5}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(s.app.hot.load().version, 2);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_loopback_reads_off_and_no_token_the_admin_api_is_off() {
    let s = stack(
        unlimited_mock(),
        &[("SIDECAR_ADMIN_LOOPBACK_READS", "false")],
    );
    let addr = s.addr;
    assert!(addr.ip().is_loopback());
    assert!(s.app.admin.is_off(), "{:?}", s.app.admin);
    assert!(
        s.app
            .admin
            .describe()
            .contains("admin_loopback_reads is false"),
        "start-up says why: {}",
        s.app.admin.describe()
    );
    admin_get(addr, &[]).await.assert_error(404, "admin_off");
    admin_call(addr, "PATCH", &[], r#"{"rate_rpm": 5}"#)
        .await
        .assert_error(404, "admin_off");
    assert_eq!(s.app.hot.load().version, 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_change_keeps_the_bucket_tokens_and_the_answer_lists_old_and_new() {
    let (s, clock) = manual_stack(
        unlimited_mock(),
        &with_token(&[("SIDECAR_RATE_RPM", "60"), ("SIDECAR_BUCKET_CAPACITY", "5")]),
    );
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    assert_eq!(limiter.bucket.tokens(clock.now_nanos()), 5.0);
    s.chats_ok(2).await;
    assert_eq!(limiter.bucket.tokens(clock.now_nanos()), 3.0);

    let a = admin_patch(s.addr, BEARER, r#"{"rate_rpm": 120}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["etag"], "\"2\"");
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    assert_eq!(v["version"], "2");
    let changed = v["changed"].as_array().expect("changed is a list");
    assert!(
        changed.contains(
            &serde_json::json!({"field": "providers.nvidia.rate_rpm", "old": 60.0, "new": 120.0})
        ),
        "{v}"
    );
    assert!(
        changed.contains(&serde_json::json!({"field": "rate_rpm", "old": 60.0, "new": 120.0})),
        "{v}"
    );
    assert!(
        changed
            .iter()
            .all(|c| c["field"].as_str().unwrap().ends_with("rate_rpm")),
        "only the rate changed: {v}"
    );

    // No burst, no loss: the same three tokens, at the new rate.
    assert_eq!(limiter.bucket.tokens(clock.now_nanos()), 3.0);
    assert_eq!(limiter.bucket.rate(), (120.0, 5));
    let got = admin_get(s.addr, &[]).await;
    assert_eq!(got.headers["etag"], "\"2\"");
    assert_eq!(got.json()["providers"]["nvidia"]["rate_rpm"], 120.0);
    s.chats_ok(3).await;
    assert_eq!(s.mock.requests(), 5);
    // The next one waits for a token, which now comes after half a second.
    let parked = s.park_chat(&[], CHAT).await;
    s.release(&clock, Duration::from_millis(500), 1).await;
    assert_eq!(s.mock.requests(), 6);
    assert_eq!(parked.await.unwrap(), 200);

    // Capacity: a growth adds no tokens.
    let a = admin_patch(s.addr, BEARER, r#"{"bucket_capacity": 50}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["changed"],
        serde_json::json!([
            {"field": "bucket_capacity", "old": 5, "new": 50},
            {"field": "providers.nvidia.bucket_capacity", "old": 5, "new": 50},
        ])
    );
    assert_eq!(limiter.bucket.tokens(clock.now_nanos()), 0.0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_the_queue_below_its_depth_drops_nobody_and_refuses_new_arrivals() {
    let (s, clock) = paced_stack(&with_token(&[]));
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let parked = s.park(4).await;
    let a = admin_patch(s.addr, BEARER, r#"{"queue_max_size": 1}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(
        a.json()["changed"].as_array().unwrap().contains(
            &serde_json::json!({"field": "providers.nvidia.queue_max_size", "old": 64, "new": 1})
        ),
        "{}",
        a.text()
    );
    assert_eq!(limiter.queues.max(), 1);
    assert_eq!(limiter.queues.len(), 4, "nobody was dropped");
    assert!(parked.iter().all(|p| !p.is_finished()), "all still waiting");
    let refused = s.chat(&[], CHAT).await;
    refused.assert_error(429, "queue_full");
    assert_eq!(limiter.queues.len(), 4);
    s.release(&clock, Duration::from_secs(1), 4).await;
    for p in parked {
        assert_eq!(p.await.unwrap(), 200);
    }
    assert_eq!(
        s.mock.requests(),
        5,
        "the refused request never went upstream"
    );
    assert_eq!(limiter.queues.len(), 0);
    assert_eq!(limiter.queues.counts().abandoned, 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_per_minute_changes_at_run_time_and_the_token_settings_show() {
    let s = stack(
        unlimited_mock(),
        &with_token(&[
            ("SIDECAR_TOKENS_PER_MINUTE", "60000"),
            ("SIDECAR_TOKEN_CHARGE", "actual"),
            ("SIDECAR_BYTES_PER_TOKEN", "2.5"),
        ]),
    );
    let before = admin_config(s.addr, &[]).await;
    let p = &before["providers"]["nvidia"];
    assert_eq!(p["tokens_per_minute"], 60_000, "{before}");
    assert_eq!(p["token_charge"], "actual");
    assert_eq!(p["request_usage"], false);
    assert_eq!(p["default_completion_tokens"], 4096);
    assert_eq!(p["bytes_per_token"], 2.5);
    assert_eq!(before["global"]["tokens_per_minute"], 60_000);
    assert!(before["hot_fields"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("tokens_per_minute")));

    let a = admin_patch(
        s.addr,
        BEARER,
        r#"{"providers": {"nvidia": {"tokens_per_minute": 0}}}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["changed"],
        serde_json::json!([
            {"field": "providers.nvidia.tokens_per_minute", "old": 60_000, "new": 0}
        ]),
        "{}",
        a.text()
    );
    let after = admin_config(s.addr, &[]).await;
    assert_eq!(after["providers"]["nvidia"]["tokens_per_minute"], 0);
    assert_eq!(version(&after), version(&before) + 1);
    assert_eq!(
        after["providers"]["nvidia"]["token_charge"], "actual",
        "a restart setting is left as it is"
    );
    // Requests still flow: the token budget is not on the request path yet.
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patched_rate_shows_in_the_snapshot_and_the_metrics_at_once() {
    let s = stack(
        unlimited_mock(),
        &with_token(&[("SIDECAR_SNAPSHOT_INTERVAL", "0.1")]),
    );
    let a = admin_patch(
        s.addr,
        BEARER,
        r#"{"rate_rpm": 1234, "queue_max_size": 17}"#,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    // Metrics read the limiter when scraped.
    let text = s.scrape().await;
    assert_eq!(
        sample(&text, "sidecar_rate_base_rpm{provider=\"nvidia\"}"),
        Some(1234.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "sidecar_rate_effective_rpm{provider=\"nvidia\"}"),
        Some(1234.0)
    );
    assert_eq!(
        sample(&text, "sidecar_queue_max{provider=\"nvidia\"}"),
        Some(17.0)
    );
    // The snapshot on its next tick.
    let v = snapshot_until(s.addr, "the change", |v| {
        let p = &v["providers"][0];
        p["rate"]["base_rpm"] == 1234.0 && p["queue"]["max"] == 17
    })
    .await;
    assert_eq!(v["providers"][0]["rate"]["effective_rpm"], 1234.0, "{v}");
    let cfg = admin_get(s.addr, &[]).await.json();
    assert_eq!(cfg["providers"]["nvidia"]["effective_rpm"], 1234.0);
    assert_eq!(cfg["global"]["rate_rpm"], 1234.0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patched_rate_paces_the_requests_that_follow() {
    let s = stack(unlimited_mock(), &with_token(&[]));
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    // At the start-up rate a burst goes straight through.
    let burst = |n: usize| {
        let addr = s.addr;
        async move {
            let start = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    tokio::spawn(async move {
                        let a =
                            call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT)).await;
                        (a.status, start.elapsed())
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    for (status, _) in burst(12).await {
        assert_eq!(status, 200);
    }
    assert_eq!(
        limiter.queues.counts().enqueued,
        0,
        "nothing waited before the change"
    );

    let a = admin_patch(s.addr, BEARER, r#"{"rate_rpm": 600, "bucket_capacity": 1}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let start = Instant::now();
    let mut done = burst(12).await;
    let total = start.elapsed();
    done.sort_by_key(|(_, t)| *t);
    for (status, _) in &done {
        assert_eq!(*status, 200);
    }
    // One token every 100 ms and one in the bucket: 11 intervals at least, with slack.
    assert!(
        total >= Duration::from_millis(900),
        "12 admissions at 600 RPM took only {total:?}"
    );
    let spread = done[11].1 - done[0].1;
    assert!(
        spread / 11 >= Duration::from_millis(80),
        "the completions were spaced {:?} apart on average",
        spread / 11
    );
    assert!(total < Duration::from_secs(15), "{total:?}");
    assert!(
        limiter.queues.counts().enqueued >= 10,
        "the burst waited for tokens"
    );
    assert_eq!(s.mock.requests(), 24);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_patches_under_traffic_never_tear() {
    const WRITERS: u64 = 4;
    const PATCHES: u64 = 50;
    let s = stack(
        unlimited_mock(),
        &with_token(&[
            ("SIDECAR_RATE_RPM", "64"),
            ("SIDECAR_BUCKET_CAPACITY", "64"),
            ("SIDECAR_QUEUE_MAX_SIZE", "64"),
        ]),
    );
    let addr = s.addr;
    let done = Arc::new(AtomicBool::new(false));

    // A thread loads the current value in a tight loop: its fields always agree.
    let checker = {
        let app = Arc::clone(&s.app);
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut last = 0;
            let mut loads = 0u64;
            while !done.load(Ordering::Acquire) {
                let h = app.hot.load();
                let p = h.providers[0];
                assert!(
                    p.rate_rpm == p.queue_max_size as f64
                        && p.rate_rpm == f64::from(p.bucket_capacity)
                        && h.defaults == p,
                    "a torn value: {h:?}"
                );
                assert!(
                    h.version >= last,
                    "version went back: {} after {last}",
                    h.version
                );
                last = h.version;
                loads += 1;
            }
            loads
        })
    };

    let readers: Vec<_> = (0..4)
        .map(|_| {
            let done = Arc::clone(&done);
            tokio::spawn(async move {
                let mut last = 0;
                let mut reads = 0u64;
                let mut versions_seen = 0u64;
                while !done.load(Ordering::Acquire) {
                    let a = admin_get(addr, &[]).await;
                    assert_eq!(a.status, 200, "{}", a.text());
                    let v = a.json();
                    let p = &v["providers"]["nvidia"];
                    let rate = p["rate_rpm"].as_f64().unwrap();
                    let queue = p["queue_max_size"].as_f64().unwrap();
                    let capacity = p["bucket_capacity"].as_f64().unwrap();
                    assert!(rate == queue && rate == capacity, "a torn answer: {p}");
                    assert_eq!(v["global"]["rate_rpm"].as_f64(), Some(rate), "{v}");
                    let version = version(&v);
                    assert_eq!(a.headers["etag"], format!("\"{version}\"").as_str());
                    assert!(version >= last, "version went back: {version} after {last}");
                    versions_seen += u64::from(version > last);
                    last = version;
                    reads += 1;
                }
                (reads, versions_seen)
            })
        })
        .collect();

    let chats = {
        let done = Arc::clone(&done);
        let statuses = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&statuses);
        let task = tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                let a = call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT)).await;
                assert!(
                    a.status == StatusCode::OK || a.status == StatusCode::TOO_MANY_REQUESTS,
                    "{} {}",
                    a.status,
                    a.text()
                );
                count.fetch_add(1, Ordering::Relaxed);
            }
        });
        (task, statuses)
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(async move {
                for i in 0..PATCHES {
                    let x = 100 + (w * PATCHES + i) * 40;
                    let body = format!(
                        r#"{{"rate_rpm": {x}, "queue_max_size": {x}, "bucket_capacity": {x}}}"#
                    );
                    let a = admin_patch(addr, BEARER, &body).await;
                    assert_eq!(a.status, 200, "{body}: {}", a.text());
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let mut reads = 0;
    let mut versions_seen = 0;
    for r in readers {
        let (n, v) = r.await.unwrap();
        reads += n;
        versions_seen += v;
    }
    let loads = checker.join().unwrap();
    let (chat_task, chat_count) = chats;
    // A chat may be waiting for a token at a low rate: it is not the point here.
    let mut chat_task = chat_task;
    match tokio::time::timeout(Duration::from_secs(5), &mut chat_task).await {
        Ok(r) => r.expect("the chat loop"),
        Err(_) => chat_task.abort(),
    }
    assert!(reads > 0 && loads > 0);
    assert!(
        versions_seen > 4,
        "the readers ran while the writers did ({reads} reads saw {versions_seen} new versions)"
    );
    assert!(
        chat_count.load(Ordering::Relaxed) > 0,
        "chats ran alongside"
    );

    let v = admin_get(addr, &[]).await.json();
    assert_eq!(version(&v), 1 + WRITERS * PATCHES);
    let p = &v["providers"]["nvidia"];
    let x = p["rate_rpm"].as_f64().unwrap();
    assert_eq!(p["queue_max_size"].as_f64(), Some(x));
    assert_eq!(p["bucket_capacity"].as_f64(), Some(x));
    // The limiter runs with the last value.
    let limiter = &s.app.providers[0].limiter;
    assert_eq!(limiter.queues.max() as f64, x);
    let (rpm, capacity) = limiter.bucket.rate();
    assert_eq!(f64::from(capacity), x);
    assert!((rpm - x).abs() / x < 1e-6, "bucket rate {rpm}, config {x}");
    let pacing = limiter.pacing_view(s.app.clock.now_nanos());
    assert_eq!(pacing.ceiling_rpm, x);
    let hot = s.app.hot.load();
    assert_eq!(hot.version, 1 + WRITERS * PATCHES);
    assert_eq!(hot.providers[0].rate_rpm, x);
    let (applied, rejected) = admin_changes(s.metrics_addr).await;
    assert_eq!((applied, rejected), ((WRITERS * PATCHES) as f64, 0.0));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

const FORGET: &str = "/api/admin/providers/nvidia/forget";

async fn forget(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    call(addr, req("POST", addr, path, headers, "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_shows_each_providers_learned_limit() {
    let (s, clock) = manual_stack(
        unlimited_mock(),
        &with_token(&[
            ("SIDECAR_RATE_RPM", "600"),
            ("SIDECAR_PROVIDER_WINDOW", "6"),
            ("SIDECAR_PROBE_INTERVAL", "60"),
        ]),
    );
    let v = admin_get(s.addr, &[]).await.json();
    let nvidia = &v["providers"]["nvidia"];
    assert_eq!(nvidia["provider_window"], 6.0, "{nvidia}");
    assert_eq!(nvidia["limit_scope"], "key");
    assert_eq!(
        nvidia["pacing"],
        serde_json::json!({
            "window": 6.0,
            "limit": 60,
            "learned": 60,
            "ceiling": 60,
            "learned_rpm": 600.0,
            "ceiling_rpm": 600.0,
            "source": "config",
            "probing": false,
            "relearning": false,
            "next_probe_in": null,
            "pause": null,
            "sent_in_window": 0,
            "changes": 0,
            "retreat": {"state": "normal", "factor": 1.0},
        }),
        "{nvidia}"
    );
    assert_eq!(v["global"]["probe_interval"], 60.0);

    // A restored limit and a pause show at once.
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    limiter.restore(30, clock.now_nanos());
    limiter.pause(
        clock.now_nanos() + 2_000_000_000,
        nvidia_sidecar::limiter::PauseReason::Quota,
    );
    clock.advance(Duration::from_millis(500));
    let v = admin_get(s.addr, &[]).await.json();
    let pacing = &v["providers"]["nvidia"]["pacing"];
    assert_eq!(pacing["limit"], 30, "{pacing}");
    assert_eq!(pacing["learned_rpm"], 300.0);
    assert_eq!(pacing["ceiling_rpm"], 600.0);
    assert_eq!(pacing["source"], "state");
    assert_eq!(pacing["next_probe_in"], 59.5);
    assert_eq!(
        pacing["pause"],
        serde_json::json!({"reason": "quota", "seconds": 1.5})
    );
    assert_eq!(pacing["changes"], 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_learned_limit_needs_the_token_and_returns_to_the_configured_rate() {
    let (s, clock) = manual_stack(
        unlimited_mock(),
        &with_token(&[
            ("SIDECAR_RATE_RPM", "600"),
            ("SIDECAR_PROVIDER_WINDOW", "6"),
        ]),
    );
    let addr = s.addr;
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    limiter.restore(45, clock.now_nanos());
    let mut rejected = 0.0;

    // Refused like a configuration write, and nothing is forgotten.
    let a = forget(addr, FORGET, &[]).await;
    a.assert_error(401, "missing_token");
    assert!(a.headers["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer realm="));
    rejected += 1.0;
    for wrong in ["Bearer not-the-token", "Bearer a"] {
        forget(addr, FORGET, &[("authorization", wrong)])
            .await
            .assert_error(403, "wrong_token");
        rejected += 1.0;
    }
    forget(
        addr,
        FORGET,
        &[
            ("authorization", BEARER),
            ("origin", "https://evil.example"),
        ],
    )
    .await
    .assert_error(403, "foreign_origin");
    rejected += 1.0;
    for method in ["GET", "HEAD", "PUT", "PATCH", "DELETE"] {
        let a = call(
            addr,
            req(method, addr, FORGET, &[("authorization", BEARER)], ""),
        )
        .await;
        assert_eq!(a.status, 405, "{method}: {}", a.text());
        if method != "HEAD" {
            a.assert_error(405, "method_not_allowed");
        }
        assert_eq!(a.headers["allow"], "POST");
    }
    let a = forget(
        addr,
        "/api/admin/providers/openai/forget",
        &[("authorization", BEARER)],
    )
    .await;
    a.assert_error(404, "unknown_provider");
    assert!(message(&a).contains("configured: nvidia"), "{}", a.text());
    rejected += 1.0;
    for path in [
        "/api/admin/providers/nvidia",
        "/api/admin/providers//forget",
        "/api/admin/providers/nvidia/forget/again",
    ] {
        forget(addr, path, &[("authorization", BEARER)])
            .await
            .assert_error(404, "not_found");
    }
    let get = admin_get(addr, &[]).await.json();
    assert_eq!(get["providers"]["nvidia"]["pacing"]["source"], "state");
    assert_eq!(get["providers"]["nvidia"]["pacing"]["limit"], 45);
    assert_eq!(admin_changes(s.metrics_addr).await, (0.0, rejected));

    // With the token: back to the configured rate, at once.
    let a = forget(addr, FORGET, &[("authorization", BEARER)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    assert_eq!(a.headers["cache-control"], "no-store");
    let v = a.json();
    assert_eq!(v["provider"], "nvidia");
    assert_eq!(v["changed"], serde_json::json!({"from": 45, "to": 60}));
    assert_eq!(v["pacing"]["source"], "config", "{v}");
    assert_eq!(v["pacing"]["limit"], 60);
    assert_eq!(v["pacing"]["learned_rpm"], 600.0);
    assert_eq!(v["pacing"]["changes"], 2);
    assert_eq!(limiter.bucket.rate().0, 600.0);
    assert_eq!(limiter.guard.limit(), 60);
    let get = admin_get(addr, &[]).await.json();
    assert_eq!(get["providers"]["nvidia"]["pacing"], v["pacing"]);
    assert_eq!(get["version"], "1", "the configuration did not change");

    // Again: nothing left to forget, still 200.
    let a = forget(addr, FORGET, &[("authorization", BEARER)]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["changed"], serde_json::Value::Null);
    assert_eq!(a.json()["pacing"]["source"], "config");
    assert_eq!(admin_changes(s.metrics_addr).await, (2.0, rejected));
    let text = s.scrape().await;
    assert_eq!(
        sample(
            &text,
            "sidecar_limit_source{provider=\"nvidia\",source=\"config\"}"
        ),
        Some(1.0)
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_forgetting_is_refused_or_off() {
    let s = stack(unlimited_mock(), &[]);
    forget(s.addr, FORGET, &[])
        .await
        .assert_error(403, "writes_disabled");
    forget(s.addr, FORGET, &[("authorization", BEARER)])
        .await
        .assert_error(403, "writes_disabled");
    assert_eq!(admin_changes(s.metrics_addr).await, (0.0, 2.0));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
    let s = stack(unlimited_mock(), &[("SIDECAR_LISTEN_HOST", "0.0.0.0")]);
    let addr = SocketAddr::from(([127, 0, 0, 1], s.addr.port()));
    forget(addr, FORGET, &[("authorization", BEARER)])
        .await
        .assert_error(404, "admin_off");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

/// Every header value and the body of an answer, as one string to search.
fn everything(a: &Answer) -> String {
    let mut out = headers_text(&a.headers);
    out.push_str(&a.text());
    out
}

fn headers_text(h: &HeaderMap) -> String {
    h.iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_the_admin_token_never_appear_in_answers() {
    let s = stack(unlimited_mock(), &with_token(&[]));
    let addr = s.addr;
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let mut answers = Vec::new();

    let a = admin_get(addr, &[]).await;
    let v = a.json();
    assert_eq!(v["providers"]["nvidia"]["api_key"], "nvap****");
    assert_eq!(v["global"]["admin_token"], "adm-****");
    answers.push(("GET", everything(&a)));
    let a = admin_get(addr, &[("authorization", BEARER)]).await;
    assert_eq!(a.status, 200);
    answers.push(("GET with the token", everything(&a)));
    // The right token in a refused request (wrong origin) is not echoed.
    let a = admin_call(
        addr,
        "PATCH",
        &[
            ("authorization", BEARER),
            ("origin", "https://evil.example"),
        ],
        r#"{"rate_rpm": 5}"#,
    )
    .await;
    a.assert_error(403, "foreign_origin");
    answers.push(("wrong origin", everything(&a)));
    let a = admin_get(addr, &[("authorization", BEARER), ("origin", "null")]).await;
    a.assert_error(403, "foreign_origin");
    answers.push(("wrong origin read", everything(&a)));
    // A wrong token that shares most of the right one is not echoed either.
    let near = format!("Bearer {TOKEN}X");
    let a = admin_call(
        addr,
        "PATCH",
        &[("authorization", &near)],
        r#"{"rate_rpm": 5}"#,
    )
    .await;
    a.assert_error(403, "wrong_token");
    answers.push(("wrong token", everything(&a)));
    let a = admin_call(addr, "PATCH", &[], r#"{"rate_rpm": 5}"#).await;
    a.assert_error(401, "missing_token");
    answers.push(("no token", everything(&a)));
    let a = admin_patch(addr, BEARER, r#"{"rate_rpm": 0}"#).await;
    a.assert_error(400, "invalid_value");
    answers.push(("bad body", everything(&a)));
    let a = admin_patch(addr, BEARER, r#"{"rate_rpm": 100000}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    answers.push(("applied", everything(&a)));
    let a = call(addr, req("GET", addr, "/api/dashboard/snapshot", &[], "")).await;
    assert_eq!(a.status, 200);
    answers.push(("snapshot", everything(&a)));
    let metrics = call(
        s.metrics_addr,
        req("GET", s.metrics_addr, "/metrics", &[], ""),
    )
    .await;
    assert_eq!(metrics.status, 200);
    answers.push(("metrics", everything(&metrics)));

    for (what, text) in &answers {
        assert!(
            !text.contains(PROVIDER_KEY),
            "{what} shows the provider key: {text}"
        );
        assert!(
            !text.contains("provider-key-0001"),
            "{what} shows part of the key"
        );
        assert!(
            !text.contains(TOKEN),
            "{what} shows the admin token: {text}"
        );
        assert!(
            !text.contains("integration-7c41e9"),
            "{what} shows part of the token"
        );
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_config_has_no_redis_and_no_cluster() {
    let s = stack(unlimited_mock(), &with_token(&[]));
    let a = admin_get(s.addr, &[]).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert!(v.get("redis").is_none(), "{v}");
    assert!(v["providers"]["nvidia"].get("cluster").is_none(), "{v}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_the_config_shows_redis_masked_and_each_budget_without_the_password() {
    const PASSWORD: &str = "s3cret-redis-admin-4f1c";
    // Nothing listens there and no budget task runs: the replica has not reached Redis.
    let port = free_port();
    let url = format!("redis://sidecar:{PASSWORD}@127.0.0.1:{port}/3");
    let s = stack(
        unlimited_mock(),
        &[
            ("SIDECAR_ADMIN_TOKEN", TOKEN),
            ("SIDECAR_REDIS_URL", &url),
            ("SIDECAR_REDIS_PREFIX", "admin-test:"),
            ("SIDECAR_REDIS_TIMEOUT", "0.5"),
            ("SIDECAR_REDIS_REPLICAS", "3"),
            ("SIDECAR_REDIS_FALLBACK_FOR", "30"),
        ],
    );
    let replica = s.replica();
    for headers in [&[][..], &[("authorization", BEARER)][..]] {
        let a = admin_get(s.addr, headers).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let all = everything(&a);
        assert!(!all.contains(PASSWORD), "the Redis password: {all}");
        assert!(!all.contains("s3cret"), "part of the Redis password: {all}");
        let v = a.json();
        assert_eq!(
            v["redis"],
            serde_json::json!({
                "url": format!("redis://sidecar:****@127.0.0.1:{port}/3"),
                "prefix": "admin-test:",
                "timeout_secs": 0.5,
                "replicas": 3,
                "fallback_for_secs": 30.0,
            }),
            "{v}"
        );
        let c = &v["providers"]["nvidia"]["cluster"];
        assert_eq!(c["budget"], "nvidia", "{v}");
        assert!(c["record"].is_null(), "nothing read from Redis yet: {c}");
        let r = &c["replica"];
        assert_eq!(r["id"], replica.as_str());
        assert_eq!(r["mode"], "fallback");
        assert_eq!(r["backend_up"], false);
        assert_eq!(r["replicas"], 0);
        assert_eq!(r["share"], 0.0);
        assert_eq!(r["shares"], serde_json::json!({ replica.clone(): 0 }));
        assert!(r["fallback_limit"].is_u64(), "{r}");
        assert!(r["generation"].is_null(), "{r}");
        // The cluster object is live state: the rest of the provider is unchanged.
        assert!(v["providers"]["nvidia"]["pacing"].is_object());
    }
    // The password shows nowhere else either.
    let snapshot = call(
        s.addr,
        req("GET", s.addr, "/api/dashboard/snapshot", &[], ""),
    )
    .await;
    let metrics = s.scrape().await;
    for (what, text) in [("snapshot", snapshot.text()), ("metrics", metrics)] {
        assert!(!text.contains(PASSWORD), "the Redis password in the {what}");
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}
