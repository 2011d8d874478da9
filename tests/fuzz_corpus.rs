//! Replays every checked-in fuzz corpus file through the fuzz entry points, on stable.
//!
//! The entry points live in `nvidia_sidecar::fuzz_targets`; `fuzz/` runs the same
//! functions under libFuzzer (`.ci/run`, `cargo fuzz run <target>`).

use std::path::Path;

/// Runs every file of `fuzz/corpus/<target>` through `run`; returns how many there were.
fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
            std::panic::resume_unwind(Box::new(format!(
                "{}: {}",
                path.display(),
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic")
            )));
        }
        n += 1;
    }
    n
}

#[test]
fn request_parsers_corpus_replays_without_panicking() {
    let n = replay(
        "request_parsers",
        nvidia_sidecar::fuzz_targets::request_parsers,
    );
    assert!(n >= 8, "corpus has only {n} files");
}

#[test]
fn admin_patch_corpus_replays_without_panicking() {
    let n = replay("admin_patch", nvidia_sidecar::fuzz_targets::admin_patch);
    assert!(n >= 8, "corpus has only {n} files");
}

#[test]
fn config_toml_corpus_replays_without_panicking() {
    let n = replay("config_toml", nvidia_sidecar::fuzz_targets::config_toml);
    assert!(n >= 8, "corpus has only {n} files");
}

#[test]
fn priority_header_corpus_replays_without_panicking() {
    let n = replay(
        "priority_header",
        nvidia_sidecar::fuzz_targets::priority_header,
    );
    assert!(n >= 8, "corpus has only {n} files");
}

#[test]
fn upstream_response_corpus_replays_without_panicking() {
    let n = replay(
        "upstream_response",
        nvidia_sidecar::fuzz_targets::upstream_response,
    );
    assert!(n >= 8, "corpus has only {n} files");
}

#[test]
fn client_request_corpus_replays_without_panicking() {
    let n = replay(
        "client_request",
        nvidia_sidecar::fuzz_targets::client_request,
    );
    assert!(n >= 8, "corpus has only {n} files");
}

#[test]
fn token_fields_corpus_replays_without_panicking() {
    let n = replay("token_fields", nvidia_sidecar::fuzz_targets::token_fields);
    assert!(n >= 8, "corpus has only {n} files");
}
