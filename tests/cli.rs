//! The command line: a bad configuration stops the binary with exit code 2 and one line
//! on stderr; `--help` works for every subcommand.
//!
//! Every run has a cleared environment (PATH only) and an empty temporary working
//! directory, so neither the developer's variables nor a `.env` file leak in.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{binary, wait_for_exit, Exited};

/// Runs the binary in `dir` with only `vars` (and PATH) set. A run that has not ended
/// after 30 s (it would be serving) is killed and fails the test.
fn sidecar(dir: &Path, vars: &[(&str, &str)], args: &[&str]) -> Exited {
    let child = binary(dir, vars)
        .args(args)
        .spawn()
        .expect("the binary starts");
    wait_for_exit(
        child,
        Duration::from_secs(30),
        &format!("{args:?} with {vars:?}"),
    )
}

fn stderr_line(run: &Exited) -> &str {
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not exactly one line: {:?}", run.stderr);
    lines[0]
}

#[test]
fn a_bad_setting_exits_2_with_one_line_naming_setting_value_and_range() {
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(dir.path(), &[("SIDECAR_RATE_RPM", "0")], &[]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    // Named as the user wrote it: the variable.
    assert!(
        line.starts_with("nvidia-sidecar: invalid SIDECAR_RATE_RPM=\"0\": "),
        "{line}"
    );
    assert!(
        line.contains("greater than 0 and at most 6000000"),
        "{line}"
    );
    assert!(run.stdout.is_empty(), "{:?}", run.stdout);
}

#[test]
fn a_setting_that_does_not_parse_exits_2_naming_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(dir.path(), &[("SIDECAR_LISTEN_PORT", "70000")], &[]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(line.contains("SIDECAR_LISTEN_PORT=\"70000\""), "{line}");
    assert!(line.contains("an integer from 0 to 65535"), "{line}");
}

#[test]
fn a_missing_config_file_exits_2_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-sidecar.toml");
    let path = path.to_str().unwrap();
    let run = sidecar(dir.path(), &[], &["--config", path]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(line.contains(path), "{line}");
}

#[test]
fn an_invalid_config_file_exits_2_naming_the_path_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, "rate_rpm = 40\nqueue_max_size = = 3\n").unwrap();
    let path = path.to_str().unwrap();
    let run = sidecar(dir.path(), &[], &["--config", path]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(line.contains(path), "{line}");
    assert!(line.contains("line 2"), "{line}");
}

#[test]
fn a_bad_value_in_the_config_file_exits_2_naming_the_key_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, "# pacing\nlisten_port = 8080\nrate_rpm = 0.0\n").unwrap();
    let path = path.to_str().unwrap();
    let run = sidecar(dir.path(), &[], &["--config", path]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(
        line.starts_with(&format!(
            "nvidia-sidecar: invalid rate_rpm=\"0\" ({path} line 3): "
        )),
        "{line}"
    );
}

#[test]
fn an_unknown_key_in_the_config_file_exits_2_naming_the_closest_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, "rate_rpm = 40\nqueue_max_sise = 3\n").unwrap();
    let path = path.to_str().unwrap();
    let run = sidecar(dir.path(), &[], &["--config", path]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(line.contains(&format!("{path} (line 2)")), "{line}");
    assert!(
        line.contains("unknown key `queue_max_sise`: did you mean `queue_max_size`?"),
        "{line}"
    );
}

#[test]
fn a_flag_value_of_the_wrong_type_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(dir.path(), &[], &["--listen-port", "abc"]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    assert!(run.stderr.contains("--listen-port"), "{}", run.stderr);
    assert!(run.stderr.contains("abc"), "{}", run.stderr);
}

#[test]
fn a_flag_value_out_of_range_exits_2_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(dir.path(), &[], &["--rate-rpm", "0"]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(
        line.starts_with("nvidia-sidecar: invalid --rate-rpm=\"0\": "),
        "{line}"
    );
    assert!(
        line.contains("greater than 0 and at most 6000000"),
        "{line}"
    );
}

