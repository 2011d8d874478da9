//! The official OpenAI Python SDK gets the same answers through the sidecar as from the
//! upstream directly, streaming included. `tests/run.sh` installs the SDK (`pip install
//! openai`); under a bare `cargo test` without it the test is skipped and says so.

mod common;

use std::process::Command;

#[test]
fn the_openai_python_sdk_gets_identical_answers_through_the_sidecar() {
    let has_sdk = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_sdk {
        return common::missing_tool(
            "python3 with the openai package",
            "python3 -m pip install openai",
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let s = common::stack(
        nvidia_sidecar::mock::MockConfig {
            api_key: Some("nvapi-provider-key-0001".into()),
            ..Default::default()
        },
        &[],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let out = Command::new("python3")
        .args([
            script,
            &format!("http://{}/v1", s.addr),
            &s.mock.base_url(),
            "nvapi-provider-key-0001",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.matches("ok: ").count(), 4, "{stdout}");
    // One request through the sidecar per check (the SDK's retries are off).
    rt.block_on(common::assert_ledger(&s, 4));
    drop(_guard);
    s.stop();
}
