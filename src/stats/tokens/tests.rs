use std::sync::Arc;

use super::*;
use crate::stats::ProviderStats;

/// The bucket index whose upper bound is `le` (`None`: `+Inf`).
fn at(le: Option<f64>) -> usize {
    match le {
        None => RATIO_BOUNDS.len(),
        Some(le) => RATIO_BOUNDS
            .iter()
            .position(|&(n, d)| n as f64 / d as f64 == le)
            .expect("a bound"),
    }
}

#[test]
fn a_settlement_adds_the_estimate_and_the_settled_charge_and_the_usage() {
    let s = ProviderStats::default();
    s.settle_tokens(1_000, 900, Some((400, 300)));
    s.settle_tokens(50, 50, None);
    let t = s.snapshot().tokens;
    assert_eq!(
        (t.estimated, t.settled, t.prompt, t.completion),
        (1_050, 950, 400, 300)
    );
    // 1000 ÷ 700 ≈ 1.43: in the bucket up to 1.5; the one without usage is not observed.
    assert_eq!(t.ratio_count(), 1);
    assert_eq!(t.ratio[at(Some(1.5))], 1);
    assert_eq!(t.ratio_sum_micros, 1_428_571);
}

#[test]
fn a_settlement_without_usage_or_with_zero_usage_observes_no_ratio() {
    let s = ProviderStats::default();
    s.settle_tokens(10, 10, None);
    s.settle_tokens(10, 0, Some((0, 0)));
    let t = s.snapshot().tokens;
    assert_eq!((t.estimated, t.settled), (20, 10));
    assert_eq!(t.ratio_count(), 0);
    assert_eq!(t.ratio_mean(), None);
    assert!(!t.is_zero());
    assert!(TokenCounts::default().is_zero());
}

#[test]
fn each_ratio_falls_in_the_first_bucket_whose_bound_it_does_not_exceed() {
    // (estimate, actual, bucket): bounds are inclusive and compared exactly.
    let cases = [
        (1, 100, Some(0.5)),
        (50, 100, Some(0.5)),
        (51, 100, Some(0.75)),
        (75, 100, Some(0.75)),
        (90, 100, Some(0.9)),
        (91, 100, Some(1.0)),
        (100, 100, Some(1.0)),
        (101, 100, Some(1.1)),
        (110, 100, Some(1.1)),
        (125, 100, Some(1.25)),
        (150, 100, Some(1.5)),
        (200, 100, Some(2.0)),
        (201, 100, Some(3.0)),
        (500, 100, Some(5.0)),
        (501, 100, None),
        (0, 100, Some(0.5)),
        (u64::MAX, 1, None),
        (u64::MAX, u64::MAX, Some(1.0)),
    ];
    for (estimate, actual, le) in cases {
        assert_eq!(bucket(estimate, actual), at(le), "{estimate} ÷ {actual}");
    }
}

#[test]
fn the_histogram_buckets_count_and_sum_agree() {
    let s = ProviderStats::default();
    // Ratios 0.5, 1.0, 1.0, 2.0, 8.0.
    for (estimate, prompt, completion) in [(50, 60, 40), (100, 100, 0), (7, 3, 4), (20, 5, 5)] {
        s.settle_tokens(estimate, estimate, Some((prompt, completion)));
    }
    s.settle_tokens(80, 80, Some((10, 0)));
    let t = s.snapshot().tokens;
    assert_eq!(t.ratio_count(), 5);
    assert_eq!(t.ratio_sum(), 12.5);
    assert_eq!(t.ratio_mean(), Some(2.5));
    let buckets = t.ratio_buckets();
    assert_eq!(buckets.len(), RATIO_BUCKETS);
    assert_eq!(buckets[0], (0.5, 1));
    assert_eq!(buckets[at(Some(1.0))], (1.0, 2));
    assert_eq!(buckets[at(Some(2.0))], (2.0, 1));
    assert_eq!(buckets[RATIO_BOUNDS.len()], (f64::INFINITY, 1));
    assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), t.ratio_count());
    assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0), "ascending");
}

#[test]
fn an_absurd_ratio_adds_a_bounded_amount_to_the_sum() {
    let s = ProviderStats::default();
    s.settle_tokens(u64::MAX, 0, Some((1, 0)));
    s.settle_tokens(u64::MAX, 0, Some((1, 0)));
    let t = s.snapshot().tokens;
    assert_eq!(t.ratio[RATIO_BOUNDS.len()], 2);
    assert_eq!(t.ratio_sum_micros, 2 * MAX_RATIO_MICROS);
    // Usage that overflows u64 when added saturates instead of wrapping.
    s.settle_tokens(10, 10, Some((u64::MAX, 1)));
    assert_eq!(s.snapshot().tokens.ratio[0], 1);
}

#[test]
fn refusals_for_a_request_larger_than_the_window_are_counted() {
    let s = ProviderStats::default();
    s.refuse_tokens_too_large();
    s.refuse_tokens_too_large();
    assert_eq!(s.snapshot().refused_tokens_too_large, 2);
    assert!(s.snapshot().tokens.is_zero());
}

#[test]
fn concurrent_settlements_add_up_exactly() {
    const THREADS: u64 = 8;
    const EACH: u64 = 5_000;
    let s = Arc::new(ProviderStats::default());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for i in 0..EACH {
                    // Ratio 1 on even turns, 2 on odd ones.
                    let estimate = if i % 2 == 0 { 10 } else { 20 };
                    s.settle_tokens(estimate, estimate + t, Some((6, 4)));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let t = s.snapshot().tokens;
    let n = THREADS * EACH;
    assert_eq!(t.estimated, n / 2 * 30);
    assert_eq!(t.settled, n / 2 * 30 + EACH * (0..THREADS).sum::<u64>());
    assert_eq!((t.prompt, t.completion), (6 * n, 4 * n));
    assert_eq!(t.ratio[at(Some(1.0))], n / 2);
    assert_eq!(t.ratio[at(Some(2.0))], n / 2);
    assert_eq!(t.ratio_sum_micros, n / 2 * 3_000_000);
}
