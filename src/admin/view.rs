//! The effective configuration as the admin API shows it: every setting, secrets
//! masked to their first four characters, run-time fields from the current [`Hot`],
//! and each provider's learned limit ([`pacing`]) as it is now. In cluster mode
//! (`redis_url` set) also the Redis settings (the URL masked) and each shared budget
//! ([`cluster`]): the cluster's values and this replica's own view.

use serde_json::{json, Value};

use crate::app::App;
use crate::budget::ClusterView;
use crate::config::{Config, LogFormat, RedisConfig, Secret};
use crate::hot::Hot;
use crate::limiter::PacingView;

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

fn level(l: tracing::Level) -> String {
    l.as_str().to_ascii_lowercase()
}

/// The fields the admin API can change.
pub const HOT_FIELDS: [&str; 7] = [
    "rate_rpm",
    "bucket_capacity",
    "queue_max_size",
    "low_priority_timeout",
    "request_timeout",
    "fallback_enabled_passthrough",
    "log_level",
];

/// `GET /api/admin/config`.
pub fn config(app: &App, hot: &Hot) -> Value {
    let c = &app.config;
    let now = app.clock.now_nanos();
    let mut providers = serde_json::Map::new();
    for ((p, h), provider) in c.providers.iter().zip(&hot.providers).zip(&app.providers) {
        let effective = provider.limiter.retreat_view(now).effective_rpm;
        let mut entry = json!({
                "upstream": p.upstream.display(),
                "api_key": p.api_key.as_ref().map(Secret::masked),
                "rate_rpm": h.rate_rpm,
                "effective_rpm": effective,
                "bucket_capacity": h.bucket_capacity,
                "queue_max_size": h.queue_max_size,
                "low_priority_timeout": secs(h.low_priority_timeout),
                "models": p.models,
                "fallback": p.fallback.as_ref().map(|f| f.display()),
                "provider_window": secs(p.window),
                "rate_limit_headers": p.rate_limit_headers.as_str(),
                "limit_scope": p.limit_scope.as_str(),
                "default": std::ptr::eq(p, c.default_provider()),
                "pacing": pacing(&provider.limiter.pacing_view(now), now),
                "model_pacing": model_pacing(&provider.limiter, now),
        });
        if let (Some(budget), Value::Object(map)) = (&provider.budget, &mut entry) {
            map.insert("cluster".to_owned(), cluster(&budget.view()));
        }
        providers.insert(p.name.clone(), entry);
    }
    let priorities: serde_json::Map<String, Value> = c
        .client_priorities
        .iter()
        .map(|(k, v)| (mask(k), json!(v.as_str())))
        .collect();
    let mut out = json!({
        "version": hot.version.to_string(),
        "hot_fields": HOT_FIELDS,
        "admin": app.admin.describe(),
        "global": {
            "listen": c.listen.to_string(),
            "metrics_listen": c.metrics_listen.to_string(),
            "workers": c.workers.get(),
            "log_level": level(hot.log_level),
            "log_format": match c.log_format { LogFormat::Json => "json", LogFormat::Pretty => "pretty" },
            "admin_token": c.admin_token.as_ref().map(Secret::masked),
            "request_timeout": secs(hot.request_timeout),
            "connect_timeout": secs(c.timeouts.connect),
            "stream_idle_timeout": secs(c.timeouts.stream_idle),
            "shutdown_grace": secs(c.timeouts.shutdown_grace),
            "fallback_enabled_passthrough": hot.fallback_enabled_passthrough,
            "rate_rpm": hot.defaults.rate_rpm,
            "bucket_capacity": hot.defaults.bucket_capacity,
            "queue_max_size": hot.defaults.queue_max_size,
            "low_priority_timeout": secs(hot.defaults.low_priority_timeout),
            "upstream_429_retries": c.upstream_429_retries,
            "ready_cache": secs(c.ready_cache),
            "snapshot_interval": secs(c.snapshot_interval),
            "max_headers": c.limits.max_headers,
            "max_header_bytes": c.limits.max_header_bytes,
            "max_body_bytes": c.limits.max_body_bytes,
            "max_connections": c.limits.max_connections,
            "keep_alive": c.limits.keep_alive,
            "retreat_factor": c.retreat.decrease_factor,
            "retreat_floor": c.retreat.floor_fraction,
            "retreat_quiet_period": secs(c.retreat.quiet_period),
            "retreat_default_pause": secs(c.retreat.default_pause),
            "recovery_step": c.retreat.recovery_step,
            "recovery_interval": secs(c.retreat.recovery_interval),
            "window_margin": c.margin.fraction,
            "window_margin_floor": secs(c.margin.floor),
            "probe_interval": secs(c.probe_interval),
            "state_file": c.state_file.as_ref().map(|p| p.display().to_string()),
            "client_priorities": priorities,
            "default_provider": c.default_provider().name,
        },
        "providers": providers,
    });
    if let (Some(r), Value::Object(map)) = (&c.redis, &mut out) {
        map.insert("redis".to_owned(), redis(r));
    }
    out
}

