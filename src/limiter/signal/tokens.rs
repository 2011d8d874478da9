//! Tests of reading a 429 about tokens ([`super::token_refusal`]).

use http::{HeaderMap, StatusCode};

use super::*;

const TPM: &str = r#"{"error":{"message":"Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 2s.","type":"tokens","param":null,"code":"rate_limit_exceeded"}}"#;
const TOO_LARGE_BODY: &str = r#"{"error":{"message":"Request too large for gpt-4 in organization org-x on tokens per min (TPM): Limit 10000, Requested 36055. The input or output tokens must be reduced in order to run successfully.","type":"tokens","code":"rate_limit_exceeded"}}"#;

fn read(body: &str) -> Option<TokenRefusal> {
    let r = classify(
        StatusCode::TOO_MANY_REQUESTS,
        &HeaderMap::new(),
        body.as_bytes(),
    );
    token_refusal(r, body.as_bytes())
}

#[test]
fn a_tpm_message_gives_its_limit_used_requested_and_wait() {
    assert_eq!(
        read(TPM),
        Some(TokenRefusal {
            limit_tpm: Some(30_000),
            used: Some(29_000),
            requested: Some(2_000),
            too_large: false,
            try_again: Some(Duration::from_secs(2)),
        })
    );
}

#[test]
fn request_too_large_is_a_token_refusal_that_never_fits() {
    let r = read(TOO_LARGE_BODY).unwrap();
    assert!(r.too_large);
    assert_eq!((r.limit_tpm, r.requested), (Some(10_000), Some(36_055)));
    // Even without `type` or the TPM phrase, the words alone name tokens.
    let bare = r#"{"error":{"message":"Request too large for model m"}}"#;
    assert!(read(bare).is_some_and(|r| r.too_large && r.limit_tpm.is_none()));
}

#[test]
fn a_per_day_message_gives_only_its_wait_and_a_request_429_nothing() {
    let tpd = r#"{"error":{"message":"Rate limit reached on tokens per day (TPD): Limit 900000, Used 899000, Requested 2000. Please try again in 1m30s.","type":"tokens"}}"#;
    let r = read(tpd).unwrap();
    assert_eq!((r.limit_tpm, r.used), (None, None));
    assert_eq!(r.try_again, Some(Duration::from_secs(90)));
    let rpm = r#"{"error":{"message":"Rate limit reached on requests per min (RPM): Limit 60, Used 60, Requested 1.","type":"requests"}}"#;
    assert_eq!(read(rpm), None);
    assert_eq!(read(r#"{"status":429,"title":"Too Many Requests"}"#), None);
}
