//! How long the queue ahead holds a request when the token budget binds: `Retry-After`
//! of a refusal, and the estimate a parked request's deadline is checked against, count
//! the tokens ahead of it and its own at the budget's rate (the limit per span).

use super::*;
use crate::limiter::queue::QueueFull;

/// Spans of the budget: the window guard's 60 s + 0.3 s margin.
const SPAN_MS: u64 = 60_300;

#[test]
fn retry_after_counts_the_tokens_ahead_and_its_own_at_the_budgets_rate() {
    let l = limiter(6_000.0, 1_000, 4).with_token_budget(10_000);
    let _sent = send(&l, 8_000, 0);
    let _parked: Vec<Ticket> = (0..4)
        .map(|_| queued(l.admit(Priority::Normal, cost(5_000), 0)))
        .collect();
    let full = match l.admit(Priority::Normal, cost(5_000), 0) {
        Decision::Full(f) => f,
        other => panic!("expected Full, got {other:?}"),
    };
    assert_eq!(
        full,
        QueueFull {
            ahead: 4,
            tokens: 20_000
        }
    );
    // 25,000 tokens at 10,000 a span: 2.5 spans. The four requests alone: 40 ms.
    assert_eq!(
        l.retry_after(full.ahead, full.tokens + 5_000, 0),
        Duration::from_millis(SPAN_MS * 25 / 10)
    );
    // A high-priority request waits behind none of them: its own cost only.
    let full = match l.admit(Priority::High, cost(5_000), 0) {
        Decision::Full(f) => f,
        other => panic!("expected Full, got {other:?}"),
    };
    assert_eq!((full.ahead, full.tokens), (0, 0));
    assert_eq!(
        l.retry_after(full.ahead, 5_000, 0),
        Duration::from_millis(SPAN_MS / 2)
    );
}

#[test]
fn when_the_requests_drain_slower_than_the_tokens_retry_after_is_theirs() {
    // One request a second; 10,000 tokens pass a 1,000,000 budget in 0.603 s.
    let l = limiter(60.0, 1, 4).with_token_budget(1_000_000);
    assert_eq!(l.retry_after(4, 10_000, 0), Duration::from_secs(4));
    assert_eq!(l.retry_after(4, 0, 0), Duration::from_secs(4));
}

#[test]
fn a_token_hold_comes_before_the_tokens_drain_and_leaves_requests_without_a_cost_alone() {
    let l = limiter(6_000.0, 1_000, 4).with_token_budget(10_000);
    l.token_budget().unwrap().hold(2 * S);
    assert_eq!(
        l.retry_after(0, 25_000, 0),
        Duration::from_millis(2_000 + SPAN_MS * 25 / 10)
    );
    // No tokens to pass: one bucket interval (10 ms), the hold not counted.
    assert_eq!(l.retry_after(0, 0, 0), Duration::from_millis(10));
}

#[test]
fn a_parked_requests_deadline_estimate_counts_the_same_tokens_as_its_retry_after() {
    let l = limiter(6_000.0, 1_000, 8).with_token_budget(10_000);
    let _sent = send(&l, 8_000, 0);
    let _high: Vec<Ticket> = (0..2)
        .map(|_| queued(l.admit(Priority::High, cost(5_000), 0)))
        .collect();
    // A low-priority request parked behind them: its 15,000 tokens with theirs are 1.5
    // spans, past a 30 s `low_priority_timeout` (its own cost alone would fit when the
    // first 8,000 leave the span, 61.3 s on).
    let _low = queued(l.admit(Priority::Low, cost(5_000), 0));
    let ahead = l.queues.ahead_of(Priority::Low) - 1;
    let tokens = l.queues.cost_ahead_of(Priority::Low);
    assert_eq!((ahead, tokens), (2, 15_000));
    let wait = l
        .expected_wait(ahead, tokens, 0)
        .max(l.token_wait(cost(5_000), 0));
    assert_eq!(wait, Duration::from_millis(SPAN_MS * 15 / 10));
    assert!(wait > l.token_wait(cost(5_000), 0));
    // Refused there, the Retry-After it is told is that figure.
    assert_eq!(l.retry_after(ahead, tokens, 0), wait);
}
