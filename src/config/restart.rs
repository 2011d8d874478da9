//! Which settings of a freshly loaded configuration differ from the running one but
//! change only on a restart (a SIGHUP reload names them and keeps them as they are).
//!
//! The run-time fields are left out by copying them from the running configuration
//! first ([`Hot::write_into`]), so the table of [`super::runtime`] alone decides what
//! applies at once; every other field of [`Config`] is compared, typed. Destructuring
//! the whole struct makes a new field a compile error here until it is compared.

use super::runtime::Hot;
use super::typed::Config;

/// The settings that differ between `running` and `loaded` and need a restart.
pub fn needs_restart(running: &Config, loaded: &Config) -> Vec<&'static str> {
    let mut loaded = loaded.clone();
    Hot::of(running).write_into(&mut loaded);
    let Config {
        listen,
        metrics_listen,
        workers,
        log_level,
        log_format,
        admin_token,
        admin_loopback_reads,
        timeouts,
        limits,
        fairness,
        fallback_enabled_passthrough,
        ready_cache,
        snapshot_interval,
        providers,
        default_provider,
        retreat,
        upstream_429_retries,
        client_priorities,
        upstream_ca,
        margin,
        probe_interval,
        state_file,
        redis,
        // Where each setting was written: not a setting.
        origins: _,
    } = &loaded;
    let r = running;
    [
        ("listen", r.listen != *listen),
        ("metrics_port", r.metrics_listen != *metrics_listen),
        ("workers", r.workers != *workers),
        ("log_level", r.log_level != *log_level),
        ("log_format", r.log_format != *log_format),
        ("admin_token", r.admin_token != *admin_token),
        ("admin_loopback_reads", r.admin_loopback_reads != *admin_loopback_reads),
        ("timeouts", r.timeouts != *timeouts),
        ("limits", r.limits != *limits),
        (
            "first_byte_timeout, max_connections_per_ip",
            r.fairness != *fairness,
        ),
        (
            "fallback_enabled_passthrough",
            r.fallback_enabled_passthrough != *fallback_enabled_passthrough,
        ),
        ("ready_cache", r.ready_cache != *ready_cache),
        ("snapshot_interval", r.snapshot_interval != *snapshot_interval),
        (
            "upstream_429_retries",
            r.upstream_429_retries != *upstream_429_retries,
        ),
        ("retreat", r.retreat != *retreat),
        ("client_priorities", r.client_priorities != *client_priorities),
        ("upstream_ca_file", r.upstream_ca != *upstream_ca),
        ("window_margin", r.margin != *margin),
        ("probe_interval", r.probe_interval != *probe_interval),
        ("state_file", r.state_file != *state_file),
        ("redis", r.redis != *redis),
        ("default_provider", r.default_provider != *default_provider),
        (
            "providers (upstream, key, models, fallback, provider_window, rate_limit_headers, limit_scope, budget, token_charge, request_usage, default_completion_tokens, bytes_per_token)",
            r.providers != *providers,
        ),
    ]
    .into_iter()
    .filter_map(|(name, differs)| differs.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::config::runtime::field;
    use crate::config::SETTINGS;

    fn config(toml: &str, pairs: &[(&str, &str)]) -> Config {
        crate::config::testing::configured(toml, pairs)
            .unwrap_or_else(|e| panic!("{toml:?} {pairs:?}: {e}"))
    }

    /// A file in `dir` holding `text`, by path.
    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[test]
    fn a_changed_setting_needs_a_restart_unless_it_is_a_run_time_field() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = file(&dir, "key", "sk-from-a-file\n");
        let token_file = file(&dir, "token", "token-from-a-file\n");
        let url_file = file(&dir, "url", "redis://127.0.0.1:6380\n");
        let password_file = file(&dir, "password", "pw\n");
        let state_file = dir.path().join("state.json");
        let signed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca_file = file(&dir, "ca.pem", &signed.cert.pem());
        /// Variables and their values.
        type Vars<'a> = &'a [(&'a str, &'a str)];
        let redis: Vars = &[("SIDECAR_REDIS_URL", "redis://127.0.0.1:6379")];
        // (variable, another valid value, the settings both configurations share)
        #[rustfmt::skip]
        let cases: &[(&str, &str, Vars)] = &[
            ("SIDECAR_LISTEN_HOST", "0.0.0.0", &[]),
            ("SIDECAR_LISTEN_PORT", "8081", &[]),
            ("SIDECAR_METRICS_PORT", "9091", &[]),
            ("SIDECAR_UPSTREAM_URL", "https://example.com/v1", &[]),
            ("SIDECAR_UPSTREAM_API_KEY", "sk-0123456789", &[]),
            ("SIDECAR_UPSTREAM_API_KEY_FILE", &key_file, &[]),
            ("SIDECAR_UPSTREAM_CA_FILE", &ca_file, &[]),
            ("SIDECAR_LOG_FORMAT", "pretty", &[]),
            ("SIDECAR_ADMIN_TOKEN", "admin-token-0123", &[]),
            ("SIDECAR_ADMIN_TOKEN_FILE", &token_file, &[]),
            ("SIDECAR_ADMIN_LOOPBACK_READS", "false", &[]),
            ("SIDECAR_WORKERS", "2", &[("SIDECAR_WORKERS", "1")]),
            ("SIDECAR_CONNECT_TIMEOUT", "11", &[]),
            ("SIDECAR_STREAM_IDLE_TIMEOUT", "121", &[]),
            ("SIDECAR_SHUTDOWN_GRACE", "21", &[]),
            ("SIDECAR_HEADER_READ_TIMEOUT", "11", &[]),
            ("SIDECAR_FIRST_BYTE_TIMEOUT", "4", &[]),
            ("SIDECAR_MAX_HEADERS", "101", &[]),
            ("SIDECAR_MAX_HEADER_BYTES", "32769", &[]),
            ("SIDECAR_MAX_BODY_BYTES", "16777217", &[]),
            ("SIDECAR_MAX_CONNECTIONS", "8193", &[]),
            ("SIDECAR_MAX_CONNECTIONS_PER_IP", "10", &[]),
            ("SIDECAR_H2_MAX_CONCURRENT_STREAMS", "257", &[]),
            ("SIDECAR_H2_MAX_HEADER_LIST_SIZE", "65537", &[]),
            ("SIDECAR_KEEP_ALIVE", "false", &[]),
            ("SIDECAR_READY_CACHE", "6", &[]),
            ("SIDECAR_SNAPSHOT_INTERVAL", "2", &[]),
            ("SIDECAR_RETREAT_FACTOR", "0.6", &[]),
            ("SIDECAR_RETREAT_FLOOR", "0.2", &[]),
            ("SIDECAR_RETREAT_QUIET_PERIOD", "31", &[]),
            ("SIDECAR_RETREAT_DEFAULT_PAUSE", "2", &[]),
            ("SIDECAR_RECOVERY_STEP", "0.2", &[]),
            ("SIDECAR_RECOVERY_INTERVAL", "11", &[]),
            ("SIDECAR_PROVIDER_WINDOW", "30", &[]),
            ("SIDECAR_WINDOW_MARGIN", "0.01", &[]),
            ("SIDECAR_WINDOW_MARGIN_FLOOR", "0.1", &[]),
            ("SIDECAR_PROBE_INTERVAL", "601", &[]),
            ("SIDECAR_RATE_LIMIT_HEADERS", "none", &[]),
            ("SIDECAR_LIMIT_SCOPE", "model", &[]),
            ("SIDECAR_STATE_FILE", state_file.to_str().unwrap(), &[]),
            ("SIDECAR_UPSTREAM_429_RETRIES", "3", &[]),
            ("SIDECAR_TOKEN_CHARGE", "actual", &[]),
            ("SIDECAR_REQUEST_USAGE", "true", &[]),
            ("SIDECAR_DEFAULT_COMPLETION_TOKENS", "1024", &[]),
            ("SIDECAR_BYTES_PER_TOKEN", "2.5", &[]),
            ("SIDECAR_REDIS_URL", "redis://127.0.0.1:6379", &[]),
            ("SIDECAR_REDIS_URL_FILE", &url_file, redis),
            ("SIDECAR_REDIS_PASSWORD_FILE", &password_file, redis),
            ("SIDECAR_REDIS_PREFIX", "other:", redis),
            ("SIDECAR_REDIS_TIMEOUT", "0.5", redis),
            ("SIDECAR_REDIS_REPLICAS", "2", redis),
            ("SIDECAR_REDIS_FALLBACK_FOR", "60", redis),
        ];
        for s in SETTINGS {
            let listed = cases.iter().any(|(var, _, _)| *var == s.env);
            assert_eq!(
                listed,
                field(s.key).is_none(),
                "{}: a case for each setting that is not a run-time field, and only those",
                s.env
            );
        }
        for &(var, value, shared) in cases {
            let running = config("", shared);
            let loaded = config("", &[shared, &[(var, value)]].concat());
            assert!(
                !needs_restart(&running, &loaded).is_empty(),
                "{var}={value} is not named"
            );
            assert!(needs_restart(&running, &running.clone()).is_empty());
        }
    }

    #[test]
    fn a_changed_run_time_field_needs_no_restart() {
        let running = config("", &[]);
        let loaded = config(
            "",
            &[
                ("SIDECAR_RATE_RPM", "41"),
                ("SIDECAR_BUCKET_CAPACITY", "2"),
                ("SIDECAR_QUEUE_MAX_SIZE", "65"),
                ("SIDECAR_LOW_PRIORITY_TIMEOUT", "31"),
                ("SIDECAR_TOKENS_PER_MINUTE", "30000"),
                ("SIDECAR_REQUEST_TIMEOUT", "121"),
                ("SIDECAR_FALLBACK_ENABLED_PASSTHROUGH", "true"),
                ("SIDECAR_LOG_LEVEL", "debug"),
            ],
        );
        assert_ne!(Hot::of(&running), Hot::of(&loaded));
        assert_eq!(needs_restart(&running, &loaded), Vec::<&str>::new());
    }

    #[test]
    fn a_changed_provider_table_or_priority_needs_a_restart_and_is_named() {
        let providers = r#"
[[providers]]
name = "a"
upstream_url = "http://127.0.0.1:1/v1"
models = ["a/*"]

[[providers]]
name = "b"
upstream_url = "http://127.0.0.1:2/v1"
"#;
        let running = config(providers, &[]);
        let changed = |toml: &str| needs_restart(&running, &config(toml, &[]));
        const PROVIDERS: &str = "providers (upstream, key, models, fallback, provider_window, rate_limit_headers, limit_scope, budget, token_charge, request_usage, default_completion_tokens, bytes_per_token)";
        for (what, toml) in [
            ("models", providers.replace("a/*", "b/*")),
            ("budget", format!("{providers}budget = \"shared\"\n")),
            (
                "api_key",
                format!("{providers}api_key = \"sk-0123456789\"\n"),
            ),
            (
                "fallback",
                format!("{providers}fallback_url = \"http://127.0.0.1:3/v1\"\n"),
            ),
            (
                "token_charge",
                format!("{providers}token_charge = \"actual\"\n"),
            ),
            (
                "bytes_per_token",
                format!("{providers}bytes_per_token = 2\n"),
            ),
        ] {
            assert_eq!(changed(&toml), [PROVIDERS], "{what}");
        }
        assert_eq!(
            changed(&format!("default_provider = \"b\"\n{providers}")),
            ["default_provider"]
        );
        assert_eq!(
            changed(&format!(
                "[client_priorities]\nclient-key-0123 = \"low\"\n{providers}"
            )),
            ["client_priorities"]
        );
        let rate =
            format!("{providers}rate_rpm = 5.0\nbucket_capacity = 3\ntokens_per_minute = 9000\n");
        assert!(changed(&rate).is_empty(), "run-time fields of a provider");
        assert_eq!(
            needs_restart(
                &config("", &[("SIDECAR_WORKERS", "1")]),
                &config("", &[("SIDECAR_WORKERS", "2")])
            ),
            ["workers"],
        );
    }
}