#[test]
fn a_dotenv_file_in_the_working_directory_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "SIDECAR_RATE_RPM=0\n").unwrap();
    let run = sidecar(dir.path(), &[], &[]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    // Named as written, with the file it was written in.
    let dotenv = dir.path().join(".env");
    assert!(
        line.contains(&format!(
            "SIDECAR_RATE_RPM=\"0\" (set in {}): ",
            dotenv.display()
        )),
        "{line}"
    );
}

#[test]
fn the_process_environment_wins_over_the_dotenv_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "SIDECAR_RATE_RPM=0\n").unwrap();
    let run = sidecar(dir.path(), &[("SIDECAR_RATE_RPM", "-7")], &[]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(line.contains("SIDECAR_RATE_RPM=\"-7\": "), "{line}");
}

#[test]
fn a_malformed_dotenv_file_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "NOT A LINE\n").unwrap();
    let run = sidecar(dir.path(), &[], &[]);
    assert_eq!(run.code, Some(2), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(line.contains("invalid .env file"), "{line}");
    assert!(line.contains(".env"), "{line}");
}

#[test]
fn help_exits_0_and_lists_the_setting_flags() {
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(dir.path(), &[], &["--help"]);
    assert_eq!(run.code, Some(0), "{:?}", run.stderr);
    for flag in ["--rate-rpm", "--config", "--listen-port", "--upstream-url"] {
        assert!(run.stdout.contains(flag), "{flag} missing:\n{}", run.stdout);
    }
    for sub in ["mock-upstream", "demo", "settings"] {
        assert!(run.stdout.contains(sub), "{sub} missing:\n{}", run.stdout);
    }
}

#[test]
fn subcommand_help_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["mock-upstream", "demo", "run", "settings"] {
        let run = sidecar(dir.path(), &[], &[sub, "--help"]);
        assert_eq!(run.code, Some(0), "{sub}: {:?}", run.stderr);
        assert!(run.stdout.contains("Usage"), "{sub}:\n{}", run.stdout);
    }
}

#[test]
fn settings_prints_the_markdown_table_of_every_variable() {
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(dir.path(), &[], &["settings"]);
    assert_eq!(run.code, Some(0), "{:?}", run.stderr);
    assert!(
        run.stdout
            .contains("| `SIDECAR_RATE_RPM` | `--rate-rpm` | `40` |"),
        "{}",
        run.stdout
    );
}

/// Starts the binary serving on free ports with `vars` (and JSON logs), reads its log
/// (stderr) up to the `metrics listening` line, stops it and returns those lines.
fn start_up_lines(vars: &[(&str, &str)]) -> Vec<String> {
    start_up_lines_with(vars, &[])
}

/// [`start_up_lines`] with command-line arguments.
fn start_up_lines_with(vars: &[(&str, &str)], args: &[&str]) -> Vec<String> {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("SIDECAR_LISTEN_PORT", "0"),
        ("SIDECAR_METRICS_PORT", "0"),
        ("SIDECAR_WORKERS", "1"),
        ("SIDECAR_LOG_FORMAT", "json"),
    ];
    env.extend_from_slice(vars);
    let mut child = binary(dir.path(), &env)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in std::io::BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.contains("metrics listening");
        lines.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}

