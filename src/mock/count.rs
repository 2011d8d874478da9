//! How the simulated provider counts a request's tokens: its own rule, deliberately not
//! the sidecar's estimate, so the sidecar's token pacing is judged against a count it
//! cannot read off its own code.
//!
//! **Prompt tokens** are counted from the text fields of the JSON body, never its raw
//! bytes: each text field is `ceil(bytes / 4)` tokens, where the text fields are a
//! message's `content` when it is a string, each `"type": "text"` part's `text` when it is
//! a list, and the top-level `input` and `prompt` (a string, a list of strings, or lists of
//! token ids, which count one each); every message in `messages` adds 3, and every image
//! part (`"type": "image_url"`) is 85 tokens whatever its size (OpenAI's low-detail
//! figure), so a `data:` URL is never counted as text. Names, roles, tools and every other
//! field count nothing. A body that is not JSON counts 0.
//!
//! **Completion tokens** are the tokens the mock actually generates: its token knob
//! (`--tokens`, `x-mock-tokens`) per choice, capped by `max_completion_tokens` (else
//! `max_tokens`), times `n` (1 to 128). The **bound** a `reserved` charge counts on
//! arrival is `n × (max_completion_tokens or max_tokens)`, or `n ×` the knob when the
//! request states neither (the model's own cap). Only chat completions generate.

use serde_json::Value;

/// Tokens of an image part, whatever its size or detail.
pub const IMAGE_TOKENS: u64 = 85;

/// Tokens each message adds for its framing.
pub const PER_MESSAGE: u64 = 3;

/// The most choices (`n`) a request gets.
pub const MAX_CHOICES: u64 = 128;

/// What the mock reads of a request body: its prompt count and what shapes the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub prompt: u64,
    /// `max_completion_tokens`, else `max_tokens`: the cap of each choice.
    pub max_completion: Option<u64>,
    /// Choices asked for (`n`), 1 to [`MAX_CHOICES`].
    pub n: u64,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// The body has `stream_options` at all (some models refuse the field).
    pub has_stream_options: bool,
}

impl Default for Ask {
    fn default() -> Self {
        Self {
            prompt: 0,
            max_completion: None,
            n: 1,
            include_usage: false,
            has_stream_options: false,
        }
    }
}

impl Ask {
    /// Reads a parsed request body.
    pub fn read(v: &Value) -> Self {
        let max_completion = ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_u64));
        let options = v.get("stream_options");
        Self {
            prompt: prompt_tokens(v),
            max_completion,
            n: v.get("n")
                .and_then(Value::as_u64)
                .map_or(1, |n| n.clamp(1, MAX_CHOICES)),
            include_usage: options
                .and_then(|o| o.get("include_usage"))
                .and_then(Value::as_bool)
                == Some(true),
            has_stream_options: options.is_some(),
        }
    }

    /// Tokens generated per choice when the knob says `knob`.
    pub fn per_choice(&self, knob: usize) -> u64 {
        let knob = knob as u64;
        self.max_completion.map_or(knob, |cap| cap.min(knob))
    }

    /// Whether `max_tokens` cut the answer short (`finish_reason: "length"`).
    pub fn capped(&self, knob: usize) -> bool {
        self.per_choice(knob) < knob as u64
    }

    /// The completion a `reserved` charge counts: `n ×` the stated cap, else the knob.
    pub fn bound(&self, knob: usize) -> u64 {
        self.n
            .saturating_mul(self.max_completion.unwrap_or(knob as u64))
    }
}

/// `ceil(bytes / 4)`: one text field's tokens.
pub fn text_tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4)
}

/// The prompt tokens of a request body (see the module doc).
pub fn prompt_tokens(v: &Value) -> u64 {
    let messages = v.get("messages").and_then(Value::as_array).map_or(0, |ms| {
        ms.iter()
            .map(|m| PER_MESSAGE.saturating_add(content_tokens(m.get("content"))))
            .fold(0, u64::saturating_add)
    });
    ["input", "prompt"]
        .iter()
        .map(|k| v.get(k).map_or(0, input_tokens))
        .fold(messages, u64::saturating_add)
}

