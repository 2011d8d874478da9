//! The configuration contract: defaults, layering, keys, providers and every error message.
//!
//! Environment values come from a `HashMap` (the [`EnvSource`] tests hand in); nothing
//! here mutates the process environment.

use super::*;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

// === helpers ===

use super::testing::env;

/// A TOML file in its own temporary directory (removed when the guard drops).
struct TomlFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn toml_file(text: &str) -> TomlFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    std::fs::write(&path, text).unwrap();
    TomlFile { _dir: dir, path }
}

fn load_env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    load(None, &env(pairs), Settings::default())
}

fn load_toml(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let file = toml_file(text);
    load(Some(&file.path), &env(pairs), Settings::default())
}

fn error_of(result: Result<Config, ConfigError>, case: &str) -> ConfigError {
    match result {
        Ok(c) => panic!("{case}: accepted, gave {c:?}"),
        Err(e) => e,
    }
}

/// A [`ConfigError::Invalid`] line names the setting, the value (quoted) and what is accepted.
fn assert_invalid(err: &ConfigError, setting: &str, value: &str, expected: &str) {
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "more than one line: {msg:?}");
    assert!(
        matches!(err, ConfigError::Invalid { .. }),
        "not an Invalid error: {err:?}"
    );
    // The setting is named as it was written: its variable, its flag or its key.
    let mut names = vec![setting.to_owned()];
    if let Some(s) = SETTINGS.iter().find(|s| s.key == setting) {
        names.push(s.env.to_owned());
        names.push(format!("--{}", s.key.replace('_', "-")));
    }
    assert!(
        names
            .iter()
            .any(|n| msg.contains(&format!("{n}={value:?}"))),
        "{msg:?} does not name {setting}={value:?} (as any of {names:?})"
    );
    assert!(
        msg.contains(&format!("expected {expected}")),
        "{msg:?} does not say `expected {expected}`"
    );
}

// What each check accepts, as its error says.
const IP: &str = "an IP address such as 127.0.0.1, 0.0.0.0 or ::1 (or localhost)";
const PORT: &str = "an integer from 0 to 65535";
const OTHER_PORT: &str = "a port different from listen_port";
const URL: &str =
    "an http:// or https:// URL with a host, e.g. https://integrate.api.nvidia.com/v1";
const NO_USERINFO: &str = "a URL without user:password@ (put the key in upstream_api_key)";
const NO_QUERY: &str = "a base URL without a query string";
const RPM: &str = "requests per minute greater than 0 and at most 6000000";
const SECONDS: &str = "a number of seconds from 0.001 to 86400";
const NON_NEGATIVE: &str = "a non-negative integer";
const MIN_1: &str = "an integer of at least 1";
const MIN_1024: &str = "an integer of at least 1024";
const QUEUE: &str = "an integer from 0 to 1000000";
const CAPACITY: &str = "an integer from 1 to 1000000";
const BOOL: &str = "true or false (also 1/0, yes/no, on/off)";
const LEVEL: &str = r#"one of "error", "warn", "info", "debug", "trace""#;
const WORKERS: &str = "0 (one per core) or a count up to 1024";
const KEY_VAR: &str = "the name of an environment variable that is set and not empty";
const NAME: &str = "a non-empty name of letters, digits, '-', '_' or '.'";
const NO_PROVIDERS: &str =
    "the name of a [[providers]] entry (none declared; the implicit one is \"nvidia\")";
const MODELS: &str = "model patterns without spaces, '*' as wildcard (e.g. \"meta/*\")";

// === defaults ===

#[test]
fn with_nothing_set_the_sidecar_paces_one_nvidia_provider_at_40_rpm() {
    let c = load(None, &HashMap::new(), Settings::default()).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.metrics_listen, "127.0.0.1:9090".parse().unwrap());
    assert!(!c.fallback_enabled_passthrough);
    assert_eq!(c.timeouts.request, Duration::from_secs(120));
    assert_eq!(c.log_level, tracing::Level::INFO);
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(c.admin_token.is_none());

    assert_eq!(c.providers.len(), 1);
    assert_eq!(c.default_provider, 0);
    let p = c.default_provider();
    assert_eq!(p.name, "nvidia");
    assert_eq!(p.upstream.display(), "https://integrate.api.nvidia.com/v1");
    assert_eq!(p.upstream.port, 443);
    assert_eq!(p.models, vec!["*".to_string()]);
    assert!(p.api_key.is_none());
    assert_eq!(p.rate_rpm, 40.0);
    assert_eq!(p.bucket_capacity, 1);
    assert_eq!(p.queue_max_size, 64);
    assert_eq!(p.low_priority_timeout, Duration::from_secs(30));
    assert!(p.fallback.is_none());
    assert_eq!(p.budget, "nvidia");
    assert!(c.redis.is_none(), "no Redis unless a URL is set");
}

#[test]
fn every_documented_default_parses() {
    let d = Settings::defaults();
    assert_eq!(d.rate_rpm, Some(40.0));
    assert_eq!(d.listen_port, Some(8080));
    // And the defaults together form a valid configuration.
    Config::build(d, &FileConfig::default(), &HashMap::new()).unwrap();
}

#[test]
fn every_setting_has_a_sidecar_variable_named_after_its_key_and_a_help_text() {
    let mut keys = std::collections::HashSet::new();
    for s in SETTINGS {
        assert!(keys.insert(s.key), "{} listed twice", s.key);
        assert!(s.env.starts_with("SIDECAR_"), "{}: {}", s.key, s.env);
        assert_eq!(s.env, format!("SIDECAR_{}", s.key.to_uppercase()));
        assert!(!s.help.trim().is_empty(), "{} has no help", s.key);
    }
}

#[test]
fn every_setting_is_read_from_its_variable() {
    // A garbage value in each variable is noticed: the variable is read and validated.
    // Only the secrets, the state file (a relative path in the working directory) and
    // the Redis key prefix accept any such string.
    for s in SETTINGS {
        let result = load_env(&[(s.env, "not-a-value")]);
        if matches!(
            s.key,
            "upstream_api_key" | "admin_token" | "state_file" | "redis_prefix"
        ) {
            assert!(result.is_ok(), "{}: {:?}", s.env, result.err());
            continue;
        }
        let msg = error_of(result, s.env).to_string();
        assert!(
            msg.contains(s.env) || msg.contains(s.key),
            "{}: {msg:?} names neither the variable nor the key",
            s.env
        );
        // A Redis URL may hold a password: one that cannot be parsed is not shown.
        let shown = match s.key {
            "redis_url" => "\"<redacted>\"",
            _ => "\"not-a-value\"",
        };
        assert!(msg.contains(shown), "{}: {msg:?}", s.env);
    }
}

#[test]
fn a_silent_connection_waits_the_first_byte_timeout_or_the_header_one_when_shorter() {
    let c = load_env(&[]).unwrap();
    assert_eq!(c.fairness.first_byte_timeout, Duration::from_secs(5));
    assert_eq!(c.fairness.max_connections_per_ip, None, "0: no cap");
    let c = load_env(&[("SIDECAR_HEADER_READ_TIMEOUT", "2")]).unwrap();
    assert_eq!(c.fairness.first_byte_timeout, Duration::from_secs(2));
    let c = load_env(&[
        ("SIDECAR_FIRST_BYTE_TIMEOUT", "0.5"),
        ("SIDECAR_MAX_CONNECTIONS_PER_IP", "64"),
    ])
    .unwrap();
    assert_eq!(c.fairness.first_byte_timeout, Duration::from_millis(500));
    assert_eq!(c.fairness.max_connections_per_ip, NonZeroUsize::new(64));
}

#[test]
fn listen_host_localhost_means_the_ipv4_loopback_and_ipv6_is_accepted() {
    let c = load_env(&[("SIDECAR_LISTEN_HOST", "localhost")]).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    let c = load_env(&[("SIDECAR_LISTEN_HOST", "::1")]).unwrap();
    assert_eq!(c.listen, "[::1]:8080".parse().unwrap());
    assert_eq!(c.metrics_listen, "[::1]:9090".parse().unwrap());
}

#[test]
fn workers_zero_means_one_per_core_and_both_ports_may_be_zero() {
    let c = load_env(&[
        ("SIDECAR_WORKERS", "0"),
        ("SIDECAR_LISTEN_PORT", "0"),
        ("SIDECAR_METRICS_PORT", "0"),
    ])
    .unwrap();
    assert_eq!(
        c.workers,
        std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
    );
    assert_eq!(c.listen.port(), 0);
    assert_eq!(c.metrics_listen.port(), 0);
}

#[test]
fn booleans_accept_true_false_1_0_yes_no_on_off() {
    for (raw, want) in [
        ("true", true),
        ("1", true),
        ("YES", true),
        (" on ", true),
        ("false", false),
        ("0", false),
        ("No", false),
        ("off", false),
    ] {
        let c = load_env(&[("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", raw)]).unwrap();
        assert_eq!(c.fallback_enabled_passthrough, want, "{raw:?}");
    }
}

// === layering ===

