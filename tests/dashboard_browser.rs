//! The live dashboard in a real browser: headless Chromium driven over WebDriver
//! (chromedriver + fantoccini) loads `GET /api/dashboard`, goes live on the SSE stream,
//! shows the configured rate, a queue that fills under a burst, request counts and
//! latency that move with the traffic, and the stale overlay once the sidecar stops.
//! On the way it changes the configuration through the page's configuration panel (the
//! admin API, with the token asked once in the page's dialog and kept for the session),
//! and checks that neither the admin token nor the provider key ever reaches the DOM.
//! A second test treats the browser as remote (`admin_loopback_reads = false`, so
//! reads need the token even from loopback): the page asks for the token at once,
//! explains what is needed when refused it, and with it shows and changes the
//! configuration, keeping the token in `sessionStorage` only.
//! A third puts a provider with a token budget beside one without: the "Token budget"
//! card shows the window's limit, remaining and charged tokens, the settled and reported
//! totals and the too-large refusals, figure for figure as `/metrics` has them, and the
//! provider without a budget has no such card.
//! Screenshots land in `target/dashboard.png`, `target/dashboard-admin.png`,
//! `target/dashboard-stale.png`, `target/dashboard-token-needed.png` and
//! `target/dashboard-tokens.png`.
//!
//! Needs Debian's `chromium` and `chromium-driver` (CI installs them in `.ci/run`);
//! without them the tests are skipped under a bare `cargo test` and fail under
//! `tests/run.sh` or `CI`.
//!
//! Real time throughout, but nothing asserts on how long anything takes: every check
//! polls the page until it holds, with a generous deadline.

mod common;

use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::Locator;
use fantoccini::{Client, ClientBuilder};
use http_body_util::BodyExt;
use nvidia_sidecar::mock::MockConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long any one condition may take to show up on the page.
const DEADLINE: Duration = Duration::from_secs(20);
/// Logged to the page's console to prove the console is read.
const CONSOLE_MARKER: &str = "dashboard_browser: console capture check";
/// Concurrent chats in the burst; the bucket admits about two a second, so most park.
const BURST: usize = 16;
/// The sidecar's `SIDECAR_ADMIN_TOKEN`: typed into the page's token dialog once.
const ADMIN_TOKEN: &str = "dashboard-browser-admin-token-5d9e2c71";
/// The provider key `tests/common` configures; the page may only show it masked.
const PROVIDER_KEY: &str = "nvapi-provider-key-0001";

