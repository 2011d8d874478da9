//! From token fields to tokens: the rule a reservation is made by.
//!
//! ```text
//! prompt     = ⌈(⌈text_bytes ÷ bytes_per_token⌉ + framing) × factor⌉ + images + token_ids
//! framing    = 4 per message + 2                  (chat and responses only)
//! images     = 85 per low-detail image + 1,445 per high or auto one
//! completion = (bound, else the default) × max(n, best_of) × prompts
//! ```
//!
//! - **Text** at a fixed bytes-per-token ratio, 3 by default: bytes ÷ 4 under-counts
//!   English by 8% and lock files by 34% (design notes §10), bytes ÷ 3 covers all text
//!   but hashes and base64, which the learned factor then catches.
//! - **Framing**: the OpenAI cookbook's chat count, 4 tokens around each message and 2
//!   priming the reply (`num_tokens_from_messages`).
//! - **Images** by OpenAI's tile rule for GPT-4o and its peers (platform docs, "Images
//!   and vision", calculating costs): low detail is 85 tokens; high detail fits the image
//!   in 2048², scales its short side to 768 and charges 170 per 512-px tile plus 85. The
//!   dimensions are not read here, so high and auto pay the rule's largest case, 768 ×
//!   2048 = 2 × 4 tiles, 8 × 170 + 85 = **1,445** (the docs' 1024² example costs 765,
//!   their 2048 × 4096 one 1,105). Models with other rules (gpt-4o-mini's multiplier,
//!   gpt-4.1-mini's patches, NIM vision models) need their own figures in [`Rules`].
//! - **Token ids** are tokens, exactly; neither ratio nor factor touches them.
//! - **Completion**: what the provider may generate, as OpenAI reserves it. Embeddings
//!   generate nothing; an endpoint this module does not know is charged only an explicit
//!   bound.
//!
//! The `factor` is the per-model correction [`super::ratio`] learns from settled usage
//! ([`Factor::ONE`] when nothing is learned); it scales text and framing only, which is
//! what it is learned on. All arithmetic saturates.

use std::num::NonZeroU32;

use super::request::{Basis, TokenFields};

/// The OpenAI-compatible endpoint a body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Endpoint {
    /// The endpoint of a request path, by its last segments, so any base path works
    /// (`/v1/chat/completions`, `/openai/deployments/x/chat/completions?api-version=1`).
    pub fn from_path(path: &str) -> Self {
        let path = path.split('?').next().unwrap_or(path).trim_end_matches('/');
        if path.ends_with("/chat/completions") {
            Endpoint::ChatCompletions
        } else if path.ends_with("/completions") {
            Endpoint::Completions
        } else if path.ends_with("/embeddings") {
            Endpoint::Embeddings
        } else if path.ends_with("/responses") {
            Endpoint::Responses
        } else {
            Endpoint::Other
        }
    }
}

/// Bytes of text per token, in thousandths of a byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BytesPerToken(NonZeroU32);

impl BytesPerToken {
    /// Three bytes per token: conservative for all text but hashes and base64.
    pub const DEFAULT: Self = match NonZeroU32::new(3000) {
        Some(n) => BytesPerToken(n),
        None => unreachable!(),
    };

    /// `bytes` per token; `None` unless finite, positive and at most 1,000.
    pub fn new(bytes: f64) -> Option<Self> {
        if !(bytes.is_finite() && bytes > 0.0 && bytes <= 1000.0) {
            return None;
        }
        NonZeroU32::new((bytes * 1000.0).round() as u32).map(BytesPerToken)
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0.get()) / 1000.0
    }

    /// Tokens for `bytes` of text, rounded up.
    pub fn tokens(self, bytes: u64) -> u64 {
        let t = (u128::from(bytes) * 1000).div_ceil(u128::from(self.0.get()));
        u64::try_from(t).unwrap_or(u64::MAX)
    }
}

impl Default for BytesPerToken {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A multiplier of estimates in 1/1024 steps ([`Factor::ONE`] = ×1): the per-model
/// correction [`super::ratio`] learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Factor(u32);

impl Factor {
    pub const SCALE: u32 = 1024;
    pub const ONE: Factor = Factor(Self::SCALE);
    /// The largest factor: ×64, as far as the state word's fields reach.
    pub const MAX: Factor = Factor(64 * Self::SCALE);

    /// `n / 1024`, kept within `1..=MAX`.
    pub fn from_scaled(n: u32) -> Self {
        Factor(n.clamp(1, Self::MAX.0))
    }

    pub fn scaled(self) -> u32 {
        self.0
    }

    pub fn as_f64(self) -> f64 {
        f64::from(self.0) / f64::from(Self::SCALE)
    }

