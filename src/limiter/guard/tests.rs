//! The guard's rules on explicit clock nanoseconds, each against a brute-force count of
//! the sends the test itself kept.

use super::*;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// Well past the clock's epoch, and a whole number of sub-windows for 62 s spans.
const T0: u64 = 62_000 * S;

fn no_margin() -> Margin {
    Margin {
        fraction: 0.0,
        floor: Duration::ZERO,
    }
}

/// A guard whose span is exactly `window`.
fn guard(window: Duration, limit: u32, max_limit: u32) -> WindowGuard {
    WindowGuard::new(window, no_margin(), limit, max_limit)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Claims at `now` and stamps at once; panics if refused.
fn send(g: &WindowGuard, now: u64) -> u64 {
    let claim = g.try_claim(now).expect("admitted");
    g.stamp(claim.slot, now)
}

/// Pending plus stamps still in the span at `now`: what the rule compares.
fn brute_count(pending: usize, stamps: &[u64], now: u64, span: u64) -> usize {
    pending + stamps.iter().filter(|&&s| s + span > now).count()
}

/// The most stamps any half-open window `(t - span, t]` holds.
fn max_in_any_span(stamps: &[u64], span: u64) -> usize {
    let mut sorted = stamps.to_vec();
    sorted.sort_unstable();
    let mut first = 0;
    let mut most = 0;
    for last in 0..sorted.len() {
        while sorted[first] + span <= sorted[last] {
            first += 1;
        }
        most = most.max(last - first + 1);
    }
    most
}

// === The rule, exact mode ===

#[test]
fn limit_sends_then_a_refusal_that_ends_when_the_oldest_leaves() {
    let g = guard(secs(60), 3, 40);
    for i in 0..3 {
        assert_eq!(g.try_claim(T0 + i * S).map(|c| c.count), Ok(i as u32 + 1));
    }
    // Claimed but pending: a quarter of the margin (at least 1 ms) while only pending
    // claims stand in the way.
    assert_eq!(g.try_claim(T0 + 3 * S), Err(Duration::from_millis(1)));

    let g = guard(secs(60), 3, 40);
    for i in 0..3 {
        send(&g, T0 + i * S);
    }
    assert_eq!(g.try_claim(T0 + 3 * S), Err(secs(57)));
    assert_eq!(g.wait_time(T0 + 3 * S), secs(57));
    assert_eq!(g.try_claim(T0 + 60 * S - 1), Err(Duration::from_nanos(1)));
    assert_eq!(g.wait_time(T0 + 60 * S), Duration::ZERO);
    assert_eq!(g.try_claim(T0 + 60 * S).map(|c| c.count), Ok(3));
}

#[test]
fn a_send_leaves_the_span_exactly_window_plus_margin_after_its_stamp() {
    let margin = Margin {
        fraction: 0.01,
        floor: Duration::from_millis(50),
    };
    let g = WindowGuard::new(secs(10), margin, 1, 40);
    let span = 10 * S + 100 * MS;
    assert_eq!(g.span_nanos(), span);
    send(&g, T0);
    assert_eq!(g.in_span(T0 + span - 1), 1);
    assert_eq!(g.try_claim(T0 + span - 1), Err(Duration::from_nanos(1)));
    assert_eq!(g.in_span(T0 + span), 0);
    assert!(g.try_claim(T0 + span).is_ok());
}

#[test]
fn a_pending_claim_counts_whatever_its_age_and_a_stamp_replaces_it() {
    let margin = Margin {
        fraction: 0.0,
        floor: Duration::from_millis(400),
    };
    let g = WindowGuard::new(secs(1), margin, 1, 40);
    let claim = g.try_claim(T0).unwrap();
    let much_later = T0 + 1_000 * S;
    assert_eq!(g.in_span(much_later), 1);
    assert_eq!(
        g.sent_in(much_later, g.span_nanos()),
        0,
        "pending is not sent"
    );
    // Only a pending claim in the way: a quarter of the margin.
    assert_eq!(g.try_claim(much_later), Err(Duration::from_millis(100)));
    assert_eq!(g.stamp(claim.slot, much_later), much_later);
    assert_eq!(g.try_claim(much_later), Err(Duration::from_millis(1_400)));
    assert_eq!(g.sent_in(much_later, g.span_nanos()), 1);
}

#[test]
fn a_release_frees_the_claim_at_once() {
    let g = guard(secs(60), 1, 40);
    let a = g.try_claim(T0).unwrap();
    assert!(g.try_claim(T0).is_err());
    g.release(a.slot);
    assert_eq!(g.in_span(T0), 0);
    assert_eq!(g.try_claim(T0).map(|c| c.count), Ok(1));
    assert_eq!(g.newest(), None, "nothing was sent");
}

#[test]
fn a_stamp_later_than_the_claim_moves_the_expiry() {
    let g = guard(secs(60), 1, 40);
    let a = g.try_claim(T0).unwrap();
    assert_eq!(g.stamp(a.slot, T0 + 5 * S), T0 + 5 * S);
    assert_eq!(g.try_claim(T0 + 60 * S), Err(secs(5)));
    assert!(g.try_claim(T0 + 65 * S - 1).is_err());
    assert!(g.try_claim(T0 + 65 * S).is_ok());
}

#[test]
fn a_stamp_earlier_than_the_claim_is_recorded_at_the_claim_time() {
    let g = guard(secs(60), 2, 40);
    let a = g.try_claim(T0).unwrap();
    assert_eq!(a.slot.claimed_at(), T0);
    assert_eq!(g.stamp(a.slot, T0 - S), T0);
    assert_eq!(g.newest(), Some(T0));
    assert_eq!(g.sent_in(T0, 1), 1);
}

#[test]
fn lowering_the_limit_keeps_the_history_and_admits_nothing_until_below_it() {
    let g = guard(secs(60), 10, 40);
    for i in 0..10 {
        send(&g, T0 + i * S);
    }
    g.set_limit(5);
    // Ten in the span, five allowed: six must leave, the sixth oldest (sent at 5 s) at
    // 65 s.
    let now = T0 + 10 * S;
    assert_eq!(g.in_span(now), 10);
    assert_eq!(g.try_claim(now), Err(secs(55)));
    assert_eq!(g.wait_time(now), secs(55));
    assert!(g.try_claim(T0 + 65 * S - 1).is_err());
    assert_eq!(g.try_claim(T0 + 65 * S).map(|c| c.count), Ok(5));
    assert_eq!(g.try_claim(T0 + 65 * S), Err(secs(1)));
}

#[test]
fn raising_the_limit_admits_at_once() {
    let g = guard(secs(60), 2, 40);
    send(&g, T0);
    send(&g, T0);
    assert!(g.try_claim(T0).is_err());
    g.set_limit(4);
    assert_eq!(g.limit(), 4);
    assert_eq!(g.try_claim(T0).map(|c| c.count), Ok(3));
    assert_eq!(g.try_claim(T0).map(|c| c.count), Ok(4));
    assert!(g.try_claim(T0).is_err());
}

#[test]
fn the_limit_is_at_least_one() {
    let g = guard(secs(60), 0, 40);
    assert_eq!(g.limit(), 1);
    g.set_limit(0);
    assert_eq!(g.limit(), 1);
    assert!(g.try_claim(T0).is_ok());
    assert!(g.try_claim(T0).is_err());
}

#[test]
fn the_margin_is_the_larger_of_the_fraction_and_the_floor() {
    let m = Margin {
        fraction: 0.005,
        floor: Duration::from_millis(50),
    };
    assert_eq!(m.of(secs(60)), Duration::from_millis(300));
    assert_eq!(m.of(secs(1)), Duration::from_millis(50), "the floor");
    for fraction in [-1.0, f64::NAN] {
        let m = Margin { fraction, ..m };
        assert_eq!(m.of(secs(60)), Duration::from_millis(50));
    }
    let g = WindowGuard::new(secs(60), m, 40, 40);
    assert_eq!(g.window(), secs(60));
    assert_eq!(g.span_nanos(), 60 * S + 300 * MS);
}

#[test]
fn forced_sends_are_counted_by_later_claims() {
    let g = guard(secs(60), 2, 40);
    let f = g.force_claim(T0);
    assert_eq!(g.in_span(T0), 1, "pending until stamped");
    g.stamp(f, T0);
    let c = g.try_claim(T0).unwrap();
    assert_eq!(c.count, 2);
    g.stamp(c.slot, T0);
    let over = g.force_claim(T0);
    g.stamp(over, T0 + S);
    assert_eq!(g.in_span(T0 + S), 3, "forced past the limit, still counted");
    // Two must leave: the second oldest (the claim, stamped at T0) at 60 s.
    assert_eq!(g.try_claim(T0 + S), Err(secs(59)));
    assert_eq!(g.try_claim(T0 + 60 * S).map(|c| c.count), Ok(2));
}

#[test]
fn forced_sends_beyond_the_ring_are_counted_through_the_sub_windows() {
    // A ring of 8 + 1 + 1 slots: ten forced sends fill it, five more overflow it.
    let g = guard(secs(62), 8, 8);
    let (span, w) = (g.span_nanos(), g.subs.width());
    assert_eq!(w, S);
    for _ in 0..10 {
        let f = g.force_claim(T0);
        g.stamp(f, T0);
    }
    assert_eq!(g.ring.used(), g.ring.len());
    let late = T0 + 10 * S;
    for _ in 0..5 {
        let f = g.force_claim(late);
        g.stamp(f, late);
    }
    assert_eq!(g.in_span(late), 15);
    // The ring's ten leave at T0 + span; the five overflowed ones still count, and the
    // ten too until their sub-window (1 s wide) has left.
    assert_eq!(g.in_span(T0 + span), 15);
    assert_eq!(g.try_claim(T0 + span), Err(secs(1)));
    for k in 6..=8 {
        assert_eq!(g.try_claim(T0 + span + S).map(|c| c.count), Ok(k));
    }
    assert!(g.try_claim(T0 + span + S).is_err());
}

#[test]
fn the_claim_count_is_the_number_in_the_span_including_itself() {
    let g = guard(secs(10), 5, 40);
    send(&g, T0);
    let _pending = g.try_claim(T0 + S).unwrap();
    send(&g, T0 + 2 * S);
    // At 10.5 s the first has left: one pending, one stamped, then this one.
    assert_eq!(g.try_claim(T0 + 10 * S + S / 2).map(|c| c.count), Ok(3));
    assert_eq!(g.in_span(T0 + 10 * S + S / 2), 3);
}

#[test]
fn sent_in_counts_stamped_sends_in_the_half_open_span() {
    let g = guard(secs(60), 10, 40);
    for i in 0..3 {
        send(&g, T0 + i * S);
    }
    let _pending = g.try_claim(T0 + 2 * S).unwrap();
    assert_eq!(
        g.sent_in(T0 + 2 * S, 2 * S),
        2,
        "T0 is not after now - span"
    );
    assert_eq!(g.sent_in(T0 + 2 * S, 2 * S + 1), 3);
    assert_eq!(
        g.sent_in(T0 + S, 10 * S),
        2,
        "sends after now are not counted"
    );
}

#[test]
fn newest_is_the_latest_stamp() {
    let g = guard(secs(60), 10, 40);
    assert_eq!(g.newest(), None);
    let a = g.try_claim(T0).unwrap();
    let b = g.try_claim(T0).unwrap();
    g.stamp(b.slot, T0 + 2 * S);
    g.stamp(a.slot, T0 + S);
    assert_eq!(g.newest(), Some(T0 + 2 * S));
}

#[test]
fn the_ring_touches_about_as_many_slots_as_the_limit() {
    let g = guard(secs(60), 40, 4_096);
    let mut now = T0;
    let mut sent = 0;
    for _ in 0..4_000 {
        now += 60 * S / 100;
        if let Ok(c) = g.try_claim(now) {
            g.stamp(c.slot, now);
            sent += 1;
        }
    }
    // 40 per 60 s over 2,400 s.
    assert_eq!(sent, 40 * 40);
    assert!(g.ring.used() <= 41, "{} slots used", g.ring.used());
}

// === Sub-window mode ===

#[test]
fn sub_window_mode_counts_the_oldest_sub_window_whole() {
    // Limit 100 above a ring of 10: sub-windows of 1 s over a 62 s span.
    let g = guard(secs(62), 100, 10);
    assert_eq!(g.subs.width(), S);
    for _ in 0..100 {
        send(&g, T0 + S / 2);
    }
    assert!(g.try_claim(T0 + 62 * S).is_err());
    // Exactly, the sends left at 62.5 s; counted by whole second, they leave at 63 s.
    assert_eq!(
        g.try_claim(T0 + 62 * S + S / 2),
        Err(Duration::from_millis(500))
    );
    assert_eq!(g.wait_time(T0 + 63 * S - 1), Duration::from_nanos(1));
    assert!(g.try_claim(T0 + 63 * S).is_ok());
}

#[test]
fn sub_window_mode_never_admits_more_than_the_limit_in_any_span() {
    let g = guard(secs(1), 50, 10);
    let span = g.span_nanos();
    let mut rng = fastrand::Rng::with_seed(13);
    let (mut now, mut stamps, mut pending) = (T0, Vec::new(), Vec::new());
    let mut admitted = 0;
    for _ in 0..20_000 {
        now += rng.u64(0..span / 10);
        let recent = &stamps[stamps.len().saturating_sub(200)..]; // stamps are in order
        let before = brute_count(pending.len(), recent, now, span);
        match g.try_claim(now) {
            Ok(c) => {
                assert!(before < 50, "admitted at {before}");
                assert!(c.count as usize > before);
                pending.push(c.slot);
                admitted += 1;
            }
            Err(wait) => assert!(wait > Duration::ZERO),
        }
        // Stamp or release some pending claims, in any order.
        while !pending.is_empty() && rng.u8(..3) > 0 {
            let slot = pending.swap_remove(rng.usize(..pending.len()));
            if rng.u8(..10) == 0 {
                g.release(slot);
            } else {
                stamps.push(g.stamp(slot, now));
            }
        }
    }
    assert!(max_in_any_span(&stamps, span) <= 50);
    // About 20 arrivals per span against a limit of 50: the limit hardly binds here...
    assert!(admitted > 19_000, "{admitted}");
    // ...and at 100 per span it does, and the counts keep up: 50 per span, less the
    // partial sub-window counted whole.
    let start = now;
    let mut sent = 0;
    for _ in 0..20_000 {
        now += span / 100;
        if let Ok(c) = g.try_claim(now) {
            stamps.push(g.stamp(c.slot, now));
            sent += 1;
        }
    }
    let spans = (now - start) / span;
    assert!(
        sent <= 50 * (spans + 1) && sent >= 45 * spans,
        "{sent} in {spans} spans"
    );
    assert!(max_in_any_span(&stamps, span) <= 50);
}

#[test]
fn switching_from_sub_windows_to_exact_keeps_the_history() {
    let g = guard(secs(62), 20, 10);
    let span = g.span_nanos();
    for i in 0..20 {
        send(&g, T0 + i * MS);
    }
    g.set_limit(5);
    assert!(g.try_claim(T0 + S).is_err(), "20 in the span, 5 allowed");
    // The sub-window sends count until their sub-window (T0's, 1 s wide) leaves.
    assert_eq!(g.try_claim(T0 + span), Err(secs(1)));
    let after = T0 + span + S;
    for k in 1..=5 {
        assert_eq!(g.try_claim(after).map(|c| c.count), Ok(k));
    }
    assert!(g.try_claim(after).is_err());
}

#[test]
fn switching_from_exact_to_sub_windows_keeps_the_history() {
    let g = guard(secs(62), 10, 10);
    for _ in 0..10 {
        send(&g, T0);
    }
    g.set_limit(15);
    for k in 11..=15 {
        assert_eq!(g.try_claim(T0 + S).map(|c| c.count), Ok(k));
    }
    assert!(g.try_claim(T0 + S).is_err());
    assert_eq!(g.in_span(T0 + S), 15);
}

#[test]
fn a_claim_with_a_stale_clock_decides_at_the_latest_sub_window_stamped() {
    let g = guard(secs(62), 100, 10);
    send(&g, T0 + 5 * S + S / 2);
    let stale = g.try_claim(T0 + S).unwrap();
    assert_eq!(stale.slot.claimed_at(), T0 + 5 * S);
    assert_eq!(
        g.stamp(stale.slot, T0 + 2 * S),
        T0 + 5 * S,
        "never before its claim"
    );
}

#[test]
fn a_stamp_older_than_the_latest_sub_window_is_recorded_at_its_start() {
    let g = guard(secs(62), 100, 10);
    let old = g.force_claim(T0);
    send(&g, T0 + 2 * S + S / 2);
    // Sub-windows are 1 s: the head is at T0 + 2 s.
    assert_eq!(g.stamp(old, T0), T0 + 2 * S);
    assert_eq!(g.in_span(T0 + 3 * S), 2);
}

// === Properties ===

mod properties;
