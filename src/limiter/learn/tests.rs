//! Every learning rule on plain numbers: counts per window and clock nanoseconds.
use super::*;

const S: u64 = 1_000_000_000;
const W: Duration = Duration::from_secs(6);

fn learner(ceiling: u32) -> Learner {
    Learner::new(ceiling, W, Duration::from_secs(60), 0)
}

#[test]
fn per_window_is_the_rate_scaled_to_the_window_rounded_down_at_least_one() {
    assert_eq!(per_window(40.0, Duration::from_secs(60)), 40);
    assert_eq!(per_window(600.0, W), 60);
    assert_eq!(per_window(59.0, Duration::from_secs(1)), 1);
    assert_eq!(per_window(0.5, Duration::from_secs(60)), 1);
    assert!((rpm_of(60, W) - 600.0).abs() < 1e-9);
}

#[test]
fn nothing_learned_means_the_configured_ceiling() {
    let l = learner(60);
    assert_eq!(
        (l.limit(), l.learned(), l.source()),
        (60, 60, Source::Config)
    );
    assert_eq!(
        l.next_probe_at(),
        None,
        "nothing above the ceiling to probe"
    );
}

#[test]
fn a_429_on_the_kth_send_teaches_k_minus_one() {
    let mut l = learner(60);
    let r = l.on_refused(3 * S, 3 * S, 49, 48, 9 * S);
    assert_eq!(
        r.change,
        Some(Change {
            from: 60,
            to: 48,
            source: Source::Learned429,
            why: Why::Refused { count: 49 }
        })
    );
    assert_eq!(r.pause_until, None);
    assert_eq!(l.limit(), 48);
}

#[test]
fn later_429s_of_the_same_burst_never_raise_what_the_first_taught() {
    let mut l = learner(60);
    l.on_refused(3 * S, 3 * S, 49, 0, 9 * S);
    for count in [49, 50, 51] {
        assert_eq!(l.on_refused(3 * S, 3 * S, count, 0, 9 * S).change, None);
    }
    assert_eq!(l.limit(), 48);
}

#[test]
fn a_429_at_a_proven_count_pauses_until_the_window_empties_and_the_next_window_relearns() {
    let mut l = learner(60);
    // 60 per window proven: every send was the 60th of its window and answered.
    let r = l.on_refused(100 * S, 100 * S, 60, 60, 106 * S);
    assert_eq!(r.change, None, "nothing learned from a count that was fine");
    assert_eq!(r.pause_until, Some(106 * S));
    assert!(l.relearning());
    // Siblings from the same window teach nothing.
    let r = l.on_refused(100 * S + 1, 100 * S, 60, 0, 106 * S);
    assert_eq!(r, Refused::default());
    // The next window draws a 429 on its 31st send: the limit is 30.
    let r = l.on_refused(109 * S, 109 * S, 31, 30, 115 * S);
    assert_eq!(
        r.change.map(|c| (c.to, c.why)),
        Some((30, Why::Relearned { count: 31 }))
    );
    assert!(!l.relearning());
}

#[test]
fn a_transient_refusal_at_a_proven_count_leaves_the_limit_after_three_windows() {
    let mut l = learner(60);
    l.on_refused(100 * S, 100 * S, 60, 60, 106 * S);
    assert_eq!(l.tick(106 * S + 18 * S, true, 60), None);
    assert!(!l.relearning());
    assert_eq!(l.limit(), 60);
}

#[test]
fn headers_state_the_limit_once_and_a_repeat_does_not_undo_a_429() {
    let mut l = learner(60);
    let c = l.on_header_limit(500).expect("500 rpm is 50 a window");
    assert_eq!((c.to, c.source), (50, Source::Header));
    l.on_refused(S, S, 41, 0, 7 * S);
    assert_eq!(l.limit(), 40);
    assert_eq!(l.on_header_limit(500), None, "the same header again");
    assert_eq!(l.limit(), 40);
    assert_eq!(
        l.on_header_limit(450).map(|c| c.to),
        Some(45),
        "a new figure"
    );
    assert_eq!(l.next_probe_at(), None, "a stated limit is not probed");
}

