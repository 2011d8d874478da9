//! The window guard under real threads: every stamped time recorded, then checked
//! offline. Whatever the scheduling, no half-open span holds more than the limit.
//!
//! The threads share a clock they advance themselves (an `AtomicU64` bumped by each
//! attempt), so the limit binds at any machine speed and a thread preempted between its
//! clock read and its claim comes back with a stale time, as on a real server. Only
//! counts and bounds are asserted, never timing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use nvidia_sidecar::limiter::guard::{Margin, Slot, WindowGuard};

const THREADS: usize = 4;
/// Clock nanoseconds each attempt moves the shared clock.
const STEP: u64 = 1_000;

#[derive(Debug, Default)]
struct Tally {
    stamps: Vec<u64>,
    refused: u64,
    released: u64,
}

/// Claims in a loop: most admitted claims are stamped a few attempts later (at a fresh
/// clock read), some released. Returns every stamped time, as the guard recorded it.
fn hammer(guard: &Arc<WindowGuard>, attempts: usize) -> Vec<Tally> {
    let clock = Arc::new(AtomicU64::new(1_000_000_000));
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|seed| {
            let (guard, clock, start) = (Arc::clone(guard), Arc::clone(&clock), Arc::clone(&start));
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(seed as u64);
                let mut tally = Tally::default();
                let mut held: Vec<Slot> = Vec::new();
                start.wait();
                for _ in 0..attempts {
                    // Relaxed: the clock's value is all that matters.
                    let now = clock.fetch_add(STEP, Ordering::Relaxed);
                    match guard.try_claim(now) {
                        Ok(claim) => {
                            assert!(claim.count >= 1);
                            held.push(claim.slot);
                        }
                        Err(wait) => {
                            assert!(wait > Duration::ZERO);
                            tally.refused += 1;
                        }
                    }
                    while held.len() > rng.usize(..3) {
                        let slot = held.swap_remove(0);
                        if rng.u8(..10) == 0 {
                            guard.release(slot);
                            tally.released += 1;
                        } else {
                            let sent_at = clock.load(Ordering::Relaxed);
                            tally.stamps.push(guard.stamp(slot, sent_at));
                        }
                    }
                }
                for slot in held {
                    tally
                        .stamps
                        .push(guard.stamp(slot, clock.load(Ordering::Relaxed)));
                }
                tally
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// The most stamps any half-open window `(t - span, t]` holds: sorted, two pointers.
fn max_in_any_span(tallies: &[Tally], span: u64) -> (usize, Vec<u64>) {
    let mut stamps: Vec<u64> = tallies
        .iter()
        .flat_map(|t| t.stamps.iter().copied())
        .collect();
    stamps.sort_unstable();
    let (mut first, mut most) = (0, 0);
    for last in 0..stamps.len() {
        while stamps[first] + span <= stamps[last] {
            first += 1;
        }
        most = most.max(last - first + 1);
    }
    (most, stamps)
}

fn no_margin() -> Margin {
    Margin {
        fraction: 0.0,
        floor: Duration::ZERO,
    }
}

/// Checks the bound and that the limit was used, not just respected: at least `fill` of
/// `limit` per span over the run.
fn check(guard: &WindowGuard, tallies: &[Tally], limit: u32, fill: f64) {
    let span = guard.span_nanos();
    let (most, stamps) = max_in_any_span(tallies, span);
    assert!(
        most <= limit as usize,
        "{most} sends in one span, limit {limit}"
    );
    let elapsed = stamps.last().unwrap() - stamps.first().unwrap();
    let allowed = f64::from(limit) * elapsed as f64 / span as f64;
    let sent = stamps.len() as f64;
    assert!(sent >= fill * allowed, "{sent} sent, {allowed:.0} allowed");
    let refused: u64 = tallies.iter().map(|t| t.refused).sum();
    let released: u64 = tallies.iter().map(|t| t.released).sum();
    assert!(refused > sent as u64, "the limit bound: {refused} refused");
    assert!(released > 0);
    for (i, t) in tallies.iter().enumerate() {
        assert!(!t.stamps.is_empty(), "thread {i} never sent");
    }
}

/// Runs rounds on fresh guards, each checked, until one saw a CAS retried (a claim lost
/// a version or a slot, or two stamps raced for a sub-window word): evidence the
/// protocol was raced, not just run. Returns the rounds run.
fn hammer_until_contended(new_guard: impl Fn() -> WindowGuard, limit: u32) -> usize {
    const ROUNDS: usize = 20;
    for round in 1..=ROUNDS {
        let guard = Arc::new(new_guard());
        let tallies = hammer(&guard, 40_000);
        check(&guard, &tallies, limit, 0.7);
        if guard.contention() > 0 {
            return round;
        }
    }
    panic!("no CAS was ever retried in {ROUNDS} rounds");
}

#[test]
fn hammered_exact_guard_never_holds_more_than_the_limit_in_any_span() {
    const LIMIT: u32 = 40;
    // 400 attempts per span, ten per place: the limit binds all the time.
    let window = Duration::from_nanos(400 * STEP);
    hammer_until_contended(
        || WindowGuard::new(window, no_margin(), LIMIT, 4_096),
        LIMIT,
    );
}

#[test]
fn hammered_sub_window_guard_never_holds_more_than_the_limit_in_any_span() {
    const LIMIT: u32 = 2_000;
    // Limit above the ring (64 + 9 slots): conservative sub-window counts. 20,000
    // attempts per span.
    let window = Duration::from_nanos(20_000 * STEP);
    hammer_until_contended(|| WindowGuard::new(window, no_margin(), LIMIT, 64), LIMIT);
}

#[test]
fn hammered_guard_switching_modes_never_holds_more_than_the_larger_limit() {
    // A fifth thread moves the limit between exact (40, ring of 64) and sub-window
    // (100) mode while the others claim: no span holds more than the larger.
    let window = Duration::from_nanos(400 * STEP);
    let guard = Arc::new(WindowGuard::new(window, no_margin(), 40, 64));
    let done = Arc::new(AtomicU64::new(0));
    let switcher = {
        let (guard, done) = (Arc::clone(&guard), Arc::clone(&done));
        thread::spawn(move || {
            let (mut switches, mut limit) = (0u64, 40);
            while done.load(Ordering::Relaxed) == 0 {
                limit = if limit == 40 { 100 } else { 40 };
                guard.set_limit(limit);
                switches += 1;
                thread::yield_now();
            }
            switches
        })
    };
    let tallies = hammer(&guard, 20_000);
    done.store(1, Ordering::Relaxed);
    assert!(switcher.join().unwrap() > 2);
    let (most, stamps) = max_in_any_span(&tallies, guard.span_nanos());
    assert!(most <= 100, "{most} sends in one span");
    assert!(stamps.len() > 1_000, "{} sent", stamps.len());
}
