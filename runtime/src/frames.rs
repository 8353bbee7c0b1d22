//! The frame channel between the driver and ip: two descriptor channels (one
//! per direction of frames) over the driver's rx pool and ip's tx pool, and the
//! halves each side makes, grants and joins.
//!
//! The driver group owns the device. Its reader thread reads each frame straight
//! into a buffer of the rx pool (the kernel's copy is the only one at the device
//! edge) and lends it to the stack over channel R; its writer thread takes the
//! stack's frames from the tx pool over channel T, copies each out to the device,
//! and returns the loan. The stack group owns the tx pool and the cores; it keeps
//! each received frame as a handle on the driver's buffer ([`capnet_ipc::lent`]):
//! ip copies the headers out to parse them (DESIGN, "Distrust") and the payload
//! stays where it is until the last handle on it drops — then the buffer goes
//! back on channel R.
//!
//! Two channels, one per direction of frames, so each driver thread owns one
//! channel end outright: the reader blocks in the device, the writer on its
//! channel's futex, and neither ever waits on the other. Here the groups are
//! threads; as processes (the factored issue) the same code runs on the other side
//! of `SCM_RIGHTS`.

use std::collections::VecDeque;

use std::sync::Arc;

use capnet_ipc::channel::ChannelParams;
use capnet_ipc::lent::{Chain, Loan, LoanPool, PoolKey, Returns, Views};
use capnet_ipc::pool::{BufferPool, ReaderId};
use capnet_ipc::region::Region;
use capnet_ipc::shm_channel::{self, ShmEnd};
use capnet_ipc::{Descriptor, End};

use crate::{Cores, RuntimeError, StackGroup};

/// The driver's receive pool.
pub const RX_POOL: u16 = 1;
/// The stack's transmit pool.
pub const TX_POOL: u16 = 2;
pub use capnet_proto::frames::HalfGrant;
pub(crate) use capnet_proto::frames::FRAME_LAYOUT;
pub(crate) const QUOTA: u32 = 768;
pub(crate) const BATCH: usize = 64;
/// Descriptors the reader lends per batch: room for a few 64 KiB chains.
pub(crate) const RX_BATCH: usize = 160;
/// The largest frame a chain may carry: 64 KiB of IP datagram plus Ethernet.
pub(crate) const MAX_FRAME: usize = 65536 + 14;
/// The MTU of an in-memory wire: the largest IPv4 datagram, as on Linux's
/// loopback (a frame is a chain of pool buffers; no device limits it).
pub const WIRE_MTU: usize = 65535;
/// Frames the stack group holds for a driver that does not take them.
pub(crate) const MAX_BACKLOG: usize = 4096;
/// The bit of a scribble request that spares the channels to ip.
pub(crate) fn ipc_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Ipc(e.to_string())
}

pub(crate) fn peer_err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Peer(e.to_string())
}

/// Frames lent to us on a channel: each a chain of handles on the lender's
/// buffers, given back on the same channel when the last handle drops.
#[derive(Debug)]
pub struct FramesIn {
    pub(crate) end: ShmEnd,
    key: PoolKey,
    views: Views,
    returns: Arc<Returns>,
    tickets: Vec<u64>,
    inbox: Vec<Descriptor>,
    back: Vec<Descriptor>,
    /// Pieces of a chain gather here until the one without MORE.
    frame: Chain,
    /// The segment size the chain's first piece asked for (TSO).
    mss: Option<u16>,
}

impl FramesIn {
    /// Frames lent on `end` from the pool `view` (numbered `pool`).
    pub(crate) fn new(end: ShmEnd, pool: u16, view: std::os::fd::OwnedFd) -> Result<Self, RuntimeError> {
        let mut views = Views::new();
        let key = views.add(pool, view).map_err(peer_err)?;
        Ok(Self {
            end,
            key,
            views,
            returns: Returns::new(),
            tickets: Vec::new(),
            inbox: Vec::with_capacity(256),
            back: Vec::with_capacity(256),
            frame: Chain::new(),
            mss: None,
        })
    }

    /// The lender's pool: its key and the fd of our view of it.
    pub(crate) fn pool(&self) -> Option<(PoolKey, std::os::fd::BorrowedFd<'_>)> {
        self.views.fd(self.key).map(|fd| (self.key, fd))
    }

