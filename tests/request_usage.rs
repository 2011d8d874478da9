//! `request_usage`: the sidecar asks a stream for its usage chunk on the client's
//! behalf, so the token budget settles at what the provider counted, and the client
//! gets the stream it asked for: the extra chunk cut out, its own kept when it asked.
//! A model that refuses the field (400) is sent the request as the client wrote it and
//! is not asked again.

mod common;

use bytes::Bytes;
use common::{stack, unlimited_mock};
use http_body_util::BodyExt;
use nvidia_sidecar::config::TokenCharge;
use nvidia_sidecar::mock::MockConfig;

const SETTINGS: &[(&str, &str)] = &[
    ("SIDECAR_TOKENS_PER_MINUTE", "600000"),
    ("SIDECAR_REQUEST_USAGE", "true"),
    ("SIDECAR_TOKEN_CHARGE", "actual"),
];

fn chat(model: &str, extra: &str) -> String {
    format!(
        r#"{{"model":"{model}","stream":true,{extra}"messages":[{{"role":"user","content":"hello"}}],"max_tokens":40}}"#
    )
}

/// The whole streamed answer to `body`.
async fn stream(s: &common::Stack, body: &str) -> String {
    let resp = s.open_chat(&[], body).await;
    let bytes: Bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[tokio::test]
async fn the_usage_chunk_asked_for_the_client_is_cut_and_one_it_asked_for_is_kept() {
    let s = stack(
        MockConfig {
            token_charge: TokenCharge::Actual,
            ..unlimited_mock()
        },
        SETTINGS,
    );
    let plain = stream(&s, &chat("m", "")).await;
    assert!(plain.ends_with("data: [DONE]\n\n"), "{plain}");
    assert!(
        !plain.contains("\"choices\":[]") && !plain.contains("prompt_tokens"),
        "the client did not ask for usage: {plain}"
    );
    let asked = stream(
        &s,
        &chat("m", r#""stream_options":{"include_usage":true},"#),
    )
    .await;
    assert!(
        asked.contains("\"choices\":[]") && asked.contains("prompt_tokens"),
        "the client asked for usage: {asked}"
    );
    // Both were settled from the provider's own count (actual charge): what the mock
    // charged is what the sidecar settled.
    let charged = s.mock.tokens_total();
    assert!(charged > 0);
    let metrics = s.scrape().await;
    let settled = common::sample(
        &metrics,
        "sidecar_tokens_total{provider=\"nvidia\",kind=\"settled\"}",
    );
    assert_eq!(settled, Some(charged as f64), "{metrics}");
    s.stop();
}

#[tokio::test]
async fn a_model_that_refuses_the_field_is_sent_the_request_as_written_and_remembered() {
    let s = stack(
        MockConfig {
            refuse_include_usage: vec!["picky".into()],
            ..unlimited_mock()
        },
        SETTINGS,
    );
    for round in 0..3 {
        let text = stream(&s, &chat("picky", "")).await;
        assert!(text.ends_with("data: [DONE]\n\n"), "round {round}: {text}");
    }
    assert_eq!(
        s.mock.stream_options_refused(),
        1,
        "one 400, then the model is not asked again"
    );
    // Another model is still asked.
    let other = stream(&s, &chat("fine", "")).await;
    assert!(!other.contains("prompt_tokens"), "{other}");
    assert_eq!(s.mock.stream_options_refused(), 1);
    s.stop();
}