/// The Redis settings of cluster mode; the URL masked (`redis://user:****@host:6379/0`).
pub fn redis(r: &RedisConfig) -> Value {
    json!({
        "url": r.url.masked(),
        "prefix": r.prefix,
        "timeout_secs": secs(r.timeout),
        "replicas": r.replicas,
        "fallback_for_secs": secs(r.fallback_for),
    })
}

/// A provider's shared budget: `record`, the cluster's values as this replica last read
/// them from Redis (`null` before it did; they win over this replica's file once the
/// budget exists), and `replica`, this replica's own view of the cluster.
pub fn cluster(v: &ClusterView) -> Value {
    let r = &v.record;
    let record = (r.version != 0).then(|| {
        json!({
            "version": r.version,
            "rate_rpm": r.rate_rpm,
            "bucket_capacity": r.bucket_capacity,
            "window": secs(r.window),
            "fallback_enabled_passthrough": r.fallback,
            "learned": r.learned,
            "limit": r.limit,
            "source": r.source,
            "probing": r.probing,
            "rpm": r.rpm,
            "retreat_factor": r.retreat_factor,
            "pause_reason": (r.pause_until_ms != 0 && !r.pause_reason.is_empty())
                .then_some(r.pause_reason.as_str()),
            "changes": r.changes,
        })
    });
    let shares: serde_json::Map<String, Value> = crate::metrics::cluster::shares(v)
        .into_iter()
        .map(|(replica, n)| (replica.to_owned(), json!(n)))
        .collect();
    json!({
        "budget": &*v.budget,
        "record": record,
        "replica": {
            "id": &*v.replica,
            "mode": v.mode.as_str(),
            "backend_up": v.backend_up,
            "down_for": v.down_for.map(secs),
            "replicas": v.replicas,
            "share": v.own_share(),
            "shares": shares,
            "fallback_limit": v.fallback_limit,
            "reserved": v.reserved,
            "learning": v.learning,
            "generation": Some(v.generation.as_str()).filter(|g| !g.is_empty()),
        },
    })
}

/// A provider's learned limit at clock time `now`. Counts are sends per `window`
/// (seconds); `next_probe_in` is `null` when there is nothing to probe, `pause` when
/// admission is not paused.
/// With `limit_scope = "model"`: each live model scope's pacing, by model name (an
/// empty object otherwise).
pub fn model_pacing(limiter: &crate::limiter::Limiter, now: u64) -> Value {
    let models: serde_json::Map<String, Value> = limiter
        .models()
        .into_iter()
        .map(|(name, m)| (name.to_string(), pacing(&m.pacing_view(now), now)))
        .collect();
    Value::Object(models)
}

pub fn pacing(v: &PacingView, now: u64) -> Value {
    let secs_until = |at: u64| at.saturating_sub(now) as f64 / 1e9;
    json!({
        "window": secs(v.window),
        "limit": v.limit,
        "learned": v.learned,
        "ceiling": v.ceiling,
        "learned_rpm": v.learned_rpm,
        "ceiling_rpm": v.ceiling_rpm,
        "source": v.source.as_str(),
        "probing": v.probing,
        "relearning": v.relearning,
        "next_probe_in": v.next_probe_at.map(secs_until),
        "pause": v.pause.map(|(reason, until)| json!({
            "reason": reason.as_str(),
            "seconds": secs_until(until),
        })),
        "sent_in_window": v.sent_in_window,
        "changes": v.changes,
        "retreat": {
            "state": v.retreat_state.as_str(),
            "factor": v.retreat_factor,
        },
    })
}

/// A client token as a map key: masked like every secret.
fn mask(token: &str) -> String {
    Secret::new(token.to_owned()).map_or_else(String::new, |s| s.masked())
}

