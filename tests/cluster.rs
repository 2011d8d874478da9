//! The budget shared across replicas (issue 14), end to end: a real `redis-server`
//! (started by each test on a free port, without persistence), replicas as separate
//! processes of the binary, the simulated provider in this process as the judge, and
//! open-loop clients (a fixed send rate, whatever the answers).
//!
//! Time scale: one provider window W = 6 s (the mock's `window_secs` and
//! `SIDECAR_PROVIDER_WINDOW`), the budget N = 60 per window (600 RPM). Bounds are on
//! counts the provider's judge made (admitted and refused per window, the most admitted
//! in any rolling window) and on what the clients were answered, never on wall-clock
//! durations except one: no request is answered later than its deadline plus a second.
//! Every test prints its figures (`cargo test --test cluster -- --nocapture
//! --test-threads=1`). The heavy ones run one at a time (a static lock), so two floods
//! never share the 2-core machine.
//!
//! `redis-server` must be installed (Debian: `apt-get install redis-server`); without it
//! every test fails saying so.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use nvidia_sidecar::mock::{MockConfig, MockServer, WindowCount};
use parking_lot::Mutex;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use common::redis::{all_shared, run_to_exit, Redis, Replica};
use common::{
    admin_config, admin_patch, call, judge_epoch, req, sample, until, ADMIN_CONFIG, CHAT,
};

/// The provider's window.
const W: Duration = Duration::from_secs(6);
/// The shared budget per window (600 RPM), and the provider's limit when they agree.
const N: u64 = 60;
const ADMIN_TOKEN: &str = "cluster-admin-token-4d2f8a";
const BEARER: &str = "Bearer cluster-admin-token-4d2f8a";
const PROVIDER: &str = "nvidia";

/// One test at a time: each starts its own Redis, provider and replicas, and the floods
/// need the machine's two cores to themselves.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// === the stack ===

/// The provider: `per_window` requests in any rolling 6 s, with no rate-limit headers at
/// all (NVIDIA's hosted API): nothing to learn but from 429s.
fn provider(per_window: u64) -> MockServer {
    MockServer::start(MockConfig {
        rpm: per_window as f64 * 60.0 / W.as_secs_f64(),
        window_secs: W.as_secs_f64(),
        no_headers_at_all: true,
        workers: 1,
        ..MockConfig::default()
    })
    .expect("the mock provider starts")
}

