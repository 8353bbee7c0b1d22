//! The one place atomics come from.
//!
//! Under `cfg(loom)` every atomic, fence and the futex model come from loom so the
//! ring and wake-up protocols can be model-checked on heap storage; otherwise they are
//! `std`'s. Code elsewhere in the crate never names `std::sync::atomic` directly.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, AtomicU64};
#[cfg(loom)]
pub(crate) use loom::thread::yield_now;
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, AtomicU64};
#[cfg(not(loom))]
pub(crate) use std::thread::yield_now;

pub use std::sync::atomic::Ordering;
