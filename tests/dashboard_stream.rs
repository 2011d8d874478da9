//! The live dashboard: the SSE stream (one frame per published snapshot, the same bytes
//! for every client, builds driven by ticks not by clients), the JSON snapshot, the
//! clean end of streams on shutdown and the self-contained page.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::body::Incoming;
use nvidia_sidecar::clock::Clock;
use nvidia_sidecar::limiter::PauseReason;

/// Snapshot period in the tests, in seconds.
const INTERVAL: f64 = 0.1;
const INTERVAL_ENV: (&str, &str) = ("SIDECAR_SNAPSHOT_INTERVAL", "0.1");

/// One SSE frame as received.
#[derive(Debug, Clone)]
struct Frame {
    /// The whole frame, `\n\n` included.
    raw: String,
    retry: Option<u64>,
    id: u64,
    data: String,
}

/// Parses one frame strictly: optional `retry: N\n`, then `id: N\ndata: <one line>\n\n`.
fn parse_frame(raw: &str) -> Frame {
    let body = raw
        .strip_suffix("\n\n")
        .unwrap_or_else(|| panic!("frame does not end with a blank line: {raw:?}"));
    let mut lines: Vec<&str> = body.split('\n').collect();
    let retry = match lines.first() {
        Some(l) if l.starts_with("retry: ") => {
            let v = l["retry: ".len()..]
                .parse()
                .unwrap_or_else(|e| panic!("retry value ({e}): {raw:?}"));
            lines.remove(0);
            Some(v)
        }
        _ => None,
    };
    assert_eq!(lines.len(), 2, "expected id and data lines: {raw:?}");
    let id = lines[0]
        .strip_prefix("id: ")
        .unwrap_or_else(|| panic!("no id line: {raw:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("id ({e}): {raw:?}"));
    let data = lines[1]
        .strip_prefix("data: ")
        .unwrap_or_else(|| panic!("no data line: {raw:?}"))
        .to_owned();
    Frame {
        raw: raw.to_owned(),
        retry,
        id,
        data,
    }
}

/// Reads an SSE body frame by frame (frames may be split over or share chunks).
struct SseReader {
    body: Incoming,
    buf: String,
}

impl SseReader {
    async fn open(addr: SocketAddr) -> Self {
        let resp = send(addr, req("GET", addr, "/api/dashboard/stream", &[], ""))
            .await
            .expect("stream response");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        Self {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next whole frame; `None` when the stream ended cleanly.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let raw: String = self.buf.drain(..end + 2).collect();
                return Some(parse_frame(&raw));
            }
            match next_chunk(&mut self.body).await {
                Some(Ok(c)) => self
                    .buf
                    .push_str(std::str::from_utf8(&c).expect("UTF-8 frames")),
                Some(Err(e)) => panic!("the stream failed: {e}"),
                None => {
                    assert!(
                        self.buf.is_empty(),
                        "stream ended mid-frame: {:?}",
                        self.buf
                    );
                    return None;
                }
            }
        }
    }
}

/// Scrapes until `name` has value `want`, for at most 20 s.
async fn wait_for_metric(addr: SocketAddr, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = sample(&metrics_text(addr).await, name);
        if v == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} stayed {v:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_clients_get_the_same_frames_from_one_build_per_tick() {
    const CLIENTS: usize = 50;
    const FRAMES: usize = 5;
    let s = stack(unlimited_mock(), &[INTERVAL_ENV, ("SIDECAR_WORKERS", "2")]);
    let hub = std::sync::Arc::clone(&s.app.snapshots);
    let started = Instant::now();
    let builds_before = hub.builds();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let addr = s.addr;
            tokio::spawn(async move {
                let mut r = SseReader::open(addr).await;
                let mut frames = Vec::with_capacity(FRAMES);
                while frames.len() < FRAMES {
                    frames.push(r.next().await.expect("a frame before the stream ends"));
                }
                // Keep the stream open until the test has counted the clients.
                (frames, r)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut readers = Vec::new();
    for c in clients {
        let (frames, r) = c.await.unwrap();
        all.push(frames);
        readers.push(r);
    }
    let builds_after = hub.builds();
    let elapsed = started.elapsed().as_secs_f64();

    // While all 50 are connected, the gauge says so.
    wait_for_metric(s.metrics_addr, "sidecar_dashboard_clients", CLIENTS as f64).await;

    let mut by_seq: HashMap<u64, (String, usize)> = HashMap::new();
    for (n, frames) in all.iter().enumerate() {
        assert_eq!(
            frames[0].retry,
            Some(3000),
            "client {n}: first frame {:?}",
            frames[0].raw
        );
        assert!(frames[0].raw.starts_with("retry: 3000\nid: "));
        for f in &frames[1..] {
            assert_eq!(f.retry, None, "client {n}: retry after the first frame");
        }
        for w in frames.windows(2) {
            assert!(
                w[1].id > w[0].id,
                "client {n}: ids not increasing: {} then {}",
                w[0].id,
                w[1].id
            );
            // A slow client may miss a publish (the stream sends the latest), never
            // see a sequence that was not published.
            assert_eq!(
                (w[1].id - w[0].id) % 2,
                0,
                "client {n}: odd step {} → {}",
                w[0].id,
                w[1].id
            );
        }
        for f in frames {
            assert!(f.id > 0 && f.id % 2 == 0, "client {n}: id {}", f.id);
            let v: serde_json::Value = serde_json::from_str(&f.data)
                .unwrap_or_else(|e| panic!("client {n}: data not JSON ({e}): {}", f.data));
            assert_eq!(v["seq"].as_u64(), Some(f.id), "client {n}: seq ≠ id");
            assert_eq!(
                v["builds"].as_u64(),
                Some(f.id / 2),
                "client {n}: one build per publish"
            );
            assert_eq!(v["tick_ms"], 100);
            let entry = by_seq.entry(f.id).or_insert_with(|| (f.data.clone(), 0));
            assert_eq!(
                entry.0, f.data,
                "client {n}: seq {} differs between clients",
                f.id
            );
            entry.1 += 1;
        }
    }
    assert!(
        by_seq.values().any(|(_, seen)| *seen > 1),
        "no sequence was seen by two clients: {:?}",
        by_seq.keys()
    );

    // Builds follow the ticks, not the number of clients.
    let builds = builds_after - builds_before;
    let bound = elapsed / INTERVAL + 2.0;
    assert!(builds >= 1, "no build while the clients read");
    assert!(
        builds as f64 <= bound,
        "{builds} builds in {elapsed:.2} s at one per {INTERVAL} s (bound {bound:.1})"
    );
    eprintln!(
        "{CLIENTS} clients × {FRAMES} frames: {builds} builds in {elapsed:.2} s, {} distinct sequences",
        by_seq.len()
    );

    // Once they disconnect, the gauge goes back to zero.
    drop(readers);
    wait_for_metric(s.metrics_addr, "sidecar_dashboard_clients", 0.0).await;
    assert_eq!(hub.clients(), 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_reflects_the_traffic() {
    const N: u64 = 12;
    let s = stack(
        unlimited_mock(),
        &[INTERVAL_ENV, ("SIDECAR_QUEUE_MAX_SIZE", "17")],
    );
    s.chats_ok(N as usize).await;
    let v = snapshot_until(s.addr, &format!("{N} requests"), |v| {
        let p = &v["providers"][0];
        p["requests"]["total"].as_u64() == Some(N) && p["latency_ms"]["count"].as_u64() == Some(N)
    })
    .await;
    let seq = v["seq"].as_u64().unwrap();
    assert!(seq > 0 && seq % 2 == 0, "{v}");
    assert_eq!(v["builds"].as_u64(), Some(seq / 2));
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["providers_total"], 1);
    let p = &v["providers"][0];
    assert_eq!(p["name"], "nvidia");
    assert_eq!(p["requests"]["limited"].as_u64(), Some(N));
    assert_eq!(p["requests"]["passthrough"].as_u64(), Some(0));
    for q in ["p50", "p90", "p99"] {
        assert!(p["latency_ms"][q].is_number(), "latency {q}: {p}");
    }
    assert!(
        p["latency_ms"]["p50"].as_f64() <= p["latency_ms"]["p99"].as_f64(),
        "{p}"
    );
    let rps = p["history"]["rps"].as_array().expect("history.rps");
    assert!(!rps.is_empty(), "{p}");
    for series in [
        "rps",
        "p99_ms",
        "queue",
        "effective_rpm",
        "learned_rpm",
        "ceiling_rpm",
    ] {
        assert_eq!(
            p["history"][series].as_array().map(Vec::len),
            Some(rps.len()),
            "history.{series}"
        );
    }
    assert_eq!(p["queue"]["max"], 17);
    assert_eq!(p["queue"]["total"], 0);
    assert_eq!(p["retreat"]["state"], "normal");
    assert_eq!(p["rate"]["base_rpm"].as_f64(), Some(6_000_000.0));
    assert_eq!(p["rate"]["effective_rpm"].as_f64(), Some(6_000_000.0));
    assert_eq!(p["errors"]["upstream"], 0);
    assert!(
        !p["upstream"].as_str().unwrap_or("").is_empty(),
        "upstream shown: {p}"
    );
    // The request ledger: N arrived, each ended once as a success, none in flight.
    let outcomes = serde_json::json!({
        "success": N, "client_error": 0, "upstream_429": 0, "upstream_error": 0,
        "rejected": 0, "dropped": 0, "client_gone": 0, "shutdown": 0,
    });
    assert_eq!(
        v["requests"],
        serde_json::json!({"arrived": N, "in_flight": 0, "outcomes": outcomes})
    );
    assert_eq!(p["requests"]["in_flight"], 0);
    assert_eq!(p["requests"]["outcomes"], outcomes);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

/// Polls the snapshot until its first provider satisfies `cond`; returns that provider.
async fn provider_until(
    addr: SocketAddr,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let v = snapshot_until(addr, what, |v| cond(&v["providers"][0])).await;
    v["providers"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_shows_the_learned_limit_its_source_and_a_pause() {
    let (s, clock) = manual_stack(
        unlimited_mock(),
        &[
            INTERVAL_ENV,
            ("SIDECAR_RATE_RPM", "600"),
            ("SIDECAR_BUCKET_CAPACITY", "10"),
            ("SIDECAR_PROVIDER_WINDOW", "6"),
            ("SIDECAR_PROBE_INTERVAL", "60"),
        ],
    );
    let limiter = Arc::clone(&s.app.providers[0].limiter);

    // Fresh: the configured rate, nothing to probe, no pause.
    let p = provider_until(s.addr, "a first build", |p| p["pacing"].is_object()).await;
    assert_eq!(
        p["pacing"],
        serde_json::json!({
            "window_s": 6.0,
            "limit": 60,
            "learned": 60,
            "ceiling": 60,
            "learned_rpm": 600.0,
            "ceiling_rpm": 600.0,
            "source": "config",
            "probing": false,
            "next_probe_s": null,
            "pause": null,
            "sent_in_window": 0,
            "changes": 0,
            "models": [],
        }),
        "{p}"
    );
    let history = |p: &serde_json::Value, series: &str| -> Vec<f64> {
        p["history"][series]
            .as_array()
            .unwrap_or_else(|| panic!("history.{series}: {p}"))
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect()
    };
    assert_eq!(history(&p, "learned_rpm").last(), Some(&600.0));
    assert_eq!(history(&p, "ceiling_rpm").last(), Some(&600.0));

    // Two sends count in the window.
    s.chats_ok(2).await;
    provider_until(s.addr, "two sends in the window", |p| {
        p["pacing"]["sent_in_window"] == 2
    })
    .await;

    // A limit restored from before a restart, and a pause for a Retry-After.
    assert!(limiter.restore(45, clock.now_nanos()).is_some());
    limiter.pause(
        clock.now_nanos() + Duration::from_millis(1500).as_nanos() as u64,
        PauseReason::RetryAfter,
    );
    let p = provider_until(s.addr, "the restored limit", |p| {
        p["pacing"]["source"] == "state" && !p["pacing"]["pause"].is_null()
    })
    .await;
    let pacing = &p["pacing"];
    assert_eq!(pacing["limit"], 45, "{p}");
    assert_eq!(pacing["learned"], 45);
    assert_eq!(pacing["ceiling"], 60);
    assert_eq!(pacing["learned_rpm"], 450.0);
    assert_eq!(pacing["ceiling_rpm"], 600.0);
    assert_eq!(pacing["next_probe_s"], 60.0);
    assert_eq!(pacing["changes"], 1);
    assert_eq!(
        pacing["pause"],
        serde_json::json!({"reason": "retry_after", "seconds": 1.5})
    );
    let p = provider_until(s.addr, "the restored limit in the history", |p| {
        p["history"]["learned_rpm"]
            .as_array()
            .and_then(|h| h.last())
            .and_then(serde_json::Value::as_f64)
            == Some(450.0)
    })
    .await;
    assert_eq!(history(&p, "ceiling_rpm").last(), Some(&600.0));
    assert_eq!(
        history(&p, "learned_rpm").len(),
        history(&p, "ceiling_rpm").len()
    );
    assert!(
        history(&p, "learned_rpm").contains(&600.0),
        "the history keeps the line before the change: {p}"
    );

    // Time passes: the pause ends, the window empties, the probe comes closer.
    clock.advance(Duration::from_secs(20));
    let p = provider_until(s.addr, "the pause to end", |p| {
        p["pacing"]["pause"].is_null()
    })
    .await;
    assert_eq!(p["pacing"]["next_probe_s"], 40.0, "{p}");
    assert_eq!(p["pacing"]["sent_in_window"], 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_cleanly_when_the_sidecar_starts_draining() {
    let s = stack(unlimited_mock(), &[INTERVAL_ENV]);
    let mut r = SseReader::open(s.addr).await;
    let first = r.next().await.expect("a first frame");
    assert_eq!(first.retry, Some(3000));
    s.sidecar.begin_shutdown();
    // The body must end with `None` (a clean end), not an error; a frame or two
    // published meanwhile may still arrive first.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut extra = 0;
        while let Some(f) = r.next().await {
            assert!(f.id > first.id);
            extra += 1;
        }
        extra
    })
    .await;
    let extra = ended.expect("the stream did not end within 10 s of the shutdown");
    assert!(extra <= 5, "{extra} frames after the shutdown began");
    tokio::task::spawn_blocking(move || s.sidecar.join())
        .await
        .unwrap();
    s.mock.stop();
}

/// Attribute values of `attr=` (quoted or not) in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!("{attr}=");
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(&needle) {
        let before = rest[..i].chars().last();
        rest = &rest[i + needle.len()..];
        // `xsrc=` or `data-href=` are other attributes.
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            continue;
        }
        let value = match rest.chars().next() {
            Some(q @ ('"' | '\'')) => {
                let end = rest[1..].find(q).map_or(rest.len(), |e| e + 1);
                &rest[1..end]
            }
            _ => {
                let end = rest
                    .find(|c: char| c.is_whitespace() || c == '>')
                    .unwrap_or(rest.len());
                &rest[..end]
            }
        };
        out.push(value);
    }
    out
}

/// Whether `v` names nothing outside this origin.
fn local_reference(v: &str) -> bool {
    let v = v.trim();
    if v.is_empty() || v.starts_with('#') || v.starts_with("data:") {
        return true;
    }
    if v.starts_with("//") {
        return false;
    }
    // No scheme before the first '/', '?' or '#'.
    let head = v.split(['/', '?', '#']).next().unwrap_or("");
    !head.contains(':')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_self_contained_html_and_the_api_refuses_other_methods() {
    let s = stack(unlimited_mock(), &[INTERVAL_ENV]);
    let a = call(s.addr, req("GET", s.addr, "/api/dashboard", &[], "")).await;
    assert_eq!(a.status, 200);
    let ct = a.headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("text/html"), "{ct}");
    let html = a.text();
    assert!(
        html.contains("<html"),
        "not a page: {}",
        &html[..html.len().min(200)]
    );

    // Every reference is relative, a fragment or a data: URL: no CDN, no external host.
    let mut refs = Vec::new();
    for attr in ["src", "href", "action", "srcset", "xlink:href"] {
        refs.extend(attribute_values(&html, attr));
    }
    for v in &refs {
        assert!(local_reference(v), "external reference {v:?}");
    }
    for (i, _) in html.match_indices("url(") {
        let v = html[i + 4..]
            .split(')')
            .next()
            .unwrap()
            .trim_matches(|c| c == '"' || c == '\'');
        assert!(local_reference(v), "external CSS url({v})");
    }
    assert!(!html.contains("@import"), "CSS @import");
    // The only absolute URLs allowed are XML namespace names, which are never fetched.
    const NAMESPACES: [&str; 3] = [
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xhtml",
        "http://www.w3.org/1999/xlink",
    ];
    for scheme in ["http://", "https://"] {
        for (i, _) in html.match_indices(scheme) {
            let rest = &html[i..];
            assert!(
                NAMESPACES.iter().any(|ns| rest.starts_with(ns)),
                "absolute URL in the page: {}",
                &rest[..rest.len().min(80)]
            );
        }
    }

    // The same page under the trailing-slash path; HEAD works too.
    let slash = call(s.addr, req("GET", s.addr, "/api/dashboard/", &[], "")).await;
    assert_eq!(slash.status, 200);
    assert_eq!(slash.body, a.body);

    for path in [
        "/api/dashboard/stream",
        "/api/dashboard/snapshot",
        "/api/dashboard",
    ] {
        call(s.addr, req("POST", s.addr, path, &[], "{}"))
            .await
            .assert_error(405, "method_not_allowed");
    }
    call(s.addr, req("GET", s.addr, "/api/dashboard/nope", &[], ""))
        .await
        .assert_error(404, "not_found");
    assert_eq!(s.mock.requests(), 0);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

/// Polls the snapshot until a build has the first provider (the first tick): that
/// provider, and the snapshot's text as sent.
async fn first_provider(addr: SocketAddr) -> (serde_json::Value, String) {
    let a = snapshot_answer_until(addr, "a provider", |v| v["providers"][0].is_object()).await;
    (a.json()["providers"][0].clone(), a.text())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_process_snapshot_has_no_cluster_object() {
    let s = stack(unlimited_mock(), &[INTERVAL_ENV]);
    let (p, text) = first_provider(s.addr).await;
    assert!(p.get("cluster").is_none(), "{p}");
    assert!(!text.contains("\"cluster\""), "{text}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_budget_the_snapshot_has_no_tokens_object() {
    let s = stack(unlimited_mock(), &[INTERVAL_ENV]);
    assert!(s.app.providers[0].limiter.token_budget().is_none());
    // Counts alone (as a budget turned off leaves them) do not make a token panel.
    s.app.providers[0].stats.settle_tokens(10, 10, Some((6, 4)));
    let (p, text) = first_provider(s.addr).await;
    assert!(p.get("tokens").is_none(), "{p}");
    assert!(!text.contains("\"tokens\""), "{text}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_the_snapshot_and_the_stream_carry_the_replicas_view_of_the_budget() {
    const PASSWORD: &str = "r3dis-pass-dashboard-5be0";
    // Nothing listens there and no budget task runs: the replica's first view of the
    // cluster, before Redis ever answered.
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/0", free_port());
    let s = stack(
        unlimited_mock(),
        &[INTERVAL_ENV, ("SIDECAR_REDIS_URL", &url)],
    );
    let replica = s.replica();
    let (p, text) = first_provider(s.addr).await;
    let c = &p["cluster"];
    assert_eq!(c["budget"], "nvidia", "{p}");
    assert_eq!(c["replica"], replica.as_str());
    assert_eq!(c["mode"], "fallback");
    assert_eq!(c["backend_up"], false);
    assert_eq!(c["replicas"], 0);
    assert_eq!(c["share"], 0.0);
    assert_eq!(
        c["shares"],
        serde_json::json!([{ "replica": replica, "sends": 0 }]),
        "this replica is always listed"
    );
    assert_eq!(c["learning"], false);
    assert!(c["generation"].is_null(), "{c}");
    assert!(c["record"].is_null(), "not read from Redis yet: {c}");
    assert!(c["down_for_secs"].is_null(), "{c}");
    for result in ["granted", "partial", "empty", "returned", "error"] {
        assert_eq!(c["leases"][result], 0, "{result}");
    }
    assert_eq!(c["round_trips"], 0);
    assert_eq!(c["admitted"], 0);
    assert!(c["round_trip_ms"]["p50"].is_null(), "{c}");
    assert!(c["round_trip_ms"]["p99"].is_null(), "{c}");
    assert!(
        !text.contains(PASSWORD),
        "the Redis password in the snapshot"
    );

    // The stream sends the same object.
    let mut client = SseReader::open(s.addr).await;
    let frame = client.next().await.expect("a frame");
    let v: serde_json::Value = serde_json::from_str(&frame.data).unwrap();
    assert_eq!(v["providers"][0]["cluster"]["replica"], replica.as_str());
    assert!(!frame.raw.contains(PASSWORD));

    // The page has the card that shows it.
    let page = call(s.addr, req("GET", s.addr, "/api/dashboard", &[], "")).await;
    for needle in ["buildCluster", "c-cluster", "data-mode=\"isolated\""] {
        assert!(page.text().contains(needle), "the page lacks {needle}");
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}