/// A message's `content`: a string, or a list of parts.
fn content_tokens(content: Option<&Value>) -> u64 {
    match content {
        Some(Value::String(s)) => text_tokens(s),
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).map_or(0, text_tokens),
                Some("image_url") => IMAGE_TOKENS,
                _ => 0,
            })
            .fold(0, u64::saturating_add),
        _ => 0,
    }
}

/// `input` or `prompt`: a string, token ids, or a list of either.
fn input_tokens(v: &Value) -> u64 {
    match v {
        Value::String(s) => text_tokens(s),
        Value::Number(_) => 1,
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::Array(ids) => ids.iter().filter(|t| t.is_number()).count() as u64,
                other => input_tokens(other),
            })
            .fold(0, u64::saturating_add),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn messages_count_their_text_by_bytes_over_four_plus_three_each() {
        let v = json!({"model": "m", "messages": [
            {"role": "system", "content": "12345678"},              // 2 + 3
            {"role": "user", "content": "hello"},                   // 2 + 3
            {"role": "assistant", "content": null, "name": "long name"}, // 0 + 3
        ]});
        assert_eq!(prompt_tokens(&v), 13);
    }

    #[test]
    fn content_parts_count_text_and_images_by_their_own_rule() {
        let data_url = format!("data:image/png;base64,{}", "A".repeat(40_000));
        let v = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},          // 3
            {"type": "image_url", "image_url": {"url": data_url}}, // 85
            {"type": "input_audio", "input_audio": {"data": "xx"}}, // 0
        ]}]});
        assert_eq!(prompt_tokens(&v), 3 + 3 + IMAGE_TOKENS);
    }

    #[test]
    fn input_and_prompt_count_strings_lists_and_token_ids() {
        assert_eq!(prompt_tokens(&json!({"input": "abcde"})), 2);
        assert_eq!(prompt_tokens(&json!({"input": ["abcd", "abcde", ""]})), 3);
        assert_eq!(prompt_tokens(&json!({"input": [1, 2, 3]})), 3);
        assert_eq!(prompt_tokens(&json!({"input": [[1, 2], [3]]})), 3);
        assert_eq!(prompt_tokens(&json!({"prompt": "abcdefghi"})), 3);
        assert_eq!(prompt_tokens(&json!({"model": "m"})), 0);
        assert_eq!(prompt_tokens(&json!("just a string")), 0);
    }

    #[test]
    fn completion_is_the_knob_capped_by_max_tokens_times_n() {
        let a = Ask::read(&json!({"max_tokens": 5, "n": 3}));
        assert_eq!((a.per_choice(16), a.capped(16), a.bound(16)), (5, true, 15));
        assert_eq!((a.per_choice(4), a.capped(4)), (4, false));
        let a = Ask::read(&json!({"max_completion_tokens": 7, "max_tokens": 100}));
        assert_eq!(a.max_completion, Some(7), "the newer field wins");
        let a = Ask::read(&json!({}));
        assert_eq!((a.n, a.per_choice(16), a.bound(16)), (1, 16, 16));
        assert_eq!(Ask::read(&json!({"n": 0})).n, 1);
        assert_eq!(Ask::read(&json!({"n": 1000})).n, MAX_CHOICES);
    }

    #[test]
    fn stream_options_are_read_as_openai_states_them() {
        let a = Ask::read(&json!({"stream": true, "stream_options": {"include_usage": true}}));
        assert!(a.include_usage && a.has_stream_options);
        let a = Ask::read(&json!({"stream_options": {"include_usage": false}}));
        assert!(!a.include_usage && a.has_stream_options);
        let a = Ask::read(&json!({"stream": true}));
        assert!(!a.include_usage && !a.has_stream_options);
    }
}
