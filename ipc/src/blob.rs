//! A published blob: bytes one domain rewrites in a region of its own and others
//! copy out read-only (a domain's status report for the supervisor).
//!
//! A seqlock, as the routing table's: the sequence word is odd while the writer
//! rewrites, even when stable; a reader copies the length and bytes out and keeps
//! them only if the sequence was even and unchanged across the copy. A length
//! beyond the region, or a writer that never finishes, is refused — never waited
//! for, never trusted.

use std::sync::atomic::{fence, Ordering};

use crate::region::{Region, RegionRo};
use crate::shm::{ShmRead, ShmWrite};

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

/// The most bytes a region of `len` bytes holds.
pub fn capacity(len: usize) -> usize {
    len.saturating_sub(OFF_DATA)
}

/// Publishes `bytes` (at most [`capacity`] of them; longer is cut).
pub fn publish(region: &Region, bytes: &[u8]) {
    let bytes = &bytes[..bytes.len().min(capacity(region.len()))];
    let seq = region.load32(OFF_SEQ, Ordering::Relaxed);
    region.store64(OFF_MAGIC, MAGIC, Ordering::Relaxed);
    region.store32(OFF_SEQ, seq.wrapping_add(1) | 1, Ordering::Relaxed);
    // Release fence: the odd sequence is visible before any byte changes (pairs
    // with the Acquire fence in `read`).
    fence(Ordering::Release);
    region.store32(OFF_LEN, bytes.len() as u32, Ordering::Relaxed);
    region.copy_in(OFF_DATA, bytes);
    // Release: the bytes are visible before the even sequence.
    region.store32(OFF_SEQ, (seq.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
}

/// Copies the blob out of a read-only view, retrying a few times while it is
/// being rewritten.
pub fn read(view: &RegionRo) -> Result<Vec<u8>, BlobError> {
    if view.len() <= OFF_DATA || view.load64(OFF_MAGIC, Ordering::Relaxed) != MAGIC {
        return Err(BlobError::Magic);
    }
    for _ in 0..100 {
        // Acquire pairs with the final Release store of the sequence in `publish`.
        let before = view.load32(OFF_SEQ, Ordering::Acquire);
        if before & 1 == 1 {
            std::thread::yield_now();
            continue;
        }
        let len = view.load32(OFF_LEN, Ordering::Relaxed) as usize;
        if len > capacity(view.len()) {
            return Err(BlobError::Malformed);
        }
        let mut out = vec![0u8; len];
        view.copy_out(OFF_DATA, &mut out);
        // Acquire fence pairs with the Release fence in `publish`.
        fence(Ordering::Acquire);
        if view.load32(OFF_SEQ, Ordering::Relaxed) == before {
            return Ok(out);
        }
    }
    Err(BlobError::Busy)
}

#[cfg(test)]
mod tests {
    use super::*;

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
