//! The request ledger: every request that reaches the proxy is counted once as arrived
//! (`sidecar_requests_arrived_total`, at acceptance), is in flight
//! (`sidecar_requests_in_flight{provider}`) until its answer's last byte or its
//! abandonment, and ends exactly once in `sidecar_requests_total` with its outcome,
//! however it ends: answered, refused, abandoned in the queue, while its body was read,
//! while the upstream thought, or mid-stream. So `arrived = sum of outcomes + in
//! flight`, in `/metrics` and in the dashboard snapshot alike.
//!
//! The queue scenarios run the limiter on a `ManualClock`: a token appears only when the
//! test advances it, so which request waits is decided by the test, not by timing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvidia_sidecar::limiter::DropReason;
use nvidia_sidecar::mock::MockConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value of `sidecar_requests_total` for one provider, route and outcome.
fn requests_total(text: &str, provider: &str, route: &str, outcome: &str) -> u64 {
    let series = format!(
        "sidecar_requests_total{{provider=\"{provider}\",route=\"{route}\",outcome=\"{outcome}\"}}"
    );
    sample(text, &series).unwrap_or_else(|| panic!("no series {series}")) as u64
}

/// Waits until `/metrics` shows `want` requests in flight for `provider`.
async fn wait_in_flight(metrics_addr: std::net::SocketAddr, provider: &str, want: u64) -> Ledger {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = metrics_ledger(metrics_addr).await;
        if l.in_flight.get(provider).copied().unwrap_or(0) == want {
            return l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {want} in flight for {provider}: {l:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the dashboard snapshot shows `want` requests in flight for `provider`.
async fn wait_snapshot_in_flight(addr: std::net::SocketAddr, provider: &str, want: u64) -> Ledger {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let l = snapshot_ledger(addr).await;
        if l.in_flight.get(provider).copied().unwrap_or(0) == want {
            return l;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the snapshot never showed {want} in flight for {provider}: {l:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Opens a connection and sends a request's head with `Content-Length: 1000` and only
/// the first bytes of its body; the sidecar is left reading the rest.
async fn half_sent_body(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.flush().await.unwrap();
    note_sent(addr, 1);
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_abandoned_in_the_queue_are_counted_once_as_client_gone_on_route_none() {
    // One token a second of the manual clock, no burst; room for three waiting.
    let (s, _clock) = paced_stack(&[
        ("SIDECAR_QUEUE_MAX_SIZE", "3"),
        ("SIDECAR_REQUEST_TIMEOUT", "60"),
        ("SIDECAR_SNAPSHOT_INTERVAL", "0.05"),
    ]);
    let limiter = Arc::clone(&s.app.providers[0].limiter);

    // The one token goes at once.
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    // Refused before routing: not a valid priority.
    s.chat(&[("x-priority", "urgent")], CHAT)
        .await
        .assert_error(400, "invalid_priority");
    // Three park; they are in flight while they wait, in both views.
    let parked: Vec<_> = (0..3).map(|_| spawn_chat(s.addr, &[], CHAT)).collect();
    wait_until("three requests to park", || {
        limiter.queues.counts().enqueued == 3
    })
    .await;
    let in_metrics = wait_in_flight(s.metrics_addr, "nvidia", 3).await;
    in_metrics.assert_balanced("/metrics with three parked");
    let in_snapshot = wait_snapshot_in_flight(s.addr, "nvidia", 3).await;
    in_snapshot.assert_balanced("the snapshot with three parked");
    assert_eq!(in_snapshot.arrived, 5);
    // The fourth finds the queue full.
    s.chat(&[], CHAT).await.assert_error(429, "queue_full");
    // The three clients leave.
    for p in parked {
        p.abort();
    }
    wait_until("the abandoned requests to leave the queue", || {
        limiter.queues.counts().dropped(DropReason::ClientGone) == 3
    })
    .await;
    wait_in_flight(s.metrics_addr, "nvidia", 0).await;

    let text = s.scrape().await;
    assert_eq!(
        requests_total(&text, "nvidia", "none", "client_gone"),
        3,
        "abandoned in the queue: never sent upstream"
    );
    assert_eq!(requests_total(&text, "nvidia", "limited", "client_gone"), 0);
    assert_eq!(requests_total(&text, "nvidia", "none", "rejected"), 1);
    assert_eq!(
        requests_total(&text, "nvidia", "none", "client_error"),
        1,
        "refused before routing: the default provider's, route none"
    );
    assert_eq!(requests_total(&text, "nvidia", "limited", "success"), 1);
    assert_eq!(s.mock.requests(), 1);
    assert_ledger(&s, 6).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_in_flight_until_the_client_leaves_mid_way_then_counted_once() {
    let s = stack(unlimited_mock(), &[("SIDECAR_SNAPSHOT_INTERVAL", "0.05")]);
    let mut body = s
        .open_chat(&[("x-mock-token-delay-ms", "60000")], CHAT_STREAM)
        .await
        .into_body();
    let first = next_chunk(&mut body).await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    // The head and a first chunk went out: the request is still in flight.
    let l = wait_in_flight(s.metrics_addr, "nvidia", 1).await;
    assert_eq!((l.arrived, l.ended()), (1, 0), "{l:#?}");
    wait_snapshot_in_flight(s.addr, "nvidia", 1).await;
    // The client leaves mid-stream.
    drop(body);
    wait_in_flight(s.metrics_addr, "nvidia", 0).await;
    let text = s.scrape().await;
    assert_eq!(requests_total(&text, "nvidia", "limited", "client_gone"), 1);
    assert_ledger(&s, 1).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_while_the_upstream_thinks_is_counted_once_as_client_gone() {
    let s = stack(unlimited_mock(), &[]);
    let waiting = spawn_chat(s.addr, &[("x-mock-header-delay-ms", "60000")], CHAT);
    wait_until("the request to reach the upstream", || {
        s.mock.requests() == 1
    })
    .await;
    wait_in_flight(s.metrics_addr, "nvidia", 1).await;
    waiting.abort();
    wait_in_flight(s.metrics_addr, "nvidia", 0).await;
    let text = s.scrape().await;
    assert_eq!(
        requests_total(&text, "nvidia", "limited", "client_gone"),
        1,
        "sent upstream, so on its route"
    );
    assert_eq!(requests_total(&text, "nvidia", "none", "client_gone"), 0);
    assert_ledger(&s, 1).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_leaves_while_sending_its_body_is_counted_once() {
    let s = stack(unlimited_mock(), &[]);
    let tcp = half_sent_body(s.addr).await;
    // Not routed yet: in flight under the default provider.
    let l = wait_in_flight(s.metrics_addr, "nvidia", 1).await;
    assert_eq!(l.arrived, 1);
    drop(tcp);
    wait_in_flight(s.metrics_addr, "nvidia", 0).await;
    let l = metrics_ledger(s.metrics_addr).await;
    assert_eq!(l.ended(), 1, "{l:#?}");
    assert_eq!(s.mock.requests(), 0);
    assert_ledger(&s, 1).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_in_flight_under_the_default_provider_until_routing_picks_its_own() {
    let main = common::mock(unlimited_mock());
    let other = common::mock(unlimited_mock());
    let toml = format!(
        r#"
        default_provider = "main"
        snapshot_interval = 0.05
        [[providers]]
        name = "main"
        upstream_url = "{}"
        api_key = "key-main"
        models = ["meta/*"]
        [[providers]]
        name = "other"
        upstream_url = "{}"
        api_key = "key-other"
        models = ["mistralai/*"]
        "#,
        main.base_url(),
        other.base_url()
    );
    let app = nvidia_sidecar::app::App::new(config_from_toml(&toml));
    let sidecar = nvidia_sidecar::sidecar::start(app).unwrap();
    let (addr, metrics_addr) = (sidecar.local_addr, sidecar.metrics_addr);
    forget_sent(addr);

    // Its body not read yet, a request belongs to the default provider.
    let tcp = half_sent_body(addr).await;
    wait_in_flight(metrics_addr, "main", 1).await;
    drop(tcp);
    wait_in_flight(metrics_addr, "main", 0).await;

    // Routed to `other` by its model, it is in flight there and nowhere else.
    const MISTRAL: &str = r#"{"model":"mistralai/mixtral","messages":[]}"#;
    let waiting = spawn_chat(addr, &[("x-mock-header-delay-ms", "300")], MISTRAL);
    let l = wait_in_flight(metrics_addr, "other", 1).await;
    assert_eq!(l.in_flight.get("main"), None, "{l:#?}");
    let l = wait_snapshot_in_flight(addr, "other", 1).await;
    assert_eq!(l.in_flight.get("main"), None, "{l:#?}");
    assert_eq!(waiting.await.unwrap(), 200);
    assert_eq!(
        call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT))
            .await
            .status,
        200
    );

    let l = metrics_ledger(metrics_addr).await;
    assert_eq!(l.outcome("other", "success"), 1, "{l:#?}");
    assert_eq!(l.outcome("main", "success"), 1, "{l:#?}");
    assert_ledger_at(addr, metrics_addr, 3).await;
    sidecar.stop();
    main.stop();
    other.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mixed_load_with_clients_leaving_every_request_sent_is_counted_once() {
    // Paced below the offered load so requests queue; a small queue so some are refused.
    let s = stack(
        MockConfig {
            rpm: 0.0,
            token_delay_ms: 5,
            tokens: 20,
            ..MockConfig::default()
        },
        &[
            ("SIDECAR_RATE_RPM", "3000"),
            ("SIDECAR_BUCKET_CAPACITY", "5"),
            ("SIDECAR_QUEUE_MAX_SIZE", "40"),
            ("SIDECAR_SNAPSHOT_INTERVAL", "0.05"),
        ],
    );
    const N: u64 = 150;
    let mut tasks = Vec::new();
    for i in 0..N {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let (body, headers): (&str, &[(&str, &str)]) = match i % 5 {
                0 => (CHAT_STREAM, &[]),
                1 => (CHAT, &[("x-priority", "low")]),
                2 => (CHAT, &[("x-priority", "nope")]),
                _ => (CHAT, &[]),
            };
            // Every third client gives up after a while: queued, waiting or streaming.
            if i % 3 == 0 {
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let mut head = format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                    body.len()
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                tcp.write_all(format!("{head}\r\n{body}").as_bytes())
                    .await
                    .unwrap();
                note_sent(addr, 1);
                let patience = Duration::from_millis(20 + i % 7 * 30);
                let _ = tokio::time::timeout(patience, async {
                    let mut buf = [0u8; 4096];
                    while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
                })
                .await;
                // A connection closed before the sidecar's worker read the request is
                // dropped by hyper unserved: hang up only once it has arrived.
                wait_for_arrivals(addr, sent_to(addr)).await;
            } else {
                call(addr, req("POST", addr, "/v1/chat/completions", headers, body)).await;
            }
        }));
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let l = metrics_ledger(s.metrics_addr).await;
    assert!(
        l.outcome("nvidia", "client_gone") > 0,
        "some clients left before their answer: {l:#?}"
    );
    assert_ledger(&s, N).await;
    assert_eq!(sent_to(s.addr), N);
    s.stop();
}