    /// Gives back every buffer whose last handle dropped (as far as the ring
    /// takes them; the rest next time).
    pub(crate) fn flush_returns(&mut self) -> Result<(), RuntimeError> {
        self.returns.take(&mut self.tickets);
        for t in self.tickets.drain(..) {
            let d = Descriptor { pool: self.key.id, flags: Descriptor::RETURN, index: t as u32, offset: 0, len: 0 };
            self.back.push(d);
        }
        while !self.back.is_empty() {
            let k = self.end.send(&self.back).map_err(peer_err)?;
            if k == 0 {
                break;
            }
            self.back.drain(..k);
        }
        Ok(())
    }

    /// Takes descriptors and hands each whole frame to `each`, with the
    /// segment size a TSO chain's first piece asks for — at most `max` pieces
    /// of frames handed over, counting those of a chain begun in an earlier
    /// call; the number of descriptors taken (0: nothing had arrived, or `max`
    /// leaves no room beyond that chain).
    pub(crate) fn recv(
        &mut self,
        max: usize,
        mut each: impl FnMut(&Chain, Option<u16>) -> Result<(), RuntimeError>,
    ) -> Result<usize, RuntimeError> {
        self.flush_returns()?;
        self.inbox.clear();
        let k = self.end.recv(&mut self.inbox, max.saturating_sub(self.frame.pieces())).map_err(peer_err)?;
        for d in &self.inbox {
            if d.has(Descriptor::RETURN) || d.flags & !(Descriptor::MORE | Descriptor::TSO) != 0 {
                return Err(RuntimeError::Peer(format!("{d:?} on a channel that only lends frames")));
            }
            if d.pool != self.key.id {
                return Err(RuntimeError::Peer(format!("{d:?} names another pool than {}", self.key.id)));
            }
            let loan =
                Loan { ticket: u64::from(d.index), pool: self.key, index: d.index, offset: d.offset, len: d.len };
            let piece = self.views.borrow(&loan, &self.returns).map_err(peer_err)?;
            if d.has(Descriptor::TSO) {
                // A TSO chain is led by a piece holding its segment size.
                let mut mss = [0u8; 2];
                if !self.frame.is_empty()
                    || self.mss.is_some()
                    || !d.has(Descriptor::MORE)
                    || piece.peek(0, &mut mss) != 2
                {
                    return Err(RuntimeError::Peer(format!("{d:?}: a TSO piece not leading a chain")));
                }
                self.mss = Some(u16::from_le_bytes(mss));
                continue;
            }
            self.frame.push(piece);
            if self.frame.len() > MAX_FRAME {
                return Err(RuntimeError::Peer(format!("a chain of over {MAX_FRAME} bytes")));
            }
            if !d.has(Descriptor::MORE) {
                let frame = std::mem::take(&mut self.frame);
                each(&frame, self.mss.take())?;
            }
        }
        self.flush_returns()?;
        Ok(k)
    }
}

/// Frames lent to a peer from a pool of our own (the stack's tx pool, or a wire
/// side's), as far as buffers, the peer's quota and ring slots allow.
#[derive(Debug)]
pub struct FramesOut {
    pub(crate) end: ShmEnd,
    pub(crate) pool: BufferPool,
    pub(crate) peer: ReaderId,
    pub(crate) batch: Vec<Descriptor>,
    pub(crate) inbox: Vec<Descriptor>,
}

impl FramesOut {
    pub(crate) fn new(end: ShmEnd, pool: BufferPool, peer: ReaderId) -> Self {
        Self { end, pool, peer, batch: Vec::with_capacity(BATCH), inbox: Vec::with_capacity(1024) }
    }

