//! The mock over real sockets: limits, dialects, the worker cap, the judge and the
//! control endpoints, each started on port 0 and called with hyper's client.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::*;

mod tokens;

const S: Duration = Duration::from_secs(1);

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }

    fn rate_limit_headers(&self) -> Vec<&str> {
        self.headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("x-ratelimit") || *k == "retry-after")
            .collect()
    }
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        // One request per connection: none is left idle for `stop` to wait on.
        .header("connection", "close");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = tx.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn chat(m: &MockServer, model: &str) -> Answer {
    chat_with(m, model, &[]).await
}

async fn chat_with(m: &MockServer, model: &str, headers: &[(&str, &str)]) -> Answer {
    let body = format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    call(m.addr, "POST", "/v1/chat/completions", headers, &body).await
}

fn start(config: MockConfig) -> MockServer {
    MockServer::start(config).expect("mock starts")
}

/// 3 per rolling 6 s.
fn three_per_six_seconds() -> MockConfig {
    MockConfig {
        rpm: 30.0,
        window_secs: 6.0,
        ..MockConfig::default()
    }
}

/// Parses Go's `time.Duration` strings as far as the mock writes them.
fn parse_go(s: &str) -> Duration {
    if let Some(ms) = s.strip_suffix("ms") {
        return Duration::from_millis(ms.parse().unwrap());
    }
    let s = s.strip_suffix('s').expect("ends in s");
    let (h, rest) = s.split_once('h').unwrap_or(("0", s));
    let (m, secs) = rest.split_once('m').unwrap_or(("0", rest));
    let whole: u64 = h.parse::<u64>().unwrap() * 3600 + m.parse::<u64>().unwrap() * 60;
    Duration::from_secs(whole) + Duration::from_secs_f64(secs.parse().unwrap())
}

#[tokio::test]
async fn bare_headers_count_down_and_429_says_when_to_come_back() {
    let m = start(three_per_six_seconds());
    let a = chat(&m, "a").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(a.header("x-ratelimit-remaining"), Some("2"));
    let reset: f64 = a.header("x-ratelimit-reset").unwrap().parse().unwrap();
    assert!((5.0..=6.0).contains(&reset), "reset {reset}");
    chat(&m, "a").await;
    chat(&m, "a").await;
    let r = chat(&m, "a").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("6"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert!(r.header("x-ratelimit-limit-requests").is_none());
    assert_eq!(m.rate_limited(), 1);
    m.stop();
}

#[tokio::test]
async fn no_quota_headers_leaves_them_off_admitted_answers_only() {
    let m = start(MockConfig {
        no_quota_headers: true,
        ..three_per_six_seconds()
    });
    for _ in 0..3 {
        assert!(chat(&m, "a").await.rate_limit_headers().is_empty());
    }
    let r = chat(&m, "a").await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some() && r.header("x-ratelimit-limit").is_some());
    m.stop();
}

