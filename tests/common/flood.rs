//! Closed-loop clients for token pacing: each one sends a chat, reads its answer whole
//! and sends the next, until told to stop, when it finishes the one it has going (so no
//! request is cut off and every answer's usage is counted). Each request is drawn from a
//! seeded mix of short and long prompts and completion bounds; the tally keeps the
//! statuses and what the answers' `usage` reported, as the provider counted it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use serde_json::json;
use tokio::task::JoinHandle;

use super::{req, send};

/// One chat to send: its body, its extra headers, and what the tally needs to know of it.
#[derive(Debug, Clone)]
pub struct Chat {
    pub body: String,
    pub headers: Vec<(String, String)>,
    /// `"stream": true` with `stream_options.include_usage`: the usage is the last chunk's.
    pub stream: bool,
    /// The completion bound the body states (`max_tokens`), `None` when it states none.
    pub max_tokens: Option<u64>,
}

/// A prompt text of exactly `bytes` ASCII bytes.
pub fn prose(bytes: usize) -> String {
    const TEXT: &str = "The quick brown fox jumps over the lazy dog while the sidecar \
                        paces every request to the provider's limits. ";
    TEXT.chars().cycle().take(bytes).collect()
}

/// A chat completion body: `messages` as `(role, content)`, then the other fields.
pub fn chat_body(messages: &[(&str, String)], extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({
        "model": "meta/llama-3.1-8b-instruct",
        "messages": messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect::<Vec<_>>(),
    });
    if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v.to_string()
}

/// What the clients were answered, and the usage the answers reported.
#[derive(Debug, Default)]
pub struct Tally {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub too_many: AtomicU64,
    /// Any other status, or no answer at all.
    pub other: AtomicU64,
    /// `usage.prompt_tokens` summed over the 200 answers.
    pub prompt: AtomicU64,
    /// `usage.completion_tokens` summed over the 200 answers.
    pub completion: AtomicU64,
    /// Each 200 answer's completion bound: `max_tokens`, else the model's own cap.
    pub bound: AtomicU64,
    /// 200 answers without a readable `usage`.
    pub without_usage: AtomicU64,
}

impl Tally {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn summary(&self) -> String {
        format!(
            "clients: {} sent, {} ok, {} 429, {} other/unanswered; usage of the 200s: \
             {} prompt + {} completion tokens ({} answers without usage)",
            Self::get(&self.sent),
            Self::get(&self.ok),
            Self::get(&self.too_many),
            Self::get(&self.other),
            Self::get(&self.prompt),
            Self::get(&self.completion),
            Self::get(&self.without_usage),
        )
    }
}

/// `usage.prompt_tokens` and `usage.completion_tokens` of an answer: the JSON body's, or
/// a stream's chunk that carries a `usage` object.
pub fn usage_of(body: &[u8], stream: bool) -> Option<(u64, u64)> {
    let read = |v: &serde_json::Value| {
        let u = v.get("usage")?;
        Some((
            u.get("prompt_tokens")?.as_u64()?,
            u.get("completion_tokens")?.as_u64()?,
        ))
    };
    if !stream {
        return read(&serde_json::from_slice(body).ok()?);
    }
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .find_map(|v| read(&v))
}

/// Clients sending chats one after another, each on a fresh connection.
pub struct Flood {
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<()>>,
    pub tally: Arc<Tally>,
}

/// Starts `clients` closed-loop clients at the sidecar at `addr`; client `i` draws its
/// chats with `draw` from a generator seeded `seed + i`. `cap` is the model's own
/// completion cap, the bound of a chat that states none.
pub fn flood(
    addr: SocketAddr,
    clients: usize,
    seed: u64,
    cap: u64,
    draw: fn(&mut fastrand::Rng) -> Chat,
) -> Flood {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let clients = (0..clients as u64)
        .map(|i| {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(seed + i);
                while !stop.load(Ordering::Relaxed) {
                    one_chat(addr, &draw(&mut rng), cap, &tally).await;
                }
            })
        })
        .collect();
    Flood {
        stop,
        clients,
        tally,
    }
}

