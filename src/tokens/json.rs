//! Lenient serde pieces shared by the request reader and the usage reader.
//!
//! A [`ValueReader`] accepts every JSON type: it overrides the shapes it expects, and a
//! value of any other type is counted as text (when the reader counts, see
//! [`ValueReader::counts`]) or skipped, never an error. So one odd field costs that
//! field, not the whole read. Field names are matched without allocating
//! ([`field_names`]), and text is measured where it lies, never copied.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// An enum of the field names a reader cares about, plus `Other`, read from a map key
/// without allocating (an escaped name is matched after unescaping).
macro_rules! field_names {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $($text:literal)|+),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        enum $name {
            $($variant,)*
            Other,
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Names;
                impl serde::de::Visitor<'_> for Names {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                        f.write_str("a field name")
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$name, E> {
                        Ok(match v {
                            $($($text)|+ => $name::$variant,)*
                            _ => $name::Other,
                        })
                    }
                }
                d.deserialize_identifier(Names)
            }
        }
    };
}
pub(super) use field_names;

/// Bytes of text, and of inline data (`data:` URLs, base64 payloads), counted so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Bytes {
    pub text: u64,
    pub data: u64,
}

impl Bytes {
    pub(super) fn add(&mut self, other: Bytes) {
        self.text = self.text.saturating_add(other.text);
        self.data = self.data.saturating_add(other.data);
    }
}

/// A JSON number as serde hands it over.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Num {
    U(u64),
    I(i64),
    F(f64),
}

impl Num {
    /// The number as a count: a non-negative integer, or a finite non-negative float
    /// rounded up (`as` saturates, so 1e30 reads as `u64::MAX`).
    pub(super) fn count(self) -> Option<u64> {
        match self {
            Num::U(v) => Some(v),
            Num::I(v) => u64::try_from(v).ok(),
            Num::F(v) if v.is_finite() && v >= 0.0 => Some(v.ceil() as u64),
            Num::F(_) => None,
        }
    }

    /// Bytes of its JSON text: the digits and sign of an integer, eight for a float.
    fn json_len(self) -> u64 {
        match self {
            Num::U(v) => digits(v),
            Num::I(v) => u64::from(v < 0) + digits(v.unsigned_abs()),
            Num::F(_) => 8,
        }
    }
}

/// Reads one JSON value of any type. Each reader overrides the shapes it expects; the
/// defaults count an unexpected value as [`Json`] does when [`counts`](Self::counts)
/// gives a tally, else skip it, and answer [`fallback`](Self::fallback).
pub(super) trait ValueReader<'de>: Sized {
    type Value;

    /// The answer for a value of a shape this reader does not expect.
    fn fallback(self) -> Self::Value;

    /// Where an unexpected value is counted as text; `None` skips it.
    fn counts(&mut self) -> Option<&mut Bytes> {
        None
    }

    fn str<E: de::Error>(mut self, v: &str) -> Result<Self::Value, E> {
        if let Some(b) = self.counts() {
            let n = v.len() as u64;
            if is_data_url(v) {
                b.data += n;
            } else {
                b.text += n;
            }
        }
        Ok(self.fallback())
    }

    /// A string borrowed from the body (no escapes); by default as [`str`](Self::str).
    fn borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.str(v)
    }

    fn number<E: de::Error>(mut self, n: Num) -> Result<Self::Value, E> {
        if let Some(b) = self.counts() {
            b.text += n.json_len();
        }
        Ok(self.fallback())
    }

    fn boolean<E: de::Error>(mut self, v: bool) -> Result<Self::Value, E> {
        if let Some(b) = self.counts() {
            b.text += if v { 4 } else { 5 };
        }
        Ok(self.fallback())
    }

    /// Null: no text.
    fn null<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.fallback())
    }

    fn seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Self::Value, A::Error> {
        match self.counts() {
            Some(b) => json_seq(b, seq)?,
            None => while seq.next_element::<IgnoredAny>()?.is_some() {},
        }
        Ok(self.fallback())
    }

    fn map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
        match self.counts() {
            Some(b) => json_map(b, map)?,
            None => while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {},
        }
        Ok(self.fallback())
    }
}

/// A [`ValueReader`] as a serde seed and visitor: `map.next_value_seed(Lenient(r))`.
pub(super) struct Lenient<R>(pub R);

