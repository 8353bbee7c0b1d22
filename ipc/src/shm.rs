//! Word access to memory that another process may share.
//!
//! Ring, channel and notifier code reaches shared memory only through these two
//! traits: every read is an atomic load (a copy, never a reference a peer could
//! change under us) and every write an atomic store. That keeps the protocols generic
//! over their storage: [`HeapWords`] backs them for tests and loom, a mapped
//! [`crate::region`] backs them for real.
//!
//! Offsets are byte offsets, 4-aligned for `u32` words and 8-aligned for `u64` words.
//! Implementations check every offset against their length; an out-of-range offset is
//! a bug in this crate (offsets are computed from layouts validated at attach time,
//! never taken from a peer), so it panics rather than touching foreign memory.

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Read access to words of a (possibly shared, possibly read-only) memory area.
pub trait ShmRead {
    /// Length of the area in bytes.
    fn len(&self) -> usize;
    /// Whether the area is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The 32-bit word at byte offset `off`: for loads and futex waits only.
    fn word32(&self, off: usize) -> &AtomicU32;
    /// The 64-bit word at byte offset `off`: for loads only.
    fn word64(&self, off: usize) -> &AtomicU64;

    /// Atomic load of the `u32` at `off`.
    #[inline]
    fn load32(&self, off: usize, ord: Ordering) -> u32 {
        self.word32(off).load(ord)
    }
    /// Atomic load of the `u64` at `off`.
    #[inline]
    fn load64(&self, off: usize, ord: Ordering) -> u64 {
        self.word64(off).load(ord)
    }
    /// Relaxed atomic loads of consecutive `u64`s starting at `off` into `dst`.
    /// Mappings override this with one bounds check for the whole run.
    #[inline]
    fn load64_run(&self, off: usize, dst: &mut [u64]) {
        for (i, w) in dst.iter_mut().enumerate() {
            *w = self.load64(off + i * 8, Ordering::Relaxed);
        }
    }
}

/// Write access: only the single owner of an area implements this for it.
pub trait ShmWrite: ShmRead {
    /// Atomic store of the `u32` at `off`.
    #[inline]
    fn store32(&self, off: usize, v: u32, ord: Ordering) {
        self.word32(off).store(v, ord)
    }
    /// Atomic store of the `u64` at `off`.
    #[inline]
    fn store64(&self, off: usize, v: u64, ord: Ordering) {
        self.word64(off).store(v, ord)
    }
    /// Relaxed atomic stores of `src` into consecutive `u64`s starting at `off`.
    #[inline]
    fn store64_run(&self, off: usize, src: &[u64]) {
        for (i, w) in src.iter().enumerate() {
            self.store64(off + i * 8, *w, Ordering::Relaxed);
        }
    }
    /// Atomic add on the `u32` at `off`, returning the previous value.
    #[inline]
    fn fetch_add32(&self, off: usize, v: u32, ord: Ordering) -> u32 {
        self.word32(off).fetch_add(v, ord)
    }
}

impl<T: ShmRead + ?Sized> ShmRead for std::sync::Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn word32(&self, off: usize) -> &AtomicU32 {
        (**self).word32(off)
    }
    fn word64(&self, off: usize) -> &AtomicU64 {
        (**self).word64(off)
    }
    fn load64_run(&self, off: usize, dst: &mut [u64]) {
        (**self).load64_run(off, dst)
    }
}
impl<T: ShmWrite + ?Sized> ShmWrite for std::sync::Arc<T> {
    fn store64_run(&self, off: usize, src: &[u64]) {
        (**self).store64_run(off, src)
    }
}

/// Heap-backed words with the same interface as a mapped region.
///
/// Used by unit tests, the hostile-peer tests (which scribble on it freely) and the
/// loom models (whose atomics cannot live in a memfd). Each byte offset is used with
/// one width only, so the 32- and 64-bit words are kept in two arrays.
#[derive(Debug)]
pub struct HeapWords {
    len: usize,
    w32: Vec<AtomicU32>,
    w64: Vec<AtomicU64>,
}

impl HeapWords {
    /// A zeroed area of `len` bytes (rounded up to 8).
    pub fn new(len: usize) -> Self {
        let len = len.div_ceil(8) * 8;
        Self {
            len,
            w32: (0..len / 4).map(|_| AtomicU32::new(0)).collect(),
            w64: (0..len / 8).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl ShmRead for HeapWords {
    fn len(&self) -> usize {
        self.len
    }
    fn word32(&self, off: usize) -> &AtomicU32 {
        assert!(off % 4 == 0, "unaligned u32 offset {off}");
        &self.w32[off / 4]
    }
    fn word64(&self, off: usize) -> &AtomicU64 {
        assert!(off % 8 == 0, "unaligned u64 offset {off}");
        &self.w64[off / 8]
    }
}
impl ShmWrite for HeapWords {}
