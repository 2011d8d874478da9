//! A real Prometheus scrapes the sidecar under traffic: the latency histogram gives a
//! plausible p99 through `histogram_quantile`, and every metric the Grafana dashboard
//! and the alerting rules use exists (in Prometheus and in a direct scrape). The first
//! sidecar has a token budget, for the dashboard's Tokens row; a second sidecar in
//! cluster mode (`redis_url` set, Redis never reached) serves the shared budget's
//! series. Prometheus loads the alerting rules, and the lost backend makes
//! `SidecarBudgetBackendDown` pending for it. `promtool` checks the rules and runs their
//! unit tests (`deploy/prometheus/alerts_test.yml`).
//!
//! Needs `/usr/bin/prometheus` and `promtool` (Debian package `prometheus`, which
//! `tests/run.sh` installs): under a bare `cargo test` without them the tests are
//! skipped and say so.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nvidia_sidecar::mock::MockConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Mock latency: every upstream answer takes at least this long.
const MOCK_LATENCY_MS: u64 = 15;

/// Kills Prometheus however the test ends.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Prometheus scraping `targets` every second, with the repository's alerting rules.
fn start_prometheus(binary: &Path, targets: &[SocketAddr]) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        dir.path().join("alerts.yml"),
        repo_file("deploy/prometheus/alerts.yml"),
    )
    .unwrap();
    let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - alerts.yml\n\
             scrape_configs:\n  - job_name: nvidia-sidecar\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        ),
    )
    .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.path().join("prometheus.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("prometheus starts");
    Prometheus {
        child,
        addr,
        log,
        _dir: dir,
    }
}

/// `GET path` over HTTP/1.0 (so the answer is never chunked): status and body.
async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters kept).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs an instant query; the `data.result` array (panics on an API error).
async fn query(p: &Prometheus, promql: &str) -> Vec<serde_json::Value> {
    let path = format!("/api/v1/query?query={}", percent_encode(promql));
    let (status, body) = http_get(p.addr, &path)
        .await
        .unwrap_or_else(|e| panic!("query {promql}: {e}"));
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("query {promql}: not JSON ({e}): {body}"));
    assert_eq!(status, 200, "query {promql}: {body}");
    assert_eq!(v["status"], "success", "query {promql}: {body}");
    assert_eq!(v["data"]["resultType"], "vector", "query {promql}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The value of one instant-vector element.
fn sample_value(e: &serde_json::Value) -> f64 {
    let s = e["value"][1].as_str().expect("a value string");
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s.parse().expect("a number"),
    }
}

/// Metric names (`sidecar_*`, `process_*`) referenced in a PromQL expression: words
/// matching `\b(sidecar_[a-z0-9_]+|process_[a-z0-9_]+)\b`.
fn metric_names(expr: &str, out: &mut BTreeSet<String>) {
    let bytes = expr.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let boundary = i == 0 || !word(bytes[i - 1]);
        let rest = &expr[i..];
        if boundary && (rest.starts_with("sidecar_") || rest.starts_with("process_")) {
            let prefix = "sidecar_".len(); // == "process_".len()
            let mut end = i + prefix;
            while end < bytes.len()
                && (bytes[end].is_ascii_lowercase()
                    || bytes[end].is_ascii_digit()
                    || bytes[end] == b'_')
            {
                end += 1;
            }
            // `[a-z0-9_]+` then a word boundary: an uppercase letter right after means
            // no match (the regex would need a boundary there).
            if end > i + prefix && (end == bytes.len() || !word(bytes[end])) {
                out.insert(expr[i..end].to_owned());
            }
            i = end;
            continue;
        }
        i += 1;
    }
}

/// Every PromQL expression of the Grafana dashboard: panel targets (rows included) and
/// templating queries.
fn dashboard_expressions(dash: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(targets) = map.get("targets").and_then(|t| t.as_array()) {
                    for t in targets {
                        if let Some(e) = t["expr"].as_str() {
                            out.push(e.to_owned());
                        }
                    }
                }
                for (k, child) in map {
                    if k != "targets" && k != "templating" {
                        walk(child, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|c| walk(c, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        for q in [&var["query"], &var["query"]["query"], &var["definition"]] {
            if let Some(s) = q.as_str() {
                out.push(s.to_owned());
            }
        }
    }
    out
}

/// The `expr:` values of an alerting-rules file, plain or block scalars (`|`, `>`).
fn rule_expressions(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start().trim_start_matches("- ");
        i += 1;
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let key_indent = indent(line);
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > key_indent) {
                block.push(lines[i].trim());
                i += 1;
            }
            out.push(block.join("\n"));
        } else {
            out.push(value.trim_matches(|c| c == '"' || c == '\'').to_owned());
        }
    }
    out
}