impl<'de, R: ValueReader<'de>> DeserializeSeed<'de> for Lenient<R> {
    type Value = R::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<R::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, R: ValueReader<'de>> Visitor<'de> for Lenient<R> {
    type Value = R::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<R::Value, E> {
        self.0.borrowed_str(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<R::Value, E> {
        self.0.str(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<R::Value, E> {
        self.0.number(Num::U(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<R::Value, E> {
        self.0.number(Num::I(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<R::Value, E> {
        self.0.number(Num::F(v))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<R::Value, E> {
        self.0.boolean(v)
    }

    fn visit_unit<E: de::Error>(self) -> Result<R::Value, E> {
        self.0.null()
    }

    fn visit_none<E: de::Error>(self) -> Result<R::Value, E> {
        self.0.null()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<R::Value, A::Error> {
        self.0.seq(seq)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<R::Value, A::Error> {
        self.0.map(map)
    }
}

/// Counts any JSON value as the text a model would be shown: strings by their decoded
/// length, and for containers the compact JSON around them (brackets, `"key":`,
/// commas), since chat templates that render tools and tool calls (Llama's `tojson`)
/// show the JSON itself. Strings that are `data:` URLs count as data, not text. Null
/// counts nothing; numbers their digits (a float eight).
pub(super) struct Json<'t>(pub &'t mut Bytes);

impl<'de> ValueReader<'de> for Json<'_> {
    type Value = ();

    fn fallback(self) {}

    fn counts(&mut self) -> Option<&mut Bytes> {
        Some(self.0)
    }
}

/// An array counted as [`Json`] counts it.
pub(super) fn json_seq<'de, A: SeqAccess<'de>>(b: &mut Bytes, mut seq: A) -> Result<(), A::Error> {
    b.text += 2;
    while seq.next_element_seed(Lenient(Json(b)))?.is_some() {
        b.text += 1;
    }
    Ok(())
}

/// An object counted as [`Json`] counts it.
pub(super) fn json_map<'de, A: MapAccess<'de>>(b: &mut Bytes, mut map: A) -> Result<(), A::Error> {
    b.text += 2;
    while map.next_key_seed(KeyLen(b))?.is_some() {
        map.next_value_seed(Lenient(Json(b)))?;
    }
    Ok(())
}

/// A map key counted as `"key":` and the comma after its value.
struct KeyLen<'t>(&'t mut Bytes);

impl<'de> DeserializeSeed<'de> for KeyLen<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeyLen<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.text += v.len() as u64 + 4;
        Ok(())
    }
}

/// A JSON value read for its scalar meaning only; containers are skipped.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Scalar<'de> {
    /// A string, borrowed from the body unless it had escapes.
    Str(Cow<'de, str>),
    /// A number that reads as a count ([`Num::count`]).
    Count(u64),
    Bool(bool),
    /// Null, a negative or non-finite number, an array or an object.
    Other,
}

impl Scalar<'_> {
    pub(super) fn count(self) -> Option<u64> {
        match self {
            Scalar::Count(n) => Some(n),
            _ => None,
        }
    }

    pub(super) fn is_true(&self) -> bool {
        *self == Scalar::Bool(true)
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Scalar::Str(s) => Some(s),
            _ => None,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Lenient(ScalarReader(PhantomData)).deserialize(d)
    }
}

struct ScalarReader<'de>(PhantomData<&'de ()>);

impl<'de> ValueReader<'de> for ScalarReader<'de> {
    type Value = Scalar<'de>;

    fn fallback(self) -> Scalar<'de> {
        Scalar::Other
    }

    fn borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }

    fn str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }

    fn number<E: de::Error>(self, n: Num) -> Result<Scalar<'de>, E> {
        Ok(n.count().map_or(Scalar::Other, Scalar::Count))
    }

    fn boolean<E: de::Error>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }
}

/// Whether a string is a `data:` URL (RFC 2397), the scheme matched without case.
pub(super) fn is_data_url(s: &str) -> bool {
    s.as_bytes()
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"data:"))
}

/// Decimal digits of `v`.
fn digits(v: u64) -> u64 {
    u64::from(v.checked_ilog10().unwrap_or(0)) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_len(body: &str) -> Bytes {
        let mut b = Bytes::default();
        let mut de = serde_json::Deserializer::from_str(body);
        Lenient(Json(&mut b)).deserialize(&mut de).unwrap();
        b
    }

    #[test]
    fn json_counts_string_contents_and_the_punctuation_around_them() {
        // {} 2, "a": and a comma 5, xy 2, "b": and a comma 5, [] 2, 1 and a comma 2,
        // true and a comma 5: the compact form's 23 bytes, whitespace ignored.
        let b = json_len(r#"{ "a" : "xy", "b" : [ 1, true ] }"#);
        assert_eq!(b, Bytes { text: 23, data: 0 });
    }

    #[test]
    fn data_urls_count_as_data_whatever_their_case_and_null_counts_nothing() {
        let b = json_len(r#"["DATA:image/png;base64,AAAA", null, -12, 2.5]"#);
        assert_eq!(b.data, 26);
        // [] 2, a comma per element 4, -12 3, a float 8
        assert_eq!(b.text, 2 + 4 + 3 + 8);
    }

    #[test]
    fn scalars_read_whatever_the_type_and_never_fail() {
        fn read(s: &str) -> Scalar<'_> {
            serde_json::from_str(s).unwrap()
        }
        assert_eq!(read("12"), Scalar::Count(12));
        assert_eq!(read("12.1"), Scalar::Count(13));
        assert_eq!(read("1e30"), Scalar::Count(u64::MAX));
        assert_eq!(read("-1"), Scalar::Other);
        assert_eq!(read("[1,{\"a\":2}]"), Scalar::Other);
        assert_eq!(read("{\"a\":[]}"), Scalar::Other);
        assert_eq!(read("null"), Scalar::Other);
        assert_eq!(read("true"), Scalar::Bool(true));
        assert_eq!(read("\"a\\u0062\""), Scalar::Str(Cow::Owned("ab".into())));
        assert!(matches!(read("\"ab\""), Scalar::Str(Cow::Borrowed("ab"))));
    }

    field_names! {
        Probe { A = "a" | "alpha", B = "b" }
    }

    #[test]
    fn field_names_match_after_unescaping_and_anything_else_is_other() {
        let read = |s: &str| serde_json::from_str::<Probe>(s).unwrap();
        assert_eq!(read("\"a\""), Probe::A);
        assert_eq!(read("\"alpha\""), Probe::A);
        assert_eq!(read("\"\\u0062\""), Probe::B);
        assert_eq!(read("\"c\""), Probe::Other);
    }
}
