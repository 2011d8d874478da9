//! The token limit over real sockets: both charge models, usage in answers and streams,
//! the knob that refuses `stream_options`, OpenAI's token headers and 429 bodies, and
//! the history a limit keeps when it changes at run time.

use serde_json::{json, Value};

use super::*;

/// A chat body whose prompt the mock counts as 7 tokens (3 for the message, 16 bytes of
/// content), with `extra` fields appended.
fn body(model: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"sixteen bytes..."}}]{extra}}}"#
    )
}

async fn post(m: &MockServer, body: &str, headers: &[(&str, &str)]) -> Answer {
    call(m.addr, "POST", "/v1/chat/completions", headers, body).await
}

/// 60 tokens per rolling 6 s (600 a minute), charged as `charge` says.
fn sixty_tokens_per_six_seconds(charge: TokenCharge) -> MockConfig {
    MockConfig {
        tpm: 600.0,
        token_charge: charge,
        window_secs: 6.0,
        openai_headers: true,
        ..MockConfig::default()
    }
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
fn events(body: &str) -> Vec<&str> {
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("an SSE data line"))
        .collect()
}

/// "Please try again in 5.98s." as a duration.
fn try_again(message: &str) -> Duration {
    let (_, rest) = message.split_once("try again in ").expect("a wait");
    parse_go(rest.strip_suffix('.').expect("a sentence"))
}

#[tokio::test]
async fn reserved_charges_prompt_and_bound_on_arrival_and_refuses_what_would_not_fit() {
    let m = start(sixty_tokens_per_six_seconds(TokenCharge::Reserved));
    let twenty = body("m", r#","max_tokens":13"#); // 7 + 13
    let a = post(&m, &twenty, &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v = a.json();
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 13, "total_tokens": 20})
    );
    assert_eq!(
        v["choices"][0]["finish_reason"], "length",
        "cut by max_tokens"
    );
    assert_eq!(a.header("x-ratelimit-limit-tokens"), Some("600"));
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), Some("40"));
    let reset = parse_go(a.header("x-ratelimit-reset-tokens").unwrap());
    assert!(reset > 5 * S && reset <= 6 * S, "{reset:?}");
    assert!(
        a.header("x-ratelimit-limit-requests").is_none(),
        "no request limit"
    );
    assert_eq!(post(&m, &twenty, &[]).await.status, 200);
    let a = post(&m, &twenty, &[]).await;
    assert_eq!(
        (a.status, a.header("x-ratelimit-remaining-tokens")),
        (200, Some("0"))
    );

    let r = post(&m, &twenty, &[]).await;
    assert_eq!(r.status, 429);
    let e = &r.json()["error"];
    assert_eq!(
        (&e["type"], &e["code"]),
        (&json!("tokens"), &json!("rate_limit_exceeded"))
    );
    let message = e["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Rate limit reached for m in organization org-mock on tokens per min (TPM): \
             Limit 600, Used 60, Requested 20. Please try again in "
        ),
        "{message}"
    );
    let wait = try_again(message);
    assert!(wait > 5 * S && wait <= 6 * S, "{message}");
    assert_eq!(r.header("retry-after"), Some("6"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));

    assert_eq!(m.tokens_total(), 60);
    assert_eq!(m.max_tokens_in_rolling(6 * S), 60);
    assert_eq!(m.max_tokens_in_rolling_for("m", 6 * S), 60);
    assert_eq!(m.token_window_counts(6 * S)[0].tokens, 60);
    assert_eq!(m.token_window_counts(6 * S)[0].refused, 1);
    assert_eq!((m.refused_for_tokens(), m.refused_for_requests()), (1, 0));
    assert_eq!((m.admitted_total(), m.rate_limited()), (3, 1));
    m.stop();
}