/// chromedriver on an ephemeral port, killed on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Driver {
    fn start(dir: &Path) -> Driver {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
            l.local_addr().expect("local addr").port()
        };
        let log = dir.join("chromedriver.log");
        let out = std::fs::File::create(&log).expect("chromedriver log file");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("start chromedriver");
        Driver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `GET /status` answers `ready: true`.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "chromedriver exited ({status}): {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(2), raw(self.addr, "GET", "/status", ""))
                    .await
            {
                if resp["value"]["ready"] == true {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver on {} not ready: {}",
                self.addr,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON request straight to chromedriver, on a connection of its own.
async fn raw(addr: SocketAddr, method: &str, path: &str, body: &str) -> Result<Value, String> {
    let r = req(
        method,
        addr,
        path,
        &[("content-type", "application/json; charset=utf-8")],
        body,
    );
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(r).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{status}: {e}: {}", String::from_utf8_lossy(&bytes)))?;
    if status.is_success() {
        Ok(v)
    } else {
        Err(format!("{status}: {v}"))
    }
}

/// Chromium's console since the last call (chromedriver clears what it returns).
///
/// fantoccini has no "get log" command, and a custom `WebDriverCompatibleCommand` has to
/// spell `url::Url` in its signature, which this crate cannot name (`url` is not a
/// dependency). So this sends chromedriver's `POST /session/{id}/se/log` itself, for
/// the same session, over plain HTTP.
async fn browser_log(driver: SocketAddr, session: &str) -> Vec<LogEntry> {
    let v = raw(
        driver,
        "POST",
        &format!("/session/{session}/se/log"),
        r#"{"type":"browser"}"#,
    )
    .await
    .unwrap_or_else(|e| panic!("chromedriver's se/log: {e}"));
    serde_json::from_value(v["value"].clone()).unwrap_or_else(|e| panic!("log entries ({e}): {v}"))
}

#[derive(Debug, Deserialize)]
struct LogEntry {
    level: String,
    #[serde(default)]
    source: Option<String>,
    message: String,
}

impl LogEntry {
    /// A console error, or anything worse (Chromium reports both as SEVERE).
    fn is_error(&self) -> bool {
        self.level == "SEVERE"
    }

    /// A failed load of the stream or snapshot with nothing listening: expected only
    /// after the test stopped the sidecar (EventSource retries every 3 s).
    fn is_sidecar_gone(&self) -> bool {
        self.source.as_deref() == Some("network")
            && (self.message.contains("/api/dashboard/stream")
                || self.message.contains("/api/dashboard/snapshot"))
            && self.message.contains("net::ERR_CONNECTION_REFUSED")
    }
}

fn assert_no_console_errors(when: &str, entries: &[LogEntry], allowed: impl Fn(&LogEntry) -> bool) {
    for e in entries.iter().filter(|e| e.is_error()) {
        println!("console {when}: {} {}", e.level, e.message);
    }
    let bad: Vec<&LogEntry> = entries
        .iter()
        .filter(|e| e.is_error() && !allowed(e))
        .collect();
    assert!(
        bad.is_empty(),
        "console errors {when}: {bad:#?}\n(all entries: {entries:#?})"
    );
}

/// Everything the test reads from the page, in one script run so it is consistent.
#[derive(Debug, Deserialize)]
struct View {
    title: String,
    status: Option<String>,
    uptime: Option<String>,
    rpm: Option<String>,
    tokens: Option<String>,
    retreat: Option<String>,
    total: Option<String>,
    p99: Option<String>,
    queue_title: Option<String>,
    /// `(data-priority, data-depth)` of each bar in the queue chart.
    bars: Vec<(String, String)>,
    stale: Option<bool>,
}

const READ_VIEW: &str = r#"
const text = id => { const e = document.getElementById(id); return e ? e.textContent.trim() : null; };
const bars = Array.from(document.querySelectorAll('#queue-chart-nvidia [data-priority]'))
  .map(b => [b.getAttribute('data-priority'), b.getAttribute('data-depth')]);
const overlay = document.getElementById('stale-overlay');
return {
  title: document.title,
  status: text('status'),
  uptime: text('uptime'),
  rpm: text('card-nvidia-effective-rpm'),
  tokens: text('card-nvidia-tokens'),
  retreat: text('card-nvidia-retreat'),
  total: text('card-nvidia-requests-total'),
  p99: text('latency-nvidia-p99'),
  queue_title: text('queue-title-nvidia'),
  bars: bars,
  stale: overlay ? overlay.classList.contains('visible') : null,
};
"#;

impl View {
    fn requests_total(&self) -> Option<u64> {
        self.total.as_deref()?.parse().ok()
    }

    fn p99_ms(&self) -> Option<f64> {
        self.p99.as_deref()?.parse().ok()
    }

    /// The number in "Queue — N queued (max M)".
    fn queued(&self) -> Option<u64> {
        let t = self.queue_title.as_deref()?;
        let (head, _) = t.split_once(" queued")?;
        head.rsplit(' ').next()?.parse().ok()
    }

    fn deepest_bar(&self) -> u64 {
        self.bars
            .iter()
            .filter_map(|(_, d)| d.parse().ok())
            .max()
            .unwrap_or(0)
    }
}

/// Runs a script that returns what the test reads from the page, as `T`.
async fn read<T: DeserializeOwned>(c: &Client, script: &str) -> T {
    let v = c.execute(script, vec![]).await.expect("read the page");
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("page read ({e}): {v}"))
}

/// Polls the page with `script` until `cond` holds; on timeout shows the last read.
async fn poll<T: DeserializeOwned + std::fmt::Debug>(
    c: &Client,
    script: &str,
    what: &str,
    deadline: Duration,
    cond: impl Fn(&T) -> bool,
) -> T {
    let end = Instant::now() + deadline;
    loop {
        let v: T = read(c, script).await;
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}; the page shows {v:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn view(c: &Client) -> View {
    read(c, READ_VIEW).await
}

/// Polls the page until `cond` holds; on timeout shows the last view.
async fn until(c: &Client, what: &str, deadline: Duration, cond: impl Fn(&View) -> bool) -> View {
    poll(c, READ_VIEW, what, deadline, cond).await
}

/// The configuration panel, the change form, its result and the token dialog.
#[derive(Debug, Deserialize)]
struct ConfigView {
    /// `#config-status` when shown ("loading…", "admin API unavailable: …").
    status: Option<String>,
    /// The version badge when shown ("version 1").
    version: Option<String>,
    /// The read-only providers table: one map of column to cell per row; the row's
    /// name is under "provider".
    providers: Vec<std::collections::BTreeMap<String, String>>,
    /// Whether the change form (`<details id="config-edit">`) is shown, and open.
    edit_shown: bool,
    edit_open: bool,
    /// The nvidia provider's fieldset in the form: label to input value.
    nvidia_form: std::collections::BTreeMap<String, String>,
    submit_enabled: bool,
    submit_label: String,
    /// The result box: its kind (ok, error, warn, info), title and listed changes.
    result_kind: Option<String>,
    result_title: Option<String>,
    result_items: Vec<String>,
    dialog_open: bool,
    /// The token dialog's message (why the page asks).
    dialog_message: Option<String>,
    /// Whether the "admin token needed" explanation is shown, and its text.
    auth_shown: bool,
    auth_text: Option<String>,
    /// How often the token dialog opened since the test started counting.
    dialog_opens: Option<u64>,
    forget_token_shown: bool,
    /// `#card-nvidia-effective-rpm` and `#queue-title-nvidia`, from the stream.
    rpm: Option<String>,
    queue_title: Option<String>,
}

impl ConfigView {
    fn provider(&self, name: &str) -> Option<&std::collections::BTreeMap<String, String>> {
        self.providers
            .iter()
            .find(|r| r.get("provider").map(String::as_str) == Some(name))
    }

    fn provider_cell(&self, name: &str, column: &str) -> Option<&str> {
        self.provider(name)?.get(column).map(String::as_str)
    }

    fn result_ok(&self) -> bool {
        self.result_kind.as_deref() == Some("ok")
    }

    fn result_lists(&self, item: &str) -> bool {
        self.result_items.iter().any(|i| i == item)
    }
}

const READ_CONFIG: &str = r#"
const $ = id => document.getElementById(id);
const shownText = e => e && !e.hidden ? e.textContent.trim() : null;
const text = id => { const e = $(id); return e ? e.textContent.trim() : null; };
const table = document.querySelector('#config-view table.prov');
let providers = [];
if (table) {
  const heads = Array.from(table.querySelectorAll('thead th')).map(th => th.textContent.trim());
  providers = Array.from(table.querySelectorAll('tbody tr')).map(tr => {
    const row = {};
    Array.from(tr.children).forEach((cell, i) => { row[heads[i] || ('#' + i)] = cell.textContent.trim(); });
    return row;
  });
}
const nvidiaForm = {};
document.querySelectorAll('#config-fields fieldset').forEach(fs => {
  const legend = fs.querySelector('legend');
  if (!legend || legend.textContent.trim() !== 'Provider nvidia') return;
  fs.querySelectorAll('.field').forEach(f => {
    const label = f.querySelector('label'), input = f.querySelector('input, select');
    if (label && input) nvidiaForm[label.textContent.trim()] = input.value;
  });
});
const msg = document.querySelector('#config-result .msg');
const edit = $('config-edit');
return {
  status: shownText($('config-status')),
  version: shownText($('config-version')),
  providers: providers,
  edit_shown: !edit.hidden,
  edit_open: edit.open,
  nvidia_form: nvidiaForm,
  submit_enabled: !$('config-submit').disabled,
  submit_label: $('config-submit').textContent.trim(),
  result_kind: msg ? Array.from(msg.classList).filter(k => k !== 'msg').join(' ') : null,
  result_title: msg && msg.firstElementChild ? msg.firstElementChild.textContent.trim() : null,
  result_items: msg ? Array.from(msg.querySelectorAll('li')).map(li => li.textContent.trim()) : [],
  dialog_open: $('token-dialog').open,
  dialog_message: text('token-message'),
  auth_shown: !!$('config-auth') && !$('config-auth').hidden,
  auth_text: shownText($('config-auth-text')),
  dialog_opens: typeof window.__tokenDialogOpens === 'number' ? window.__tokenDialogOpens : null,
  forget_token_shown: !$('forget-token').hidden,
  rpm: text('card-nvidia-effective-rpm'),
  queue_title: text('queue-title-nvidia'),
};
"#;

/// Counts each time the token dialog opens (its `open` attribute appears), so the test
/// can tell the page did not ask again even if the dialog were closed in between.
const COUNT_DIALOG_OPENS: &str = r#"
const d = document.getElementById('token-dialog');
window.__tokenDialogOpens = d.open ? 1 : 0;
new MutationObserver(records => {
  records.forEach(r => { if (r.oldValue === null && d.hasAttribute('open')) window.__tokenDialogOpens++; });
}).observe(d, { attributes: true, attributeFilter: ['open'], attributeOldValue: true });
"#;

/// The whole DOM as markup, and every form control's current value (a property the
/// markup does not show).
#[derive(Debug, Deserialize)]
struct Secrets {
    html: String,
    /// `(id, type, value)` of every input, select and textarea.
    controls: Vec<(String, String, String)>,
}

const READ_SECRETS: &str = r#"
return {
  html: document.documentElement.outerHTML,
  controls: Array.from(document.querySelectorAll('input, select, textarea'))
    .map(e => [e.id || e.name || e.tagName, e.type || e.tagName.toLowerCase(), String(e.value)]),
};
"#;

/// The nvidia provider's input for the form field labelled `label`.
fn nvidia_field(label: &str) -> String {
    format!(
        "//fieldset[legend[normalize-space()='Provider nvidia']]\
         //div[contains(concat(' ', @class, ' '), ' field ')][label[normalize-space()='{label}']]//input"
    )
}

/// Types `value` into the nvidia provider's field labelled `label`, as a user would.
async fn set_nvidia_field(c: &Client, label: &str, value: &str) {
    let xpath = nvidia_field(label);
    let input = c
        .find(Locator::XPath(&xpath))
        .await
        .unwrap_or_else(|e| panic!("the form's field {label:?} for nvidia ({e})"));
    input.clear().await.expect("clear the field");
    input.send_keys(value).await.expect("type into the field");
}

/// Polls `GET /api/admin/config` until `cond` holds.
async fn until_admin_config(addr: SocketAddr, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let end = Instant::now() + DEADLINE;
    loop {
        // With the token: reads need it when loopback is not exempt.
        let v = admin_config(addr, &[("authorization", &bearer)]).await;
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for the admin API to show {what}: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is a PNG");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name);
    std::fs::create_dir_all(path.parent().unwrap()).expect("create target/");
    std::fs::write(&path, &png).expect("write the screenshot");
    println!("screenshot: {}", path.display());
    path
}

/// Whether Chromium and chromedriver are installed; under `tests/run.sh` or `CI` they
/// must be.
fn browser_available() -> bool {
    if [CHROMIUM, CHROMEDRIVER]
        .into_iter()
        .all(|p| Path::new(p).exists())
    {
        return true;
    }
    missing_tool(
        "chromium and chromium-driver",
        "apt-get install chromium chromium-driver",
    );
    false
}

fn capabilities(profile: &Path) -> serde_json::Map<String, Value> {
    let caps = json!({
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--window-size=1400,1100",
                format!("--user-data-dir={}", profile.display()),
            ],
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    match caps {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

/// Runs `scenario` in a fresh headless Chromium (its own profile and chromedriver),
/// given the WebDriver client and chromedriver's address; skipped without a browser.
fn in_chromium<F, Fut>(scenario: F)
where
    F: FnOnce(Client, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if !browser_available() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let tmp = tempfile::tempdir().expect("temp dir");
        let profile = tmp.path().join("profile");
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut driver = Driver::start(tmp.path());
        driver.wait_ready().await;
        // chromedriver speaks plain HTTP on loopback: no TLS connector (and no CA roots) needed.
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities(&profile))
            .connect(&driver.url())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "WebDriver session ({e}); chromedriver log: {}",
                    std::fs::read_to_string(&driver.log).unwrap_or_default()
                )
            });
        // The scenario runs as a task so that a failed assertion still closes the
        // browser (and the driver) before the panic is passed on.
        let outcome = tokio::spawn(scenario(client.clone(), driver.addr)).await;
        let closed = client.close().await;
        drop(driver);
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
        closed.expect("close the WebDriver session");
    });
}

#[test]
fn dashboard_goes_live_shows_traffic_and_queue_and_marks_a_dead_stream_stale() {
    in_chromium(scenario);
}

async fn scenario(c: Client, driver: SocketAddr) {
    let started = Instant::now();
    let session = c
        .session_id()
        .await
        .expect("session id")
        .expect("an open session");

    // 1. A paced sidecar (2 tokens a second, capacity 1) in front of a quick upstream,
    //    with the admin API open for changes to holders of the token.
    let stack = stack(
        MockConfig {
            rpm: 0.0,
            latency_ms: 50,
            ..MockConfig::default()
        },
        &[
            ("SIDECAR_RATE_RPM", "120"),
            ("SIDECAR_BUCKET_CAPACITY", "1"),
            ("SIDECAR_QUEUE_MAX_SIZE", "100"),
            ("SIDECAR_SNAPSHOT_INTERVAL", "0.2"),
            ("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
    );
    let addr = stack.addr;
    c.goto(&format!("http://{addr}/api/dashboard"))
        .await
        .expect("open the dashboard");

    // 2. The page loads and goes live.
    let v = until(&c, "the stream to go live", DEADLINE, |v| {
        v.status.as_deref() == Some("live") && v.rpm.is_some()
    })
    .await;
    assert!(v.title.contains("nvidia-sidecar"), "title: {:?}", v.title);
    let v = until(&c, "the first numbers", DEADLINE, |v| {
        v.rpm.as_deref() == Some("120")
            && v.requests_total().is_some()
            && v.uptime.as_deref().is_some_and(|u| u != "—")
    })
    .await;
    assert_eq!(v.retreat.as_deref(), Some("normal"), "{v:#?}");
    assert!(
        v.tokens.as_deref().is_some_and(|t| t.ends_with("/ 1")),
        "bucket capacity 1: {v:#?}"
    );
    assert_eq!(
        v.bars.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["high", "normal", "low"],
        "one queue bar per priority"
    );
    let total_before = v.requests_total().unwrap();

    // 3. A burst: the bucket admits about two a second, so most of it parks.
    let chats: Vec<_> = (0..BURST)
        .map(|_| {
            tokio::spawn(async move {
                let r = req("POST", addr, "/v1/chat/completions", &[], CHAT);
                match send(addr, r).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.into_body().collect().await {
                            Ok(_) => Ok(status),
                            Err(e) => Err(format!("{status}, body cut: {e}")),
                        }
                    }
                    Err(e) => Err(e.to_string()),
                }
            })
        })
        .collect();
    let v = until(&c, "the queue chart to show depth", DEADLINE, |v| {
        v.deepest_bar() > 0 && v.queued().is_some_and(|n| n > 0)
    })
    .await;
    println!("queue on the page: {:?}, bars {:?}", v.queue_title, v.bars);
    let v = until(&c, "requests total to go up", DEADLINE, |v| {
        v.requests_total().is_some_and(|n| n > total_before)
    })
    .await;
    println!("requests total: {total_before} -> {:?}", v.total);
    let v = until(&c, "a p99 latency", DEADLINE, |v| v.p99_ms().is_some()).await;
    println!("p99: {:?} ms", v.p99);

    // 4. A picture of the busy page (after the bars' 300 ms transition).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let busy = screenshot(&c, "dashboard.png").await;
    let v = view(&c).await;
    assert!(
        v.deepest_bar() > 0,
        "the queue still had depth when {} was taken: {v:#?}",
        busy.display()
    );

    // Nothing in the console so far: the admin API answers the page's config load too.
    // A marker logged first proves the console really is captured (no vacuous pass).
    c.execute("console.info(arguments[0]);", vec![json!(CONSOLE_MARKER)])
        .await
        .expect("log the console marker");
    let log = browser_log(driver, &session).await;
    assert!(
        log.iter().any(|e| e.message.contains(CONSOLE_MARKER)),
        "the browser console is not captured: {log:#?}"
    );
    assert_no_console_errors("while live", &log, |_| false);

    // 5. The configuration panel, and changes made through it.
    change_the_configuration(&c, addr).await;
    no_secrets_in_the_dom(&c).await;
    let log = browser_log(driver, &session).await;
    assert_no_console_errors("while changing the configuration", &log, |_| false);
    // Back to the provider cards for the stale picture.
    c.execute("window.scrollTo(0, 0);", vec![])
        .await
        .expect("scroll to the top");

    // 6. Stop the sidecar: the stream ends on draining and nothing accepts anymore.
    let app = std::sync::Arc::clone(&stack.app);
    let Stack { mock, sidecar, .. } = stack;
    let stopping = tokio::task::spawn_blocking(move || sidecar.stop());
    let v = until(&c, "the stale overlay", Duration::from_secs(15), |v| {
        v.stale == Some(true)
    })
    .await;
    assert_ne!(v.status.as_deref(), Some("live"), "{v:#?}");
    screenshot(&c, "dashboard-stale.png").await;

    // The burst is over: every chat was answered or cut, none hangs.
    stopping.await.expect("the sidecar stops");
    let mut outcomes = Vec::new();
    for chat in chats {
        let r = tokio::time::timeout(Duration::from_secs(10), chat)
            .await
            .expect("every chat ends once the sidecar has stopped")
            .expect("chat task");
        outcomes.push(r);
    }
    let ok = outcomes.iter().filter(|r| matches!(r, Ok(200))).count();
    println!("burst of {BURST}: {ok} answered 200; all: {outcomes:?}");
    assert!(ok > 0, "some of the burst was served: {outcomes:?}");
    assert_app_ledger(&app, sent_to(addr));
    mock.stop();

    // 7. After the stop, only the stream's failed reconnects are added.
    let log = browser_log(driver, &session).await;
    assert_no_console_errors("after the sidecar stopped", &log, LogEntry::is_sidecar_gone);
    println!("scenario took {:?}", started.elapsed());
}

/// The panel shows the configuration; a first change asks for the token in the page's
/// dialog, a second one reuses it; both reach the server and the live cards.
async fn change_the_configuration(c: &Client, addr: SocketAddr) {
    // The read-only view: the provider row, its key masked.
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the configuration panel",
        DEADLINE,
        |v: &ConfigView| v.provider("nvidia").is_some() && v.edit_shown,
    )
    .await;
    assert_eq!(v.status, None, "no error or loading note: {v:#?}");
    assert_eq!(v.version.as_deref(), Some("version 1"), "{v:#?}");
    assert_eq!(v.provider_cell("nvidia", "rate_rpm"), Some("120"), "{v:#?}");
    assert_eq!(
        v.provider_cell("nvidia", "api_key"),
        Some("nvap****"),
        "{v:#?}"
    );
    assert_eq!(
        v.provider_cell("nvidia", "queue_max_size"),
        Some("100"),
        "{v:#?}"
    );
    assert!(!v.edit_open, "the change form starts folded: {v:#?}");
    assert!(
        !v.dialog_open && !v.forget_token_shown,
        "no token yet: {v:#?}"
    );
    c.execute(COUNT_DIALOG_OPENS, vec![])
        .await
        .expect("count the token dialog's openings");

    // The first change: nvidia's rate 120 -> 90.
    c.find(Locator::Css("#config-edit > summary"))
        .await
        .expect("the change form's summary")
        .click()
        .await
        .expect("open the change form");
    poll(
        c,
        READ_CONFIG,
        "the change form to open",
        DEADLINE,
        |v: &ConfigView| {
            v.edit_open && v.nvidia_form.get("Rate").map(String::as_str) == Some("120")
        },
    )
    .await;
    set_nvidia_field(c, "Rate", "90").await;
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "one pending change",
        DEADLINE,
        |v: &ConfigView| {
            v.submit_enabled && v.nvidia_form.get("Rate").map(String::as_str) == Some("90")
        },
    )
    .await;
    assert_eq!(v.submit_label, "Apply 1 change", "{v:#?}");
    c.find(Locator::Id("config-submit"))
        .await
        .expect("the submit button")
        .click()
        .await
        .expect("submit the change");

    // No token yet: the page asks for it in its dialog, in a password field.
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the token dialog",
        DEADLINE,
        |v: &ConfigView| v.dialog_open,
    )
    .await;
    assert_eq!(v.dialog_opens, Some(1), "{v:#?}");
    let input = c
        .find(Locator::Id("token-input"))
        .await
        .expect("the token input");
    assert_eq!(
        input
            .attr("type")
            .await
            .expect("the input's type")
            .as_deref(),
        Some("password"),
        "the token is typed into a password field"
    );
    input.send_keys(ADMIN_TOKEN).await.expect("type the token");
    c.find(Locator::Css("#token-form button[type='submit']"))
        .await
        .expect("the dialog's confirm button")
        .click()
        .await
        .expect("confirm the token");

    // The result lists the change, the server has it, and the stream shows the new rate.
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the first change's result",
        DEADLINE,
        |v: &ConfigView| v.result_ok() && v.result_lists("providers.nvidia.rate_rpm: 120 → 90"),
    )
    .await;
    println!("first change: {:?} {:?}", v.result_title, v.result_items);
    assert_eq!(
        v.result_title.as_deref(),
        Some("Applied — now version 2."),
        "{v:#?}"
    );
    assert!(!v.dialog_open, "the dialog closed: {v:#?}");
    c.execute(
        "document.getElementById('config-panel').scrollIntoView({block: 'end'});",
        vec![],
    )
    .await
    .expect("scroll to the configuration panel");
    tokio::time::sleep(Duration::from_millis(400)).await;
    screenshot(c, "dashboard-admin.png").await;

    let server = until_admin_config(addr, "rate_rpm 90 at version 2", |v| {
        v["providers"]["nvidia"]["rate_rpm"] == 90.0 && v["version"] == "2"
    })
    .await;
    assert_eq!(
        server["providers"]["nvidia"]["queue_max_size"], 100,
        "{server:#}"
    );
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the panel to reload at version 2",
        DEADLINE,
        |v: &ConfigView| {
            v.version.as_deref() == Some("version 2")
                && v.provider_cell("nvidia", "rate_rpm") == Some("90")
                && v.nvidia_form.get("Rate").map(String::as_str) == Some("90")
                && !v.submit_enabled
        },
    )
    .await;
    assert!(
        v.forget_token_shown,
        "the token is kept for the session: {v:#?}"
    );
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the effective rate card to show 90",
        DEADLINE,
        |v: &ConfigView| v.rpm.as_deref() == Some("90"),
    )
    .await;
    println!("effective rpm on the page: {:?}", v.rpm);

    // The second change: nvidia's queue bound 100 -> 50, with the token kept.
    set_nvidia_field(c, "Queue max size", "50").await;
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the second pending change",
        DEADLINE,
        |v: &ConfigView| {
            v.submit_enabled
                && v.nvidia_form.get("Queue max size").map(String::as_str) == Some("50")
        },
    )
    .await;
    assert_eq!(v.submit_label, "Apply 1 change", "{v:#?}");
    c.find(Locator::Id("config-submit"))
        .await
        .expect("the submit button")
        .click()
        .await
        .expect("submit the second change");
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the second change's result (or the dialog)",
        DEADLINE,
        |v: &ConfigView| {
            v.dialog_open
                || v.dialog_opens != Some(1)
                || (v.result_ok() && v.result_lists("providers.nvidia.queue_max_size: 100 → 50"))
        },
    )
    .await;
    println!("second change: {:?} {:?}", v.result_title, v.result_items);
    assert!(
        !v.dialog_open && v.dialog_opens == Some(1),
        "the token is kept for the session: the page must not ask again: {v:#?}"
    );
    assert_eq!(
        v.result_title.as_deref(),
        Some("Applied — now version 3."),
        "{v:#?}"
    );
    assert_eq!(
        v.result_items.len(),
        1,
        "only the queue bound changed: {v:#?}"
    );
    let server = until_admin_config(addr, "queue_max_size 50 at version 3", |v| {
        v["providers"]["nvidia"]["queue_max_size"] == 50 && v["version"] == "3"
    })
    .await;
    assert_eq!(
        server["providers"]["nvidia"]["rate_rpm"], 90.0,
        "{server:#}"
    );
    let v: ConfigView = poll(
        c,
        READ_CONFIG,
        "the new queue bound on the page",
        DEADLINE,
        |v: &ConfigView| {
            v.version.as_deref() == Some("version 3")
                && v.provider_cell("nvidia", "queue_max_size") == Some("50")
                && v.queue_title
                    .as_deref()
                    .is_some_and(|t| t.ends_with("(max 50)"))
        },
    )
    .await;
    assert_eq!(v.rpm.as_deref(), Some("90"), "{v:#?}");
    assert!(!v.dialog_open && v.dialog_opens == Some(1), "{v:#?}");
}

