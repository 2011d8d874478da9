//! What a 429 about tokens says in its message (OpenAI's): "Rate limit reached for M in
//! organization O on tokens per min (TPM): Limit 30000, Used 29000, Requested 2000.
//! Please try again in 2s." gives the limit per minute, the used and requested counts
//! and the wait; "Request too large for M … on tokens per min (TPM): Limit 30000,
//! Requested 36055" is a request that never fits, whatever the wait. Figures are read
//! only from a per-minute message (a TPD message's limit is per day); the wait from any.

use std::time::Duration;

use memchr::memmem;

use super::{labelled_count, lowered, try_again, Refusal};

/// OpenAI's message for a request larger than the whole per-minute budget.
pub(super) const TOO_LARGE: &[u8] = b"request too large";

/// The figures of a 429 about tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenRefusal {
    /// "Limit 30000" of a tokens-per-minute message.
    pub limit_tpm: Option<u64>,
    /// "Used 29000".
    pub used: Option<u64>,
    /// "Requested 2000".
    pub requested: Option<u64>,
    /// "Request too large": it never fits; waiting does not help.
    pub too_large: bool,
    /// "Please try again in 2s".
    pub try_again: Option<Duration>,
}

/// The figures of a 429 about tokens (`refusal` as [`super::classify`] told it; `None`
/// for any other answer). Only the first [`super::SCAN_LIMIT`] bytes of `body` are read.
pub fn token_refusal(refusal: Option<Refusal>, body: &[u8]) -> Option<TokenRefusal> {
    if refusal != Some(Refusal::Tokens) {
        return None;
    }
    let text = lowered(body);
    let per_minute = memmem::find(&text, b"tokens per min").is_some();
    let figure = |label: &[u8]| per_minute.then(|| labelled_count(&text, label)).flatten();
    Some(TokenRefusal {
        limit_tpm: figure(b"limit ").filter(|&n| n > 0),
        used: figure(b"used "),
        requested: figure(b"requested "),
        too_large: memmem::find(&text, TOO_LARGE).is_some(),
        try_again: try_again(&text),
    })
}

#[cfg(all(test, not(sidecar_loom)))]
mod tests {
    use http::{HeaderMap, StatusCode};

    use super::super::classify;
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
}
