//! `GET /metrics` end to end: the exposition parses strictly (and passes `promtool check
//! metrics` when it is installed), and each metric says what the traffic did.
//!
//! Histograms are recorded when a response body ends and drained at scrape time, so
//! assertions on them poll the endpoint until the expected count shows up.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvidia_sidecar::clock::Clock;
use nvidia_sidecar::limiter::PauseReason;

const PROVIDER_KEY: &str = "nvapi-provider-key-0001";

// ---------------------------------------------------------------------------------------
// A small, strict parser of the Prometheus text format 0.0.4.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every `(name, value)` of `want` is among the sample's labels.
    fn has(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.label(k) == Some(*v))
    }

    /// The sample's labels are exactly `want` (in any order).
    fn is(&self, want: &[(&str, &str)]) -> bool {
        self.labels.len() == want.len() && self.has(want)
    }
}

/// A parsed scrape.
#[derive(Debug)]
struct Exposition {
    samples: Vec<Sample>,
    /// Family name → type.
    types: HashMap<String, String>,
}

/// One family's histogram for one label set, checked for consistency.
#[derive(Debug)]
struct Histogram {
    count: f64,
    sum: f64,
    /// `(le, cumulative count)`, ascending, ending with `+Inf`.
    buckets: Vec<(f64, f64)>,
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn valid_label_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ if s
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E')) =>
        {
            s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}"))
        }
        _ => Err(format!("value {s:?} is not a number")),
    }
}

type Labels = Vec<(String, String)>;

/// Parses `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut labels: Labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("expected '{'")?;
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((labels, r));
    }
    loop {
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !valid_label_name(name) {
            return Err(format!("invalid label name {name:?}"));
        }
        if labels.iter().any(|(k, _)| k == name) {
            return Err(format!("label {name} twice"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: value not quoted"))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}: unterminated value")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("label {name}: bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err(format!("label {name}: raw newline")),
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((name.to_owned(), value));
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        rest = rest
            .strip_prefix(',')
            .ok_or("expected ',' or '}' after a label")?;
        if rest.starts_with('}') {
            return Err("trailing comma in labels".into());
        }
    }
}

/// Which family a sample named `name` belongs to, given the declared types.
fn family_of(name: &str, types: &HashMap<String, String>) -> Option<String> {
    if let Some(t) = types.get(name) {
        if t != "histogram" {
            return Some(name.to_owned());
        }
    }
    for (suffix, kinds) in [
        ("_bucket", &["histogram"][..]),
        ("_sum", &["histogram", "summary"][..]),
        ("_count", &["histogram", "summary"][..]),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if types.get(base).is_some_and(|t| kinds.contains(&t.as_str())) {
                return Some(base.to_owned());
            }
        }
    }
    None
}

/// Parses a scrape strictly: every non-comment line is `name{labels} value` (no
/// timestamp), every sample's family has `# HELP` and `# TYPE` before it, a family's
/// lines are contiguous, label values are quoted, values are numbers, no series twice.
fn parse(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("the exposition does not end with a newline".into());
    }
    let mut helps: HashSet<String> = HashSet::new();
    let mut types: HashMap<String, String> = HashMap::new();
    let mut closed: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    let mut seen: HashSet<(String, Vec<(String, String)>)> = HashSet::new();
    let mut samples = Vec::new();
    let mut switch_to = |family: &str, current: &mut Option<String>| -> Result<(), String> {
        if current.as_deref() == Some(family) {
            return Ok(());
        }
        if closed.contains(family) {
            return Err(format!("the lines of {family} are not contiguous"));
        }
        if let Some(prev) = current.take() {
            closed.insert(prev);
        }
        *current = Some(family.to_owned());
        Ok(())
    };
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match words.next() {
                Some("HELP") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("HELP without a name".into()))?;
                    if !valid_metric_name(name) {
                        return Err(at(format!("invalid metric name {name:?}")));
                    }
                    if types.contains_key(name) {
                        return Err(at(format!("HELP of {name} after its TYPE")));
                    }
                    switch_to(name, &mut current).map_err(at)?;
                    if !helps.insert(name.to_owned()) {
                        return Err(at(format!("HELP of {name} twice")));
                    }
                    if !matches!(words.next(), Some(h) if !h.is_empty()) {
                        return Err(at(format!("empty HELP for {name}")));
                    }
                }
                Some("TYPE") => {
                    let name = words
                        .next()
                        .ok_or_else(|| at("TYPE without a name".into()))?;
                    let ty = words
                        .next()
                        .ok_or_else(|| at("TYPE without a type".into()))?;
                    if !valid_metric_name(name) {
                        return Err(at(format!("invalid metric name {name:?}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        return Err(at(format!("unknown type {ty:?}")));
                    }
                    if !helps.contains(name) {
                        return Err(at(format!("TYPE of {name} without a HELP before it")));
                    }
                    switch_to(name, &mut current).map_err(at)?;
                    if types.insert(name.to_owned(), ty.to_owned()).is_some() {
                        return Err(at(format!("TYPE of {name} twice")));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_metric_name(name) {
            return Err(at(format!("invalid metric name {name:?}")));
        }
        let (mut labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(at)?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("expected one space before the value".into()))?;
        if value.contains(' ') {
            return Err(at("more than a value after the labels (timestamp?)".into()));
        }
        let value = parse_value(value).map_err(at)?;
        let family = family_of(name, &types)
            .ok_or_else(|| at(format!("{name} has no # TYPE (and # HELP) before it")))?;
        if !helps.contains(&family) {
            return Err(at(format!("{family} has no # HELP")));
        }
        if current.as_deref() != Some(family.as_str()) {
            return Err(at(format!("sample of {family} outside its family's lines")));
        }
        if types[&family] == "histogram" && name.ends_with("_bucket") {
            let le = labels
                .iter()
                .find(|(k, _)| k == "le")
                .ok_or_else(|| at("bucket without le".into()))?;
            parse_value(&le.1).map_err(at)?;
        }
        let sample_labels = labels.clone();
        labels.sort();
        if !seen.insert((name.to_owned(), labels)) {
            return Err(at("duplicate series".into()));
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: sample_labels,
            value,
        });
    }
    Ok(Exposition { samples, types })
}

impl Exposition {
    /// The value of the series `name` with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.name == name && s.is(labels))
            .map(|s| s.value)
    }

    /// `get`, failing the test with the family's lines when the series is missing.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {name}{labels:?}; have:\n{}",
                self.dump(name.trim_end_matches("_total"))
            )
        })
    }

    /// Sum over the series of `name` that carry these labels (others free).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.has(labels))
            .map(|s| s.value)
            .sum()
    }

    fn dump(&self, prefix: &str) -> String {
        self.samples
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .map(|s| format!("{}{:?} {}\n", s.name, s.labels, s.value))
            .collect()
    }

    /// The histogram `family` for exactly `labels` (besides `le`), checked: declared a
    /// histogram, buckets ascending and cumulative, `+Inf` equal to `_count`, `_sum`
    /// positive when anything was counted.
    fn histogram(&self, family: &str, labels: &[(&str, &str)]) -> Histogram {
        assert_eq!(
            self.types.get(family).map(String::as_str),
            Some("histogram"),
            "{family} is not declared a histogram"
        );
        let buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == format!("{family}_bucket")
                    && s.labels.len() == labels.len() + 1
                    && s.has(labels)
            })
            .map(|s| (parse_value(s.label("le").unwrap()).unwrap(), s.value))
            .collect();
        let count = self.value(&format!("{family}_count"), labels);
        let sum = self.value(&format!("{family}_sum"), labels);
        assert!(
            buckets.len() >= 2,
            "{family}{labels:?}: too few buckets: {buckets:?}"
        );
        for w in buckets.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "{family}{labels:?}: le not ascending: {buckets:?}"
            );
            assert!(
                w[0].1 <= w[1].1,
                "{family}{labels:?}: buckets not cumulative: {buckets:?}"
            );
        }
        let inf = buckets.last().unwrap();
        assert_eq!(inf.0, f64::INFINITY, "{family}{labels:?}: no +Inf bucket");
        assert_eq!(inf.1, count, "{family}{labels:?}: +Inf bucket != _count");
        assert!(
            sum.is_finite() && sum >= 0.0,
            "{family}{labels:?}: _sum {sum}"
        );
        if count > 0.0 {
            assert!(
                sum > 0.0,
                "{family}{labels:?}: _sum is 0 with {count} samples"
            );
        }
        Histogram {
            count,
            sum,
            buckets,
        }
    }
}

