//! The bucket's rules on explicit clock nanoseconds: no sleeping, every time exact.

use proptest::prelude::*;

use super::*;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;

/// Takes tokens at `now` until refused; returns how many were admitted.
fn drain(b: &TokenBucket, now: u64) -> u64 {
    let mut n = 0;
    while b.try_acquire(now).is_ok() {
        n += 1;
        assert!(n <= 1_000_000, "the bucket never refused");
    }
    n
}

#[test]
fn interval_is_sixty_seconds_over_the_rate() {
    assert_eq!(interval_nanos(60.0), S);
    assert_eq!(interval_nanos(600_000.0), 100_000);
    assert_eq!(interval_nanos(1e12), 1, "never below one nanosecond");
    assert_eq!(
        interval_nanos(0.0),
        u64::MAX / 4,
        "a zero rate is an endless wait"
    );
}

#[test]
fn a_full_bucket_admits_a_burst_of_capacity_then_refuses_with_the_exact_wait() {
    let b = TokenBucket::new(60.0, 5);
    for _ in 0..5 {
        assert_eq!(b.try_acquire(10 * S), Ok(()));
    }
    assert_eq!(b.try_acquire(10 * S), Err(Duration::from_secs(1)));
    assert_eq!(
        b.try_acquire(10 * S + 250 * MS),
        Err(Duration::from_millis(750))
    );
}

#[test]
fn at_sixty_rpm_a_token_is_free_at_exactly_each_second_and_not_a_nanosecond_before() {
    let b = TokenBucket::new(60.0, 1);
    let t0 = 5 * S;
    assert_eq!(b.try_acquire(t0), Ok(()));
    for k in 1..=10 {
        let due = t0 + k * S;
        assert_eq!(b.try_acquire(due - 1), Err(Duration::from_nanos(1)));
        assert_eq!(b.try_acquire(due), Ok(()));
    }
}

#[test]
fn refill_after_a_drain_is_one_token_per_interval() {
    let b = TokenBucket::new(60.0, 3);
    assert_eq!(drain(&b, 0), 3);
    assert_eq!(drain(&b, S - 1), 0);
    assert_eq!(drain(&b, S), 1);
    // Two intervals later two tokens have come back, not three.
    assert_eq!(drain(&b, 3 * S), 2);
}

#[test]
fn a_long_idle_earns_no_more_than_capacity() {
    let b = TokenBucket::new(60.0, 4);
    assert_eq!(drain(&b, 0), 4);
    let hour = 3600 * S;
    assert_eq!(b.tokens(hour), 4.0);
    assert_eq!(drain(&b, hour), 4);
    assert_eq!(b.wait_time(hour), Duration::from_secs(1));
}

#[test]
fn tokens_counts_what_is_free_fractions_included() {
    let b = TokenBucket::new(60.0, 2);
    assert_eq!(b.tokens(0), 2.0);
    b.try_acquire(0).unwrap();
    assert_eq!(b.tokens(0), 1.0);
    b.try_acquire(0).unwrap();
    assert_eq!(b.tokens(0), 0.0);
    assert_eq!(b.tokens(S / 2), 0.5);
    assert_eq!(b.tokens(S), 1.0);
    assert_eq!(b.tokens(2 * S), 2.0);
    assert_eq!(b.tokens(100 * S), 2.0, "capped at capacity");
    b.pause_until(3 * S);
    assert_eq!(b.tokens(S), -1.0, "negative while a pause lasts");
}

#[test]
fn a_rate_change_mid_run_keeps_the_tokens_and_follows_the_new_interval() {
    let b = TokenBucket::new(60.0, 1);
    b.try_acquire(0).unwrap();
    // Half a token at 0.5 s, at the old rate.
    assert_eq!(b.tokens(S / 2), 0.5);
    b.set_rate(120.0, 1, S / 2);
    assert_eq!(b.tokens(S / 2), 0.5, "half a token stays half a token");
    assert_eq!(b.rate(), (120.0, 1));
    // The missing half fills at the new rate: 0.25 s, not the old 0.5 s.
    assert_eq!(b.try_acquire(S / 2), Err(Duration::from_millis(250)));
    assert_eq!(b.try_acquire(750 * MS - 1), Err(Duration::from_nanos(1)));
    assert_eq!(b.try_acquire(750 * MS), Ok(()));
    assert_eq!(b.try_acquire(1250 * MS - 1), Err(Duration::from_nanos(1)));
    assert_eq!(b.try_acquire(1250 * MS), Ok(()));
}

