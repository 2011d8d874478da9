//! Token budgets end to end (issue 19): a sidecar in front of the simulated provider,
//! whose tokens-per-window limit binds long before its request limit, and every verdict
//! taken from the provider's own judge (tokens charged per fixed window, the most in any
//! rolling window, which limit refused) and the usage its answers reported, never from
//! the sidecar's gauges alone.
//!
//! The provider counts tokens by its own rule (`src/mock/count.rs`: bytes ÷ 4 per text
//! field, 3 per message), which the sidecar does not share (its estimate is bytes ÷ 3, 4
//! per message and 2): the sidecar paces by an estimate it can only settle from usage.
//!
//! Time scale: one provider window W = 6 s (the mock's `window_secs` and
//! `SIDECAR_PROVIDER_WINDOW`), 100 requests and 12,000 tokens a window (1,000 RPM and
//! 120,000 TPM), each sidecar time setting shortened as `tests/pacing.rs` does. Clients
//! are closed-loop (16, each sending its next chat when its last is answered), so the
//! sidecar always has a backlog and stopping them cuts no answer off. Bounds are on
//! counts averaged over the windows after the first (the last, partial one left out),
//! never on wall-clock durations. Each flood prints its per-window table
//! (`cargo test --test tokens -- --nocapture`), the figures of issue 19's closing note.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvidia_sidecar::app::App;
use nvidia_sidecar::limiter::PacingView;
use nvidia_sidecar::mock::{MockConfig, TokenCharge, TokenCount, WindowCount};
use nvidia_sidecar::priority::Priority;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use common::*;

/// The provider's window.
const W: Duration = Duration::from_secs(6);
/// Requests per window the provider allows, and the sidecar's ceiling: 1,000 RPM.
const N: u64 = 100;
/// Tokens per window the provider allows: 120,000 TPM. About 20 of the mix's chats.
const L: u64 = 12_000;
/// `L` per minute, as `SIDECAR_TOKENS_PER_MINUTE` takes it.
const TPM: &str = "120000";
/// The model's own completion cap (the mock's `--tokens`): what a chat that states no
/// `max_tokens` may generate, so what both the provider and the sidecar
/// (`SIDECAR_DEFAULT_COMPLETION_TOKENS`) reserve for it.
const CAP: u64 = 256;
const CAP_STR: &str = "256";
/// Closed-loop clients of a flood.
const CLIENTS: usize = 16;
const PROVIDER: &str = "nvidia";

fn per_minute(per_window: u64) -> f64 {
    per_window as f64 * 60.0 / W.as_secs_f64()
}

/// The provider: `N` requests and `tokens` tokens in any rolling 6 s, charged as
/// `charge` says, answering in `flags`' dialect.
fn provider(tokens: u64, charge: TokenCharge, flags: MockConfig) -> MockConfig {
    MockConfig {
        rpm: per_minute(N),
        tpm: per_minute(tokens),
        token_charge: charge,
        tokens: CAP as usize,
        window_secs: W.as_secs_f64(),
        ..flags
    }
}

/// The sidecar at the provider's request limit on the 6 s scale (no token budget unless
/// `extra` sets one), with `extra` on top.
fn sidecar<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("SIDECAR_RATE_RPM", "1000"),
        ("SIDECAR_BUCKET_CAPACITY", "1"),
        ("SIDECAR_PROVIDER_WINDOW", "6"),
        // Loopback jitter is under a millisecond; the fraction (0.5 %: 30 ms) applies.
        ("SIDECAR_WINDOW_MARGIN_FLOOR", "0.02"),
        // Five windows.
        ("SIDECAR_PROBE_INTERVAL", "30"),
        ("SIDECAR_RETREAT_DEFAULT_PAUSE", "0.1"),
        ("SIDECAR_RETREAT_QUIET_PERIOD", "3"),
        ("SIDECAR_RECOVERY_INTERVAL", "1"),
        ("SIDECAR_REQUEST_TIMEOUT", "20"),
        ("SIDECAR_QUEUE_MAX_SIZE", "256"),
        ("SIDECAR_UPSTREAM_429_RETRIES", "2"),
        ("SIDECAR_WORKERS", "2"),
        ("SIDECAR_SHUTDOWN_GRACE", "1"),
        ("SIDECAR_DEFAULT_COMPLETION_TOKENS", CAP_STR),
    ];
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push((k, v));
    }
    env
}