#[test]
fn each_layer_overrides_the_one_below_defaults_file_env_flags() {
    let file = toml_file("rate_rpm = 10\nqueue_max_size = 11\nbucket_capacity = 12\n");
    let environment = env(&[
        ("SIDECAR_QUEUE_MAX_SIZE", "21"),
        ("SIDECAR_BUCKET_CAPACITY", "22"),
    ]);
    let flags = Settings {
        bucket_capacity: Some(32),
        ..Settings::default()
    };
    let c = load(Some(&file.path), &environment, flags).unwrap();
    let p = c.default_provider();
    assert_eq!(p.low_priority_timeout, Duration::from_secs(30), "default");
    assert_eq!(p.rate_rpm, 10.0, "file over default");
    assert_eq!(p.queue_max_size, 21, "env over file");
    assert_eq!(p.bucket_capacity, 32, "flag over env");
}

#[test]
fn the_same_setting_at_every_layer_takes_the_highest_value() {
    let file = toml_file("rate_rpm = 10\n");
    let environment = env(&[("SIDECAR_RATE_RPM", "20")]);
    let flag = || Settings {
        rate_rpm: Some(30.0),
        ..Settings::default()
    };
    let rate = |c: Config| c.default_provider().rate_rpm;

    let none: HashMap<String, String> = HashMap::new();
    assert_eq!(rate(load(None, &none, Settings::default()).unwrap()), 40.0);
    assert_eq!(
        rate(load(Some(&file.path), &none, Settings::default()).unwrap()),
        10.0
    );
    assert_eq!(
        rate(load(Some(&file.path), &environment, Settings::default()).unwrap()),
        20.0
    );
    assert_eq!(
        rate(load(Some(&file.path), &environment, flag()).unwrap()),
        30.0
    );
    assert_eq!(rate(load(None, &none, flag()).unwrap()), 30.0);
}

#[test]
fn a_valid_higher_layer_does_not_rescue_an_invalid_lower_one_only_replaces_it() {
    // The file's bad value is overridden by the env: only the merged value is validated.
    let c = load_toml("rate_rpm = 0\n", &[("SIDECAR_RATE_RPM", "5")]).unwrap();
    assert_eq!(c.default_provider().rate_rpm, 5.0);
    // A bad env value that no flag overrides is refused even though the file is fine.
    let err = error_of(
        load_toml("rate_rpm = 5\n", &[("SIDECAR_RATE_RPM", "0")]),
        "env 0",
    );
    assert_invalid(&err, "rate_rpm", "0", RPM);
}

#[test]
fn file_settings_use_the_setting_keys_and_toml_types() {
    let c = load_toml(
        "listen_host = \"0.0.0.0\"\nlisten_port = 8181\nrequest_timeout = 2.5\n\
         fallback_enabled_passthrough = true\nlog_format = \"pretty\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.listen, "0.0.0.0:8181".parse().unwrap());
    assert_eq!(c.timeouts.request, Duration::from_millis(2500));
    assert!(c.fallback_enabled_passthrough);
    assert_eq!(c.log_format, LogFormat::Pretty);
}

// === API keys ===

#[test]
fn sidecar_upstream_api_key_wins_over_nvidia_api_key() {
    let c = load_env(&[
        ("SIDECAR_UPSTREAM_API_KEY", "nvapi-from-sidecar"),
        ("NVIDIA_API_KEY", "nvapi-from-nvidia"),
    ])
    .unwrap();
    let key = c.default_provider().api_key.as_ref().unwrap();
    assert_eq!(key.expose(), "nvapi-from-sidecar");
}

#[test]
fn nvidia_api_key_is_used_when_sidecar_upstream_api_key_is_unset_or_empty() {
    for pairs in [
        vec![("NVIDIA_API_KEY", "nvapi-from-nvidia")],
        vec![
            ("SIDECAR_UPSTREAM_API_KEY", ""),
            ("NVIDIA_API_KEY", "nvapi-from-nvidia"),
        ],
    ] {
        let c = load_env(&pairs).unwrap();
        let key = c.default_provider().api_key.as_ref().unwrap();
        assert_eq!(key.expose(), "nvapi-from-nvidia", "{pairs:?}");
    }
}

#[test]
fn an_empty_key_means_no_key() {
    let c = load_env(&[("SIDECAR_UPSTREAM_API_KEY", ""), ("NVIDIA_API_KEY", "")]).unwrap();
    assert!(c.default_provider().api_key.is_none());
    assert!(Secret::new(String::new()).is_none());
}

#[test]
fn keys_and_tokens_are_masked_in_debug_output() {
    let key = "nvapi-0123456789-very-secret";
    let token = "admin-token-very-secret";
    let c = load_env(&[
        ("SIDECAR_UPSTREAM_API_KEY", key),
        ("SIDECAR_ADMIN_TOKEN", token),
    ])
    .unwrap();
    let secret = c.default_provider().api_key.clone().unwrap();
    assert_eq!(format!("{secret:?}"), "nvap****");
    assert_eq!(secret.masked(), "nvap****");
    let whole = format!("{c:?}");
    assert!(!whole.contains(key), "key leaked: {whole}");
    assert!(!whole.contains(token), "token leaked: {whole}");
    assert!(whole.contains("nvap****"), "{whole}");
    assert!(whole.contains("admi****"), "{whole}");
}

#[test]
fn short_secrets_show_nothing_of_themselves() {
    assert_eq!(Secret::new("abcdefgh".into()).unwrap().masked(), "****");
    assert_eq!(Secret::new("abc".into()).unwrap().masked(), "****");
    assert_eq!(
        Secret::new("abcdefghi".into()).unwrap().masked(),
        "abcd****"
    );
}

// === every configuration error ===

#[test]
fn every_bad_environment_value_is_refused_with_one_line_naming_setting_value_and_range() {
    // (variable, bad value, name in the message, what is accepted)
    // Values that do not parse as the setting's type are named by their variable; values
    // that parse but are out of range are named by the setting's key.
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str)] = &[
        ("SIDECAR_LISTEN_HOST",          "not-an-ip",         "listen_host",          IP),
        ("SIDECAR_LISTEN_PORT",          "abc",               "SIDECAR_LISTEN_PORT",  PORT),
        ("SIDECAR_LISTEN_PORT",          "70000",             "SIDECAR_LISTEN_PORT",  PORT),
        ("SIDECAR_LISTEN_PORT",          "-1",                "SIDECAR_LISTEN_PORT",  PORT),
        ("SIDECAR_METRICS_PORT",         "8080",              "metrics_port",         OTHER_PORT),
        ("SIDECAR_UPSTREAM_URL",         "ftp://x",           "upstream_url",         URL),
        ("SIDECAR_UPSTREAM_URL",         "no-scheme",         "upstream_url",         URL),
        ("SIDECAR_UPSTREAM_URL",         "",                  "upstream_url",         URL),
        ("SIDECAR_UPSTREAM_URL",         "https:///v1",       "upstream_url",         URL),
        ("SIDECAR_UPSTREAM_URL",         "https://u:pw@h/v1", "upstream_url",         NO_USERINFO),
        ("SIDECAR_UPSTREAM_URL",         "https://h/v1?x=1",  "upstream_url",         NO_QUERY),
        ("SIDECAR_RATE_RPM",             "0",                 "rate_rpm",             RPM),
        ("SIDECAR_RATE_RPM",             "-5",                "rate_rpm",             RPM),
        ("SIDECAR_RATE_RPM",             "abc",               "SIDECAR_RATE_RPM",     "a number"),
        ("SIDECAR_RATE_RPM",             "NaN",               "rate_rpm",             RPM),
        ("SIDECAR_RATE_RPM",             "inf",               "rate_rpm",             RPM),
        ("SIDECAR_RATE_RPM",             "6000001",           "rate_rpm",             RPM),
        ("SIDECAR_BUCKET_CAPACITY",      "0",                 "bucket_capacity",      CAPACITY),
        ("SIDECAR_BUCKET_CAPACITY",      "1000001",           "bucket_capacity",      CAPACITY),
        ("SIDECAR_BUCKET_CAPACITY",      "1.5",               "SIDECAR_BUCKET_CAPACITY", NON_NEGATIVE),
        ("SIDECAR_REQUEST_TIMEOUT",      "0",                 "request_timeout",      SECONDS),
        ("SIDECAR_LOW_PRIORITY_TIMEOUT", "-1",                "low_priority_timeout", SECONDS),
        ("SIDECAR_CONNECT_TIMEOUT",      "999999",            "connect_timeout",      SECONDS),
        ("SIDECAR_STREAM_IDLE_TIMEOUT",  "0",                 "stream_idle_timeout",  SECONDS),
        ("SIDECAR_SHUTDOWN_GRACE",       "86401",             "shutdown_grace",       SECONDS),
        ("SIDECAR_HEADER_READ_TIMEOUT",  "NaN",               "header_read_timeout",  SECONDS),
        ("SIDECAR_READY_CACHE",          "0",                 "ready_cache",          SECONDS),
        ("SIDECAR_SNAPSHOT_INTERVAL",    "0.01",              "snapshot_interval",    "a number of seconds from 0.05 to 60"),
        ("SIDECAR_SNAPSHOT_INTERVAL",    "61",                "snapshot_interval",    "a number of seconds from 0.05 to 60"),
        ("SIDECAR_QUEUE_MAX_SIZE",       "2000000",           "queue_max_size",       QUEUE),
        ("SIDECAR_QUEUE_MAX_SIZE",       "-1",                "SIDECAR_QUEUE_MAX_SIZE", NON_NEGATIVE),
        ("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", "maybe",     "SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", BOOL),
        ("SIDECAR_KEEP_ALIVE",           "sometimes",         "SIDECAR_KEEP_ALIVE",   BOOL),
        ("SIDECAR_LOG_LEVEL",            "loud",              "log_level",            LEVEL),
        ("SIDECAR_LOG_FORMAT",           "xml",               "log_format",           "json or pretty"),
        ("SIDECAR_WORKERS",              "5000",              "workers",              WORKERS),
        ("SIDECAR_MAX_HEADERS",          "1",                 "max_headers",          "an integer of at least 8"),
        ("SIDECAR_MAX_HEADER_BYTES",     "100",               "max_header_bytes",     MIN_1024),
        ("SIDECAR_MAX_BODY_BYTES",       "10",                "max_body_bytes",       MIN_1024),
        ("SIDECAR_MAX_CONNECTIONS",      "0",                 "max_connections",      MIN_1),
        ("SIDECAR_FIRST_BYTE_TIMEOUT",   "0",                 "first_byte_timeout",   SECONDS),
        ("SIDECAR_MAX_CONNECTIONS_PER_IP", "8193",            "max_connections_per_ip", "0 (no cap) or an integer up to max_connections"),
        ("SIDECAR_H2_MAX_CONCURRENT_STREAMS", "0",            "h2_max_concurrent_streams", MIN_1),
        ("SIDECAR_H2_MAX_HEADER_LIST_SIZE", "1000",           "h2_max_header_list_size", MIN_1024),
    ];
    for &(var, value, setting, expected) in cases {
        let err = error_of(load_env(&[(var, value)]), &format!("{var}={value}"));
        assert_invalid(&err, setting, value, expected);
    }
}