#[test]
fn a_rate_change_on_a_drained_bucket_is_no_reset_to_full() {
    let b = TokenBucket::new(60.0, 5);
    assert_eq!(drain(&b, 0), 5);
    b.set_rate(6000.0, 5, 0);
    assert_eq!(b.tokens(0), 0.0);
    assert_eq!(drain(&b, 0), 0, "a faster rate is no burst");
    // Next token after one new interval (10 ms), then one every 10 ms.
    assert_eq!(b.wait_time(0), Duration::from_millis(10));
    assert_eq!(drain(&b, 10 * MS), 1);
    assert_eq!(drain(&b, 20 * MS), 1);
}

#[test]
fn a_rate_change_during_a_pause_keeps_the_pause_end() {
    // Faster rate while paused for 10 s: observed, the token comes at 9.5 s.
    let b = TokenBucket::new(60.0, 1);
    b.pause_until(10 * S);
    b.set_rate(120.0, 1, 0);
    assert_eq!(b.wait_time(0), Duration::from_secs(10), "faster rate");
    assert!(
        b.try_acquire(10 * S - 1).is_err(),
        "admitted before the pause ended"
    );
    // Slower rate: observed, the pause grows to 11 s.
    let b = TokenBucket::new(60.0, 1);
    b.pause_until(10 * S);
    b.set_rate(30.0, 1, 0);
    assert_eq!(b.wait_time(0), Duration::from_secs(10), "slower rate");
    // A pause shorter than one interval (the default 1 s pause at 30 rpm) is scaled
    // by new/old interval: observed, 0.5 s instead of 1 s.
    let b = TokenBucket::new(30.0, 1);
    b.pause_until(S);
    b.set_rate(60.0, 1, 0);
    assert_eq!(b.wait_time(0), Duration::from_secs(1), "short pause");
}

#[test]
fn shrinking_capacity_clips_the_tokens() {
    let b = TokenBucket::new(60.0, 10);
    b.set_rate(60.0, 3, 0);
    assert_eq!(b.tokens(0), 3.0);
    assert_eq!(drain(&b, 0), 3);
    assert_eq!(b.rate(), (60.0, 3));
}

#[test]
fn growing_capacity_adds_no_tokens() {
    let b = TokenBucket::new(60.0, 3);
    b.try_acquire(0).unwrap();
    b.set_rate(60.0, 10, 0);
    assert_eq!(b.tokens(0), 2.0);
    assert_eq!(drain(&b, 0), 2);
    // Room for the bigger burst comes with time.
    assert_eq!(b.tokens(10 * S), 10.0);
    assert_eq!(drain(&b, 10 * S), 10);
}

#[test]
fn a_pause_blocks_until_exactly_its_end_then_frees_exactly_one_token() {
    let b = TokenBucket::new(60.0, 5);
    b.pause_until(7 * S);
    assert_eq!(b.try_acquire(0), Err(Duration::from_secs(7)));
    assert_eq!(b.try_acquire(7 * S - 1), Err(Duration::from_nanos(1)));
    assert_eq!(b.try_acquire(7 * S), Ok(()));
    assert_eq!(b.try_acquire(7 * S), Err(Duration::from_secs(1)));
    assert_eq!(b.try_acquire(8 * S), Ok(()));
}

#[test]
fn an_earlier_pause_never_shortens_a_later_one() {
    let b = TokenBucket::new(60.0, 1);
    b.pause_until(10 * S);
    b.pause_until(5 * S);
    assert_eq!(b.wait_time(0), Duration::from_secs(10));
}

#[test]
fn a_refund_gives_a_token_back_but_never_above_capacity() {
    let b = TokenBucket::new(60.0, 2);
    b.try_acquire(0).unwrap();
    b.refund(0);
    assert_eq!(b.tokens(0), 2.0);
    b.refund(0);
    assert_eq!(b.tokens(0), 2.0, "a full bucket stays full");
    assert_eq!(drain(&b, 0), 2);
    b.refund(0);
    assert_eq!(b.tokens(0), 1.0);
    // A partial token topped up by a refund does not overflow.
    let b = TokenBucket::new(60.0, 1);
    b.try_acquire(0).unwrap();
    assert_eq!(b.tokens(S / 2), 0.5);
    b.refund(S / 2);
    assert_eq!(b.tokens(S / 2), 1.0);
    assert_eq!(drain(&b, S / 2), 1);
}