#[tokio::test]
async fn openai_headers_state_the_limit_per_minute_and_reset_as_a_go_duration() {
    let m = start(MockConfig {
        openai_headers: true,
        ..three_per_six_seconds()
    });
    let a = chat(&m, "a").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-ratelimit-limit-requests"), Some("30"));
    assert_eq!(a.header("x-ratelimit-remaining-requests"), Some("2"));
    let reset = parse_go(a.header("x-ratelimit-reset-requests").unwrap());
    assert!(reset <= 6 * S && reset > 5 * S, "{reset:?}");
    assert!(a.header("x-ratelimit-limit").is_none(), "one dialect only");
    chat(&m, "a").await;
    chat(&m, "a").await;
    let r = chat(&m, "a").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("30"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    let wait = r.header("x-ratelimit-reset-requests").unwrap();
    assert!(
        wait.ends_with('s') && !wait.contains('m'),
        "under 6 s as seconds with milliseconds, e.g. 5.981s: {wait}"
    );
    assert!(parse_go(wait) <= 6 * S && parse_go(wait) > 5 * S, "{wait}");
    assert_eq!(r.header("retry-after"), Some("6"));
    m.stop();
}

#[tokio::test]
async fn retry_after_date_parses_back_to_about_the_wait() {
    let m = start(MockConfig {
        retry_after_date: true,
        ..three_per_six_seconds()
    });
    for _ in 0..3 {
        assert_eq!(chat(&m, "a").await.status, 200);
    }
    let before = SystemTime::now();
    let r = chat(&m, "a").await;
    assert_eq!(r.status, 429);
    let at = httpdate::parse_http_date(r.header("retry-after").unwrap()).expect("an HTTP date");
    let wait = at.duration_since(before).expect("in the future");
    // The window frees at most 6 s from now; rounding up to the second adds under 1 s.
    assert!(wait > 4 * S && wait <= 7 * S, "{wait:?}");
    m.stop();
}

#[tokio::test]
async fn bare_429_sends_no_rate_limit_headers_at_all() {
    let m = start(MockConfig {
        no_headers_at_all: true,
        openai_headers: true,
        retry_after_date: true,
        ..three_per_six_seconds()
    });
    for _ in 0..3 {
        let a = chat(&m, "a").await;
        assert_eq!(a.status, 200);
        assert_eq!(a.rate_limit_headers(), Vec::<&str>::new());
    }
    let r = chat(&m, "a").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.rate_limit_headers(), Vec::<&str>::new());
    assert_eq!(r.body, r#"{"status":429,"title":"Too Many Requests"}"#);
    m.stop();
}

#[tokio::test]
async fn model_limits_are_separate_windows_on_top_of_the_global_one() {
    let m = start(MockConfig {
        rpm: 0.0,
        window_secs: 6.0,
        model_limits: vec!["m=20".into(), "n=10".into()], // 2 and 1 per 6 s
        openai_headers: true,
        ..MockConfig::default()
    });
    let a = chat(&m, "m").await;
    assert_eq!(a.header("x-ratelimit-limit-requests"), Some("20"));
    assert_eq!(chat(&m, "m").await.status, 200);
    let r = chat(&m, "m").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("20"));
    assert_eq!(chat(&m, "n").await.status, 200, "n has its own window");
    assert_eq!(chat(&m, "n").await.status, 429);
    for _ in 0..10 {
        let a = chat(&m, "other").await;
        assert_eq!(a.status, 200, "the global limit is off");
        assert!(a.header("x-ratelimit-limit-requests").is_none());
    }
    assert_eq!(m.max_in_rolling_for("m", 6 * S), 2);
    assert_eq!(m.max_in_rolling_for("n", 6 * S), 1);
    assert_eq!(m.max_in_rolling(6 * S), 13);
    let w = m.window_counts_for("m", 6 * S);
    assert_eq!((w[0].admitted, w[0].refused), (2, 1));
    assert_eq!(m.refused_total(), 2);
    // A global limit set now counts the 13 admissions already in the window.
    m.set_limit(150.0, 6 * S); // 15 per 6 s
    assert_eq!(chat(&m, "other").await.status, 200);
    assert_eq!(chat(&m, "other").await.status, 200);
    assert_eq!(chat(&m, "other").await.status, 429);
    m.stop();
}

