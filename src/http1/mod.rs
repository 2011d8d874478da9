//! HTTP/1.1 wire pieces both sides speak: the sidecar's server (`server::h1`) and its
//! upstream client (`upstream::h1`) frame bodies the same way and tell header names
//! apart the same way, so those live once, here, below both.

pub mod chunked;
pub mod maps;

pub use maps::Maps;

/// Whether the header name `raw` is `lower` (lowercase letters and `-`), whatever its
/// case: eight bytes at a time, each folded by setting bit 5. Exact for such a `lower`:
/// the only other byte a letter or `-` folds from is a control character, which no
/// header name (a token, as httparse checked) holds.
pub fn same_name(raw: &[u8], lower: &[u8]) -> bool {
    if raw.len() != lower.len() {
        return false;
    }
    let mut a = raw.chunks_exact(8);
    let mut b = lower.chunks_exact(8);
    for (x, y) in a.by_ref().zip(b.by_ref()) {
        let x = u64::from_le_bytes(x.try_into().unwrap_or([0; 8]));
        let y = u64::from_le_bytes(y.try_into().unwrap_or([0; 8]));
        if x | 0x2020_2020_2020_2020 != y {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}