/// The start-up log is structured fields a log pipeline can index: addresses as text, one
/// line per provider with its key masked; no Rust debug formatting (`Some(…)`, quoted
/// tuples).
#[test]
fn the_start_up_log_has_plain_fields() {
    let lines = start_up_lines(&[
        ("SIDECAR_UPSTREAM_URL", "http://127.0.0.1:9/v1"),
        ("SIDECAR_UPSTREAM_API_KEY", "nvapi-startup-log-secret-0001"),
    ]);
    let text = lines.join("\n");
    let field = |needle: &str, key: &str| -> serde_json::Value {
        let line = lines.iter().find(|l| l.contains(needle)).expect(needle);
        serde_json::from_str::<serde_json::Value>(line).unwrap()[key].clone()
    };
    assert!(!text.contains("Some("), "{text}");
    assert!(
        !text.contains("\\\""),
        "a field holds quoted debug text: {text}"
    );
    assert!(!text.contains("startup-log-secret"), "{text}");
    let metrics = field("metrics listening", "metrics");
    assert!(
        metrics
            .as_str()
            .is_some_and(|m| m.parse::<std::net::SocketAddr>().is_ok()),
        "{metrics}"
    );
    assert_eq!(field("\"provider\"", "provider"), "nvidia");
    assert_eq!(field("\"provider\"", "api_key"), "nvap****");
    assert_eq!(field("\"provider\"", "upstream"), "http://127.0.0.1:9/v1");
}

/// A misspelled variable is not ignored without a word: one warning names it and the
/// setting it was probably meant to be.
#[test]
fn a_misspelled_variable_is_a_warning_naming_the_closest_setting() {
    let lines = start_up_lines(&[("SIDECAR_RATE_RMP", "10")]);
    let warning = lines
        .iter()
        .find(|l| l.contains("unknown variable"))
        .expect("a warning");
    let w: serde_json::Value = serde_json::from_str(warning).unwrap();
    assert_eq!(w["level"], "WARN");
    assert_eq!(w["variable"], "SIDECAR_RATE_RMP");
    assert_eq!(w["did_you_mean"], "SIDECAR_RATE_RPM");
    assert_eq!(w["set_in"], "environment");
}

/// A secret given as a flag is visible to every user of the machine (`ps`, `/proc`): the
/// sidecar starts, and warns once per such flag, naming the safer ways; the value itself
/// is never logged.
#[test]
fn a_secret_given_as_a_flag_is_a_warning() {
    let lines = start_up_lines_with(
        &[],
        &[
            "--upstream-api-key",
            "nvapi-on-the-command-line-0001",
            "--admin-token",
            "admin-on-the-command-line",
        ],
    );
    let text = lines.join("\n");
    assert!(!text.contains("on-the-command-line"), "{text}");
    let warnings: Vec<serde_json::Value> = lines
        .iter()
        .filter(|l| l.contains("visible to other users"))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let flags: Vec<&str> = warnings
        .iter()
        .map(|w| w["flag"].as_str().unwrap())
        .collect();
    assert_eq!(flags, ["--upstream-api-key", "--admin-token"], "{text}");
    assert!(warnings.iter().all(|w| w["level"] == "WARN"));
    assert_eq!(
        warnings[0]["instead"],
        "SIDECAR_UPSTREAM_API_KEY_FILE or SIDECAR_UPSTREAM_API_KEY"
    );
    // The same secrets through the environment: no such warning.
    let lines = start_up_lines(&[("SIDECAR_ADMIN_TOKEN", "admin-in-the-environment")]);
    assert!(!lines.iter().any(|l| l.contains("visible to other users")));
}

/// A port already taken stops start-up naming the listener, the address and the
/// settings that made it, as the user wrote them (here the metrics port, from a flag).
#[test]
fn a_taken_port_names_the_listener_and_its_settings() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let run = sidecar(
        dir.path(),
        &[("SIDECAR_LISTEN_PORT", "0")],
        &["--metrics-port", &port],
    );
    assert_eq!(run.code, Some(1), "{:?}", run.stderr);
    let line = stderr_line(&run);
    assert!(
        line.starts_with(&format!(
            "nvidia-sidecar: cannot listen on 127.0.0.1:{port} for the metrics: "
        )),
        "{line}"
    );
    assert!(
        line.ends_with("(set by listen_host and --metrics-port)"),
        "{line}"
    );
}
