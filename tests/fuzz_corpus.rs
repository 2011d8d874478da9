//! Replays every checked-in fuzz corpus file through the fuzz entry points, on stable.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        run(&std::fs::read(&path).unwrap());
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
    assert!(n >= 5, "corpus has only {n} files");
}