#[test]
fn the_same_checks_apply_to_file_and_flag_values() {
    let err = error_of(load_toml("max_body_bytes = 10\n", &[]), "file");
    assert_invalid(&err, "max_body_bytes", "10", MIN_1024);

    let flags = Settings {
        workers: Some(5000),
        ..Settings::default()
    };
    let err = error_of(load(None, &HashMap::new(), flags), "flag");
    assert_invalid(&err, "workers", "5000", WORKERS);
}

#[test]
fn a_missing_config_file_is_an_error_naming_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let err = error_of(
        load(Some(&path), &HashMap::new(), Settings::default()),
        "absent",
    );
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn a_timeout_too_small_to_represent_is_refused() {
    // Observed: SIDECAR_REQUEST_TIMEOUT=1e-12 loads, with timeouts.request == 0 ns.
    let err = error_of(load_env(&[("SIDECAR_REQUEST_TIMEOUT", "1e-12")]), "1e-12 s");
    assert_invalid(&err, "request_timeout", "0.000000000001", SECONDS);
}

#[test]
fn log_format_error_shows_the_value_as_given() {
    // Observed: invalid log_format="xml": expected json or pretty
    let err = error_of(load_env(&[("SIDECAR_LOG_FORMAT", " XML ")]), "XML");
    assert_invalid(&err, "log_format", " XML ", "json or pretty");
}

// === providers in the TOML file ===

const TWO_PROVIDERS: &str = r#"
rate_rpm = 40
queue_max_size = 10
default_provider = "local"

[[providers]]
name = "nvidia"
upstream_url = "https://integrate.api.nvidia.com/v1"
api_key_env = "MY_NVIDIA_KEY"
models = ["meta/*", "nvidia/*"]

[[providers]]
name = "local"
upstream_url = "http://127.0.0.1:8000/v1"
api_key = "local-key"
rate_rpm = 6000
bucket_capacity = 5
low_priority_timeout = 3
models = ["mistralai/*"]
fallback_url = "http://127.0.0.1:8001/v1"
"#;

#[test]
fn providers_are_declared_in_order_with_their_models_and_the_named_default() {
    let c = load_toml(TWO_PROVIDERS, &[("MY_NVIDIA_KEY", "nvapi-by-name")]).unwrap();
    let names: Vec<&str> = c.providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["nvidia", "local"]);
    assert_eq!(c.default_provider, 1);
    assert_eq!(c.default_provider().name, "local");

    let (nvidia, local) = (&c.providers[0], &c.providers[1]);
    assert_eq!(nvidia.models, ["meta/*", "nvidia/*"]);
    assert_eq!(local.models, ["mistralai/*"]);
    assert_eq!(local.upstream.display(), "http://127.0.0.1:8000/v1");
    assert_eq!(
        local.fallback.as_ref().map(UpstreamUrl::display).as_deref(),
        Some("http://127.0.0.1:8001/v1")
    );
    assert!(nvidia.fallback.is_none());
}

#[test]
fn unset_provider_fields_inherit_the_global_settings() {
    let c = load_toml(TWO_PROVIDERS, &[("MY_NVIDIA_KEY", "nvapi-by-name")]).unwrap();
    let (nvidia, local) = (&c.providers[0], &c.providers[1]);
    // nvidia sets none of these: global file values, else defaults.
    assert_eq!(nvidia.rate_rpm, 40.0);
    assert_eq!(nvidia.queue_max_size, 10);
    assert_eq!(nvidia.bucket_capacity, 1);
    assert_eq!(nvidia.low_priority_timeout, Duration::from_secs(30));
    // local sets its own, and inherits the rest.
    assert_eq!(local.rate_rpm, 6000.0);
    assert_eq!(local.bucket_capacity, 5);
    assert_eq!(local.low_priority_timeout, Duration::from_secs(3));
    assert_eq!(local.queue_max_size, 10);
}

#[test]
fn providers_inherit_globals_from_the_environment_layer_too() {
    let c = load_toml(
        TWO_PROVIDERS,
        &[
            ("MY_NVIDIA_KEY", "nvapi-by-name"),
            ("SIDECAR_RATE_RPM", "7"),
            ("SIDECAR_UPSTREAM_URL", "http://10.0.0.1/v1"),
        ],
    )
    .unwrap();
    assert_eq!(c.providers[0].rate_rpm, 7.0, "env global over file global");
    assert_eq!(c.providers[1].rate_rpm, 6000.0, "provider's own value wins");

    let c = load_toml(
        "[[providers]]\nname = \"bare\"\n",
        &[("SIDECAR_UPSTREAM_URL", "http://10.0.0.1/v1")],
    )
    .unwrap();
    assert_eq!(c.providers[0].upstream.display(), "http://10.0.0.1/v1");
    assert!(c.providers[0].models.is_empty(), "no models: default only");
}

#[test]
fn provider_keys_come_from_api_key_or_the_variable_named_by_api_key_env() {
    let c = load_toml(TWO_PROVIDERS, &[("MY_NVIDIA_KEY", "nvapi-by-name")]).unwrap();
    let key = |i: usize| c.providers[i].api_key.as_ref().map(Secret::expose);
    assert_eq!(key(0), Some("nvapi-by-name"));
    assert_eq!(key(1), Some("local-key"));
}

#[test]
fn declared_providers_do_not_inherit_the_global_key() {
    // A key meant for one host is never sent to another one by inheritance.
    let c = load_toml(
        "[[providers]]\nname = \"local\"\nupstream_url = \"http://127.0.0.1:8000/v1\"\n",
        &[
            ("SIDECAR_UPSTREAM_API_KEY", "nvapi-global"),
            ("NVIDIA_API_KEY", "nvapi-nvidia"),
        ],
    )
    .unwrap();
    assert!(c.providers[0].api_key.is_none());
}

#[test]
fn without_default_provider_the_first_declared_provider_is_the_default() {
    let text = TWO_PROVIDERS.replace("default_provider = \"local\"", "");
    let c = load_toml(&text, &[("MY_NVIDIA_KEY", "k")]).unwrap();
    assert_eq!(c.default_provider, 0);
    assert_eq!(c.default_provider().name, "nvidia");
}

#[test]
fn default_provider_nvidia_is_allowed_without_declared_providers() {
    let c = load_toml("default_provider = \"nvidia\"\n", &[]).unwrap();
    assert_eq!(c.default_provider().name, "nvidia");
}

