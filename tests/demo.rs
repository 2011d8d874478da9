//! The README's first command: the demo runs with no key and no network.

use std::process::Command;

#[test]
fn demo_runs_with_no_key_and_no_network_and_prints_its_urls() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
        .current_dir(dir.path())
        .env_clear()
        .env("SIDECAR_LISTEN_PORT", "0")
        .env("SIDECAR_METRICS_PORT", "0")
        .args(["demo", "--duration", "6", "--client-rpm", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("proxy (OpenAI base)  http://127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("simulated upstream"), "{stdout}");
    let report = stdout
        .lines()
        .find(|l| l.starts_with("client: sent"))
        .expect("a client report");
    assert!(report.contains("200×"), "no request answered: {report}");
    assert!(stdout.contains("demo finished"), "{stdout}");
}