/// A replica's settings on the 6 s scale, in front of `mock`, sharing `redis_url`, with
/// `extra` on top (a key given again replaces the default).
fn settings(mock: &MockServer, redis_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("SIDECAR_UPSTREAM_URL", mock.base_url().as_str()),
        ("SIDECAR_REDIS_URL", redis_url),
        ("SIDECAR_RATE_RPM", "600"),
        ("SIDECAR_BUCKET_CAPACITY", "1"),
        ("SIDECAR_PROVIDER_WINDOW", "6"),
        // Loopback jitter is under a millisecond; the fraction (0.5 %: 30 ms) applies.
        ("SIDECAR_WINDOW_MARGIN_FLOOR", "0.02"),
        ("SIDECAR_RETREAT_DEFAULT_PAUSE", "0.1"),
        ("SIDECAR_RETREAT_QUIET_PERIOD", "3"),
        ("SIDECAR_RECOVERY_INTERVAL", "1"),
        ("SIDECAR_REQUEST_TIMEOUT", "10"),
        ("SIDECAR_QUEUE_MAX_SIZE", "512"),
        ("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

fn start_replica(name: &str, env: &[(String, String)]) -> Replica {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Replica::start(name, &env)
}

/// `n` replicas with the same settings.
fn replicas(n: usize, env: &[(String, String)]) -> Vec<Replica> {
    (0..n)
        .map(|i| start_replica(&format!("r{i}"), env))
        .collect()
}

/// The index of the judge's next window that starts at least 200 ms from now.
fn next_window(t0: Instant) -> u32 {
    let elapsed = t0.elapsed() + Duration::from_millis(200);
    (elapsed.as_secs_f64() / W.as_secs_f64()).ceil() as u32
}

// === open-loop clients ===

/// Error codes of the sidecar's own refusals; any other 429 is the provider's.
const SIDECAR_429_CODES: [&str; 4] = [
    "queue_full",
    "queue_beyond_deadline",
    "low_priority_timeout",
    "queue_timeout",
];

/// What one request was answered.
#[derive(Debug, Clone)]
struct Outcome {
    replica: usize,
    /// When it was sent, after the judge's epoch.
    sent: Duration,
    latency: Duration,
    /// 0: no answer (connection failed or reset).
    status: u16,
    /// `error.code` of a JSON error answer.
    code: String,
}

impl Outcome {
    fn answered_at(&self) -> Duration {
        self.sent + self.latency
    }

    fn provider_429(&self) -> bool {
        self.status == 429 && !SIDECAR_429_CODES.contains(&self.code.as_str())
    }
}

/// A request in flight: when it was sent, to which replica, and its task.
type Client = (Duration, usize, JoinHandle<()>);

/// Clients that each start one request every `1 / rate` s on a fresh connection to
/// their replica, whatever happened to the earlier ones.
struct Load {
    stop: Arc<AtomicBool>,
    generators: Vec<JoinHandle<Vec<Client>>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
}

impl Load {
    /// `targets`: (replica index, its address, requests per second).
    fn start(t0: Instant, targets: &[(usize, SocketAddr, f64)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let generators = targets
            .iter()
            .map(|&(replica, addr, rate)| {
                let (stop, outcomes) = (Arc::clone(&stop), Arc::clone(&outcomes));
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
                    let mut clients = Vec::new();
                    loop {
                        every.tick().await;
                        if stop.load(Ordering::Relaxed) {
                            return clients;
                        }
                        let sent = t0.elapsed();
                        let outcomes = Arc::clone(&outcomes);
                        let task = tokio::spawn(async move {
                            let started = Instant::now();
                            let (status, code) =
                                tokio::time::timeout(Duration::from_secs(60), one_request(addr))
                                    .await
                                    .unwrap_or((0, "client timeout".into()));
                            outcomes.lock().push(Outcome {
                                replica,
                                sent,
                                latency: started.elapsed(),
                                status,
                                code,
                            });
                        });
                        clients.retain(|(_, _, c): &Client| !c.is_finished());
                        clients.push((sent, replica, task));
                    }
                })
            })
            .collect();
        Self {
            stop,
            generators,
            outcomes,
        }
    }

    /// Stops sending. `wait`: lets the requests still out finish for that long, and
    /// returns those that did not (when they were sent, to which replica); otherwise
    /// hangs up on them at once.
    async fn stop(self, wait: Option<Duration>) -> (Vec<Outcome>, Vec<(Duration, usize)>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for g in self.generators {
            out.extend(g.await.expect("a generator ran"));
        }
        let mut unfinished = Vec::new();
        let deadline = Instant::now() + wait.unwrap_or_default();
        for (sent, replica, mut c) in out {
            let done = match wait {
                Some(_) => tokio::time::timeout_at(deadline, &mut c).await.is_ok(),
                None => c.is_finished(),
            };
            if !done {
                // Hangs up: the replica drops the request from its queue.
                c.abort();
                unfinished.push((sent, replica));
            }
        }
        let outcomes = self.outcomes.lock().clone();
        (outcomes, unfinished)
    }
}

/// One chat completion on a fresh connection: its status and `error.code`.
async fn one_request(addr: SocketAddr) -> (u16, String) {
    let answer = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
        let exchange = async {
            let resp = tx
                .send_request(req("POST", addr, "/v1/chat/completions", &[], CHAT))
                .await
                .map_err(|e| format!("send: {e}"))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?
                .to_bytes();
            let code = if status == 200 {
                String::new()
            } else {
                serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            Ok::<_, String>((status, code))
        };
        tokio::select! {
            r = exchange => r,
            _ = conn => Err("connection closed".to_owned()),
        }
    }
    .await;
    answer.unwrap_or_else(|e| (0, e))
}

// === reports ===

/// The judge's windows `from..to` (indexes), with admitted and refused.
fn window_table(counts: &[WindowCount], from: u32, to: u32, limit: u64) -> String {
    let mut out = String::from("window  admitted/limit        refused\n");
    for c in counts
        .iter()
        .filter(|c| c.index >= u64::from(from) && c.index < u64::from(to))
    {
        out.push_str(&format!(
            "{:>6}  {:>3}/{:<3} ({:>5.1} %)  {:>7}\n",
            c.index,
            c.admitted,
            limit,
            100.0 * c.admitted as f64 / limit as f64,
            c.refused
        ));
    }
    out
}

fn admitted_in(counts: &[WindowCount], from: u32, to: u32) -> Vec<u64> {
    counts
        .iter()
        .filter(|c| c.index >= u64::from(from) && c.index < u64::from(to))
        .map(|c| c.admitted)
        .collect()
}

fn refused_in(counts: &[WindowCount], from: u32) -> u64 {
    counts
        .iter()
        .filter(|c| c.index >= u64::from(from))
        .map(|c| c.refused)
        .sum()
}

/// Per replica: requests offered and what they were answered.
fn status_table(outcomes: &[Outcome], replicas: usize) -> String {
    let mut out = String::from(
        "replica  sent    200  429(sidecar)  429(provider)  503  504  no answer  other\n",
    );
    for r in 0..replicas.max(1) {
        let mine: Vec<&Outcome> = outcomes.iter().filter(|o| o.replica == r).collect();
        let n = |f: &dyn Fn(&Outcome) -> bool| mine.iter().filter(|o| f(o)).count();
        let mut other: Vec<String> = mine
            .iter()
            .filter(|o| ![0, 200, 429, 503, 504].contains(&o.status))
            .map(|o| format!("{} {}", o.status, o.code))
            .collect();
        // Why some got no answer (the first few reasons).
        let mut why: Vec<String> = mine
            .iter()
            .filter(|o| o.status == 0)
            .map(|o| format!("no answer: {}", o.code))
            .collect();
        why.dedup();
        other.extend(why.into_iter().take(3));
        out.push_str(&format!(
            "{:>7}  {:>4}  {:>5}  {:>12}  {:>13}  {:>3}  {:>3}  {:>9}  {:?}\n",
            format!("r{r}"),
            mine.len(),
            n(&|o| o.status == 200),
            n(&|o| o.status == 429 && !o.provider_429()),
            n(&|o| o.provider_429()),
            n(&|o| o.status == 503),
            n(&|o| o.status == 504),
            n(&|o| o.status == 0),
            other,
        ));
    }
    out
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// The gaps between consecutive admissions the provider made in `[from, to)` (judge
/// time): median, mean, and how many were over 1.5 times the paced interval `per`.
fn gaps(mock: &MockServer, from: Duration, to: Duration, per: Duration) -> String {
    let (from, to) = (from.as_millis() as u64, to.as_millis() as u64);
    let times: Vec<u64> = mock
        .window_counts(Duration::from_millis(1))
        .iter()
        .filter(|c| c.index >= from && c.index < to)
        .flat_map(|c| std::iter::repeat_n(c.index, c.admitted as usize))
        .collect();
    let mut g: Vec<u64> = times.windows(2).map(|p| p[1] - p[0]).collect();
    if g.is_empty() {
        return "no admissions".into();
    }
    g.sort_unstable();
    let mean = g.iter().sum::<u64>() as f64 / g.len() as f64;
    let long = g
        .iter()
        .filter(|x| **x as f64 > 1.5 * per.as_millis() as f64)
        .count();
    format!(
        "gaps between admissions: median {} ms, mean {mean:.1} ms, longest {} ms, {long} over {} ms",
        g[g.len() / 2],
        g[g.len() - 1],
        per.as_millis() * 3 / 2
    )
}

/// When the provider refused (seconds after the judge's epoch, to the millisecond).
fn refusal_times(mock: &MockServer) -> Vec<f64> {
    mock.window_counts(Duration::from_millis(1))
        .iter()
        .flat_map(|c| std::iter::repeat_n(c.index as f64 / 1000.0, c.refused as usize))
        .collect()
}

/// Per replica, its access lines of requests the provider refused at least once (the
/// sidecar retried them), and its lines about the learned limit: where each 429 came
/// from.
fn refusals_seen(replicas: &[Replica]) -> String {
    let mut out = String::new();
    for r in replicas {
        let retried: Vec<String> = r
            .lines_with("request")
            .into_iter()
            .filter(|l| !l.contains("\"retries\":0"))
            .map(|l| {
                let v: Value = serde_json::from_str(&l).unwrap_or_default();
                format!(
                    "{} status {} retries {} queue_wait_ms {:.0}",
                    v["timestamp"].as_str().unwrap_or("?"),
                    v["status"],
                    v["retries"],
                    v["queue_wait_ms"].as_f64().unwrap_or(-1.0)
                )
            })
            .collect();
        let learned = r.lines_with("learned limit");
        out.push_str(&format!(
            "{}: requests refused upstream {retried:?}\n  learned-limit lines {learned:?}\n",
            r.name
        ));
    }
    out
}

// === admin and observation ===

/// A replica's `GET /api/admin/config`, with the token.
async fn config_of(addr: SocketAddr) -> Value {
    admin_config(addr, &[("authorization", BEARER)]).await
}

/// `providers.nvidia` of the admin view.
fn provider_view(config: &Value) -> &Value {
    &config["providers"][PROVIDER]
}

async fn get_text(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let a = call(addr, req("GET", addr, path, headers, "")).await;
    (a.status.as_u16(), a.text())
}

/// `sidecar_budget_backend_up` of a replica, when its metrics export it.
async fn backend_up(r: &Replica) -> Option<f64> {
    let (_, text) = get_text(r.metrics, "/metrics", &[]).await;
    sample(
        &text,
        &format!("sidecar_budget_backend_up{{provider=\"{PROVIDER}\"}}"),
    )
}

fn logs_of(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .map(|r| {
            let state = r
                .exited()
                .map_or_else(|| "running".to_owned(), |s| format!("EXITED: {s}"));
            format!(
                "--- {} (pid {}, {state}):\n{}",
                r.name,
                r.pid(),
                r.notable()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A replica that is no longer running (a crash, or a signal from outside), or one of
/// whose threads panicked (its budget thread, say: it would go on serving without it).
fn gone(replicas: &[Replica]) -> Vec<String> {
    let mut out = Vec::new();
    for r in replicas {
        if let Some(s) = r.exited() {
            out.push(format!("{} exited during the test: {s}", r.name));
        }
        let log = r.log();
        if let Some(at) = log.find("panicked at") {
            let line = log[at..].lines().take(4).collect::<Vec<_>>().join(" / ");
            out.push(format!("{}: a thread {line}", r.name));
        }
    }
    out
}

/// Each replica's mode and limits, read from its admin view every 200 ms: the changes,
/// for the report.
struct Modes {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<String>>,
}

impl Modes {
    fn watch(t0: Instant, replicas: &[Replica]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
        let flag = Arc::clone(&stop);
        let task = tokio::spawn(async move {
            let mut last: Vec<String> = vec![String::new(); addrs.len()];
            let mut changes = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for (i, a) in addrs.iter().enumerate() {
                    let v = config_of(*a).await;
                    let p = provider_view(&v);
                    let now = format!(
                        "{} limit {} learned {}",
                        p["cluster"]["replica"]["mode"].as_str().unwrap_or("?"),
                        p["pacing"]["limit"],
                        p["pacing"]["learned"]
                    );
                    if now != last[i] {
                        changes.push(format!("{:.2} s r{i}: {now}", t0.elapsed().as_secs_f64()));
                        last[i] = now;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            changes
        });
        Self { stop, task }
    }

    async fn stop(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the mode watcher ran").join("\n") + "\n"
    }
}

/// The learned limit each replica shows (0: none), from its admin view.
async fn learned_limits(replicas: &[Replica]) -> Vec<u64> {
    let mut out = Vec::new();
    for r in replicas {
        let v = config_of(r.addr).await;
        out.push(
            provider_view(&v)["pacing"]["learned"]
                .as_u64()
                .unwrap_or(u64::MAX),
        );
    }
    out
}

/// `sidecar_budget_leases_total{result="late"}` of each replica: requests written after
/// their lease's time, counted again from their send (a busy machine).
async fn late_sends(replicas: &[Replica]) -> Vec<u64> {
    let mut out = Vec::new();
    for r in replicas {
        let (_, text) = get_text(r.metrics, "/metrics", &[]).await;
        let series =
            format!("sidecar_budget_leases_total{{provider=\"{PROVIDER}\",result=\"late\"}}");
        out.push(sample(&text, &series).map_or(u64::MAX, |v| v as u64));
    }
    out
}

// === the scenarios ===

/// Replicas with offered loads in the ratio `weights`, 3N per window in total, for five
/// windows against a provider at N: no provider 429, at most N in any rolling window,
/// ≥ 98 % of N admitted per window once running, and each replica served in proportion
/// to what it was offered.
async fn flood(label: &str, weights: &[u32]) {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = provider(N);
    let env = settings(&mock, &redis.url(), &[]);
    let replicas = replicas(weights.len(), &env);
    all_shared(&replicas).await;

    let t0 = judge_epoch(&mock);
    let k = next_window(t0);
    until(t0, W * k).await;
    let per_sec = 3.0 * N as f64 / W.as_secs_f64();
    let sum: u32 = weights.iter().sum();
    let targets: Vec<(usize, SocketAddr, f64)> = replicas
        .iter()
        .zip(weights)
        .enumerate()
        .map(|(i, (r, w))| (i, r.addr, per_sec * f64::from(*w) / f64::from(sum)))
        .collect();
    let load = Load::start(t0, &targets);
    let windows = 5;
    until(t0, W * (k + windows) + Duration::from_millis(100)).await;
    // Read after the clients hung up: what was already sent has been judged.
    let (outcomes, _) = load.stop(None).await;
    let counts = mock.window_counts(W);
    let worst = mock.max_in_rolling(W);
    let refused = mock.refused_total();

    let steady = admitted_in(&counts, k + 1, k + windows);
    let mean = steady.iter().sum::<u64>() as f64 / steady.len().max(1) as f64;
    let ok_total = outcomes.iter().filter(|o| o.status == 200).count();
    let mut shares = String::from("replica  offered share  served share (200s)\n");
    let mut off = Vec::new();
    for (i, w) in weights.iter().enumerate() {
        let offered = f64::from(*w) / f64::from(sum);
        let served = outcomes
            .iter()
            .filter(|o| o.replica == i && o.status == 200)
            .count() as f64
            / ok_total.max(1) as f64;
        shares.push_str(&format!(
            "{:>7}  {:>13.3}  {:>19.3}\n",
            format!("r{i}"),
            offered,
            served
        ));
        off.push((i, offered, served));
    }
    let provider_429s = outcomes.iter().filter(|o| o.provider_429()).count();
    let report = format!(
        "{label}: {} replicas, offered 3N = {} per 6 s in the ratio {weights:?}, budget and provider N = {N}\n{}\
         steady windows {}..{}: admitted {steady:?}, mean {mean:.2} ({:.1} % of N), min {}\n\
         max in any rolling 6 s: {worst}; provider 429s: {refused} (judge), {provider_429s} (clients)\n\
         steady windows' {}\n{}{}",
        weights.len(),
        3 * N,
        window_table(&counts, k, k + windows, N),
        k + 1,
        k + windows - 1,
        100.0 * mean / N as f64,
        steady.iter().min().copied().unwrap_or(0),
        gaps(
            &mock,
            W * (k + 1),
            W * (k + windows),
            W / N as u32
        ),
        status_table(&outcomes, weights.len()),
        shares,
    );
    println!("{report}");

    let mut broken = Vec::new();
    if refused != 0 {
        broken.push(format!("{refused} provider 429s"));
    }
    if provider_429s != 0 {
        broken.push(format!("{provider_429s} clients got the provider's 429"));
    }
    if worst as u64 > N {
        broken.push(format!("{worst} in one rolling window, over {N}"));
    }
    if steady.len() != windows as usize - 1 {
        broken.push(format!("{} steady windows counted", steady.len()));
    }
    if mean < 0.98 * N as f64 {
        broken.push(format!(
            "admitted {mean:.2} per window on average, under 98 % of {N}"
        ));
    }
    for (i, offered, served) in off {
        if (served - offered).abs() > 0.12 {
            broken.push(format!(
                "r{i} got {served:.3} of the 200s for {offered:.3} of the offered load"
            ));
        }
    }
    broken.extend(gone(&replicas));
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        logs_of(&replicas)
    );
    drop(replicas);
    mock.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_three_replicas_keep_the_limit() {
    flood("3 replicas", &[1, 2, 3]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_two_replicas_keep_the_limit() {
    flood("2 replicas", &[1, 1]).await;
}

/// The provider allows 40 per window, the budget says 60: the first 429 teaches the
/// whole cluster (at most one per replica in flight when it comes), none after the
/// first two windows, and every replica shows the same learned limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_lower_limit_learned_once_for_all() {
    let _serial = SERIAL.lock().await;
    let hidden = 40;
    let redis = Redis::start();
    let mock = provider(hidden);
    let env = settings(&mock, &redis.url(), &[]);
    let replicas = replicas(3, &env);
    all_shared(&replicas).await;

    let t0 = judge_epoch(&mock);
    let k = next_window(t0);
    until(t0, W * k).await;
    let per_replica = N as f64 / W.as_secs_f64();
    let targets: Vec<(usize, SocketAddr, f64)> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.addr, per_replica))
        .collect();
    let load = Load::start(t0, &targets);
    let windows = 5;
    until(t0, W * (k + windows) + Duration::from_millis(100)).await;
    // Read after the clients hung up: what was already sent has been judged.
    let (outcomes, _) = load.stop(None).await;
    let counts = mock.window_counts(W);
    let worst = mock.max_in_rolling(W);
    let refused = mock.refused_total();

    // Every replica hears of the learned limit with its next call to Redis (a heartbeat
    // a second at most).
    // The learned limit shows in each replica's pacing and in the cluster's record it
    // last read; all six must agree.
    let mut learned = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        learned.clear();
        values.clear();
        for r in &replicas {
            let v = config_of(r.addr).await;
            let p = provider_view(&v);
            learned.push(p["pacing"].clone());
            values.push(p["pacing"]["learned"].clone());
            values.push(p["cluster"]["record"]["learned"].clone());
        }
        if values.windows(2).all(|p| p[0] == p[1]) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let when: Vec<String> = refusal_times(&mock)
        .iter()
        .map(|t| format!("{:.3}", t - (W * k).as_secs_f64()))
        .collect();
    let sources = refusals_seen(&replicas);
    let late = refused_in(&counts, k + 2);
    let after = admitted_in(&counts, k + 2, k + windows);
    let mean = after.iter().sum::<u64>() as f64 / after.len().max(1) as f64;
    let report = format!(
        "hidden limit {hidden} per 6 s, budget {N}, 3 replicas offered {} per 6 s each\n{}\
         provider 429s: {refused} in all, {late} after the first two windows; max in any rolling 6 s: {worst}\n\
         windows {}..{}: admitted {after:?}, mean {mean:.2} ({:.1} % of {hidden})\n\
         provider 429s at (s after the load started): {when:?}\n{sources}\
         learned limit per replica (pacing, cluster record): {values:?}\npacing per replica: {}\n{}",
        N,
        window_table(&counts, k, k + windows, hidden),
        k + 2,
        k + windows - 1,
        100.0 * mean / hidden as f64,
        learned
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("\n  "),
        status_table(&outcomes, 3),
    );
    println!("{report}");

    let mut broken = Vec::new();
    if refused > 3 {
        broken.push(format!("{refused} provider 429s, more than 3"));
    }
    if late != 0 {
        broken.push(format!("{late} provider 429s after the first two windows"));
    }
    if !values.windows(2).all(|p| p[0] == p[1]) {
        broken.push(format!(
            "the replicas disagree on the learned limit: {values:?}"
        ));
    }
    for v in &values {
        match v.as_u64() {
            Some(l) if (hidden - 4..=hidden).contains(&l) => {}
            _ => broken.push(format!(
                "learned limit {v}, not within {}..={hidden}",
                hidden - 4
            )),
        }
    }
    if worst as u64 > hidden {
        broken.push(format!("{worst} in one rolling window, over {hidden}"));
    }
    // Once learned, the cluster keeps the windows nearly full (a stall would show here).
    if mean < 0.9 * hidden as f64 {
        broken.push(format!(
            "admitted {mean:.2} per window after learning, under 90 % of {hidden}"
        ));
    }
    broken.extend(gone(&replicas));
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        logs_of(&replicas)
    );
    drop(replicas);
    mock.stop();
}

/// A rate changed through the admin API of one replica is what every replica paces at
/// within a couple of seconds (each reads the budget's record with its next call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_change_at_one_replica_reaches_all() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = provider(N);
    let env = settings(&mock, &redis.url(), &[]);
    let replicas = replicas(3, &env);
    all_shared(&replicas).await;

    let mut report = String::new();
    let mut broken = Vec::new();
    for (at, rpm) in [(0usize, 300.0), (2, 450.0)] {
        let body = format!("{{\"rate_rpm\": {rpm}}}");
        let a = admin_patch(replicas[at].addr, BEARER, &body).await;
        assert_eq!(a.status, 200, "PATCH {ADMIN_CONFIG} {body}: {}", a.text());
        let answer = a.json();
        let changed = Instant::now();
        report.push_str(&format!("PATCH rate_rpm {rpm} at r{at}: {answer}\n"));
        // When the budget's record in Redis has it.
        let in_redis = loop {
            let v = redis.cli(
                None,
                &[
                    "HGET",
                    &format!("nvidia-sidecar:{{{PROVIDER}}}:cfg"),
                    "rate_rpm",
                ],
            );
            if v.parse::<f64>().ok() == Some(rpm) {
                break Some(changed.elapsed());
            }
            if changed.elapsed() > Duration::from_secs(3) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        report.push_str(&format!("  in Redis's record after {in_redis:?}\n"));
        for (i, r) in replicas.iter().enumerate() {
            let deadline = changed + Duration::from_secs(3);
            let (seen, view) = loop {
                let v = config_of(r.addr).await;
                let p = provider_view(&v).clone();
                if p["rate_rpm"].as_f64() == Some(rpm) {
                    break (Some(changed.elapsed()), p);
                }
                if Instant::now() > deadline {
                    break (None, p);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            report.push_str(&format!(
                "  r{i}: rate_rpm {} after {seen:?}; pacing limit {} ceiling {}\n",
                view["rate_rpm"], view["pacing"]["limit"], view["pacing"]["ceiling"]
            ));
            if seen.is_none() {
                broken.push(format!(
                    "r{i} still shows rate_rpm {} 3 s after {rpm} was set at r{at}",
                    view["rate_rpm"]
                ));
            }
        }
    }
    // The budget itself follows: 450 RPM is 45 per 6 s. Wait until every replica's
    // pacing shows it.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut limits = Vec::new();
    loop {
        limits.clear();
        for r in &replicas {
            let v = config_of(r.addr).await;
            limits.push(provider_view(&v)["pacing"]["ceiling"].clone());
        }
        if limits.iter().all(|l| l.as_u64() == Some(45)) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report.push_str(&format!(
        "pacing ceiling per replica at the end: {limits:?}\n"
    ));
    println!("{report}");
    if !limits.iter().all(|l| l.as_u64() == Some(45)) {
        broken.push(format!(
            "pacing ceilings {limits:?}, not 45 per window everywhere"
        ));
    }
    broken.extend(gone(&replicas));
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        logs_of(&replicas)
    );
    drop(replicas);
    mock.stop();
}

/// 2N offered over 3 replicas; Redis is killed with SIGKILL for two windows, then
/// started again on the same port (empty). The replicas keep serving on their fallback
/// shares, say so, and go back to the shared budget in a new generation, the provider
/// refusing nothing beyond the stated bound (one lease per replica across the loss) and
/// the cluster learning nothing wrong from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let _serial = SERIAL.lock().await;
    let mut redis = Redis::start();
    let mock = provider(N);
    let env = settings(&mock, &redis.url(), &[]);
    let replicas = replicas(3, &env);
    all_shared(&replicas).await;

    let t0 = judge_epoch(&mock);
    let k = next_window(t0);
    until(t0, W * k).await;
    let per_replica = 2.0 * N as f64 / W.as_secs_f64() / 3.0;
    let targets: Vec<(usize, SocketAddr, f64)> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.addr, per_replica))
        .collect();
    let load = Load::start(t0, &targets);
    let modes = Modes::watch(t0, &replicas);

    let kill_at = W * (k + 2) + Duration::from_millis(500);
    until(t0, kill_at).await;
    let before_kill = mock.refused_total();
    redis.kill9();
    let killed = t0.elapsed();
    let mut broken = Vec::new();
    for r in &replicas {
        if let Err(e) = r
            .wait_for(
                "Redis is unreachable: this replica sends at most its fallback share",
                0,
                Duration::from_secs(5),
            )
            .await
        {
            broken.push(e);
        }
    }
    let mut down_metric = Vec::new();
    for r in &replicas {
        down_metric.push(backend_up(r).await);
    }

    let restart_at = kill_at + W * 2;
    until(t0, restart_at).await;
    let during_outage = mock.refused_total() - before_kill;
    redis.restart();
    let restarted = t0.elapsed();
    for r in &replicas {
        for needle in [
            "Redis answers again: back on the shared budget",
            "the shared budget starts a new generation",
        ] {
            if let Err(e) = r.wait_for(needle, 0, Duration::from_secs(15)).await {
                broken.push(e);
            }
        }
    }
    let lost_said: usize = replicas
        .iter()
        .map(|r| r.count("Redis lost the shared budget's state: starting a new generation"))
        .sum();
    let mut up_metric = Vec::new();
    for r in &replicas {
        up_metric.push(backend_up(r).await);
    }
    let end = restart_at + W * 2;
    until(t0, end).await;
    // Read after the clients hung up: what was already sent has been judged.
    let (outcomes, _) = load.stop(None).await;
    let modes = modes.stop().await;
    let learned = learned_limits(&replicas).await;
    let late_sent = late_sends(&replicas).await;
    let counts = mock.window_counts(W);
    let worst = mock.max_in_rolling(W);
    let refused = mock.refused_total();

    // 200s answered while Redis was away (a second after the kill to the restart).
    let served_outage: Vec<usize> = (0..3)
        .map(|i| {
            outcomes
                .iter()
                .filter(|o| {
                    o.replica == i
                        && o.status == 200
                        && o.answered_at() > killed + Duration::from_secs(1)
                        && o.answered_at() < restarted
                })
                .count()
        })
        .collect();
    let served_after: Vec<usize> = (0..3)
        .map(|i| {
            outcomes
                .iter()
                .filter(|o| {
                    o.replica == i
                        && o.status == 200
                        && o.answered_at() > restarted + Duration::from_secs(2)
                })
                .count()
        })
        .collect();
    let outage_secs = (restarted - killed).as_secs_f64();
    let last = (end.as_secs_f64() / W.as_secs_f64()).floor() as u32;
    let report = format!(
        "3 replicas offered 2N = {} per 6 s; Redis killed at {:.2} s, restarted at {:.2} s (judge time)\n{}\
         max in any rolling 6 s: {worst}; provider 429s: {refused} (during the outage {during_outage}; at {:?} s)\n\
         200s per replica during the outage ({outage_secs:.1} s): {served_outage:?}; after the restart: {served_after:?}\n\
         'Redis lost the state' said {lost_said} times; backend_up while down {down_metric:?}, after {up_metric:?}\n\
         learned limit at the end per replica: {learned:?} (0: none); sends after their lease's time: {late_sent:?}\nmodes seen (judge time):\n{modes}{}",
        2 * N,
        killed.as_secs_f64(),
        restarted.as_secs_f64(),
        window_table(&counts, k, last + 1, N),
        refusal_times(&mock),
        status_table(&outcomes, 3),
    );
    println!("{report}");

    // The stated bound (README, "The guarantee"): across a Redis loss or restart the
    // cluster may exceed the limit by one lease per replica, one token each at 600 RPM;
    // against a provider at exactly N each extra send is a 429. Otherwise none.
    if refused > 3 {
        broken.push(format!(
            "{refused} provider 429s, more than one lease per replica"
        ));
    }
    if before_kill != 0 {
        broken.push(format!(
            "{before_kill} provider 429s before Redis was killed"
        ));
    }
    if worst as u64 > N {
        broken.push(format!("{worst} in one rolling window, over {N}"));
    }
    // Each replica's fallback share is N/3 per window: over the outage it serves some.
    for (i, n) in served_outage.iter().enumerate() {
        if *n < 5 {
            broken.push(format!("r{i} served {n} requests while Redis was away"));
        }
    }
    for (i, n) in served_after.iter().enumerate() {
        if *n < 5 {
            broken.push(format!("r{i} served {n} requests after Redis came back"));
        }
    }
    // The provider's limit is the budget: a 429 from the cluster's own overshoot must
    // not teach a lower limit.
    if learned.iter().any(|l| *l != 0 && *l < N) {
        broken.push(format!(
            "learned limits {learned:?} below the provider's {N}"
        ));
    }
    if lost_said == 0 {
        broken.push("no replica said Redis lost the shared budget's state".into());
    }
    for (i, (d, u)) in down_metric.iter().zip(&up_metric).enumerate() {
        if d.is_some_and(|v| v != 0.0) || u.is_some_and(|v| v != 1.0) {
            broken.push(format!(
                "r{i}: sidecar_budget_backend_up {d:?} while Redis was down, {u:?} after"
            ));
        }
    }
    broken.extend(gone(&replicas));
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        logs_of(&replicas)
    );
    drop(replicas);
    mock.stop();
}

/// Redis frozen with SIGSTOP for 5 s under load (2N offered over 3 replicas,
/// `request_timeout` 4 s): every request is answered within its deadline plus a second,
/// and the replicas go back to the shared budget once Redis is thawed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_with_sigstop_pushes_no_request_past_its_deadline() {
    let _serial = SERIAL.lock().await;
    let timeout = Duration::from_secs(4);
    let mut redis = Redis::start();
    let mock = provider(N);
    let env = settings(&mock, &redis.url(), &[("SIDECAR_REQUEST_TIMEOUT", "4")]);
    let replicas = replicas(3, &env);
    all_shared(&replicas).await;

    let t0 = judge_epoch(&mock);
    let k = next_window(t0);
    until(t0, W * k).await;
    let per_replica = 2.0 * N as f64 / W.as_secs_f64() / 3.0;
    let targets: Vec<(usize, SocketAddr, f64)> = replicas
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.addr, per_replica))
        .collect();
    let load = Load::start(t0, &targets);
    let modes = Modes::watch(t0, &replicas);

    let freeze_at = W * (k + 1) + Duration::from_millis(500);
    until(t0, freeze_at).await;
    redis.freeze();
    let frozen = t0.elapsed();
    let mut broken = Vec::new();
    for r in &replicas {
        if let Err(e) = r
            .wait_for("Redis is unreachable", 0, Duration::from_secs(4))
            .await
        {
            broken.push(e);
        }
    }
    until(t0, freeze_at + Duration::from_secs(5)).await;
    redis.thaw();
    let thawed = t0.elapsed();
    for r in &replicas {
        if let Err(e) = r
            .wait_for(
                "Redis answers again: back on the shared budget",
                0,
                Duration::from_secs(15),
            )
            .await
        {
            broken.push(e);
        }
    }
    until(t0, thawed + W * 2).await;
    let (outcomes, unfinished) = load.stop(Some(timeout + Duration::from_secs(2))).await;
    let modes = modes.stop().await;
    let learned = learned_limits(&replicas).await;
    let late_sent = late_sends(&replicas).await;
    let refused = mock.refused_total();
    let worst = mock.max_in_rolling(W);
    let counts = mock.window_counts(W);

    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort();
    let late: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.latency > timeout + Duration::from_secs(1))
        .collect();
    let no_answer = outcomes.iter().filter(|o| o.status == 0).count();
    let in_freeze = outcomes
        .iter()
        .filter(|o| o.sent >= frozen && o.sent < thawed)
        .count();
    let last = (t0.elapsed().as_secs_f64() / W.as_secs_f64()).floor() as u32;
    let report = format!(
        "3 replicas offered 2N = {} per 6 s, request_timeout 4 s; Redis frozen {:.2}..{:.2} s (judge time)\n{}\
         {} requests ({in_freeze} sent while frozen): latency p50 {:?} p99 {:?} max {:?}; \
         {} past 5 s, {no_answer} unanswered, {} still out 6 s after the load stopped\n\
         provider 429s: {refused} (at {:?} s); max in any rolling 6 s: {worst}\n\
         learned limit at the end per replica: {learned:?} (0: none); sends after their lease's time: {late_sent:?}\nmodes seen (judge time):\n{modes}{}",
        2 * N,
        frozen.as_secs_f64(),
        thawed.as_secs_f64(),
        window_table(&counts, k, last + 1, N),
        outcomes.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        late.len(),
        unfinished.len(),
        refusal_times(&mock),
        status_table(&outcomes, 3),
    );
    println!("{report}");

    if !late.is_empty() {
        broken.push(format!(
            "{} requests answered after request_timeout + 1 s, e.g. {:?}",
            late.len(),
            &late[..late.len().min(5)]
        ));
    }
    if no_answer != 0 || !unfinished.is_empty() {
        broken.push(format!(
            "{no_answer} requests without an answer, {} never finished: {:?}",
            unfinished.len(),
            &unfinished[..unfinished.len().min(5)]
        ));
    }
    // Across a Redis loss the cluster may exceed the limit by at most one lease per
    // replica (one token each at this rate): at most 3 refusals.
    if refused > 3 {
        broken.push(format!(
            "{refused} provider 429s, more than one lease per replica"
        ));
    }
    // The provider's limit is the budget: a 429 from the cluster's own overshoot must
    // not teach a lower limit.
    if learned.iter().any(|l| *l != 0 && *l < N) {
        broken.push(format!(
            "learned limits {learned:?} below the provider's {N} after the stall"
        ));
    }
    broken.extend(gone(&replicas));
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        logs_of(&replicas)
    );
    drop(replicas);
    mock.stop();
}