#[test]
fn every_bad_provider_declaration_is_refused_naming_the_provider_field() {
    type Vars = &'static [(&'static str, &'static str)];
    const NONE: Vars = &[];
    let unknown_default = format!(
        "default_provider = \"c\"\n{}",
        r#"providers = [{ name = "a" }, { name = "b" }]"#
    );
    // (file, environment, setting, value, what is accepted)
    #[rustfmt::skip]
    let cases: &[(&str, Vars, &str, &str, &str)] = &[
        (r#"providers = [{ name = "a" }, { name = "a" }]"#, NONE,
            "providers[1].name", "a", "a name no other provider uses"),
        (&unknown_default, NONE,
            "default_provider", "c", "one of the declared providers: a, b"),
        (r#"default_provider = "other""#, NONE,
            "default_provider", "other", NO_PROVIDERS),
        (r#"providers = [{ name = "a", api_key = "k", api_key_env = "VAR" }]"#, &[("VAR", "v")],
            "providers[0].api_key_env", "VAR", "one of api_key, api_key_env or api_key_file, not several"),
        (r#"providers = [{ name = "a", api_key_env = "UNSET_VAR" }]"#, NONE,
            "providers[0].api_key_env", "UNSET_VAR", KEY_VAR),
        (r#"providers = [{ name = "a", api_key_env = "EMPTY_VAR" }]"#, &[("EMPTY_VAR", "")],
            "providers[0].api_key_env", "EMPTY_VAR", KEY_VAR),
        (r#"providers = [{ name = "a", upstream_url = "ftp://x" }]"#, NONE,
            "providers[0].upstream_url", "ftp://x", URL),
        (r#"providers = [{ name = "a", fallback_url = "no-scheme" }]"#, NONE,
            "providers[0].fallback_url", "no-scheme", URL),
        (r#"providers = [{ name = "has space" }]"#, NONE,
            "providers[0].name", "has space", NAME),
        (r#"providers = [{ name = "" }]"#, NONE,
            "providers[0].name", "", NAME),
        (r#"providers = [{ name = "a", models = ["meta /*"] }]"#, NONE,
            "providers[0].models", "meta /*", MODELS),
        (r#"providers = [{ name = "a", models = [""] }]"#, NONE,
            "providers[0].models", "", MODELS),
        (r#"providers = [{ name = "a", rate_rpm = 0 }]"#, NONE,
            "providers[0].rate_rpm", "0", RPM),
        (r#"providers = [{ name = "a", bucket_capacity = 0 }]"#, NONE,
            "providers[0].bucket_capacity", "0", CAPACITY),
        (r#"providers = [{ name = "a", bucket_capacity = 1000001 }]"#, NONE,
            "providers[0].bucket_capacity", "1000001", CAPACITY),
        (r#"providers = [{ name = "a", queue_max_size = 2000000 }]"#, NONE,
            "providers[0].queue_max_size", "2000000", QUEUE),
        (r#"providers = [{ name = "a", low_priority_timeout = 0 }]"#, NONE,
            "providers[0].low_priority_timeout", "0", SECONDS),
        (r#"providers = [{ name = "a" }, { name = "b" }, { name = "c", rate_rpm = -1 }]"#, NONE,
            "providers[2].rate_rpm", "-1", RPM),
    ];
    for &(text, pairs, setting, value, expected) in cases {
        let err = error_of(load_toml(text, pairs), text);
        assert_invalid(&err, setting, value, expected);
    }
}

#[test]
fn an_unknown_top_level_key_is_refused_naming_it() {
    let err = FileConfig::parse("rate_rpm = 1\nrate_rmp = 2\n", "f.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Toml { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("f.toml"), "{msg}");
    assert!(
        msg.contains("unknown key `rate_rmp`: did you mean `rate_rpm`?"),
        "{msg}"
    );
    // Nothing close: the keys of that table are listed.
    let msg = FileConfig::parse("zzzzzzzzzzzz = 2\n", "f.toml")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unknown key `zzzzzzzzzzzz` (known here: listen_host, "),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn a_default_provider_that_is_not_a_string_is_refused_with_its_line() {
    let err = FileConfig::parse("rate_rpm = 1\ndefault_provider = 3\n", "f.toml").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Toml { line: 2, .. }), "{err:?}");
    assert!(msg.contains("expected a string"), "{msg}");
}

#[test]
fn an_unknown_provider_key_is_refused_naming_it() {
    let err =
        FileConfig::parse("[[providers]]\nname = \"a\"\napi_url = \"x\"\n", "f.toml").unwrap_err();
    assert!(matches!(err, ConfigError::Toml { line: 3, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("unknown key `api_url`: did you mean `api_key`?"),
        "{msg}"
    );
    let msg = FileConfig::parse("[[providers]]\nname = \"a\"\nupstream = \"x\"\n", "f.toml")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("did you mean `upstream_url`?"), "{msg}");
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn a_wrongly_typed_file_value_is_refused_naming_the_type() {
    let err = FileConfig::parse("bucket_capacity = 1.5\n", "f.toml").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::Toml { .. }), "{err:?}");
    assert!(msg.contains("1.5") && msg.contains("u32"), "{msg}");
}

#[test]
fn a_toml_syntax_error_reports_its_line() {
    let err = FileConfig::parse(
        "rate_rpm = 1\nqueue_max_size = 2\nlog_level = = 3\n",
        "f.toml",
    )
    .unwrap_err();
    match &err {
        ConfigError::Toml { path, line, .. } => {
            assert_eq!(path, "f.toml");
            assert_eq!(*line, 3, "{err}");
        }
        other => panic!("not a TOML error: {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("invalid config file f.toml (line 3)"), "{msg}");
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn a_toml_error_at_the_start_of_a_line_reports_that_line() {
    // Observed: `invalid config file f.toml (line 1): invalid key` and
    //           `invalid config file f.toml (line 1): duplicate key `rate_rpm` ...`
    // (line_of counts `text[..start].lines()`, which misses the line `start` begins).
    for text in ["rate_rpm = 1\n= 2\n", "rate_rpm = 1\nrate_rpm = 2\n"] {
        match FileConfig::parse(text, "f.toml").unwrap_err() {
            ConfigError::Toml { line, message, .. } => {
                assert_eq!(line, 2, "{text:?}: {message}")
            }
            other => panic!("not a TOML error: {other:?}"),
        }
    }
}

#[test]
fn a_toml_schema_error_reports_the_line_of_the_offending_key() {
    // Observed: `invalid config file f.toml (line 1): unknown field `bogus`, ...` although
    // `bogus` is on line 3 (the settings are deserialised from a span-less toml::Value).
    for text in [
        "rate_rpm = 1\n\nbogus = 2\n",
        "rate_rpm = 1\n\nbucket_capacity = \"x\"\n",
        "rate_rpm = 1\n[[providers]]\nname = \"a\"\nbogus = 1\n",
    ] {
        match FileConfig::parse(text, "f.toml").unwrap_err() {
            ConfigError::Toml { line, message, .. } => {
                assert_ne!(line, 1, "{text:?}: {message}")
            }
            other => panic!("not a TOML error: {other:?}"),
        }
    }
}

// === .env ===

const PROBE: &str = "SIDECAR_TEST_ONLY_DOTENV_PROBE";

#[test]
fn dotenv_values_are_read_from_the_given_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        format!("# a comment\n{PROBE}=from-dotenv\nSIDECAR_TEST_ONLY_QUOTED=\"a b\"\n"),
    )
    .unwrap();
    let env = ProcessEnv::with_dotenv(dir.path()).unwrap();
    assert_eq!(env.var(PROBE).as_deref(), Some("from-dotenv"));
    assert_eq!(env.var("SIDECAR_TEST_ONLY_QUOTED").as_deref(), Some("a b"));
}

#[test]
fn a_directory_without_dotenv_is_fine() {
    let dir = tempfile::tempdir().unwrap();
    let env = ProcessEnv::with_dotenv(dir.path()).unwrap();
    assert_eq!(env.var(PROBE), None);
}

#[test]
fn the_process_environment_wins_over_dotenv() {
    // PATH is set in the test process; reading it mutates nothing.
    let Ok(path) = std::env::var("PATH") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "PATH=/from/dotenv\n").unwrap();
    let env = ProcessEnv::with_dotenv(dir.path()).unwrap();
    assert_eq!(env.var("PATH"), Some(path));
}