impl Flood {
    /// Stops sending and waits (at most `bound`) for each client's last answer.
    pub async fn stop(self, bound: Duration) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        let all = join_all(self.clients);
        tokio::time::timeout(bound, all)
            .await
            .unwrap_or_else(|_| panic!("the clients' last answers did not come within {bound:?}"));
        self.tally
    }
}

async fn join_all(clients: Vec<JoinHandle<()>>) {
    for c in clients {
        c.await.expect("a client ran");
    }
}

/// Sends `chat` and reads its answer whole, into `tally`.
pub async fn one_chat(addr: SocketAddr, chat: &Chat, cap: u64, tally: &Tally) -> u16 {
    let headers: Vec<(&str, &str)> = chat
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    tally.sent.fetch_add(1, Ordering::Relaxed);
    let answer = async {
        let resp = send(
            addr,
            req("POST", addr, "/v1/chat/completions", &headers, &chat.body),
        )
        .await
        .ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body))
    }
    .await;
    let add = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
    match answer {
        Some((200, body)) => {
            add(&tally.ok, 1);
            match usage_of(&body, chat.stream) {
                Some((p, c)) => {
                    add(&tally.prompt, p);
                    add(&tally.completion, c);
                    add(&tally.bound, chat.max_tokens.unwrap_or(cap));
                }
                None => {
                    add(&tally.without_usage, 1);
                }
            }
            200
        }
        Some((429, _)) => {
            add(&tally.too_many, 1);
            429
        }
        Some((status, _)) => {
            add(&tally.other, 1);
            status
        }
        None => {
            add(&tally.other, 1);
            0
        }
    }
}

/// A chat of the flood's mix, as the provider counts it (prompt = bytes ÷ 4 + 3 per
/// message; completion bound = `max_tokens`, else the model's cap), about 585 tokens on
/// average:
///
/// - 40 % short: one message of 20 to 200 bytes, `max_tokens` 16 to 64 (about 80);
/// - 30 % medium: a system and a user message, 400 to 1,600 bytes, `max_tokens` 128 to
///   512 (about 570);
/// - 15 % long: three messages, 2,000 to 6,000 bytes, `max_tokens` 512 to 1,500 (about
///   2,000, at most 3,010: a quarter of the window);
/// - 15 % without `max_tokens` (the default bound applies): 100 to 2,000 bytes.
///
/// One in ten is streamed with `stream_options.include_usage`. A chat that states
/// `max_tokens` asks the mock to generate 8 to 600 tokens (`x-mock-tokens`), so under
/// `actual` many leave part of their bound unused; one that states none generates the
/// model's cap, which is what a `reserved` provider charges it.
pub fn mixed_chat(rng: &mut fastrand::Rng) -> Chat {
    let kind = rng.u32(0..100);
    let (messages, max_tokens): (Vec<(&str, String)>, Option<u64>) = match kind {
        0..40 => (
            vec![("user", prose(rng.usize(20..=200)))],
            Some(rng.u64(16..=64)),
        ),
        40..70 => (
            vec![
                ("system", prose(rng.usize(100..=400))),
                ("user", prose(rng.usize(300..=1200))),
            ],
            Some(rng.u64(128..=512)),
        ),
        70..85 => (
            vec![
                ("system", prose(rng.usize(200..=600))),
                ("user", prose(rng.usize(1600..=4400))),
                ("assistant", prose(rng.usize(200..=1000))),
            ],
            Some(rng.u64(512..=1500)),
        ),
        _ => {
            let mut m = vec![("user", prose(rng.usize(100..=1500)))];
            if rng.bool() {
                m.insert(0, ("system", prose(rng.usize(0..=500))));
            }
            (m, None)
        }
    };
    let stream = rng.u32(0..10) == 0;
    let mut extra = serde_json::Map::new();
    if let Some(m) = max_tokens {
        extra.insert("max_tokens".into(), json!(m));
    }
    if stream {
        extra.insert("stream".into(), json!(true));
        extra.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let mut headers = Vec::new();
    if max_tokens.is_some() {
        headers.push(("x-mock-tokens".to_owned(), rng.u64(8..=600).to_string()));
    }
    Chat {
        body: chat_body(&messages, serde_json::Value::Object(extra)),
        headers,
        stream,
        max_tokens,
    }
}