/// The sidecar told the provider's token limit and charge model.
fn budgeted(charge: &'static str) -> Vec<(&'static str, &'static str)> {
    sidecar(&[
        ("SIDECAR_TOKENS_PER_MINUTE", TPM),
        ("SIDECAR_TOKEN_CHARGE", charge),
    ])
}

// === the judge's tables ===

/// The per-window table of a run: tokens charged (and their share of the limit in force)
/// and the token limit's 429s, requests admitted and the request limit's 429s.
fn table(
    label: &str,
    tokens: &[TokenCount],
    requests: &[WindowCount],
    limit_of: impl Fn(u64) -> u64,
) -> String {
    let mut out =
        format!("{label}\nwindow  tokens/limit              token 429s  requests  request 429s\n");
    for t in tokens {
        let r = requests
            .iter()
            .find(|r| r.index == t.index)
            .copied()
            .unwrap_or_default();
        let limit = limit_of(t.index);
        out.push_str(&format!(
            "{:>6}  {:>6}/{:<6} ({:>5.1} %)  {:>10}  {:>8}  {:>12}\n",
            t.index,
            t.tokens,
            limit,
            100.0 * t.tokens as f64 / limit as f64,
            t.refused,
            r.admitted,
            r.refused.saturating_sub(t.refused),
        ));
    }
    out
}

/// Windows that ended before the judge was asked (the last one, still running, is
/// left out), from `first` on.
fn full_windows(counts: &[TokenCount], first: usize) -> &[TokenCount] {
    let end = counts.len().saturating_sub(1);
    &counts[first.min(end)..end]
}

fn mean_tokens(windows: &[TokenCount]) -> f64 {
    windows.iter().map(|w| w.tokens as f64).sum::<f64>() / windows.len().max(1) as f64
}

// === the sidecar's side ===

/// `sidecar_tokens_total{provider="nvidia",kind}` of a `/metrics` scrape.
fn tokens_metric(text: &str, kind: &str) -> Option<f64> {
    tokens_total(text, PROVIDER, kind)
}

/// The sidecar's settled tokens, read until they equal `charged` (settlement may trail
/// the client's last byte by a moment) or 5 s pass; with the scrape it was read from.
async fn settled_tokens(s: &Stack, charged: u64) -> (Option<f64>, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = s.scrape().await;
        let settled = tokens_metric(&text, "settled");
        if settled == Some(charged as f64) || Instant::now() >= deadline {
            return (settled, text);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn view(app: &App) -> PacingView {
    app.providers[0].limiter.pacing_view(app.clock.now_nanos())
}

/// Reads the provider's pacing view every 20 ms until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<(Duration, PacingView)>>,
}

fn sample_views(app: &Arc<App>, t0: Instant) -> Sampler {
    let stop = Arc::new(AtomicBool::new(false));
    let (flag, app) = (Arc::clone(&stop), Arc::clone(app));
    let task = tokio::spawn(async move {
        let mut out = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            out.push((t0.elapsed(), view(&app)));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out
    });
    Sampler { stop, task }
}

impl Sampler {
    async fn stop(self) -> Vec<(Duration, PacingView)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the sampler ran")
    }
}

// === the guard against a silent judge ===