#[test]
fn a_malformed_dotenv_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), format!("{PROBE}=1\nNOT A LINE\n")).unwrap();
    let err = ProcessEnv::with_dotenv(dir.path()).unwrap_err();
    assert!(matches!(err, ConfigError::DotEnv { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(".env"), "{msg}");
    assert!(msg.contains("NOT A LINE"), "{msg}");
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn a_dotenv_error_is_one_line() {
    // Observed: "invalid .env file /tmp/.../.env: Error parsing line: 'A='unterminated\n',
    // error at line index: 16" — the offending line is quoted with its newline.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(".env"), "A='unterminated\n").unwrap();
    let err = ProcessEnv::with_dotenv(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg:?}");
}

#[test]
fn an_upstream_ca_file_must_be_a_readable_pem_with_a_certificate() {
    const PEM: &str = "a readable PEM file with at least one CERTIFICATE";
    let err = error_of(
        load_env(&[("SIDECAR_UPSTREAM_CA_FILE", "/nonexistent/ca.pem")]),
        "missing file",
    );
    assert_invalid(&err, "upstream_ca_file", "/nonexistent/ca.pem", PEM);
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let path = empty.to_str().unwrap();
    let err = error_of(
        load_env(&[("SIDECAR_UPSTREAM_CA_FILE", path)]),
        "no certificate",
    );
    assert_invalid(&err, "upstream_ca_file", path, PEM);
    assert!(load_env(&[]).unwrap().upstream_ca.is_empty());
}

#[test]
fn a_state_file_in_a_missing_directory_stops_start_up_naming_the_setting() {
    let e = load_env(&[("SIDECAR_STATE_FILE", "/no/such/dir/state.json")])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("SIDECAR_STATE_FILE") && e.contains("/no/such/dir"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let c = load_env(&[("SIDECAR_STATE_FILE", path.to_str().unwrap())]).unwrap();
    assert_eq!(c.state_file.as_deref(), Some(path.as_path()));
}

// === token budget (issue 19) ===

const TPM: &str = "an integer from 0 to 10000000000";
const COMPLETION: &str = "an integer from 1 to 1000000";
const BYTES_PER_TOKEN: &str = "a number of bytes per token from 1 to 8";

#[test]
fn without_token_settings_there_is_no_token_budget_and_the_estimate_is_the_default_rule() {
    let c = load_env(&[]).unwrap();
    let p = c.default_provider();
    assert_eq!(p.tokens_per_minute, 0);
    assert_eq!(p.tokens_per_window(), None);
    assert_eq!(p.token_charge, TokenCharge::Reserved);
    assert!(!p.request_usage);
    assert_eq!(p.token_rules, crate::tokens::Rules::default());
    assert_eq!(p.token_rules.default_completion, 4096);
    assert_eq!(p.token_rules.bytes_per_token.as_f64(), 3.0);
}

#[test]
fn tokens_per_minute_is_scaled_to_the_provider_window_as_the_request_limit_is() {
    use crate::limiter::learn::per_window;
    // (tokens per minute, window seconds, tokens per window)
    for (tpm, window, want) in [
        ("60000", "60", 60_000),
        ("60000", "6", 6_000),
        ("10000", "0.5", 83),
        ("7", "6", 1), // 0.7 in a window: at least 1, as requests
        ("10000000000", "86400", 14_400_000_000_000),
    ] {
        let c = load_env(&[
            ("SIDECAR_TOKENS_PER_MINUTE", tpm),
            ("SIDECAR_PROVIDER_WINDOW", window),
        ])
        .unwrap();
        let p = c.default_provider();
        assert_eq!(
            p.tokens_per_window(),
            Some(want),
            "{tpm} per minute, {window} s"
        );
        // The same rule as requests: rate_rpm = tpm gives the same count per window.
        if let Ok(rpm) = tpm.parse::<f64>() {
            if rpm <= 6_000_000.0 {
                assert_eq!(
                    u64::from(per_window(rpm, p.window)),
                    want,
                    "{tpm}, {window} s"
                );
            }
        }
    }
}

#[test]
fn token_settings_come_from_every_layer_and_each_provider_may_set_its_own() {
    let text = r#"
tokens_per_minute = 100000
token_charge = "actual"

[[providers]]
name = "a"

[[providers]]
name = "b"
tokens_per_minute = 0
token_charge = "reserved"
request_usage = true
default_completion_tokens = 512
bytes_per_token = 2.5
"#;
    let c = load_toml(text, &[("SIDECAR_DEFAULT_COMPLETION_TOKENS", "2048")]).unwrap();
    let (a, b) = (&c.providers[0], &c.providers[1]);
    assert_eq!(a.tokens_per_minute, 100_000, "the file's global value");
    assert_eq!(a.tokens_per_window(), Some(100_000));
    assert_eq!(a.token_charge, TokenCharge::Actual);
    assert!(!a.request_usage);
    assert_eq!(a.token_rules.default_completion, 2048, "env over file");
    assert_eq!(a.token_rules.bytes_per_token.as_f64(), 3.0);
    assert_eq!(b.tokens_per_window(), None, "0: this provider has none");
    assert_eq!(b.token_charge, TokenCharge::Reserved);
    assert!(b.request_usage);
    assert_eq!(b.token_rules.default_completion, 512, "the provider's own");
    assert_eq!(b.token_rules.bytes_per_token.as_f64(), 2.5);

    let c = load_env(&[
        ("SIDECAR_TOKEN_CHARGE", " Actual "),
        ("SIDECAR_REQUEST_USAGE", "yes"),
        ("SIDECAR_BYTES_PER_TOKEN", "1"),
    ])
    .unwrap();
    let p = c.default_provider();
    assert_eq!(p.token_charge, TokenCharge::Actual);
    assert!(p.request_usage);
    assert_eq!(p.token_rules.bytes_per_token.as_f64(), 1.0);

    let flags = Settings {
        tokens_per_minute: Some(30_000),
        ..Settings::default()
    };
    let c = load(None, &env(&[("SIDECAR_TOKENS_PER_MINUTE", "1")]), flags).unwrap();
    assert_eq!(
        c.default_provider().tokens_per_minute,
        30_000,
        "flag over env"
    );
}

#[test]
fn bad_token_settings_are_refused_naming_the_setting_and_what_it_accepts() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str)] = &[
        ("SIDECAR_TOKENS_PER_MINUTE",         "-1",          "SIDECAR_TOKENS_PER_MINUTE", NON_NEGATIVE),
        ("SIDECAR_TOKENS_PER_MINUTE",         "1.5",         "SIDECAR_TOKENS_PER_MINUTE", NON_NEGATIVE),
        ("SIDECAR_TOKENS_PER_MINUTE",         "10000000001", "tokens_per_minute",         TPM),
        ("SIDECAR_TOKEN_CHARGE",              "later",       "token_charge",              "reserved or actual"),
        ("SIDECAR_TOKEN_CHARGE",              "",            "token_charge",              "reserved or actual"),
        ("SIDECAR_REQUEST_USAGE",             "maybe",       "SIDECAR_REQUEST_USAGE",     BOOL),
        ("SIDECAR_DEFAULT_COMPLETION_TOKENS", "0",           "default_completion_tokens", COMPLETION),
        ("SIDECAR_DEFAULT_COMPLETION_TOKENS", "1000001",     "default_completion_tokens", COMPLETION),
        ("SIDECAR_DEFAULT_COMPLETION_TOKENS", "-5",          "SIDECAR_DEFAULT_COMPLETION_TOKENS", NON_NEGATIVE),
        ("SIDECAR_BYTES_PER_TOKEN",           "0",           "bytes_per_token",           BYTES_PER_TOKEN),
        ("SIDECAR_BYTES_PER_TOKEN",           "0.5",         "bytes_per_token",           BYTES_PER_TOKEN),
        ("SIDECAR_BYTES_PER_TOKEN",           "8.5",         "bytes_per_token",           BYTES_PER_TOKEN),
        ("SIDECAR_BYTES_PER_TOKEN",           "-3",          "bytes_per_token",           BYTES_PER_TOKEN),
        ("SIDECAR_BYTES_PER_TOKEN",           "NaN",         "bytes_per_token",           BYTES_PER_TOKEN),
        ("SIDECAR_BYTES_PER_TOKEN",           "inf",         "bytes_per_token",           BYTES_PER_TOKEN),
        ("SIDECAR_BYTES_PER_TOKEN",           "three",       "SIDECAR_BYTES_PER_TOKEN",   "a number"),
    ];
    for &(var, value, setting, expected) in cases {
        let err = error_of(load_env(&[(var, value)]), &format!("{var}={value}"));
        assert_invalid(&err, setting, value, expected);
    }
    // A provider's own value is named as its field, with its line.
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str)] = &[
        (r#"providers = [{ name = "a", tokens_per_minute = 10000000001 }]"#,
            "providers[0].tokens_per_minute", "10000000001", TPM),
        (r#"providers = [{ name = "a" }, { name = "b", token_charge = "after" }]"#,
            "providers[1].token_charge", "after", "reserved or actual"),
        (r#"providers = [{ name = "a", default_completion_tokens = 0 }]"#,
            "providers[0].default_completion_tokens", "0", COMPLETION),
        (r#"providers = [{ name = "a", bytes_per_token = 9.0 }]"#,
            "providers[0].bytes_per_token", "9", BYTES_PER_TOKEN),
    ];
    for &(text, setting, value, expected) in cases {
        let err = error_of(load_toml(text, &[]), text);
        assert_invalid(&err, setting, value, expected);
    }
    let err = error_of(
        load_toml("[[providers]]\nname = \"a\"\ntokens_per_minute = -1\n", &[]),
        "negative in the file",
    );
    assert!(matches!(err, ConfigError::Toml { line: 3, .. }), "{err:?}");
}

// === Redis: the budget shared across replicas ===

const REDIS_URL: &str = super::redis::URL_EXPECTED;
const REDIS_USER: &str =
    "user:password@ or :password@ before the host (a user alone needs redis_password_file)";
const REDIS_QUERY: &str =
    "a URL without ?query or #fragment: redis://[user:password@]host[:port][/db]";
const REDIS_WILDCARD: &str =
    "a host to connect to, not the wildcard address 0.0.0.0 or [::] (e.g. redis://127.0.0.1:6379)";
const BUDGET: &str = "1 to 128 letters, digits, '.', '_' or '-'";
const PREFIX: &str = "1 to 64 printable ASCII characters without spaces, '{' or '}'";
const SHARED_SCOPE: &str =
    "key (limit_scope = \"model\" is not shared across replicas; unset redis_url or use key)";

/// A file holding `text` in its own temporary directory.
fn secret_file(text: &str) -> TomlFile {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secret");
    std::fs::write(&path, text).unwrap();
    TomlFile { _dir: dir, path }
}

fn redis_of(c: &Config) -> &RedisConfig {
    c.redis.as_ref().expect("a Redis configuration")
}

/// What the redis client itself reads from the URL: (password, db).
fn client_view(url: &RedisUrl) -> (Option<String>, i64) {
    use ::redis::IntoConnectionInfo;
    let info = url.expose().into_connection_info().unwrap();
    let r = info.redis_settings();
    (r.password().map(str::to_owned), r.db())
}

