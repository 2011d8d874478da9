//! The limiter's hot path, scenario by scenario, each beside a naive baseline: a
//! `Mutex<(f64 tokens, u64 last)>` token bucket and a `Mutex<[VecDeque; 3]>` queue, so
//! the gain of the one-word GCRA state and the lock-free queues is visible.
//!
//! Every acquire includes the clock read, as on the request path. Contended groups
//! report wall time over the total number of operations of all threads.

use std::collections::VecDeque;
use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::task::{Context, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nvidia_sidecar::clock::{Clock, MonotonicClock};
use nvidia_sidecar::limiter::{Decision, Limiter, RetreatConfig, TokenBucket, WaitQueues};
use nvidia_sidecar::priority::Priority;
use parking_lot::Mutex;

/// So fast that every call is admitted (one token per nanosecond, burst 1000).
const ALWAYS_RPM: f64 = 1e12;
const ALWAYS_CAPACITY: u32 = 1_000;

// === Naive baselines ===

/// The textbook bucket: fractional tokens and the last refill time behind a lock.
struct MutexBucket {
    state: Mutex<(f64, u64)>,
    per_nano: f64,
    capacity: f64,
}

impl MutexBucket {
    fn new(rpm: f64, capacity: u32) -> Self {
        Self {
            state: Mutex::new((f64::from(capacity), 0)),
            per_nano: rpm / 60e9,
            capacity: f64::from(capacity),
        }
    }

    fn try_acquire(&self, now: u64) -> bool {
        let mut s = self.state.lock();
        let elapsed = now.saturating_sub(s.1) as f64;
        let tokens = (s.0 + elapsed * self.per_nano).min(self.capacity);
        s.1 = s.1.max(now);
        if tokens >= 1.0 {
            s.0 = tokens - 1.0;
            true
        } else {
            s.0 = tokens;
            false
        }
    }
}

/// Three FIFO lanes behind one lock, holding a shared granted flag per waiter (the
/// least a parked request needs to learn of its grant).
#[derive(Default)]
struct MutexQueues {
    lanes: Mutex<[VecDeque<Arc<AtomicBool>>; 3]>,
}

impl MutexQueues {
    fn enqueue(&self, p: Priority) -> Arc<AtomicBool> {
        let waiter = Arc::new(AtomicBool::new(false));
        self.lanes.lock()[p as usize].push_back(Arc::clone(&waiter));
        waiter
    }

    fn grant_next(&self) -> bool {
        let next = self.lanes.lock().iter_mut().find_map(VecDeque::pop_front);
        next.map(|w| w.store(true, Ordering::Release)).is_some()
    }

    fn is_empty(&self) -> bool {
        self.lanes.lock().iter().all(VecDeque::is_empty)
    }
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

// === Scenarios ===

fn acquire_uncontended(c: &mut Criterion) {
    let clock = MonotonicClock::new();
    let mut g = c.benchmark_group("acquire_uncontended");
    g.throughput(Throughput::Elements(1));

    let admitted = TokenBucket::new(ALWAYS_RPM, ALWAYS_CAPACITY);
    g.bench_function("gcra_atomic/admitted", |b| {
        b.iter(|| admitted.try_acquire(black_box(clock.now_nanos())))
    });
    // The same without the clock read (this VM's `Instant::now` costs most of the above).
    let mut now = clock.now_nanos();
    g.bench_function("gcra_atomic/admitted_no_clock", |b| {
        b.iter(|| {
            now += 1;
            admitted.try_acquire(black_box(now))
        })
    });
    let denied = TokenBucket::new(1.0, 1);
    let _ = denied.try_acquire(clock.now_nanos());
    g.bench_function("gcra_atomic/denied", |b| {
        b.iter(|| denied.try_acquire(black_box(clock.now_nanos())))
    });

    let admitted = MutexBucket::new(ALWAYS_RPM, ALWAYS_CAPACITY);
    g.bench_function("baseline_mutex/admitted", |b| {
        b.iter(|| admitted.try_acquire(black_box(clock.now_nanos())))
    });
    let mut now = clock.now_nanos();
    g.bench_function("baseline_mutex/admitted_no_clock", |b| {
        b.iter(|| {
            now += 1;
            admitted.try_acquire(black_box(now))
        })
    });
    let denied = MutexBucket::new(1.0, 1);
    let _ = denied.try_acquire(clock.now_nanos());
    g.bench_function("baseline_mutex/denied", |b| {
        b.iter(|| denied.try_acquire(black_box(clock.now_nanos())))
    });
    g.finish();
}

/// `threads` threads each make `iters` calls; the sample is wall time over the total,
/// so the reported time is per acquire across all threads.
fn contended<B: Send + Sync + 'static>(
    shared: &Arc<B>,
    threads: u64,
    iters: u64,
    op: impl Fn(&B, &MonotonicClock) -> bool + Copy + Send + 'static,
) -> Duration {
    let clock = MonotonicClock::new();
    let start = Arc::new(Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (shared, start, clock) = (Arc::clone(shared), Arc::clone(&start), clock.clone());
            thread::spawn(move || {
                start.wait();
                for _ in 0..iters {
                    black_box(op(&shared, &clock));
                }
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for h in handles {
        h.join().expect("bench thread");
    }
    t0.elapsed() / threads as u32
}

fn acquire_contended(c: &mut Criterion) {
    for threads in [2u64, 4] {
        let mut g = c.benchmark_group(format!("acquire_contended/{threads}_threads"));
        g.throughput(Throughput::Elements(1));
        let gcra = Arc::new(TokenBucket::new(ALWAYS_RPM, ALWAYS_CAPACITY));
        g.bench_function("gcra_atomic", |b| {
            b.iter_custom(|iters| {
                contended(&gcra, threads, iters, |b, clock| {
                    b.try_acquire(clock.now_nanos()).is_ok()
                })
            })
        });
        let naive = Arc::new(MutexBucket::new(ALWAYS_RPM, ALWAYS_CAPACITY));
        g.bench_function("baseline_mutex", |b| {
            b.iter_custom(|iters| {
                contended(&naive, threads, iters, |b, clock| {
                    b.try_acquire(clock.now_nanos())
                })
            })
        });
        g.finish();
    }
}

/// One request parked and granted: enqueue, grant, see the grant, drop the ticket.
/// A claim from a guard that never binds: the queues carry it, the bench times them.
fn any_claim() -> nvidia_sidecar::limiter::Claim {
    let margin = nvidia_sidecar::limiter::Margin {
        fraction: 0.0,
        floor: std::time::Duration::ZERO,
    };
    nvidia_sidecar::limiter::WindowGuard::new(
        std::time::Duration::from_secs(60),
        margin,
        1 << 30,
        1 << 30,
    )
    .try_claim(0)
    .expect("room")
}

fn enqueue_grant(c: &mut Criterion) {
    let claim = any_claim();
    let mut g = c.benchmark_group("enqueue_grant");
    g.throughput(Throughput::Elements(1));
    let waker = Waker::from(Arc::new(NoopWake));
    for p in Priority::ALL {
        let q = WaitQueues::new(1_024);
        g.bench_with_input(BenchmarkId::new("segqueue_atomic", p), &p, |b, &p| {
            b.iter(|| {
                let mut t = q.enqueue(p, false).expect("room");
                assert!(q.grant_next(claim).is_ok());
                let ready = Pin::new(&mut t).poll(&mut Context::from_waker(&waker));
                black_box(ready.is_ready())
            })
        });
        let naive = MutexQueues::default();
        g.bench_with_input(
            BenchmarkId::new("baseline_mutex_vecdeque", p),
            &p,
            |b, &p| {
                b.iter(|| {
                    let w = naive.enqueue(p);
                    assert!(naive.grant_next());
                    black_box(w.load(Ordering::Acquire))
                })
            },
        );
    }
    g.finish();
}

/// Producers that are also dispatchers: each thread parks one request and grants one,
/// so both ends of the queues are hit from every thread at once.
fn enqueue_grant_contended(c: &mut Criterion) {
    let claim = any_claim();
    for threads in [2u64, 4] {
        let mut g = c.benchmark_group(format!("enqueue_grant_contended/{threads}_threads"));
        g.throughput(Throughput::Elements(1));
        let q = Arc::new(WaitQueues::new(1_024));
        g.bench_function("segqueue_atomic", |b| {
            b.iter_custom(|iters| {
                contended(&q, threads, iters, move |q, _| {
                    let t = q.enqueue(Priority::Normal, false);
                    let granted = q.grant_next(claim).is_ok();
                    drop(t);
                    granted
                })
            })
        });
        let naive = Arc::new(MutexQueues::default());
        g.bench_function("baseline_mutex_vecdeque", |b| {
            b.iter_custom(|iters| {
                contended(&naive, threads, iters, |q, _| {
                    let _w = q.enqueue(Priority::Normal);
                    q.grant_next()
                })
            })
        });
        g.finish();
    }
}

/// The whole admission decision when a token is free and nobody waits.
fn admit_fast_path(c: &mut Criterion) {
    let clock = MonotonicClock::new();
    let mut g = c.benchmark_group("admit_fast_path");
    g.throughput(Throughput::Elements(1));
    let limiter = Limiter::new(ALWAYS_RPM, ALWAYS_CAPACITY, 64, RetreatConfig::default());
    g.bench_function("limiter_admit", |b| {
        b.iter(
            || match limiter.admit(Priority::Normal, None, clock.now_nanos()) {
                Decision::Admitted(_) => true,
                other => panic!("not the fast path: {other:?}"),
            },
        )
    });
    // Cluster mode with a lease in hand: the token comes from the leased pot.
    let pot = std::sync::Arc::new(nvidia_sidecar::limiter::LeasePot::new());
    pot.set_mode(nvidia_sidecar::limiter::Mode::Shared);
    pot.fill(
        nvidia_sidecar::limiter::PotLease {
            number: 1,
            tokens: u32::MAX,
            not_before: 0,
            expires: u64::MAX,
            covers_until: u64::MAX,
        },
        0,
    );
    let leased = Limiter::new(ALWAYS_RPM, ALWAYS_CAPACITY, 64, RetreatConfig::default())
        .leased(std::sync::Arc::clone(&pot));
    g.bench_function("limiter_admit_cluster_lease_in_hand", |b| {
        b.iter(
            || match leased.admit(Priority::Normal, None, clock.now_nanos()) {
                Decision::Admitted(_) => true,
                other => panic!("not the fast path: {other:?}"),
            },
        )
    });
    let (bucket, queues) = (
        MutexBucket::new(ALWAYS_RPM, ALWAYS_CAPACITY),
        MutexQueues::default(),
    );
    g.bench_function("baseline_mutex", |b| {
        b.iter(|| queues.is_empty() && bucket.try_acquire(clock.now_nanos()))
    });
    g.finish();
}

// === Window guard ===

/// The naive sliding log: every send time in a `VecDeque` behind a lock, expired ones
/// popped from the front.
struct MutexLog {
    times: Mutex<VecDeque<u64>>,
    span: u64,
    limit: usize,
}

impl MutexLog {
    fn try_send(&self, now: u64) -> bool {
        let mut times = self.times.lock();
        while times.front().is_some_and(|&t| t + self.span <= now) {
            times.pop_front();
        }
        let admitted = times.len() < self.limit;
        if admitted {
            times.push_back(now);
        }
        admitted
    }
}

/// A claim stamped at once, with time moving `step` per send: at least span/limit apart,
/// so every claim is admitted while the window stays full (the exact ring scans its
/// slots and reuses the one that just expired; sub-window mode reads two words, at half
/// the limit as near it), beside the naive sliding log. No clock read: `now` is a
/// counter. Then the sub-window hot path from several threads, clock read included.
fn window_guard(c: &mut Criterion) {
    use nvidia_sidecar::limiter::guard::{Margin, WindowGuard};

    let margin = Margin {
        fraction: 0.005,
        floor: Duration::from_millis(50),
    };
    let window = Duration::from_secs(60);
    let mut g = c.benchmark_group("window_guard");
    g.throughput(Throughput::Elements(1));
    for (name, limit, max_limit, per_span) in [
        ("exact_claim_stamp/L=40", 40, 40, 40),
        ("exact_claim_stamp/L=4096", 4_096, 4_096, 4_096),
        ("subwindow_claim_stamp/L=1e6", 1_000_000, 1_000_000, 500_000),
        (
            "subwindow_claim_stamp/L=1e6_near_limit",
            1_000_000,
            1_000_000,
            950_000,
        ),
    ] {
        let guard = WindowGuard::new(window, margin, limit, max_limit);
        let step = guard.span_nanos() / per_span + 1;
        let mut now = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                now += step;
                let claim = guard
                    .try_claim(black_box(now))
                    .expect("one span/limit apart");
                guard.stamp(claim.slot, now)
            })
        });
    }
    let log = MutexLog {
        times: Mutex::new(VecDeque::new()),
        span: 60_300_000_000,
        limit: 40,
    };
    let step = log.span / 40 + 1;
    let mut now = 0;
    g.bench_function("baseline_mutex_vecdeque/L=40", |b| {
        b.iter(|| {
            now += step;
            assert!(log.try_send(black_box(now)));
        })
    });
    g.finish();

    // The hot path of a limit that never binds, from every thread at once, clock read
    // included.
    for threads in [2u64, 4] {
        let mut g = c.benchmark_group(format!("window_guard_contended/{threads}_threads"));
        g.throughput(Throughput::Elements(1));
        let guard = Arc::new(WindowGuard::new(window, margin, 1_000_000, 1_000_000));
        g.bench_function("subwindow_claim_stamp/L=1e6", |b| {
            b.iter_custom(|iters| {
                contended(&guard, threads, iters, |g, clock| {
                    let now = clock.now_nanos();
                    match g.try_claim(now) {
                        Ok(claim) => {
                            g.stamp(claim.slot, now);
                            true
                        }
                        Err(_) => false,
                    }
                })
            })
        });
        g.finish();
    }
}

criterion_group!(
    limiter,
    acquire_uncontended,
    acquire_contended,
    enqueue_grant,
    enqueue_grant_contended,
    admit_fast_path,
    window_guard
);
criterion_main!(limiter);
