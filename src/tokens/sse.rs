//! The `usage` of a streamed answer, found by a scanner fed the stream piece by piece.
//!
//! [`UsageScanner::feed`] takes the body's pieces as they come (cut anywhere: inside a
//! line, a CRLF or a UTF-8 character) and reports each server-sent event as it ends,
//! with its byte span in the stream and its kind. With `stream_options.include_usage`,
//! OpenAI sends one more chunk before `data: [DONE]`, with `choices: []` and the whole
//! request's `usage`; every other chunk has `usage: null`. That chunk is
//! [`EventKind::UsageOnly`], so a proxy that asked for usage on a client's behalf can
//! drop it. Usage elsewhere is read too (llama.cpp puts it on the last content chunk,
//! vLLM may repeat it on every chunk, the Responses API under `response` in its
//! `response.completed` event); the last one seen is [`UsageScanner::usage`].
//!
//! Lines follow the SSE grammar: ended by LF, CRLF or CR; `data:` lines joined with LF;
//! comment lines (`:`) and other fields ignored; an empty line ends the event. An LF
//! right after a CR belongs to no event, so spans are the same however the stream is
//! cut (dropping a span of a CRLF stream leaves that LF, an empty line that ends
//! nothing). Unlike a browser, [`UsageScanner::finish`] still reads an event the
//! stream ended without its empty line, since its usage is real.
//!
//! Memory is bounded: a line, or an event's data, longer than [`MAX_LINE`] is skipped
//! (the event is [`EventKind::TooLong`]), never buffered whole. Only events with a
//! `"usage"` that is not `null` are parsed as JSON.

use memchr::{memchr2, memmem};

use super::usage::{read_answer, Usage};

/// The longest line, and event data, read; longer ones are skipped.
pub const MAX_LINE: usize = 64 * 1024;

/// What an event is, for settlement and for a proxy that filters the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `data: [DONE]`.
    Done,
    /// `choices: []` with a `usage`: the chunk `include_usage` adds.
    UsageOnly,
    /// Any other event with data: content chunks (with or without usage), Responses
    /// events, data that is not JSON.
    Data,
    /// No data: only comments, `event:`, `id:` or `retry:` lines.
    NoData,
    /// A line or the data passed [`MAX_LINE`]: skipped unread.
    TooLong,
}

/// One event, once it has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Offset in the stream of its first byte.
    pub start: u64,
    /// Offset just past the line ending of its empty line (its CR, for CRLF), or the
    /// end of the stream.
    pub end: u64,
    pub kind: EventKind,
    /// The usage it carries, if any.
    pub usage: Option<Usage>,
}

/// Reads a stream's events and keeps the last usage seen.
#[derive(Debug, Default)]
pub struct UsageScanner {
    /// Bytes fed so far: the stream offset of the next piece.
    offset: u64,
    /// The current line so far, when it spans pieces.
    line: Vec<u8>,
    /// Whether a line is in progress (its bytes in `line`, or dropped as too long).
    in_line: bool,
    /// The line in progress passed [`MAX_LINE`]: the rest of it is dropped.
    line_too_long: bool,
    /// Offset of the line in progress.
    line_start: u64,
    /// The last piece ended with a CR: an LF first in the next one ends nothing.
    after_cr: bool,
    /// Offset of the event in progress, from its first line.
    event_start: Option<u64>,
    /// Its `data:` values, joined with LF.
    data: Vec<u8>,
    has_data: bool,
    too_long: bool,
    usage: Option<Usage>,
    done: bool,
}

