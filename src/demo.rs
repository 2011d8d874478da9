//! `nvidia-sidecar demo`: the simulated upstream at 40 RPM, the sidecar in front of it,
//! and a small synthetic client at mixed priorities — no key and no network needed.
//!
//! The client sends chat completions (a third of them streamed) at `client_rpm` —
//! faster than the upstream allows — with `X-Priority` high, normal or low, and prints
//! every few seconds what it got and what the sidecar and the upstream saw: requests
//! queue and leave at the upstream's rate, and the upstream refuses none.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;

use crate::app::App;
use crate::config::{Config, UpstreamUrl};
use crate::mock::{MockConfig, MockServer};
use crate::sidecar;
use crate::upstream::{Connector, Pool, RequestHead, KEEP_ALL};

/// Options of the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Requests per minute the synthetic client sends.
    #[arg(long, default_value_t = 50.0)]
    pub client_rpm: f64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests per minute the simulated upstream allows.
    #[arg(long, default_value_t = 40.0)]
    pub upstream_rpm: f64,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    by_status: BTreeMap<u16, u64>,
    failed: u64,
    latency_ms_sum: f64,
}

/// Runs the demo until `stop` resolves or the duration passes. `config` is the
/// sidecar's configuration; its upstream is replaced by the simulated one.
pub async fn run(
    mut config: Config,
    args: DemoArgs,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    let mock = MockServer::start(MockConfig {
        rpm: args.upstream_rpm,
        workers: 1,
        latency_ms: 300,
        token_delay_ms: 40,
        tokens: 24,
        ..MockConfig::default()
    })
    .map_err(|e| format!("cannot start the simulated upstream: {e}"))?;
    let upstream = UpstreamUrl::parse(&mock.base_url()).map_err(str::to_owned)?;
    for p in &mut config.providers {
        p.upstream = upstream.clone();
    }
    let app = App::new(config);
    let sidecar = sidecar::start(Arc::clone(&app)).map_err(|e| e.to_string())?;
    let addr = sidecar.local_addr;
    println!("nvidia-sidecar demo");
    println!(
        "  simulated upstream   {} ({} RPM, no key needed)",
        mock.base_url(),
        args.upstream_rpm
    );
    println!("  proxy (OpenAI base)  http://{addr}/v1");
    println!("  health               http://{addr}/healthz  http://{addr}/readyz");
    println!("  live dashboard       http://{addr}/api/dashboard");
    println!(
        "  Prometheus metrics   http://{}/metrics",
        sidecar.metrics_addr
    );
    println!(
        "  synthetic client     {} RPM, priorities high/normal/low, 1 in 3 streamed",
        args.client_rpm
    );
    println!(
        "  try: curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\"
    );
    println!("         -d '{{\"model\":\"meta/llama-3.1-8b-instruct\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
    println!("Ctrl-C stops the demo.");

    let status = {
        let app = Arc::clone(&app);
        let mock = Arc::clone(&mock.shared);
        move || {
            let p = app.default_provider();
            let now = app.clock.now_nanos();
            let q = p.limiter.queues.counts();
            let r = p.limiter.retreat_view(now);
            let v = p.limiter.pacing_view(now);
            format!(
                "sidecar: queued {} (high {} normal {} low {}), {} at {:.0}/{:.0} RPM, limit {}/window ({}) | upstream: {} requests, {} refused with 429",
                q.total,
                q.depth[0],
                q.depth[1],
                q.depth[2],
                r.state.as_str(),
                r.effective_rpm,
                r.base_rpm,
                v.limit,
                v.source.as_str(),
                mock.stats.requests.load(std::sync::atomic::Ordering::Relaxed),
                mock.stats.rate_limited.load(std::sync::atomic::Ordering::Relaxed),
            )
        }
    };
    let client = client(addr, args.client_rpm, status);
    let limit = async {
        match args.duration {
            Some(s) => tokio::time::sleep(Duration::from_secs_f64(s.max(0.0))).await,
            None => std::future::pending().await,
        }
    };
    let tally = tokio::select! {
        t = client => t,
        _ = stop => None,
        _ = limit => None,
    };
    drop(tally);
    // Stop off the event loop, so the client's aborted requests can close their
    // connections while the sidecar drains.
    let _ = tokio::task::spawn_blocking(move || sidecar.stop()).await;
    let (requests, limited) = (mock.requests(), mock.rate_limited());
    mock.stop();
    println!("demo finished: the simulated upstream saw {requests} requests and refused {limited} with 429");
    Ok(())
}

/// Sends requests forever, printing a summary every 5 s.
async fn client(addr: SocketAddr, rpm: f64, status: impl Fn() -> String) -> Option<Tally> {
    let base = UpstreamUrl::parse(&format!("http://{addr}/v1")).ok()?;
    let pool = Pool::new(Connector::new(Duration::from_secs(5)), Rc::default());
    // Dropping the set (when the demo ends) aborts the requests still in flight.
    let mut in_flight = tokio::task::JoinSet::new();
    let tally = Rc::new(std::cell::RefCell::new(Tally::default()));
    let interval = Duration::from_secs_f64(60.0 / rpm.max(0.1));
    let mut tick = tokio::time::interval(interval);
    let mut report = tokio::time::interval(Duration::from_secs(5));
    report.tick().await;
    let priorities = ["high", "normal", "normal", "low"];
    let mut n: usize = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                n += 1;
                let stream = n.is_multiple_of(3);
                let priority = priorities[n % priorities.len()];
                let body = format!(
                    r#"{{"model":"meta/llama-3.1-8b-instruct","stream":{stream},"messages":[{{"role":"user","content":"demo request {n}"}}]}}"#
                );
                let mut headers = HeaderMap::new();
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                headers.insert("x-priority", HeaderValue::from_static(priority));
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                let body = Bytes::from(body);
                let pool = Rc::clone(&pool);
                let tally = Rc::clone(&tally);
                let base = base.clone();
                tally.borrow_mut().sent += 1;
                in_flight.spawn_local(async move {
                    let started = tokio::time::Instant::now();
                    let result = async {
                        let host = HeaderValue::from_str(base.authority.as_str()).map_err(|e| e.to_string())?;
                        let path = base.path_for("chat/completions", None);
                        let head = RequestHead { method: &Method::POST, target: &path, host: &host, headers: &headers, skip: KEEP_ALL, set: &[] };
                        let resp = pool.send(&base, &head, &body).await.map_err(|e| e.to_string())?;
                        let status = resp.status().as_u16();
                        resp.into_body().collect().await.map_err(|e| e.to_string())?;
                        Ok::<u16, String>(status)
                    }.await;
                    let mut t = tally.borrow_mut();
                    match result {
                        Ok(status) => {
                            *t.by_status.entry(status).or_default() += 1;
                            t.latency_ms_sum += started.elapsed().as_secs_f64() * 1e3;
                        }
                        Err(_) => t.failed += 1,
                    }
                });
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
            _ = report.tick() => {
                let t = tally.borrow();
                let done: u64 = t.by_status.values().sum();
                let statuses: Vec<String> = t.by_status.iter().map(|(s, c)| format!("{s}×{c}")).collect();
                println!(
                    "client: sent {} answered {} [{}] failed {} in flight {} mean latency {:.0} ms",
                    t.sent,
                    done,
                    statuses.join(" "),
                    t.failed,
                    t.sent - done - t.failed,
                    if done > 0 { t.latency_ms_sum / done as f64 } else { 0.0 },
                );
                println!("        {}", status());
            }
        }
    }
}