#[test]
fn the_parser_itself_rejects_what_it_should() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 2\n";
    let e = parse(ok).unwrap();
    assert_eq!(e.samples[0].label("y"), Some("q\""));
    for bad in [
        "a 1\n",
        "# TYPE a gauge\na 1\n",
        "# HELP a A.\na 1\n",
        "# HELP a A.\n# TYPE a gauge\na{x=1} 1\n",
        "# HELP a A.\n# TYPE a gauge\na one\n",
        "# HELP a A.\n# TYPE a gauge\na 1 123\n",
        "# HELP a A.\n# TYPE a gauge\na{x=\"1\"} 1\na{x=\"1\"} 2\n",
        "# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b gauge\nb 1\na{x=\"2\"} 1\n",
        "# HELP a A.\n# TYPE a gauge\na 1",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Scraping.
// ---------------------------------------------------------------------------------------

async fn scrape_text(addr: SocketAddr) -> String {
    let a = call(addr, req("GET", addr, "/metrics", &[], "")).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    a.text()
}

async fn scrape(addr: SocketAddr) -> Exposition {
    let text = scrape_text(addr).await;
    parse(&text).unwrap_or_else(|e| panic!("the exposition does not parse: {e}\n{text}"))
}

/// Scrapes until `cond` holds (samples are recorded when a body ends and drained at
/// scrape time), for at most 20 s.
async fn scrape_until(
    addr: SocketAddr,
    what: &str,
    mut cond: impl FnMut(&Exposition) -> bool,
) -> Exposition {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = scrape(addr).await;
        if cond(&e) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; last scrape:\n{}",
            e.dump("sidecar_")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pipes `text` into `promtool check metrics`: `Some(output)` when promtool ran, `None`
/// when it is not installed (`common::missing_tool`: a skip under a bare `cargo test`).
fn promtool_check(text: &str) -> Option<(bool, String)> {
    let promtool = find_tool("promtool", "apt-get install prometheus")?;
    let out = run_with_input(
        std::process::Command::new(promtool).args(["check", "metrics"]),
        text,
    )
    .expect("promtool runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), report))
}

const NVIDIA: (&str, &str) = ("provider", "nvidia");

// ---------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_25_chats_the_exposition_parses_and_counts_them_in_every_histogram() {
    let s = stack(unlimited_mock(), &[]);
    s.chats_ok(25).await;
    let m = scrape_until(s.metrics_addr, "25 requests and 25 latency samples", |m| {
        m.get(
            "sidecar_requests_total",
            &[NVIDIA, ("route", "limited"), ("outcome", "success")],
        ) == Some(25.0)
            && m.get(
                "sidecar_request_duration_seconds_count",
                &[NVIDIA, ("route", "limited")],
            ) == Some(25.0)
    })
    .await;

    // Every other outcome and route is present, at zero.
    for route in ["limited", "passthrough"] {
        for outcome in [
            "success",
            "client_error",
            "upstream_429",
            "upstream_error",
            "rejected",
            "dropped",
            "client_gone",
            "shutdown",
        ] {
            let want = if (route, outcome) == ("limited", "success") {
                25.0
            } else {
                0.0
            };
            assert_eq!(
                m.value(
                    "sidecar_requests_total",
                    &[NVIDIA, ("route", route), ("outcome", outcome)]
                ),
                want,
                "{route}/{outcome}"
            );
        }
    }
    let up = m.histogram("sidecar_upstream_latency_seconds", &[NVIDIA]);
    assert_eq!(up.count, 25.0);
    let ttfb = m.histogram("sidecar_time_to_first_byte_seconds", &[NVIDIA]);
    assert_eq!(ttfb.count, 25.0);
    let limited = m.histogram(
        "sidecar_request_duration_seconds",
        &[NVIDIA, ("route", "limited")],
    );
    assert_eq!(limited.count, 25.0);
    let passthrough = m.histogram(
        "sidecar_request_duration_seconds",
        &[NVIDIA, ("route", "passthrough")],
    );
    assert_eq!(passthrough.count, 0.0);
    let wait = m.histogram(
        "sidecar_queue_wait_seconds",
        &[NVIDIA, ("priority", "normal")],
    );
    assert_eq!(wait.count, 25.0);
    for p in ["high", "low"] {
        assert_eq!(
            m.histogram("sidecar_queue_wait_seconds", &[NVIDIA, ("priority", p)])
                .count,
            0.0
        );
    }
    // A response head comes before the first byte, which comes before the last.
    assert!(
        up.sum <= ttfb.sum && ttfb.sum <= limited.sum,
        "{up:?} {ttfb:?} {limited:?}"
    );
    assert_eq!(
        up.buckets.len(),
        21,
        "20 bounds plus +Inf: {:?}",
        up.buckets
    );
    assert_eq!(m.value("sidecar_invalid_requests_total", &[]), 0.0);
    // The ledger: 25 arrived, each ended once, none in flight.
    assert_eq!(m.value("sidecar_requests_arrived_total", &[]), 25.0);
    assert_eq!(m.value("sidecar_requests_in_flight", &[NVIDIA]), 0.0);

    // promtool agrees the exposition is valid (it also lints names and help texts).
    let text = scrape_text(s.metrics_addr).await;
    if let Some((ok, report)) = promtool_check(&text) {
        assert!(
            ok,
            "promtool check metrics failed:\n{report}\n--- exposition ---\n{text}"
        );
        if !report.trim().is_empty() {
            eprintln!("promtool check metrics said:\n{report}");
        }
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_counted_by_kind_and_as_upstream_error_outcomes() {
    let s = stack(unlimited_mock(), &[]);
    // A 5xx from the upstream passes through and counts as status_5xx.
    let a = s.chat(&[("x-mock-status", "500")], CHAT).await;
    assert_eq!(a.status, 500);
    let m = scrape_until(s.metrics_addr, "the 5xx", |m| {
        m.sum("sidecar_requests_total", &[("outcome", "upstream_error")]) == 1.0
    })
    .await;
    assert_eq!(
        m.value(
            "sidecar_upstream_errors_total",
            &[NVIDIA, ("kind", "status_5xx")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sidecar_requests_total",
            &[NVIDIA, ("route", "limited"), ("outcome", "upstream_error")]
        ),
        1.0
    );
    assert_eq!(m.sum("sidecar_upstream_errors_total", &[]), 1.0);

    // A body cut by the upstream after its head counts as stream.
    let mut body = s
        .open_chat(&[("x-mock-reset-after", "2")], CHAT_STREAM)
        .await
        .into_body();
    while let Some(Ok(_)) = next_chunk(&mut body).await {}
    let m = scrape_until(s.metrics_addr, "the broken stream", |m| {
        m.sum("sidecar_requests_total", &[("outcome", "upstream_error")]) == 2.0
    })
    .await;
    assert_eq!(
        m.value(
            "sidecar_upstream_errors_total",
            &[NVIDIA, ("kind", "stream")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sidecar_upstream_errors_total",
            &[NVIDIA, ("kind", "status_5xx")]
        ),
        1.0
    );
    assert_eq!(m.sum("sidecar_upstream_errors_total", &[]), 2.0);
    assert_eq!(
        m.sum("sidecar_requests_total", &[("outcome", "success")]),
        0.0
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();

    // An upstream nobody listens on counts as connect.
    let sidecar = sidecar_with_dead_upstream();
    let (addr, metrics) = (sidecar.local_addr, sidecar.metrics_addr);
    call(addr, req("POST", addr, "/v1/chat/completions", &[], CHAT))
        .await
        .assert_error(502, "upstream_unavailable");
    let m = scrape_until(metrics, "the connect failure", |m| {
        m.sum("sidecar_requests_total", &[]) == 1.0
    })
    .await;
    assert_eq!(
        m.value(
            "sidecar_upstream_errors_total",
            &[NVIDIA, ("kind", "connect")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sidecar_requests_total",
            &[NVIDIA, ("route", "limited"), ("outcome", "upstream_error")]
        ),
        1.0
    );
    assert_eq!(m.sum("sidecar_upstream_errors_total", &[]), 1.0);
    // Nothing was sent, so no upstream latency.
    assert_eq!(
        m.histogram("sidecar_upstream_latency_seconds", &[NVIDIA])
            .count,
        0.0
    );
    assert_ledger_at(addr, metrics, 1).await;
    sidecar.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_and_limiter_gauges_show_parked_requests_and_a_full_queue_counts_as_rejected() {
    let (s, clock) = paced_stack(&[("SIDECAR_QUEUE_MAX_SIZE", "3")]);
    // The one token goes to the first request; the next three park.
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let parked = s.park(3).await;
    let m = scrape(s.metrics_addr).await;
    assert_eq!(
        m.value("sidecar_queue_depth", &[NVIDIA, ("priority", "normal")]),
        3.0
    );
    assert_eq!(
        m.value("sidecar_queue_depth", &[NVIDIA, ("priority", "high")]),
        0.0
    );
    assert_eq!(
        m.value("sidecar_queue_depth", &[NVIDIA, ("priority", "low")]),
        0.0
    );
    assert_eq!(m.value("sidecar_queue_max", &[NVIDIA]), 3.0);
    assert_eq!(m.value("sidecar_rate_base_rpm", &[NVIDIA]), 60.0);
    assert_eq!(m.value("sidecar_rate_effective_rpm", &[NVIDIA]), 60.0);
    assert_eq!(m.value("sidecar_bucket_capacity", &[NVIDIA]), 1.0);
    let tokens = m.value("sidecar_bucket_tokens", &[NVIDIA]);
    assert!((0.0..1.0).contains(&tokens), "tokens {tokens}");
    assert_eq!(
        m.value("sidecar_retreat_state", &[NVIDIA, ("state", "normal")]),
        1.0
    );
    assert_eq!(
        m.value("sidecar_retreat_state", &[NVIDIA, ("state", "retreating")]),
        0.0
    );
    assert_eq!(
        m.value("sidecar_retreat_state", &[NVIDIA, ("state", "recovering")]),
        0.0
    );
    assert_eq!(m.sum("sidecar_dropped_total", &[]), 0.0);

    // The queue is full: the next one is refused at once.
    s.chat(&[], CHAT).await.assert_error(429, "queue_full");
    let m = scrape_until(s.metrics_addr, "the rejection", |m| {
        m.sum("sidecar_requests_total", &[("outcome", "rejected")]) == 1.0
    })
    .await;
    assert_eq!(
        m.value("sidecar_dropped_total", &[NVIDIA, ("reason", "queue_full")]),
        1.0
    );
    for reason in ["low_priority_deadline", "timeout", "client_gone"] {
        assert_eq!(
            m.value("sidecar_dropped_total", &[NVIDIA, ("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(
        m.value(
            "sidecar_requests_total",
            &[NVIDIA, ("route", "none"), ("outcome", "rejected")]
        ),
        1.0
    );
    // Its time is in the route="none" series, not in the limited route's latency.
    assert_eq!(
        m.value(
            "sidecar_request_duration_seconds_count",
            &[NVIDIA, ("route", "none")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "sidecar_request_duration_seconds_count",
            &[NVIDIA, ("route", "limited")]
        ),
        m.sum("sidecar_requests_total", &[NVIDIA, ("route", "limited")])
    );

    // One token a second of the manual clock releases them; the queue empties.
    s.release(&clock, Duration::from_secs(1), 3).await;
    for p in parked {
        assert_eq!(p.await.unwrap(), 200);
    }
    let m = scrape_until(s.metrics_addr, "four successes", |m| {
        m.sum("sidecar_requests_total", &[("outcome", "success")]) == 4.0
    })
    .await;
    assert_eq!(m.sum("sidecar_queue_depth", &[NVIDIA]), 0.0);
    let wait = m.histogram(
        "sidecar_queue_wait_seconds",
        &[NVIDIA, ("priority", "normal")],
    );
    assert_eq!(wait.count, 4.0, "the refused request never waited");
    assert!(wait.sum > 0.0, "the parked requests waited");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_is_counted_and_teaches_the_limit_and_an_overload_puts_the_provider_in_retreat(
) {
    let s = stack(
        unlimited_mock(),
        &[
            ("SIDECAR_UPSTREAM_429_RETRIES", "1"),
            ("SIDECAR_RETREAT_DEFAULT_PAUSE", "0.1"),
            // The 429 teaches a limit of one a window: the retry waits for the next.
            ("SIDECAR_PROVIDER_WINDOW", "1"),
        ],
    );
    let before = scrape(s.metrics_addr).await;
    assert_eq!(before.value("sidecar_upstream_429_total", &[NVIDIA]), 0.0);
    assert_eq!(
        before.value("sidecar_retreat_state", &[NVIDIA, ("state", "retreating")]),
        0.0
    );
    // The upstream answers 429 twice: once re-queued, then the client gets it.
    let a = s.chat(&[("x-mock-status", "429")], CHAT).await;
    assert_eq!(a.status, 429, "{}", a.text());
    assert_eq!(s.mock.requests(), 2);
    let m = scrape_until(
        s.metrics_addr,
        "the 429 outcome and the learned limit",
        |m| {
            m.sum("sidecar_requests_total", &[("outcome", "upstream_429")]) == 1.0
                && m.get("sidecar_limit_source", &[NVIDIA, ("source", "learned_429")]) == Some(1.0)
        },
    )
    .await;
    assert_eq!(m.value("sidecar_upstream_429_total", &[NVIDIA]), 2.0);
    assert_eq!(m.value("sidecar_retries_total", &[NVIDIA]), 1.0);
    assert_eq!(m.sum("sidecar_limit_source", &[NVIDIA]), 1.0, "one source");
    assert!(m.value("sidecar_limit_changes_total", &[NVIDIA]) >= 1.0);
    let (learned, ceiling) = (
        m.value("sidecar_limit_learned_rpm", &[NVIDIA]),
        m.value("sidecar_limit_ceiling_rpm", &[NVIDIA]),
    );
    assert!(learned < ceiling, "learned {learned} not below {ceiling}");
    let (base, eff) = (
        m.value("sidecar_rate_base_rpm", &[NVIDIA]),
        m.value("sidecar_rate_effective_rpm", &[NVIDIA]),
    );
    assert!(eff < base, "effective {eff} not below base {base}");
    // A 429 that teaches a limit is no reason to retreat.
    assert_eq!(
        m.value("sidecar_retreat_state", &[NVIDIA, ("state", "normal")]),
        1.0
    );
    assert_eq!(
        m.value(
            "sidecar_requests_total",
            &[NVIDIA, ("route", "limited"), ("outcome", "upstream_429")]
        ),
        1.0
    );
    // A 429 is not an upstream error.
    assert_eq!(m.sum("sidecar_upstream_errors_total", &[]), 0.0);

    // An overloaded provider (503) teaches nothing about the rate: it retreats.
    s.app.providers[0].limiter.forget(s.app.clock.now_nanos());
    let a = s.chat(&[("x-mock-status", "503")], CHAT).await;
    assert_eq!(a.status, 503, "{}", a.text());
    let m = scrape_until(s.metrics_addr, "the retreat", |m| {
        m.get("sidecar_retreat_state", &[NVIDIA, ("state", "retreating")]) == Some(1.0)
    })
    .await;
    assert_eq!(
        m.value("sidecar_retreat_state", &[NVIDIA, ("state", "normal")]),
        0.0
    );
    assert_eq!(
        m.sum("sidecar_retreat_state", &[NVIDIA]),
        1.0,
        "one state at a time"
    );
    assert_source(&m, "config");
    let (base, eff) = (
        m.value("sidecar_rate_base_rpm", &[NVIDIA]),
        m.value("sidecar_rate_effective_rpm", &[NVIDIA]),
    );
    assert!(eff < base, "effective {eff} not below base {base}");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

/// The `sidecar_limit_*` families and their neighbours, one value per provider.
const PACING_GAUGES: [&str; 8] = [
    "sidecar_limit_learned_rpm",
    "sidecar_limit_ceiling_rpm",
    "sidecar_limit_per_window",
    "sidecar_provider_window_seconds",
    "sidecar_limit_probing",
    "sidecar_limit_next_probe_seconds",
    "sidecar_sent_in_window",
    "sidecar_limit_changes_total",
];
const SOURCES: [&str; 5] = ["config", "header", "learned_429", "probe", "state"];
const PAUSE_REASONS: [&str; 4] = ["retry_after", "quota", "window", "overload"];

/// `sidecar_limit_source` is 1 for `want` only.
fn assert_source(m: &Exposition, want: &str) {
    for source in SOURCES {
        assert_eq!(
            m.value("sidecar_limit_source", &[NVIDIA, ("source", source)]),
            f64::from(u8::from(source == want)),
            "source {source}, want {want}:\n{}",
            m.dump("sidecar_limit_source")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learned_limit_is_the_ceiling_at_start_then_shows_a_restored_limit_and_pauses() {
    let (s, clock) = manual_stack(
        unlimited_mock(),
        &[
            ("SIDECAR_RATE_RPM", "600"),
            ("SIDECAR_BUCKET_CAPACITY", "10"),
            ("SIDECAR_PROVIDER_WINDOW", "6"),
            ("SIDECAR_PROBE_INTERVAL", "60"),
        ],
    );
    let limiter = Arc::clone(&s.app.providers[0].limiter);

    // Fresh: nothing learned, the configured rate is the limit.
    let m = scrape(s.metrics_addr).await;
    for (family, ty) in PACING_GAUGES.iter().map(|f| (*f, "gauge")).chain([
        ("sidecar_limit_source", "gauge"),
        ("sidecar_pause_seconds", "gauge"),
    ]) {
        let ty = if family.ends_with("_total") {
            "counter"
        } else {
            ty
        };
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(ty),
            "{family}"
        );
    }
    for g in PACING_GAUGES {
        let series: Vec<_> = m.samples.iter().filter(|x| x.name == g).collect();
        assert_eq!(series.len(), 1, "{g}: one series per provider");
        assert!(series[0].is(&[NVIDIA]), "{g}: {:?}", series[0].labels);
    }
    assert_eq!(m.value("sidecar_limit_learned_rpm", &[NVIDIA]), 600.0);
    assert_eq!(m.value("sidecar_limit_ceiling_rpm", &[NVIDIA]), 600.0);
    assert_eq!(m.value("sidecar_limit_per_window", &[NVIDIA]), 60.0);
    assert_eq!(m.value("sidecar_provider_window_seconds", &[NVIDIA]), 6.0);
    assert_eq!(m.value("sidecar_limit_probing", &[NVIDIA]), 0.0);
    assert_eq!(
        m.value("sidecar_limit_next_probe_seconds", &[NVIDIA]),
        0.0,
        "nothing above the ceiling to probe"
    );
    assert_eq!(m.value("sidecar_limit_changes_total", &[NVIDIA]), 0.0);
    assert_eq!(m.value("sidecar_sent_in_window", &[NVIDIA]), 0.0);
    assert_eq!(m.value("sidecar_rate_effective_rpm", &[NVIDIA]), 600.0);
    assert_source(&m, "config");
    for reason in PAUSE_REASONS {
        assert_eq!(
            m.value("sidecar_pause_seconds", &[NVIDIA, ("reason", reason)]),
            0.0,
            "{reason}"
        );
    }
    assert_eq!(m.sum("sidecar_pause_seconds", &[]), 0.0, "no other reason");

    // Sends count in the window until it has passed.
    s.chats_ok(3).await;
    let m = scrape(s.metrics_addr).await;
    assert_eq!(m.value("sidecar_sent_in_window", &[NVIDIA]), 3.0);

    // A limit from before a restart: 45 a window is 450 rpm, probed after the interval.
    let now = clock.now_nanos();
    assert!(limiter.restore(45, now).is_some());
    let m = scrape(s.metrics_addr).await;
    assert_eq!(m.value("sidecar_limit_learned_rpm", &[NVIDIA]), 450.0);
    assert_eq!(m.value("sidecar_limit_ceiling_rpm", &[NVIDIA]), 600.0);
    assert_eq!(m.value("sidecar_limit_per_window", &[NVIDIA]), 45.0);
    assert_eq!(m.value("sidecar_limit_changes_total", &[NVIDIA]), 1.0);
    assert_eq!(m.value("sidecar_limit_next_probe_seconds", &[NVIDIA]), 60.0);
    // The bucket keeps its rate as nanoseconds per token: within a millionth.
    let eff = m.value("sidecar_rate_effective_rpm", &[NVIDIA]);
    assert!((eff - 450.0).abs() < 1e-3, "effective {eff}");
    assert_eq!(m.value("sidecar_rate_base_rpm", &[NVIDIA]), 600.0);
    assert_source(&m, "state");

    // The countdown follows the clock; the window forgets old sends.
    clock.advance(Duration::from_secs(20));
    let m = scrape(s.metrics_addr).await;
    assert_eq!(m.value("sidecar_limit_next_probe_seconds", &[NVIDIA]), 40.0);
    assert_eq!(m.value("sidecar_sent_in_window", &[NVIDIA]), 0.0);

    // A pause shows its time left under its reason only.
    limiter.pause(
        clock.now_nanos() + Duration::from_millis(2500).as_nanos() as u64,
        PauseReason::RetryAfter,
    );
    let m = scrape(s.metrics_addr).await;
    for reason in PAUSE_REASONS {
        let want = if reason == "retry_after" { 2.5 } else { 0.0 };
        assert_eq!(
            m.value("sidecar_pause_seconds", &[NVIDIA, ("reason", reason)]),
            want,
            "{reason}"
        );
    }
    clock.advance(Duration::from_secs(3));
    let m = scrape(s.metrics_addr).await;
    assert_eq!(
        m.sum("sidecar_pause_seconds", &[NVIDIA]),
        0.0,
        "the pause is over"
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_routing_count_as_invalid_and_as_the_default_providers_client_errors(
) {
    let s = stack(unlimited_mock(), &[("SIDECAR_MAX_BODY_BYTES", "2048")]);
    s.chat(&[("x-priority", "urgent")], CHAT)
        .await
        .assert_error(400, "invalid_priority");
    s.chat(&[("x-priority", "")], CHAT)
        .await
        .assert_error(400, "invalid_priority");
    let big = format!(r#"{{"model":"m","input":"{}"}}"#, "x".repeat(4096));
    call(s.addr, req("POST", s.addr, "/v1/embeddings", &[], &big))
        .await
        .assert_error(413, "request_too_large");
    let m = scrape_until(s.metrics_addr, "three invalid requests", |m| {
        m.get("sidecar_invalid_requests_total", &[]) == Some(3.0)
    })
    .await;
    // Every request is in sidecar_requests_total: these on the default provider's route
    // none, never sent upstream.
    assert_eq!(m.sum("sidecar_requests_total", &[]), 3.0);
    assert_eq!(
        m.value(
            "sidecar_requests_total",
            &[NVIDIA, ("route", "none"), ("outcome", "client_error")]
        ),
        3.0
    );
    assert_eq!(
        m.histogram("sidecar_upstream_latency_seconds", &[NVIDIA])
            .count,
        0.0
    );
    assert_eq!(s.mock.requests(), 0);
    // A valid request still counts where it should, and not as invalid.
    assert_eq!(s.chat(&[("x-priority", "high")], CHAT).await.status, 200);
    let m = scrape_until(s.metrics_addr, "the valid request", |m| {
        m.sum("sidecar_requests_total", &[]) == 4.0
    })
    .await;
    assert_eq!(m.value("sidecar_invalid_requests_total", &[]), 3.0);
    assert_eq!(
        m.histogram(
            "sidecar_queue_wait_seconds",
            &[NVIDIA, ("priority", "high")]
        )
        .count,
        1.0
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_and_build_metrics_are_present() {
    let s = stack(unlimited_mock(), &[]);
    let m = scrape(s.metrics_addr).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let rss = m.value("process_resident_memory_bytes", &[]);
    assert!(rss > 0.0, "rss {rss}");
    assert!(m.value("process_virtual_memory_bytes", &[]) >= rss);
    assert!(m.value("process_open_fds", &[]) > 0.0);
    if let Some(max) = m.get("process_max_fds", &[]) {
        assert!(max >= m.value("process_open_fds", &[]));
    }
    assert!(m.value("process_cpu_seconds_total", &[]) >= 0.0);
    let start = m.value("process_start_time_seconds", &[]);
    assert!(
        start > 0.0 && start <= now + 1.0,
        "start {start}, now {now}"
    );
    assert_eq!(
        m.value(
            "sidecar_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    let up = m.value("sidecar_uptime_seconds", &[]);
    assert!(up >= 0.0 && up.is_finite(), "uptime {up}");
    for (family, ty) in [
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_cpu_seconds_total", "counter"),
        ("sidecar_build_info", "gauge"),
        ("sidecar_uptime_seconds", "gauge"),
        ("sidecar_dashboard_clients", "gauge"),
        ("sidecar_dashboard_snapshot_builds_total", "counter"),
        ("sidecar_requests_arrived_total", "counter"),
        ("sidecar_requests_in_flight", "gauge"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(ty),
            "{family}"
        );
    }
    // Uptime moves on.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let later = scrape(s.metrics_addr).await;
    assert!(later.value("sidecar_uptime_seconds", &[]) > up);
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_label_anywhere_and_the_provider_key_never_shows() {
    let s = stack(unlimited_mock(), &[("SIDECAR_SNAPSHOT_INTERVAL", "0.1")]);
    let models = [
        "meta/llama-3.1-8b-instruct",
        "mistralai/mixtral-8x7b-instruct-v0.1",
        "nvidia/nemotron-4-340b-instruct",
        "google/gemma-2-9b-it",
    ];
    for model in models {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        assert_eq!(s.chat(&[], &body).await.status, 200);
        let stream = format!(r#"{{"model":"{model}","stream":true,"messages":[]}}"#);
        assert_eq!(s.chat(&[], &stream).await.status, 200);
    }
    let m = scrape_until(s.metrics_addr, "eight requests", |m| {
        m.sum("sidecar_requests_total", &[]) == 8.0
    })
    .await;
    let labels: HashSet<&str> = m
        .samples
        .iter()
        .flat_map(|s| s.labels.iter().map(|(k, _)| k.as_str()))
        .collect();
    assert!(!labels.contains("model"), "a model label: {labels:?}");
    let allowed = [
        "provider", "route", "outcome", "kind", "priority", "reason", "state", "source", "result",
        "version", "le",
    ];
    for l in &labels {
        assert!(allowed.contains(l), "unexpected label {l:?}");
    }
    let text = scrape_text(s.metrics_addr).await;
    for model in models {
        assert!(!text.contains(model), "{model} appears in /metrics");
    }

    // Wait for a snapshot built after the traffic, then look at every surface.
    let total = snapshot_until(s.addr, "8 requests counted", |v| {
        v["providers"][0]["requests"]["total"].as_u64() == Some(8)
    })
    .await;
    assert_eq!(total["providers"][0]["name"], "nvidia");
    let snapshot = call(
        s.addr,
        req("GET", s.addr, "/api/dashboard/snapshot", &[], ""),
    )
    .await;
    let page = call(s.addr, req("GET", s.addr, "/api/dashboard", &[], "")).await;
    let resp = send(s.addr, req("GET", s.addr, "/api/dashboard/stream", &[], ""))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let frame = next_chunk(&mut body).await.unwrap().unwrap();
    drop(body);
    for (what, text) in [
        ("/metrics", text),
        ("/api/dashboard/snapshot", snapshot.text()),
        ("/api/dashboard", page.text()),
        (
            "/api/dashboard/stream",
            String::from_utf8_lossy(&frame).into_owned(),
        ),
    ] {
        assert!(!text.contains(PROVIDER_KEY), "the provider key in {what}");
        assert!(
            !text.contains("provider-key"),
            "part of the provider key in {what}"
        );
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_get_metrics_only_and_the_proxy_does_not_serve_it() {
    let s = stack(unlimited_mock(), &[]);
    let m = s.metrics_addr;
    for method in ["POST", "PUT", "DELETE"] {
        call(m, req(method, m, "/metrics", &[], ""))
            .await
            .assert_error(405, "method_not_allowed");
    }
    for path in [
        "/",
        "/metrics/",
        "/metric",
        "/healthz",
        "/api/dashboard",
        "/v1/models",
    ] {
        call(m, req("GET", m, path, &[], ""))
            .await
            .assert_error(404, "not_found");
    }
    let head = call(m, req("HEAD", m, "/metrics", &[], "")).await;
    assert_eq!(head.status, 200);
    call(s.addr, req("GET", s.addr, "/metrics", &[], ""))
        .await
        .assert_error(404, "not_found");
    assert_eq!(s.mock.requests(), 0, "nothing reached the upstream");
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

// ---------------------------------------------------------------------------------------
// Cluster mode: the shared budget's series (only with `redis_url`).
// ---------------------------------------------------------------------------------------

/// A password in the Redis URL of the cluster tests: it must never show.
const REDIS_PASSWORD: &str = "r3dis-pass-metrics-91d2";

/// Every family the token budget adds to `/metrics` once a provider counted tokens,
/// with its type (the budget's gauges need the budget itself).
const TOKEN_COUNT_FAMILIES: [(&str, &str); 2] = [
    ("sidecar_tokens_total", "counter"),
    ("sidecar_token_estimate_ratio", "histogram"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_without_token_budgets_exposes_no_token_series() {
    let s = stack(unlimited_mock(), &[]);
    assert!(s
        .app
        .providers
        .iter()
        .all(|p| p.limiter.token_budget().is_none()));
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let text = scrape_text(s.metrics_addr).await;
    let tokens: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sidecar_token"))
        .collect();
    assert!(
        tokens.is_empty(),
        "token lines without a budget: {tokens:?}"
    );
    let m = parse(&text).unwrap_or_else(|e| panic!("the exposition does not parse: {e}\n{text}"));
    assert_eq!(
        m.value(
            "sidecar_dropped_total",
            &[NVIDIA, ("reason", "tokens_too_large")]
        ),
        0.0
    );
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_tokens_show_by_kind_with_the_estimate_ratio_and_pass_promtool() {
    let s = stack(unlimited_mock(), &[]);
    let stats = &s.app.providers[0].stats;
    // What the proxy reports as it settles reservations: ratios 1.0, 1.5 and 0.5, one
    // answer without usage, and a request larger than a whole window refused.
    stats.settle_tokens(100, 100, Some((60, 40)));
    stats.settle_tokens(300, 250, Some((150, 50)));
    stats.settle_tokens(40, 40, Some((80, 0)));
    stats.settle_tokens(70, 70, None);
    stats.refuse_tokens_too_large();
    let text = scrape_text(s.metrics_addr).await;
    let m = parse(&text).unwrap_or_else(|e| panic!("the exposition does not parse: {e}\n{text}"));
    for (family, ty) in TOKEN_COUNT_FAMILIES {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(ty),
            "{family}: {}",
            m.dump(family)
        );
    }
    for (kind, want) in [
        ("prompt", 290.0),
        ("completion", 90.0),
        ("estimated", 510.0),
        ("settled", 460.0),
    ] {
        assert_eq!(
            m.value("sidecar_tokens_total", &[NVIDIA, ("kind", kind)]),
            want,
            "{kind}"
        );
    }
    let r = m.histogram("sidecar_token_estimate_ratio", &[NVIDIA]);
    assert_eq!(r.count, 3.0);
    assert_eq!(r.sum, 3.0);
    let at = |le: f64| r.buckets.iter().find(|b| b.0 == le).map(|b| b.1);
    assert_eq!(at(0.5), Some(1.0));
    assert_eq!(at(0.9), Some(1.0));
    assert_eq!(at(1.0), Some(2.0));
    assert_eq!(at(1.5), Some(3.0));
    assert_eq!(r.buckets.len(), 11, "10 bounds plus +Inf: {:?}", r.buckets);
    assert_eq!(
        m.value(
            "sidecar_dropped_total",
            &[NVIDIA, ("reason", "tokens_too_large")]
        ),
        1.0
    );
    // No budget on this provider: its gauges stay out.
    assert!(!text.contains("sidecar_token_budget_"), "{text}");
    if let Some((ok, report)) = promtool_check(&text) {
        assert!(
            ok,
            "promtool check metrics failed:\n{report}\n--- exposition ---\n{text}"
        );
    }
    s.stop();
}

/// Redis for the cluster tests: a URL on which nothing listens (the replica stays in
/// fallback mode with the backend down), password included.
fn dead_redis_url() -> String {
    format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", free_port())
}

/// Every family the shared budget adds to `/metrics`, with its type.
const CLUSTER_FAMILIES: [(&str, &str); 14] = [
    ("sidecar_budget_info", "gauge"),
    ("sidecar_budget_backend_up", "gauge"),
    ("sidecar_budget_round_trip_seconds", "histogram"),
    ("sidecar_budget_leases_total", "counter"),
    ("sidecar_budget_round_trips_total", "counter"),
    ("sidecar_budget_admitted_total", "counter"),
    ("sidecar_cluster_replicas", "gauge"),
    ("sidecar_cluster_mode", "gauge"),
    ("sidecar_cluster_share", "gauge"),
    ("sidecar_cluster_replica_window_sends", "gauge"),
    ("sidecar_budget_fallback_limit", "gauge"),
    ("sidecar_budget_reserved", "gauge"),
    ("sidecar_budget_learning", "gauge"),
    ("sidecar_budget_record_version", "gauge"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_process_sidecar_exposes_no_cluster_series() {
    let s = stack(unlimited_mock(), &[]);
    assert!(s.app.providers.iter().all(|p| p.budget.is_none()));
    assert_eq!(s.chat(&[], CHAT).await.status, 200);
    let text = scrape_text(s.metrics_addr).await;
    let cluster: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sidecar_budget") || l.contains("sidecar_cluster"))
        .collect();
    assert!(
        cluster.is_empty(),
        "cluster lines without redis_url: {cluster:?}"
    );
    for l in text.lines() {
        assert!(
            !l.contains("replica=") && !l.contains("mode="),
            "a cluster label without redis_url: {l}"
        );
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_before_redis_answers_shows_fallback_a_backend_down_and_passes_promtool() {
    let url = dead_redis_url();
    let s = stack(unlimited_mock(), &[("SIDECAR_REDIS_URL", &url)]);
    let replica = s.replica();
    let text = scrape_text(s.metrics_addr).await;
    let m = parse(&text).unwrap_or_else(|e| panic!("the exposition does not parse: {e}\n{text}"));
    for (family, ty) in CLUSTER_FAMILIES {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(ty),
            "{family}: {}",
            m.dump(family)
        );
    }
    assert_eq!(m.value("sidecar_budget_backend_up", &[NVIDIA]), 0.0);
    for (mode, want) in [("shared", 0.0), ("fallback", 1.0), ("isolated", 0.0)] {
        assert_eq!(
            m.value("sidecar_cluster_mode", &[NVIDIA, ("mode", mode)]),
            want,
            "{mode}"
        );
    }
    assert_eq!(m.value("sidecar_cluster_replicas", &[NVIDIA]), 0.0);
    assert_eq!(m.value("sidecar_cluster_share", &[NVIDIA]), 0.0);
    assert_eq!(
        m.value(
            "sidecar_cluster_replica_window_sends",
            &[NVIDIA, ("replica", &replica)]
        ),
        0.0,
        "this replica is always listed"
    );
    assert_eq!(
        m.value(
            "sidecar_budget_info",
            &[NVIDIA, ("budget", "nvidia"), ("replica", &replica)]
        ),
        1.0
    );
    for result in ["granted", "partial", "empty", "returned", "error", "late"] {
        assert_eq!(
            m.value("sidecar_budget_leases_total", &[NVIDIA, ("result", result)]),
            0.0,
            "{result}"
        );
    }
    assert_eq!(m.value("sidecar_budget_record_version", &[NVIDIA]), 0.0);
    let rt = m.histogram("sidecar_budget_round_trip_seconds", &[NVIDIA]);
    assert_eq!(rt.count, 0.0);
    assert_eq!(
        rt.buckets.len(),
        16,
        "15 bounds plus +Inf: {:?}",
        rt.buckets
    );
    assert!(
        !text.contains(REDIS_PASSWORD),
        "the Redis password in /metrics"
    );
    if let Some((ok, report)) = promtool_check(&text) {
        assert!(
            ok,
            "promtool check metrics failed:\n{report}\n--- exposition ---\n{text}"
        );
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_real_redis_the_metrics_snapshot_and_admin_view_show_the_shared_budget() {
    // `tests/common/redis.rs`: a redis-server of this test (never skipped).
    let redis = common::redis::Redis::start_with(&["--requirepass", REDIS_PASSWORD]);
    let url = format!("redis://:{REDIS_PASSWORD}@127.0.0.1:{}/0", redis.port);
    let s = stack(
        unlimited_mock(),
        &[
            ("SIDECAR_REDIS_URL", &url),
            ("SIDECAR_REDIS_PREFIX", "metrics-test:"),
            ("SIDECAR_REDIS_TIMEOUT", "1"),
            ("SIDECAR_SNAPSHOT_INTERVAL", "0.1"),
            ("SIDECAR_RATE_RPM", "6000"),
        ],
    );
    let replica = s.replica();
    let runner = nvidia_sidecar::sidecar::spawn_budgets(&s.app)
        .expect("the budget thread starts")
        .expect("cluster mode runs a budget task");

    let m = scrape_until(s.metrics_addr, "shared mode with Redis up", |m| {
        m.get("sidecar_budget_backend_up", &[NVIDIA]) == Some(1.0)
            && m.get("sidecar_cluster_mode", &[NVIDIA, ("mode", "shared")]) == Some(1.0)
    })
    .await;
    assert_eq!(m.value("sidecar_cluster_replicas", &[NVIDIA]), 1.0);
    assert!(m.value("sidecar_budget_record_version", &[NVIDIA]) >= 1.0);
    s.chats_ok(20).await;
    let m = scrape_until(s.metrics_addr, "20 requests on leased tokens", |m| {
        m.get("sidecar_budget_admitted_total", &[NVIDIA]) >= Some(20.0)
            && m.sum("sidecar_cluster_replica_window_sends", &[NVIDIA]) > 0.0
    })
    .await;
    let granted = m.value(
        "sidecar_budget_leases_total",
        &[NVIDIA, ("result", "granted")],
    ) + m.value(
        "sidecar_budget_leases_total",
        &[NVIDIA, ("result", "partial")],
    );
    assert!(granted >= 1.0, "{}", m.dump("sidecar_budget_leases"));
    let round_trips = m.value("sidecar_budget_round_trips_total", &[NVIDIA]);
    let rt = m.histogram("sidecar_budget_round_trip_seconds", &[NVIDIA]);
    assert!(rt.count >= 1.0, "{rt:?}");
    assert!(
        (rt.count - round_trips).abs() <= 2.0,
        "one histogram sample per round trip: {} vs {round_trips}",
        rt.count
    );
    assert!(
        rt.sum / rt.count < 1.0,
        "a local Redis answers well within the timeout: {rt:?}"
    );
    assert_eq!(m.value("sidecar_cluster_share", &[NVIDIA]), 1.0, "alone");
    assert!(
        m.value(
            "sidecar_cluster_replica_window_sends",
            &[NVIDIA, ("replica", &replica)]
        ) >= 1.0
    );

    // The snapshot says the same.
    let v = snapshot_until(s.addr, "shared mode", |v| {
        let c = &v["providers"][0]["cluster"];
        c["mode"] == "shared" && c["leases"]["granted"].as_u64() > Some(0)
    })
    .await;
    let cluster = &v["providers"][0]["cluster"];
    assert_eq!(cluster["replica"], replica.as_str(), "{cluster}");
    assert_eq!(cluster["budget"], "nvidia");
    assert_eq!(cluster["backend_up"], true);
    assert_eq!(cluster["replicas"], 1);
    assert_eq!(cluster["share"], 1.0);
    assert_eq!(cluster["shares"][0]["replica"], replica.as_str());
    assert!(
        cluster["record"]["version"].as_u64() >= Some(1),
        "{cluster}"
    );
    assert_eq!(cluster["record"]["rate_rpm"], 6000.0, "{cluster}");
    assert!(cluster["round_trip_ms"]["p99"].is_number(), "{cluster}");
    assert!(cluster["down_for_secs"].is_null(), "{cluster}");
    assert!(cluster["generation"].is_string(), "{cluster}");

    // And the admin view: the cluster's values and this replica's own view.
    let a = admin_get(s.addr, &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    let c = &v["providers"]["nvidia"]["cluster"];
    assert_eq!(c["budget"], "nvidia", "{v}");
    assert_eq!(c["replica"]["id"], replica.as_str());
    assert_eq!(c["replica"]["mode"], "shared");
    assert_eq!(c["replica"]["backend_up"], true);
    assert_eq!(c["replica"]["replicas"], 1);
    assert_eq!(c["record"]["rate_rpm"], 6000.0, "{c}");
    assert!(c["record"]["version"].as_u64() >= Some(1), "{c}");
    let masked = format!("redis://:****@127.0.0.1:{}/0", redis.port);
    assert_eq!(v["redis"]["url"], masked.as_str());
    assert_eq!(v["redis"]["prefix"], "metrics-test:");

    let text = scrape_text(s.metrics_addr).await;
    for (what, body) in [("/metrics", text.as_str()), ("admin GET", &a.text())] {
        assert!(
            !body.contains(REDIS_PASSWORD),
            "the Redis password in {what}"
        );
    }
    if let Some((ok, report)) = promtool_check(&text) {
        assert!(ok, "promtool check metrics failed:\n{report}\n{text}");
    }
    assert_ledger(&s, sent_to(s.addr)).await;
    s.stop();
    runner.stop();
    drop(redis);
}
