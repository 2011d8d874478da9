//! HTTP/1.1 wire pieces both sides speak: the sidecar's server (`server::h1`) and its
//! upstream client (`upstream::h1`) frame bodies the same way, so the decoder lives
//! once, here, below both.

pub mod chunked;
