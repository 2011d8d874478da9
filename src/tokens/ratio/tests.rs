use std::sync::Arc;
use std::thread;

use super::*;

/// An estimate of `base` text tokens, learnable.
fn text(base: u64) -> Estimate {
    Estimate {
        prompt: base,
        completion: 0,
        ratio_base: Some(base),
    }
}

fn scaled(t: &RatioTable, model: &str) -> u32 {
    t.factor(model).scaled()
}

#[test]
fn an_unseen_model_gets_the_fixed_ratio_whatever_the_floor() {
    let t = RatioTable::default();
    assert_eq!(t.factor("gpt-4o"), Factor::ONE);
    // A floor under 1 lets learning shrink over-estimates; a model's first requests
    // are still reserved at the fixed ratio, never below it.
    let low = RatioTable::new(
        4,
        RatioRules {
            floor: Factor::from_scaled(512),
            ..RatioRules::default()
        },
    );
    assert_eq!(low.factor("m"), Factor::ONE);
    let high = RatioTable::new(
        4,
        RatioRules {
            floor: Factor::from_scaled(1_536),
            ..RatioRules::default()
        },
    );
    assert_eq!(scaled(&high, "m"), 1_536);
}

#[test]
fn a_steady_ratio_is_learned_exactly_and_stays() {
    let t = RatioTable::default();
    // 1,280 actual for 1,024 estimated: × 1.25.
    t.observe("llama", &text(1024), 1280);
    assert_eq!(scaled(&t, "llama"), 1280);
    for _ in 0..20 {
        t.observe("llama", &text(1024), 1280);
    }
    assert_eq!(scaled(&t, "llama"), 1280);
    assert_eq!(scaled(&t, "other"), 1024, "models are learned apart");
}

#[test]
fn an_outlier_raises_the_factor_to_itself_then_fades_by_an_eighth_of_the_gap() {
    let t = RatioTable::default();
    for _ in 0..8 {
        t.observe("m", &text(1024), 1280);
    }
    t.observe("m", &text(1024), 2048); // × 2
    assert_eq!(scaled(&t, "m"), 2048, "never below the sample just seen");
    let mut seen = Vec::new();
    for _ in 0..16 {
        t.observe("m", &text(1024), 1280);
        seen.push(scaled(&t, "m"));
    }
    assert_eq!(
        seen,
        [
            1987, 1931, 1881, 1835, 1793, 1755, 1719, 1686, 1655, 1627, 1601, 1576, 1554, 1533,
            1513, 1495
        ]
    );
    for _ in 0..300 {
        t.observe("m", &text(1024), 1280);
    }
    // Settles within 2/1024 of the steady ratio (rounding keeps it on the high side).
    assert_eq!(scaled(&t, "m"), 1282);
}

#[test]
fn a_spread_of_samples_is_covered_by_mean_plus_two_deviations() {
    let t = RatioTable::default();
    t.observe("m", &text(1024), 1024); // × 1
    assert_eq!(scaled(&t, "m"), 1024);
    // × 1.5: mean 1.25, deviation 0.25 → bound 1.75, above the sample.
    t.observe("m", &text(1024), 1536);
    assert_eq!(scaled(&t, "m"), 1792);
    // × 1: mean 1.1667, the bound 1.75 - 1/8 of the gap to the new bound.
    t.observe("m", &text(1024), 1024);
    assert_eq!(scaled(&t, "m"), 1782);
}

#[test]
fn the_default_floor_never_lets_learning_cut_below_the_fixed_ratio() {
    let t = RatioTable::default();
    for _ in 0..10 {
        t.observe("english", &text(1000), 750);
    }
    assert_eq!(t.factor("english"), Factor::ONE);
    let lower = RatioTable::new(
        64,
        RatioRules {
            floor: Factor::from_scaled(256),
            ..RatioRules::default()
        },
    );
    for _ in 0..5 {
        lower.observe("english", &text(1024), 768);
    }
    assert_eq!(scaled(&lower, "english"), 768);
}

#[test]
fn short_prompts_images_token_ids_and_empty_usage_teach_nothing() {
    let t = RatioTable::default();
    t.observe("m", &text(63), 6300);
    t.observe("m", &text(1000), 0);
    let with_images = Estimate {
        prompt: 3000,
        completion: 0,
        ratio_base: None,
    };
    t.observe("m", &with_images, 9000);
    assert_eq!(t.factor("m"), Factor::ONE);
    t.observe("m", &text(64), 128);
    assert_eq!(scaled(&t, "m"), 2048);
}