/// Neither the admin token nor the provider key is in the markup or in any form
/// control; the password field was emptied after use.
async fn no_secrets_in_the_dom(c: &Client) {
    let s: Secrets = read(c, READ_SECRETS).await;
    for secret in [ADMIN_TOKEN, PROVIDER_KEY] {
        if let Some(at) = s.html.find(secret) {
            let from = s.html[..at]
                .char_indices()
                .rev()
                .nth(200)
                .map_or(0, |(i, _)| i);
            panic!(
                "the DOM contains a secret at byte {at}: …{}…",
                &s.html[from..(at + secret.len()).min(s.html.len())]
            );
        }
    }
    assert!(s.html.contains("nvap****"), "the masked key is shown");
    let mut password_fields = 0;
    for (id, kind, value) in &s.controls {
        if kind == "password" {
            password_fields += 1;
            assert_eq!(value, "", "the password field {id:?} is emptied after use");
        }
        for secret in [ADMIN_TOKEN, PROVIDER_KEY] {
            assert!(
                !value.contains(secret),
                "the {kind} control {id:?} holds a secret"
            );
        }
    }
    assert_eq!(
        password_fields, 1,
        "one password field (the token dialog's): {:?}",
        s.controls
    );
    println!(
        "secrets: none in {} bytes of markup or {} form controls",
        s.html.len(),
        s.controls.len()
    );
}

