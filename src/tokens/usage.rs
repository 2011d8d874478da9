//! The tokens a provider says it counted: the `usage` of a JSON answer ([`from_json`]),
//! or of one event of a stream (read by [`super::sse`]).
//!
//! Chat and completions answers carry `usage.{prompt_tokens, completion_tokens,
//! total_tokens}`; the Responses API `usage.{input_tokens, output_tokens, total_tokens}`,
//! at the top of an answer or under `response` in its stream events
//! (`response.completed`). A missing figure is derived from the other two where it can
//! be (embeddings give no completion); `usage: null`, `{}` or figures of the wrong type
//! are no usage. Only the top level is searched: a `usage` inside a message's text is
//! not the provider's. A body cut short or broken after its `usage` still gives it.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess};

use super::json::{field_names, Lenient, Scalar, ValueReader};

/// Token counts of one answer, as the provider reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// `prompt_tokens` / `input_tokens`.
    pub prompt: u64,
    /// `completion_tokens` / `output_tokens`.
    pub completion: u64,
    /// `total_tokens`, else the sum of the other two.
    pub total: u64,
}

impl Usage {
    /// From the figures given; `None` when there are none. Only a total: prompt and
    /// completion 0 (so nothing is learned from it).
    fn from_figures(
        prompt: Option<u64>,
        completion: Option<u64>,
        total: Option<u64>,
    ) -> Option<Self> {
        let (prompt, completion, total) = match (prompt, completion, total) {
            (None, None, None) => return None,
            (Some(p), Some(c), t) => (p, c, t.unwrap_or(p.saturating_add(c))),
            (Some(p), None, t) => {
                let t = t.unwrap_or(p);
                (p, t.saturating_sub(p), t)
            }
            (None, Some(c), Some(t)) => (t.saturating_sub(c), c, t),
            (None, Some(c), None) => (0, c, c),
            (None, None, Some(t)) => (0, 0, t),
        };
        Some(Usage {
            prompt,
            completion,
            total,
        })
    }
}

/// The `usage` of a whole JSON answer body.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    read_answer(body).usage
}

/// What an answer or stream chunk says about usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Answer {
    pub usage: Option<Usage>,
    /// How many `choices` it has, when that is an array.
    pub choices: Option<u64>,
}

/// Reads an answer's top level; what was found before an error is kept.
pub(super) fn read_answer(body: &[u8]) -> Answer {
    let mut top = Top::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = Lenient(&mut top).deserialize(&mut de);
    Answer {
        usage: top.usage.or(top.response_usage),
        choices: top.choices,
    }
}

field_names! {
    AnswerField { Usage = "usage", Choices = "choices", Response = "response" }
}

#[derive(Debug, Default)]
struct Top {
    usage: Option<Usage>,
    response_usage: Option<Usage>,
    choices: Option<u64>,
}

impl<'de> ValueReader<'de> for &mut Top {
    type Value = ();

