//! Container health probe for images without a shell or curl (deploy/Dockerfile).
//!
//! `healthcheck [URL]` sends `GET URL` and exits 0 on a 2xx answer, 1 on anything else
//! (the exit codes Docker's HEALTHCHECK expects). Only plain `http://host[:port]/path`.
//! Without a URL it probes the sidecar's liveness endpoint, `/healthz`, on the address
//! the sidecar listens on: SIDECAR_LISTEN_HOST (0.0.0.0 and :: mean loopback) and
//! SIDECAR_LISTEN_PORT, read from the container's environment, as the sidecar does.
//!
//! Standard library only, so the builder stage compiles it with plain `rustc`:
//!   rustc --edition 2021 -C opt-level=s -C strip=symbols deploy/healthcheck.rs

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(3);

fn default_url() -> String {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let host = var("SIDECAR_LISTEN_HOST").unwrap_or_else(|| "127.0.0.1".into());
    let host = match host.trim() {
        "0.0.0.0" | "localhost" => "127.0.0.1".to_owned(),
        "::" | "[::]" | "::1" => "[::1]".to_owned(),
        h if h.contains(':') && !h.starts_with('[') => format!("[{h}]"),
        h => h.to_owned(),
    };
    let port = var("SIDECAR_LISTEN_PORT").unwrap_or_else(|| "8080".into());
    format!("http://{host}:{}/healthz", port.trim())
}

/// Splits `http://host[:port]/path` into (`host:port`, `host` for the Host header, `path`).
fn split(url: &str) -> Result<(String, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    let addr = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_owned(), path.to_owned()))
}

fn probe(url: &str) -> Result<String, String> {
    let (addr, host, path) = split(url)?;
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut stream =
        TcpStream::connect_timeout(&sock, TIMEOUT).map_err(|e| format!("{sock}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).ok();
    stream.set_write_timeout(Some(TIMEOUT)).ok();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nvidia-sidecar-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{sock}: {e}"))?;
    // The status line is all we need; read until its end (or 512 bytes).
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 512 {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("{sock}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").trim().to_owned();
    let mut parts = line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let status = parts.next().unwrap_or("");
    if version.starts_with("HTTP/") && status.len() == 3 && status.starts_with('2') {
        Ok(line)
    } else if line.is_empty() {
        Err(format!("GET {url}: no answer"))
    } else {
        Err(format!("GET {url}: {line}"))
    }
}

fn main() -> ExitCode {
    let url = std::env::args().nth(1).unwrap_or_else(default_url);
    match probe(&url) {
        Ok(line) => {
            println!("{url}: {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("unhealthy: {e}");
            ExitCode::FAILURE
        }
    }
}