fn repo_file(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Names of the samples in a direct scrape of `/metrics`.
async fn scraped_names(metrics: SocketAddr) -> BTreeSet<String> {
    let a = call(metrics, req("GET", metrics, "/metrics", &[], "")).await;
    assert_eq!(a.status, 200);
    a.text()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_expression_extractors_find_what_they_should() {
    let mut names = BTreeSet::new();
    metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(sidecar_upstream_latency_seconds_bucket{a=\"b\"}[5m]))) / process_open_fds and up and my_sidecar_x",
        &mut names,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        [
            "process_open_fds",
            "sidecar_upstream_latency_seconds_bucket"
        ]
    );
    let yaml = "groups:\n  - rules:\n      - alert: A\n        expr: sidecar_a > 0\n        for: 1m\n      - alert: B\n        expr: |\n          sum(sidecar_b)\n            /\n          sum(sidecar_c)\n        for: 2m\n      - expr: \"sidecar_d\"\n";
    assert_eq!(
        rule_expressions(yaml),
        [
            "sidecar_a > 0",
            "sum(sidecar_b)\n/\nsum(sidecar_c)",
            "sidecar_d"
        ]
    );
    assert_eq!(
        percent_encode("a b{c=\"d\"}[5m]"),
        "a%20b%7Bc%3D%22d%22%7D%5B5m%5D"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_the_sidecar_and_finds_every_metric_the_dashboards_use() {
    let Some(binary) = find_tool("prometheus", "apt-get install prometheus") else {
        return;
    };
    // A token budget far above the traffic, so the dashboard's Tokens row has series.
    let s = stack(
        MockConfig {
            rpm: 0.0,
            latency_ms: MOCK_LATENCY_MS,
            ..MockConfig::default()
        },
        &[("SIDECAR_TOKENS_PER_MINUTE", "10000000000")],
    );
    assert!(
        s.app.providers[0].limiter.token_budget().is_some(),
        "SIDECAR_TOKENS_PER_MINUTE gives the provider's limiter a token budget"
    );
    // Cluster mode with a Redis that never answers (nothing listens on the port).
    let dead_redis = format!("redis://:never-shown-pw@127.0.0.1:{}/0", free_port());
    let cluster = stack(
        MockConfig {
            rpm: 0.0,
            ..MockConfig::default()
        },
        &[("SIDECAR_REDIS_URL", &dead_redis)],
    );
    let prom = start_prometheus(&binary, &[s.metrics_addr, cluster.metrics_addr]);

    // Ready.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = http_get(prom.addr, "/-/ready").await {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "prometheus not ready within 30 s:\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The first scrape: Prometheus applies discovered targets only every few seconds,
    // so traffic before it would all land in the first sample and `rate` would see none.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let up = query(&prom, "up{job=\"nvidia-sidecar\"}").await;
        if up.len() == 2 && up.iter().all(|e| sample_value(e) == 1.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sidecar was not scraped within 30 s: {up:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Traffic: 4 clients × 50 chats, paced over about 4 s so it spans several scrapes.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let addr = s.addr;
            tokio::spawn(async move {
                for _ in 0..50 {
                    let a = call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT)).await;
                    assert_eq!(a.status, 200);
                    tokio::time::sleep(Duration::from_millis(65)).await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }

    // p99 of the upstream latency, as a dashboard would compute it.
    let promql = "histogram_quantile(0.99, sum by (le, provider) (rate(sidecar_upstream_latency_seconds_bucket[30s])))";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let p99 = loop {
        let result = query(&prom, promql).await;
        if let Some(e) = result.first() {
            let v = sample_value(e);
            if v.is_finite() {
                assert_eq!(result.len(), 1, "one provider: {result:?}");
                assert_eq!(e["metric"]["provider"], "nvidia");
                break v;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no finite p99 within 30 s: {result:?}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let floor = MOCK_LATENCY_MS as f64 / 1e3;
    assert!(
        (floor..=1.0).contains(&p99),
        "p99 upstream latency {p99} s is not between the mock's {floor} s and 1 s"
    );
    eprintln!("p99 upstream latency through Prometheus: {p99:.4} s");

    // The request ledger balances in every scrape Prometheus took, on both sidecars:
    // arrived = sum of outcomes + in flight (the query the README gives operators).
    let ledger = "sum by (instance) (sidecar_requests_arrived_total) \
                  - sum by (instance) (sidecar_requests_total) \
                  - sum by (instance) (sidecar_requests_in_flight)";
    let now = query(&prom, ledger).await;
    assert_eq!(now.len(), 2, "one per sidecar: {now:?}");
    assert!(now.iter().all(|e| sample_value(e) == 0.0), "{now:?}");
    let worst = query(&prom, &format!("max_over_time((abs({ledger}))[1m:1s])")).await;
    assert!(
        !worst.is_empty() && worst.iter().all(|e| sample_value(e) == 0.0),
        "the ledger was off in some scrape: {worst:?}"
    );

    // Every metric the Grafana dashboard and the alerting rules reference exists.
    let dashboard: serde_json::Value =
        serde_json::from_str(&repo_file("deploy/grafana/nvidia-sidecar.json"))
            .expect("the dashboard is JSON");
    let mut from_dashboard = BTreeSet::new();
    let exprs = dashboard_expressions(&dashboard);
    assert!(exprs.len() > 10, "few expressions found: {exprs:?}");
    for e in &exprs {
        metric_names(e, &mut from_dashboard);
    }
    let mut from_alerts = BTreeSet::new();
    let rules = rule_expressions(&repo_file("deploy/prometheus/alerts.yml"));
    assert!(!rules.is_empty(), "no expr in alerts.yml");
    for e in &rules {
        metric_names(e, &mut from_alerts);
    }
    assert!(from_dashboard.contains("sidecar_upstream_latency_seconds_bucket"));
    assert!(from_dashboard.contains("sidecar_requests_total"));
    assert!(from_alerts.contains("sidecar_upstream_429_total"));
    eprintln!(
        "dashboard: {} metrics from {} expressions; alerts: {} metrics from {} rules",
        from_dashboard.len(),
        exprs.len(),
        from_alerts.len(),
        rules.len()
    );

    let mut scraped = scraped_names(s.metrics_addr).await;
    let single = scraped.clone();
    scraped.extend(scraped_names(cluster.metrics_addr).await);
    assert!(
        !single
            .iter()
            .any(|n| n.starts_with("sidecar_budget_") || n.starts_with("sidecar_cluster_")),
        "cluster series without redis_url: {single:?}"
    );
    for name in [
        "sidecar_budget_backend_up",
        "sidecar_cluster_replicas",
        "sidecar_cluster_mode",
        "sidecar_budget_round_trip_seconds_bucket",
    ] {
        assert!(
            from_dashboard.contains(name),
            "the dashboard's Cluster row uses {name}"
        );
    }
    for name in [
        "sidecar_tokens_total",
        "sidecar_token_budget_remaining",
        "sidecar_token_budget_limit",
        "sidecar_token_estimate_ratio_bucket",
    ] {
        assert!(
            from_dashboard.contains(name),
            "the dashboard's Tokens row uses {name}"
        );
    }
    assert!(from_alerts.contains("sidecar_budget_backend_up"));
    assert!(from_alerts.contains("sidecar_cluster_mode"));
    for (source, names) in [
        ("deploy/grafana/nvidia-sidecar.json", &from_dashboard),
        ("deploy/prometheus/alerts.yml", &from_alerts),
    ] {
        let not_scraped: Vec<_> = names.iter().filter(|n| !scraped.contains(*n)).collect();
        assert!(
            not_scraped.is_empty(),
            "{source} uses metrics /metrics does not serve: {not_scraped:?}"
        );
        let mut missing = Vec::new();
        for name in names {
            let result = query(&prom, &format!("count({{__name__=\"{name}\"}})")).await;
            if result.is_empty() {
                missing.push(name);
            }
        }
        assert!(
            missing.is_empty(),
            "{source} uses metrics Prometheus does not have: {missing:?}"
        );
    }
    // The scrape targets are healthy.
    let up = query(&prom, "up{job=\"nvidia-sidecar\"}").await;
    assert_eq!(up.len(), 2, "{up:?}");
    assert!(up.iter().all(|e| sample_value(e) == 1.0), "{up:?}");

    // Prometheus loaded every alerting rule, and the cluster sidecar's lost backend makes
    // SidecarBudgetBackendDown pending (it fires after its `for: 1m`), for it alone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_get(prom.addr, "/api/v1/rules").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let names: BTreeSet<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
        assert!(
            names.contains("SidecarBudgetBackendDown") && names.contains("SidecarBudgetIsolated"),
            "{names:?}"
        );
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rules not all healthy within 30 s: {body}\n{}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let pending = loop {
        let result = query(
            &prom,
            "ALERTS{alertname=\"SidecarBudgetBackendDown\", alertstate=\"pending\"}",
        )
        .await;
        if !result.is_empty() {
            break result;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "SidecarBudgetBackendDown never pending: {}",
            prom.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(
        pending[0]["metric"]["instance"],
        cluster.metrics_addr.to_string().as_str()
    );
    assert_eq!(pending[0]["metric"]["provider"], "nvidia");
    assert_eq!(pending[0]["metric"]["severity"], "warning");
    let isolated = query(&prom, "ALERTS{alertname=\"SidecarBudgetIsolated\"}").await;
    assert!(
        isolated.is_empty(),
        "fallback is not isolated: {isolated:?}"
    );

    assert_ledger(&s, sent_to(s.addr)).await;
    assert_ledger(&cluster, sent_to(cluster.addr)).await;
    drop(prom);
    s.stop();
    cluster.stop();
}

#[test]
fn promtool_checks_the_alerting_rules_and_runs_their_unit_tests() {
    let Some(promtool) = find_tool("promtool", "apt-get install prometheus") else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The unit tests cover both cluster alerts.
    let tests = repo_file("deploy/prometheus/alerts_test.yml");
    for alert in ["SidecarBudgetBackendDown", "SidecarBudgetIsolated"] {
        assert!(
            tests.contains(alert),
            "alerts_test.yml does not test {alert}"
        );
    }
}
