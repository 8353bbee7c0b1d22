//! The routing table, published read-only to other domains and the supervisor.
//!
//! The ip domain owns a region (sealed like every single-writer region) and
//! rewrites the table in it whenever it changes, through ipc's one seqlock
//! (`capnet_ipc::blob`, loom-checked): each route is a record of destination,
//! prefix length and gateway. A reader can never write, and a torn, garbled or
//! oversized table is refused, never trusted.

use capnet_ipc::blob::{self, BlobError};
use capnet_ipc::shm::{ShmRead, ShmWrite};
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

use crate::route::{Route, RouteTable};

/// Routes a published table holds at most.
pub const MAX_ROUTES: usize = 64;
/// Bytes of one route: destination, prefix length, gateway (0: directly
/// connected), padding.
const RECORD: usize = 12;
/// Bytes the region needs.
pub const REGION_LEN: usize = blob::region_len(MAX_ROUTES * RECORD);

/// Writes `table` into the owner's region (the first `MAX_ROUTES` routes).
pub fn publish(region: &impl ShmWrite, table: &RouteTable) {
    let mut bytes = Vec::with_capacity(MAX_ROUTES * RECORD);
    for r in table.routes().iter().take(MAX_ROUTES) {
        bytes.extend_from_slice(&r.dest.address().octets());
        bytes.extend_from_slice(&[r.dest.prefix_len(), 0, 0, 0]);
        bytes.extend_from_slice(&r.via.map_or(0, u32::from).to_be_bytes());
    }
    blob::publish(region, &bytes);
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
    /// The table is garbled (a length or prefix out of range).
    #[error("the routing table is malformed")]
    Malformed,
}

/// Copies the table out of a (read-only) view, retrying a few times if it is
/// being rewritten.
pub fn read(view: &impl ShmRead) -> Result<Vec<Route>, ReadError> {
    let bytes = blob::read(view).map_err(|e| match e {
        BlobError::Magic => ReadError::Magic,
        BlobError::Busy => ReadError::Busy,
        BlobError::Malformed => ReadError::Malformed,
    })?;
    if bytes.len() % RECORD != 0 || bytes.len() > MAX_ROUTES * RECORD {
        return Err(ReadError::Malformed);
    }
    bytes
        .chunks_exact(RECORD)
        .map(|r| {
            let dest = Ipv4Address::new(r[0], r[1], r[2], r[3]);
            if r[4] > 32 {
                return Err(ReadError::Malformed);
            }
            let via = u32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            Ok(Route { dest: Ipv4Cidr::new(dest, r[4]), via: (via != 0).then(|| Ipv4Address::from(via)) })
        })
        .collect()
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
        // A record that is not one (its prefix past 32), and a length of no records.
        let mut bad = vec![0u8; RECORD];
        bad[4] = 33;
        capnet_ipc::blob::publish(&region, &bad);
        assert_eq!(read(&region), Err(ReadError::Malformed));
        capnet_ipc::blob::publish(&region, &[0u8; RECORD + 1]);
        assert_eq!(read(&region), Err(ReadError::Malformed));
        // The blob's sequence word (offset 8) left odd: a writer stuck mid-write.
        region.store32(8, 7, capnet_ipc::Ordering::Relaxed);
        assert_eq!(read(&region), Err(ReadError::Busy), "a writer stuck mid-write is not waited for forever");
    }
}
