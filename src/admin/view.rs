//! The effective configuration as the admin API shows it: every setting, secrets
//! masked to their first four characters, the run-time fields (the rows of
//! [`crate::config::runtime`]) from the current [`Hot`], and each provider's learned
//! limit ([`pacing`]) as it is now. In cluster mode (`redis_url` set) also the Redis
//! settings (the URL masked) and each shared budget ([`cluster`]): the cluster's values
//! and this replica's own view.

use serde_json::{json, Value};

use crate::app::App;
use crate::budget::ClusterView;
use crate::config::runtime;
use crate::config::{LogFormat, RedisConfig, Secret};
use crate::hot::Hot;
use crate::limiter::PacingView;

fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}

/// Adds `fields` (name and value) to the object `into`.
fn insert(into: &mut Value, fields: Vec<(&'static str, Value)>) {
    if let Value::Object(map) = into {
        map.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
    }
}

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
                "effective_rpm": effective,
                "models": p.models,
                "fallback": p.fallback.as_ref().map(|f| f.display()),
                "provider_window": secs(p.window),
                "rate_limit_headers": p.rate_limit_headers.as_str(),
                "limit_scope": p.limit_scope.as_str(),
                "token_charge": p.token_charge.as_str(),
                "request_usage": p.request_usage,
                "default_completion_tokens": p.token_rules.default_completion,
                "bytes_per_token": p.token_rules.bytes_per_token.as_f64(),
                "default": std::ptr::eq(p, c.default_provider()),
                "pacing": pacing(&provider.limiter.pacing_view(now), now),
                "model_pacing": model_pacing(&provider.limiter, now),
        });
        insert(&mut entry, h.shown());
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
    let mut global = json!({
            "listen": c.listen.to_string(),
            "metrics_listen": c.metrics_listen.to_string(),
            "workers": c.workers.get(),
            "log_format": match c.log_format { LogFormat::Json => "json", LogFormat::Pretty => "pretty" },
            "admin_token": c.admin_token.as_ref().map(Secret::masked),
            "connect_timeout": secs(c.timeouts.connect),
            "stream_idle_timeout": secs(c.timeouts.stream_idle),
            "shutdown_grace": secs(c.timeouts.shutdown_grace),
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
    });
    insert(&mut global, hot.shown());
    insert(&mut global, hot.defaults.shown());
    let mut out = json!({
        "version": hot.version.to_string(),
        "hot_fields": runtime::names(None),
        "admin": app.admin.describe(),
        "global": global,
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
            // The shared token budget (null: none): tokens per window.
            "tokens": (r.tokens_limit > 0).then(|| json!({
                "tokens_per_minute": r.tokens_per_minute,
                "configured": r.tokens_limit,
                "learned": (r.tokens_learned > 0).then_some(r.tokens_learned),
                "source": r.tokens_source,
                "leases": v.token_leases.labelled().into_iter()
                    .chain([("late", v.token_leases.late)])
                    .collect::<std::collections::BTreeMap<_, _>>(),
            })),
        })
    });
    let shares: serde_json::Map<String, Value> = crate::exposition::cluster::shares(v)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exposition::cluster::tests::view;

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
