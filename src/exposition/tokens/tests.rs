use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::registry::Registry;

use super::*;
use crate::stats::ProviderStats;

/// Renders only the token families of `tokened`.
fn render(tokened: Vec<Tokened<'static>>) -> String {
    #[derive(Debug)]
    struct Only(Vec<Tokened<'static>>);
    impl Collector for Only {
        fn encode(&self, mut enc: DescriptorEncoder) -> Res {
            super::encode(&mut enc, &self.0)
        }
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Only(tokened)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
    out
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')
            .map(|v| v.parse().expect("a number"))
    })
}

fn view() -> TokenView {
    TokenView {
        limit: 8_000,
        ceiling: 10_000,
        stated: Some(8_000),
        waiting: 1_200,
        charged: 4_500,
        remaining: 3_500,
        held_until: 0,
    }
}

/// Three settlements: ratios 1.0, 1.5 and none (no usage).
fn counts() -> TokenCounts {
    let s = ProviderStats::default();
    s.settle_tokens(100, 100, Some((60, 40)));
    s.settle_tokens(300, 250, Some((150, 50)));
    s.settle_tokens(70, 70, None);
    s.snapshot().tokens
}

#[test]
fn no_token_budget_writes_nothing() {
    assert_eq!(render(Vec::new()), "");
}

#[test]
fn every_series_of_a_token_budget_is_written_with_its_value() {
    let text = render(vec![Tokened {
        provider: "nvidia",
        view: Some(view()),
        counts: counts(),
    }]);
    let p = "provider=\"nvidia\"";
    let want = [
        (
            format!("sidecar_tokens_total{{{p},kind=\"prompt\"}}"),
            210.0,
        ),
        (
            format!("sidecar_tokens_total{{{p},kind=\"completion\"}}"),
            90.0,
        ),
        (
            format!("sidecar_tokens_total{{{p},kind=\"estimated\"}}"),
            470.0,
        ),
        (
            format!("sidecar_tokens_total{{{p},kind=\"settled\"}}"),
            420.0,
        ),
        (format!("sidecar_token_budget_limit{{{p}}}"), 8_000.0),
        (format!("sidecar_token_budget_ceiling{{{p}}}"), 10_000.0),
        (format!("sidecar_token_budget_remaining{{{p}}}"), 3_500.0),
        (format!("sidecar_token_waiting{{{p}}}"), 1_200.0),
        (format!("sidecar_token_estimate_ratio_count{{{p}}}"), 2.0),
        (format!("sidecar_token_estimate_ratio_sum{{{p}}}"), 2.5),
        (
            format!("sidecar_token_estimate_ratio_bucket{{{p},le=\"0.9\"}}"),
            0.0,
        ),
        (
            format!("sidecar_token_estimate_ratio_bucket{{{p},le=\"1\"}}"),
            1.0,
        ),
        (
            format!("sidecar_token_estimate_ratio_bucket{{{p},le=\"1.25\"}}"),
            1.0,
        ),
        (
            format!("sidecar_token_estimate_ratio_bucket{{{p},le=\"1.5\"}}"),
            2.0,
        ),
        (
            format!("sidecar_token_estimate_ratio_bucket{{{p},le=\"5\"}}"),
            2.0,
        ),
        (
            format!("sidecar_token_estimate_ratio_bucket{{{p},le=\"+Inf\"}}"),
            2.0,
        ),
    ];
    for (series, value) in &want {
        assert_eq!(sample(&text, series), Some(*value), "{series} in:\n{text}");
    }
    let buckets = text
        .lines()
        .filter(|l| l.starts_with("sidecar_token_estimate_ratio_bucket"))
        .count();
    assert_eq!(buckets, crate::stats::tokens::RATIO_BUCKETS, "{text}");
    for (ty, family) in [
        ("counter", "sidecar_tokens_total"),
        ("histogram", "sidecar_token_estimate_ratio"),
        ("gauge", "sidecar_token_budget_limit"),
        ("gauge", "sidecar_token_budget_ceiling"),
        ("gauge", "sidecar_token_budget_remaining"),
        ("gauge", "sidecar_token_waiting"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {ty}\n")),
            "{family} {ty}:\n{text}"
        );
        assert!(text.contains(&format!("# HELP {family} ")), "{family}");
    }
    assert!(!text.contains("model"), "never a model label:\n{text}");
}