    /// `tokens × factor`, rounded up, saturating.
    pub fn apply(self, tokens: u64) -> u64 {
        let t = (u128::from(tokens) * u128::from(self.0)).div_ceil(u128::from(Self::SCALE));
        u64::try_from(t).unwrap_or(u64::MAX)
    }
}

/// Tokens around each chat message (OpenAI cookbook).
pub const TOKENS_PER_MESSAGE: u64 = 4;
/// Tokens priming the reply (OpenAI cookbook).
pub const REPLY_PRIMING: u64 = 2;
/// A low-detail image (OpenAI's rule).
pub const IMAGE_LOW: u64 = 85;
/// The most a high-detail image costs under OpenAI's tile rule (see the module doc).
pub const IMAGE_HIGH: u64 = 1_445;
/// Completion tokens when a request gives no bound: the output cap of gpt-4-turbo and
/// gpt-3.5, and the default of many OpenAI-compatible servers. A provider that lets a
/// request run longer is corrected at settlement.
pub const DEFAULT_COMPLETION: u64 = 4_096;

/// The estimate's settings (configured per provider).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rules {
    pub bytes_per_token: BytesPerToken,
    /// Completion tokens per choice when the request gives no bound.
    pub default_completion: u64,
    pub image_low: u64,
    /// High-detail and auto images.
    pub image_high: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            bytes_per_token: BytesPerToken::DEFAULT,
            default_completion: DEFAULT_COMPLETION,
            image_low: IMAGE_LOW,
            image_high: IMAGE_HIGH,
        }
    }
}

/// A request's estimated tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Estimate {
    pub prompt: u64,
    pub completion: u64,
    /// Text and framing tokens before the factor, when they are the whole prompt: what
    /// the settled prompt tokens teach the ratio about ([`super::ratio::RatioTable::observe`]).
    /// `None` when the prompt also holds images, media or token ids, or the body was
    /// read by its length.
    pub ratio_base: Option<u64>,
}

