//! Shared test harness: a simulated upstream and a sidecar on ephemeral ports, a small
//! HTTP client on hyper's connection API, and the steps the tests take with them, one
//! file a concern:
//!
//! - `stack.rs`: [`Stack`], its configurations and its clock (real or manual);
//! - `client.rs`: requests and answers, chats in tasks of their own, the admin API;
//! - `queue.rs`: admission step by step on a manual clock (park requests, release them);
//! - `wait.rs`: bounded polls for an observed state;
//! - `metrics.rs`: `/metrics` and its samples;
//! - `ledger.rs`: the request ledger and the end-of-scenario checks;
//! - `judge.rs`: the simulated provider's fixed-window time line;
//! - `flood.rs`: closed-loop clients sending a mix of chats, and the usage they were told;
//! - `process.rs`: tools, the sidecar's binary, and waiting for a run to end;
//! - `redis.rs`: a real Redis and sidecar replicas as processes.
#![allow(dead_code, unused_imports)]

mod client;
mod flood;
mod judge;
mod ledger;
mod metrics;
mod process;
mod queue;
pub mod redis;
mod stack;
mod wait;

pub use client::*;
pub use flood::*;
pub use judge::*;
pub use ledger::*;
pub use metrics::*;
pub use process::*;
pub use queue::*;
pub use stack::*;
pub use wait::*;
