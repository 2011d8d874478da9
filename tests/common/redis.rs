//! A real Redis for the shared-budget tests, and sidecar replicas as separate processes
//! of the binary.
//!
//! [`Redis`] runs Debian's `redis-server` on a free loopback port without persistence
//! (`--save "" --appendonly no`, its files in a temporary directory), and can be killed
//! with SIGKILL and started again on the same port, or frozen with SIGSTOP and thawed
//! with SIGCONT. Dropping it (a panic included) thaws and kills it. A missing
//! `redis-server` fails the test with a message saying to install it: these tests are
//! never skipped.
//!
//! [`Replica`] runs `nvidia-sidecar` with a cleared environment and JSON logs, reads its
//! proxy and metrics addresses off its start-up lines, and keeps every log line it
//! writes so tests can assert on what it said.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{binary, free_port, wait_for_exit, Exited};

/// Sends `signal` (`"STOP"`, `"CONT"`, `"KILL"`, `"TERM"`) to `pid` with kill(1): the
/// tests have no libc binding.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .expect("kill(1) runs");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Fails the test unless `redis-server` can be run.
pub fn require_redis_server() {
    match Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`redis-server --version` failed ({s}): these tests need a working Redis server; install it (Debian/Ubuntu: `apt-get install redis-server`)"),
        Err(e) => panic!("redis-server is not installed ({e}): the cluster tests need a real Redis; install it (Debian/Ubuntu: `apt-get install redis-server`; .ci/run does)"),
    }
}

/// A `redis-server` of this test.
pub struct Redis {
    pub port: u16,
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
    stopped: bool,
    /// How many times it was started.
    pub starts: u32,
}

impl Redis {
    /// Starts Redis on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts Redis on a free port with `extra` arguments (e.g. `--requirepass x`).
    pub fn start_with(extra: &[&str]) -> Self {
        require_redis_server();
        let mut r = Self {
            port: 0,
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            dir: tempfile::tempdir().expect("a temporary directory"),
            child: None,
            stopped: false,
            starts: 0,
        };
        // Another process may take the port between our probe and Redis's bind: try again.
        for _ in 0..5 {
            r.port = free_port();
            if r.spawn().is_ok() {
                return r;
            }
        }
        panic!("redis-server did not start; its log:\n{}", r.server_log());
    }

    /// `redis://127.0.0.1:PORT` (no password).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("redis is running").id()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("redis.log");
        let child = Command::new("redis-server")
            .current_dir(self.dir.path())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--dir", &self.dir.path().to_string_lossy()])
            .args(["--logfile", &log.to_string_lossy()])
            .args(["--daemonize", "no"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server does not start ({e}): install it (Debian/Ubuntu: `apt-get install redis-server`)")
            });
        self.child = Some(child);
        self.stopped = false;
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!("redis-server exited: {status}"));
            }
            if self.answers() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err("redis-server did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether Redis answers an inline PING (a password-protected one answers NOAUTH).
    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                let reply = String::from_utf8_lossy(&buf[..n]);
                reply.starts_with("+PONG") || reply.starts_with("-NOAUTH")
            }
            _ => false,
        }
    }

    /// Runs `redis-cli` against this server (with `-a password` when `auth` is given)
    /// and returns what it printed.
    pub fn cli(&self, auth: Option<&str>, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pw) = auth {
            cmd.args(["--no-auth-warning", "-a", pw]);
        }
        let out =
            cmd.args(args).stdin(Stdio::null()).output().expect(
                "redis-cli runs (it comes with redis-server: apt-get install redis-server)",
            );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// What redis-server logged.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// SIGKILL: Redis and all its state are gone at once.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    /// Starts Redis again on the same port, empty.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart after kill9");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!(
                    "redis-server did not start again on port {}: {e}\n{}",
                    self.port,
                    self.server_log()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// SIGSTOP: Redis keeps its sockets but answers nothing.
    pub fn freeze(&mut self) {
        signal(self.pid(), "STOP");
        self.stopped = true;
    }

    /// SIGCONT.
    pub fn thaw(&mut self) {
        signal(self.pid(), "CONT");
        self.stopped = false;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if self.stopped {
            if let Some(c) = &self.child {
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
        }
        self.kill9();
    }
}

