//! Descriptors: the only thing that crosses a ring — a read-only loan of bytes.
//!
//! A descriptor names a pool, a buffer in it, and a byte range inside that buffer.
//! It carries no pointer: the receiver turns it into bytes only through its own
//! read-only mapping of that pool, after bounds-checking every field
//! ([`crate::pool::PoolView::check`]).

/// Marker for plain data that may live in shared memory and cross processes.
///
/// # Safety
/// Implement only for types that are all of:
/// - `#[repr(C)]` (or `#[repr(transparent)]`), with a size that is a non-zero
///   multiple of 8 bytes (rings move them as 64-bit words);
/// - free of padding bytes, so every byte of a value is initialised;
/// - valid for every bit pattern, since a hostile peer chooses the bits;
/// - free of pointers, references, file descriptors or anything else whose meaning
///   depends on the address space or fd table of the process that wrote it.
pub unsafe trait ShmSafe: Copy + Send + 'static {}

/// The largest ring slot, in 64-bit words.
pub const MAX_SLOT_WORDS: usize = 8;

/// Copies the bytes of `v` into `out` (exactly `size_of::<T>() / 8` words).
pub(crate) fn to_words<T: ShmSafe>(v: &T, out: &mut [u64]) {
    assert_eq!(out.len() * 8, std::mem::size_of::<T>(), "word count must match the type");
    // SAFETY: `out` has exactly size_of::<T>() bytes (checked above) and does not
    // overlap `v`; ShmSafe promises T has no padding, so every source byte is
    // initialised and reading them as bytes is defined.
    unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr().cast::<u8>(), out.len() * 8) }
}

/// Builds a `T` from exactly `size_of::<T>() / 8` words copied out of a ring.
pub(crate) fn from_words<T: ShmSafe>(words: &[u64]) -> T {
    assert_eq!(words.len() * 8, std::mem::size_of::<T>(), "word count must match the type");
    // SAFETY: `words` holds exactly size_of::<T>() initialised bytes (checked above);
    // ShmSafe promises every bit pattern is a valid T; read_unaligned does not
    // require `words` to be aligned for T.
    unsafe { std::ptr::read_unaligned(words.as_ptr().cast::<T>()) }
}

/// A loan of `len` bytes at `offset` in buffer `index` of pool `pool`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// Which pool (as numbered by the channel's pool table).
    pub pool: u16,
    /// [`Descriptor::MORE`], [`Descriptor::CONTROL`], [`Descriptor::RETURN`].
    pub flags: u16,
    /// Buffer index inside the pool.
    pub index: u32,
    /// Byte offset of the data inside the buffer (after any headroom).
    pub offset: u32,
    /// Byte length of the data.
    pub len: u32,
}

// SAFETY: repr(C) of u16,u16,u32,u32,u32 is 16 bytes with no padding; every bit
// pattern is a valid value; no pointers or fds.
unsafe impl ShmSafe for Descriptor {}

impl Descriptor {
    /// The frame continues in the next descriptor (a chain, e.g. a 64 KiB segment
    /// made of 2 KiB buffers, or a header buffer in front of a payload buffer).
    pub const MORE: u16 = 1 << 0;
    /// The bytes are a control message (an rkyv archive, see [`crate::control`]).
    pub const CONTROL: u16 = 1 << 1;
    /// The receiver gives this loan back to the pool's owner.
    pub const RETURN: u16 = 1 << 2;
    /// On the first descriptor of a frame: a TSO frame, whose first two bytes
    /// (little-endian) are the segment size the device is to cut it into.
    pub const TSO: u16 = 1 << 3;
    /// With [`Descriptor::RETURN`]: a loan made inside a message comes back —
    /// its ticket in `index` (low 32 bits) and `offset` (high 32 bits).
    pub const LOAN: u16 = 1 << 4;
    /// Every flag this version understands; others are a protocol violation.
    pub const KNOWN_FLAGS: u16 = Self::MORE | Self::CONTROL | Self::RETURN | Self::TSO | Self::LOAN;

    /// Whether `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_is_two_words_without_padding() {
        assert_eq!(std::mem::size_of::<Descriptor>(), 16);
        assert_eq!(std::mem::align_of::<Descriptor>(), 4);
    }
}