    /// Lends the frames at the front of `backlog` and removes those sent:
    /// each copied from its handles into a buffer of our pool (the one copy
    /// a frame makes to reach the driver).
    pub fn send(&mut self, backlog: &mut VecDeque<(Chain, Option<u16>)>) -> Result<(), RuntimeError> {
        while !backlog.is_empty() {
            self.batch.clear();
            // Only whole chains, and only as many descriptors as the ring takes.
            let room = self.end.space_for(BATCH).map_err(peer_err)?.min(BATCH);
            let mut frames = 0;
            for (f, tso) in backlog.iter() {
                let start = self.batch.len();
                // A frame is one buffer (FRAME_LAYOUT holds the largest), a TSO
                // frame's segment size one more.
                let pieces = 1 + usize::from(tso.is_some());
                if start + pieces > room || self.pool.held_by(self.peer) as usize + pieces > QUOTA as usize {
                    break; // the ring or the peer's quota is full: wait for returns
                }
                // A TSO frame's chain is led by a piece holding its segment size.
                if let Some(mss) = tso {
                    let Some(mut d) = self.pool.fill(&mss.to_le_bytes()).map_err(ipc_err)? else { break };
                    d.flags |= Descriptor::TSO | Descriptor::MORE;
                    self.batch.push(d);
                }
                let Some(d) = self.pool.fill_from(f).map_err(ipc_err)? else {
                    for d in self.batch.drain(start..) {
                        self.pool.release(d.index).map_err(ipc_err)?;
                    }
                    break; // every buffer is out: wait for returns
                };
                self.batch.push(d);
                for d in &self.batch[start..] {
                    self.pool.lend(self.peer, d).map_err(ipc_err)?;
                }
                frames += 1;
            }
            if self.batch.is_empty() {
                return Ok(());
            }
            let sent = self.end.send(&self.batch).map_err(peer_err)?;
            if sent < self.batch.len() {
                return Err(RuntimeError::Peer("the peer's ring shrank under us".into()));
            }
            backlog.drain(..frames);
        }
        Ok(())
    }

    /// Takes back every loan the peer returned; whether any came.
    pub fn take_returns(&mut self) -> Result<bool, RuntimeError> {
        let mut any = false;
        loop {
            self.inbox.clear();
            if self.end.recv(&mut self.inbox, 1024).map_err(peer_err)? == 0 {
                return Ok(any);
            }
            any = true;
            for d in &self.inbox {
                if !d.has(Descriptor::RETURN) {
                    return Err(RuntimeError::Peer(format!("peer sent {d:?} on the channel it only returns on")));
                }
                self.pool.give_back(self.peer, d).map_err(peer_err)?;
            }
        }
    }
}

/// What one group owns before the two are joined: its pool (a
/// [`LoanPool`] on the driver's side, a [`BufferPool`] on the stack's) and its
/// two areas.
#[derive(Debug)]
pub(crate) struct Half<P> {
    pub(crate) pool: P,
    pub(crate) r_area: Region,
    pub(crate) t_area: Region,
}

/// A side's two channel areas, made and sealed here.
fn areas(tag: &str, r_end: End, t_end: End) -> Result<(Region, Region), RuntimeError> {
    let params = ChannelParams::default();
    Ok((
        shm_channel::create_area::<Descriptor>(&format!("capnet-{tag}-frames-in"), r_end, params).map_err(ipc_err)?,
        shm_channel::create_area::<Descriptor>(&format!("capnet-{tag}-frames-out"), t_end, params).map_err(ipc_err)?,
    ))
}

/// A side's two channel areas adopted from blanks.
fn adopt_areas(
    r_area: std::os::fd::OwnedFd,
    t_area: std::os::fd::OwnedFd,
    r_end: End,
    t_end: End,
) -> Result<(Region, Region), RuntimeError> {
    let params = ChannelParams::default();
    Ok((
        shm_channel::adopt_area::<Descriptor>(r_area, r_end, params).map_err(ipc_err)?,
        shm_channel::adopt_area::<Descriptor>(t_area, t_end, params).map_err(ipc_err)?,
    ))
}

impl<P> Half<P> {
    /// The fds to grant the peer: `pool` (this half's) and the areas.
    pub(crate) fn grant(&self, pool: &Region) -> Result<HalfGrant, RuntimeError> {
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map_err(ipc_err);
        Ok(HalfGrant { pool: dup(pool.fd())?, r_area: dup(self.r_area.fd())?, t_area: dup(self.t_area.fd())? })
    }
}

/// The driver group's half: the rx pool, end A of channel R, end B of channel T.
#[derive(Debug)]
pub struct DriverHalf(pub(crate) Half<LoanPool>);