#[test]
fn samples_round_up_and_are_capped_at_the_largest_factor() {
    let t = RatioTable::default();
    // 1000 ÷ 999 × 1024 = 1025.03 → the next step up.
    t.observe("a", &text(999), 1000);
    assert_eq!(scaled(&t, "a"), 1026);
    t.observe("b", &text(100), u64::MAX);
    assert_eq!(t.factor("b"), Factor::MAX);
    assert_eq!(Factor::MAX.as_f64(), 64.0);
}

#[test]
fn models_past_the_capacity_share_one_overflow_slot() {
    let t = RatioTable::new(2, RatioRules::default());
    t.observe("a", &text(1024), 1100);
    t.observe("b", &text(1024), 1200);
    t.observe("c", &text(1024), 1300);
    assert_eq!(scaled(&t, "a"), 1100);
    assert_eq!(scaled(&t, "b"), 1200);
    assert_eq!(scaled(&t, "c"), 1300);
    assert_eq!(
        scaled(&t, "d"),
        1300,
        "an unseen model of a full table reads the overflow"
    );
    let empty = RatioTable::new(2, RatioRules::default());
    assert_eq!(scaled(&empty, "d"), 1024);
}

#[test]
fn factors_apply_rounding_up_and_saturating() {
    assert_eq!(Factor::ONE.apply(7), 7);
    assert_eq!(Factor::from_scaled(1536).apply(7), 11);
    assert_eq!(Factor::from_scaled(0), Factor::from_scaled(1));
    assert_eq!(Factor::from_scaled(u32::MAX), Factor::MAX);
    assert_eq!(Factor::MAX.apply(u64::MAX), u64::MAX);
}

#[test]
fn the_state_word_round_trips_and_clamps_each_field() {
    let s = Learned {
        mean: 5,
        dev: 6,
        peak: 7,
        samples: 9,
    };
    assert_eq!(Learned::unpack(s.pack()), s);
    let over = Learned {
        mean: u64::MAX,
        dev: u64::MAX,
        peak: u64::MAX,
        samples: u64::MAX,
    };
    let back = Learned::unpack(over.pack());
    assert_eq!(
        (back.mean, back.dev, back.peak, back.samples),
        (FIELD_MAX, FIELD_MAX, FIELD_MAX, 15)
    );
    // Extreme samples stay within the fields.
    let w = step(step(0, FIELD_MAX), 0);
    assert!(Learned::unpack(w).peak <= FIELD_MAX);
}

#[test]
fn concurrent_observers_claim_distinct_slots_and_each_model_reads_its_own_ratio() {
    const THREADS: usize = 8;
    let t = Arc::new(RatioTable::default());
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                for round in 0..200 {
                    let own = format!("model-{i}-{}", round % 8);
                    t.observe(&own, &text(1024), 1024 + i as u64);
                    t.observe("shared", &text(1024), 1536);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // 64 own models and "shared" in 64 slots: every slot claimed once, by one model;
    // the one left over has the overflow slot to itself.
    let mut keys: Vec<u64> = t
        .slots
        .iter()
        .map(|s| s.key.load(Ordering::Relaxed))
        .collect();
    assert!(keys.iter().all(|&k| k != 0));
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 64, "no model holds two slots");
    for i in 0..THREADS {
        for r in 0..8 {
            assert_eq!(scaled(&t, &format!("model-{i}-{r}")), 1024 + i as u32);
        }
    }
    assert_eq!(scaled(&t, "shared"), 1536);
}

#[test]
fn racing_samples_on_one_model_are_all_counted() {
    const THREADS: u64 = 7;
    for _ in 0..100 {
        let t = Arc::new(RatioTable::default());
        let start = Arc::new(std::sync::Barrier::new(THREADS as usize));
        let handles: Vec<_> = (0..THREADS)
            .map(|k| {
                let (t, start) = (Arc::clone(&t), Arc::clone(&start));
                thread::spawn(move || {
                    start.wait();
                    t.observe("m", &text(1024), 1024 * (k + 1));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let word = t.state("m", false).unwrap().load(Ordering::Relaxed);
        let learned = Learned::unpack(word);
        assert_eq!(learned.samples, THREADS, "a sample was lost");
        // Running means of 1..=7 (× UNIT) in any order stay within rounding of 4.
        assert!(learned.mean.abs_diff(4 * UNIT) <= THREADS, "{learned:?}");
    }
}
