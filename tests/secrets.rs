//! The provider key never appears in logs or in answers, at any log level.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};

const CANARY: &str = "nvapi-CANARY-7f3a9c1e5b2d";

#[test]
fn the_provider_key_never_reaches_logs_or_clients_even_at_trace_level() {
    let mock = nvidia_sidecar::mock::MockServer::start(nvidia_sidecar::mock::MockConfig {
        api_key: Some(CANARY.into()),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .current_dir(dir.path())
        .env_clear()
        .env("SIDECAR_UPSTREAM_URL", mock.base_url())
        .env("SIDECAR_UPSTREAM_API_KEY", CANARY)
        .env("SIDECAR_LISTEN_PORT", "0")
        .env("SIDECAR_METRICS_PORT", "0")
        .env("SIDECAR_WORKERS", "1")
        .env("SIDECAR_LOG_LEVEL", "trace")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    // Read the log on a thread so the pipe never fills.
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let addr = wait_for_listener(child.id());
    let answers = rt.block_on(async {
        let mut out = String::new();
        for (path, body, extra) in [
            ("/v1/chat/completions", common::CHAT, ("x-priority", "high")),
            (
                "/v1/chat/completions",
                common::CHAT_STREAM,
                ("x-mock-reset-after", "2"),
            ),
            ("/v1/models", "", ("authorization", "Bearer client")),
            ("/readyz", "", ("x-a", "b")),
            ("/nope", "", ("x-a", "b")),
        ] {
            let method = if body.is_empty() { "GET" } else { "POST" };
            if let Ok(resp) =
                common::send(addr, common::req(method, addr, path, &[extra], body)).await
            {
                out.push_str(&format!("{:?}", resp.headers()));
                use http_body_util::BodyExt;
                if let Ok(b) = resp.into_body().collect().await {
                    out.push_str(&String::from_utf8_lossy(&b.to_bytes()));
                }
            }
        }
        out
    });
    assert!(
        answers.contains("chat.completion"),
        "the key was accepted upstream: {answers}"
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let log = log.join().unwrap();
    assert!(
        log.contains("\"status\":200"),
        "requests were logged: {log}"
    );
    assert!(
        log.contains("nvap****"),
        "the start-up line shows the masked key"
    );
    assert!(!log.contains(CANARY), "the key leaked into the log");
    assert!(
        !log.contains("CANARY"),
        "part of the key leaked into the log"
    );
    assert!(!answers.contains("CANARY"), "the key leaked into an answer");
    mock.stop();
}

/// The child's listening TCP port, from /proc (the child binds port 0).
/// The proxy's address: among the process's listening sockets (the metrics listener is
/// one of them and starts first), the one answering `GET /healthz` with 200.
fn wait_for_listener(pid: u32) -> std::net::SocketAddr {
    for _ in 0..200 {
        let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter_map(|l| {
                        let l = l.to_string_lossy().into_owned();
                        l.strip_prefix("socket:[")
                            .map(|s| s.trim_end_matches(']').to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        for line in tcp.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // state 0A = LISTEN
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = u16::from_str_radix(f[1].split(':').nth(1).unwrap(), 16).unwrap();
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                if answers_healthz(addr) {
                    return addr;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("the sidecar never listened");
}

fn answers_healthz(addr: std::net::SocketAddr) -> bool {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}
