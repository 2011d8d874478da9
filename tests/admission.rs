//! Admission control end to end, through the proxy against the simulated upstream.
//! The limiter runs on a `ManualClock` where order matters, so tokens appear exactly
//! when the test says; waits are for observed events (queue depth, requests seen).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvidia_sidecar::clock::{Clock, ManualClock, MonotonicClock};
use nvidia_sidecar::limiter::bucket::{interval_nanos, slack_nanos};
use nvidia_sidecar::mock::MockConfig;
use nvidia_sidecar::priority::Priority;

fn chat_for(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[]}}"#)
}

fn seen_models(s: &Stack) -> Vec<String> {
    s.mock
        .seen()
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            v["model"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_backlog_high_is_served_before_normal_before_low_and_fifo_within_each() {
    let (s, clock) = paced_stack(&[]);
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    // The one token goes to the first request.
    assert_eq!(s.chat(&[], &chat_for("first")).await.status, 200);
    // Park nine, lowest priority first, one at a time so arrival order is known.
    let mut clients = Vec::new();
    for (n, p) in [
        "low", "low", "low", "normal", "normal", "normal", "high", "high", "high",
    ]
    .iter()
    .enumerate()
    {
        let body = chat_for(&format!("{p}-{n}"));
        clients.push(s.park_chat(&[("x-priority", p)], &body).await);
    }
    assert_eq!(limiter.queues.depth(Priority::High), 3);
    // One token per second of the manual clock: release them one by one.
    s.release(&clock, Duration::from_secs(1), 9).await;
    for c in clients {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(
        seen_models(&s)[1..],
        [
            "high-6", "high-7", "high-8", "normal-3", "normal-4", "normal-5", "low-0", "low-1",
            "low-2"
        ]
    );
    assert_eq!(limiter.queues.len(), 0);
    let counts = limiter.queues.counts();
    assert_eq!(
        (counts.enqueued, counts.dequeued, counts.abandoned),
        (9, 9, 0)
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_queued_never_reaches_the_upstream_and_leaves_depth_zero() {
    let (s, clock) = paced_stack(&[]);
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let client = s.park_chat(&[], &chat_for("gone")).await;
    client.abort();
    wait_until("the abandoned request to leave the queue", || {
        limiter.queues.is_empty()
    })
    .await;
    assert_eq!(limiter.queues.counts().abandoned, 1);
    assert_eq!(limiter.queues.depth(Priority::Normal), 0);
    // Its token was never spent: a second later exactly one is there for the next one.
    clock.advance(Duration::from_secs(1));
    assert_eq!(limiter.bucket.tokens(clock.now_nanos()), 1.0);
    assert_eq!(s.chat(&[], &chat_for("next")).await.status, 200);
    assert_eq!(seen_models(&s), ["meta/llama-3.1-8b-instruct", "next"]);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after_from_the_queue_ahead() {
    let (s, clock) = paced_stack(&[("SIDECAR_QUEUE_MAX_SIZE", "2")]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let parked = s.park(2).await;
    let refused = s.chat(&[], CHAT).await;
    refused.assert_error(429, "queue_full");
    // Two ahead plus itself, one a second.
    assert_eq!(refused.headers["retry-after"], "3");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    let stats = s.app.providers[0].stats.snapshot();
    assert_eq!((stats.queue_full, stats.rate_limited), (1, 1));
    s.release(&clock, Duration::from_secs(1), 2).await;
    for p in parked {
        assert_eq!(p.await.unwrap(), 200);
    }
    assert_eq!(
        s.mock.requests(),
        3,
        "the refused request never reached the upstream"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fallback_on_a_request_the_queue_cannot_take_goes_unmetered() {
    let (s, _clock) = paced_stack(&[
        ("SIDECAR_QUEUE_MAX_SIZE", "0"),
        ("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", "true"),
    ]);
    s.chats_ok(3).await;
    let st = s.app.providers[0].stats.snapshot();
    assert_eq!(
        (st.limited, st.passthrough, st.queue_full, st.rate_limited),
        (1, 2, 2, 0)
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_fallback_off_the_same_request_gets_429() {
    let (s, _clock) = paced_stack(&[("SIDECAR_QUEUE_MAX_SIZE", "0")]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    s.chat(&[], CHAT).await.assert_error(429, "queue_full");
    assert_eq!(s.mock.requests(), 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallback_goes_to_the_providers_fallback_upstream_when_one_is_set() {
    let main = common::mock(unlimited_mock());
    let fallback = common::mock(unlimited_mock());
    let toml = format!(
        "fallback_enabled_passthrough = true\nqueue_max_size = 0\nrate_rpm = 60\nbucket_capacity = 1\n\
         [[providers]]\nname = \"nvidia\"\nupstream_url = \"{}\"\nfallback_url = \"{}\"\napi_key = \"nvapi-main-key-123\"\n",
        main.base_url(),
        fallback.base_url()
    );
    let cfg = config_from_toml(&toml);
    let clock = ManualClock::new();
    let app = nvidia_sidecar::app::App::with_clock(cfg, Arc::new(clock));
    let sidecar = nvidia_sidecar::sidecar::start(Arc::clone(&app)).unwrap();
    let addr = sidecar.local_addr;
    for _ in 0..3 {
        assert_eq!(
            call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT))
                .await
                .status,
            200
        );
    }
    assert_eq!(main.requests(), 1);
    assert_eq!(fallback.requests(), 2);
    assert_eq!(
        fallback.seen()[0].headers["authorization"],
        "Bearer nvapi-main-key-123"
    );
    assert_ledger_at(addr, sidecar.metrics_addr, 3).await;
    sidecar.stop();
    main.stop();
    fallback.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_priority_request_past_its_deadline_is_dropped_with_503() {
    // 1.5 s is enough for the one token ahead (1 s), but the manual clock never moves.
    let (s, _clock) = paced_stack(&[("SIDECAR_LOW_PRIORITY_TIMEOUT", "1.5")]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let a = s.chat(&[("x-priority", "low")], CHAT).await;
    a.assert_error(503, "low_priority_timeout");
    let st = s.app.providers[0].stats.snapshot();
    assert_eq!(st.dropped_low_priority, 1);
    assert_eq!(s.app.providers[0].limiter.queues.len(), 0);
    assert_eq!(s.mock.requests(), 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_priority_request_past_its_deadline_takes_the_passthrough_when_fallback_is_on() {
    let (s, _clock) = paced_stack(&[
        ("SIDECAR_LOW_PRIORITY_TIMEOUT", "1.5"),
        ("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", "true"),
    ]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let a = s.chat(&[("x-priority", "low")], CHAT).await;
    assert_eq!(a.status, 200);
    let st = s.app.providers[0].stats.snapshot();
    assert_eq!((st.dropped_low_priority, st.passthrough), (1, 1));
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_queue_cannot_serve_before_its_deadline_is_refused_at_once_with_retry_after()
{
    // One token a second: with 0.3 s to live, the next request could not be served in
    // time, so it is told at once when to come back instead of waiting for a 504.
    let (s, _clock) = paced_stack(&[("SIDECAR_REQUEST_TIMEOUT", "0.3")]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let started = std::time::Instant::now();
    let a = s.chat(&[], CHAT).await;
    a.assert_error(429, "queue_beyond_deadline");
    assert_eq!(a.headers["retry-after"], "1");
    assert!(
        started.elapsed() < std::time::Duration::from_millis(300),
        "not after the deadline"
    );
    let st = s.app.providers[0].stats.snapshot();
    assert_eq!((st.dropped_timeout, st.rate_limited), (0, 1));
    assert_eq!(s.app.providers[0].limiter.queues.len(), 0);
    // A low-priority one is measured against its own deadline; with fallback it goes
    // through at once.
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
    let (s, _clock) = paced_stack(&[
        ("SIDECAR_LOW_PRIORITY_TIMEOUT", "0.2"),
        ("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", "true"),
    ]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    assert_eq!(s.chat(&[("x-priority", "low")], CHAT).await.status, 200);
    assert_eq!(s.app.providers[0].stats.snapshot().passthrough, 1);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_the_request_timeout_is_a_504() {
    let (s, _clock) = paced_stack(&[("SIDECAR_REQUEST_TIMEOUT", "1.5")]);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    s.chat(&[], CHAT).await.assert_error(504, "queue_timeout");
    assert_eq!(s.app.providers[0].stats.snapshot().dropped_timeout, 1);
    assert_eq!(s.app.providers[0].limiter.queues.len(), 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_storm_teaches_the_limit_and_clients_still_get_200s() {
    // The provider allows 5 requests per rolling second (300 RPM); the sidecar is
    // configured twice as fast, so the provider starts refusing. (Without quota
    // headers: with them, `x-ratelimit-remaining: 0` would hold the sidecar back first.)
    let s = stack_over_a_stricter_provider(300.0);
    let clients: Vec<_> = (0..20)
        .map(|n| spawn_chat(s.addr, &[], &chat_for(&format!("m{n}"))))
        .collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), 200, "the client saw the provider's 429");
    }
    let p = &s.app.providers[0];
    let st = p.stats.snapshot();
    assert!(s.mock.rate_limited() > 0, "the storm never happened");
    assert_eq!(st.upstream_429, s.mock.rate_limited());
    assert!(st.retries >= st.upstream_429);
    let now = s.app.clock.now_nanos();
    let view = p.limiter.retreat_view(now);
    assert!(view.upstream_429_last_minute >= 1);
    let pacing = p.limiter.pacing_view(now);
    assert!(
        pacing.learned <= 5 && pacing.source != nvidia_sidecar::limiter::Source::Config,
        "a 429 teaches the limit: {pacing:?}"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_at_the_providers_rate_gets_no_429_and_never_exceeds_the_bound() {
    // Provider and sidecar both at 1200 RPM (20/s): pacing must keep every rolling
    // minute within the provider's limit.
    let s = stack(
        MockConfig {
            rpm: 1200.0,
            ..MockConfig::default()
        },
        &[
            ("SIDECAR_RATE_RPM", "1200"),
            ("SIDECAR_BUCKET_CAPACITY", "1"),
            ("SIDECAR_QUEUE_MAX_SIZE", "4"),
        ],
    );
    let clock = MonotonicClock::new();
    let start = clock.now_nanos();
    let flood = Duration::from_secs(4);
    let mut clients = Vec::new();
    for _ in 0..12 {
        let addr = s.addr;
        clients.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            let until = tokio::time::Instant::now() + flood;
            while tokio::time::Instant::now() < until {
                match call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT))
                    .await
                    .status
                    .as_u16()
                {
                    200 => ok += 1,
                    429 => refused += 1,
                    other => panic!("unexpected status {other}"),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for c in clients {
        let (o, r) = c.await.unwrap();
        ok += o;
        refused += r;
    }
    let elapsed = Duration::from_nanos(clock.now_nanos() - start).as_secs_f64();
    assert_eq!(s.mock.rate_limited(), 0, "the provider answered 429");
    assert_eq!(
        ok,
        s.mock.requests(),
        "every admitted request reached the upstream once"
    );
    // The bucket's guarantee: rate × (elapsed + slack) + capacity.
    let slack = slack_nanos(interval_nanos(1200.0)) as f64 / 1e9;
    let bound = 20.0 * (elapsed + slack) + 1.0;
    assert!(
        (ok as f64) <= bound,
        "admitted {ok} > bound {bound:.1} over {elapsed:.2} s"
    );
    assert!(refused > 0, "the flood never filled the queue");
    eprintln!(
        "flood: admitted {ok} in {elapsed:.2} s = {:.1}% of 20/s; refused {refused}",
        ok as f64 / (20.0 * elapsed) * 100.0
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}
