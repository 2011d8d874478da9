//! nvidia-sidecar: a lock-free rate-limiting sidecar proxy for OpenAI-compatible LLM APIs.
//!
//! The binary (`main.rs`) only parses arguments and starts things; everything lives in
//! these modules so tests, benches and fuzz targets use the same code.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod auth;
pub mod body;
pub mod budget;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod exposition;
pub mod framing;
pub mod fuzz_targets;
pub mod health;
pub mod hot;
pub mod http1;
pub mod limiter;
pub mod logging;
pub mod metrics;
pub mod mock;
pub mod priority;
pub mod proxy;
pub mod record;
pub mod reply;
pub mod route;
pub mod server;
pub mod sidecar;
pub mod snapshot;
pub mod state_file;
pub mod stats;
pub mod tokens;
pub mod upstream;
