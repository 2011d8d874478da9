//! Response bodies of the simulated upstream, in the shapes OpenAI clients parse.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Either, Full, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::knobs::Knobs;
use super::stats::MockStats;
use crate::body::BoxError;

const WORDS: &[&str] = &[
    "The",
    " sidecar",
    " paces",
    " requests",
    " so",
    " the",
    " provider",
    " never",
    " has",
    " to",
    " refuse",
    " them",
    ".",
];

/// Body of every mock response: whole, or a stream fed by a task.
pub type MockBody = Either<Full<Bytes>, StreamBody<ReceiverStream<Result<Frame<Bytes>, BoxError>>>>;

/// What a streaming answer's task sends: a chunk, or the error that ends the body.
type Chunks = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// A streaming body and the sender its task feeds, holding at most `buffer` chunks.
fn channel(buffer: usize) -> (Chunks, MockBody) {
    let (tx, rx) = mpsc::channel(buffer);
    (tx, Either::Right(StreamBody::new(ReceiverStream::new(rx))))
}

/// A JSON answer with `status`; its body is `body`.
fn json_headers(status: StatusCode, body: MockBody) -> Response<MockBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(super) fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    json_headers(status, Either::Left(Full::new(Bytes::from(v.to_string()))))
}

pub fn error(status: StatusCode, message: &str) -> Response<MockBody> {
    json_response(
        status,
        &json!({"error": {"message": message, "type": "mock_error", "code": status.as_u16()}}),
    )
}

pub fn models() -> Response<MockBody> {
    let ids = [
        "meta/llama-3.1-8b-instruct",
        "meta/llama-3.1-70b-instruct",
        "nvidia/llama-3.1-nemotron-70b-instruct",
        "nvidia/nv-embedqa-e5-v5",
    ];
    let data: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": id.split('/').next()}))
        .collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn parse(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

pub async fn chat(stats: &MockStats, body: &[u8], knobs: &Knobs) -> Response<MockBody> {
    let req = match parse(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let model = req["model"]
        .as_str()
        .unwrap_or("meta/llama-3.1-8b-instruct")
        .to_owned();
    let id = format!("chatcmpl-mock-{:016x}", fastrand::u64(..));
    if req["stream"].as_bool() == Some(true) {
        stats.streams.fetch_add(1, Ordering::Relaxed);
        return stream(id, model, knobs.clone());
    }
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    let content: String = (0..knobs.tokens).map(|i| WORDS[i % WORDS.len()]).collect();
    let answer = json!({
            "id": id,
            "object": "chat.completion",
            "created": now_secs(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": body.len() / 4,
                "completion_tokens": knobs.tokens,
                "total_tokens": body.len() / 4 + knobs.tokens
            }
    });
    match knobs.reset_after {
        Some(_) => cut_short(&answer),
        None => json_response(StatusCode::OK, &answer),
    }
}

/// `v` as a 200 with its declared length, but the connection resets halfway.
fn cut_short(v: &Value) -> Response<MockBody> {
    let full = Bytes::from(v.to_string());
    let (tx, body) = channel(2);
    let mut resp = json_headers(StatusCode::OK, body);
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(full.len()));
    let half = full.slice(..full.len() / 2);
    tokio::task::spawn_local(async move {
        let _ = tx.send(Ok(Frame::data(half))).await;
        reset(&tx, "simulated reset mid-body").await;
    });
    resp
}

fn chunk(id: &str, model: &str, created: u64, delta: Value, finish: Option<&str>) -> Bytes {
    let v = json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]
    });
    Bytes::from(format!("data: {v}\n\n"))
}

/// An SSE completion: role chunk, one chunk per token, a final chunk, `[DONE]`.
fn stream(id: String, model: String, knobs: Knobs) -> Response<MockBody> {
    let (tx, body) = channel(4);
    tokio::task::spawn_local(async move {
        let created = now_secs();
        let mut frames = Vec::with_capacity(knobs.tokens + 3);
        frames.push(chunk(
            &id,
            &model,
            created,
            json!({"role": "assistant", "content": ""}),
            None,
        ));
        for i in 0..knobs.tokens {
            frames.push(chunk(
                &id,
                &model,
                created,
                json!({"content": WORDS[i % WORDS.len()]}),
                None,
            ));
        }
        frames.push(chunk(&id, &model, created, json!({}), Some("stop")));
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
        for (n, frame) in frames.into_iter().enumerate() {
            if knobs.reset_after == Some(n) {
                reset(&tx, "simulated reset mid-stream").await;
                return;
            }
            let wait = if n == 0 {
                knobs.latency
            } else if n <= knobs.tokens {
                knobs.token_delay
            } else {
                Duration::ZERO
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if tx.send(Ok(Frame::data(frame))).await.is_err() {
                return; // client gone
            }
        }
    });
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

pub async fn embeddings(body: &[u8], knobs: &Knobs) -> Response<MockBody> {
    let req = match parse(body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or an array of strings",
            )
        }
    };
    if !knobs.latency.is_zero() {
        tokio::time::sleep(knobs.latency).await;
    }
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            // Deterministic vector from the text, so equal inputs embed equally.
            let mut seed = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let v: Vec<f64> = (0..64)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    ((seed % 2000) as f64 / 1000.0) - 1.0
                })
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": req["model"].as_str().unwrap_or("nvidia/nv-embedqa-e5-v5"),
            "usage": {"prompt_tokens": body.len() / 4, "total_tokens": body.len() / 4}
        }),
    )
}

/// Fails the body after what was sent has left: hyper discards unflushed output when a
/// body fails, and it flushes while the body is pending.
async fn reset(tx: &Chunks, why: &'static str) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = tx.send(Err(why.into())).await;
}
