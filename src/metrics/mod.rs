//! Request metrics: HDR latency histograms and outcome counters per provider.
//!
//! Recording never takes a shared lock. Each worker thread records into its own
//! [`Shard`]; the shard's mutex is contended only when the snapshot publisher or a
//! scrape drains it into the totals, once per tick, so on the request path it is an
//! uncontended lock of a cache line that stays on the worker's core. Draining moves the
//! shard's samples into the cumulative totals (for Prometheus) and into a rolling
//! one-minute window (for the dashboard's percentiles), then empties the shard.
//!
//! The request ledger (arrivals, requests in flight, outcomes) lives in the same shards,
//! so a collect sees the three consistent; see [`ledger`].
//!
//! Gauges and counters kept elsewhere (bucket, queues, retreat, provider stats) are
//! read where they live at scrape time; see [`crate::exposition`].

pub mod ledger;
pub mod process;
pub mod series;
mod shards;

pub use ledger::Entry;
pub use series::{ErrorKind, Lane, Latency, Outcome, ProviderSeries, Sample};
pub use shards::{Metrics, Shard, ShardHandle, Totals, Window};