/// The browser's cookies, address and both storages, read in one script run.
#[derive(Debug, Deserialize)]
struct Storage {
    cookie: String,
    href: String,
    /// `(key, value)` of every entry.
    local: Vec<(String, String)>,
    session: Vec<(String, String)>,
}

const READ_STORAGE: &str = r#"
const all = s => Array.from({ length: s.length }, (_, i) => [s.key(i), s.getItem(s.key(i))]);
return { cookie: document.cookie, href: location.href, local: all(localStorage), session: all(sessionStorage) };
"#;

/// Where the page keeps the token for the session (`TOKEN_KEY` in the page).
const TOKEN_KEY: &str = "nvidia-sidecar.admin-token";

/// A refused configuration read (401 without the token, 403 with a wrong one): Chromium
/// logs every failed load as an error, and these the test causes on purpose.
fn is_refused_config_read(e: &LogEntry) -> bool {
    e.source.as_deref() == Some("network")
        && e.message.contains("/api/admin/config")
        && (e.message.contains("401") || e.message.contains("403"))
}

/// Types `token` into the open token dialog and confirms it.
async fn enter_token(c: &Client, token: &str) {
    let input = c
        .find(Locator::Id("token-input"))
        .await
        .expect("the token input");
    input.send_keys(token).await.expect("type the token");
    c.find(Locator::Css("#token-form button[type='submit']"))
        .await
        .expect("the dialog's confirm button")
        .click()
        .await
        .expect("confirm the token");
}

