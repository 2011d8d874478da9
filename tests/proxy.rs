//! The forwarding path against the simulated upstream: pass-through, streaming, header
//! rules and every error the sidecar answers itself.

mod common;

use common::*;
use http_body_util::BodyExt;
use nvidia_sidecar::mock::MockConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_answers_are_identical_to_calling_the_upstream_directly() {
    let s = stack(unlimited_mock(), &[]);
    for (method, path, body) in [
        ("GET", "/v1/models", ""),
        (
            "POST",
            "/v1/embeddings",
            r#"{"model":"nvidia/nv-embedqa-e5-v5","input":["a","b"]}"#,
        ),
    ] {
        let via = call(
            s.addr,
            req(
                method,
                s.addr,
                path,
                &[("content-type", "application/json")],
                body,
            ),
        )
        .await;
        let direct = call(
            s.mock.addr,
            req(
                method,
                s.mock.addr,
                path,
                &[("content-type", "application/json")],
                body,
            ),
        )
        .await;
        assert_eq!(via.status, 200);
        assert_eq!(via.body, direct.body, "{path}");
        assert_eq!(via.headers["content-type"], direct.headers["content-type"]);
    }
    let chat = s.chat(&[], CHAT).await;
    let v = chat.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "meta/llama-3.1-8b-instruct");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_answer_arrives_whole_and_ends_with_done() {
    let s = stack(
        MockConfig {
            tokens: 7,
            ..unlimited_mock()
        },
        &[],
    );
    let a = s.chat(&[], CHAT_STREAM).await;
    assert_eq!(a.status, 200);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = a.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(
        events.len(),
        7 + 3,
        "role + tokens + stop + DONE: {events:?}"
    );
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let content: String = events[1..8]
        .iter()
        .map(|e| {
            let v: serde_json::Value =
                serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(content.starts_with("The sidecar paces"));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_sse_chunk_reaches_the_client_before_the_upstream_sends_the_second() {
    // The upstream waits 60 s before its second chunk; the first must arrive long before.
    let s = stack(unlimited_mock(), &[]);
    let mut body = s
        .open_chat(&[("x-mock-token-delay-ms", "60000")], CHAT_STREAM)
        .await
        .into_body();
    let first = next_chunk(&mut body).await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    assert!(String::from_utf8_lossy(&first).contains(r#""role":"assistant""#));
    drop(body);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sees_the_provider_key_and_never_the_clients() {
    let s = stack(unlimited_mock(), &[]);
    let a = s
        .chat(
            &[
                ("authorization", "Bearer client-own-key"),
                ("x-priority", "high"),
            ],
            CHAT,
        )
        .await;
    assert_eq!(a.status, 200);
    let seen = s.mock.seen();
    let auth: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(auth, ["Bearer nvapi-provider-key-0001"]);
    assert!(
        !seen[0].headers.contains_key("x-priority"),
        "X-Priority is the sidecar's, not the upstream's"
    );
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_eq!(seen[0].body, CHAT.as_bytes());
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_request_ids_kept_or_added() {
    let s = stack(unlimited_mock(), &[]);
    let a = call(
        s.addr,
        req(
            "GET",
            s.addr,
            "/v1/models",
            &[
                ("connection", "keep-alive, x-drop-me"),
                ("x-drop-me", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic abc"),
                ("x-app-header", "kept"),
                ("x-request-id", "client-chosen-id"),
            ],
            "",
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-request-id"], "client-chosen-id");
    let h = &s.mock.seen()[0].headers;
    for gone in ["x-drop-me", "keep-alive", "te", "proxy-authorization"] {
        assert!(!h.contains_key(gone), "{gone} was forwarded");
    }
    assert_eq!(h["x-app-header"], "kept");
    assert_eq!(h["x-request-id"], "client-chosen-id");
    assert_eq!(h["host"], s.mock.addr.to_string());

    let b = call(s.addr, req("GET", s.addr, "/v1/models", &[], "")).await;
    let id = b.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(s.mock.seen()[1].headers["x-request-id"], id.as_str());
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_get_a_json_404() {
    let s = stack(unlimited_mock(), &[]);
    for path in ["/", "/v2/models", "/v1", "/admin"] {
        call(s.addr, req("GET", s.addr, path, &[], ""))
            .await
            .assert_error(404, "not_found");
    }
    assert_eq!(s.mock.requests(), 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let s = stack(unlimited_mock(), &[("SIDECAR_MAX_BODY_BYTES", "2048")]);
    let big = format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(4096));
    call(s.addr, req("POST", s.addr, "/v1/embeddings", &[], &big))
        .await
        .assert_error(413, "request_too_large");
    // Chunked, so no Content-Length tells in advance.
    let chunks = big
        .as_bytes()
        .chunks(500)
        .map(bytes::Bytes::copy_from_slice)
        .collect();
    let a = send_chunked(s.addr, "POST", "/v1/embeddings", &[], chunks).await;
    assert_eq!(a.status, 413, "{}", a.text());
    let ok = format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(1000));
    assert_eq!(
        call(s.addr, req("POST", s.addr, "/v1/embeddings", &[], &ok))
            .await
            .status,
        200
    );
    assert_eq!(s.mock.requests(), 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_or_too_large_headers_get_431() {
    let s = stack(
        unlimited_mock(),
        &[
            ("SIDECAR_MAX_HEADERS", "20"),
            ("SIDECAR_MAX_HEADER_BYTES", "2048"),
        ],
    );
    let many: Vec<(String, String)> = (0..25)
        .map(|i| (format!("x-h-{i}"), "v".to_owned()))
        .collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    call(s.addr, req("GET", s.addr, "/v1/models", &many_ref, ""))
        .await
        .assert_error(431, "headers_too_large");
    let long = "v".repeat(3000);
    call(
        s.addr,
        req("GET", s.addr, "/v1/models", &[("x-long", &long)], ""),
    )
    .await
    .assert_error(431, "headers_too_large");
    assert_eq!(s.mock.requests(), 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gets_502() {
    // A port that was just free: nothing listens there.
    let sidecar = sidecar_with_dead_upstream();
    let addr = sidecar.local_addr;
    let a = call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT)).await;
    a.assert_error(502, "upstream_unavailable");
    assert!(a.headers.contains_key("x-request-id"));
    let ready = call(addr, req("GET", addr, "/readyz", &[], "")).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["status"], "unavailable");
    assert!(ready.json()["reason"].as_str().unwrap().contains("connect"));
    assert_ledger_at(addr, sidecar.metrics_addr, 1).await;
    sidecar.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_headers_within_the_request_timeout_gets_504() {
    let s = stack(unlimited_mock(), &[("SIDECAR_REQUEST_TIMEOUT", "0.3")]);
    let a = s.chat(&[("x-mock-header-delay-ms", "5000")], CHAT).await;
    a.assert_error(504, "upstream_timeout");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_reset_mid_stream_ends_with_an_error_event_and_never_a_clean_end() {
    let s = stack(unlimited_mock(), &[]);
    let mut body = s
        .open_chat(&[("x-mock-reset-after", "3")], CHAT_STREAM)
        .await
        .into_body();
    let mut text = String::new();
    let mut ended_in_error = false;
    while let Some(chunk) = next_chunk(&mut body).await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => {
                ended_in_error = true;
                break;
            }
        }
    }
    assert!(ended_in_error, "the stream ended cleanly: {text}");
    assert_eq!(
        text.matches("data: {").count(),
        4,
        "3 chunks + the error event: {text}"
    );
    assert!(!text.contains("[DONE]"));
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{text}");
    let v: serde_json::Value = serde_json::from_str(last.split("data: ").nth(1).unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "upstream_stream_error");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_sse_reset_mid_body_is_an_error_to_the_client() {
    // A plain body cut by the upstream: the client must see a broken body, not a short one.
    let s = stack(unlimited_mock(), &[]);
    let resp = s.open_chat(&[("x-mock-reset-after", "1")], CHAT).await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let collected = resp.into_body().collect().await;
    assert!(
        collected.is_err(),
        "a reset upstream body must not end cleanly"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_hits_the_idle_timeout_not_a_total_deadline() {
    let s = stack(
        unlimited_mock(),
        &[
            ("SIDECAR_STREAM_IDLE_TIMEOUT", "0.5"),
            ("SIDECAR_REQUEST_TIMEOUT", "0.5"),
        ],
    );
    // 12 tokens 100 ms apart: 1.2 s in all, longer than both timeouts, never idle for long.
    let steady = s
        .chat(
            &[("x-mock-token-delay-ms", "100"), ("x-mock-tokens", "12")],
            CHAT_STREAM,
        )
        .await;
    assert!(
        steady.text().ends_with("data: [DONE]\n\n"),
        "{}",
        steady.text()
    );
    // A 30 s gap after the first chunk is cut by the idle timeout with an error event.
    let mut body = s
        .open_chat(&[("x-mock-token-delay-ms", "30000")], CHAT_STREAM)
        .await
        .into_body();
    let mut text = String::new();
    while let Some(Ok(c)) = next_chunk(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(text.contains("event: error"), "{text}");
    assert!(text.contains("idle"), "{text}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_answer_and_readiness_probes_the_upstream() {
    let s = stack(unlimited_mock(), &[]);
    let h = call(s.addr, req("GET", s.addr, "/healthz", &[], "")).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    let r = call(s.addr, req("GET", s.addr, "/readyz", &[], "")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ready");
    // The probe went out with the provider key.
    let seen = s.mock.seen();
    assert_eq!(seen[0].path, "/v1/models");
    assert_eq!(
        seen[0].headers["authorization"],
        "Bearer nvapi-provider-key-0001"
    );
    call(s.addr, req("POST", s.addr, "/healthz", &[], ""))
        .await
        .assert_error(405, "method_not_allowed");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_priority_is_a_400_that_says_what_is_accepted() {
    let s = stack(unlimited_mock(), &[]);
    let a = s.chat(&[("x-priority", "urgent")], CHAT).await;
    a.assert_error(400, "invalid_priority");
    assert!(a.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("high, normal or low"));
    assert_eq!(s.mock.requests(), 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_to_the_upstream_are_reused() {
    let s = stack(unlimited_mock(), &[]);
    for _ in 0..20 {
        let a = call(s.addr, req("GET", s.addr, "/v1/models", &[], "")).await;
        assert_eq!(a.status, 200);
    }
    // One worker, sequential requests: one upstream connection serves them all.
    let conns = s.mock.connections();
    assert_eq!(conns, 1, "upstream connections opened: {conns}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_may_speak_h2c() {
    let s = stack(unlimited_mock(), &[]);
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let r = http::Request::post(format!("http://{}/v1/chat/completions", s.addr))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            CHAT_STREAM.as_bytes(),
        )))
        .unwrap();
    note_sent(s.addr, 1);
    let resp = tx.send_request(r).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).ends_with("data: [DONE]\n\n"));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_route_to_providers_by_model_pattern() {
    let a = common::mock(unlimited_mock());
    let b = common::mock(unlimited_mock());
    let toml = format!(
        r#"
        default_provider = "main"
        [[providers]]
        name = "main"
        upstream_url = "{}"
        api_key = "key-main"
        models = ["meta/*"]
        [[providers]]
        name = "other"
        upstream_url = "{}"
        api_key = "key-other"
        models = ["mistralai/*", "nvidia/*"]
        "#,
        a.base_url(),
        b.base_url()
    );
    let cfg = config_from_toml(&toml);
    let sidecar = nvidia_sidecar::sidecar::start(nvidia_sidecar::app::App::new(cfg)).unwrap();
    let addr = sidecar.local_addr;
    for model in [
        "nvidia/nemotron",
        "meta/llama",
        "unknown-model",
        "mistralai/mixtral",
    ] {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        assert_eq!(
            call(addr, req("POST", addr, "/v1/chat/completions", &[], &body))
                .await
                .status,
            200
        );
    }
    let models = |m: &nvidia_sidecar::mock::MockServer| -> Vec<(String, String)> {
        m.seen()
            .iter()
            .map(|s| {
                let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
                (
                    v["model"].as_str().unwrap().to_owned(),
                    s.headers["authorization"].to_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        models(&a),
        [
            ("meta/llama".into(), "Bearer key-main".into()),
            ("unknown-model".into(), "Bearer key-main".into())
        ]
    );
    assert_eq!(
        models(&b),
        [
            ("nvidia/nemotron".into(), "Bearer key-other".into()),
            ("mistralai/mixtral".into(), "Bearer key-other".into())
        ]
    );
    assert_ledger_at(addr, sidecar.metrics_addr, 4).await;
    sidecar.stop();
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_unchanged() {
    let s = stack(unlimited_mock(), &[]);
    let a = s.chat(&[("x-mock-status", "503")], CHAT).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["type"], "mock_error");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_is_closed_and_frees_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = stack(
        unlimited_mock(),
        &[
            ("SIDECAR_HEADER_READ_TIMEOUT", "0.3"),
            ("SIDECAR_MAX_CONNECTIONS", "2"),
        ],
    );
    // Two silent clients take both slots…
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    // …until the first-byte timeout closes them (EOF, not a hang).
    for c in &mut silent {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("the sidecar closes a silent connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
    }
    // Then a real client gets in.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.read_to_string(&mut out),
    )
    .await
    .expect("answered")
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

/// A provider sends a whole answer with its `Content-Length`; the simulated one must
/// too, or every measurement through it would count chunked framing no provider sends.
#[tokio::test]
async fn the_simulated_upstream_sends_a_whole_answer_with_its_length() {
    let m = mock(unlimited_mock());
    let addr = m.addr;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let a = call(addr, req("POST", addr, "/v1/chat/completions", &[], body)).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_owned()),
        Some(a.body.len().to_string()),
        "{:?}",
        a.headers
    );
    assert!(
        a.headers.get("transfer-encoding").is_none(),
        "{:?}",
        a.headers
    );
    m.stop();
}