#[test]
fn counts_left_from_a_budget_turned_off_stay_but_the_budget_gauges_go() {
    let text = render(vec![Tokened {
        provider: "nvidia",
        view: None,
        counts: counts(),
    }]);
    assert_eq!(
        sample(
            &text,
            "sidecar_tokens_total{provider=\"nvidia\",kind=\"settled\"}"
        ),
        Some(420.0)
    );
    assert!(text.contains("sidecar_token_estimate_ratio_count"));
    for gone in [
        "sidecar_token_budget_limit",
        "sidecar_token_budget_ceiling",
        "sidecar_token_budget_remaining",
        "sidecar_token_waiting",
    ] {
        assert!(!text.contains(gone), "{gone}:\n{text}");
    }
}

#[test]
fn a_fresh_budget_writes_zeros_and_only_its_provider_gets_gauges() {
    let text = render(vec![
        Tokened {
            provider: "nvidia",
            view: Some(view()),
            counts: TokenCounts::default(),
        },
        Tokened {
            provider: "openai",
            view: None,
            counts: counts(),
        },
    ]);
    assert_eq!(
        sample(
            &text,
            "sidecar_tokens_total{provider=\"nvidia\",kind=\"prompt\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "sidecar_token_estimate_ratio_bucket{provider=\"nvidia\",le=\"+Inf\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "sidecar_token_budget_limit{provider=\"nvidia\"}"),
        Some(8_000.0)
    );
    assert_eq!(
        sample(&text, "sidecar_token_budget_limit{provider=\"openai\"}"),
        None
    );
}

#[test]
fn collect_reads_the_limiters_budget_and_skips_providers_that_never_had_one() {
    let app = crate::app::App::new(crate::config::testing::config("", &[]));
    let now = app.clock.now_nanos();
    let snaps: Vec<_> = app.providers.iter().map(|p| p.snapshot(now)).collect();
    assert!(collect(&app, &snaps, now).is_empty());
    // Counts alone (a budget turned off) bring the provider back.
    app.providers[0].stats.settle_tokens(10, 10, None);
    let snaps: Vec<_> = app.providers.iter().map(|p| p.snapshot(now)).collect();
    let t = collect(&app, &snaps, now);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].provider, &*app.providers[0].name);
    assert_eq!(t[0].counts.settled, 10);
    assert!(t[0].view.is_none());
}

#[test]
fn the_whole_exposition_shows_a_providers_token_budget_from_its_limiter() {
    use crate::limiter::{Limiter, Pacing, RetreatConfig};
    let mut app = crate::app::App::new(crate::config::testing::config("", &[]));
    let now = app.clock.now_nanos();
    // The provider's limiter as it is built once it holds a budget of 6,000 tokens a
    // window (what `tokens_per_minute` becomes).
    let budgeted =
        Limiter::with_pacing(40.0, 1, 8, RetreatConfig::default(), Pacing::default(), now)
            .with_token_budget(6_000);
    Arc::get_mut(&mut app).expect("the only handle").providers[0].limiter = Arc::new(budgeted);
    let text = crate::exposition::render(&app);
    let p = format!("provider=\"{}\"", app.providers[0].name);
    for (series, want) in [
        (format!("sidecar_token_budget_limit{{{p}}}"), 6_000.0),
        (format!("sidecar_token_budget_ceiling{{{p}}}"), 6_000.0),
        (format!("sidecar_token_budget_remaining{{{p}}}"), 6_000.0),
        (format!("sidecar_token_waiting{{{p}}}"), 0.0),
        (format!("sidecar_tokens_total{{{p},kind=\"settled\"}}"), 0.0),
        (format!("sidecar_token_estimate_ratio_count{{{p}}}"), 0.0),
        (
            format!("sidecar_dropped_total{{{p},reason=\"tokens_too_large\"}}"),
            0.0,
        ),
    ] {
        assert_eq!(sample(&text, &series), Some(want), "{series} in:\n{text}");
    }
}
