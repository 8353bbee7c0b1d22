//! Message ends: a channel plus a pool of one's own and a view of the peer's, for
//! variable-size messages (control calls with their payloads).
//!
//! A message is written into a buffer of the sender's pool, lent with a
//! [`Descriptor::CONTROL`] descriptor, copied out by the receiver (which validates
//! it — rkyv — only on that private copy) and returned at once with
//! [`Descriptor::RETURN`]. Both directions share the channel; each side owns one
//! pool. Loans a message made ([`crate::lent::Loan`]) come back on the same
//! ring under their tickets ([`Descriptor::LOAN`]): [`MsgEnd::return_loans`]
//! sends them, [`MsgEnd::take_returned_loans`] collects what the peer sent.

use std::os::fd::OwnedFd;

use crate::channel::ChannelParams;
use crate::pool::{BufferPool, PoolError, PoolLayout, PoolView, ReaderId};
use crate::region::Region;
use crate::shm_channel::{self, ShmChannelError, ShmEnd};
use crate::{Descriptor, End, RingError};

/// The largest message: a TCP read or write of up to 1000 KiB plus its call
/// (fewer, larger calls: each costs a request, a reply and often a wake-up). A
/// buffer is at most 1 MiB, so this is as large as a message gets. Each side's
/// pool is 16 of them, touched only as messages use them.
pub const MAX_MESSAGE: u32 = 1016 * 1024;
const BUFFERS: u32 = 16;

/// What a message end needs from its side to be attached.
#[derive(Debug)]
pub struct MsgHalf {
    area: crate::region::Region,
    pool: BufferPool,
}

/// The fds one side grants the other: its channel area and its pool.
#[derive(Debug)]
pub struct MsgGrant {
    /// The sender's channel area.
    pub area: OwnedFd,
    /// The sender's pool.
    pub pool: OwnedFd,
}