#[test]
fn redis_settings_default_to_single_process_mode_and_documented_values() {
    let d = Settings::defaults();
    assert_eq!(d.redis_url.as_deref(), Some(""));
    assert_eq!(d.redis_url_file.as_deref(), Some(""));
    assert_eq!(d.redis_password_file.as_deref(), Some(""));
    assert_eq!(d.redis_prefix.as_deref(), Some("nvidia-sidecar:"));
    assert_eq!(d.redis_timeout, Some(0.25));
    assert_eq!(d.redis_replicas, Some(1));
    assert_eq!(d.redis_fallback_for, Some(120.0));
    assert!(load_env(&[]).unwrap().redis.is_none());
    assert!(load_env(&[("SIDECAR_REDIS_URL", "  ")])
        .unwrap()
        .redis
        .is_none());

    let c = load_env(&[("SIDECAR_REDIS_URL", "redis://127.0.0.1")]).unwrap();
    let r = redis_of(&c);
    assert_eq!(r.url.masked(), "redis://127.0.0.1:6379/0");
    assert_eq!(r.prefix, "nvidia-sidecar:");
    assert_eq!(r.timeout, Duration::from_millis(250));
    assert_eq!(r.replicas, 1);
    assert_eq!(r.fallback_for, Duration::from_secs(120));
}

#[test]
fn redis_settings_are_read_from_every_layer() {
    let file = toml_file(
        "redis_url = \"redis://from-file\"\nredis_prefix = \"file:\"\nredis_timeout = 0.5\n\
         redis_replicas = 3\nredis_fallback_for = 30\n",
    );
    let environment = env(&[
        ("SIDECAR_REDIS_URL", "redis://from-env:7000"),
        ("SIDECAR_REDIS_PREFIX", "env:"),
    ]);
    let flags = Settings {
        redis_replicas: Some(5),
        ..Settings::default()
    };
    let c = load(Some(&file.path), &environment, flags).unwrap();
    let r = redis_of(&c);
    assert_eq!(r.url.masked(), "redis://from-env:7000/0");
    assert_eq!(r.prefix, "env:");
    assert_eq!(r.timeout, Duration::from_millis(500));
    assert_eq!(r.replicas, 5);
    assert_eq!(r.fallback_for, Duration::from_secs(30));
}

/// (URL, masked form, TLS, host, port, db, password as the client reads it)
type ValidUrl = (
    &'static str,
    &'static str,
    bool,
    &'static str,
    u16,
    u32,
    Option<&'static str>,
);

#[test]
fn valid_redis_urls_are_accepted_and_masked() {
    #[rustfmt::skip]
    let cases: &[ValidUrl] = &[
        ("redis://127.0.0.1", "redis://127.0.0.1:6379/0", false, "127.0.0.1", 6379, 0, None),
        ("redis://localhost:6380/2", "redis://localhost:6380/2", false, "localhost", 6380, 2, None),
        ("  redis://redis/  ", "redis://redis:6379/0", false, "redis", 6379, 0, None),
        ("redis://:s3cret-pw@redis:6379/0", "redis://:****@redis:6379/0", false, "redis", 6379, 0, Some("s3cret-pw")),
        ("redis://alice:s3cret-pw@redis.internal:7000/15", "redis://alice:****@redis.internal:7000/15",
            false, "redis.internal", 7000, 15, Some("s3cret-pw")),
        ("rediss://alice:p%40ss%2Fw0rd@cache.example.com:6380", "rediss://alice:****@cache.example.com:6380/0",
            true, "cache.example.com", 6380, 0, Some("p@ss/w0rd")),
        ("rediss://:s3cret-pw@10.0.0.7", "rediss://:****@10.0.0.7:6379/0", true, "10.0.0.7", 6379, 0, Some("s3cret-pw")),
        ("redis://[::1]:6379/1", "redis://[::1]:6379/1", false, "::1", 6379, 1, None),
        ("redis://h:65535/0", "redis://h:65535/0", false, "h", 65535, 0, None),
        ("redis://My_Redis-1.svc.cluster.local", "redis://My_Redis-1.svc.cluster.local:6379/0",
            false, "My_Redis-1.svc.cluster.local", 6379, 0, None),
    ];
    for &(raw, masked, tls, host, port, db, password) in cases {
        let url = RedisUrl::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        assert_eq!(url.masked(), masked, "{raw}");
        assert_eq!(format!("{url:?}"), masked, "{raw}");
        assert_eq!(url.to_string(), masked, "{raw}");
        assert_eq!(url.is_tls(), tls, "{raw}");
        assert_eq!(
            (url.host(), url.port(), url.db()),
            (host, port, db),
            "{raw}"
        );
        assert_eq!(
            client_view(&url),
            (password.map(str::to_owned), i64::from(db)),
            "{raw}"
        );
        if let Some(pw) = password {
            assert!(!url.masked().contains(pw), "{raw}");
            assert!(!format!("{url:?}").contains(pw), "{raw}");
        }
        // The same through the configuration.
        let c = load_env(&[("SIDECAR_REDIS_URL", raw)]).unwrap();
        assert_eq!(redis_of(&c).url, url, "{raw}");
    }
}

#[test]
fn a_malformed_redis_url_is_refused_naming_the_setting_without_its_password() {
    // (URL, value shown in the error, what is accepted); every password is "hunter2".
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        ("http://:hunter2@h:6379",           "http://****@h:6379",    REDIS_URL),
        ("valkey://:hunter2@h:6379",         "valkey://****@h:6379",  REDIS_URL),
        ("unix:///tmp/redis.sock",           "unix:///tmp/redis.sock", REDIS_URL),
        ("redis://:hunter2@",                "redis://****@",         REDIS_URL),
        ("redis://",                         "redis://",              REDIS_URL),
        ("redis://:hunter2@:6379",           "redis://****@:6379",    REDIS_URL),
        ("redis://:hunter2@h:0",             "redis://****@h:0",      REDIS_URL),
        ("redis://:hunter2@h:65536",         "redis://****@h:65536",  REDIS_URL),
        ("redis://:hunter2@h:abc",           "redis://****@h:abc",    REDIS_URL),
        ("redis://:hunter2@h:",              "redis://****@h:",       REDIS_URL),
        ("redis://:hunter2@h:6379/x",        "redis://****@h:6379/x", REDIS_URL),
        ("redis://:hunter2@h:6379/-1",       "redis://****@h:6379/-1", REDIS_URL),
        ("redis://:hunter2@h:6379/1/2",      "redis://****@h:6379/1/2", REDIS_URL),
        ("redis://:hunter2@bad_host!:6379",  "redis://****@bad_host!:6379", REDIS_URL),
        ("redis://:hun/ter2@h",              "redis://****@h",        REDIS_URL),
        ("redis://:hunter2%zz@h",            "redis://****@h",        REDIS_URL),
        ("redis://:hunter2@[::1",            "redis://****@[::1",     REDIS_URL),
        ("redis://:hunter2@h/0?protocol=resp3", "redis://****@h/0?****", REDIS_QUERY),
        ("redis://h/0?password=hunter2",     "redis://h/0?****",      REDIS_QUERY),
        ("rediss://:hunter2@h/#insecure",    "rediss://****@h/#****", REDIS_QUERY),
        ("redis://hunter2@h",                "redis://****@h",        REDIS_USER),
        ("redis://alice:@h",                 "redis://****@h",        REDIS_USER),
        ("redis://:hunter2@0.0.0.0:6379",    "redis://****@0.0.0.0:6379", REDIS_WILDCARD),
        ("redis://:hunter2@[::]:6379",       "redis://****@[::]:6379", REDIS_WILDCARD),
        ("hunter2",                          "<redacted>",            REDIS_URL),
        ("redis//:hunter2@h",                "<redacted>",            REDIS_URL),
        (":hunter2@h://x",                   "<redacted>",            REDIS_URL),
    ];
    for &(raw, shown, expected) in cases {
        assert!(RedisUrl::parse(raw).is_err(), "{raw} accepted");
        let err = error_of(load_env(&[("SIDECAR_REDIS_URL", raw)]), raw);
        assert_invalid(&err, "SIDECAR_REDIS_URL", shown, expected);
        let msg = err.to_string();
        for part in ["hunter2", "hunter", "ter2"] {
            assert!(!msg.contains(part), "{raw}: password in {msg:?}");
        }
    }
    // From the file or a flag, the error names the key.
    let err = error_of(load_toml("redis_url = \"ftp://:hunter2@h\"\n", &[]), "file");
    assert_invalid(&err, "redis_url", "ftp://****@h", REDIS_URL);
    let flags = Settings {
        redis_url: Some("redis://:hunter2@h:99999".into()),
        ..Settings::default()
    };
    let err = error_of(
        load(None, &env(&[("SIDECAR_REDIS_URL", "redis://h")]), flags),
        "flag",
    );
    assert_invalid(&err, "redis_url", "redis://****@h:99999", REDIS_URL);
}

#[test]
fn the_redis_password_never_shows_in_the_configuration_debug_output() {
    let c = load_env(&[("SIDECAR_REDIS_URL", "redis://alice:hunter2-secret@h:6379/3")]).unwrap();
    let whole = format!("{c:?}");
    assert!(!whole.contains("hunter2-secret"), "{whole}");
    assert!(whole.contains("redis://alice:****@h:6379/3"), "{whole}");
    let r = redis_of(&c);
    assert_eq!(r.url.expose(), "redis://alice:hunter2-secret@h:6379/3");
}