async fn click(c: &Client, css: &str, what: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{what} ({e})"))
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {what} ({e})"));
}

/// Nothing of the configuration is on the page: no table, no form, no version.
fn shows_no_configuration(v: &ConfigView) -> bool {
    v.providers.is_empty() && !v.edit_shown && v.version.is_none() && v.nvidia_form.is_empty()
}

#[test]
fn a_remote_browser_is_asked_for_the_token_at_once_and_with_it_reads_and_changes_the_rate() {
    in_chromium(remote_scenario);
}

/// The sidecar treated as remote (`admin_loopback_reads = false`): reads need the
/// token even from this loopback browser, as from any other host.
async fn remote_scenario(c: Client, driver: SocketAddr) {
    let session = c
        .session_id()
        .await
        .expect("session id")
        .expect("an open session");
    let stack = stack(
        MockConfig {
            rpm: 0.0,
            ..MockConfig::default()
        },
        &[
            ("SIDECAR_RATE_RPM", "120"),
            ("SIDECAR_SNAPSHOT_INTERVAL", "0.2"),
            ("SIDECAR_ADMIN_TOKEN", ADMIN_TOKEN),
            ("SIDECAR_ADMIN_LOOPBACK_READS", "false"),
        ],
    );
    let addr = stack.addr;
    let refused = admin_get(addr, &[]).await;
    assert_eq!(
        refused.status.as_u16(),
        401,
        "loopback is not exempt: {}",
        refused.text()
    );
    c.goto(&format!("http://{addr}/api/dashboard"))
        .await
        .expect("open the dashboard");

    // (a) The configuration read answers 401: the page asks for the token at once,
    //     saying what it is.
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the token dialog on load",
        DEADLINE,
        |v: &ConfigView| v.dialog_open,
    )
    .await;
    let asked = v.dialog_message.as_deref().unwrap_or_default();
    assert!(
        asked.contains("admin token") && asked.contains("SIDECAR_ADMIN_TOKEN"),
        "the dialog says what is needed: {v:#?}"
    );
    assert!(shows_no_configuration(&v), "{v:#?}");

    // Cancelled: the panel explains what is needed, offers to enter the token, and
    // shows no configuration.
    click(&c, "#token-cancel", "the dialog's cancel button").await;
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the explanation after cancelling",
        DEADLINE,
        |v: &ConfigView| !v.dialog_open && v.auth_shown,
    )
    .await;
    let explained = v.auth_text.as_deref().unwrap_or_default();
    for needle in [
        "needs the sidecar's admin token",
        "SIDECAR_ADMIN_TOKEN",
        "browser session only",
    ] {
        assert!(explained.contains(needle), "{needle:?} in {v:#?}");
    }
    assert!(shows_no_configuration(&v), "{v:#?}");
    assert!(
        v.status.as_deref().is_some_and(|s| s.contains("401")),
        "{v:#?}"
    );
    let page: Secrets = read(&c, READ_SECRETS).await;
    assert!(
        !page.html.contains("nvap****") && !page.html.contains("version 1"),
        "no configuration values on the page"
    );
    let st: Storage = read(&c, READ_STORAGE).await;
    assert!(st.session.is_empty() && st.local.is_empty(), "{st:#?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    screenshot(&c, "dashboard-token-needed.png").await;

    // (b) The panel's button asks again. A wrong token is refused (403), forgotten, and
    //     the dialog asks again with the reason; the right one shows the configuration.
    click(&c, "#config-enter-token", "the panel's token button").await;
    poll(
        &c,
        READ_CONFIG,
        "the token dialog from the panel",
        DEADLINE,
        |v: &ConfigView| v.dialog_open,
    )
    .await;
    enter_token(&c, "not-the-admin-token").await;
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the dialog again, with the reason",
        DEADLINE,
        |v: &ConfigView| {
            v.dialog_open
                && v.dialog_message
                    .as_deref()
                    .is_some_and(|m| m.contains("rejected (403)"))
        },
    )
    .await;
    assert!(shows_no_configuration(&v), "{v:#?}");
    let st: Storage = read(&c, READ_STORAGE).await;
    assert!(
        st.session.is_empty(),
        "the wrong token is forgotten: {st:#?}"
    );
    enter_token(&c, ADMIN_TOKEN).await;
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the configuration with the token",
        DEADLINE,
        |v: &ConfigView| v.provider("nvidia").is_some() && v.edit_shown,
    )
    .await;
    assert_eq!(v.provider_cell("nvidia", "rate_rpm"), Some("120"), "{v:#?}");
    assert_eq!(v.version.as_deref(), Some("version 1"), "{v:#?}");
    assert!(
        !v.dialog_open && !v.auth_shown && v.status.is_none(),
        "{v:#?}"
    );
    assert!(v.forget_token_shown, "{v:#?}");

    // A reload keeps the token for the session: the configuration shows, unasked.
    c.refresh().await.expect("reload the page");
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the configuration after a reload",
        DEADLINE,
        |v: &ConfigView| v.provider("nvidia").is_some() && v.edit_shown,
    )
    .await;
    assert!(!v.dialog_open && !v.auth_shown, "not asked again: {v:#?}");
    c.execute(COUNT_DIALOG_OPENS, vec![])
        .await
        .expect("count the token dialog's openings");

    // The rate through the form: 120 -> 90, with the kept token.
    click(&c, "#config-edit > summary", "the change form's summary").await;
    poll(
        &c,
        READ_CONFIG,
        "the change form to open",
        DEADLINE,
        |v: &ConfigView| {
            v.edit_open && v.nvidia_form.get("Rate").map(String::as_str) == Some("120")
        },
    )
    .await;
    set_nvidia_field(&c, "Rate", "90").await;
    poll(
        &c,
        READ_CONFIG,
        "one pending change",
        DEADLINE,
        |v: &ConfigView| v.submit_enabled && v.submit_label == "Apply 1 change",
    )
    .await;
    click(&c, "#config-submit", "the submit button").await;
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the change's result",
        DEADLINE,
        |v: &ConfigView| {
            v.dialog_open
                || (v.result_ok() && v.result_lists("providers.nvidia.rate_rpm: 120 → 90"))
        },
    )
    .await;
    assert!(
        !v.dialog_open && v.dialog_opens == Some(0),
        "the kept token is used: {v:#?}"
    );
    let server = until_admin_config(addr, "rate_rpm 90 at version 2", |v| {
        v["providers"]["nvidia"]["rate_rpm"] == 90.0 && v["version"] == "2"
    })
    .await;
    println!(
        "the server's rate: {}",
        server["providers"]["nvidia"]["rate_rpm"]
    );
    let v: ConfigView = poll(
        &c,
        READ_CONFIG,
        "the panel and the card at 90",
        DEADLINE,
        |v: &ConfigView| {
            v.version.as_deref() == Some("version 2")
                && v.provider_cell("nvidia", "rate_rpm") == Some("90")
                && v.rpm.as_deref() == Some("90")
        },
    )
    .await;
    assert!(!v.dialog_open && v.dialog_opens == Some(0), "{v:#?}");

    // Where the token is: sessionStorage only.
    let st: Storage = read(&c, READ_STORAGE).await;
    assert_eq!(st.cookie, "", "no cookie: {st:#?}");
    assert!(
        !st.href.contains(ADMIN_TOKEN) && !st.href.contains("token"),
        "no token in the address: {st:#?}"
    );
    assert!(st.local.is_empty(), "nothing in localStorage: {st:#?}");
    assert_eq!(
        st.session,
        [(TOKEN_KEY.to_owned(), ADMIN_TOKEN.to_owned())],
        "the token, and only it, in sessionStorage"
    );
    no_secrets_in_the_dom(&c).await;

    // The console shows only the refused reads this test caused.
    let log = browser_log(driver, &session).await;
    assert_no_console_errors("as a remote user", &log, is_refused_config_read);
    tokio::task::spawn_blocking(move || stack.stop())
        .await
        .expect("the sidecar stops");
}

