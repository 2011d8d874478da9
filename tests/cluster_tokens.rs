//! Token budgets shared across replicas (issue 19, part 5), end to end: a real
//! `redis-server` (started by each test on a free port, without persistence), three
//! replicas as processes of the binary sharing one provider key, the simulated provider
//! in this process as the judge, and closed-loop clients sending `tests/tokens.rs`'s mix
//! of short and long chats to every replica.
//!
//! Each replica alone is told the provider's whole token limit; only the shared token
//! budget in Redis keeps the three together under it. Without it, three replicas would
//! send about three times the limit and draw token 429s.
//!
//! Time scale as `tests/tokens.rs`: W = 6 s, 100 requests and 12,000 tokens a window
//! (1,000 RPM, 120,000 TPM). Bounds are on counts the provider's judge made and on the
//! usage its answers reported, never on wall-clock durations. Each run prints its
//! per-window table (`cargo test --test cluster_tokens -- --nocapture`).
//!
//! `redis-server` must be installed (Debian: `apt-get install redis-server`).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use nvidia_sidecar::mock::{MockConfig, MockServer, TokenCharge, TokenCount};

use common::redis::{all_shared, Redis, Replica};
use common::{admin_config, admin_patch, flood, judge_epoch, mixed_chat, until, Flood, Tally};

const W: Duration = Duration::from_secs(6);
/// Requests per window the provider allows (and the replicas' ceiling): 1,000 RPM.
const N: u64 = 100;
/// Tokens per window the provider allows: 120,000 TPM.
const L: u64 = 12_000;
const TPM: &str = "120000";
/// The model's completion cap: the bound of a chat that states no `max_tokens`.
const CAP: u64 = 256;
const REPLICAS: usize = 3;
const ADMIN_TOKEN: &str = "cluster-tokens-admin-token-6c1e";
const BEARER: &str = "Bearer cluster-tokens-admin-token-6c1e";
/// Closed-loop clients per replica.
const CLIENTS: usize = 6;

/// One test at a time: each floods three replicas on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn provider(charge: TokenCharge) -> MockServer {
    MockServer::start(MockConfig {
        rpm: N as f64 * 60.0 / W.as_secs_f64(),
        tpm: L as f64 * 60.0 / W.as_secs_f64(),
        token_charge: charge,
        tokens: CAP as usize,
        window_secs: W.as_secs_f64(),
        workers: 1,
        ..MockConfig::default()
    })
    .expect("the mock provider starts")
}

