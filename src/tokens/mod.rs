//! Token counts of a request, before and after: what a token budget reserves when a
//! request arrives and settles when its answer ends (issue 19).
//!
//! - [`request`]: the token fields of a request body, read in one pass without a DOM.
//! - [`estimate`]: the rule that turns them into prompt and completion tokens.
//! - [`ratio`]: a per-model correction learned from settled usage, never below the rule.
//! - [`usage`]: the `usage` of a JSON answer; [`sse`]: of a stream fed piece by piece,
//!   and which event is the usage-only chunk a proxy may drop.
//!
//! Plain functions and data: no I/O, no clock, no configuration reading; the proxy
//! passes bytes in and reads numbers out. Estimates err high, since a reservation that falls
//! short draws a 429, but not blindly: inline image and audio data is never counted as
//! text, which would refuse requests that fit.
//!
//! No tokenizer. tiktoken-rs 0.12.1 counts OpenAI models exactly, but costs 235,000
//! (o200k) to 420,000 (cl100k) instructions for the 668 bytes of text of a 957-byte
//! chat body, where [`request::read`] takes 11,800 for the whole body and the request
//! path about 26,000; loading an encoding takes 0.3 to 0.7 G instructions, and the
//! three OpenAI ones add 7 MB of binary and 116 MB of memory. Exactness buys little here:
//! settlement replaces the estimate with the provider's count, the ratio's over-count
//! (bytes ÷ 3 is 1.26 to 1.44 times the real count of English, Rust and chat text) only
//! holds budget while a request runs, its under-counts (0.88 for lock files, under 0.5
//! for base64) are what [`ratio`] learns, and most models the sidecar fronts are not
//! OpenAI's.

pub mod estimate;
mod json;
pub mod ratio;
pub mod request;
pub mod sse;
pub mod usage;

pub use estimate::{BytesPerToken, Endpoint, Estimate, Factor, Rules};
pub use ratio::{RatioRules, RatioTable};
pub use request::{read, Basis, Images, TokenFields};
pub use sse::{Event, EventKind, UsageScanner};
pub use usage::Usage;
