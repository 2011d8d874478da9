//! The table is the one list: every consumer of a run-time field follows its row.

use super::*;
use crate::config::SETTINGS;

fn configured(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    crate::config::testing::configured("", pairs)
}

/// The variable of the setting `key`.
fn variable(key: &str) -> &'static str {
    SETTINGS
        .iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("{key} is not a setting"))
        .env
}

#[test]
fn every_row_is_a_setting_whose_help_states_both_bounds() {
    for f in FIELDS {
        let help = SETTINGS.iter().find(|s| s.key == f.name).unwrap().help;
        let bounds = match f.range {
            Range::Rate { max } => format!("above 0, at most {max}"),
            Range::Integer { min, max } => format!("({min} to {max})"),
            Range::Seconds { min, max } => format!("({min} to {max})"),
            Range::Switch | Range::Level => continue,
        };
        assert!(
            help.contains(&bounds),
            "{}: {help:?} lacks {bounds:?}",
            f.name
        );
    }
}

#[test]
fn the_rows_list_the_fields_of_the_value_types_in_order() {
    let c = configured(&[]).unwrap();
    let hot = Hot::of(&c);
    let provider: Vec<&str> = hot.defaults.shown().into_iter().map(|(n, _)| n).collect();
    let global: Vec<&str> = hot.shown().into_iter().map(|(n, _)| n).collect();
    assert_eq!(provider, names(Some(Scope::Provider)));
    assert_eq!(global, names(Some(Scope::Global)));
    assert_eq!(
        names(None),
        [
            "rate_rpm",
            "bucket_capacity",
            "queue_max_size",
            "low_priority_timeout",
            "tokens_per_minute",
            "request_timeout",
            "fallback_enabled_passthrough",
            "log_level"
        ]
    );
    for f in FIELDS {
        assert_eq!(field(f.name), Some(f));
    }
}

#[test]
fn a_value_at_a_bound_is_configured_as_the_row_takes_it_and_one_past_is_refused_with_the_bound() {
    for f in FIELDS {
        let (inside, outside) = match f.range {
            Range::Rate { max } => (vec![max, 0.001], vec![max + 1.0, 0.0]),
            Range::Integer { min, max } => (vec![max as f64, min as f64], vec![max as f64 + 1.0]),
            Range::Seconds { min, max } => (vec![max, min], vec![max + 1.0, min / 2.0]),
            Range::Switch | Range::Level => continue,
        };
        for v in inside {
            let c = configured(&[(variable(f.name), &v.to_string())])
                .unwrap_or_else(|e| panic!("{} = {v}: {e}", f.name));
            let shown = Hot::of(&c)
                .shown()
                .into_iter()
                .chain(HotProvider::of(c.default_provider()).shown())
                .find(|(n, _)| *n == f.name)
                .unwrap()
                .1;
            assert_eq!(shown.as_f64(), Some(v), "{} = {v}", f.name);
        }
        for v in outside {
            let e = configured(&[(variable(f.name), &v.to_string())])
                .expect_err(&format!("{} = {v} accepted", f.name))
                .to_string();
            assert!(e.contains(&f.range.expected()), "{}: {e}", f.name);
        }
    }
}

#[test]
fn each_field_applies_as_its_row_says() {
    let base = Hot::of(&configured(&[]).unwrap());
    let changed = |pairs: &[(&str, &str)]| Hot::of(&configured(pairs).unwrap());
    let cases: &[(&str, &str)] = &[
        ("SIDECAR_RATE_RPM", "41"),
        ("SIDECAR_BUCKET_CAPACITY", "2"),
        ("SIDECAR_QUEUE_MAX_SIZE", "65"),
        ("SIDECAR_LOW_PRIORITY_TIMEOUT", "31"),
        ("SIDECAR_TOKENS_PER_MINUTE", "30000"),
        ("SIDECAR_REQUEST_TIMEOUT", "121"),
        ("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", "true"),
        ("SIDECAR_LOG_LEVEL", "debug"),
    ];
    assert_eq!(cases.len(), FIELDS.len(), "a case for every row");
    let every = [
        Applies::Limiter,
        Applies::QueueBound,
        Applies::PerRequest,
        Applies::TokenBudget,
        Applies::LogFilter,
    ];
    for (f, &(var, value)) in FIELDS.iter().zip(cases) {
        assert_eq!(var, variable(f.name));
        let new = changed(&[(var, value)]);
        assert_ne!(new, base, "{var} changes nothing");
        for how in every {
            let differs = match f.scope {
                Scope::Provider => base.providers[0].differs(&new.providers[0], how),
                Scope::Global => base.differs(&new, how),
            };
            assert_eq!(differs, how == f.applies, "{var}: {how:?}");
        }
    }
}

#[test]
fn writing_the_values_into_a_configuration_gives_them_back() {
    let mut c = configured(&[]).unwrap();
    let other = Hot::of(
        &configured(&[
            ("SIDECAR_RATE_RPM", "7"),
            ("SIDECAR_REQUEST_TIMEOUT", "3"),
            ("SIDECAR_LOG_LEVEL", "warn"),
        ])
        .unwrap(),
    );
    assert_ne!(Hot::of(&c), other);
    other.write_into(&mut c);
    assert_eq!(Hot::of(&c), other);
    assert_eq!(c.timeouts.request, Duration::from_secs(3));
}

#[test]
fn a_patch_takes_what_the_rows_accept_and_names_the_field_it_refuses() {
    let mut h = Hot::of(&configured(&[]).unwrap()).defaults;
    let patch = ProviderPatch {
        bucket_capacity: Some(1_000_000.0),
        ..ProviderPatch::default()
    };
    h.patch("providers.a.", &patch).unwrap();
    assert_eq!(h.bucket_capacity, 1_000_000);
    let patch = ProviderPatch {
        bucket_capacity: Some(1_000_001.0),
        ..ProviderPatch::default()
    };
    assert_eq!(
        h.patch("providers.a.", &patch),
        Err(Refused {
            field: "providers.a.bucket_capacity".into(),
            problem: "1000001 is out of range".into(),
            accepted: "an integer from 1 to 1000000".into(),
        })
    );
}