    fn fallback(self) {}

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(field) = map.next_key::<AnswerField>()? {
            match field {
                AnswerField::Usage => self.usage = map.next_value_seed(Lenient(UsageReader))?,
                AnswerField::Choices => self.choices = map.next_value_seed(Lenient(Choices))?,
                AnswerField::Response => {
                    self.response_usage = map.next_value_seed(Lenient(Response))?
                }
                AnswerField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A Responses stream event's `response`: its `usage`.
struct Response;

field_names! {
    ResponseField { Usage = "usage" }
}

impl<'de> ValueReader<'de> for Response {
    type Value = Option<Usage>;

    fn fallback(self) -> Option<Usage> {
        None
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Usage>, A::Error> {
        let mut usage = None;
        while let Some(field) = map.next_key::<ResponseField>()? {
            match field {
                ResponseField::Usage => usage = map.next_value_seed(Lenient(UsageReader))?,
                ResponseField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(usage)
    }
}

/// `choices`: how many, when it is an array.
struct Choices;

impl<'de> ValueReader<'de> for Choices {
    type Value = Option<u64>;

    fn fallback(self) -> Option<u64> {
        None
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<u64>, A::Error> {
        let mut n = 0u64;
        while seq.next_element::<de::IgnoredAny>()?.is_some() {
            n += 1;
        }
        Ok(Some(n))
    }
}

field_names! {
    UsageField {
        Prompt = "prompt_tokens" | "input_tokens",
        Completion = "completion_tokens" | "output_tokens",
        Total = "total_tokens",
    }
}

/// A `usage` object.
struct UsageReader;

impl<'de> ValueReader<'de> for UsageReader {
    type Value = Option<Usage>;

    fn fallback(self) -> Option<Usage> {
        None
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Usage>, A::Error> {
        let (mut prompt, mut completion, mut total) = (None, None, None);
        while let Some(field) = map.next_key::<UsageField>()? {
            match field {
                UsageField::Prompt => prompt = map.next_value::<Scalar<'_>>()?.count(),
                UsageField::Completion => completion = map.next_value::<Scalar<'_>>()?.count(),
                UsageField::Total => total = map.next_value::<Scalar<'_>>()?.count(),
                UsageField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(Usage::from_figures(prompt, completion, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(p: u64, c: u64, t: u64) -> Option<Usage> {
        Some(Usage {
            prompt: p,
            completion: c,
            total: t,
        })
    }

    #[test]
    fn chat_answer_usage_is_read_past_the_choices() {
        let body = br#"{"id":"x","object":"chat.completion","choices":[{"index":0,
            "message":{"role":"assistant","content":"{\"usage\":{\"prompt_tokens\":1}}"}}],
            "usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,
            "prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(from_json(body), usage(19, 10, 29));
        assert_eq!(read_answer(body).choices, Some(1));
    }

    #[test]
    fn responses_answer_and_stream_event_usage_use_input_and_output_tokens() {
        let answer = br#"{"object":"response","output":[],
            "usage":{"input_tokens":36,"output_tokens":87,"total_tokens":123}}"#;
        assert_eq!(from_json(answer), usage(36, 87, 123));
        let event = br#"{"type":"response.completed","response":{"id":"r","status":"completed",
            "usage":{"input_tokens":5,"output_tokens":7,"total_tokens":12}}}"#;
        assert_eq!(from_json(event), usage(5, 7, 12));
        let created = br#"{"type":"response.created","response":{"usage":null}}"#;
        assert_eq!(from_json(created), None);
    }

    #[test]
    fn missing_figures_are_derived_from_the_others() {
        let read = |s: &str| from_json(s.as_bytes());
        // Embeddings: no completion.
        assert_eq!(
            read(r#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#),
            usage(8, 0, 8)
        );
        assert_eq!(
            read(r#"{"usage":{"prompt_tokens":8,"completion_tokens":2}}"#),
            usage(8, 2, 10)
        );
        assert_eq!(
            read(r#"{"usage":{"completion_tokens":2,"total_tokens":9}}"#),
            usage(7, 2, 9)
        );
        assert_eq!(read(r#"{"usage":{"completion_tokens":2}}"#), usage(0, 2, 2));
        assert_eq!(read(r#"{"usage":{"total_tokens":9}}"#), usage(0, 0, 9));
        assert_eq!(read(r#"{"usage":{"prompt_tokens":3}}"#), usage(3, 0, 3));
    }

    #[test]
    fn null_empty_or_mistyped_usage_is_no_usage() {
        for body in [
            r#"{"usage":null}"#,
            r#"{"usage":{}}"#,
            r#"{"usage":{"prompt_tokens":"12","completion_tokens":-1}}"#,
            r#"{"usage":[1,2,3]}"#,
            r#"{"choices":[{"usage":{"prompt_tokens":1}}]}"#,
            r#"{"error":{"message":"rate limited","type":"requests"}}"#,
            r#"[{"usage":{"prompt_tokens":1}}]"#,
            "not json",
            "",
        ] {
            assert_eq!(from_json(body.as_bytes()), None, "{body}");
        }
    }

    #[test]
    fn usage_before_a_break_in_the_body_is_kept() {
        let cut = br#"{"usage":{"prompt_tokens":4,"completion_tokens":1},"choices":[{"mess"#;
        assert_eq!(from_json(cut), usage(4, 1, 5));
        let trailing = br#"{"usage":{"prompt_tokens":4,"completion_tokens":1}} trailing"#;
        assert_eq!(from_json(trailing), usage(4, 1, 5));
        let half = br#"{"usage":{"prompt_tokens":4,"compl"#;
        assert_eq!(from_json(half), None);
    }

    #[test]
    fn top_level_usage_wins_over_a_nested_response_one() {
        let body = br#"{"response":{"usage":{"input_tokens":1,"output_tokens":1}},
            "usage":{"prompt_tokens":2,"completion_tokens":2}}"#;
        assert_eq!(from_json(body), usage(2, 2, 4));
    }
}