#[test]
fn the_redis_url_file_wins_over_redis_url() {
    let f = secret_file("\n   redis://:from-file-pw@fromfile:6380/1  \nredis://second-line\n");
    let path = f.path.to_str().unwrap();
    let c = load_env(&[
        ("SIDECAR_REDIS_URL", "redis://from-env"),
        ("SIDECAR_REDIS_URL_FILE", path),
    ])
    .unwrap();
    let r = redis_of(&c);
    assert_eq!(r.url.masked(), "redis://:****@fromfile:6380/1");
    assert_eq!(client_view(&r.url), (Some("from-file-pw".into()), 1));
    // Also from the TOML file.
    let text = format!("redis_url_file = {path:?}\n");
    let c = load_toml(&text, &[]).unwrap();
    assert_eq!(redis_of(&c).url.masked(), "redis://:****@fromfile:6380/1");
}

#[test]
fn an_unreadable_or_empty_or_malformed_redis_url_file_is_refused_naming_the_setting() {
    const FILE: &str = "a readable file whose first non-empty line is the Redis URL";
    let err = error_of(
        load_env(&[("SIDECAR_REDIS_URL_FILE", "/nonexistent/redis-url")]),
        "missing",
    );
    assert_invalid(
        &err,
        "SIDECAR_REDIS_URL_FILE",
        "/nonexistent/redis-url",
        FILE,
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let err = error_of(load_env(&[("SIDECAR_REDIS_URL_FILE", d)]), "directory");
    assert_invalid(&err, "SIDECAR_REDIS_URL_FILE", d, FILE);
    let empty = secret_file("\n  \n");
    let p = empty.path.to_str().unwrap();
    let err = error_of(load_env(&[("SIDECAR_REDIS_URL_FILE", p)]), "empty");
    assert_invalid(&err, "SIDECAR_REDIS_URL_FILE", p, FILE);
    let err = error_of(
        load_toml("redis_url_file = \"/nonexistent/redis-url\"\n", &[]),
        "toml",
    );
    assert_invalid(&err, "redis_url_file", "/nonexistent/redis-url", FILE);

    let bad = secret_file("redis://:hunter2@h:0\n");
    let p = bad.path.to_str().unwrap();
    let err = error_of(load_env(&[("SIDECAR_REDIS_URL_FILE", p)]), "bad URL");
    assert_invalid(
        &err,
        "SIDECAR_REDIS_URL_FILE",
        "redis://****@h:0",
        REDIS_URL,
    );
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn the_redis_password_file_replaces_the_password_and_keeps_the_user() {
    let f = secret_file("p@ss:w/rd%20?#\n");
    let path = f.path.to_str().unwrap();
    for (url, masked) in [
        ("redis://alice@h", "redis://alice:****@h:6379/0"),
        ("redis://alice:old-pw@h", "redis://alice:****@h:6379/0"),
        ("rediss://:old-pw@h:6380/2", "rediss://:****@h:6380/2"),
        ("redis://h/4", "redis://:****@h:6379/4"),
    ] {
        let c = load_env(&[
            ("SIDECAR_REDIS_URL", url),
            ("SIDECAR_REDIS_PASSWORD_FILE", path),
        ])
        .unwrap();
        let r = redis_of(&c);
        assert_eq!(r.url.masked(), masked, "{url}");
        assert_eq!(
            client_view(&r.url).0.as_deref(),
            Some("p@ss:w/rd%20?#"),
            "{url}"
        );
        assert!(!r.url.expose().contains("old-pw"), "{url}");
        assert!(!format!("{c:?}").contains("w/rd"), "{url}");
    }
    // The password file also applies to the URL file's URL.
    let u = secret_file("redis://bob@fromfile\n");
    let c = load_env(&[
        ("SIDECAR_REDIS_URL_FILE", u.path.to_str().unwrap()),
        ("SIDECAR_REDIS_PASSWORD_FILE", path),
    ])
    .unwrap();
    assert_eq!(
        redis_of(&c).url.masked(),
        "redis://bob:****@fromfile:6379/0"
    );
}

#[test]
fn an_unreadable_or_empty_redis_password_file_is_refused_naming_the_setting() {
    const FILE: &str = "a readable file whose first non-empty line is the Redis password";
    let url = ("SIDECAR_REDIS_URL", "redis://h");
    let err = error_of(
        load_env(&[url, ("SIDECAR_REDIS_PASSWORD_FILE", "/nonexistent/pw")]),
        "missing",
    );
    assert_invalid(&err, "SIDECAR_REDIS_PASSWORD_FILE", "/nonexistent/pw", FILE);
    let empty = secret_file("  \n\n");
    let p = empty.path.to_str().unwrap();
    let err = error_of(
        load_env(&[url, ("SIDECAR_REDIS_PASSWORD_FILE", p)]),
        "empty",
    );
    assert_invalid(&err, "SIDECAR_REDIS_PASSWORD_FILE", p, FILE);
    let err = error_of(
        load_toml("redis_password_file = \"/nonexistent/pw\"\n", &[url]),
        "toml",
    );
    assert_invalid(&err, "redis_password_file", "/nonexistent/pw", FILE);
}

#[test]
fn with_password_encodes_the_new_password_and_keeps_the_rest() {
    let url = RedisUrl::parse("rediss://alice:old@h:7000/3").unwrap();
    let new = url.with_password("n e/w@pw");
    assert_eq!(new.masked(), "rediss://alice:****@h:7000/3");
    assert_eq!(new.expose(), "rediss://alice:n%20e%2Fw%40pw@h:7000/3");
    assert!(new.is_tls());
    assert_eq!(client_view(&new), (Some("n e/w@pw".into()), 3));
    assert_eq!(
        url.expose(),
        "rediss://alice:old@h:7000/3",
        "the original is kept"
    );
}

#[test]
fn bad_redis_prefix_timeout_replicas_or_fallback_for_are_refused() {
    let long = "p".repeat(65);
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str)] = &[
        ("SIDECAR_REDIS_PREFIX",       "",              "redis_prefix",       PREFIX),
        ("SIDECAR_REDIS_PREFIX",       "has space:",    "redis_prefix",       PREFIX),
        ("SIDECAR_REDIS_PREFIX",       "a{b}:",         "redis_prefix",       PREFIX),
        ("SIDECAR_REDIS_PREFIX",       "tab\t",         "redis_prefix",       PREFIX),
        ("SIDECAR_REDIS_PREFIX",       "é:",            "redis_prefix",       PREFIX),
        ("SIDECAR_REDIS_PREFIX",       &long,           "redis_prefix",       PREFIX),
        ("SIDECAR_REDIS_TIMEOUT",      "0.001",         "redis_timeout",      "a number of seconds from 0.01 to 5"),
        ("SIDECAR_REDIS_TIMEOUT",      "5.5",           "redis_timeout",      "a number of seconds from 0.01 to 5"),
        ("SIDECAR_REDIS_TIMEOUT",      "NaN",           "redis_timeout",      "a number of seconds from 0.01 to 5"),
        ("SIDECAR_REDIS_TIMEOUT",      "fast",          "SIDECAR_REDIS_TIMEOUT", "a number"),
        ("SIDECAR_REDIS_REPLICAS",     "0",             "redis_replicas",     "an integer from 1 to 1000"),
        ("SIDECAR_REDIS_REPLICAS",     "1001",          "redis_replicas",     "an integer from 1 to 1000"),
        ("SIDECAR_REDIS_REPLICAS",     "-1",            "SIDECAR_REDIS_REPLICAS", NON_NEGATIVE),
        ("SIDECAR_REDIS_FALLBACK_FOR", "0.5",           "redis_fallback_for", "a number of seconds from 1 to 3600"),
        ("SIDECAR_REDIS_FALLBACK_FOR", "3601",          "redis_fallback_for", "a number of seconds from 1 to 3600"),
    ];
    for &(var, value, setting, expected) in cases {
        // Checked with and without a URL: a typo shows before Redis is switched on.
        for url in ["", "redis://h"] {
            let err = error_of(
                load_env(&[(var, value), ("SIDECAR_REDIS_URL", url)]),
                &format!("{var}={value:?} url={url:?}"),
            );
            assert_invalid(&err, setting, value, expected);
        }
    }
    let max = "p".repeat(64);
    for ok in ["a", "team-a:", "x.y/z|1:", max.as_str()] {
        let c = load_env(&[
            ("SIDECAR_REDIS_PREFIX", ok),
            ("SIDECAR_REDIS_URL", "redis://h"),
        ])
        .unwrap();
        assert_eq!(redis_of(&c).prefix, ok);
    }
    let c = load_env(&[
        ("SIDECAR_REDIS_URL", "redis://h"),
        ("SIDECAR_REDIS_TIMEOUT", "0.01"),
        ("SIDECAR_REDIS_REPLICAS", "1000"),
        ("SIDECAR_REDIS_FALLBACK_FOR", "3600"),
    ])
    .unwrap();
    let r = redis_of(&c);
    assert_eq!(r.timeout, Duration::from_millis(10));
    assert_eq!(r.replicas, 1000);
    assert_eq!(r.fallback_for, Duration::from_secs(3600));
}

