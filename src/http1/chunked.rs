//! The chunked transfer coding (RFC 9112 §7.1), decoded from a read buffer.
//!
//! A pure state machine over bytes already read: it never does I/O, so it is fuzzed
//! and unit-tested alone. Each data frame is split off the buffer without a copy. Chunk
//! extensions are skipped and trailers are read and dropped (a proxy of
//! OpenAI-compatible answers has no use for them), within bounds.

use bytes::{Buf, Bytes, BytesMut};

/// Most bytes of one chunk-size line (with its extensions), and of all trailers.
pub const MAX_LINE: usize = 4096;
pub const MAX_TRAILERS: usize = 16 * 1024;

/// Why a chunked body is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunk size line")]
    Size,
    #[error("chunk size line too long")]
    LineTooLong,
    #[error("chunk data not followed by CRLF")]
    MissingCrlf,
    #[error("trailers too large")]
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one; bytes of trailers so far.
    Trailers(usize),
    Done,
}

/// What the decoder made of the bytes it had.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// More bytes are needed.
    More,
    /// The body is complete (the last chunk and the trailers are consumed).
    Done,
}

/// Decoder state of one chunked body.
#[derive(Debug, Clone)]
pub struct Decoder {
    state: State,
}

impl Default for Decoder {
    fn default() -> Self {
        Self { state: State::Size }
    }
}

impl Decoder {
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from the start of `buf`, consuming what it uses.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, ChunkError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Size => {
                    let Some(end) = line_end(buf, MAX_LINE, ChunkError::LineTooLong)? else {
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..end])?;
                    buf.advance(end + 2);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::Data(size)
                    };
                }
                State::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (buf.len() as u64).min(left) as usize;
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                    return Ok(Step::Data(data));
                }
                State::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError::MissingCrlf);
                    }
                    buf.advance(2);
                    self.state = State::Size;
                }
                State::Trailers(seen) => {
                    let room = MAX_TRAILERS.saturating_sub(seen);
                    let Some(end) = line_end(buf, room, ChunkError::Trailers)? else {
                        return Ok(Step::More);
                    };
                    buf.advance(end + 2);
                    self.state = if end == 0 {
                        State::Done
                    } else {
                        State::Trailers(seen + end + 2)
                    };
                }
            }
        }
    }
}

/// Where the CRLF ending the line at the start of `buf` is; an error when there is none
/// within `max` bytes.
fn line_end(buf: &[u8], max: usize, too_long: ChunkError) -> Result<Option<usize>, ChunkError> {
    match memchr::memchr(b'\n', buf) {
        Some(i) if i > max + 1 => Err(too_long),
        Some(0) => Err(ChunkError::Size),
        Some(i) if buf[i - 1] == b'\r' => Ok(Some(i - 1)),
        Some(_) => Err(ChunkError::Size),
        None if buf.len() > max + 1 => Err(too_long),
        None => Ok(None),
    }
}

/// The hexadecimal size at the start of a chunk-size line (extensions after `;`).
fn chunk_size(line: &[u8]) -> Result<u64, ChunkError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(ChunkError::Size);
    }
    let rest = &line[digits..];
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(ChunkError::Size);
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes: the data, whether it ended, and how
    /// many bytes of `wire` the body took.
    fn decode_in_steps(wire: &[u8], step: usize) -> Result<(Vec<u8>, bool, usize), ChunkError> {
        let mut dec = Decoder::default();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        for piece in wire.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            fed += piece.len();
            loop {
                match dec.decode(&mut buf)? {
                    Step::Data(d) => out.extend_from_slice(&d),
                    Step::More => break,
                    Step::Done => return Ok((out, true, fed - buf.len())),
                }
            }
        }
        Ok((out, false, fed - buf.len()))
    }

    #[test]
    fn chunks_decode_the_same_whatever_the_reads_are_cut_into() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in 1..wire.len() {
            let (data, done, took) = decode_in_steps(wire, step).unwrap();
            assert_eq!(data, b"hello, world", "step {step}");
            assert!(done);
            assert_eq!(took, wire.len() - 4, "the next answer's bytes are left");
        }
    }

    #[test]
    fn sizes_are_hexadecimal_and_bounded() {
        let (data, done, _) = decode_in_steps(b"A\r\n0123456789\r\n0\r\n\r\n", 64).unwrap();
        assert_eq!(data.len(), 10);
        assert!(done);
        assert_eq!(chunk_size(b"fF"), Ok(255));
        assert_eq!(chunk_size(b"1 ; name=value"), Ok(1));
        for bad in [&b""[..], b"x", b"-1", b"1x", b"1000000000000000"] {
            assert_eq!(chunk_size(bad), Err(ChunkError::Size), "{bad:?}");
        }
    }

    #[test]
    fn broken_framing_is_an_error_not_a_hang() {
        assert_eq!(
            decode_in_steps(b"5\r\nhelloXX", 64).unwrap_err(),
            ChunkError::MissingCrlf
        );
        assert_eq!(
            decode_in_steps(b"5\nhello", 64).unwrap_err(),
            ChunkError::Size
        );
        let long = [b"1;".as_slice(), &[b'a'; MAX_LINE + 8]].concat();
        assert_eq!(
            decode_in_steps(&long, 64).unwrap_err(),
            ChunkError::LineTooLong
        );
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..(MAX_TRAILERS / 10 + 2) {
            trailers.extend_from_slice(b"x-t: 1234\r\n");
        }
        assert_eq!(
            decode_in_steps(&trailers, 64).unwrap_err(),
            ChunkError::Trailers
        );
    }

    #[test]
    fn an_unfinished_body_asks_for_more() {
        let (data, done, _) = decode_in_steps(b"5\r\nhel", 64).unwrap();
        assert_eq!(data, b"hel");
        assert!(!done);
    }
}
