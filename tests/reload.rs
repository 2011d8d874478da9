//! The real binary: SIGHUP re-reads the configuration file (a bad file keeps the running
//! configuration and says why), and a log level set through the admin API takes effect
//! at once. The log (JSON lines on stderr, captured to a file) never carries the
//! provider key or the admin token.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{admin_call, admin_config, admin_patch, call, req, Answer};
use nvidia_sidecar::mock::{MockConfig, MockServer};
use serde_json::Value;

const TOKEN: &str = "reload-admin-t0ken-5d2f81";
const BEARER: &str = "Bearer reload-admin-t0ken-5d2f81";
const PROVIDER_KEY: &str = "nvapi-provider-key-0001";

/// Two distinct free ports (bound together, then released).
fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

/// The configuration file's text.
fn toml(upstream: &str, extra: &str) -> String {
    format!("upstream_url = \"{upstream}\"\n{extra}\n")
}

/// The binary, killed when dropped (whatever path the test takes).
struct Sidecar {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    metrics: SocketAddr,
    mock: Option<MockServer>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(m) = self.mock.take() {
            m.stop();
        }
    }
}

impl Sidecar {
    /// Starts a mock, writes `extra` settings into the configuration file and starts the
    /// binary on it; returns once `/healthz` answers.
    async fn start(extra: &str) -> Self {
        let mock = common::mock(MockConfig {
            rpm: 0.0,
            ..MockConfig::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let (port, metrics_port) = free_ports();
        let mut s = Sidecar {
            child: {
                std::fs::write(
                    dir.path().join("sidecar.toml"),
                    toml(&mock.base_url(), extra),
                )
                .unwrap();
                let log = std::fs::File::create(dir.path().join("stderr.log")).unwrap();
                Command::new(env!("CARGO_BIN_EXE_nvidia-sidecar"))
                    .current_dir(dir.path())
                    .env_clear()
                    .arg("--config")
                    .arg(dir.path().join("sidecar.toml"))
                    .env("SIDECAR_LISTEN_PORT", port.to_string())
                    .env("SIDECAR_METRICS_PORT", metrics_port.to_string())
                    .env("SIDECAR_ADMIN_TOKEN", TOKEN)
                    .env("SIDECAR_UPSTREAM_API_KEY", PROVIDER_KEY)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log))
                    .spawn()
                    .expect("the binary starts")
            },
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            metrics: SocketAddr::from(([127, 0, 0, 1], metrics_port)),
            mock: Some(mock),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("the sidecar exited ({status}): {}", s.log());
            }
            if tokio::net::TcpStream::connect(s.addr).await.is_ok() {
                let a = call(s.addr, req("GET", s.addr, "/healthz", &[], "")).await;
                if a.status == 200 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "never healthy: {}", s.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s
    }

    fn upstream(&self) -> String {
        self.mock.as_ref().unwrap().base_url()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("sidecar.toml")
    }

    /// Replaces the configuration file (write, then rename, so a reload never reads
    /// half of it).
    fn write_config(&self, text: &str) {
        let tmp = self.dir.path().join("sidecar.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.config_path()).unwrap();
    }

    fn hup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill -HUP failed");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// The complete JSON lines of the log so far.
    fn lines(&self) -> Vec<Value> {
        self.log()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Polls the log until a line satisfies `pred`; returns it.
    async fn wait_line(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line for {what}: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn get_config(&self) -> Value {
        admin_config(self.addr, &[]).await
    }

    async fn patch(&self, body: &str) -> Answer {
        admin_patch(self.addr, BEARER, body).await
    }

    async fn chat(&self, model: &str) -> Answer {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        call(
            self.addr,
            req("POST", self.addr, "/v1/chat/completions", &[], &body),
        )
        .await
    }

    /// Polls the configuration until `pred` holds.
    async fn wait_config(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.get_config().await;
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "the configuration never showed {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The log never shows a secret.
    fn assert_no_secrets(&self) {
        let log = self.log();
        assert!(!log.is_empty());
        assert!(
            !log.contains(PROVIDER_KEY),
            "the provider key leaked into the log"
        );
        assert!(!log.contains("provider-key-0001"), "part of the key leaked");
        assert!(!log.contains(TOKEN), "the admin token leaked into the log");
        assert!(!log.contains("t0ken-5d2f81"), "part of the token leaked");
    }
}

fn target(l: &Value) -> &str {
    l["target"].as_str().unwrap_or_default()
}

fn text(l: &Value, field: &str) -> String {
    match &l[field] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn rate(v: &Value) -> f64 {
    v["providers"]["nvidia"]["rate_rpm"].as_f64().unwrap()
}

fn queue(v: &Value) -> u64 {
    v["providers"]["nvidia"]["queue_max_size"].as_u64().unwrap()
}

fn version(v: &Value) -> u64 {
    v["version"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_file_and_keeps_the_running_configuration_on_a_bad_one() {
    let s = Sidecar::start("rate_rpm = 100.0\nworkers = 1").await;
    let v = s.get_config().await;
    assert_eq!((rate(&v), queue(&v), version(&v)), (100.0, 64, 1));
    assert_eq!(v["providers"]["nvidia"]["api_key"], "nvap****");
    let up = s.upstream();

    // 1. A good file: applied, audited.
    s.write_config(&toml(
        &up,
        "rate_rpm = 250.0\nqueue_max_size = 7\nworkers = 1",
    ));
    s.hup();
    let v = s
        .wait_config("rate 250 and queue 7", |v| {
            rate(v) == 250.0 && queue(v) == 7
        })
        .await;
    assert_eq!(version(&v), 2);
    let audit = s
        .wait_line("the audit of the reload", |l| {
            target(l) == "nvidia_sidecar::audit" && text(l, "source") == "sighup"
        })
        .await;
    let changes = text(&audit, "changes");
    assert!(changes.contains("rate_rpm: 100.0 -> 250.0"), "{audit}");
    assert!(
        changes.contains("providers.nvidia.rate_rpm: 100.0 -> 250.0"),
        "{audit}"
    );
    assert!(changes.contains("queue_max_size: 64 -> 7"), "{audit}");
    assert_eq!(audit["version"], 2, "{audit}");
    assert_eq!(audit["level"], "INFO");
    assert_eq!(s.chat("after-reload").await.status, 200);

    // 2. A bad value: the running configuration is kept, and the log says why.
    s.write_config(&toml(
        &up,
        "rate_rpm = -5.0\nqueue_max_size = 3\nworkers = 1",
    ));
    s.hup();
    let err = s
        .wait_line("the failed reload", |l| {
            text(l, "message").contains("reload failed") && text(l, "error").contains("rate_rpm")
        })
        .await;
    assert_eq!(err["level"], "ERROR", "{err}");
    let why = text(&err, "error");
    assert!(why.contains("-5"), "{err}");
    assert!(
        why.contains("sidecar.toml line 2)"),
        "the key's file and line: {err}"
    );
    assert!(
        why.contains("greater than 0"),
        "the line says what is accepted: {err}"
    );
    let v = s.get_config().await;
    assert_eq!((rate(&v), queue(&v), version(&v)), (250.0, 7, 2), "{v}");
    assert_eq!(s.chat("after-bad-value").await.status, 200, "still serving");

    // A TOML syntax error: the line number is given.
    s.write_config(&toml(
        &up,
        "rate_rpm = 300.0\nqueue_max_size = = 9\nworkers = 1",
    ));
    s.hup();
    let err = s
        .wait_line("the failed reload of a broken file", |l| {
            // "(line N)": a syntax error (a bad value says "sidecar.toml line N").
            text(l, "message").contains("reload failed") && text(l, "error").contains("(line ")
        })
        .await;
    let why = text(&err, "error");
    assert!(why.contains("(line 3)"), "{err}");
    assert!(why.contains("sidecar.toml"), "the file is named: {err}");
    let v = s.get_config().await;
    assert_eq!((rate(&v), queue(&v), version(&v)), (250.0, 7, 2), "{v}");
    assert_eq!(
        s.chat("after-broken-file").await.status,
        200,
        "still serving"
    );

    // 3. A restart-only setting: named in a warning and kept; the rest applies.
    s.write_config(&toml(
        &up,
        "rate_rpm = 300.0\nqueue_max_size = 7\nworkers = 2",
    ));
    s.hup();
    let warn = s
        .wait_line("the restart-only warning", |l| {
            text(l, "message").contains("only on restart")
        })
        .await;
    assert_eq!(warn["level"], "WARN", "{warn}");
    assert_eq!(text(&warn, "settings"), "workers", "{warn}");
    let v = s.wait_config("rate 300", |v| rate(v) == 300.0).await;
    assert_eq!(v["global"]["workers"], 1, "workers kept: {v}");
    assert_eq!(version(&v), 3);
    assert_eq!(s.chat("after-workers").await.status, 200);

    // The two reloads that applied were counted; the failed ones were not changes.
    let m = call(s.metrics, req("GET", s.metrics, "/metrics", &[], "")).await;
    assert!(
        m.text()
            .lines()
            .any(|l| l == "sidecar_admin_changes_total{result=\"applied\"} 2"),
        "{}",
        m.text()
    );
    s.assert_no_secrets();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_level_patched_through_the_admin_api_takes_effect_at_once() {
    let s = Sidecar::start(
        "rate_rpm = 6000.0\nbucket_capacity = 100\nworkers = 1\nlog_level = \"info\"",
    )
    .await;
    let is_access = |l: &Value, prefix: &str| {
        target(l) == "nvidia_sidecar::access" && text(l, "model").starts_with(prefix)
    };

    // At info, a successful request is logged.
    assert_eq!(s.chat("before-0").await.status, 200);
    let line = s
        .wait_line("the access line at info", |l| is_access(l, "before-"))
        .await;
    assert_eq!(line["level"], "INFO", "{line}");

    // At warn, successful requests are not.
    let a = s.patch(r#"{"log_level": "warn"}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["changed"],
        serde_json::json!([{"field": "log_level", "old": "info", "new": "warn"}])
    );
    assert_eq!(s.get_config().await["global"]["log_level"], "warn");
    for n in 0..5 {
        assert_eq!(s.chat(&format!("quiet-{n}")).await.status, 200);
    }
    // A refused change is a WARN line: once it is in the log, so is everything before it.
    let refused = s
        .patch(r#"{"rate_rpm": 0, "comment": "marker-after-quiet"}"#)
        .await;
    assert_eq!(refused.status, 400);
    s.wait_line("the refused change (WARN)", |l| {
        target(l) == "nvidia_sidecar::audit" && l["level"] == "WARN"
    })
    .await;
    let quiet: Vec<Value> = s
        .lines()
        .into_iter()
        .filter(|l| is_access(l, "quiet-"))
        .collect();
    assert!(quiet.is_empty(), "access lines at warn: {quiet:?}");

    // Back at info, they are logged again.
    let a = s.patch(r#"{"log_level": "info"}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    for n in 0..3 {
        assert_eq!(s.chat(&format!("loud-{n}")).await.status, 200);
    }
    for n in 0..3 {
        let model = format!("loud-{n}");
        let line = s
            .wait_line(&format!("the access line of {model}"), |l| {
                is_access(l, &model)
            })
            .await;
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["status"], 200, "{line}");
    }
    let quiet: Vec<Value> = s
        .lines()
        .into_iter()
        .filter(|l| is_access(l, "quiet-"))
        .collect();
    assert!(quiet.is_empty(), "access lines at warn: {quiet:?}");
    // The change back to info is audited (the audit line is INFO).
    s.wait_line("the audit of the change back to info", |l| {
        target(l) == "nvidia_sidecar::audit"
            && text(l, "changes").contains("log_level: \"warn\" -> \"info\"")
    })
    .await;

    // Refused requests carrying the right token do not log it.
    let a = admin_call(
        s.addr,
        "PATCH",
        &[
            ("authorization", BEARER),
            ("origin", "https://evil.example"),
        ],
        r#"{"rate_rpm": 5}"#,
    )
    .await;
    assert_eq!(a.status, 403);
    s.wait_line("the refused cross-origin change", |l| {
        target(l) == "nvidia_sidecar::audit" && text(l, "reason").contains("evil.example")
    })
    .await;
    s.assert_no_secrets();
}

/// Every applied change is in the audit log, whatever the log level: lowering the level
/// through the admin API is itself a change an operator must be able to find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_applied_while_the_level_is_warn_is_still_audited() {
    let s = Sidecar::start("workers = 1\nlog_level = \"info\"").await;
    let a = s.patch(r#"{"log_level": "warn"}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = s.patch(r#"{"request_timeout": 33}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // A WARN line after both: once it is in the log, so is everything before it.
    let a = s.patch(r#"{"rate_rpm": 0}"#).await;
    assert_eq!(a.status, 400);
    s.wait_line("the refused change (WARN)", |l| {
        target(l) == "nvidia_sidecar::audit" && l["level"] == "WARN"
    })
    .await;
    let audited: Vec<String> = s
        .lines()
        .iter()
        .filter(|l| {
            target(l) == "nvidia_sidecar::audit" && text(l, "message") == "configuration changed"
        })
        .map(|l| text(l, "changes"))
        .collect();
    assert!(
        audited.iter().any(|c| c.contains("log_level"))
            && audited.iter().any(|c| c.contains("request_timeout")),
        "applied changes missing from the audit log (at level warn): {audited:?}\n{}",
        s.log()
    );
    s.assert_no_secrets();
}