#[test]
fn a_provider_budget_defaults_to_its_name_and_can_be_overridden() {
    let c = load_toml(
        "[[providers]]\nname = \"nvidia\"\n\n[[providers]]\nname = \"local\"\nbudget = \"team-a.gpu_1\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(c.providers[0].budget, "nvidia");
    assert_eq!(c.providers[1].budget, "team-a.gpu_1");
    // The implicit provider of an environment-only configuration.
    assert_eq!(load_env(&[]).unwrap().default_provider().budget, "nvidia");
    let max = "b".repeat(128);
    let c = load_toml(
        &format!("providers = [{{ name = \"a\", budget = \"{max}\" }}]"),
        &[],
    )
    .unwrap();
    assert_eq!(c.providers[0].budget, max);
}

#[test]
fn a_bad_budget_name_is_refused_naming_the_provider_field() {
    let long = "b".repeat(129);
    for bad in ["", "has space", "a/b", "a{b}", "é", long.as_str()] {
        let text =
            format!("providers = [{{ name = \"a\" }}, {{ name = \"b\", budget = {bad:?} }}]");
        let err = error_of(load_toml(&text, &[]), &text);
        assert_invalid(&err, "providers[1].budget", bad, BUDGET);
    }
}

#[test]
fn limit_scope_model_is_refused_with_a_redis_url() {
    let redis = ("SIDECAR_REDIS_URL", "redis://h");
    // Without Redis the scope is free.
    let c = load_env(&[("SIDECAR_LIMIT_SCOPE", "model")]).unwrap();
    assert_eq!(c.default_provider().limit_scope, LimitScope::Model);
    let err = error_of(load_env(&[("SIDECAR_LIMIT_SCOPE", "model"), redis]), "env");
    assert_invalid(&err, "limit_scope", "model", SHARED_SCOPE);

    let text =
        "[[providers]]\nname = \"a\"\n\n[[providers]]\nname = \"b\"\nlimit_scope = \"model\"\n";
    assert!(load_toml(text, &[]).is_ok());
    let err = error_of(load_toml(text, &[redis]), "declared provider");
    assert_invalid(&err, "providers[1].limit_scope", "model", SHARED_SCOPE);
    // Inherited from the global setting by a declared provider.
    let err = error_of(
        load_toml(
            "limit_scope = \"model\"\nredis_url = \"redis://h\"\n[[providers]]\nname = \"a\"\n",
            &[],
        ),
        "inherited",
    );
    // Named where it was written: the top-level key, with its line.
    assert_invalid(&err, "limit_scope", "model", SHARED_SCOPE);
    assert!(err.to_string().contains("sidecar.toml line 1)"), "{err}");
    // key with Redis is fine.
    let c = load_env(&[("SIDECAR_LIMIT_SCOPE", "key"), redis]).unwrap();
    assert!(c.redis.is_some());
}

#[test]
fn an_unknown_variable_names_the_closest_setting() {
    assert_eq!(
        super::unknown_variable("SIDECAR_RATE_RMP"),
        Some(("SIDECAR_RATE_RMP".to_owned(), Some("SIDECAR_RATE_RPM")))
    );
    assert_eq!(
        super::unknown_variable("SIDECAR_RATE_RPM"),
        None,
        "a setting"
    );
    assert_eq!(super::unknown_variable("NVIDIA_API_KEY"), None, "not ours");
    assert_eq!(
        super::unknown_variable("SIDECAR_SOMETHING_ELSE_ENTIRELY"),
        Some(("SIDECAR_SOMETHING_ELSE_ENTIRELY".to_owned(), None))
    );
}

// === errors name the setting as it was written ===

#[test]
fn an_environment_error_names_the_variable() {
    let msg = load_env(&[("SIDECAR_RATE_RPM", "-5")])
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("invalid SIDECAR_RATE_RPM=\"-5\": expected requests per minute"),
        "{msg}"
    );
    // Also when the check is made after merging (the variable parsed, the range failed).
    let msg = load_env(&[("SIDECAR_WORKERS", "5000")])
        .unwrap_err()
        .to_string();
    assert!(msg.starts_with("invalid SIDECAR_WORKERS=\"5000\""), "{msg}");
}

#[test]
fn a_dotenv_error_names_the_variable_and_the_file() {
    // A variable no process sets, so the value comes from the file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env");
    std::fs::write(&path, "SIDECAR_SHUTDOWN_GRACE=-1\n").unwrap();
    let env = ProcessEnv::with_dotenv(dir.path()).unwrap();
    let msg = load(None, &env, Settings::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "invalid SIDECAR_SHUTDOWN_GRACE=\"-1\" (set in {}): expected",
            path.display()
        )),
        "{msg}"
    );
}

#[test]
fn a_toml_error_names_the_key_the_file_and_the_line() {
    let file = toml_file("listen_port = 8080\n\nrate_rpm = -5.0\n");
    let msg = load(Some(&file.path), &env(&[]), Settings::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "invalid rate_rpm=\"-5\" ({} line 3): expected",
            file.path.display()
        )),
        "{msg}"
    );
    // A provider's key: its own line.
    let file =
        toml_file("[[providers]]\nname = \"a\"\n\n[[providers]]\nname = \"b\"\nrate_rpm = 0.0\n");
    let msg = load(Some(&file.path), &env(&[]), Settings::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with(&format!(
            "invalid providers[1].rate_rpm=\"0\" ({} line 6): expected",
            file.path.display()
        )),
        "{msg}"
    );
    // Set in the file, overridden by a valid variable: no error at all.
    let file = toml_file("rate_rpm = -5.0\n");
    load(
        Some(&file.path),
        &env(&[("SIDECAR_RATE_RPM", "10")]),
        Settings::default(),
    )
    .unwrap();
}

#[test]
fn a_flag_error_names_the_flag() {
    let flags = Settings {
        rate_rpm: Some(-5.0),
        ..Settings::default()
    };
    let msg = load(None, &env(&[("SIDECAR_RATE_RPM", "10")]), flags)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("invalid --rate-rpm=\"-5\": expected"),
        "{msg}"
    );
    // A provider that inherits the flag's value names the flag too.
    let file = toml_file("[[providers]]\nname = \"a\"\n");
    let flags = Settings {
        queue_max_size: Some(2_000_000),
        ..Settings::default()
    };
    let msg = load(Some(&file.path), &env(&[]), flags)
        .unwrap_err()
        .to_string();
    assert!(
        msg.starts_with("invalid --queue-max-size=\"2000000\""),
        "{msg}"
    );
}

// === secrets from files ===

#[test]
fn keys_and_tokens_can_come_from_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    let token = dir.path().join("token");
    std::fs::write(&key, "\n  nvapi-from-a-file  \nsecond line ignored\n").unwrap();
    std::fs::write(&token, "admin-from-a-file\n").unwrap();
    let (key_s, token_s) = (key.display().to_string(), token.display().to_string());
    let c = load_env(&[
        ("SIDECAR_UPSTREAM_API_KEY_FILE", &key_s),
        ("SIDECAR_ADMIN_TOKEN_FILE", &token_s),
        ("NVIDIA_API_KEY", "nvapi-from-the-environment"),
    ])
    .unwrap();
    let key_of = |c: &Config| {
        c.default_provider()
            .api_key
            .as_ref()
            .map(|k| k.expose().to_owned())
    };
    assert_eq!(key_of(&c).as_deref(), Some("nvapi-from-a-file"));
    assert_eq!(
        c.admin_token.as_ref().map(Secret::expose),
        Some("admin-from-a-file")
    );

    // Both the value and its file: refused, naming the file setting.
    let err = error_of(
        load_env(&[
            ("SIDECAR_ADMIN_TOKEN", "x"),
            ("SIDECAR_ADMIN_TOKEN_FILE", &token_s),
        ]),
        "both",
    );
    assert_invalid(
        &err,
        "admin_token_file",
        &token_s,
        "either admin_token or admin_token_file, not both",
    );
    // A missing or empty file: refused, and the error holds no secret.
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n \n").unwrap();
    for (path, says) in [
        ("/no/such/key".to_owned(), "a readable file"),
        (empty.display().to_string(), "this one is empty"),
    ] {
        let msg = load_env(&[("SIDECAR_UPSTREAM_API_KEY_FILE", &path)])
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(&format!("invalid SIDECAR_UPSTREAM_API_KEY_FILE={path:?}"))
                && msg.contains(says),
            "{msg}"
        );
    }

    // A declared provider's key from a file; with another key setting as well: refused.
    let text = format!("[[providers]]\nname = \"a\"\napi_key_file = {key_s:?}\n");
    let c = load_toml(&text, &[]).unwrap();
    assert_eq!(key_of(&c).as_deref(), Some("nvapi-from-a-file"));
    let text = format!("[[providers]]\nname = \"a\"\napi_key = \"k\"\napi_key_file = {key_s:?}\n");
    let msg = load_toml(&text, &[]).unwrap_err().to_string();
    assert!(
        msg.contains("providers[0].api_key_file=")
            && msg.contains("line 4)")
            && msg.contains("not several")
            && !msg.contains("nvapi-from-a-file"),
        "{msg}"
    );
}
