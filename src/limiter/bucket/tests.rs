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

#[test]
fn the_slack_is_a_quarter_interval_capped_at_twenty_milliseconds() {
    assert_eq!(slack_nanos(interval_nanos(6000.0)), 2_500_000, "10 ms / 4");
    assert_eq!(slack_nanos(interval_nanos(600_000.0)), 25_000, "100 µs / 4");
    assert_eq!(
        slack_nanos(interval_nanos(60.0)),
        20 * MS,
        "1 s / 4, capped"
    );
    assert_eq!(slack_nanos(interval_nanos(3000.0)), 5 * MS);
    assert_eq!(
        slack_nanos(interval_nanos(750.0)),
        20 * MS,
        "exactly at the cap"
    );
    assert_eq!(slack_nanos(1), 0, "no slack below four nanoseconds");
}

#[test]
fn a_request_late_by_at_most_the_slack_is_anchored_on_its_tokens_due_time() {
    // 6000 RPM, burst 1: T = 10 ms, slack 2.5 ms.
    let b = TokenBucket::new(6000.0, 1);
    let t0 = 1_000 * S;
    assert_eq!(b.try_acquire(t0), Ok(()));
    // Due at t0 + 10 ms, taken 2 ms late: the next is still due at t0 + 20 ms.
    assert_eq!(b.try_acquire(t0 + 12 * MS), Ok(()));
    assert_eq!(
        b.try_acquire(t0 + 20 * MS - 1),
        Err(Duration::from_nanos(1))
    );
    // Exactly the slack late is still caught up.
    assert_eq!(b.try_acquire(t0 + 22 * MS + 500_000), Ok(()));
    assert_eq!(
        b.wait_time(t0 + 22 * MS + 500_000),
        Duration::from_micros(7_500)
    );
    assert_eq!(b.try_acquire(t0 + 30 * MS), Ok(()));
    // Never before the token is due: burst 1 has no tolerance.
    assert_eq!(
        b.try_acquire(t0 + 40 * MS - 1),
        Err(Duration::from_nanos(1))
    );
}

#[test]
fn lateness_past_the_slack_is_not_caught_up() {
    let b = TokenBucket::new(6000.0, 1);
    let t0 = 1_000 * S;
    assert_eq!(b.try_acquire(t0), Ok(()));
    // Due at t0 + 10 ms, taken 2.5 ms + 1 ns late: anchored on now, as without a slack.
    let late = t0 + 12 * MS + 500_000 + 1;
    assert_eq!(b.try_acquire(late), Ok(()));
    assert_eq!(b.wait_time(late), Duration::from_millis(10));
    assert_eq!(
        b.try_acquire(late + 10 * MS - 1),
        Err(Duration::from_nanos(1))
    );
    assert_eq!(b.try_acquire(late + 10 * MS), Ok(()));
}

#[test]
fn the_slack_never_lets_a_request_in_before_a_pause_ends() {
    // Full for 1 ms (within the 2.5 ms slack) when a 5 s pause starts.
    let b = TokenBucket::new(6000.0, 1);
    let t0 = 1_000 * S;
    assert_eq!(b.try_acquire(t0), Ok(()));
    let now = t0 + 11 * MS;
    b.pause_until(now + 5 * S);
    assert_eq!(b.wait_time(now), Duration::from_secs(5));
    assert_eq!(b.try_acquire(now + 5 * S - 1), Err(Duration::from_nanos(1)));
    // Taken 2 ms after the pause end: the next token is one interval after the end.
    assert_eq!(b.try_acquire(now + 5 * S + 2 * MS), Ok(()));
    assert_eq!(
        b.try_acquire(now + 5 * S + 10 * MS - 1),
        Err(Duration::from_nanos(1))
    );
    assert_eq!(b.try_acquire(now + 5 * S + 10 * MS), Ok(()));
    // With a burst: exactly one token at the end, none before, the rest one per T.
    let b = TokenBucket::new(6000.0, 3);
    b.pause_until(t0);
    assert_eq!(b.try_acquire(t0 - 1), Err(Duration::from_nanos(1)));
    assert_eq!(drain(&b, t0), 1);
    assert_eq!(drain(&b, t0 + 10 * MS - 1), 0);
    assert_eq!(drain(&b, t0 + 10 * MS), 1);
}

