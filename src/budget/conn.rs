//! The connection to Redis: one multiplexed connection per replica, re-established by
//! redis-rs's connection manager, every call bounded by `redis_timeout`.

use std::time::Duration;

use base64::Engine;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rustls::pki_types::CertificateDer;

use crate::config::RedisConfig;

/// A cheap-to-clone handle on the connection (it connects on first use).
#[derive(Clone)]
pub struct Conn {
    pub manager: ConnectionManager,
    pub timeout: Duration,
}

impl Conn {
    /// `rediss://` trusts the system roots, or the `upstream_ca_file` certificates when
    /// there are some.
    pub fn new(
        cfg: &RedisConfig,
        extra_ca: &[CertificateDer<'static>],
    ) -> redis::RedisResult<Self> {
        if cfg.url.is_tls() {
            // redis-rs builds its rustls configuration from the process default; ours is
            // ring (an error only says one is installed already).
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = if cfg.url.is_tls() && !extra_ca.is_empty() {
            redis::Client::build_with_tls(
                cfg.url.expose(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem(extra_ca)),
                },
            )?
        } else {
            redis::Client::open(cfg.url.expose())?
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let manager = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            manager,
            timeout: cfg.timeout,
        })
    }
}

/// Certificates as PEM text, the form redis-rs takes them in.
fn pem(certs: &[CertificateDer<'static>]) -> Vec<u8> {
    let mut out = String::new();
    for c in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out.into_bytes()
}

/// A Redis error as text, with the URL (if it appears) masked.
pub fn masked(e: &dyn std::fmt::Display, cfg: &RedisConfig) -> String {
    e.to_string().replace(cfg.url.expose(), cfg.url.masked())
}
