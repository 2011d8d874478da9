//! The token fields of an OpenAI-compatible request body, read in one pass.
//!
//! [`read`] walks the body with serde_json's borrowing deserializer and small lenient
//! readers: nothing is built but the counts, strings are measured where they lie (an
//! escaped one in serde_json's scratch buffer), and only the model name may be copied
//! (when it has escapes). It knows the four request shapes:
//!
//! - `/v1/chat/completions`: `messages`, each with `content` a string or parts
//!   (`{type:"text",text}`, `{type:"image_url",image_url:{url,detail}}`, audio, files);
//!   every other field of a message (`role`, `name`, `tool_calls`, `tool_call_id`) is
//!   text too, as are `tools`, `functions`, `tool_choice` and `response_format`.
//! - `/v1/completions`: `prompt` (and `suffix`); a string, strings, token ids, or arrays
//!   of token ids, each array element one prompt with its own choices.
//! - `/v1/embeddings`: `input`, the same shapes.
//! - `/v1/responses`: `instructions`, and `input` a string or items (messages with
//!   `input_text` / `input_image` / `input_file` parts, function calls and outputs).
//!
//! Text is the decoded UTF-8 of those strings. Images count by `detail`, never as
//! text; `data:` URLs anywhere are data, not text (as text, a 1 MB inline image would
//! reserve some 330,000 tokens, and a request that fits could be refused as larger
//! than the budget). Audio, video and file parts are counted in
//! [`TokenFields::media`] and nothing else: their cost depends on content the sidecar
//! does not decode, so settlement from `usage` is what corrects them. Token ids count
//! as tokens, exactly.
//!
//! A body that is not a JSON object, or names none of `messages`, `input`, `prompt`
//! and `instructions`, reads as [`Basis::BodyLength`]: its whole length counts as text
//! (the raw JSON is never shorter than the text it holds); so does one nested past
//! serde_json's 128 levels, which keeps the stack bounded. A field of an unexpected
//! type is counted as JSON text, never an error; nothing here panics.
//!
//! serde_json rather than simd-json: on a 957-byte chat body (callgrind, release) this
//! reader costs 11,800 instructions and no allocation but serde_json's unescape buffer
//! (2, for text with escapes), the same reader over simd-json 12,200 and 8 allocations
//! (7 KB) with the copy simd-json parses in place; simd-json's tape alone is 10,800.
//! Skipping everything but `model`, as routing does, is 7,900.

mod messages;
mod tally;

use std::borrow::Cow;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess};

use super::json::{field_names, json_map, Bytes, Json, Lenient, Num, Scalar, ValueReader};
use messages::{Message, Messages};
use tally::{Tally, Text};

pub use tally::Images;

/// Longest model name kept, in bytes (cut at a character boundary).
pub const MODEL_MAX: usize = 256;

/// What a [`TokenFields`] rests on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Basis {
    /// The body's prompt fields were read.
    #[default]
    Fields,
    /// The body is not a JSON object, or has no prompt field: [`TokenFields::text_bytes`]
    /// is the body's length and the other counts are zero (an object's model, bound,
    /// `n` and stream flags are still read).
    BodyLength,
}

/// The fields of a request body that decide its tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenFields<'a> {
    /// The top-level `model` string, cut to [`MODEL_MAX`] bytes; borrowed from the
    /// body unless it had escapes.
    pub model: Option<Cow<'a, str>>,
    /// Bytes of text in the prompt fields (decoded UTF-8), or the body's length.
    pub text_bytes: u64,
    /// Token ids given as numbers (`prompt`/`input` arrays): tokens, exactly.
    pub token_ids: u64,
    /// Messages (chat) or input items (responses): each adds the chat framing.
    pub messages: u32,
    /// Separate prompts of a completions request (`prompt` as an array of strings or
    /// of token-id arrays); each gets its own `n` choices. At least 1.
    pub prompts: u32,
    pub images: Images,
    /// Audio, video and file parts: counted here only (see the module doc).
    pub media: u32,
    /// Bytes of `data:` URLs and media payloads, counted as nothing.
    pub data_bytes: u64,
    /// `max_completion_tokens`, else `max_tokens`, else `max_output_tokens`.
    pub completion_bound: Option<u64>,
    /// `n`, at least 1.
    pub n: u32,
    /// `best_of` (completions), 0 when absent: the provider generates this many.
    pub best_of: u32,
    pub stream: bool,
    /// `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    pub basis: Basis,
}