/// Without a token setting the sidecar paces requests only, so a flood whose tokens
/// exceed the provider's limit draws token 429s: the mock's token limit is live and its
/// judge counts them (were it silent, the floods below would pass for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_setting_a_mixed_flood_draws_token_429s_from_the_provider() {
    let s = stack(
        provider(L, TokenCharge::Reserved, MockConfig::default()),
        &sidecar(&[]),
    );
    let clients = flood(s.addr, CLIENTS, 19_000, CAP, mixed_chat);
    wait_until("a 429 of the provider's token limit", || {
        s.mock.refused_for_tokens() > 0
    })
    .await;
    let tally = clients.stop(Duration::from_secs(30)).await;
    let (tokens, requests) = (s.mock.token_window_counts(W), s.mock.window_counts(W));
    let report = table("no token setting, mixed flood", &tokens, &requests, |_| L);
    println!(
        "{report}token 429s {}, request 429s {}, tokens charged {}, most in a rolling 6 s {}\n{}",
        s.mock.refused_for_tokens(),
        s.mock.refused_for_requests(),
        s.mock.tokens_total(),
        s.mock.max_tokens_in_rolling(W),
        tally.summary()
    );

    assert!(s.mock.refused_for_tokens() > 0, "{report}");
    assert_eq!(
        s.mock.refused_for_requests(),
        0,
        "the request limit bound: the mix no longer tests tokens\n{report}"
    );
    assert!(s.mock.tokens_total() >= L / 2, "{report}");
    assert!(
        s.mock.max_tokens_in_rolling(W) <= L,
        "a reserved provider admits only what fits\n{report}"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

// === the mixed floods ===

/// Clients flood a sidecar told the provider's token limit and charge model with the
/// mix for seven windows. Over the windows after the first: no provider 429 (neither
/// limit, none seen by a client), at most `L` tokens in any rolling window as the
/// provider counts them, and on average at least 95 % of `L` charged a window. After
/// the clients' last answers, the sidecar's settled tokens equal what the provider
/// charged, and its prompt and completion tokens the answers' usage.
async fn a_mixed_flood_is_paced_by_tokens_and_settled_exactly(
    label: &str,
    charge: TokenCharge,
    setting: &'static str,
) {
    let s = stack(
        provider(L, charge, MockConfig::default()),
        &budgeted(setting),
    );
    let t0 = judge_epoch(&s.mock);
    let clients = flood(s.addr, CLIENTS, 19_100, CAP, mixed_chat);
    until(t0, W * 7).await;
    let tokens = s.mock.token_window_counts(W);
    let requests = s.mock.window_counts(W);
    let tally = clients.stop(Duration::from_secs(30)).await;
    // After the last answers: the whole run, the drain included.
    let worst = s.mock.max_tokens_in_rolling(W);
    let (refused_tokens, refused_requests) =
        (s.mock.refused_for_tokens(), s.mock.refused_for_requests());
    let charged = s.mock.tokens_total();
    let (settled, metrics) = settled_tokens(&s, charged).await;
    let (prompt, completion) = (
        tokens_metric(&metrics, "prompt"),
        tokens_metric(&metrics, "completion"),
    );
    let report = table(
        &format!("{label}: {L} tokens and {N} requests per 6 s, {CLIENTS} closed-loop clients"),
        &tokens,
        &requests,
        |_| L,
    );
    let full = full_windows(&tokens, 1);
    let mean = mean_tokens(full);
    let get = Tally::get;
    println!(
        "{report}mean of windows 1..: {mean:.0} ({:.1} %); most in any rolling 6 s: {worst}\n\
         provider 429s: {refused_tokens} tokens, {refused_requests} requests\n\
         provider charged {charged}; sidecar settled {settled:?}, prompt {prompt:?}, completion \
         {completion:?}, estimated {:?}\n{}",
        100.0 * mean / L as f64,
        tokens_metric(&metrics, "estimated"),
        tally.summary()
    );

    // The harness's own reading of the provider, before anything is blamed on the sidecar.
    let (p, c, b) = (
        get(&tally.prompt),
        get(&tally.completion),
        get(&tally.bound),
    );
    let expected_charge = match charge {
        TokenCharge::Reserved => p + b,
        TokenCharge::Actual => p + c,
    };
    assert_eq!(
        (get(&tally.without_usage), charged),
        (0, expected_charge),
        "harness: the answers' usage does not account for the provider's charges\n{report}"
    );

    // Every promise is checked, so one run tells all that broke.
    let mut broken = Vec::new();
    if refused_tokens + refused_requests > 0 {
        broken.push(format!(
            "provider 429s: {refused_tokens} of the token limit, {refused_requests} of the \
             request limit"
        ));
    }
    if get(&tally.too_many) > 0 || get(&tally.other) > 0 {
        broken.push(format!("not every answer was 200: {}", tally.summary()));
    }
    if worst > L {
        broken.push(format!("{worst} tokens in one rolling window, over {L}"));
    }
    if full.len() < 6 {
        broken.push(format!("{} full windows after the first", full.len()));
    }
    // Issue 19's 95 %. Measured (5 runs each): 98.2 to 99.7 % under `reserved`, 96.5 to
    // 98.4 % under `actual`, and 97.7 and 98.7 % with a release build beside them. What
    // is left: the span's margin (0.5 %), the oldest sub-window counted whole (up to
    // 1.6 %; it also absorbs estimates short of the provider's count), and the room
    // kept for waiters that have waited a window.
    if mean < 0.95 * L as f64 {
        broken.push(format!(
            "{mean:.0} tokens charged per window on average, under 95 % of {L}"
        ));
    }
    if settled != Some(charged as f64) {
        broken.push(format!(
            "sidecar_tokens_total{{kind=\"settled\"}} {settled:?}, the provider charged {charged}"
        ));
    }
    if prompt != Some(p as f64) || completion != Some(c as f64) {
        broken.push(format!(
            "sidecar_tokens_total prompt {prompt:?} and completion {completion:?}, the answers' \
             usage {p} and {c}"
        ));
    }
    assert!(broken.is_empty(), "{}\n{report}", broken.join("\n"));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_flood_under_reserved_charge_draws_no_429_fills_the_token_limit_and_settles_exactly(
) {
    a_mixed_flood_is_paced_by_tokens_and_settled_exactly(
        "reserved",
        TokenCharge::Reserved,
        "reserved",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_flood_under_actual_charge_gives_unused_tokens_back_draws_no_429_fills_the_limit_and_settles_exactly(
) {
    a_mixed_flood_is_paced_by_tokens_and_settled_exactly("actual", TokenCharge::Actual, "actual")
        .await;
}

// === priorities ===

/// A chat of about 1,000 tokens as the provider counts them (3 + 100 + 900; the sidecar
/// estimates 1,040), tagged in its `user` field so the provider's record tells it apart.
fn tagged_chat(tag: &str) -> String {
    chat_body(
        &[("user", prose(400))],
        json!({"max_tokens": 900, "user": tag}),
    )
}

/// The tags of the chats the provider saw, in the order it saw them.
fn tags_seen(s: &Stack) -> Vec<String> {
    s.mock
        .seen()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .filter_map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
            Some(v.get("user")?.as_str()?.to_owned())
        })
        .collect()
}

/// Twenty low-priority chats spend the token budget (11 of them fill a window) and
/// leave a backlog; six high-priority ones, then six more low ones, join it. Of the
/// first six the provider sees after the high ones arrived, at least five are high: the
/// token budget keeps the priorities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_chats_pass_a_low_priority_backlog_held_back_by_the_token_budget() {
    const K: usize = 6;
    let s = stack(
        provider(L, TokenCharge::Reserved, MockConfig::default()),
        &budgeted("reserved"),
    );
    let queues = Arc::clone(&s.app.providers[0].limiter.queues);
    let spawn = |p: &str, i: usize| {
        spawn_chat(
            s.addr,
            &[("x-priority", p)],
            &tagged_chat(&format!("{p}-{i}")),
        )
    };
    let mut chats: Vec<JoinHandle<u16>> = (0..20).map(|i| spawn("low", i)).collect();
    wait_until("the low chats to spend most of the window's tokens", || {
        s.mock.tokens_total() >= L * 8 / 10
    })
    .await;
    wait_until("a backlog of low chats", || {
        queues.depth(Priority::Low) >= 5
    })
    .await;
    let before = tags_seen(&s).len();
    for i in 0..K {
        chats.push(spawn("high", i));
        let high_seen = || {
            tags_seen(&s)
                .iter()
                .filter(|t| t.starts_with("high"))
                .count()
        };
        wait_until("the high chat to queue (or pass)", || {
            queues.depth(Priority::High) + high_seen() == i + 1
        })
        .await;
    }
    for i in 20..20 + K {
        chats.push(spawn("low", i));
    }
    let mut statuses = Vec::new();
    for c in chats {
        statuses.push(c.await.expect("a chat ran"));
    }
    let seen = tags_seen(&s);
    let after: Vec<&str> = seen[before..].iter().map(String::as_str).collect();
    let high_first = after
        .iter()
        .take(K)
        .filter(|t| t.starts_with("high"))
        .count();
    let report = format!(
        "seen before the high chats came: {before}; after, in order: {after:?}\n\
         provider 429s: {} tokens, {} requests; statuses {statuses:?}\n{}",
        s.mock.refused_for_tokens(),
        s.mock.refused_for_requests(),
        table(
            "priorities",
            &s.mock.token_window_counts(W),
            &s.mock.window_counts(W),
            |_| L
        ),
    );
    println!("{report}");

    assert!(
        high_first >= K - 1,
        "{high_first} high chats among the first {K} sent after they came\n{report}"
    );
    assert_eq!(
        s.mock.refused_for_tokens() + s.mock.refused_for_requests(),
        0,
        "{report}"
    );
    assert!(statuses.iter().all(|&st| st == 200), "{report}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

// === a chat larger than the window ===

/// All integers in `text`, with thousands separators (`,` `_` and spaces between digits)
/// read through.
fn integers(text: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, &ch) in chars.iter().enumerate() {
        if ch.is_ascii_digit() {
            cur.push(ch);
            continue;
        }
        let separator = matches!(ch, ',' | '_' | ' ' | '\u{202f}' | '\u{a0}')
            && !cur.is_empty()
            && chars.get(i + 1).is_some_and(char::is_ascii_digit)
            && chars[i + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count()
                == 3;
        if !separator && !cur.is_empty() {
            out.extend(cur.parse::<u64>().ok());
            cur.clear();
        }
    }
    out.extend(cur.parse::<u64>().ok());
    out
}

/// A chat whose estimate (its `max_tokens` alone) exceeds a whole window of tokens is
/// refused at once with an OpenAI-shaped 413 naming the limit and the estimate, while a
/// chat that fits waits for the budget, and the provider never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_larger_than_a_window_of_tokens_is_refused_at_once_with_413_and_never_sent() {
    let s = stack(
        provider(L, TokenCharge::Reserved, MockConfig::default()),
        &budgeted("reserved"),
    );
    let queues = &s.app.providers[0].limiter.queues;
    let short = |max_tokens: u64| {
        chat_body(
            &[("user", "hi".to_owned())],
            json!({ "max_tokens": max_tokens }),
        )
    };
    // 11,004 tokens as the provider counts them: the window has under 1,000 left.
    let a = s.chat(&[], &short(11_000)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // About 1,000: it fits only once the first has left the window, 6 s on.
    let waiting = spawn_chat(s.addr, &[], &short(1_000));
    wait_until("the chat that fits to wait for the budget", || {
        queues.len() == 1
    })
    .await;

    // The sidecar estimates 20,007 (7 for the prompt); the window holds 12,000.
    let big = s.chat(&[], &short(20_000)).await;
    let still_waiting = queues.len() == 1 && !waiting.is_finished();
    let text = big.text();
    println!(
        "413: {text}\nthe chat that fits still waiting: {still_waiting}; provider saw {} \
         requests",
        s.mock.requests()
    );
    assert_eq!(big.status, 413, "{text}");
    assert_eq!(big.headers["content-type"], "application/json", "{text}");
    let v = big.json();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "{text}");
    assert!(v["error"]["type"].as_str().is_some(), "{text}");
    assert!(v["error"]["code"].as_str().is_some(), "{text}");
    let figures = integers(message);
    assert!(
        figures.contains(&L) || figures.contains(&120_000),
        "the message names no limit ({L} a window or 120,000 a minute): {message}"
    );
    assert!(
        figures.iter().any(|n| (20_000..=20_100).contains(n)),
        "the message names no estimate (about 20,007): {message}"
    );
    assert!(
        still_waiting,
        "the 413 was not at once: it came after the chat queued before it"
    );
    assert_eq!(
        s.mock.requests(),
        1,
        "the provider saw more than the first chat"
    );

    assert_eq!(waiting.await.expect("the chat ran"), 200);
    assert_eq!(s.mock.requests(), 2);
    assert_eq!(
        (s.mock.too_large(), s.mock.refused_for_tokens()),
        (0, 0),
        "the provider refused for tokens"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

/// A chat parked for the budget when the token limit falls below its estimate (an admin
/// change: 12,000 a window to 3,000) gets the same 413 as at admission, naming the new
/// limit and its estimate, at once and never sent; a parked chat that still fits the
/// lower limit waits on and is sent. Counted once, as `tokens_too_large`, in both the
/// sidecar's and the queue's drops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_chat_the_token_limit_falls_below_is_refused_with_413_and_never_sent() {
    const ADMIN: &str = "Bearer adm-t0ken-tokens-19";
    let mut env = budgeted("reserved");
    env.push(("SIDECAR_ADMIN_TOKEN", &ADMIN[7..]));
    let s = stack(
        provider(L, TokenCharge::Reserved, MockConfig::default()),
        &env,
    );
    let queues = &s.app.providers[0].limiter.queues;
    let short = |max_tokens: u64| {
        chat_body(
            &[("user", "hi".to_owned())],
            json!({ "max_tokens": max_tokens }),
        )
    };
    let a = s.chat(&[], &short(11_000)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // About 5,007 and 2,007 tokens: neither fits the 1,000 left; both park.
    let (addr, body) = (s.addr, short(5_000));
    let big = tokio::spawn(async move {
        call(addr, req("POST", addr, "/v1/chat/completions", &[], &body)).await
    });
    wait_until("the large chat to park", || queues.len() == 1).await;
    let fits = spawn_chat(s.addr, &[], &short(2_000));
    wait_until("both chats to park", || queues.len() == 2).await;

    // 30,000 a minute: 3,000 a window.
    let changed = admin_patch(
        s.addr,
        ADMIN,
        r#"{"providers": {"nvidia": {"tokens_per_minute": 30000}}}"#,
    )
    .await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    let big = big.await.expect("the chat ran");
    let still_waiting = queues.len() == 1 && !fits.is_finished();
    big.assert_error(413, "tokens_exceed_limit");
    let message = big.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let figures = integers(&message);
    assert!(
        figures.contains(&3_000),
        "the message names no limit (3,000 a window): {message}"
    );
    assert!(
        figures.iter().any(|n| (5_000..=5_100).contains(n)),
        "the message names no estimate (about 5,007): {message}"
    );
    assert!(still_waiting, "the chat that fits 3,000 did not wait on");
    let metrics = s.scrape().await;
    for series in [
        format!("sidecar_dropped_total{{provider=\"{PROVIDER}\",reason=\"tokens_too_large\"}}"),
        format!(
            "sidecar_queue_dropped_total{{provider=\"{PROVIDER}\",priority=\"normal\",reason=\"tokens_too_large\"}}"
        ),
    ] {
        assert_eq!(sample(&metrics, &series), Some(1.0), "{series}");
    }

    // The first chat leaves the window (6 s): the one that fits goes.
    assert_eq!(fits.await.expect("the chat ran"), 200);
    assert_eq!(s.mock.requests(), 2, "the refused chat was never sent");
    assert_eq!(queues.counts().abandoned, 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

// === a token 429 ===

/// The provider allows half the tokens the sidecar is told (6,000 a window against
/// 12,000) and says so only in its token 429s (OpenAI's body: "on tokens per min (TPM):
/// Limit 60000"); no answer states a request limit (no quota headers), so a sidecar that
/// took a token 429 for a request one would learn a request limit from it. After at most
/// three token 429s, all in the first two windows, the sidecar draws none, holds its
/// token budget at the provider's limit (its 429 states it), and its request limit stays
/// the configured 100 throughout: a token 429 moves the token budget, not the request
/// rate. No probe falls in the run (probe interval 600 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_429_moves_the_token_budget_and_leaves_the_learned_request_limit_alone() {
    const HIDDEN: u64 = L / 2;
    let s = stack(
        provider(
            HIDDEN,
            TokenCharge::Reserved,
            MockConfig {
                no_quota_headers: true,
                ..MockConfig::default()
            },
        ),
        &sidecar(&[
            ("SIDECAR_TOKENS_PER_MINUTE", TPM),
            ("SIDECAR_TOKEN_CHARGE", "reserved"),
            ("SIDECAR_PROBE_INTERVAL", "600"),
        ]),
    );
    let t0 = judge_epoch(&s.mock);
    let sampler = sample_views(&s.app, t0);
    let clients = flood(s.addr, CLIENTS, 19_600, CAP, mixed_chat);
    until(t0, W * 6).await;
    let tokens = s.mock.token_window_counts(W);
    let requests = s.mock.window_counts(W);
    let (refused_tokens, refused_requests) =
        (s.mock.refused_for_tokens(), s.mock.refused_for_requests());
    let tally = clients.stop(Duration::from_secs(30)).await;
    let samples = sampler.stop().await;
    let metrics = s.scrape().await;
    let learned_rpm = sample(
        &metrics,
        &format!("sidecar_limit_learned_rpm{{provider=\"{PROVIDER}\"}}"),
    );
    let token_limit = sample(
        &metrics,
        &format!("sidecar_token_budget_limit{{provider=\"{PROVIDER}\"}}"),
    );
    let report = table(
        &format!("hidden {HIDDEN} tokens per 6 s, the sidecar told {L}"),
        &tokens,
        &requests,
        |_| HIDDEN,
    );
    // The learned request limit and the one the window guard enforces, at every sample.
    let learned: Vec<u32> = samples
        .iter()
        .flat_map(|(_, v)| [v.learned, v.limit])
        .collect();
    let (lowest, highest) = (
        learned.iter().min().copied().unwrap_or(0),
        learned.iter().max().copied().unwrap_or(0),
    );
    let late_refusals: u64 = tokens.iter().skip(2).map(|t| t.refused).sum();
    let full = full_windows(&tokens, 2);
    let mean = mean_tokens(full);
    println!(
        "{report}token 429s {refused_tokens} ({late_refusals} after window 1), request 429s \
         {refused_requests}; mean of windows 2..: {mean:.0}\n\
         learned and enforced request limit: {lowest}..={highest} per window over {} samples, {learned_rpm:?} \
         RPM in /metrics at the end\n{}",
        samples.len(),
        tally.summary()
    );

    let mut broken = Vec::new();
    if refused_tokens == 0 {
        broken.push("no token 429 at all: the hidden limit never bound".to_owned());
    }
    if refused_tokens > 3 {
        broken.push(format!("{refused_tokens} token 429s, more than 3"));
    }
    if late_refusals > 0 {
        broken.push(format!(
            "{late_refusals} token 429s after the second window"
        ));
    }
    if refused_requests > 0 {
        broken.push(format!("{refused_requests} 429s of the request limit"));
    }
    if (lowest, highest) != (N as u32, N as u32) {
        broken.push(format!(
            "the request limit moved: {lowest}..={highest} per window, not {N}"
        ));
    }
    if learned_rpm != Some(per_minute(N)) {
        broken.push(format!(
            "sidecar_limit_learned_rpm {learned_rpm:?} at the end, not {}",
            per_minute(N)
        ));
    }
    // What the token 429 taught: the budget is the provider's limit, exactly (its message
    // states it). How full the later windows are is the floods' to prove: with a few
    // clients of large requests here, it follows how fast the machine lets them ask.
    if token_limit != Some(HIDDEN as f64) {
        broken.push(format!(
            "sidecar_token_budget_limit {token_limit:?} at the end, not the provider's {HIDDEN}"
        ));
    }
    assert!(broken.is_empty(), "{}\n{report}", broken.join("\n"));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

// === the harness's readers ===

#[test]
fn the_harness_reads_figures_through_separators_and_token_series_in_any_label_order() {
    assert_eq!(
        integers("Limit 12,000 tokens, estimate 20 007; 1,2 and 120000."),
        vec![12_000, 20_007, 1, 2, 120_000]
    );
    let text = "# TYPE sidecar_tokens counter\n\
                sidecar_tokens_total{provider=\"nvidia\",kind=\"settled\"} 85448\n\
                sidecar_tokens_total{kind=\"prompt\",provider=\"nvidia\"} 40894\n\
                sidecar_tokens_total{provider=\"other\",kind=\"completion\"} 1\n";
    assert_eq!(tokens_metric(text, "settled"), Some(85_448.0));
    assert_eq!(tokens_metric(text, "prompt"), Some(40_894.0));
    assert_eq!(tokens_metric(text, "completion"), None);
}
