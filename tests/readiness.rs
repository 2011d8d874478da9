//! Readiness costs no quota it was not given: the `/readyz` probe (`GET <upstream>/models`
//! with the provider's key) is admitted like a request but never waits. It takes a token
//! and a window slot only when one is free and nobody waits, is counted in the window
//! guard, and its answer teaches the limit like a request's; with none free it is not
//! sent and the last verdict stands. Every `/readyz` answer says what it did (`"probe"`).
//!
//! Verdicts are counts: the simulated provider's own (requests, 429s, the most it
//! admitted in any rolling window) and the sidecar's window guard. Where order matters
//! the limiter runs on a `ManualClock`, so a token or a window slot frees exactly when
//! the test advances it; nothing asserts a wall-clock wait.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvidia_sidecar::clock::Clock;
use nvidia_sidecar::limiter::PauseReason;
use nvidia_sidecar::mock::MockConfig;

/// One second in clock nanoseconds.
const S: u64 = 1_000_000_000;

/// The sidecar on a 6 s provider window at `rate_rpm` (`rate_rpm / 10` sends a window),
/// with a burst of a whole window and `/readyz` verdicts cached 0.5 s.
fn sidecar<'a>(rate_rpm: &'a str, burst: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("SIDECAR_PROVIDER_WINDOW", "6"),
        ("SIDECAR_RATE_RPM", rate_rpm),
        ("SIDECAR_BUCKET_CAPACITY", burst),
        ("SIDECAR_READY_CACHE", "0.5"),
        ("SIDECAR_RETREAT_DEFAULT_PAUSE", "0.1"),
        ("SIDECAR_WINDOW_MARGIN_FLOOR", "0.02"),
        ("SIDECAR_PROBE_INTERVAL", "600"),
        ("SIDECAR_REQUEST_TIMEOUT", "20"),
        ("SIDECAR_QUEUE_MAX_SIZE", "64"),
        ("SIDECAR_SHUTDOWN_GRACE", "1"),
    ]
}

/// A provider with no limit of its own, counting over 6 s.
fn unlimited() -> MockConfig {
    MockConfig {
        rpm: 0.0,
        window_secs: 6.0,
        ..MockConfig::default()
    }
}

/// `GET /readyz`, answered at once: a readiness check never waits for a token (the
/// manual clock does not move while it runs, so a check that waited would time out).
async fn readyz(s: &Stack) -> Answer {
    tokio::time::timeout(
        Duration::from_secs(5),
        call(s.addr, req("GET", s.addr, "/readyz", &[], "")),
    )
    .await
    .expect("/readyz answers without waiting")
}

fn probes_seen(s: &Stack) -> usize {
    s.mock
        .seen()
        .iter()
        .filter(|r| r.path == "/v1/models")
        .count()
}

