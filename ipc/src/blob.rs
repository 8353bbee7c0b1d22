//! A published blob: bytes one domain rewrites in a region of its own and others
//! copy out read-only (a domain's status report for the supervisor, the ip
//! domain's routing table).
//!
//! The one seqlock of the crate (loom-checked: `tests/loom.rs`): the sequence
//! word is odd while the writer rewrites, even when stable; a reader copies the
//! length and bytes out and keeps them only if the sequence was even and
//! unchanged across the copy. A length beyond the region, or a writer that never
//! finishes, is refused — never waited for, never trusted. Bytes travel as
//! 64-bit words of relaxed atomics, so the same code runs on a mapping and on
//! loom's heap storage.

use crate::shm::{ShmRead, ShmWrite};
use crate::sync::{fence, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"CAPBLOB1");
const OFF_MAGIC: usize = 0;
const OFF_SEQ: usize = 8;
const OFF_LEN: usize = 12;
/// Where the bytes start.
const OFF_DATA: usize = 64;

/// Reading a blob failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Not a published blob (or nothing published yet).
    #[error("no blob is published there")]
    Magic,
    /// The blob kept changing (or its writer is stuck mid-write).
    #[error("the blob was being rewritten on every attempt")]
    Busy,
    /// Its length does not fit the region.
    #[error("the blob's length is out of range")]
    Malformed,
}

/// The most bytes a region of `len` bytes holds (whole words).
pub fn capacity(len: usize) -> usize {
    len.saturating_sub(OFF_DATA) / 8 * 8
}

/// Bytes a region needs to hold `bytes` bytes.
pub const fn region_len(bytes: usize) -> usize {
    OFF_DATA + bytes.div_ceil(8) * 8
}

/// Publishes `bytes` (at most [`capacity`] of them; longer is cut).
pub fn publish(region: &impl ShmWrite, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(capacity(region.len()))];
    let seq = region.load32(OFF_SEQ, Ordering::Relaxed);
    region.store64(OFF_MAGIC, MAGIC, Ordering::Relaxed);
    region.store32(OFF_SEQ, seq.wrapping_add(1) | 1, Ordering::Relaxed);
    // Release fence: the odd sequence is visible before any byte changes (pairs
    // with the Acquire fence in `read`).
    fence(Ordering::Release);
    region.store32(OFF_LEN, bytes.len() as u32, Ordering::Relaxed);
    let words: Vec<u64> = bytes
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    region.store64_run(OFF_DATA, &words);
    // Release: the bytes are visible before the even sequence (never 0 again:
    // that means nothing was published).
    let done = (seq.wrapping_add(1) | 1).wrapping_add(1);
    region.store32(OFF_SEQ, done.max(2), Ordering::Release);
}

/// Copies the blob out of a read-only view, retrying a few times while it is
/// being rewritten.
pub fn read(view: &impl ShmRead) -> Result<Vec<u8>, BlobError> {
    if view.len() <= OFF_DATA || view.load64(OFF_MAGIC, Ordering::Relaxed) != MAGIC {
        return Err(BlobError::Magic);
    }
    let mut words = Vec::new();
    for _ in 0..100 {
        // Acquire pairs with the final Release store of the sequence in `publish`.
        let before = view.load32(OFF_SEQ, Ordering::Acquire);
        if before == 0 {
            // The magic is there but no publish finished yet (loom found a
            // reader that took this for an empty blob).
            return Err(BlobError::Magic);
        }
        if before & 1 == 1 {
            crate::sync::yield_now();
            continue;
        }
        let len = view.load32(OFF_LEN, Ordering::Relaxed) as usize;
        if len > capacity(view.len()) {
            return Err(BlobError::Malformed);
        }
        words.clear();
        words.resize(len.div_ceil(8), 0);
        view.load64_run(OFF_DATA, &mut words);
        // Acquire fence pairs with the Release fence in `publish`.
        fence(Ordering::Acquire);
        if view.load32(OFF_SEQ, Ordering::Relaxed) == before {
            let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            out.truncate(len);
            return Ok(out);
        }
    }
    Err(BlobError::Busy)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::region::{Region, RegionRo};

    #[test]
    fn a_published_blob_reads_back_and_a_bad_length_is_refused() {
        let r = Region::create("t-blob", 8192).expect("region");
        let view = || RegionRo::attach(r.fd().try_clone_to_owned().expect("dup"), 8192).expect("attach");
        assert_eq!(read(&view()), Err(BlobError::Magic));
        publish(&r, b"{\"domains\":[]}");
        assert_eq!(read(&view()).expect("read"), b"{\"domains\":[]}");
        publish(&r, &[7u8; 9000]);
        assert_eq!(read(&view()).expect("read").len(), capacity(8192), "cut to the region");
        r.store32(OFF_LEN, u32::MAX, Ordering::Relaxed);
        assert_eq!(read(&view()), Err(BlobError::Malformed));
        r.store32(OFF_SEQ, 1, Ordering::Relaxed);
        assert_eq!(read(&view()), Err(BlobError::Busy), "a writer stuck mid-write is not waited for");
    }
}