/// Errors making, attaching or using a message end.
#[derive(Debug, thiserror::Error)]
pub enum MsgError {
    /// The channel could not be made or attached.
    #[error(transparent)]
    Channel(#[from] ShmChannelError),
    /// A pool problem (including a peer's bad descriptor).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The peer broke the ring.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The peer sent a descriptor that is neither a message nor a return.
    #[error("peer sent an unexpected descriptor {0:?}")]
    Unexpected(Descriptor),
    /// A message is larger than [`MAX_MESSAGE`].
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// Duplicating an fd failed.
    #[error("cannot duplicate an fd: {0}")]
    Io(#[from] std::io::Error),
}

const PARAMS: ChannelParams = ChannelParams { capacity: 64, epoch: 1 };
const LAYOUT: PoolLayout = PoolLayout { buf_size: MAX_MESSAGE + 64, count: BUFFERS, headroom: 0 };

impl MsgHalf {
    /// Makes this side's area (as `end`) and pool.
    pub fn new(name: &str, end: End) -> Result<Self, MsgError> {
        let area = shm_channel::create_area::<Descriptor>(&format!("{name}.area"), end, PARAMS)?;
        let pool = BufferPool::create(&format!("{name}.pool"), end as u16 + 1, LAYOUT)?;
        Ok(Self { area, pool })
    }

    /// Blank regions of the sizes a side needs, for a domain that may no longer
    /// create memory (the supervisor makes them; the domain [`adopt`](Self::adopt)s).
    pub fn blank(name: &str) -> Result<MsgGrant, MsgError> {
        let area = Region::blank(&format!("{name}.area"), crate::channel::area_len::<Descriptor>(PARAMS.capacity))
            .map_err(ShmChannelError::from)?;
        let pool = Region::blank(&format!("{name}.pool"), LAYOUT.region_len()).map_err(ShmChannelError::from)?;
        Ok(MsgGrant { area, pool })
    }

    /// This side (as `end`) in blank regions granted by the supervisor: mapped,
    /// sealed and laid out here, so this process is their one writer.
    pub fn adopt(blank: MsgGrant, end: End) -> Result<Self, MsgError> {
        let area = shm_channel::adopt_area::<Descriptor>(blank.area, end, PARAMS)?;
        let pool = BufferPool::adopt(blank.pool, end as u16 + 1, LAYOUT)?;
        Ok(Self { area, pool })
    }

    /// The fds to grant the peer.
    pub fn grant(&self) -> Result<MsgGrant, MsgError> {
        Ok(MsgGrant { area: self.area.fd().try_clone_to_owned()?, pool: self.pool.region().fd().try_clone_to_owned()? })
    }

    /// Attaches to the peer's grant.
    pub fn attach(self, end: End, peer: MsgGrant) -> Result<MsgEnd, MsgError> {
        let chan = shm_channel::attach::<Descriptor>(self.area, peer.area, end, PARAMS)?;
        let mut pool = self.pool;
        let reader = pool.add_reader(BUFFERS);
        let view = PoolView::attach(peer.pool, end.other() as u16 + 1)?;
        if view.layout() != LAYOUT {
            return Err(MsgError::Pool(PoolError::Header("a message pool of another shape")));
        }
        Ok(MsgEnd {
            chan,
            pool,
            reader,
            view,
            returns: Vec::new(),
            inbox: Vec::new(),
            scratch: Vec::new(),
            loans_back: Vec::new(),
        })
    }
}

/// One side of a message channel.
#[derive(Debug)]
pub struct MsgEnd {
    chan: ShmEnd,
    pool: BufferPool,
    reader: ReaderId,
    view: PoolView,
    returns: Vec<Descriptor>,
    inbox: Vec<Descriptor>,
    scratch: Vec<u8>,
    /// Tickets of our loans the peer gave back, until taken.
    loans_back: Vec<u64>,
}

impl MsgEnd {
    /// The channel end (to wait on it).
    pub fn channel(&mut self) -> &mut ShmEnd {
        &mut self.chan
    }

    /// The id of this end's own pool (what its descriptors name).
    pub fn pool_id(&self) -> u16 {
        self.pool.id()
    }

    /// Sends one message. `Ok(false)`: no buffer or ring slot free now (retry after
    /// the peer returns some).
    pub fn send(&mut self, bytes: &[u8]) -> Result<bool, MsgError> {
        if bytes.len() > MAX_MESSAGE as usize {
            return Err(MsgError::TooLarge(bytes.len()));
        }
        self.flush_returns()?;
        if self.chan.space()? == 0 {
            return Ok(false);
        }
        let Some(mut d) = self.pool.fill_message(bytes)? else { return Ok(false) };
        d.flags = Descriptor::CONTROL;
        self.pool.lend(self.reader, &d)?;
        if self.chan.send(&[d])? == 0 {
            self.pool.give_back(self.reader, &d)?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Receives every message waiting, handing each to `each` as a private copy
    /// (in a buffer reused from message to message), returning loans and taking
    /// back ours.
    pub fn recv(&mut self, mut each: impl FnMut(&[u8])) -> Result<usize, MsgError> {
        let mut n = 0;
        loop {
            self.inbox.clear();
            if self.chan.recv(&mut self.inbox, 64)? == 0 {
                break;
            }
            for d in &self.inbox {
                if d.has(Descriptor::RETURN) && d.has(Descriptor::LOAN) {
                    self.loans_back.push(u64::from(d.index) | (u64::from(d.offset) << 32));
                } else if d.has(Descriptor::RETURN) {
                    self.pool.give_back(self.reader, d)?;
                } else if d.has(Descriptor::CONTROL) {
                    if d.len > MAX_MESSAGE {
                        return Err(MsgError::TooLarge(d.len as usize));
                    }
                    each(self.view.read_reusing(d, &mut self.scratch)?);
                    self.returns.push(Descriptor { flags: Descriptor::RETURN, ..*d });
                    n += 1;
                } else {
                    return Err(MsgError::Unexpected(*d));
                }
            }
        }
        self.flush_returns()?;
        Ok(n)
    }

    /// Gives the peer back loans it made inside its messages, by ticket (sent
    /// with the next returns if the ring is full now).
    pub fn return_loans(&mut self, tickets: &[u64]) -> Result<(), MsgError> {
        for &t in tickets {
            let flags = Descriptor::RETURN | Descriptor::LOAN;
            self.returns.push(Descriptor { pool: 0, flags, index: t as u32, offset: (t >> 32) as u32, len: 0 });
        }
        self.flush_returns()
    }

    /// The tickets of loans the peer gave back since the last call.
    pub fn take_returned_loans(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.loans_back);
    }

    /// Test-only hostile behaviour (the `hostile` feature only): takes back this end's
    /// own buffers the peer returned, but holds every message the peer lent
    /// and reads none — a reader that never reads, yet keeps sending.
    #[cfg(feature = "hostile")]
    #[doc(hidden)]
    pub fn hostile_hold_messages(&mut self) -> Result<(), MsgError> {
        self.inbox.clear();
        self.chan.recv(&mut self.inbox, 64)?;
        for d in &self.inbox {
            if d.has(Descriptor::RETURN) {
                self.pool.give_back(self.reader, d)?;
            }
        }
        Ok(())
    }

    fn flush_returns(&mut self) -> Result<(), MsgError> {
        while !self.returns.is_empty() {
            let k = self.chan.send(&self.returns)?;
            if k == 0 {
                break; // the ring is full of our messages: returns go out next time
            }
            self.returns.drain(..k);
        }
        Ok(())
    }
}