#[tokio::test]
async fn a_full_worker_answers_nvidias_429_and_does_not_consume_the_window() {
    let m = start(MockConfig {
        worker_limit: Some(1),
        token_delay_ms: 100,
        tokens: 3,
        ..three_per_six_seconds()
    });
    // A stream holds its worker until its body ends: its head is proof it is in flight.
    let addr = m.addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let stream = Request::post("/v1/chat/completions")
        .header("host", addr.to_string())
        .header("connection", "close")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"a","stream":true,"messages":[]}"#,
        )))
        .unwrap();
    let held = tx.send_request(stream).await.unwrap();
    assert_eq!(held.status(), 200);

    let r = chat(&m, "a").await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json(),
        serde_json::json!({"status": 429, "title": "Too Many Requests",
            "detail": "ResourceExhausted: Worker local total request limit reached (1/1)"})
    );
    assert_eq!(r.rate_limit_headers(), Vec::<&str>::new());
    assert_eq!(chat(&m, "b").await.status, 200, "the cap is per model");
    assert_eq!(m.worker_limited(), 1);
    assert_eq!(m.rate_limited(), 1);
    assert_eq!((m.admitted_total(), m.refused_total()), (2, 0));

    held.into_body().collect().await.unwrap();
    // The body has ended; the slot is freed when hyper drops it, just after.
    let mut n = 0;
    let a = loop {
        let a = chat(&m, "a").await;
        if a.status == 200 || n == 50 {
            break a;
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(a.status, 200);
    assert_eq!(
        a.header("x-ratelimit-remaining"),
        Some("0"),
        "3 admissions, not 4"
    );
    m.stop();
}

#[tokio::test]
async fn control_endpoint_changes_the_limit_and_the_judge_counts_over_http() {
    let m = start(MockConfig {
        rpm: 0.0,
        ..MockConfig::default()
    });
    let w = call(m.addr, "GET", "/mock/windows?window_secs=6", &[], "").await;
    assert_eq!(w.json()["judging"], false, "no limit, no judge");

    let set = call(
        m.addr,
        "POST",
        "/mock/limit",
        &[],
        r#"{"rpm": 30, "window_secs": 6}"#,
    )
    .await;
    assert_eq!(set.status, 200, "{}", set.body);
    let st = set.json();
    assert_eq!(st["global"]["max"], 3);
    assert_eq!(st["global"]["rpm"], 30);
    assert_eq!(st["global"]["window_secs"], 6.0);
    for _ in 0..3 {
        assert_eq!(chat(&m, "a").await.status, 200);
    }
    assert_eq!(chat(&m, "a").await.status, 429);

    let w = call(m.addr, "GET", "/mock/windows?window_secs=6", &[], "")
        .await
        .json();
    assert_eq!(w["judging"], true);
    assert_eq!(w["admitted"], 3);
    assert_eq!(w["refused"], 1);
    assert_eq!(w["max_in_rolling"], 3);
    assert_eq!(
        w["windows"][0],
        serde_json::json!({"index": 0, "admitted": 3, "refused": 1})
    );

    // Raised: admits at once, with the three on record.
    call(
        m.addr,
        "POST",
        "/mock/limit",
        &[],
        r#"{"rpm": 40, "window_secs": 6}"#,
    )
    .await;
    let a = chat(&m, "a").await;
    assert_eq!(
        (a.status, a.header("x-ratelimit-remaining")),
        (200, Some("0"))
    );

    let set = call(
        m.addr,
        "POST",
        "/mock/limit",
        &[],
        r#"{"model": "meta/llama-3.1-8b-instruct", "rpm": 1}"#,
    )
    .await;
    let st = set.json();
    let model = &st["models"]["meta/llama-3.1-8b-instruct"];
    assert_eq!(model["max"], 1, "1 a minute over the start-up window, 60 s");
    assert_eq!(model["window_secs"], 60.0);
    let w = call(
        m.addr,
        "GET",
        "/mock/windows?window_secs=6&model=meta%2Fllama-3.1-8b-instruct",
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(w["admitted"], 0);
    assert_eq!(w["refused"], 0);
    let w = call(
        m.addr,
        "GET",
        "/mock/windows?window_secs=6&model=a",
        &[],
        "",
    )
    .await
    .json();
    assert_eq!(w["admitted"], 4);
    assert_eq!(w["refused"], 1);
    assert_eq!(
        m.window_counts(6 * S)[0],
        WindowCount {
            index: 0,
            admitted: 4,
            refused: 1
        }
    );
    m.stop();
}

#[tokio::test]
async fn control_endpoint_rejects_bad_input_with_a_message_naming_the_field() {
    let m = start(three_per_six_seconds());
    let cases = [
        ("not json", "invalid JSON"),
        (r#"{"window_secs": 6}"#, r#"needs "rpm" or "tpm""#),
        (r#"{"rpm": -1}"#, "rpm must be a number >= 0"),
        (r#"{"rpm": 30, "window_secs": 0}"#, "window_secs must be"),
        (r#"{"rpm": 30, "window": 6}"#, "unknown field `window`"),
        (r#"{"model": "", "rpm": 30}"#, "model must be a model name"),
    ];
    for (body, message) in cases {
        let r = call(m.addr, "POST", "/mock/limit", &[], body).await;
        assert_eq!(r.status, 400, "{body}");
        let got = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(got.contains(message), "{body}: {got}");
    }
    let r = call(m.addr, "GET", "/mock/windows?window_secs=abc", &[], "").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        call(m.addr, "PUT", "/mock/limit", &[], "").await.status,
        405
    );
    assert_eq!(m.limits().global.max, Some(3), "nothing changed");
    assert_eq!(m.requests(), 0, "control calls are not provider requests");
    m.stop();
}

#[test]
fn model_limit_flags_parse_or_name_the_bad_value() {
    let cfg = |v: &[&str]| MockConfig {
        window_secs: 6.0,
        model_limits: v.iter().map(|s| s.to_string()).collect(),
        ..MockConfig::default()
    };
    assert_eq!(
        cfg(&["meta/llama=20", "x=0"])
            .parsed_model_limits()
            .unwrap(),
        vec![("meta/llama".to_owned(), Some(2)), ("x".to_owned(), None)]
    );
    for bad in ["m", "=20", "m=-1", "m=fast"] {
        let e = cfg(&[bad]).parsed_model_limits().unwrap_err();
        assert!(e.to_string().contains(bad), "{e}");
    }
    assert!(MockServer::start(cfg(&["nope"])).is_err());
}