#[test]
fn a_probe_lifts_to_the_ceiling_for_one_window_only_while_demand_exceeds_the_limit() {
    let mut l = learner(60);
    l.on_refused(S, S, 49, 0, 7 * S); // 48, and the interval counts from here
    assert_eq!(l.next_probe_at(), Some(61 * S));
    assert_eq!(l.tick(60 * S, true, 48), None, "not before the interval");
    assert_eq!(l.tick(62 * S, false, 30), None, "no demand, no probe");
    let c = l.tick(63 * S, true, 48).expect("probe starts");
    assert_eq!((c.from, c.to, c.why), (48, 60, Why::ProbeStart));
    assert_eq!(l.source(), Source::Probe);
    assert_eq!(l.tick(68 * S, true, 55), None, "the probe lasts one window");
    // No 429 during the probe: the count sent is the new limit.
    let c = l.tick(69 * S, true, 55).expect("probe ends");
    assert_eq!((c.from, c.to, c.why), (60, 55, Why::ProbeHeld { sent: 55 }));
    assert_eq!(l.next_probe_at(), Some(129 * S));
}

#[test]
fn a_429_during_a_probe_teaches_its_count_and_ends_the_probe() {
    let mut l = learner(60);
    l.on_refused(S, S, 49, 0, 7 * S);
    l.tick(61 * S, true, 48);
    let r = l.on_refused(62 * S, 62 * S, 49, 48, 68 * S);
    assert_eq!(r.change.map(|c| (c.from, c.to)), Some((60, 48)));
    assert!(!l.probing());
    assert_eq!(
        l.next_probe_at(),
        Some(122 * S),
        "at most one probe 429 per interval"
    );
}

#[test]
fn a_probe_that_sends_no_more_than_the_learned_limit_keeps_it() {
    let mut l = learner(60);
    l.on_refused(S, S, 49, 0, 7 * S);
    l.tick(61 * S, true, 48);
    let c = l.tick(67 * S, true, 20).expect("back from the ceiling");
    assert_eq!(c.to, 48);
}

#[test]
fn a_raised_provider_limit_is_found_by_the_next_probe() {
    let mut l = learner(60);
    l.on_refused(S, S, 31, 0, 7 * S); // 30
    l.tick(61 * S, true, 30);
    let c = l.tick(67 * S, true, 60).expect("held at the ceiling");
    assert_eq!((c.to, l.source()), (60, Source::Probe));
    assert_eq!(
        l.next_probe_at(),
        None,
        "at the ceiling: nothing left to probe"
    );
}

#[test]
fn a_lower_ceiling_caps_the_learned_limit_and_forget_returns_to_config() {
    let mut l = learner(60);
    l.on_refused(S, S, 49, 0, 7 * S);
    assert_eq!(l.set_ceiling(30).map(|c| c.to), Some(30));
    assert_eq!(
        l.set_ceiling(60),
        None,
        "the learned limit stays capped at 30"
    );
    assert_eq!(l.limit(), 30);
    assert_eq!(
        l.forget(10 * S).map(|c| (c.to, c.source)),
        Some((60, Source::Config))
    );
}

#[test]
fn a_restored_limit_is_in_force_with_its_source() {
    let mut l = learner(60);
    assert_eq!(l.restore(45).map(|c| c.to), Some(45));
    assert_eq!(l.source(), Source::State);
    assert_eq!(Source::parse("learned_429"), Some(Source::Learned429));
}

#[test]
fn no_probe_right_after_a_429_taught_the_limit() {
    let mut l = learner(60);
    // Past the first probe time, a 429 teaches 30: the next probe waits a whole interval.
    let c = l
        .on_refused(100 * S, 100 * S, 31, 0, 106 * S)
        .change
        .unwrap();
    assert_eq!(c.to, 30);
    assert_eq!(l.tick(101 * S, true, 30), None, "no probe one second later");
    assert_eq!(l.next_probe_at(), Some(160 * S));
    assert!(l
        .tick(160 * S, true, 30)
        .is_some_and(|c| c.why == Why::ProbeStart));
}
