//! Atomics through one door, so the CAS protocols can be model-checked by loom
//! (`RUSTFLAGS="--cfg sidecar_loom" cargo test --release --lib loom`).

#[cfg(sidecar_loom)]
pub use loom::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
#[cfg(not(sidecar_loom))]
pub use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
