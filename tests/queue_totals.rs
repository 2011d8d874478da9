//! The queue's totals, as the Python service showed them (`total_enqueued`,
//! `total_dequeued`, `total_dropped`): in `/metrics` as `sidecar_queue_enqueued_total`,
//! `sidecar_queue_dequeued_total` and `sidecar_queue_dropped_total{reason}` per provider
//! and priority, and in the dashboard snapshot's `queue` object. Every way out of the
//! queue is counted once, so `enqueued = dequeued + dropped + depth`.
//!
//! The limiter runs on a `ManualClock`: a token appears only when the test advances it,
//! so which request is granted and which one waits until a deadline is decided by the
//! test, never by timing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvidia_sidecar::limiter::{DropReason, QueueCounts};
use nvidia_sidecar::priority::Priority;

/// `sample`, failing with the queue's lines when the series is missing.
fn value(text: &str, series: &str) -> u64 {
    sample(text, series).unwrap_or_else(|| {
        let queue: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sidecar_queue"))
            .collect();
        panic!("no series {series}; the queue's:\n{}", queue.join("\n"))
    }) as u64
}

/// The queue's totals in a scrape, per priority, checked against each other and the
/// depth gauge: `enqueued = dequeued + dropped + depth`.
fn flow_in(text: &str, priority: Priority) -> (u64, u64, [u64; 6]) {
    let labels = format!("provider=\"nvidia\",priority=\"{}\"", priority.as_str());
    let enqueued = value(text, &format!("sidecar_queue_enqueued_total{{{labels}}}"));
    let dequeued = value(text, &format!("sidecar_queue_dequeued_total{{{labels}}}"));
    let dropped = DropReason::ALL.map(|why| {
        value(
            text,
            &format!(
                "sidecar_queue_dropped_total{{{labels},reason=\"{}\"}}",
                why.as_str()
            ),
        )
    });
    let depth = value(text, &format!("sidecar_queue_depth{{{labels}}}"));
    assert_eq!(
        enqueued,
        dequeued + dropped.iter().sum::<u64>() + depth,
        "{priority:?}: in = out + dropped + waiting"
    );
    (enqueued, dequeued, dropped)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_totals_count_every_way_out_once_in_metrics_and_the_snapshot() {
    // One token a second of the manual clock, no burst.
    let (s, clock) = paced_stack(&[
        ("SIDECAR_REQUEST_TIMEOUT", "3"),
        ("SIDECAR_LOW_PRIORITY_TIMEOUT", "1.5"),
        ("SIDECAR_SNAPSHOT_INTERVAL", "0.05"),
    ]);
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    let queues = &limiter.queues;
    let parked = |n: u64| move || queues.counts().enqueued == n;

    // The one token goes at once: the fast path never enters the queue.
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    assert_eq!(
        limiter.queues.counts(),
        QueueCounts {
            max: 64,
            ..QueueCounts::default()
        }
    );

    // Parked, one at a time: a low one (its 1.5 s deadline will pass), a normal one (the
    // request timeout will pass), a normal one whose client leaves, and two high ones.
    let low = spawn_chat(s.addr, &[("x-priority", "low")], CHAT);
    wait_until("the low request to park", parked(1)).await;
    let times_out = spawn_chat(s.addr, &[], CHAT);
    wait_until("the normal request to park", parked(2)).await;
    let leaves = spawn_chat(s.addr, &[], CHAT);
    wait_until("the third request to park", parked(3)).await;
    leaves.abort();
    wait_until("the abandoned request to leave the queue", || {
        limiter.queues.counts().dropped(DropReason::ClientGone) == 1
    })
    .await;
    let high: Vec<_> = (0..2)
        .map(|_| spawn_chat(s.addr, &[("x-priority", "high")], CHAT))
        .collect();
    wait_until("both high requests to park", parked(5)).await;

    // Two tokens: the high ones go, ahead of the normal one still waiting.
    s.release(&clock, Duration::from_secs(1), 2).await;
    for h in high {
        assert_eq!(h.await.unwrap(), 200);
    }
    // With two ahead of it and a 1.5 s deadline, another low one is taken out again at
    // once (429 queue_beyond_deadline): it was parked, so it counts as dropped.
    let refused = s.chat(&[("x-priority", "low")], CHAT).await;
    refused.assert_error(429, "queue_beyond_deadline");
    // No more tokens: the first low request and then the normal one reach their
    // deadlines.
    assert_eq!(low.await.unwrap(), 503, "low_priority_timeout");
    assert_eq!(times_out.await.unwrap(), 504, "queue_timeout");
    assert_eq!(
        s.mock.requests(),
        3,
        "only the first and the high ones were sent"
    );

    let c = limiter.queues.counts();
    assert_eq!((c.enqueued, c.dequeued, c.abandoned, c.total), (6, 2, 4, 0));

    let text = s.scrape().await;
    let (enq, deq, dropped) = flow_in(&text, Priority::High);
    assert_eq!((enq, deq, dropped), (2, 2, [0; 6]));
    let (enq, deq, dropped) = flow_in(&text, Priority::Normal);
    assert_eq!((enq, deq), (2, 0));
    assert_eq!(
        dropped,
        [1, 0, 1, 0, 0, 0],
        "client_gone, low_priority_deadline, timeout, beyond_deadline, shutdown, tokens_too_large"
    );
    let (enq, deq, dropped) = flow_in(&text, Priority::Low);
    assert_eq!((enq, deq), (2, 0));
    assert_eq!(dropped, [0, 1, 0, 1, 0, 0]);
    // The requests the sidecar did not send, by why: the one whose client left is there
    // once (the queue's own count), the one refused at once counts as queue_full.
    for (reason, want) in [
        ("queue_full", 1),
        ("low_priority_deadline", 1),
        ("timeout", 1),
        ("client_gone", 1),
    ] {
        assert_eq!(
            value(
                &text,
                &format!("sidecar_dropped_total{{provider=\"nvidia\",reason=\"{reason}\"}}")
            ),
            want,
            "{reason}"
        );
    }

    // The dashboard snapshot says the same.
    let v = snapshot_until(s.addr, "the totals", |v| {
        let q = &v["providers"][0]["queue"];
        q["enqueued"] == 6 && q["dropped"] == 4
    })
    .await;
    assert_eq!(
        v["providers"][0]["queue"],
        serde_json::json!({
            "depth": {"high": 0, "normal": 0, "low": 0},
            "total": 0,
            "max": 64,
            "enqueued": 6,
            "dequeued": 2,
            "dropped": 4,
            "dropped_by_reason": {
                "beyond_deadline": 1,
                "client_gone": 1,
                "low_priority_deadline": 1,
                "shutdown": 0,
                "timeout": 1,
                "tokens_too_large": 0,
            },
        })
    );
    // And the page's queue card has a place for them.
    let page = call(s.addr, req("GET", s.addr, "/api/dashboard", &[], "")).await;
    for needle in [
        "queue-flow-{p}",
        "queue.enqueued",
        "queue.dequeued",
        "queue.dropped",
    ] {
        assert!(page.text().contains(needle), "{needle} not on the page");
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_parked_when_the_grace_period_ends_is_dropped_for_shutdown() {
    let (s, _clock) = paced_stack(&[]);
    let limiter = Arc::clone(&s.app.providers[0].limiter);
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let waiting = s.park_chat(&[], CHAT).await;
    s.app.shutdown.hard_stop.cancel();
    assert_eq!(waiting.await.unwrap(), 503, "shutting_down");
    let c = limiter.queues.counts();
    assert_eq!((c.enqueued, c.dequeued, c.total), (1, 0, 0));
    assert_eq!(c.dropped(DropReason::Shutdown), 1);
    assert_eq!(c.abandoned, 1, "counted once: not also as a client gone");
    let text = nvidia_sidecar::exposition::render(&s.app);
    assert_eq!(
        value(
            &text,
            "sidecar_queue_dropped_total{provider=\"nvidia\",priority=\"normal\",reason=\"shutdown\"}"
        ),
        1
    );
    assert_eq!(
        value(
            &text,
            "sidecar_dropped_total{provider=\"nvidia\",reason=\"client_gone\"}"
        ),
        0
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_put_back_after_an_upstream_429_is_enqueued_again_and_leaves_once_each_time() {
    // The provider allows one request per rolling second; the sidecar would send ten.
    let s = stack_over_a_stricter_provider(60.0);
    let clients: Vec<_> = (0..3).map(|_| spawn_chat(s.addr, &[], CHAT)).collect();
    for c in clients {
        assert_eq!(c.await.unwrap(), 200, "the 429s were absorbed");
    }
    let p = &s.app.providers[0];
    let st = p.stats.snapshot();
    let retries = st.retries;
    assert!(st.upstream_429 > 0, "the provider never refused");
    assert_eq!(retries, st.upstream_429, "each 429 was retried once");
    let c = p.limiter.queues.counts();
    assert_eq!(c.total, 0);
    assert_eq!(c.abandoned, 0);
    assert_eq!(c.enqueued, c.dequeued, "each parking ended with a grant");
    assert!(
        c.enqueued >= retries,
        "each retry parks again: {c:?}, {retries} retries"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}