#[test]
fn wait_time_agrees_with_try_acquire() {
    let b = TokenBucket::new(600.0, 3);
    let mut now = 0;
    for step in 0..200u64 {
        now += (step * 37 % 101) * MS;
        let wait = b.wait_time(now);
        match b.try_acquire(now) {
            Ok(()) => assert_eq!(wait, Duration::ZERO, "at {now}"),
            Err(w) => assert_eq!(wait, w, "at {now}"),
        }
    }
}

// === Properties ===

/// Replays `arrivals` (sorted nanos) and returns the admitted times.
fn admitted(b: &TokenBucket, arrivals: &[u64]) -> Vec<u64> {
    arrivals
        .iter()
        .copied()
        .filter(|&t| b.try_acquire(t).is_ok())
        .collect()
}

fn schedule(max_gap: u64) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0..max_gap, 1..400).prop_map(|gaps| {
        let mut t = 1_000 * S; // well past the epoch, so the first token is not special
        gaps.into_iter()
            .map(|g| {
                t += g;
                t
            })
            .collect()
    })
}

proptest! {
    /// For admitted times `a_i <= a_j`, `j - i + 1 <= (a_j - a_i) / T + capacity`:
    /// no window of any length admits more than its share plus one burst.
    #[test]
    fn no_window_admits_more_than_rate_times_length_plus_capacity(
        rpm in 1.0f64..100_000.0,
        capacity in 1u32..50,
        gap_scale in prop::sample::select(vec![MS, 10 * MS, 100 * MS, S]),
        gaps in prop::collection::vec(0u64..1_000, 1..400),
    ) {
        let t_ns = interval_nanos(rpm);
        let b = TokenBucket::new(rpm, capacity);
        let mut t = 1_000 * S;
        let arrivals: Vec<u64> = gaps
            .into_iter()
            .map(|g| {
                t += g * gap_scale / 1_000;
                t
            })
            .collect();
        let a = admitted(&b, &arrivals);
        let cap = u128::from(capacity);
        for i in 0..a.len() {
            for j in i..a.len() {
                let count = (j - i + 1) as u128;
                if count > cap {
                    prop_assert!(
                        (count - cap) * u128::from(t_ns) <= u128::from(a[j] - a[i]),
                        "{count} admitted in [{}, {}] at T={t_ns} b={capacity}",
                        a[i],
                        a[j]
                    );
                }
            }
        }
    }

    /// Whatever the schedule, the first `capacity` arrivals at one instant are admitted.
    #[test]
    fn a_fresh_bucket_admits_its_whole_burst(
        rpm in 1.0f64..100_000.0,
        capacity in 1u32..50,
        arrivals in schedule(S),
    ) {
        let b = TokenBucket::new(rpm, capacity);
        prop_assert_eq!(drain(&b, arrivals[0]), u64::from(capacity));
    }

    /// A rate change never creates tokens: right after `set_rate(new)`, what can be
    /// admitted at once is at most what was free before (and at most the new capacity).
    #[test]
    fn rate_changes_never_produce_a_burst(
        start_rpm in 1.0f64..100_000.0,
        start_cap in 1u32..50,
        steps in prop::collection::vec(
            (0u64..2_000, 1.0f64..100_000.0, 1u32..50, 0u32..5),
            1..60,
        ),
    ) {
        let b = TokenBucket::new(start_rpm, start_cap);
        let mut now = 1_000 * S;
        for (gap_ms, rpm, cap, takes) in steps {
            now += gap_ms * MS;
            for _ in 0..takes {
                let _ = b.try_acquire(now);
            }
            let before = b.tokens(now).max(0.0).floor() as u64;
            b.set_rate(rpm, cap, now);
            let after = drain(&b, now);
            prop_assert!(
                after <= before.min(u64::from(cap)),
                "{after} admitted after set_rate({rpm}, {cap}) with {before} free before"
            );
        }
    }
}