impl TokenFields<'_> {
    /// The fields of a body that could not be read: all of it counts as text.
    pub fn from_length(len: usize) -> Self {
        TokenFields {
            text_bytes: len as u64,
            prompts: 1,
            n: 1,
            basis: Basis::BodyLength,
            ..TokenFields::default()
        }
    }
}

/// Reads the token fields of a request body; never fails (see the module doc).
pub fn read(body: &[u8]) -> TokenFields<'_> {
    let mut top = Top::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Lenient(&mut top).deserialize(&mut de).is_ok() && de.end().is_ok();
    if !(parsed && top.object) {
        return TokenFields::from_length(body.len());
    }
    let prompt_field = top.prompt_field;
    let fields = top.finish();
    if prompt_field {
        fields
    } else {
        // An unknown shape: its scalars hold, its text is all of it.
        TokenFields {
            model: fields.model,
            completion_bound: fields.completion_bound,
            n: fields.n,
            best_of: fields.best_of,
            stream: fields.stream,
            include_usage: fields.include_usage,
            ..TokenFields::from_length(body.len())
        }
    }
}

/// Cuts `s` to at most [`MODEL_MAX`] bytes, at a character boundary.
fn cut(s: Cow<'_, str>) -> Cow<'_, str> {
    if s.len() <= MODEL_MAX {
        return s;
    }
    let end = (0..=MODEL_MAX)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    match s {
        Cow::Borrowed(b) => Cow::Borrowed(&b[..end]),
        Cow::Owned(mut o) => {
            o.truncate(end);
            Cow::Owned(o)
        }
    }
}

// === The top level ===

field_names! {
    /// Top-level fields that hold tokens or bound them.
    TopField {
        Model = "model",
        Messages = "messages",
        Input = "input",
        Prompt = "prompt",
        Instructions = "instructions",
        Suffix = "suffix",
        Definitions = "tools" | "functions" | "tool_choice" | "function_call"
            | "response_format" | "text",
        MaxCompletionTokens = "max_completion_tokens",
        MaxTokens = "max_tokens",
        MaxOutputTokens = "max_output_tokens",
        N = "n",
        BestOf = "best_of",
        Stream = "stream",
        StreamOptions = "stream_options",
    }
}

#[derive(Debug, Default)]
struct Top<'a> {
    /// The body was an object (anything else reads as its length).
    object: bool,
    /// A prompt field was present (`messages`, `input`, `prompt`, `instructions`).
    prompt_field: bool,
    model: Option<Cow<'a, str>>,
    tally: Tally,
    prompts: Option<u32>,
    max_completion_tokens: Option<u64>,
    max_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    n: Option<u64>,
    best_of: Option<u64>,
    stream: bool,
    include_usage: bool,
}

impl<'a> Top<'a> {
    fn finish(self) -> TokenFields<'a> {
        let small = |v: Option<u64>| v.map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX));
        TokenFields {
            model: self.model,
            text_bytes: self.tally.bytes.text,
            token_ids: self.tally.ids,
            messages: self.tally.messages,
            prompts: self.prompts.unwrap_or(1).max(1),
            images: self.tally.images,
            media: self.tally.media,
            data_bytes: self.tally.bytes.data,
            completion_bound: self
                .max_completion_tokens
                .or(self.max_tokens)
                .or(self.max_output_tokens),
            n: small(self.n).max(1),
            best_of: small(self.best_of),
            stream: self.stream,
            include_usage: self.include_usage,
            basis: Basis::Fields,
        }
    }
}