fn replicas(mock: &MockServer, redis: &Redis, charge: &str) -> Vec<Replica> {
    let (upstream, url) = (mock.base_url(), redis.url());
    let env: Vec<(&str, &str)> = vec![
        ("SIDECAR_UPSTREAM_URL", upstream.as_str()),
        ("SIDECAR_REDIS_URL", url.as_str()),
        ("SIDECAR_RATE_RPM", "1000"),
        ("SIDECAR_BUCKET_CAPACITY", "1"),
        ("SIDECAR_PROVIDER_WINDOW", "6"),
        ("SIDECAR_WINDOW_MARGIN_FLOOR", "0.02"),
        ("SIDECAR_PROBE_INTERVAL", "30"),
        ("SIDECAR_RETREAT_DEFAULT_PAUSE", "0.1"),
        ("SIDECAR_RETREAT_QUIET_PERIOD", "3"),
        ("SIDECAR_RECOVERY_INTERVAL", "1"),
        ("SIDECAR_REQUEST_TIMEOUT", "30"),
        ("SIDECAR_QUEUE_MAX_SIZE", "256"),
        ("SIDECAR_UPSTREAM_429_RETRIES", "2"),
        ("SIDECAR_TOKENS_PER_MINUTE", TPM),
        ("SIDECAR_TOKEN_CHARGE", charge),
        ("SIDECAR_DEFAULT_COMPLETION_TOKENS", "256"),
        ("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    (0..REPLICAS)
        .map(|i| Replica::start(&format!("r{i}"), &env))
        .collect()
}

/// `sidecar_tokens_total{provider="nvidia",kind}` of a replica's `/metrics`.
async fn tokens_metric(metrics: SocketAddr, kind: &str) -> Option<u64> {
    let text = common::metrics_text(metrics).await;
    common::tokens_total(&text, "nvidia", kind).map(|v| v as u64)
}

/// `sidecar_budget_token_leases_total{result}` of a replica, for each result.
async fn token_leases(metrics: SocketAddr) -> String {
    let text = common::metrics_text(metrics).await;
    let mut out = Vec::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("sidecar_budget_token_leases_total{") {
            if let (Some(result), Some((_, n))) =
                (rest.split("result=\"").nth(1), l.rsplit_once(' '))
            {
                out.push(format!("{} {n}", result.split('"').next().unwrap_or("")));
            }
        }
    }
    out.join(", ")
}

/// The replicas' settled tokens summed, read until they equal `charged` (settlement may
/// trail the client's last byte by a moment) or 5 s pass.
async fn settled(replicas: &[Replica], charged: u64) -> Vec<Option<u64>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut each = Vec::new();
        for r in replicas {
            each.push(tokens_metric(r.metrics, "settled").await);
        }
        let sum: u64 = each.iter().map(|v| v.unwrap_or(0)).sum();
        if sum == charged || tokio::time::Instant::now() >= deadline {
            return each;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn table(tokens: &[TokenCount]) -> String {
    let mut out = String::from("window  tokens/limit              token 429s\n");
    for t in tokens {
        out.push_str(&format!(
            "{:>6}  {:>6}/{:<6} ({:>5.1} %)  {:>10}\n",
            t.index,
            t.tokens,
            L,
            100.0 * t.tokens as f64 / L as f64,
            t.refused
        ));
    }
    out
}

/// Closed-loop clients of the mix at every replica (`CLIENTS` each), seeded from `seed`.
fn flood_all(replicas: &[Replica], seed: u64) -> Vec<Flood> {
    replicas
        .iter()
        .enumerate()
        .map(|(i, r)| flood(r.addr, CLIENTS, seed + 100 * i as u64, CAP, mixed_chat))
        .collect()
}

/// What a flood came to: the judge's figures (read when the clients stop) and each
/// replica's answers and settled tokens.
struct Finished {
    tokens: Vec<TokenCount>,
    worst: u64,
    refused_tokens: u64,
    refused_requests: u64,
    charged: u64,
    settled: Vec<Option<u64>>,
    tallies: Vec<std::sync::Arc<Tally>>,
}

impl Finished {
    /// Stops the clients (after reading the judge's windows) and reads the rest.
    async fn read(mock: &MockServer, replicas: &[Replica], floods: Vec<Flood>) -> Self {
        let tokens = mock.token_window_counts(W);
        let mut tallies = Vec::new();
        for f in floods {
            tallies.push(f.stop(Duration::from_secs(40)).await);
        }
        let charged = mock.tokens_total();
        Self {
            tokens,
            worst: mock.max_tokens_in_rolling(W),
            refused_tokens: mock.refused_for_tokens(),
            refused_requests: mock.refused_for_requests(),
            charged,
            settled: settled(replicas, charged).await,
            tallies,
        }
    }

    fn settled_sum(&self) -> u64 {
        self.settled.iter().map(|v| v.unwrap_or(0)).sum()
    }

    /// The clients' answers, one line per replica.
    fn answers(&self) -> String {
        let lines: Vec<String> = self.tallies.iter().map(|t| t.summary()).collect();
        lines.join("\n")
    }

    /// What every flood promises: each answer a 200 and each replica served, the
    /// settlements adding up to the provider's charges.
    fn check(&self, broken: &mut Vec<String>) {
        let get = Tally::get;
        for (i, t) in self.tallies.iter().enumerate() {
            if get(&t.too_many) > 0 || get(&t.other) > 0 {
                broken.push(format!("r{i}: not every answer was 200: {}", t.summary()));
            }
            if get(&t.ok) == 0 {
                broken.push(format!("r{i} served nothing"));
            }
        }
        if self.settled_sum() != self.charged {
            broken.push(format!(
                "the replicas settled {} tokens, the provider charged {}",
                self.settled_sum(),
                self.charged
            ));
        }
    }
}

/// Fails with what broke, the report and the replicas' notable log lines; else stops.
fn conclude(broken: &[String], report: &str, replicas: Vec<Replica>, mock: MockServer) {
    let logs: Vec<String> = replicas.iter().map(Replica::notable).collect();
    assert!(
        broken.is_empty(),
        "{}\n{report}\n{}",
        broken.join("\n"),
        logs.join("\n")
    );
    drop(replicas);
    mock.stop();
}

/// Three replicas, each told the whole token limit, flooded with the mix for seven
/// windows: no provider 429, at most `L` tokens in any rolling window as the provider
/// counts them, on average at least `fill` of `L` charged a window after the first, and
/// the replicas' settled tokens add up to what the provider charged.
async fn three_replicas_share_the_token_limit(label: &str, charge: TokenCharge, setting: &str) {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = provider(charge);
    let replicas = replicas(&mock, &redis, setting);
    all_shared(&replicas).await;

    let t0 = judge_epoch(&mock);
    let floods = flood_all(&replicas, 23_000);
    until(t0, W * 7).await;
    let f = Finished::read(&mock, &replicas, floods).await;
    let end = f.tokens.len().saturating_sub(1);
    let full = &f.tokens[1.min(end)..end];
    let mean = full.iter().map(|w| w.tokens as f64).sum::<f64>() / full.len().max(1) as f64;
    let mut leases = Vec::new();
    for r in &replicas {
        leases.push(format!(
            "{} token leases: {}",
            r.name,
            token_leases(r.metrics).await
        ));
    }
    let (worst, charged) = (f.worst, f.charged);
    let report = format!(
        "{label}: {REPLICAS} replicas x {CLIENTS} clients, {L} tokens and {N} requests per 6 s\n\
         {}mean of windows 1..: {mean:.0} ({:.1} %); most in any rolling 6 s: {worst}\n\
         provider 429s: {} tokens, {} requests\n\
         provider charged {charged}; replicas settled {:?} (sum {})\n{}\n{}",
        table(&f.tokens),
        100.0 * mean / L as f64,
        f.refused_tokens,
        f.refused_requests,
        f.settled,
        f.settled_sum(),
        f.answers(),
        leases.join("\n")
    );
    println!("{report}");

    let mut broken = Vec::new();
    if f.refused_tokens + f.refused_requests > 0 {
        broken.push(format!(
            "provider 429s: {} of the token limit, {} of the request limit",
            f.refused_tokens, f.refused_requests
        ));
    }
    f.check(&mut broken);
    if worst > L {
        broken.push(format!("{worst} tokens in one rolling window, over {L}"));
    }
    if full.len() < 6 {
        broken.push(format!("{} full windows after the first", full.len()));
    }
    if mean < 0.85 * L as f64 {
        broken.push(format!(
            "{mean:.0} tokens charged per window on average, under 85 % of {L}"
        ));
    }
    // Equal clients at every replica: none is starved (each gets at least half of an
    // equal part of what was charged; runs give 23 to 37 %).
    for (i, v) in f.settled.iter().enumerate() {
        let part = v.unwrap_or(0) as f64 / charged.max(1) as f64;
        if part < 0.5 / REPLICAS as f64 {
            broken.push(format!("r{i} settled {:.1} % of the tokens", 100.0 * part));
        }
    }
    conclude(&broken, &report, replicas, mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_a_reserved_token_limit() {
    three_replicas_share_the_token_limit("reserved", TokenCharge::Reserved, "reserved").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_an_actual_token_limit() {
    three_replicas_share_the_token_limit("actual", TokenCharge::Actual, "actual").await;
}

/// `tokens_per_minute` changed through the admin API at one replica reaches every
/// replica: the cluster's record, each replica's configuration and its token budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_setting_changed_at_one_replica_reaches_all() {
    let _serial = SERIAL.lock().await;
    let redis = Redis::start();
    let mock = provider(TokenCharge::Reserved);
    let replicas = replicas(&mock, &redis, "reserved");
    all_shared(&replicas).await;

    let a = admin_patch(replicas[1].addr, BEARER, r#"{"tokens_per_minute": 60000}"#).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let mut broken = Vec::new();
    let mut report = String::new();
    for r in &replicas {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let (config, limit) = loop {
            let v = admin_config(r.addr, &[("authorization", BEARER)]).await;
            let p = v["providers"]["nvidia"].clone();
            let text = common::metrics_text(r.metrics).await;
            let limit = text
                .lines()
                .find(|l| l.starts_with("sidecar_token_budget_limit{"))
                .and_then(|l| l.rsplit_once(' '))
                .and_then(|(_, v)| v.parse::<f64>().ok());
            let done = p["tokens_per_minute"].as_u64() == Some(60_000) && limit == Some(6_000.0);
            if done || tokio::time::Instant::now() > deadline {
                break (p, limit);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        report.push_str(&format!(
            "{}: tokens_per_minute {}, token budget limit {limit:?}, cluster tokens {}\n",
            r.name, config["tokens_per_minute"], config["cluster"]["record"]["tokens"]
        ));
        if config["tokens_per_minute"].as_u64() != Some(60_000) || limit != Some(6_000.0) {
            broken.push(format!("{} did not take the new setting", r.name));
        }
        if config["cluster"]["record"]["tokens"]["configured"].as_u64() != Some(6_000) {
            broken.push(format!("{} shows no shared 6,000 a window", r.name));
        }
    }
    println!("{report}");
    let in_redis = redis.cli(
        None,
        &["HGET", "nvidia-sidecar:{nvidia}:cfg", "tokens_limit"],
    );
    assert_eq!(in_redis.trim(), "6000", "the cluster's record\n{report}");
    assert!(broken.is_empty(), "{}\n{report}", broken.join("\n"));
    drop(replicas);
    mock.stop();
}

/// Redis is killed with SIGKILL for two windows of the flood, then started again empty.
/// The replicas keep serving on their fallback share of the token limit, go back to the
/// shared budget in a new generation seeded with their recent token charges, and the
/// provider refuses at most one request per replica across the loss (what was in hand
/// when it happened); every settlement made meanwhile still adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted_keeps_the_token_limit() {
    let _serial = SERIAL.lock().await;
    let mut redis = Redis::start();
    let mock = provider(TokenCharge::Reserved);
    let replicas = replicas(&mock, &redis, "reserved");
    all_shared(&replicas).await;

    let t0 = judge_epoch(&mock);
    let floods = flood_all(&replicas, 24_000);
    until(t0, W * 2).await;
    redis.kill9();
    let mut broken = Vec::new();
    for r in &replicas {
        let fallback = "Redis is unreachable: this replica sends at most its fallback share";
        if let Err(e) = r.wait_for(fallback, 0, Duration::from_secs(5)).await {
            broken.push(e);
        }
    }
    until(t0, W * 4).await;
    let during = mock.refused_for_tokens();
    redis.restart();
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
    until(t0, W * 7).await;
    let f = Finished::read(&mock, &replicas, floods).await;
    let refused = f.refused_tokens + f.refused_requests;
    let report = format!(
        "{}most in any rolling 6 s: {}; provider 429s: {refused} ({during} during the \
         outage); charged {}, settled {:?}\n{}",
        table(&f.tokens),
        f.worst,
        f.charged,
        f.settled,
        f.answers()
    );
    println!("{report}");
    if refused > REPLICAS as u64 {
        broken.push(format!(
            "{refused} provider 429s, over one per replica across the loss"
        ));
    }
    f.check(&mut broken);
    conclude(&broken, &report, replicas, mock);
}
