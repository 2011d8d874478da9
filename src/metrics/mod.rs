//! Request metrics: HDR latency histograms and outcome counters per provider.
//!
//! Recording takes no lock. Each worker thread records into its own [`Shard`] of atomic
//! cells that only it writes (a load and a store per cell, see `cells`); the snapshot
//! publisher or a scrape reads every shard when it collects, once per tick, and adds
//! what each recorded since the last collect to the cumulative totals (for Prometheus)
//! and to a rolling one-minute window (for the dashboard's percentiles). The histograms
//! keep hdrhistogram's layout, so a collect rebuilds exactly the histograms recording
//! into hdrhistogram would have made.
//!
//! The request ledger (arrivals, requests in flight, outcomes) lives in the same shards,
//! changed in steps a collect reads whole, so it sees the three consistent; see
//! [`ledger`].
//!
//! Gauges and counters kept elsewhere (bucket, queues, retreat, provider stats) are
//! read where they live at scrape time; see [`crate::exposition`].

mod cells;
pub mod ledger;
pub mod process;
pub mod series;
mod shards;

pub use ledger::Entry;
pub use series::{ErrorKind, Lane, Latency, Outcome, ProviderSeries, Sample};
pub use shards::{Metrics, Shard, ShardHandle, Totals, Window};
