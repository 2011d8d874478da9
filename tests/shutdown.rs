//! Graceful shutdown: in-flight work finishes within the grace period; what is still
//! streaming when it ends is closed cleanly with an error event.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use common::*;
use nvidia_sidecar::mock::MockConfig;

fn slow_stream_mock(token_delay_ms: u64) -> MockConfig {
    MockConfig {
        rpm: 0.0,
        token_delay_ms,
        tokens: 10,
        ..MockConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_flight_stream_finishes_after_shutdown_begins_and_new_connections_are_refused() {
    let s = stack(slow_stream_mock(50), &[]);
    let mut body = s.open_chat(&[], CHAT_STREAM).await.into_body();
    let mut text =
        String::from_utf8(next_chunk(&mut body).await.unwrap().unwrap().to_vec()).unwrap();
    s.sidecar.begin_shutdown();
    while let Some(chunk) = next_chunk(&mut body).await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("no error while draining"),
        ));
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let addr = s.addr;
    tokio::task::spawn_blocking(move || s.sidecar.join())
        .await
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still accepting after shutdown"
    );
    assert_app_ledger(&s.app, sent_to(addr));
    assert_eq!(
        Ledger::from_metrics(&nvidia_sidecar::exposition::render(&s.app))
            .outcome("nvidia", "success"),
        1
    );
    s.mock.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_still_open_when_the_grace_period_ends_is_closed_with_an_error_event() {
    let s = stack(
        slow_stream_mock(60_000),
        &[("SIDECAR_SHUTDOWN_GRACE", "0.3")],
    );
    let mut body = s.open_chat(&[], CHAT_STREAM).await.into_body();
    let mut text = String::new();
    text.push_str(&String::from_utf8_lossy(
        &next_chunk(&mut body).await.unwrap().unwrap(),
    ));
    s.sidecar.begin_shutdown();
    while let Some(chunk) = next_chunk(&mut body).await {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("a clean end, not a reset"),
        ));
    }
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{text}");
    assert!(last.contains("shutting_down"), "{last}");
    let addr = s.addr;
    tokio::task::spawn_blocking(move || s.sidecar.join())
        .await
        .unwrap();
    assert_app_ledger(&s.app, sent_to(addr));
    assert_eq!(
        Ledger::from_metrics(&nvidia_sidecar::exposition::render(&s.app))
            .outcome("nvidia", "shutdown"),
        1,
        "a stream cut by the grace period ends once, as shutdown"
    );
    s.mock.stop();
}

/// The real binary: SIGTERM while a stream is in flight lets it finish, then exits 0.
#[test]
fn sigterm_drains_an_in_flight_stream_then_exits_zero() {
    let mock = nvidia_sidecar::mock::MockServer::start(slow_stream_mock(100)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .current_dir(dir.path())
        .env_clear()
        .env("SIDECAR_UPSTREAM_URL", mock.base_url())
        .env("SIDECAR_LISTEN_PORT", "0")
        .env("SIDECAR_METRICS_PORT", "0")
        .env("SIDECAR_WORKERS", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The start-up log line names the bound address.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "sidecar exited early"
        );
        if let Some(rest) = line.split("\"listen\":\"").nth(1) {
            break rest.split('"').next().unwrap().to_owned();
        }
    };
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT_STREAM}",
        CHAT_STREAM.len()
    )
    .unwrap();
    let mut first = [0u8; 64];
    let n = conn.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = String::new();
    conn.read_to_string(&mut rest).unwrap();
    assert!(
        rest.contains("data: [DONE]"),
        "stream cut by SIGTERM: {rest}"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let mut log = String::new();
    stderr.read_to_string(&mut log).unwrap();
    assert!(log.contains("shutting down"), "{log}");
    mock.stop();
}
