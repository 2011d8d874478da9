//! The counts the request readers share: the prompt's [`Tally`], its images by
//! [`Detail`], and the reader of a plain text field ([`Text`]).

use serde::de;

use crate::tokens::json::{Bytes, Scalar, ValueReader};

/// Images of a request, by their `detail`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Images {
    pub low: u32,
    pub high: u32,
    /// `auto`, absent or unknown: the provider picks, so it counts as high.
    pub auto: u32,
}

impl Images {
    pub fn total(&self) -> u32 {
        self.low.saturating_add(self.high).saturating_add(self.auto)
    }

    pub(super) fn add(&mut self, detail: Detail) {
        let n = match detail {
            Detail::Low => &mut self.low,
            Detail::High => &mut self.high,
            Detail::Auto => &mut self.auto,
        };
        *n = n.saturating_add(1);
    }
}

/// Counts of the prompt, shared by every reader of a request.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub bytes: Bytes,
    pub ids: u64,
    pub messages: u32,
    pub images: Images,
    pub media: u32,
}

impl Tally {
    pub(super) fn text(&mut self, v: &str) {
        self.bytes.text = self.bytes.text.saturating_add(v.len() as u64);
    }

    pub(super) fn message(&mut self) {
        self.messages = self.messages.saturating_add(1);
    }

    pub(super) fn id(&mut self) {
        self.ids = self.ids.saturating_add(1);
    }
}

/// An image's `detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Detail {
    Low,
    High,
    Auto,
}

impl Detail {
    pub(super) fn of(s: &Scalar<'_>) -> Self {
        match s.as_str() {
            Some("low") => Detail::Low,
            Some("high") => Detail::High,
            _ => Detail::Auto,
        }
    }
}

/// A text field (`instructions`, `suffix`, a part's `text`): a string is text whatever
/// it starts with; anything else counts as its JSON text.
pub(super) struct Text<'t>(pub &'t mut Tally);

impl<'de> ValueReader<'de> for Text<'_> {
    type Value = ();

    fn fallback(self) {}

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.text(v);
        Ok(())
    }
}