/// A sidecar process.
pub struct Replica {
    pub name: String,
    child: Mutex<Child>,
    /// The proxy's listener.
    pub addr: SocketAddr,
    /// The metrics listener (`GET /metrics`).
    pub metrics: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

/// The environment every replica starts from (ephemeral ports, one worker, JSON logs);
/// `env` is added on top (a key given again replaces the default).
fn replica_env<'a>(env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![
        ("SIDECAR_LISTEN_PORT", "0"),
        ("SIDECAR_METRICS_PORT", "0"),
        ("SIDECAR_WORKERS", "1"),
        ("SIDECAR_LOG_FORMAT", "json"),
        ("SIDECAR_SHUTDOWN_GRACE", "1"),
        ("SIDECAR_UPSTREAM_API_KEY", "nvapi-cluster-test-key-0001"),
    ];
    for (k, v) in env {
        all.retain(|(key, _)| key != k);
        all.push((k, v));
    }
    all
}

fn command(dir: &Path, env: &[(&str, &str)]) -> Command {
    binary(dir, &replica_env(env))
}

/// The value of `"key":"..."` in a JSON log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.split(&format!("\"{key}\":\"")).nth(1)?;
    rest.split('"').next()
}

impl Replica {
    /// Starts the binary with `env` (on top of [`replica_env`]'s defaults) and waits
    /// until it listens (at most 20 s).
    pub fn start(name: &str, env: &[(&str, &str)]) -> Self {
        // An empty working directory: no `.env` file is read.
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut child = command(dir.path(), env)
            .spawn()
            .expect("the sidecar binary starts");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let stdout = child.stdout.take().expect("stdout piped");
        for pipe in [
            Box::new(stderr) as Box<dyn Read + Send>,
            Box::new(stdout) as Box<dyn Read + Send>,
        ] {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    lines.lock().push(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            for line in lines.lock().iter() {
                if line.contains("nvidia-sidecar listening") {
                    addr = field(line, "listen").and_then(|a| a.parse().ok());
                }
                if line.contains("metrics listening") {
                    metrics = field(line, "metrics").and_then(|a| a.parse().ok());
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "replica {name} exited ({status}) before it listened:\n{}",
                    lines.lock().join("\n")
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "replica {name} did not listen within 20 s:\n{}",
                    lines.lock().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self {
            name: name.to_owned(),
            child: Mutex::new(child),
            addr: addr.unwrap(),
            metrics: metrics.unwrap(),
            lines,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().id()
    }

    /// How it ended, if it did.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child.lock().try_wait().ok().flatten()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().join("\n")
    }

    /// Log lines whose `message` contains `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .iter()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(|m| m.contains(needle)))
                    .unwrap_or_else(|| l.contains(needle))
            })
            .cloned()
            .collect()
    }

    /// How many log lines so far have a `message` containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines_with(needle).len()
    }

    /// Waits (polling) until more than `already` lines say `needle`, for at most `within`.
    pub async fn wait_for(
        &self,
        needle: &str,
        already: usize,
        within: Duration,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.count(needle) > already {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "replica {} did not log {needle:?} within {within:?}",
                    self.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The lines of its log at warn level or above (access lines left out), and every
    /// line about Redis or the shared budget: for failure messages.
    pub fn notable(&self) -> String {
        self.lines
            .lock()
            .iter()
            .filter(|l| !l.contains("\"message\":\"request\""))
            .filter(|l| {
                !l.starts_with('{')
                    || l.contains("\"level\":\"WARN\"")
                    || l.contains("\"level\":\"ERROR\"")
                    || l.contains("Redis")
                    || l.contains("shutting down")
                    || l.contains("shared budget")
            })
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let c = self.child.get_mut();
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs the binary with `env` (on top of [`replica_env`]'s defaults) in an empty
/// directory; a run still going after 20 s (it is serving) is killed and fails the test.
pub fn run_to_exit(env: &[(&str, &str)]) -> Exited {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let child = command(dir.path(), env).spawn().expect("the binary starts");
    wait_for_exit(
        child,
        Duration::from_secs(20),
        &format!("the binary with {env:?}"),
    )
}

/// Waits until every replica says it is on the shared budget (at most 20 s each).
pub async fn all_shared(replicas: &[Replica]) {
    for r in replicas {
        if let Err(e) = r
            .wait_for("on the shared budget", 0, Duration::from_secs(20))
            .await
        {
            panic!("{e}\n{}", r.notable());
        }
    }
}
