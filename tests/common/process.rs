//! Other programs: the tools some tests need (and what happens when one is missing), the
//! sidecar's own binary run with a cleared environment, and waiting for a run to end.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The README's test command: it installs every tool the suite uses, then runs it with
/// nothing skipped.
pub const SETUP_COMMAND: &str = "tests/run.sh";

/// A test cannot run because `tool` is missing. Under `tests/run.sh` (which sets
/// `TESTS_NO_SKIP=1`) and in CI that is a failure; under a bare `cargo test` the test is
/// skipped, and says so where a person sees it: the line goes to the process's stderr
/// directly, which the test harness does not capture (its capture only takes
/// `print!`/`eprint!`), naming the command that installs the tool.
///
/// Returns so the caller can `return` from the test.
pub fn missing_tool(tool: &str, install: &str) {
    use std::io::Write as _;
    let strict = std::env::var_os("TESTS_NO_SKIP").is_some_and(|v| !v.is_empty())
        || std::env::var_os("CI").is_some();
    let msg = format!(
        "{tool} is not installed: install it with `{install}`, or run `{SETUP_COMMAND}`, which installs every tool the tests use"
    );
    if strict {
        panic!("{msg} (TESTS_NO_SKIP or CI is set, so nothing may be skipped)");
    }
    let _ = writeln!(
        std::io::stderr().lock(),
        "\nSKIPPED {}: {msg}\n",
        std::thread::current().name().unwrap_or("a test")
    );
}

/// The installed `name` (in `/usr/bin` or `/usr/local/bin`, where `tests/run.sh` looks),
/// or `None` after [`missing_tool`] said to install it with `install`.
pub fn find_tool(name: &str, install: &str) -> Option<PathBuf> {
    let found = ["/usr/bin", "/usr/local/bin"]
        .into_iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.exists());
    if found.is_none() {
        missing_tool(name, install);
    }
    found
}

/// The sidecar's binary to run in `dir` with only `vars` (and `PATH`) set, its output
/// piped and no input.
pub fn binary(dir: &Path, vars: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"));
    cmd.current_dir(dir)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `cmd` with `input` on its stdin and waits for it to exit: its status and output.
/// An error only when it cannot start (the program is not installed).
pub fn run_with_input(cmd: &mut Command, input: &str) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    Ok(child.wait_with_output().unwrap())
}

/// How a run that was expected to stop ended.
pub struct Exited {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Reads `child`'s piped stdout and stderr to their ends and waits for it to exit; a
/// run still going after `bound` (it would be serving) is killed and fails the test,
/// naming `what`.
pub fn wait_for_exit(mut child: Child, bound: Duration, what: &str) -> Exited {
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not exit (it started serving?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Exited {
        code: status.code(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}