/// Settings that differ between `running` and `loaded` but change only on restart.
pub fn needs_restart(running: &Config, loaded: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |name: &'static str, differs: bool| {
        if differs {
            out.push(name);
        }
    };
    let expose = |s: &Option<Secret>| s.as_ref().map(|s| s.expose().to_owned());
    check("listen", running.listen != loaded.listen);
    check(
        "metrics_port",
        running.metrics_listen != loaded.metrics_listen,
    );
    check("workers", running.workers != loaded.workers);
    check("log_format", running.log_format != loaded.log_format);
    check(
        "admin_token",
        expose(&running.admin_token) != expose(&loaded.admin_token),
    );
    check(
        "timeouts",
        (
            running.timeouts.connect,
            running.timeouts.stream_idle,
            running.timeouts.shutdown_grace,
        ) != (
            loaded.timeouts.connect,
            loaded.timeouts.stream_idle,
            loaded.timeouts.shutdown_grace,
        ),
    );
    check(
        "limits",
        format!("{:?}", running.limits) != format!("{:?}", loaded.limits),
    );
    check("ready_cache", running.ready_cache != loaded.ready_cache);
    check(
        "snapshot_interval",
        running.snapshot_interval != loaded.snapshot_interval,
    );
    check(
        "upstream_429_retries",
        running.upstream_429_retries != loaded.upstream_429_retries,
    );
    check(
        "retreat",
        format!("{:?}", running.retreat) != format!("{:?}", loaded.retreat),
    );
    check(
        "client_priorities",
        running.client_priorities != loaded.client_priorities,
    );
    check(
        "upstream_ca_file",
        running.upstream_ca != loaded.upstream_ca,
    );
    check("window_margin", running.margin != loaded.margin);
    check(
        "probe_interval",
        running.probe_interval != loaded.probe_interval,
    );
    check("state_file", running.state_file != loaded.state_file);
    let provider_static = |c: &Config| -> Vec<String> {
        c.providers
            .iter()
            .map(|p| {
                format!(
                    "{} {:?} {:?} {:?} {:?} {:?} {:?}",
                    p.upstream.display(),
                    expose(&p.api_key),
                    p.models,
                    p.fallback.as_ref().map(|f| f.display()),
                    p.window,
                    p.rate_limit_headers,
                    p.limit_scope,
                )
            })
            .collect()
    };
    check(
        "providers (upstream, key, models, fallback, provider_window, rate_limit_headers, limit_scope)",
        provider_static(running) != provider_static(loaded),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::cluster::tests::view;

    #[test]
    fn a_budget_shows_the_clusters_record_and_the_replicas_own_view() {
        let v = cluster(&view());
        assert_eq!(v["budget"], "shared-nv");
        assert_eq!(v["record"]["version"], 7);
        assert_eq!(v["record"]["rate_rpm"], 40.0);
        assert_eq!(v["record"]["bucket_capacity"], 5);
        assert_eq!(v["record"]["window"], 60.0);
        assert_eq!(v["record"]["fallback_enabled_passthrough"], true);
        assert_eq!(v["record"]["limit"], 36);
        assert_eq!(v["record"]["source"], "learned_429");
        assert!(v["record"]["pause_reason"].is_null());
        let r = &v["replica"];
        assert_eq!(r["id"], "host-a-12-00ff");
        assert_eq!(r["mode"], "shared");
        assert_eq!(r["backend_up"], true);
        assert_eq!(r["replicas"], 3);
        assert_eq!(r["share"], 0.5);
        assert_eq!(r["fallback_limit"], 13);
        assert_eq!(
            r["shares"],
            json!({"host-a-12-00ff": 30, "host-b-7-abcd": 20, "host-c-9-0001": 10})
        );
        assert!(r["down_for"].is_null());
    }

    #[test]
    fn the_redis_settings_show_the_url_masked() {
        let r = RedisConfig {
            url: crate::config::RedisUrl::parse("redis://app:hunter2-secret@redis:6380/2").unwrap(),
            prefix: "p:".into(),
            timeout: std::time::Duration::from_millis(250),
            replicas: 3,
            fallback_for: std::time::Duration::from_secs(120),
        };
        let v = redis(&r);
        assert_eq!(
            v,
            json!({
                "url": "redis://app:****@redis:6380/2",
                "prefix": "p:",
                "timeout_secs": 0.25,
                "replicas": 3,
                "fallback_for_secs": 120.0,
            })
        );
        assert!(!v.to_string().contains("hunter2"));
    }
}
