//! Chat messages and their content parts (also the Responses API's input items).
//!
//! A part's fields may come in any order, so a part is counted aside and charged once
//! its `type` is known (see [`part`]).

use serde::de::{self, MapAccess, SeqAccess};

use super::tally::{Detail, Tally, Text};
use crate::tokens::json::{field_names, is_data_url, Bytes, Json, Lenient, Scalar, ValueReader};

/// `messages`: an array of messages (one object reads as one message).
pub(super) struct Messages<'t>(pub &'t mut Tally);

impl<'de> ValueReader<'de> for Messages<'_> {
    type Value = ();

    fn fallback(self) {}

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.text(v);
        Ok(())
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Lenient(Message(&mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        Message(self.0).map(map)
    }
}

/// One message or input item: `content` by its own rule, every other field as [`Json`].
pub(super) struct Message<'t>(pub &'t mut Tally);

field_names! {
    MessageField { Content = "content" }
}

impl<'de> ValueReader<'de> for Message<'_> {
    type Value = ();

    fn fallback(self) {}

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.message();
        self.0.text(v);
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let tally = self.0;
        tally.message();
        while let Some(field) = map.next_key::<MessageField>()? {
            match field {
                MessageField::Content => map.next_value_seed(Lenient(Content(&mut *tally)))?,
                MessageField::Other => map.next_value_seed(Lenient(Json(&mut tally.bytes)))?,
            }
        }
        Ok(())
    }
}

/// A message's `content`: a string, or an array of parts (nested arrays are read the
/// same way; an object reads as one part).
struct Content<'t>(&'t mut Tally);

impl<'de> ValueReader<'de> for Content<'_> {
    type Value = ();

    fn fallback(self) {}

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(&mut self.0.bytes)
    }

    fn str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.text(v);
        Ok(())
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Lenient(Content(&mut *self.0)))?
            .is_some()
        {}
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        part(self.0, map)
    }
}

/// What a content part holds, by its `type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PartKind {
    Text,
    Image,
    Media,
    Unknown,
}

impl PartKind {
    fn of(kind: &str) -> Self {
        match kind {
            "text" | "input_text" | "output_text" | "refusal" | "summary_text"
            | "reasoning_text" => PartKind::Text,
            "image_url" | "input_image" | "image" => PartKind::Image,
            "input_audio" | "audio" | "audio_url" | "input_file" | "file" | "video_url"
            | "input_video" | "video" => PartKind::Media,
            _ => PartKind::Unknown,
        }
    }
}

field_names! {
    PartField {
        Type = "type",
        Text = "text" | "refusal",
        ImageUrl = "image_url",
        Detail = "detail",
    }
}

/// One content part. Its fields may come in any order, so they are counted aside and
/// charged once the `type` is known: text parts by their `text`; images by `detail` (a
/// part with an `image_url` and no known type is an image too), their URL never text;
/// media as [`Tally::media`]; a part of unknown type as all its text ([`Json`]).
fn part<'de, A: MapAccess<'de>>(tally: &mut Tally, mut map: A) -> Result<(), A::Error> {
    let mut kind = PartKind::Unknown;
    let mut text = Tally::default();
    let mut rest = Bytes::default();
    let mut url = Bytes::default();
    let mut image = false;
    let (mut url_detail, mut detail) = (None, None);
    while let Some(field) = map.next_key::<PartField>()? {
        match field {
            PartField::Type => {
                kind = map
                    .next_value::<Scalar<'_>>()?
                    .as_str()
                    .map_or(PartKind::Unknown, PartKind::of)
            }
            PartField::Text => map.next_value_seed(Lenient(Text(&mut text)))?,
            PartField::ImageUrl => {
                image = true;
                url_detail = map.next_value_seed(Lenient(ImageUrl(&mut url)))?;
            }
            PartField::Detail => detail = Some(Detail::of(&map.next_value::<Scalar<'_>>()?)),
            PartField::Other => map.next_value_seed(Lenient(Json(&mut rest)))?,
        }
    }
    let detail = url_detail.or(detail).unwrap_or(Detail::Auto);
    tally.bytes.data = tally.bytes.data.saturating_add(url.data);
    match kind {
        PartKind::Text => tally.bytes.add(text.bytes),
        PartKind::Image => {
            tally.images.add(detail);
            tally.bytes.data = tally.bytes.data.saturating_add(rest.data);
        }
        PartKind::Media => {
            tally.media = tally.media.saturating_add(1);
            // input_audio's `data` is plain base64, not a data: URL: all of it is data.
            let payload = rest
                .data
                .saturating_add(rest.text)
                .saturating_add(text.bytes.data);
            tally.bytes.data = tally.bytes.data.saturating_add(payload);
        }
        PartKind::Unknown => {
            if image {
                tally.images.add(detail);
            }
            tally.bytes.add(text.bytes);
            tally.bytes.add(rest);
        }
    }
    Ok(())
}

field_names! {
    UrlField { Url = "url", Detail = "detail" }
}

/// `image_url`: a URL string (responses) or `{url, detail}` (chat). A `data:` URL is
/// data; any URL is never text. Gives the `detail` found inside, if any.
struct ImageUrl<'t>(&'t mut Bytes);

impl<'de> ValueReader<'de> for ImageUrl<'_> {
    type Value = Option<Detail>;

    fn fallback(self) -> Option<Detail> {
        None
    }

    fn str<E: de::Error>(self, v: &str) -> Result<Option<Detail>, E> {
        if is_data_url(v) {
            self.0.data = self.0.data.saturating_add(v.len() as u64);
        }
        Ok(None)
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Detail>, A::Error> {
        let mut detail = None;
        while let Some(field) = map.next_key::<UrlField>()? {
            match field {
                UrlField::Url => {
                    map.next_value_seed(Lenient(ImageUrl(&mut *self.0)))?;
                }
                UrlField::Detail => detail = Some(Detail::of(&map.next_value::<Scalar<'_>>()?)),
                UrlField::Other => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(detail)
    }
}