#[tokio::test]
async fn the_bound_without_max_tokens_is_what_the_model_would_generate_times_n() {
    let m = start(sixty_tokens_per_six_seconds(TokenCharge::Reserved));
    // 7 + 2 × 16 (the token knob) = 39: one fits, a second does not.
    let two = body("m", r#","n":2"#);
    let a = post(&m, &two, &[]).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["choices"][1]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 32);
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), Some("21"));
    let r = post(&m, &two, &[]).await;
    assert_eq!(r.status, 429);
    assert!(r.body.contains("Used 39, Requested 39"), "{}", r.body);
    // The knob per request moves the bound: 7 + 4 = 11 fits in the 21 left.
    let a = post(&m, &body("m", ""), &[("x-mock-tokens", "4")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["usage"]["total_tokens"], 11);
    m.stop();
}

#[tokio::test]
async fn a_request_larger_than_the_window_is_too_large_under_either_model() {
    for charge in [TokenCharge::Reserved, TokenCharge::Actual] {
        let m = start(sixty_tokens_per_six_seconds(charge));
        let r = post(&m, &body("big/model", r#","max_tokens":54"#), &[]).await; // 61
        assert_eq!(r.status, 429, "{charge:?}");
        assert_eq!(
            r.json(),
            json!({"error": {
                "message": "Request too large for big/model in organization org-mock on \
                    tokens per min (TPM): Limit 600, Requested 61. The input or output \
                    tokens must be reduced in order to run successfully.",
                "type": "tokens", "param": null, "code": "rate_limit_exceeded"}})
        );
        assert!(r.header("retry-after").is_none(), "it never fits");
        assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("60"));
        assert_eq!((m.too_large(), m.refused_for_tokens()), (1, 1));
        assert_eq!(m.tokens_total(), 0);
        let fits = post(&m, &body("big/model", r#","max_tokens":53"#), &[]).await;
        assert_eq!(fits.status, 200, "{charge:?}: exactly the window");
        m.stop();
    }
}

#[tokio::test]
async fn actual_admits_below_the_limit_and_charges_what_was_generated_at_the_end() {
    let m = start(sixty_tokens_per_six_seconds(TokenCharge::Actual));
    // No max_tokens: 7 + 16 generated = 23 each, charged when the answer is built.
    let a = post(&m, &body("m", ""), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["usage"]["total_tokens"], 23);
    assert_eq!(
        a.header("x-ratelimit-remaining-tokens"),
        Some("60"),
        "reported on admission, before the charge"
    );
    assert_eq!(m.tokens_total(), 23);
    // max_tokens caps what is generated, and so the charge: 7 + 3.
    let a = post(&m, &body("m", r#","max_tokens":3"#), &[]).await;
    assert_eq!(a.json()["usage"]["total_tokens"], 10);
    assert_eq!(m.tokens_total(), 33);
    // A stream is charged when it ends, before its last chunk leaves.
    let s = post(&m, &body("m", r#","stream":true"#), &[]).await;
    assert_eq!(s.status, 200);
    assert_eq!(m.tokens_total(), 56);
    // 56 < 60: still admitted, and it overshoots.
    assert_eq!(post(&m, &body("m", ""), &[]).await.status, 200);
    assert_eq!(m.tokens_total(), 79);
    let r = post(&m, &body("m", ""), &[]).await;
    assert_eq!(r.status, 429);
    let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("Limit 600, Used 79, Requested 23."),
        "{message}"
    );
    // 79 - 23 (the first, which leaves first) = 56 < 60: the first's departure admits.
    let wait = try_again(&message);
    assert!(wait > 5 * S && wait <= 6 * S, "{message}");
    assert_eq!(m.max_tokens_in_rolling(6 * S), 79);
    let w = m.verdicts(Filter::All, 6 * S);
    assert_eq!((w.admitted, w.refused_tokens, w.tokens.charged), (4, 1, 79));
    m.stop();
}

#[tokio::test]
async fn an_actual_stream_cut_short_is_charged_what_it_sent() {
    let m = start(MockConfig {
        reset_after: Some(3), // the role chunk and two tokens
        ..sixty_tokens_per_six_seconds(TokenCharge::Actual)
    });
    let tcp = tokio::net::TcpStream::connect(m.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/v1/chat/completions")
        .header("host", m.addr.to_string())
        .header("connection", "close")
        .body(Full::new(Bytes::from(body("m", r#","stream":true"#))))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert!(
        resp.into_body().collect().await.is_err(),
        "reset mid-stream"
    );
    // The meter is dropped with the stream's task, just after the reset.
    let mut n = 0;
    while m.tokens_total() == 0 && n < 50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        n += 1;
    }
    assert_eq!(m.tokens_total(), 7 + 2);
    m.stop();
}

#[tokio::test]
async fn usage_is_in_every_json_answer_with_the_mocks_own_count() {
    let m = start(MockConfig {
        openai_headers: true,
        ..MockConfig::default()
    });
    let content = json!([
        {"type": "text", "text": "abcdefgh"},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", "A".repeat(4000))}}
    ]);
    let chat = json!({"model": "m", "max_completion_tokens": 5, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": content}
    ]});
    let a = post(&m, &chat.to_string(), &[]).await;
    assert_eq!(a.status, 200);
    // System: 3 + 2; user: 3 + 2 + 85 for the image, whatever its bytes.
    assert_eq!(
        a.json()["usage"],
        json!({"prompt_tokens": 95, "completion_tokens": 5, "total_tokens": 100})
    );
    assert!(
        a.header("x-ratelimit-limit-tokens").is_none(),
        "no token limit"
    );
    let e = call(
        m.addr,
        "POST",
        "/v1/embeddings",
        &[],
        r#"{"model":"e","input":["abcd","abcdefgh",""]}"#,
    )
    .await;
    assert_eq!(e.status, 200);
    assert_eq!(
        e.json()["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    m.stop();
}

#[tokio::test]
async fn a_stream_sends_usage_only_when_include_usage_asks_for_it() {
    let m = start(MockConfig {
        tokens: 3,
        ..MockConfig::default()
    });
    let plain = post(&m, &body("m", r#","stream":true"#), &[]).await;
    let ev = events(&plain.body);
    assert_eq!(ev.len(), 1 + 3 + 1 + 1, "role, tokens, finish, [DONE]");
    assert!(!plain.body.contains("usage"), "{}", plain.body);

    let asked = body(
        "m",
        r#","stream":true,"max_tokens":2,"stream_options":{"include_usage":true}"#,
    );
    let a = post(&m, &asked, &[]).await;
    let ev = events(&a.body);
    assert_eq!(
        ev.len(),
        1 + 2 + 1 + 1 + 1,
        "role, tokens, finish, usage, [DONE]"
    );
    assert_eq!(*ev.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let (usage, others) = chunks.split_last().unwrap();
    for c in others {
        assert_eq!(c["usage"], Value::Null, "{c}");
        assert!(c.as_object().unwrap().contains_key("usage"), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        others.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["object"], "chat.completion.chunk");
    assert_eq!(usage["id"], others[0]["id"]);
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9})
    );

    // n choices interleave per token, and the usage counts them all.
    let n = body(
        "m",
        r#","stream":true,"n":2,"stream_options":{"include_usage":true}"#,
    );
    let a = post(&m, &n, &[]).await;
    let ev = events(&a.body);
    assert_eq!(ev.len(), 2 * (1 + 3 + 1) + 1 + 1);
    let second: Value = serde_json::from_str(ev[1]).unwrap();
    assert_eq!(second["choices"][0]["index"], 1);
    let usage: Value = serde_json::from_str(ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    m.stop();
}

#[tokio::test]
async fn a_model_that_refuses_stream_options_answers_400_before_any_window() {
    let m = start(MockConfig {
        refuse_include_usage: vec!["picky".into()],
        ..three_per_six_seconds()
    });
    let with = r#","stream":true,"stream_options":{"include_usage":true}"#;
    let r = post(&m, &body("picky", with), &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json(),
        json!({"error": {
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error", "param": "stream_options", "code": null}})
    );
    assert!(r.rate_limit_headers().is_empty());
    let a = post(&m, &body("picky", r#","stream":true"#), &[]).await;
    assert_eq!(a.status, 200, "retried without the field");
    assert_eq!(post(&m, &body("other", with), &[]).await.status, 200);
    let knob = [("x-mock-refuse-include-usage", "1")];
    assert_eq!(post(&m, &body("other", with), &knob).await.status, 400);
    assert_eq!(post(&m, &body("other", ""), &knob).await.status, 200);
    assert_eq!(m.stream_options_refused(), 2);
    assert_eq!(
        (m.admitted_total(), m.refused_total()),
        (3, 0),
        "the 400s entered no window"
    );
    m.stop();
}

#[tokio::test]
async fn token_and_request_limits_together_report_both_and_say_which_refused() {
    let m = start(MockConfig {
        tpm: 400.0, // 40 per 6 s
        ..three_per_six_seconds()
    });
    let twenty = body("m", r#","max_tokens":13"#);
    let a = post(&m, &twenty, &[]).await;
    // The bare dialect has no token headers.
    assert_eq!(a.header("x-ratelimit-remaining"), Some("2"));
    assert!(a.header("x-ratelimit-remaining-tokens").is_none());
    assert_eq!(post(&m, &twenty, &[]).await.status, 200);
    let r = post(&m, &twenty, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(r.header("retry-after"), Some("6"));
    assert!(
        r.header("x-ratelimit-remaining").is_none(),
        "requests are not spent"
    );
    // Tokens raised at run time, their history kept: the request window refuses next.
    m.set_token_limit(4000.0, 6 * S);
    assert_eq!(post(&m, &twenty, &[]).await.status, 200);
    let r = post(&m, &twenty, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json()["error"]["type"],
        "mock_error",
        "the plain request 429"
    );
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!((m.refused_for_tokens(), m.refused_for_requests()), (1, 1));
    assert_eq!(m.tokens_total(), 60);
    let w = call(m.addr, "GET", "/mock/windows?window_secs=6", &[], "")
        .await
        .json();
    assert_eq!(
        (&w["refused_requests"], &w["refused_tokens"]),
        (&json!(1), &json!(1))
    );
    assert_eq!(w["too_large"], 0);
    assert_eq!(
        w["tokens"]["windows"][0],
        json!({"index": 0, "tokens": 60, "refused": 1})
    );
    assert_eq!(w["tokens"]["max_in_rolling"], 60);
    assert_eq!(w["tokens"]["charged"], 60);
    m.stop();
}

#[tokio::test]
async fn openai_429s_of_either_limit_carry_both_families_of_headers() {
    let m = start(MockConfig {
        tpm: 400.0,
        openai_headers: true,
        ..three_per_six_seconds()
    });
    let twenty = body("m", r#","max_tokens":13"#);
    let a = post(&m, &twenty, &[]).await;
    assert_eq!(a.header("x-ratelimit-remaining-requests"), Some("2"));
    assert_eq!(a.header("x-ratelimit-remaining-tokens"), Some("20"));
    assert_eq!(a.header("x-ratelimit-limit-tokens"), Some("400"));
    post(&m, &twenty, &[]).await;
    let r = post(&m, &twenty, &[]).await;
    assert_eq!(r.json()["error"]["type"], "tokens");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining-tokens"), Some("0"));
    m.set_token_limit(0.0, 6 * S); // lifted
    post(&m, &twenty, &[]).await;
    let r = post(&m, &twenty, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert!(
        r.header("x-ratelimit-remaining-tokens").is_none(),
        "no token limit now"
    );
    m.stop();
}

#[tokio::test]
async fn nvidias_bare_429_stays_bare_for_the_token_limit() {
    let m = start(MockConfig {
        no_headers_at_all: true,
        ..sixty_tokens_per_six_seconds(TokenCharge::Reserved)
    });
    let forty = body("m", r#","max_tokens":33"#);
    let a = post(&m, &forty, &[]).await;
    assert_eq!(a.status, 200);
    assert!(a.rate_limit_headers().is_empty());
    let r = post(&m, &forty, &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body, r#"{"status":429,"title":"Too Many Requests"}"#);
    assert!(r.rate_limit_headers().is_empty());
    assert_eq!(m.refused_for_tokens(), 1, "the judge still knows");
    m.stop();
}

#[tokio::test]
async fn control_endpoint_sets_the_token_limit_keeping_history_and_reports_tokens() {
    let m = start(MockConfig {
        window_secs: 6.0,
        judge: true,
        ..MockConfig::default()
    });
    // Recorded before any token limit exists, so a limit set later counts them.
    let twenty = body("m", r#","max_tokens":13"#);
    assert_eq!(post(&m, &twenty, &[]).await.status, 200);
    let w = call(m.addr, "GET", "/mock/windows", &[], "").await.json();
    assert!(w.get("tokens").is_none(), "no token limit yet");
    let set = call(m.addr, "POST", "/mock/limit", &[], r#"{"tpm": 300}"#).await;
    assert_eq!(set.status, 200, "{}", set.body);
    let t = &set.json()["tokens"];
    assert_eq!(
        *t,
        json!({"tpm": 300, "max": 30, "window_secs": 6.0, "in_window": 20, "charge": "reserved"})
    );
    let r = post(&m, &twenty, &[]).await;
    assert_eq!(r.status, 429, "20 on record + 20 > 30");
    assert!(
        r.body.contains("Limit 300, Used 20, Requested 20"),
        "{}",
        r.body
    );
    // Both limits at once, over a window given for both.
    let set = call(
        m.addr,
        "POST",
        "/mock/limit",
        &[],
        r#"{"rpm": 60, "tpm": 600, "window_secs": 3}"#,
    )
    .await
    .json();
    assert_eq!(
        (&set["global"]["max"], &set["tokens"]["max"]),
        (&json!(3), &json!(30))
    );
    assert_eq!(m.limits().tokens.window, 3 * S);
    let st = call(m.addr, "GET", "/mock/stats", &[], "").await.json();
    assert_eq!(st["tpm_limit"], 600);
    assert_eq!(st["token_charge"], "reserved");
    assert_eq!(st["tokens_charged"], 20);
    assert_eq!(
        (&st["refused_tokens"], &st["refused_requests"]),
        (&json!(1), &json!(0))
    );
    let w = call(m.addr, "GET", "/mock/windows?window_secs=6", &[], "")
        .await
        .json();
    assert_eq!(w["tokens"]["charged"], 20);
    assert_eq!(w["tokens"]["windows"][0]["refused"], 1);
    for (bad, message) in [
        (r#"{"tpm": -5}"#, "tpm must be a number >= 0"),
        (r#"{"model": "m", "tpm": 5}"#, "tpm must be given without"),
    ] {
        let r = call(m.addr, "POST", "/mock/limit", &[], bad).await;
        assert_eq!(r.status, 400, "{bad}");
        let got = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(got.contains(message), "{bad}: {got}");
    }
    m.stop();
}

#[test]
fn token_flags_parse_and_a_bad_tpm_is_named() {
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        mock: MockConfig,
    }
    let f = <Flags as clap::Parser>::try_parse_from([
        "mock",
        "--tpm",
        "6000",
        "--token-charge",
        "actual",
        "--refuse-include-usage",
        "a/b",
        "--refuse-include-usage",
        "c",
        "--window-secs",
        "6",
    ])
    .unwrap();
    assert_eq!(f.mock.token_charge, TokenCharge::Actual);
    assert_eq!(f.mock.refuse_include_usage, ["a/b", "c"]);
    assert_eq!(f.mock.token_max().unwrap(), Some(600));
    let f = <Flags as clap::Parser>::try_parse_from(["mock"]).unwrap();
    assert_eq!(
        (f.mock.tpm, f.mock.token_charge),
        (0.0, TokenCharge::Reserved)
    );
    assert_eq!(f.mock.token_max().unwrap(), None, "off by default");
    let bad = MockConfig {
        tpm: -1.0,
        ..MockConfig::default()
    };
    assert!(bad
        .token_max()
        .unwrap_err()
        .to_string()
        .contains("--tpm -1"));
    assert!(MockServer::start(bad).is_err());
}