fn in_window(s: &Stack) -> u32 {
    let now = s.app.clock.now_nanos();
    s.app.providers[0].snapshot(now).pacing.sent_in_window
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_hammering_beside_traffic_at_the_limit_never_push_the_provider_over() {
    // The provider: 10 in any rolling 2 s, bare 429s (nothing to learn from headers).
    // The sidecar paces to the same 10 a window. Real requests arrive open loop at 8 a
    // window while two clients ask /readyz every 3 ms: the verdict cache (5 ms) is far
    // shorter than the gap between real answers (250 ms), so a probe is tried between
    // every two requests, and probes take what the requests leave until the window
    // holds the limit. A probe that bypassed the limiter would put hundreds in it.
    const N: usize = 10;
    const REAL: usize = 8;
    let w = Duration::from_secs(2);
    let s = stack(
        MockConfig {
            rpm: 300.0,
            window_secs: w.as_secs_f64(),
            no_headers_at_all: true,
            ..MockConfig::default()
        },
        &[
            ("SIDECAR_PROVIDER_WINDOW", "2"),
            ("SIDECAR_RATE_RPM", "300"),
            ("SIDECAR_BUCKET_CAPACITY", "1"),
            ("SIDECAR_READY_CACHE", "0.005"),
            // The jitter between a send's stamp and the provider's count on a loaded
            // 2-core machine (see tests/pacing_scopes.rs `judged`).
            ("SIDECAR_WINDOW_MARGIN_FLOOR", "0.2"),
            ("SIDECAR_RETREAT_DEFAULT_PAUSE", "0.1"),
            ("SIDECAR_PROBE_INTERVAL", "600"),
            ("SIDECAR_UPSTREAM_429_RETRIES", "0"),
            ("SIDECAR_REQUEST_TIMEOUT", "20"),
            ("SIDECAR_QUEUE_MAX_SIZE", "256"),
            ("SIDECAR_WORKERS", "2"),
            ("SIDECAR_SHUTDOWN_GRACE", "1"),
        ],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let checks: Vec<_> = (0..2)
        .map(|_| {
            let (addr, stop) = (s.addr, Arc::clone(&stop));
            tokio::spawn(async move {
                let mut seen: std::collections::BTreeMap<String, u64> = Default::default();
                while !stop.load(Ordering::Relaxed) {
                    let r = call(addr, req("GET", addr, "/readyz", &[], "")).await;
                    assert_eq!(r.status, 200, "{}", r.text());
                    let how = r.json()["probe"].as_str().unwrap_or("(none)").to_owned();
                    *seen.entry(how).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
                seen
            })
        })
        .collect();
    let answered = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut every = tokio::time::interval(w / REAL as u32);
    for _ in 0..3 * REAL {
        every.tick().await;
        let (addr, answered) = (s.addr, Arc::clone(&answered));
        clients.push(tokio::spawn(async move {
            let a = call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT)).await;
            assert_eq!(a.status, 200, "{}", a.text());
            answered.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for c in clients {
        c.await.expect("a client ran");
    }
    stop.store(true, Ordering::Relaxed);
    let mut how = std::collections::BTreeMap::<String, u64>::new();
    for c in checks {
        for (k, v) in c.await.expect("a readiness client ran") {
            *how.entry(k).or_default() += v;
        }
    }
    let report = format!(
        "readiness answers by what they did: {how:?}; provider: {} requests ({} probes), {} 429s, at most {} in a rolling window",
        s.mock.requests(),
        probes_seen(&s),
        s.mock.rate_limited(),
        s.mock.max_in_rolling(w),
    );
    println!("{report}");

    assert_eq!(answered.load(Ordering::Relaxed), 3 * REAL as u64);
    assert_eq!(s.mock.rate_limited(), 0, "{report}");
    assert!(s.mock.max_in_rolling(w) <= N, "{report}");
    // Contention happened: probes went out between requests, and others found no
    // token free (or a probe already on its way) and were not sent.
    assert!(how.get("sent").copied().unwrap_or(0) >= 1, "{report}");
    assert_eq!(probes_seen(&s) as u64, how["sent"], "{report}");
    assert!(
        how.get("skipped_no_token").copied().unwrap_or(0) >= 1,
        "{report}"
    );
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sidecars_probes_take_tokens_and_count_in_the_window() {
    // 20 RPM over 6 s: 2 a window.
    let (s, clock) = manual_stack_at(10 * S, unlimited(), &sidecar("20", "2"));
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    assert_eq!(limiter.guard.limit(), 2);

    let r = readyz(&s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["probe"], "sent", "{}", r.text());
    assert_eq!(r.json()["detail"], "answered the probe");
    assert_eq!((probes_seen(&s), in_window(&s)), (1, 1));
    // Within the verdict cache: answered again, nothing sent.
    let r = readyz(&s).await;
    assert_eq!(r.json()["probe"], "cached", "{}", r.text());
    assert_eq!((probes_seen(&s), in_window(&s)), (1, 1));

    clock.advance(Duration::from_secs(1));
    assert_eq!(readyz(&s).await.json()["probe"], "sent");
    assert_eq!((probes_seen(&s), in_window(&s)), (2, 2));

    // The probes filled the window: the next one is not sent, and a real request waits
    // for the window rather than going over it.
    clock.advance(Duration::from_secs(1));
    let r = readyz(&s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["probe"], "skipped_no_token", "{}", r.text());
    assert_eq!((probes_seen(&s), in_window(&s)), (2, 2));
    let chat = s.park_chat(&[], CHAT).await;
    assert_eq!(s.mock.requests(), 2);
    clock.advance(Duration::from_secs(7));
    assert_eq!(chat.await.unwrap(), 200);
    assert_eq!(s.mock.requests(), 3);
    assert_eq!(s.mock.rate_limited(), 0);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_to_a_probe_teaches_the_limit_like_any_429() {
    // The sidecar allows 3 a window; the provider, 1 a minute, with bare 429s. The
    // second probe draws a 429 on send 2 of its window: the limit is 1, learned from
    // the probe as from a request, so the third is not sent into a full window.
    let (s, clock) = manual_stack_at(
        10 * S,
        MockConfig {
            rpm: 1.0,
            window_secs: 60.0,
            no_headers_at_all: true,
            ..MockConfig::default()
        },
        &sidecar("30", "3"),
    );
    let p = &s.app.providers[0];
    assert_eq!(p.limiter.guard.limit(), 3);

    let r = readyz(&s).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["probe"].clone()),
        (200, "sent".into())
    );
    clock.advance(Duration::from_secs(1));
    let r = readyz(&s).await;
    // A 429 still proves the upstream is there.
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["probe"], "sent", "{}", r.text());
    assert_eq!(s.mock.rate_limited(), 1);
    assert_eq!(
        p.stats.snapshot().upstream_429,
        1,
        "counted like a request's 429"
    );
    wait_until("the probe's 429 to teach the limit", || {
        p.limiter.pacing_view(clock.now_nanos()).learned == 1
    })
    .await;

    clock.advance(Duration::from_secs(1));
    let r = readyz(&s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["probe"], "skipped_no_token", "{}", r.text());
    assert_eq!(s.mock.requests(), 2);
    assert_eq!(
        s.mock.rate_limited(),
        1,
        "no probe went into the full window"
    );
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_token_free_readiness_answers_from_the_last_real_answer_without_queueing() {
    let (s, clock) = manual_stack_at(10 * S, unlimited(), &sidecar("20", "2"));
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    // Two real requests fill the window; a third waits for it.
    s.chats_ok(2).await;
    let waiting = s.park_chat(&[], CHAT).await;
    // Past the verdict cache and the answers' freshness, inside the window.
    clock.advance(Duration::from_secs(1));

    let r = readyz(&s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["probe"], "skipped_no_token", "{v}");
    assert!(
        v["detail"].as_str().unwrap().contains("answered a request"),
        "{v}"
    );
    // It did not queue, nor take the waiting request's place.
    assert_eq!(limiter.queues.len(), 1);
    assert_eq!(s.mock.requests(), 2);
    clock.advance(Duration::from_secs(7));
    assert_eq!(waiting.await.unwrap(), 200);
    assert_eq!(s.mock.requests(), 3);
    assert_eq!(probes_seen(&s), 0);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_probe_keeps_the_last_probes_verdict() {
    // One send a window; the upstream answers everything with a 500.
    let (s, clock) = manual_stack_at(
        10 * S,
        MockConfig {
            error_rate: 1.0,
            ..unlimited()
        },
        &sidecar("10", "1"),
    );
    let r = readyz(&s).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["probe"], "sent", "{}", r.text());
    assert!(r.json()["reason"].as_str().unwrap().contains("HTTP 500"));
    // The probe took the window's one slot: the next is not sent, and the upstream is
    // still taken as failing, not ready for want of a token.
    clock.advance(Duration::from_secs(1));
    let r = readyz(&s).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["probe"], "skipped_no_token", "{}", r.text());
    assert!(r.json()["reason"].as_str().unwrap().contains("HTTP 500"));
    assert_eq!(s.mock.requests(), 1);
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_answered_and_no_token_free_is_ready_and_says_it_was_not_probed() {
    let (s, clock) = manual_stack_at(10 * S, unlimited(), &sidecar("20", "2"));
    // Admission paused (as after a provider's Retry-After): no token for anyone.
    s.app.providers[0]
        .limiter
        .pause(clock.now_nanos() + 60 * S, PauseReason::RetryAfter);
    let r = readyz(&s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.json()["probe"], "skipped_no_token", "{}", r.text());
    assert!(r.json()["detail"].as_str().unwrap().contains("not probed"));
    assert_eq!(s.mock.requests(), 0);
    s.stop();
}