/// Every place a replica shows itself: its log, `/metrics`, the admin view and the
/// dashboard.
async fn everything_shown(r: &Replica) -> String {
    let mut all = r.log();
    for (addr, path, auth) in [
        (r.metrics, "/metrics", false),
        (r.addr, "/api/admin/config", true),
        (r.addr, "/api/dashboard", false),
        (r.addr, "/api/dashboard/snapshot", false),
    ] {
        let headers: &[(&str, &str)] = if auth {
            &[("authorization", BEARER)]
        } else {
            &[]
        };
        let (status, text) = get_text(addr, path, headers).await;
        all.push_str(&format!("\n=== GET {path}: {status}\n{text}"));
    }
    all
}

/// A replica with the wrong Redis password keeps serving on its fallback share and says
/// Redis is not reached; one with the right password joins; neither password shows
/// anywhere. A malformed URL stops start-up with exit 2 naming the setting, without
/// the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_bad_url() {
    let _serial = SERIAL.lock().await;
    let password = "s3cret-pass-1234";
    let wrong = "wr0ng-pass-5678";
    let redis = Redis::start_with(&["--requirepass", password]);
    let mock = provider(N);
    let mut broken = Vec::new();

    let wrong_url = format!("redis://:{wrong}@127.0.0.1:{}", redis.port);
    let right_url = format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let trace = [("SIDECAR_LOG_LEVEL", "trace")];
    let bad = start_replica("wrong-password", &settings(&mock, &wrong_url, &trace));
    let good = start_replica("right-password", &settings(&mock, &right_url, &trace));

    if let Err(e) = bad
        .wait_for("Redis not reached yet", 0, Duration::from_secs(10))
        .await
    {
        broken.push(e);
    }
    if let Err(e) = good
        .wait_for("on the shared budget", 0, Duration::from_secs(10))
        .await
    {
        broken.push(e);
    }
    let mut statuses = Vec::new();
    for r in [&bad, &good] {
        let mut got = Vec::new();
        for _ in 0..3 {
            let a = call(
                r.addr,
                req("POST", r.addr, "/v1/chat/completions", &[], CHAT),
            )
            .await;
            got.push(a.status.as_u16());
        }
        if got.iter().any(|s| *s != 200) {
            broken.push(format!("{} answered {got:?} to 3 requests", r.name));
        }
        statuses.push((r.name.clone(), got));
    }
    if bad.count("on the shared budget") != 0 {
        broken.push("the replica with the wrong password says it is on the shared budget".into());
    }
    for (r, secret) in [(&bad, wrong), (&good, password)] {
        let shown = everything_shown(r).await;
        for s in [wrong, password] {
            if shown.contains(s) {
                let at = shown.find(s).unwrap();
                broken.push(format!(
                    "{}: the password {s:?} shows: ...{}...",
                    r.name,
                    &shown[at.saturating_sub(200)..(at + s.len() + 50).min(shown.len())]
                ));
            }
        }
        let _ = secret;
    }
    // Shown masked, like keys.
    for r in [&bad, &good] {
        let v = config_of(r.addr).await;
        let url = v["redis"]["url"].as_str().unwrap_or_default().to_owned();
        if !url.contains(":****@127.0.0.1") {
            broken.push(format!(
                "{}: admin GET shows the Redis URL as {url:?}, not masked",
                r.name
            ));
        }
    }
    let not_reached = bad.lines_with("Redis not reached yet");
    println!(
        "answers: {statuses:?}\nwrong password said: {not_reached:?}\nright password said: {:?}",
        good.lines_with("on the shared budget")
    );

    // Malformed URLs: exit 2, naming the setting, never the password.
    for (url, secret) in [
        ("http://x", None),
        (
            "redis://:pw-9f8e7d6c5b@host:notaport",
            Some("pw-9f8e7d6c5b"),
        ),
        ("redis://:pw@host:notaport", Some(":pw@")),
    ] {
        let run = run_to_exit(&[
            ("SIDECAR_REDIS_URL", url),
            ("SIDECAR_UPSTREAM_URL", &mock.base_url()),
        ]);
        println!(
            "SIDECAR_REDIS_URL={url}: exit {:?}, stderr {:?}",
            run.code, run.stderr
        );
        if run.code != Some(2) {
            broken.push(format!("{url}: exit {:?}, not 2: {}", run.code, run.stderr));
        }
        if !run.stderr.contains("SIDECAR_REDIS_URL") {
            broken.push(format!(
                "{url}: stderr does not name SIDECAR_REDIS_URL: {}",
                run.stderr
            ));
        }
        if let Some(s) = secret {
            if run.stderr.contains(s) || run.stdout.contains(s) {
                broken.push(format!(
                    "{url}: the password shows: {}{}",
                    run.stderr, run.stdout
                ));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "{}\n--- wrong password:\n{}\n--- right password:\n{}",
        broken.join("\n"),
        bad.notable(),
        good.notable()
    );
    drop((bad, good));
    mock.stop();
}

/// With `redis_fallback_for` 2 s, a replica cut off from Redis serves on its fallback
/// share for 2 s, then answers 503 `budget_unavailable` with a Retry-After until Redis is
/// back, and serves again once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_after_fallback_for() {
    let _serial = SERIAL.lock().await;
    let mut redis = Redis::start();
    let mock = provider(N);
    let env = settings(&mock, &redis.url(), &[("SIDECAR_REDIS_FALLBACK_FOR", "2")]);
    let r = start_replica("r0", &env);
    all_shared(std::slice::from_ref(&r)).await;
    let chat = || async {
        let a = call(
            r.addr,
            req("POST", r.addr, "/v1/chat/completions", &[], CHAT),
        )
        .await;
        let code = if a.status == 200 {
            String::new()
        } else {
            a.json()["error"]["code"].as_str().unwrap_or("").to_owned()
        };
        (
            a.status.as_u16(),
            code,
            a.headers.get("retry-after").cloned(),
        )
    };
    let mut broken = Vec::new();
    let mut report = String::new();
    let shared = chat().await;
    report.push_str(&format!("shared: {shared:?}\n"));
    if shared.0 != 200 {
        broken.push(format!("on the shared budget: {shared:?}"));
    }

    redis.kill9();
    let killed = Instant::now();
    if let Err(e) = r
        .wait_for("Redis is unreachable", 0, Duration::from_secs(5))
        .await
    {
        broken.push(e);
    }
    let fallback = chat().await;
    report.push_str(&format!(
        "{:?} after the kill (fallback): {fallback:?}\n",
        killed.elapsed()
    ));
    if fallback.0 != 200 {
        broken.push(format!("on the fallback share: {fallback:?}"));
    }
    if let Err(e) = r
        .wait_for(
            "Redis unreachable for longer than redis_fallback_for",
            0,
            Duration::from_secs(10),
        )
        .await
    {
        broken.push(e);
    }
    let isolated_after = killed.elapsed();
    let isolated = chat().await;
    report.push_str(&format!(
        "{isolated_after:?} after the kill (isolated): {isolated:?}\n"
    ));
    if isolated.0 != 503 || isolated.1 != "budget_unavailable" || isolated.2.is_none() {
        broken.push(format!(
            "isolated: {isolated:?}, not 503 budget_unavailable with Retry-After"
        ));
    }
    // The replica counts from the last call Redis answered (a heartbeat at most before
    // the kill): it says how long that was.
    let down: Vec<f64> = r
        .lines_with("Redis unreachable for longer than redis_fallback_for")
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["down_secs"].as_f64())
        .collect();
    report.push_str(&format!("isolated after {down:?} s without an answer\n"));
    if down.iter().any(|d| *d < 2.0) || down.is_empty() {
        broken.push(format!(
            "isolated after {down:?} s without an answer, not redis_fallback_for (2 s)"
        ));
    }

    redis.restart();
    let restarted = Instant::now();
    if let Err(e) = r
        .wait_for(
            "Redis answers again: back on the shared budget",
            0,
            Duration::from_secs(15),
        )
        .await
    {
        broken.push(e);
    }
    let back = chat().await;
    report.push_str(&format!(
        "{:?} after the restart (shared again): {back:?}\n",
        restarted.elapsed()
    ));
    if back.0 != 200 {
        broken.push(format!("after Redis came back: {back:?}"));
    }
    println!("{report}");
    broken.extend(gone(std::slice::from_ref(&r)));
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        r.notable()
    );
    drop(r);
    mock.stop();
}
