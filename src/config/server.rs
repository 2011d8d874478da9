//! The steps that check the serving side: listeners, workers, logs, timeouts and the
//! limits on client connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;

use super::error::ConfigError;
use super::runtime::ROWS;
use super::settings::Merged;
use super::typed::{Fairness, Limits, LogFormat, Timeouts};
use super::validate::{at_least, seconds};

/// The proxy's and the metrics' listen addresses (one host, two ports).
pub fn listeners(s: &Merged) -> Result<(SocketAddr, SocketAddr), ConfigError> {
    let ip = listen_ip(&s.listen_host)?;
    let listen = SocketAddr::new(ip, s.listen_port);
    let metrics_listen = SocketAddr::new(ip, s.metrics_port);
    if listen.port() != 0 && listen.port() == metrics_listen.port() {
        return Err(ConfigError::invalid(
            "metrics_port",
            metrics_listen.port(),
            "a port different from listen_port",
        ));
    }
    Ok((listen, metrics_listen))
}

fn listen_ip(value: &str) -> Result<IpAddr, ConfigError> {
    if value.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    value.parse().map_err(|_| {
        ConfigError::invalid(
            "listen_host",
            value,
            "an IP address such as 127.0.0.1, 0.0.0.0 or ::1 (or localhost)",
        )
    })
}

/// Worker threads: 0 is one per core.
pub fn workers(s: &Merged) -> Result<NonZeroUsize, ConfigError> {
    match s.workers {
        0 => Ok(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)),
        n if n <= 1024 => Ok(NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN)),
        n => Err(ConfigError::invalid(
            "workers",
            n,
            "0 (one per core) or a count up to 1024",
        )),
    }
}

/// The log level (a run-time field) and format.
pub fn logs(s: &Merged) -> Result<(tracing::Level, LogFormat), ConfigError> {
    let level = ROWS
        .log_level
        .configured("log_level", &s.log_level, &s.log_level)?;
    let format = match s.log_format.trim().to_ascii_lowercase().as_str() {
        "json" => LogFormat::Json,
        "pretty" | "text" => LogFormat::Pretty,
        _ => {
            return Err(ConfigError::invalid(
                "log_format",
                &s.log_format,
                "json or pretty",
            ))
        }
    };
    Ok((level, format))
}

/// The timeouts of the request path (the request's own is a run-time field).
pub fn timeouts(s: &Merged) -> Result<Timeouts, ConfigError> {
    Ok(Timeouts {
        request: ROWS.request_timeout.configured(
            "request_timeout",
            &s.request_timeout,
            s.request_timeout,
        )?,
        connect: seconds("connect_timeout", s.connect_timeout)?,
        stream_idle: seconds("stream_idle_timeout", s.stream_idle_timeout)?,
        shutdown_grace: seconds("shutdown_grace", s.shutdown_grace)?,
    })
}

/// The limits of client requests and connections.
pub fn limits(s: &Merged) -> Result<Limits, ConfigError> {
    const MIN_1: &str = "an integer of at least 1";
    const MIN_1024: &str = "an integer of at least 1024";
    Ok(Limits {
        header_read_timeout: seconds("header_read_timeout", s.header_read_timeout)?,
        max_headers: at_least("max_headers", s.max_headers, 8, "an integer of at least 8")?,
        max_header_bytes: at_least("max_header_bytes", s.max_header_bytes, 1024, MIN_1024)?,
        max_body_bytes: at_least("max_body_bytes", s.max_body_bytes, 1024, MIN_1024)?,
        max_connections: at_least("max_connections", s.max_connections, 1, MIN_1)?,
        h2_max_concurrent_streams: at_least(
            "h2_max_concurrent_streams",
            s.h2_max_concurrent_streams,
            1,
            MIN_1,
        )?,
        h2_max_header_list_size: at_least(
            "h2_max_header_list_size",
            s.h2_max_header_list_size,
            1024,
            MIN_1024,
        )?,
        keep_alive: s.keep_alive,
    })
}

/// How client connections share the connection cap of `limits`.
pub fn fairness(s: &Merged, limits: &Limits) -> Result<Fairness, ConfigError> {
    Ok(Fairness {
        first_byte_timeout: seconds("first_byte_timeout", s.first_byte_timeout)?
            .min(limits.header_read_timeout),
        max_connections_per_ip: match s.max_connections_per_ip {
            n if n <= limits.max_connections => NonZeroUsize::new(n),
            n => {
                return Err(ConfigError::invalid(
                    "max_connections_per_ip",
                    n,
                    "0 (no cap) or an integer up to max_connections",
                ))
            }
        },
    })
}