impl<'de> ValueReader<'de> for &mut Top<'de> {
    type Value = ();

    fn fallback(self) {}

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.object = true;
        let tally = &mut self.tally;
        while let Some(field) = map.next_key::<TopField>()? {
            match field {
                TopField::Model => {
                    self.model = match map.next_value::<Scalar<'de>>()? {
                        Scalar::Str(s) => Some(cut(s)),
                        _ => None,
                    }
                }
                TopField::Messages => {
                    self.prompt_field = true;
                    map.next_value_seed(Lenient(Messages(tally)))?;
                }
                TopField::Input => {
                    self.prompt_field = true;
                    map.next_value_seed(Lenient(Input(tally)))?;
                }
                TopField::Prompt => {
                    self.prompt_field = true;
                    self.prompts = Some(map.next_value_seed(Lenient(Input(tally)))?);
                }
                TopField::Instructions => {
                    self.prompt_field = true;
                    map.next_value_seed(Lenient(Text(tally)))?;
                }
                TopField::Suffix => map.next_value_seed(Lenient(Text(tally)))?,
                TopField::Definitions => map.next_value_seed(Lenient(Json(&mut tally.bytes)))?,
                TopField::MaxCompletionTokens => {
                    self.max_completion_tokens = map.next_value::<Scalar<'_>>()?.count()
                }
                TopField::MaxTokens => self.max_tokens = map.next_value::<Scalar<'_>>()?.count(),
                TopField::MaxOutputTokens => {
                    self.max_output_tokens = map.next_value::<Scalar<'_>>()?.count()
                }
                TopField::N => self.n = map.next_value::<Scalar<'_>>()?.count(),
                TopField::BestOf => self.best_of = map.next_value::<Scalar<'_>>()?.count(),
                TopField::Stream => self.stream = map.next_value::<Scalar<'_>>()?.is_true(),
                TopField::StreamOptions => {
                    self.include_usage = map.next_value_seed(Lenient(StreamOptions))?
                }
                TopField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

field_names! {
    StreamOption { IncludeUsage = "include_usage" }
}

/// `stream_options`: whether `include_usage` is `true`.
struct StreamOptions;

impl<'de> ValueReader<'de> for StreamOptions {
    type Value = bool;

    fn fallback(self) -> bool {
        false
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut include = false;
        while let Some(field) = map.next_key::<StreamOption>()? {
            match field {
                StreamOption::IncludeUsage => include = map.next_value::<Scalar<'_>>()?.is_true(),
                StreamOption::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(include)
    }
}

// === Prompts and inputs ===

/// `prompt` and `input`: a string, an array of strings, token ids or arrays of token
/// ids, or (responses) an array of items. Gives how many separate prompts it held:
/// each string and each array is one, bare token ids together are one.
struct Input<'t>(&'t mut Tally);

impl<'de> ValueReader<'de> for Input<'_> {
    type Value = u32;

    fn fallback(self) -> u32 {
        1
    }

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<u32, E> {
        self.0.text(v);
        Ok(1)
    }

    fn number<E: de::Error>(self, _: Num) -> Result<u32, E> {
        self.0.id();
        Ok(1)
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u32, A::Error> {
        let (mut prompts, mut bare_ids) = (0u32, false);
        while let Some(item) = seq.next_element_seed(Lenient(Item(&mut *self.0)))? {
            match item {
                ItemShape::Prompt => prompts = prompts.saturating_add(1),
                ItemShape::Id => bare_ids = true,
                ItemShape::Other => {}
            }
        }
        Ok(prompts.saturating_add(u32::from(bare_ids)))
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<u32, A::Error> {
        Message(self.0).map(map)?;
        Ok(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ItemShape {
    /// A string or an array: a prompt of its own.
    Prompt,
    /// A bare token id.
    Id,
    /// An item object (responses) or something unexpected.
    Other,
}

/// One element of `prompt` / `input`.
struct Item<'t>(&'t mut Tally);

impl<'de> ValueReader<'de> for Item<'_> {
    type Value = ItemShape;

    fn fallback(self) -> ItemShape {
        ItemShape::Other
    }

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<ItemShape, E> {
        self.0.text(v);
        Ok(ItemShape::Prompt)
    }

    fn number<E: de::Error>(self, _: Num) -> Result<ItemShape, E> {
        self.0.id();
        Ok(ItemShape::Id)
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<ItemShape, A::Error> {
        TokenIds(self.0).seq(seq)?;
        Ok(ItemShape::Prompt)
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<ItemShape, A::Error> {
        Message(self.0).map(map)?;
        Ok(ItemShape::Other)
    }
}

/// An array of token ids: each number one token; strings are text, the rest [`Json`].
struct TokenIds<'t>(&'t mut Tally);

impl<'de> ValueReader<'de> for TokenIds<'_> {
    type Value = ();

    fn fallback(self) {}

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.text(v);
        Ok(())
    }

    fn number<E: de::Error>(self, _: Num) -> Result<(), E> {
        self.0.id();
        Ok(())
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Lenient(TokenIds(&mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        json_map(&mut self.0.bytes, map)
    }
}

#[cfg(test)]
mod tests;
