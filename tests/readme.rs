//! The README agrees with the code: its settings table is generated from the one list
//! of settings, and its test command is `tests/run.sh`, which `.ci/run` runs too and
//! which sets up every tool the suite uses.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn readme_settings_table_matches_the_configuration_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- settings-table:begin -->\n")
        .expect("begin marker")
        + "<!-- settings-table:begin -->\n".len();
    let end = readme
        .find("<!-- settings-table:end -->")
        .expect("end marker");
    assert_eq!(
        &readme[start..end],
        nvidia_sidecar::config::markdown_table(),
        "README table is stale: replace it with the output of `nvidia-sidecar settings`"
    );
}

/// The text after the first `start`, up to the next `end` (or to the end of `text`).
fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(start).unwrap_or_else(|| panic!("no {start:?}")) + start.len();
    let len = text[from..].find(end).unwrap_or(text.len() - from);
    &text[from..from + len]
}

/// The command lines of a shell script: neither blank nor comments.
fn commands(script: &str) -> Vec<&str> {
    script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect()
}

#[test]
fn the_readme_test_command_is_the_set_up_script_and_ci_runs_it() {
    let readme = read("README.md");
    let quick_start = section(&readme, "## Quick start\n", "\n## ");
    let block = section(quick_start, "```sh\n", "```");
    let lines: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    assert!(
        lines.contains(&common::SETUP_COMMAND),
        "the Quick start's test command is {}:\n{block}",
        common::SETUP_COMMAND
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("cargo test")),
        "the Quick start's test command is {}:\n{block}",
        common::SETUP_COMMAND
    );

    let ci = read(".ci/run");
    let ci = commands(&ci);
    assert!(
        ci.contains(&common::SETUP_COMMAND),
        ".ci/run must run the tests through {}",
        common::SETUP_COMMAND
    );
    assert!(
        !ci.iter()
            .any(|l| l.starts_with("cargo test") && !l.contains("loom")),
        ".ci/run runs the suite only through {}",
        common::SETUP_COMMAND
    );
}

#[test]
fn the_set_up_script_parses_and_checks_every_tool() {
    let script = root().join(common::SETUP_COMMAND);
    let out = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bash -n {}:\n{}",
        common::SETUP_COMMAND,
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(&script).arg("--check").output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let tools = [
        "openai",
        "yaml",
        "prometheus",
        "promtool",
        "chromium",
        "chromedriver",
        "systemd-analyze",
        "redis-server",
        "kubectl",
        "compose",
    ];
    for tool in tools {
        assert!(
            report.lines().any(|l| {
                let mut words = l.split_whitespace();
                matches!(words.next(), Some("present" | "MISSING")) && words.next() == Some(tool)
            }),
            "--check does not report {tool}:\n{report}"
        );
    }
    assert_eq!(report.lines().count(), tools.len(), "{report}");
    // Under tests/run.sh every tool is there; elsewhere this is the skip it reports.
    if !out.status.success() {
        let missing: Vec<&str> = report
            .lines()
            .filter(|l| l.starts_with("MISSING"))
            .collect();
        assert!(
            !missing.is_empty(),
            "--check failed naming nothing:\n{report}"
        );
        return common::missing_tool(&missing.join("; "), common::SETUP_COMMAND);
    }
    assert!(!report.contains("MISSING"), "{report}");
}

/// Reports a missing tool when the test below runs it with SKIP_DEMO set (not ignored,
/// so that the suite's summary counts no ignored test; alone it does nothing).
#[test]
fn skip_demo() {
    if std::env::var_os("SKIP_DEMO").is_some() {
        common::missing_tool("demo-tool", "apt-get install demo-tool");
    }
}

/// A bare `cargo test` captures the tests' output and drops it when they pass, yet the
/// skip line reaches the terminal (the child's stderr); under TESTS_NO_SKIP
/// (tests/run.sh) or CI the same test fails instead.
#[test]
fn a_skipped_test_says_so_where_a_person_sees_it() {
    let run = |env: &[(&str, &str)]| {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "skip_demo"])
            .env_remove("TESTS_NO_SKIP")
            .env_remove("CI")
            .env("SKIP_DEMO", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("SKIPPED "))
        .unwrap_or_else(|| panic!("no SKIPPED line on stderr:\n{stderr}"));
    for part in [
        "demo-tool",
        "apt-get install demo-tool",
        common::SETUP_COMMAND,
    ] {
        assert!(line.contains(part), "{line:?} does not name {part}");
    }

    for strict in [("TESTS_NO_SKIP", "1"), ("CI", "true")] {
        let out = run(&[strict]);
        assert!(
            !out.status.success(),
            "with {}={} a missing tool fails the test",
            strict.0,
            strict.1
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("demo-tool is not installed"));
    }
}