// === the token budget card ===

/// Tokens per window of the token budget: `tokens_per_minute = 12000` on the default
/// 60 s window. A window this long holds every charge of the scenario until it ends, so
/// "charged in the window" is the chats' settled tokens both when the page is read and
/// when `/metrics` is scraped; on a 6 s window the charges would leave it while the
/// test reads the page, and the figures would race the clock.
const TOKEN_LIMIT: u64 = 12_000;
/// The chats sent through the token budget: prompt bytes and `max_tokens`.
const TOKEN_CHATS: [(usize, u64); 3] = [(400, 100), (1_200, 500), (2_000, 1_000)];
/// A chat for the provider without a token budget (routed by its model).
const PLAIN_CHAT: &str =
    r#"{"model":"mistralai/mixtral-8x7b","messages":[{"role":"user","content":"hi"}]}"#;

/// The "Token budget" card of nvidia as the page shows it, its texts as shown, and what
/// the page has of the provider without a budget; read in one script run.
#[derive(Debug, Deserialize)]
struct TokenCard {
    status: Option<String>,
    /// `(card id, its provider section's id, shown)` of every token card on the page.
    cards: Vec<(String, String, bool)>,
    shown: bool,
    title: Option<String>,
    remaining: Option<String>,
    limit: Option<String>,
    /// The window the limit is for ("per 60 s window").
    window: Option<String>,
    /// The remaining figure's whole line, as read ("9491 of 12000 tokens per 60 s window").
    remaining_line: Option<String>,
    charged: Option<String>,
    /// The charged meter's width ("20.9%").
    fill: Option<String>,
    detail: Option<String>,
    settled: Option<String>,
    estimated: Option<String>,
    usage: Option<String>,
    refused: Option<String>,
    ratio: Option<String>,
    ratio_count: Option<String>,
    /// The provider without a budget: its section's cards, and its requests total.
    plain_cards: Vec<String>,
    plain_total: Option<String>,
}

const READ_TOKEN_CARD: &str = r#"
const text = id => { const e = document.getElementById(id); return e ? e.textContent.trim() : null; };
const card = document.getElementById('token-budget-nvidia');
const fill = card ? card.querySelector('.meter-fill') : null;
const plain = document.getElementById('provider-plain');
return {
  status: text('status'),
  cards: Array.from(document.querySelectorAll('.c-token-budget')).map(c => {
    const section = c.closest('section.provider');
    return [c.id, section ? section.id : '', !c.hidden];
  }),
  shown: !!card && !card.hidden,
  title: card ? card.querySelector('h3').textContent.trim() : null,
  remaining: text('card-nvidia-token-remaining'),
  limit: text('card-nvidia-token-limit'),
  window: text('card-nvidia-token-window'),
  remaining_line: (() => {
    const e = document.getElementById('card-nvidia-token-remaining');
    return e && e.parentElement ? e.parentElement.innerText.replace(/\s+/g, ' ').trim() : null;
  })(),
  charged: text('card-nvidia-token-charged'),
  fill: fill ? fill.style.width : null,
  detail: text('card-nvidia-token-detail'),
  settled: text('card-nvidia-token-settled'),
  estimated: text('card-nvidia-token-estimated'),
  usage: text('card-nvidia-token-usage'),
  refused: text('card-nvidia-token-refused'),
  ratio: text('card-nvidia-token-ratio'),
  ratio_count: text('card-nvidia-token-ratio-count'),
  plain_cards: plain ? Array.from(plain.querySelectorAll('.card > h3')).map(h => h.textContent.trim()) : [],
  plain_total: text('card-plain-requests-total'),
};
"#;

