//! The routing table, published read-only to other domains and the supervisor.
//!
//! The ip domain owns a region (sealed like every single-writer region) and
//! rewrites the table in it whenever it changes, under a sequence word: odd while
//! writing, even when stable. A reader copies the table out and keeps it only if
//! the sequence was even and unchanged across the copy (a seqlock); a reader can
//! never write, and a torn or garbled table is refused, never trusted.

use std::sync::atomic::{fence, Ordering};

use capnet_ipc::shm::{ShmRead, ShmWrite};
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

use crate::route::{Route, RouteTable};

const MAGIC: u64 = u64::from_le_bytes(*b"CAPNETRT");
const OFF_MAGIC: usize = 0;
const OFF_SEQ: usize = 8;
const OFF_COUNT: usize = 12;
const OFF_ROUTES: usize = 64;
/// Routes a published table holds at most.
pub const MAX_ROUTES: usize = 64;
/// Gateways (0: directly connected), one `u32` per route, after the destinations.
const OFF_VIA: usize = OFF_ROUTES + MAX_ROUTES * 8;
/// Bytes the region needs.
pub const REGION_LEN: usize = OFF_VIA + MAX_ROUTES * 4;

/// Writes `table` into the owner's region (the first `MAX_ROUTES` routes).
pub fn publish(region: &impl ShmWrite, table: &RouteTable) {
    let seq = region.load32(OFF_SEQ, Ordering::Relaxed);
    region.store64(OFF_MAGIC, MAGIC, Ordering::Relaxed);
    region.store32(OFF_SEQ, seq.wrapping_add(1) | 1, Ordering::Relaxed);
    // Release fence: the odd sequence is visible before any route word changes
    // (pairs with the Acquire fence in `read`).
    fence(Ordering::Release);
    let routes = &table.routes()[..table.routes().len().min(MAX_ROUTES)];
    region.store32(OFF_COUNT, routes.len() as u32, Ordering::Relaxed);
    for (i, r) in routes.iter().enumerate() {
        let via = r.via.map_or(0, u32::from);
        let word = (u64::from(u32::from(r.dest.address())) << 32) | (u64::from(r.dest.prefix_len()) << 24);
        region.store64(OFF_ROUTES + i * 8, word, Ordering::Relaxed);
        region.store32(OFF_VIA + i * 4, via, Ordering::Relaxed);
    }
    // Release: the routes are visible before the even sequence.
    region.store32(OFF_SEQ, (seq.wrapping_add(1) | 1).wrapping_add(1), Ordering::Release);
}

/// Reading a published table failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// Not a published routing table.
    #[error("not a capnet routing table")]
    Magic,
    /// The table kept changing (or its writer is stuck mid-write).
    #[error("the routing table was being rewritten on every attempt")]
    Busy,
    /// The table is garbled (a count or prefix out of range).
    #[error("the routing table is malformed")]
    Malformed,
}

/// Copies the table out of a (read-only) view, retrying a few times if it is
/// being rewritten.
pub fn read(view: &impl ShmRead) -> Result<Vec<Route>, ReadError> {
    if view.len() < REGION_LEN || view.load64(OFF_MAGIC, Ordering::Relaxed) != MAGIC {
        return Err(ReadError::Magic);
    }
    for _ in 0..100 {
        // Acquire pairs with the final Release store of the sequence in `publish`.
        let before = view.load32(OFF_SEQ, Ordering::Acquire);
        if before & 1 == 1 {
            std::thread::yield_now();
            continue;
        }
        let count = view.load32(OFF_COUNT, Ordering::Relaxed) as usize;
        let mut out = Vec::with_capacity(count.min(MAX_ROUTES));
        let mut ok = count <= MAX_ROUTES;
        for i in 0..count.min(MAX_ROUTES) {
            let word = view.load64(OFF_ROUTES + i * 8, Ordering::Relaxed);
            let via = view.load32(OFF_VIA + i * 4, Ordering::Relaxed);
            let prefix = ((word >> 24) & 0xff) as u8;
            ok &= prefix <= 32;
            let dest = Ipv4Cidr::new(Ipv4Address::from((word >> 32) as u32), prefix.min(32));
            out.push(Route { dest, via: (via != 0).then(|| Ipv4Address::from(via)) });
        }
        // Acquire fence pairs with the Release fence in `publish`: if a writer
        // started meanwhile, the sequence read next shows it.
        fence(Ordering::Acquire);
        if view.load32(OFF_SEQ, Ordering::Relaxed) == before {
            return if ok { Ok(out) } else { Err(ReadError::Malformed) };
        }
    }
    Err(ReadError::Busy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capnet_ipc::shm::HeapWords;

    #[test]
    fn a_published_table_reads_back_and_garbage_is_refused() {
        let region = HeapWords::new(REGION_LEN);
        assert_eq!(read(&region), Err(ReadError::Magic));
        let mut t = RouteTable::connected(
            Ipv4Cidr::new(Ipv4Address::new(10, 77, 0, 2), 24),
            Some(Ipv4Address::new(10, 77, 0, 1)),
        );
        for i in 0..40u8 {
            t.add(Route {
                dest: Ipv4Cidr::new(Ipv4Address::new(192, 0, i, 0), 24),
                via: Some(Ipv4Address::new(10, 77, 0, 9)),
            });
        }
        publish(&region, &t);
        assert_eq!(read(&region).expect("read"), t.routes().to_vec());
        region.store32(OFF_COUNT, 1000, Ordering::Relaxed);
        assert_eq!(read(&region), Err(ReadError::Malformed));
        region.store32(OFF_SEQ, 7, Ordering::Relaxed);
        assert_eq!(read(&region), Err(ReadError::Busy), "a writer stuck mid-write is not waited for forever");
    }
}
