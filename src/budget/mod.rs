//! The shared budget: one provider limit paced across replicas through Redis.
//!
//! Replicas that use the same Redis and budget name share the provider's rate, window
//! guard, learned limit and retreat. The state lives in Redis and changes only through one
//! Lua script (`budget.lua`), so every decision is atomic and made on Redis's clock. The
//! request path never waits on Redis: it takes tokens from a local pot
//! ([`crate::limiter::LeasePot`]) that a task on the `budget` thread keeps filled with
//! leases sized to the rate (one token at 40 RPM; a fraction of a second's worth at high
//! rates). A grant counts in the shared window log from its grant until its lease time,
//! the window and the margin have passed, so in steady state the cluster never sends
//! more than the limit in any window.
//!
//! A provider with `tokens_per_minute` shares its token budget the same way: a second
//! log in the same script, token leases for a second pot
//! ([`crate::limiter::TokenPot`]), each reservation's later changes reported against the
//! lease it came from (see `task/tokens.rs`).
//!
//! When Redis is lost the replica falls back to the limit divided by the replicas it last
//! saw (its local bucket and guard), and after `redis_fallback_for` stops sending with the
//! shared key, while Redis keeps that long a vanished replica's share reserved. A Redis
//! that lost its state starts a new generation: one window of learning mode in which each
//! replica first reports its own recent sends and then takes at most its share.
//!
//! Why redis-rs: it is the most used Rust client, maintained under the redis-rs
//! organisation, with a tokio connection manager that reconnects by itself, response and
//! connection timeouts, rustls TLS, and [`redis::Script`], which reloads a script on
//! NOSCRIPT. fred would do as well; redis-rs needs fewer dependencies here.
//!
//! Layout: [`Budget`] is the handle a provider holds; [`Runner`] starts the `budget`
//! thread with one task per budget; the tasks take what they need as [`Inputs`] (values,
//! and the run-time [`Settings`] held weakly), so this module imports nothing of the
//! program that assembles it. `conn` is the Redis connection, `script` the Lua script's
//! calls and replies, `view` what this replica knows of the budget.

mod conn;
mod handle;
mod inputs;
mod replica;
mod runner;
pub mod script;
mod task;
pub mod view;

pub use handle::{Budget, Command};
pub use inputs::{Feed, Inputs, Settings, SharedSettings};
pub use replica::replica_id;
pub use runner::Runner;
pub use view::{ClusterView, LeaseCounts, Record};
