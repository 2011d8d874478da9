//! Observability and admin hot paths: recording a request's metrics, publishing and
//! reading the dashboard snapshot, parsing an admin patch. Each beside a naive
//! baseline so the difference is visible.
//!
//! `cargo bench --bench observability`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytemuck::Zeroable;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use nvidia_sidecar::admin::patch;
use nvidia_sidecar::metrics::Lane;
use nvidia_sidecar::metrics::{Metrics, Outcome, ProviderSeries, Sample};
use nvidia_sidecar::priority::Priority;
use nvidia_sidecar::snapshot::{SeqLock, Snapshot};
use parking_lot::Mutex;

fn sample(i: u64) -> Sample {
    Sample {
        route: Lane::Limited,
        outcome: Outcome::Success,
        error: None,
        priority: Priority::Normal,
        upstream_latency: Some(Duration::from_micros(800 + i % 5000)),
        ttfb: Some(Duration::from_micros(900 + i % 5000)),
        duration: Duration::from_micros(1000 + i % 5000),
        queue_wait: Some(Duration::ZERO),
    }
}

/// Recording one finished request: the worker's own shard of cells (our path) against
/// one global mutex around a series, shared by two threads (what we avoid).
fn metrics_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics_record");
    g.throughput(Throughput::Elements(1));
    let m = Metrics::new(1, 2, Instant::now());
    let shard = m.shard(0);
    let mut i = 0u64;
    g.bench_function("own_shard", |b| {
        b.iter(|| {
            i += 1;
            shard.record(0, black_box(&sample(i)));
        })
    });
    // Two threads recording into their own shards at once.
    g.bench_function("own_shard_2_threads", |b| {
        b.iter_custom(|iters| {
            let m = Arc::new(Metrics::new(1, 2, Instant::now()));
            let start = Instant::now();
            std::thread::scope(|s| {
                for w in 0..2 {
                    let shard = m.shard(w);
                    s.spawn(move || {
                        for i in 0..iters {
                            shard.record(0, &sample(i));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.bench_function("global_mutex_2_threads_baseline", |b| {
        b.iter_custom(|iters| {
            let series = Arc::new(Mutex::new(ProviderSeries::default()));
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let series = Arc::clone(&series);
                    s.spawn(move || {
                        for i in 0..iters {
                            series.lock().record(&sample(i));
                        }
                    });
                }
            });
            start.elapsed()
        })
    });
    g.bench_function("collect_after_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for i in 0..1000 {
                    shard.record(0, &sample(i));
                }
                let t = Instant::now();
                drop(black_box(m.collect(Instant::now())));
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// The dashboard snapshot (about 20 KB): publishing and reading through the seqlock,
/// against the same copy under a mutex.
fn snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.throughput(Throughput::Bytes(std::mem::size_of::<Snapshot>() as u64));
    let lock = SeqLock::new(Snapshot::zeroed());
    let mut snap = Box::new(Snapshot::zeroed());
    snap.providers_len = 1;
    g.bench_function("seqlock_publish", |b| {
        b.iter(|| {
            snap.build += 1;
            black_box(lock.publish(&snap))
        })
    });
    let mut out = Box::new(Snapshot::zeroed());
    g.bench_function("seqlock_read", |b| {
        b.iter(|| black_box(lock.read_into(&mut out)))
    });
    let mutex = Mutex::new(Snapshot::zeroed());
    g.bench_function("mutex_read_baseline", |b| {
        b.iter(|| {
            *out = *mutex.lock();
            black_box(out.build)
        })
    });
    // Readers while a publisher publishes continuously on the other core.
    g.bench_function("seqlock_read_during_publishing", |b| {
        b.iter_custom(|iters| {
            let lock = Arc::new(SeqLock::new(Snapshot::zeroed()));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let writer = {
                let (lock, stop) = (Arc::clone(&lock), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut s = Box::new(Snapshot::zeroed());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        s.build += 1;
                        lock.publish(&s);
                        std::thread::sleep(Duration::from_micros(50));
                    }
                })
            };
            let mut out = Box::new(Snapshot::zeroed());
            let start = Instant::now();
            for _ in 0..iters {
                black_box(lock.read_into(&mut out));
            }
            let elapsed = start.elapsed();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = writer.join();
            elapsed
        })
    });
    g.finish();
}

/// Parsing an admin patch with simd-json into typed structs, against serde_json.
fn admin_parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("admin_parse");
    let body = br#"{"request_timeout": 90, "log_level": "warn", "providers": {"nvidia": {"rate_rpm": 30, "bucket_capacity": 2, "queue_max_size": 128, "low_priority_timeout": 15}}}"#;
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("simd_json_patch", |b| {
        b.iter(|| black_box(patch::parse(black_box(body))))
    });
    g.bench_function("serde_json_patch_baseline", |b| {
        b.iter(|| black_box(serde_json::from_slice::<patch::Patch>(black_box(body))))
    });
    g.finish();
}

criterion_group!(benches, metrics_record, snapshot, admin_parse);
criterion_main!(benches);