impl Estimate {
    /// What to reserve.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

impl Rules {
    /// The estimate of a request with these `fields`, sent to `endpoint`, for a model
    /// whose learned correction is `factor`.
    pub fn estimate(
        &self,
        fields: &TokenFields<'_>,
        endpoint: Endpoint,
        factor: Factor,
    ) -> Estimate {
        let messages = u64::from(fields.messages);
        let chat = match endpoint {
            Endpoint::ChatCompletions | Endpoint::Responses => true,
            Endpoint::Completions | Endpoint::Embeddings => false,
            Endpoint::Other => messages > 0,
        };
        let framing = if chat {
            messages
                .saturating_mul(TOKENS_PER_MESSAGE)
                .saturating_add(REPLY_PRIMING)
        } else {
            0
        };
        let base = self
            .bytes_per_token
            .tokens(fields.text_bytes)
            .saturating_add(framing);
        let images = &fields.images;
        let image_tokens = u64::from(images.low)
            .saturating_mul(self.image_low)
            .saturating_add(
                u64::from(images.high)
                    .saturating_add(u64::from(images.auto))
                    .saturating_mul(self.image_high),
            );
        let prompt = factor
            .apply(base)
            .saturating_add(image_tokens)
            .saturating_add(fields.token_ids);

        let per_choice = match endpoint {
            Endpoint::Embeddings => 0,
            Endpoint::Other => fields.completion_bound.unwrap_or(0),
            _ => fields.completion_bound.unwrap_or(self.default_completion),
        };
        let choices = fields.n.max(fields.best_of).max(1);
        let completion = per_choice
            .saturating_mul(u64::from(choices))
            .saturating_mul(u64::from(fields.prompts.max(1)));

        let pure_text = fields.basis == Basis::Fields
            && images.total() == 0
            && fields.media == 0
            && fields.token_ids == 0;
        Estimate {
            prompt,
            completion,
            ratio_base: pure_text.then_some(base),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::request::{read, Images};

    fn fields(text_bytes: u64, messages: u32) -> TokenFields<'static> {
        TokenFields {
            text_bytes,
            messages,
            prompts: 1,
            n: 1,
            ..TokenFields::default()
        }
    }

    #[test]
    fn chat_prompt_is_text_at_three_bytes_per_token_plus_cookbook_framing() {
        // 100 bytes → ⌈33.3⌉ = 34 tokens; 3 messages → 12 + 2.
        let e = Rules::default().estimate(&fields(100, 3), Endpoint::ChatCompletions, Factor::ONE);
        assert_eq!(e.prompt, 34 + 12 + 2);
        assert_eq!(e.ratio_base, Some(48));
        assert_eq!(e.completion, DEFAULT_COMPLETION);
        assert_eq!(e.total(), 48 + 4_096);
    }

    #[test]
    fn completions_and_embeddings_have_no_framing_and_embeddings_no_completion() {
        let f = fields(99, 0);
        let r = Rules::default();
        assert_eq!(
            r.estimate(&f, Endpoint::Completions, Factor::ONE).prompt,
            33
        );
        let e = r.estimate(&f, Endpoint::Embeddings, Factor::ONE);
        assert_eq!((e.prompt, e.completion), (33, 0));
        // Responses frames even a bare string input: the reply is primed.
        assert_eq!(r.estimate(&f, Endpoint::Responses, Factor::ONE).prompt, 35);
    }

    #[test]
    fn unknown_endpoints_frame_only_messages_and_charge_only_an_explicit_bound() {
        let r = Rules::default();
        let mut f = fields(30, 0);
        let e = r.estimate(&f, Endpoint::Other, Factor::ONE);
        assert_eq!((e.prompt, e.completion), (10, 0));
        f.messages = 1;
        f.completion_bound = Some(7);
        let e = r.estimate(&f, Endpoint::Other, Factor::ONE);
        assert_eq!((e.prompt, e.completion), (10 + 6, 7));
    }

    #[test]
    fn completion_is_the_bound_times_choices_times_prompts() {
        let r = Rules::default();
        let mut f = fields(0, 1);
        f.completion_bound = Some(100);
        f.n = 3;
        assert_eq!(
            r.estimate(&f, Endpoint::ChatCompletions, Factor::ONE)
                .completion,
            300
        );
        f.best_of = 5; // the provider generates best_of and returns n
        f.prompts = 2;
        assert_eq!(
            r.estimate(&f, Endpoint::Completions, Factor::ONE)
                .completion,
            1_000
        );
        f.completion_bound = None;
        let custom = Rules {
            default_completion: 10,
            ..Rules::default()
        };
        assert_eq!(
            custom
                .estimate(&f, Endpoint::Completions, Factor::ONE)
                .completion,
            100
        );
    }

    #[test]
    fn images_pay_their_own_rule_and_are_not_scaled_or_learned_from() {
        let mut f = fields(0, 1);
        f.images = Images {
            low: 2,
            high: 1,
            auto: 1,
        };
        let twice = Factor::from_scaled(2 * Factor::SCALE);
        let e = Rules::default().estimate(&f, Endpoint::ChatCompletions, twice);
        assert_eq!(e.prompt, 2 * 6 + 2 * 85 + 2 * 1_445);
        assert_eq!(e.ratio_base, None);
        let cheap = Rules {
            image_low: 1,
            image_high: 10,
            ..Rules::default()
        };
        assert_eq!(
            cheap
                .estimate(&f, Endpoint::ChatCompletions, Factor::ONE)
                .prompt,
            6 + 2 + 20
        );
    }

    #[test]
    fn token_ids_count_exactly_whatever_the_factor() {
        let mut f = fields(3, 0);
        f.token_ids = 1_000;
        let twice = Factor::from_scaled(2 * Factor::SCALE);
        let e = Rules::default().estimate(&f, Endpoint::Completions, twice);
        assert_eq!(e.prompt, 2 + 1_000);
        assert_eq!(e.ratio_base, None);
    }

    #[test]
    fn the_factor_scales_text_and_framing_rounding_up() {
        // base 34 + 6 = 40; × 1.25 = 50; × 1025/1024 = 40.04 → 41.
        let f = fields(100, 1);
        let r = Rules::default();
        let e = r.estimate(&f, Endpoint::ChatCompletions, Factor::from_scaled(1280));
        assert_eq!((e.prompt, e.ratio_base), (50, Some(40)));
        let e = r.estimate(&f, Endpoint::ChatCompletions, Factor::from_scaled(1025));
        assert_eq!(e.prompt, 41);
    }

    #[test]
    fn another_ratio_divides_the_text_bytes_rounding_up() {
        let r = Rules {
            bytes_per_token: BytesPerToken::new(2.5).unwrap(),
            ..Rules::default()
        };
        assert_eq!(
            r.estimate(&fields(101, 0), Endpoint::Embeddings, Factor::ONE)
                .prompt,
            41
        );
        assert_eq!(BytesPerToken::new(0.0), None);
        assert_eq!(BytesPerToken::new(f64::NAN), None);
        assert_eq!(BytesPerToken::new(1e6), None);
        assert_eq!(BytesPerToken::new(0.0001), None);
        assert_eq!(BytesPerToken::DEFAULT.as_f64(), 3.0);
    }

    #[test]
    fn a_body_read_by_its_length_is_estimated_but_never_learned_from() {
        let f = read(b"not json at all");
        let e = Rules::default().estimate(&f, Endpoint::ChatCompletions, Factor::ONE);
        assert_eq!(e.prompt, 5 + 2);
        assert_eq!(e.ratio_base, None);
    }

    #[test]
    fn huge_counts_saturate_instead_of_overflowing() {
        let mut f = fields(u64::MAX, u32::MAX);
        f.token_ids = u64::MAX;
        f.completion_bound = Some(u64::MAX);
        f.n = u32::MAX;
        f.images.auto = u32::MAX;
        let e = Rules::default().estimate(&f, Endpoint::ChatCompletions, Factor::MAX);
        assert_eq!(
            (e.prompt, e.completion, e.total()),
            (u64::MAX, u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn endpoints_are_known_by_the_end_of_the_path() {
        use Endpoint::*;
        for (path, want) in [
            ("/v1/chat/completions", ChatCompletions),
            (
                "/openai/deployments/x/chat/completions?api-version=2024-06-01",
                ChatCompletions,
            ),
            ("/v1/completions/", Completions),
            ("/v1/embeddings", Embeddings),
            ("/v1/responses", Responses),
            ("/v1/models", Other),
            ("", Other),
        ] {
            assert_eq!(Endpoint::from_path(path), want, "{path}");
        }
    }
}
