//! The sidecar's queue, step by step: a sidecar that has one token a second of its
//! [`ManualClock`], requests parked in its queue one at a time, and the clock advanced
//! to let them through one grant at a time. Every wait is for an observed event (the
//! queue's depth, a request at the upstream), never a sleep. And a sidecar in front of
//! a provider stricter than itself, whose refusals put requests back in the queue.

use std::time::Duration;

use nvidia_sidecar::clock::ManualClock;
use nvidia_sidecar::mock::MockConfig;
use tokio::task::JoinHandle;

use super::{manual_stack, spawn_chat, stack, unlimited_mock, wait_until, Stack, CHAT};

/// A sidecar at 60 RPM (one token a second), bucket capacity 1, on a manual clock, in
/// front of an upstream without a limit; `env` comes on top. The first request takes
/// the one token; the next ones park until the test advances the clock.
pub fn paced_stack(env: &[(&str, &str)]) -> (Stack, ManualClock) {
    let mut all = vec![("SIDECAR_RATE_RPM", "60"), ("SIDECAR_BUCKET_CAPACITY", "1")];
    all.extend_from_slice(env);
    manual_stack(unlimited_mock(), &all)
}

/// A sidecar at 600 RPM (bucket capacity 1, a 1 s provider window, up to 10 retries of
/// an upstream 429) in front of a provider that allows `provider_rpm` per rolling second
/// and sends no quota headers (with them, `x-ratelimit-remaining: 0` would hold the
/// sidecar back first): when the sidecar sends faster, the provider refuses, and each
/// refused request goes back into the sidecar's queue to be sent again.
pub fn stack_over_a_stricter_provider(provider_rpm: f64) -> Stack {
    stack(
        MockConfig {
            rpm: provider_rpm,
            window_secs: 1.0,
            no_quota_headers: true,
            ..MockConfig::default()
        },
        &[
            ("SIDECAR_RATE_RPM", "600"),
            ("SIDECAR_BUCKET_CAPACITY", "1"),
            ("SIDECAR_UPSTREAM_429_RETRIES", "10"),
            ("SIDECAR_PROVIDER_WINDOW", "1"),
        ],
    )
}

impl Stack {
    /// Parks one chat: starts it in a task of its own ([`spawn_chat`]) and waits until
    /// the first provider's queue holds one request more than before. The task ends
    /// with the answer's status.
    pub async fn park_chat(&self, headers: &[(&str, &str)], body: &str) -> JoinHandle<u16> {
        let queues = &self.app.providers[0].limiter.queues;
        let before = queues.len();
        let chat = spawn_chat(self.addr, headers, body);
        wait_until("the request to park", || queues.len() == before + 1).await;
        chat
    }

    /// Parks `n` chats ([`CHAT`]) one at a time, so they wait in the order started.
    pub async fn park(&self, n: usize) -> Vec<JoinHandle<u16>> {
        let mut parked = Vec::with_capacity(n);
        for _ in 0..n {
            parked.push(self.park_chat(&[], CHAT).await);
        }
        parked
    }

    /// Lets `n` parked requests through one at a time: each step advances `clock` by
    /// `every` (the time one token takes) and waits until the upstream has seen one
    /// request more.
    pub async fn release(&self, clock: &ManualClock, every: Duration, n: u64) {
        let seen = self.mock.requests();
        for k in 1..=n {
            clock.advance(every);
            wait_until("a grant to reach the upstream", || {
                self.mock.requests() == seen + k
            })
            .await;
        }
    }
}