/// The stack group's half: the tx pool, end B of channel R, end A of channel T.
#[derive(Debug)]
pub struct StackHalf(pub(crate) Half<BufferPool>);

impl DriverHalf {
    /// Creates (and seals) the driver's pool and areas.
    pub fn new() -> Result<Self, RuntimeError> {
        let pool = LoanPool::create("capnet-driver-pool", RX_POOL, FRAME_LAYOUT).map_err(ipc_err)?;
        let (r_area, t_area) = areas("driver", End::A, End::B)?;
        Ok(Self(Half { pool, r_area, t_area }))
    }

    /// The fds to grant the stack group.
    pub fn grant(&self) -> Result<HalfGrant, RuntimeError> {
        self.0.grant(self.0.pool.region())
    }

    /// The driver's half in blank regions (the sizes [`HalfGrant::blank`] makes):
    /// mapped, sealed and laid out here, for a sandboxed driver to rejoin a
    /// restarted stack group with.
    pub fn adopt(blank: HalfGrant) -> Result<Self, RuntimeError> {
        let (r_area, t_area) = adopt_areas(blank.r_area, blank.t_area, End::A, End::B)?;
        let pool = LoanPool::adopt(blank.pool, RX_POOL, FRAME_LAYOUT).map_err(ipc_err)?;
        Ok(Self(Half { pool, r_area, t_area }))
    }
}

impl StackHalf {
    /// Creates (and seals) the stack's pool and areas.
    pub fn new() -> Result<Self, RuntimeError> {
        let pool = BufferPool::create("capnet-stack-pool", TX_POOL, FRAME_LAYOUT).map_err(ipc_err)?;
        let (r_area, t_area) = areas("stack", End::B, End::A)?;
        Ok(Self(Half { pool, r_area, t_area }))
    }

    /// The fds to grant the driver group.
    pub fn grant(&self) -> Result<HalfGrant, RuntimeError> {
        self.0.grant(self.0.pool.region())
    }

    /// The stack half in blank regions from [`HalfGrant::blank`]: mapped, sealed
    /// and laid out here, so this process is their one writer.
    pub fn adopt(blank: HalfGrant) -> Result<Self, RuntimeError> {
        let (r_area, t_area) = adopt_areas(blank.r_area, blank.t_area, End::B, End::A)?;
        let pool = BufferPool::adopt(blank.pool, TX_POOL, FRAME_LAYOUT).map_err(ipc_err)?;
        Ok(Self(Half { pool, r_area, t_area }))
    }

    /// Joins the driver group's grant: the stack group, ready to poll.
    pub fn join(self, driver: HalfGrant, cores: Cores) -> Result<StackGroup, RuntimeError> {
        let mut stack = StackGroup::unplugged(cores);
        stack.plug(self.attach(driver, Peer::Driver)?)?;
        Ok(stack)
    }

    /// This half attached to the peer's: the frames it lends us, the frames we
    /// lend it.
    pub fn attach(self, peer: HalfGrant, kind: Peer) -> Result<(FramesIn, FramesOut), RuntimeError> {
        let params = ChannelParams::default();
        let Half { pool: mut tx_pool, r_area, t_area } = self.0;
        let peer_reader = tx_pool.add_reader(QUOTA);
        // A wire's peer is a stack half too: its T channel is our R, and the
        // other way round.
        let (view_id, their_r, their_t) = match kind {
            Peer::Driver => (RX_POOL, peer.r_area, peer.t_area),
            Peer::Wire => (TX_POOL, peer.t_area, peer.r_area),
        };
        let rx = shm_channel::attach::<Descriptor>(r_area, their_r, End::B, params).map_err(peer_err)?;
        let tx = shm_channel::attach::<Descriptor>(t_area, their_t, End::A, params).map_err(peer_err)?;
        Ok((FramesIn::new(rx, view_id, peer.pool)?, FramesOut::new(tx, tx_pool, peer_reader)))
    }
}

/// What is at the other end of a stack half's frame channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The driver's half: it lends frames from its rx pool.
    Driver,
    /// Another capnet instance's stack half (the in-memory wire): the two lend
    /// each other frames from their tx pools.
    Wire,
}