impl UsageScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the next piece of the stream; calls `on_event` for each event it ends.
    pub fn feed(&mut self, piece: &[u8], mut on_event: impl FnMut(Event)) {
        if piece.is_empty() {
            return;
        }
        let base = self.offset;
        let mut pos = 0;
        if std::mem::take(&mut self.after_cr) && piece.first() == Some(&b'\n') {
            pos = 1;
        }
        while pos < piece.len() {
            let Some(i) = memchr2(b'\n', b'\r', &piece[pos..]) else {
                self.partial(&piece[pos..], base + pos as u64);
                break;
            };
            let eol = pos + i;
            let end = base + eol as u64 + 1;
            if self.in_line {
                self.partial(&piece[pos..eol], 0);
                let line = std::mem::take(&mut self.line);
                let start = self.line_start;
                self.line_ended(
                    (!self.line_too_long).then_some(&line[..]),
                    start,
                    end,
                    &mut on_event,
                );
                self.line = line;
                self.line.clear();
            } else {
                let line = &piece[pos..eol];
                let start = base + pos as u64;
                self.line_ended(
                    (line.len() <= MAX_LINE).then_some(line),
                    start,
                    end,
                    &mut on_event,
                );
            }
            self.in_line = false;
            self.line_too_long = false;
            pos = eol + 1;
            if piece[eol] == b'\r' {
                match piece.get(pos) {
                    Some(b'\n') => pos += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.offset = base + piece.len() as u64;
    }

    /// The stream has ended: a last line without its line ending is read, and an event
    /// without its empty line is reported.
    pub fn finish(&mut self, mut on_event: impl FnMut(Event)) {
        let end = self.offset;
        if self.in_line {
            let line = std::mem::take(&mut self.line);
            let start = self.line_start;
            self.line_ended(
                (!self.line_too_long).then_some(&line[..]),
                start,
                end,
                &mut on_event,
            );
            self.in_line = false;
            self.line_too_long = false;
        }
        if self.event_start.is_some() {
            self.dispatch(end, &mut on_event);
        }
        self.after_cr = false;
    }

    /// The last usage the stream reported.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Whether `data: [DONE]` was seen.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Offset where the event not yet ended began (its first line, even unfinished):
    /// a proxy that may drop that event holds back the bytes from there on.
    pub fn pending_since(&self) -> Option<u64> {
        self.event_start
            .or_else(|| self.in_line.then_some(self.line_start))
    }

    /// Bytes of a line that goes on past this piece.
    fn partial(&mut self, bytes: &[u8], start: u64) {
        if !self.in_line {
            self.in_line = true;
            self.line_start = start;
        }
        if self.line_too_long {
            return;
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            self.line_too_long = true;
            self.line = Vec::new();
        } else {
            append(&mut self.line, bytes);
        }
    }

    /// A whole line (`None`: too long to read) from `start`, its line ending just
    /// before `end`.
    fn line_ended(
        &mut self,
        line: Option<&[u8]>,
        start: u64,
        end: u64,
        on_event: &mut impl FnMut(Event),
    ) {
        if line == Some(&[][..]) {
            if self.event_start.is_some() {
                self.dispatch(end, on_event);
            }
            return;
        }
        self.event_start.get_or_insert(start);
        let Some(line) = line else {
            self.too_long = true;
            return;
        };
        if line[0] == b':' {
            return;
        }
        let (name, value) = match memchr::memchr(b':', line) {
            Some(i) => (
                &line[..i],
                line[i + 1..].strip_prefix(b" ").unwrap_or(&line[i + 1..]),
            ),
            None => (line, &[][..]),
        };
        if name != b"data" || self.too_long {
            return;
        }
        let sep = usize::from(self.has_data);
        if self.data.len() + sep + value.len() > MAX_LINE {
            self.too_long = true;
            self.data = Vec::new();
            return;
        }
        if self.has_data {
            append(&mut self.data, b"\n");
        }
        append(&mut self.data, value);
        self.has_data = true;
    }

    fn dispatch(&mut self, end: u64, on_event: &mut impl FnMut(Event)) {
        let start = self.event_start.take().unwrap_or(end);
        let mut usage = None;
        let kind = if self.too_long {
            EventKind::TooLong
        } else if !self.has_data {
            EventKind::NoData
        } else if self.data.trim_ascii() == b"[DONE]" {
            self.done = true;
            EventKind::Done
        } else if usage_all_null(&self.data) {
            EventKind::Data
        } else {
            let answer = read_answer(&self.data);
            usage = answer.usage;
            match (usage, answer.choices) {
                (Some(_), Some(0)) => EventKind::UsageOnly,
                _ => EventKind::Data,
            }
        };
        if usage.is_some() {
            self.usage = usage;
        }
        self.data.clear();
        self.has_data = false;
        self.too_long = false;
        on_event(Event {
            start,
            end,
            kind,
            usage,
        });
    }
}

/// Whether every `"usage"` in `data` is followed by `: null` (or there is none): then
/// the event sets no usage and its JSON need not be parsed. With `include_usage` every
/// content chunk says `"usage":null`; a usage object, at the top or nested, has a `{`
/// there, and `"usage"` inside a string is escaped (`\"usage\"`) and never matches.
fn usage_all_null(data: &[u8]) -> bool {
    memmem::find_iter(data, b"\"usage\"").all(|i| {
        let after = data[i + 7..].trim_ascii_start();
        after
            .strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"null"))
    })
}

/// Appends to a buffer whose length stays within [`MAX_LINE`], growing it by doubling
/// but never past `MAX_LINE` (plain `Vec` growth could reach twice that).
fn append(buf: &mut Vec<u8>, bytes: &[u8]) {
    let need = buf.len() + bytes.len();
    if need > buf.capacity() {
        let cap = (buf.capacity() * 2).max(need).min(MAX_LINE.max(need));
        buf.reserve_exact(cap - buf.len());
    }
    buf.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests;