/// A whole number as the page writes it, thousands separators read through.
fn shown_int(s: Option<&str>) -> Option<u64> {
    let digits: String = s?
        .chars()
        .filter(|c| !matches!(c, ',' | ' ' | '\u{202f}' | '\u{a0}'))
        .collect();
    digits.parse().ok()
}

impl TokenCard {
    fn remaining(&self) -> Option<u64> {
        shown_int(self.remaining.as_deref())
    }

    fn limit(&self) -> Option<u64> {
        shown_int(self.limit.as_deref())
    }

    fn charged(&self) -> Option<u64> {
        shown_int(self.charged.as_deref())
    }

    fn settled(&self) -> Option<u64> {
        shown_int(self.settled.as_deref())
    }

    fn estimated(&self) -> Option<u64> {
        shown_int(self.estimated.as_deref())
    }

    /// "reported: prompt P · completion C".
    fn reported(&self) -> Option<(u64, u64)> {
        let t = self.usage.as_deref()?.strip_prefix("reported: prompt ")?;
        let (prompt, completion) = t.split_once(" · completion ")?;
        Some((shown_int(Some(prompt))?, shown_int(Some(completion))?))
    }

    /// "N refused: larger than a whole window"; the line is empty while none was.
    fn refused(&self) -> Option<u64> {
        match self.refused.as_deref()? {
            "" => Some(0),
            t => shown_int(Some(
                t.strip_suffix(" refused: larger than a whole window")?,
            )),
        }
    }

    fn ratio(&self) -> Option<f64> {
        self.ratio.as_deref()?.parse().ok()
    }

    fn ratio_count(&self) -> Option<u64> {
        shown_int(self.ratio_count.as_deref())
    }

    /// The meter's width as a fraction.
    fn fill(&self) -> Option<f64> {
        let pct: f64 = self.fill.as_deref()?.strip_suffix('%')?.parse().ok()?;
        Some(pct / 100.0)
    }

    /// The card shows every figure of `m`, the scrape's.
    fn shows(&self, m: &TokenMetrics) -> bool {
        self.shown
            && self.limit() == Some(m.limit)
            && self.remaining() == Some(m.remaining)
            && self.charged() == Some(m.limit - m.remaining)
            && self.settled() == Some(m.settled)
            && self.estimated() == Some(m.estimated)
            && self.reported() == Some((m.prompt, m.completion))
            && self.refused() == Some(m.too_large)
            && self.ratio_count() == Some(m.ratio_count)
    }
}

/// nvidia's token figures in one `/metrics` scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TokenMetrics {
    limit: u64,
    ceiling: u64,
    remaining: u64,
    waiting: u64,
    settled: u64,
    estimated: u64,
    prompt: u64,
    completion: u64,
    too_large: u64,
    ratio_count: u64,
    ratio_sum: f64,
}