#[test]
fn idling_earns_no_more_than_capacity_and_at_most_the_slack_toward_the_next_token() {
    for capacity in [1u32, 3] {
        let cap = u64::from(capacity);
        // 60 RPM: T = 1 s, slack 20 ms. Drained at 0, full again at cap seconds.
        for (full_for, next_after) in [
            (0, S),                 // full just now: the next token one interval on
            (10 * MS, S - 10 * MS), // full 10 ms: 10 ms of it count toward the next
            (20 * MS, S - 20 * MS), // the whole slack
            (20 * MS + 1, S),       // past the slack: idling earns nothing
            (3600 * S, S),          // an hour
        ] {
            let b = TokenBucket::new(60.0, capacity);
            assert_eq!(drain(&b, 0), cap);
            let now = cap * S + full_for;
            assert_eq!(b.tokens(now), cap as f64, "b={cap} full for {full_for}");
            assert_eq!(drain(&b, now), cap, "b={cap} full for {full_for}");
            assert_eq!(
                b.wait_time(now),
                Duration::from_nanos(next_after),
                "b={cap} full for {full_for}"
            );
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

/// Checks `j - i + 1 <= (a_j - a_i + s) / T + capacity` for every pair of admitted
/// times, in exact integers; says which window broke it.
fn window_bound_holds(a: &[u64], t_ns: u64, capacity: u32) -> Result<(), String> {
    let cap = u128::from(capacity);
    let s_ns = u128::from(slack_nanos(t_ns));
    for i in 0..a.len() {
        for j in i..a.len() {
            let count = (j - i + 1) as u128;
            if count > cap && (count - cap) * u128::from(t_ns) > u128::from(a[j] - a[i]) + s_ns {
                return Err(format!(
                    "{count} admitted in [{}, {}] at T={t_ns} s={s_ns} b={capacity}",
                    a[i], a[j]
                ));
            }
        }
    }
    Ok(())
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
    /// For admitted times `a_i <= a_j`, `j - i + 1 <= (a_j - a_i + s) / T + capacity`:
    /// no window of any length admits more than its share, stretched by the slack, plus
    /// one burst.
    #[test]
    fn no_window_admits_more_than_rate_times_length_plus_slack_plus_capacity(
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
        prop_assert_eq!(window_bound_holds(&a, t_ns, capacity), Ok(()));
    }

    /// Arrivals a whole number of intervals apart give or take up to twice the slack:
    /// the schedule of a late dispatcher, and of a client probing the slack's edge.
    #[test]
    fn arrivals_around_each_due_time_never_beat_the_window_bound(
        rpm in prop::sample::select(vec![60.0, 600.0, 1_200.0, 6_000.0, 60_000.0]),
        capacity in 1u32..4,
        steps in prop::collection::vec((0u64..3, 0u64..=400), 1..400),
    ) {
        let t_ns = interval_nanos(rpm);
        let s_ns = slack_nanos(t_ns);
        let b = TokenBucket::new(rpm, capacity);
        let mut due = 1_000 * S;
        let arrivals: Vec<u64> = steps
            .into_iter()
            .map(|(k, jitter)| {
                due += k * t_ns;
                // From `s` early to `s` late, in hundredths of the slack.
                due - s_ns + jitter * s_ns / 200
            })
            .collect();
        let mut sorted = arrivals.clone();
        sorted.sort_unstable();
        let a = admitted(&b, &sorted);
        prop_assert_eq!(window_bound_holds(&a, t_ns, capacity), Ok(()));
    }

    /// However long and however it ends, an idle period leaves at most `capacity`
    /// tokens, and the slack earns no extra one: from the end of the idle, a window
    /// shorter than `T - s` admits at most `capacity`.
    #[test]
    fn idling_never_earns_more_than_capacity(
        rpm in 1.0f64..100_000.0,
        capacity in 1u32..20,
        takes in 0u32..40,
        // Idle for whole intervals plus up to twice the slack (the bucket fills again a
        // whole number of intervals after `t0`), or for up to a year.
        intervals in 0u64..25,
        jitter in 0u64..=200,
        long_idle in prop::option::of(0u64..31_536_000 * S),
    ) {
        let t_ns = interval_nanos(rpm);
        let s_ns = slack_nanos(t_ns);
        let b = TokenBucket::new(rpm, capacity);
        let t0 = 1_000 * S;
        for _ in 0..takes {
            let _ = b.try_acquire(t0);
        }
        let idle = long_idle.unwrap_or(intervals * t_ns + jitter * s_ns / 100);
        let now = t0 + idle;
        let at_once = drain(&b, now);
        let soon = drain(&b, now + t_ns - s_ns - 1);
        prop_assert!(at_once <= u64::from(capacity));
        prop_assert!(
            at_once + soon <= u64::from(capacity),
            "{at_once} then {soon} within T - s at T={t_ns} after {idle} ns idle"
        );
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