impl TokenMetrics {
    fn read(text: &str) -> Self {
        let get = |series: &str| {
            sample(text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
        };
        let int = |series: &str| get(series) as u64;
        let tokens = |kind: &str| {
            int(&format!(
                r#"sidecar_tokens_total{{provider="nvidia",kind="{kind}"}}"#
            ))
        };
        Self {
            limit: int(r#"sidecar_token_budget_limit{provider="nvidia"}"#),
            ceiling: int(r#"sidecar_token_budget_ceiling{provider="nvidia"}"#),
            remaining: int(r#"sidecar_token_budget_remaining{provider="nvidia"}"#),
            waiting: int(r#"sidecar_token_waiting{provider="nvidia"}"#),
            settled: tokens("settled"),
            estimated: tokens("estimated"),
            prompt: tokens("prompt"),
            completion: tokens("completion"),
            too_large: int(r#"sidecar_dropped_total{provider="nvidia",reason="tokens_too_large"}"#),
            ratio_count: int(r#"sidecar_token_estimate_ratio_count{provider="nvidia"}"#),
            ratio_sum: get(r#"sidecar_token_estimate_ratio_sum{provider="nvidia"}"#),
        }
    }

    fn ratio_mean(&self) -> Option<f64> {
        (self.ratio_count > 0).then(|| self.ratio_sum / self.ratio_count as f64)
    }
}

/// Polls the page, and `/metrics` with it, until the card shows every figure of the
/// scrape taken in the same round and `cond` holds for that scrape; returns both.
async fn until_card_shows_metrics(
    c: &Client,
    metrics_addr: SocketAddr,
    what: &str,
    cond: impl Fn(&TokenMetrics) -> bool,
) -> (TokenCard, TokenMetrics) {
    let end = Instant::now() + DEADLINE;
    loop {
        let m = TokenMetrics::read(&metrics_text(metrics_addr).await);
        let card: TokenCard = read(c, READ_TOKEN_CARD).await;
        if cond(&m) && card.shows(&m) {
            return (card, m);
        }
        assert!(
            Instant::now() < end,
            "timed out after {DEADLINE:?} waiting for {what}; /metrics says {m:#?}, \
             the page shows {card:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The provider without a budget has its cards but no token card; the one token card
/// on the page is nvidia's.
fn only_nvidia_has_a_token_card(card: &TokenCard) {
    assert_eq!(
        card.cards,
        [(
            "token-budget-nvidia".to_owned(),
            "provider-nvidia".to_owned(),
            true
        )],
        "one token card, nvidia's: {card:#?}"
    );
    assert!(
        card.plain_cards.iter().any(|t| t == "Requests"),
        "the provider without a budget is on the page: {card:#?}"
    );
    assert!(
        !card.plain_cards.iter().any(|t| t == "Token budget"),
        "no token card for a provider without a token budget: {card:#?}"
    );
}

#[test]
fn the_token_budget_card_shows_the_window_and_the_totals_metrics_shows_and_only_for_a_budget() {
    in_chromium(token_budget_scenario);
}

/// Two providers: nvidia with a token budget of 12,000 a window, "plain" without one.
/// The card starts at a full window; chats of known sizes settle, a chat larger than the
/// window is refused 413; the card follows, figure for figure with `/metrics`.
async fn token_budget_scenario(c: Client, driver: SocketAddr) {
    let session = c
        .session_id()
        .await
        .expect("session id")
        .expect("an open session");
    // The provider counts tokens too (12,000 a minute, reserved on arrival), in its own
    // rule, and reports each answer's usage; its plain dialect states no token limit.
    let budgeted = common::mock(MockConfig {
        rpm: 0.0,
        tpm: TOKEN_LIMIT as f64,
        window_secs: 60.0,
        ..MockConfig::default()
    });
    let plain = common::mock(unlimited_mock());
    let toml = format!(
        r#"
        default_provider = "nvidia"
        snapshot_interval = 0.2
        rate_rpm = 6000
        bucket_capacity = 100
        provider_window = 60
        [[providers]]
        name = "nvidia"
        upstream_url = "{}"
        api_key = "{PROVIDER_KEY}"
        models = ["meta/*"]
        tokens_per_minute = {TOKEN_LIMIT}
        token_charge = "reserved"
        [[providers]]
        name = "plain"
        upstream_url = "{}"
        api_key = "key-plain"
        models = ["mistralai/*"]
        "#,
        budgeted.base_url(),
        plain.base_url()
    );
    let app = nvidia_sidecar::app::App::new(config_from_toml(&toml));
    let sidecar = nvidia_sidecar::sidecar::start(app).expect("sidecar starts");
    let (addr, metrics_addr) = (sidecar.local_addr, sidecar.metrics_addr);
    forget_sent(addr);
    c.goto(&format!("http://{addr}/api/dashboard"))
        .await
        .expect("open the dashboard");

    // 1. Before any traffic: a whole window left, nothing charged or settled.
    let (card, m) = until_card_shows_metrics(&c, metrics_addr, "the card of a full window", |m| {
        m.settled == 0
    })
    .await;
    println!("token card at start: {card:?}");
    assert_eq!(card.status.as_deref(), Some("live"), "{card:#?}");
    assert_eq!(card.title.as_deref(), Some("Token budget"), "{card:#?}");
    assert_eq!(
        (m.limit, m.ceiling, m.remaining),
        (TOKEN_LIMIT, TOKEN_LIMIT, TOKEN_LIMIT),
        "{m:#?}"
    );
    assert_eq!(card.charged(), Some(0), "{card:#?}");
    assert_eq!(
        card.window.as_deref(),
        Some("per 60 s window"),
        "the limit says its window: {card:#?}"
    );
    assert_eq!(card.fill(), Some(0.0), "{card:#?}");
    assert_eq!(
        card.refused.as_deref(),
        Some(""),
        "no refusal line yet: {card:#?}"
    );
    assert_eq!(card.ratio.as_deref(), Some("—"), "no usage yet: {card:#?}");
    only_nvidia_has_a_token_card(&card);

    // 2. Chats of known sizes, one after another. Charged as the provider charges
    //    (`reserved`): the prompt it reported plus the `max_tokens` bound.
    let mut expected = (0, 0, 0); // settled, prompt, completion
    for (bytes, max_tokens) in TOKEN_CHATS {
        let body = chat_body(
            &[("user", prose(bytes))],
            json!({ "max_tokens": max_tokens }),
        );
        let a = call(addr, req("POST", addr, "/v1/chat/completions", &[], &body)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        let (prompt, completion) = usage_of(&a.body, false)
            .unwrap_or_else(|| panic!("the answer reports its usage: {}", a.text()));
        expected.0 += prompt + max_tokens;
        expected.1 += prompt;
        expected.2 += completion;
    }
    // Its bound alone is larger than the window's whole budget: refused at once.
    let big = chat_body(
        &[("user", "hi".to_owned())],
        json!({ "max_tokens": 20_000 }),
    );
    call(addr, req("POST", addr, "/v1/chat/completions", &[], &big))
        .await
        .assert_error(413, "tokens_exceed_limit");
    let a = call(
        addr,
        req("POST", addr, "/v1/chat/completions", &[], PLAIN_CHAT),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        (budgeted.requests(), plain.requests()),
        (TOKEN_CHATS.len() as u64, 1),
        "the refused chat never reached the provider"
    );
    let (settled, prompt, completion) = expected;
    println!("sent {TOKEN_CHATS:?}: settled {settled}, prompt {prompt}, completion {completion}");

    // 3. The same card, updated from the stream: the figures /metrics has once the
    //    chats are settled (settlement may trail the answer's last byte by a moment).
    let (card, m) = until_card_shows_metrics(&c, metrics_addr, "the settled chats", |m| {
        m.settled == settled && m.too_large == 1
    })
    .await;
    println!("token card after the chats: {card:?}");
    println!("/metrics: {m:?}");
    assert_eq!(
        (m.prompt, m.completion),
        (prompt, completion),
        "the usage the answers reported: {m:#?}"
    );
    assert_eq!(
        (m.limit, m.ceiling, m.waiting),
        (TOKEN_LIMIT, TOKEN_LIMIT, 0),
        "{m:#?}"
    );
    // Every charge is still in the window, the refused chat's not at all.
    assert_eq!(m.remaining, TOKEN_LIMIT - settled, "{m:#?}");
    assert_eq!(card.limit(), Some(TOKEN_LIMIT), "{card:#?}");
    assert_eq!(card.remaining(), Some(TOKEN_LIMIT - settled), "{card:#?}");
    assert_eq!(card.charged(), Some(settled), "{card:#?}");
    assert_eq!(
        card.remaining_line.as_deref(),
        Some(
            format!(
                "{} of {TOKEN_LIMIT} tokens per 60 s window",
                TOKEN_LIMIT - settled
            )
            .as_str()
        ),
        "{card:#?}"
    );
    assert_eq!(card.settled(), Some(settled), "{card:#?}");
    assert_eq!(card.refused(), Some(1), "{card:#?}");
    assert!(
        card.fill()
            .is_some_and(|f| (f - settled as f64 / TOKEN_LIMIT as f64).abs() < 0.001),
        "the meter is charged ÷ limit: {card:#?}"
    );
    assert_eq!(
        card.detail.as_deref(),
        Some(format!("ceiling {TOKEN_LIMIT}").as_str()),
        "no stated limit, nothing waiting, no hold: {card:#?}"
    );
    // Each answer reported its usage: one estimate ÷ usage sample each.
    assert_eq!(m.ratio_count, TOKEN_CHATS.len() as u64, "{m:#?}");
    let mean = m.ratio_mean().expect("a mean over the answers with usage");
    assert!(
        card.ratio().is_some_and(|r| (r - mean).abs() <= 0.006),
        "the mean estimate ÷ usage is {mean:.3}: {card:#?}"
    );
    // The provider without a budget served its chat, and still has no token card.
    let card: TokenCard = poll(
        &c,
        READ_TOKEN_CARD,
        "the chat of the provider without a budget",
        DEADLINE,
        |v: &TokenCard| v.plain_total.as_deref() == Some("1"),
    )
    .await;
    only_nvidia_has_a_token_card(&card);

    // The provider without a budget has no `tokens` in the snapshot and no token
    // series in /metrics.
    let snap = snapshot_until(addr, "both providers", |v| {
        v["providers"].as_array().is_some_and(|p| p.len() == 2)
    })
    .await;
    for p in snap["providers"].as_array().expect("providers") {
        let has_tokens = p.get("tokens").is_some();
        assert_eq!(has_tokens, p["name"] == "nvidia", "{p:#}");
    }
    let text = metrics_text(metrics_addr).await;
    let plain_token_series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("sidecar_token") && l.contains(r#"provider="plain""#))
        .collect();
    assert!(plain_token_series.is_empty(), "{plain_token_series:#?}");

    // 4. A picture of the card (after the meter's transition).
    c.execute(
        "document.getElementById('token-budget-nvidia').scrollIntoView({block: 'center'});",
        vec![],
    )
    .await
    .expect("scroll to the token card");
    tokio::time::sleep(Duration::from_millis(400)).await;
    screenshot(&c, "dashboard-tokens.png").await;

    let log = browser_log(driver, &session).await;
    assert_no_console_errors("with a token budget", &log, |_| false);
    assert_ledger_at(addr, metrics_addr, sent_to(addr)).await;
    tokio::task::spawn_blocking(move || sidecar.stop())
        .await
        .expect("the sidecar stops");
    budgeted.stop();
    plain.stop();
}
