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
use capnet_ipc::lent::{Chain, Lent, Loan, LoanPool, PoolKey, Returns, Views};
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
    /// The applications' send pools the lender may name (the driver's
    /// channel T: ip lends a frame's payload where it lies), by alias, and
    /// our views of them.
    aliases: Vec<(u16, PoolKey)>,
    app_views: Views,
    /// Aliases forgotten lately: a piece naming one (lent before the lender
    /// heard) drops its frame, given back unread.
    gone: VecDeque<u16>,
    /// The chain being gathered names a forgotten alias: it is dropped whole.
    doomed: bool,
    /// Pieces read in place from an application's send pool, so far.
    pub(crate) borrowed_pieces: u64,
    /// Frames dropped for naming a forgotten alias, so far.
    pub(crate) dropped_gone: u64,
    /// Pools to read (`Some`) or forget (`None`) by alias, queued by the
    /// group's control thread: taken before each batch, and again before a
    /// piece naming an alias we do not know yet is refused (the pool's
    /// grant is answered before the lender may name it).
    pub(crate) incoming: Arc<AliasQueue>,
}

/// Aliased pools queued for a [`FramesIn`] (see `FramesIn::incoming`).
pub(crate) type AliasQueue = std::sync::Mutex<Vec<(u16, Option<std::os::fd::OwnedFd>)>>;

/// Aliases a [`FramesIn`] remembers as forgotten.
const GONE_KEPT: usize = 64;

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
            aliases: Vec::new(),
            app_views: Views::new(),
            gone: VecDeque::new(),
            doomed: false,
            borrowed_pieces: 0,
            dropped_gone: 0,
            incoming: Arc::default(),
        })
    }

    /// Reads or forgets the pools queued in `incoming`; whether any came.
    fn take_incoming(&mut self) -> bool {
        let queued = std::mem::take(&mut *self.incoming.lock().unwrap_or_else(|e| e.into_inner()));
        let any = !queued.is_empty();
        for (alias, fd) in queued {
            match fd {
                // The application made it: a bad one is refused alone (ip,
                // refusing it too, never lends it).
                Some(fd) => {
                    if let Err(e) = self.add_alias(alias, fd) {
                        tracing::warn!("an application's send pool is refused: {e}");
                    }
                }
                None => self.forget_alias(alias),
            }
        }
        any
    }

    /// Reads application send pool `fd` too, named `alias` on this channel.
    pub(crate) fn add_alias(&mut self, alias: u16, fd: std::os::fd::OwnedFd) -> Result<(), RuntimeError> {
        let key = self.app_views.add_beside(capnet_proto::app::SEND_POOL, fd).map_err(ipc_err)?;
        self.aliases.retain(|(a, _)| *a != alias);
        self.aliases.push((alias, key));
        self.gone.retain(|a| *a != alias);
        Ok(())
    }

    /// Forgets the pool named `alias` (handles on it keep their mapping
    /// until they drop).
    pub(crate) fn forget_alias(&mut self, alias: u16) {
        if let Some(k) = self.aliases.iter().position(|(a, _)| *a == alias) {
            let (_, key) = self.aliases.remove(k);
            self.app_views.remove(key);
            self.gone.push_back(alias);
            if self.gone.len() > GONE_KEPT {
                self.gone.pop_front();
            }
        }
    }

    /// Takes over the aliased pools `old` read and its queue (a fresh
    /// channel to a restarted lender: the applications' pools are the same).
    pub(crate) fn inherit_aliases(&mut self, old: &mut FramesIn) {
        self.incoming = old.incoming.clone();
        self.aliases = std::mem::take(&mut old.aliases);
        self.app_views = std::mem::take(&mut old.app_views);
        self.gone = std::mem::take(&mut old.gone);
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
            // A ticket is the buffer's index, above it an alias's pool id.
            let pool = match (t >> 32) as u16 {
                0 => self.key.id,
                alias => alias,
            };
            let d = Descriptor { pool, flags: Descriptor::RETURN, index: t as u32, offset: 0, len: 0 };
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
        self.take_incoming();
        let inbox = std::mem::take(&mut self.inbox);
        let r = self.take_pieces(&inbox, &mut each);
        self.inbox = inbox;
        r?;
        self.flush_returns()?;
        Ok(k)
    }

    /// Gathers `inbox`'s pieces into chains, handing each whole one to `each`.
    fn take_pieces(
        &mut self,
        inbox: &[Descriptor],
        each: &mut impl FnMut(&Chain, Option<u16>) -> Result<(), RuntimeError>,
    ) -> Result<(), RuntimeError> {
        for d in inbox {
            if d.has(Descriptor::RETURN) || d.flags & !(Descriptor::MORE | Descriptor::TSO) != 0 {
                return Err(RuntimeError::Peer(format!("{d:?} on a channel that only lends frames")));
            }
            let known = |me: &Self| me.aliases.iter().find(|(a, _)| *a == d.pool).map(|(_, k)| *k);
            let alias = match known(self) {
                None if d.pool != self.key.id && self.take_incoming() => known(self),
                k => k,
            };
            let (key, ticket) = if d.pool == self.key.id {
                (self.key, u64::from(d.index))
            } else if let Some(key) = alias {
                self.borrowed_pieces += 1;
                (key, u64::from(d.pool) << 32 | u64::from(d.index))
            } else if self.gone.contains(&d.pool) && !d.has(Descriptor::TSO) {
                // Lent before the lender heard the application left: its frame
                // goes unsent, this piece back at once.
                self.back.push(Descriptor {
                    pool: d.pool,
                    flags: Descriptor::RETURN,
                    index: d.index,
                    offset: 0,
                    len: 0,
                });
                self.doomed = true;
                if !d.has(Descriptor::MORE) {
                    self.drop_doomed();
                }
                continue;
            } else {
                return Err(RuntimeError::Peer(format!("{d:?} names a pool it may not lend")));
            };
            let loan = Loan { ticket, pool: key, index: d.index, offset: d.offset, len: d.len };
            let views = if key == self.key { &self.views } else { &self.app_views };
            let piece = views.borrow(&loan, &self.returns).map_err(peer_err)?;
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
                if self.doomed {
                    self.drop_doomed();
                    continue;
                }
                let frame = std::mem::take(&mut self.frame);
                each(&frame, self.mss.take())?;
            }
        }
        Ok(())
    }

    /// Drops the chain gathered so far (it named a forgotten pool).
    fn drop_doomed(&mut self) {
        self.frame = Chain::new();
        self.mss = None;
        self.doomed = false;
        self.dropped_gone += 1;
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
    /// The peer is the driver (not a wire's other instance): it views the
    /// applications' send pools, so a frame's payload is lent where it lies.
    to_driver: bool,
    /// Handles on applications' buffers lent in place, by (alias, buffer),
    /// in the order lent, until the peer gives each back.
    lent: VecDeque<(u16, u32, Lent)>,
}

/// The most header bytes a frame lent in place may have (Ethernet, IPv4 and
/// TCP with all their options: 14 + 60 + 60).
const MAX_HEAD: usize = 134;

impl FramesOut {
    pub(crate) fn new(end: ShmEnd, pool: BufferPool, peer: ReaderId, to_driver: bool) -> Self {
        let (batch, inbox) = (Vec::with_capacity(BATCH), Vec::with_capacity(1024));
        Self { end, pool, peer, batch, inbox, to_driver, lent: VecDeque::new() }
    }

    /// Lends the frames at the front of `backlog` and removes those sent. A
    /// frame whose payload lies in applications' send pools the driver views
    /// (`aliases`: each pool's key and the id channel T names it by) goes as
    /// its headers, copied into a buffer of our pool, then its payload's
    /// buffers, lent in place; any other is copied from its handles into one
    /// buffer of our pool (the one copy a frame makes to reach the driver).
    pub fn send(
        &mut self,
        backlog: &mut VecDeque<(Chain, Option<u16>)>,
        aliases: &[(PoolKey, u16)],
    ) -> Result<(), RuntimeError> {
        let aliases = if self.to_driver { aliases } else { &[] };
        while !backlog.is_empty() {
            self.batch.clear();
            // Only whole chains, and only as many descriptors as the ring takes.
            let room = self.end.space_for(BATCH).map_err(peer_err)?.min(BATCH);
            let mut frames = 0;
            for (f, tso) in backlog.iter() {
                let start = self.batch.len();
                // A frame is one buffer (FRAME_LAYOUT holds the largest), or
                // its headers' and its payload's in place; a TSO frame's
                // segment size one more.
                // Past the driver's quota of loans in place the frame is copied
                // (a driver that keeps them holds only its quota).
                let in_place = in_place(f, aliases).filter(|(_, n)| self.lent.len() + n <= QUOTA as usize);
                let mine = 1 + usize::from(tso.is_some());
                let pieces = mine + in_place.map_or(0, |(_, n)| n);
                if start + pieces > room || self.pool.held_by(self.peer) as usize + mine > QUOTA as usize {
                    break; // the ring or the peer's quota is full: wait for returns
                }
                // A TSO frame's chain is led by a piece holding its segment size.
                if let Some(mss) = tso {
                    let Some(mut d) = self.pool.fill(&mss.to_le_bytes()).map_err(ipc_err)? else { break };
                    d.flags |= Descriptor::TSO | Descriptor::MORE;
                    self.batch.push(d);
                }
                let filled = match in_place {
                    Some((head, _)) => {
                        // The headers only: parsed bytes, not payload.
                        let mut bytes = [0u8; MAX_HEAD];
                        let n = f.peek(0, &mut bytes[..head]);
                        self.pool.fill(&bytes[..n])
                    }
                    None => self.pool.fill_from(f),
                };
                let Some(mut d) = filled.map_err(ipc_err)? else {
                    for d in self.batch.drain(start..) {
                        self.pool.release(d.index).map_err(ipc_err)?;
                    }
                    break; // every buffer is out: wait for returns
                };
                if in_place.is_some() {
                    d.flags |= Descriptor::MORE;
                }
                self.batch.push(d);
                for d in &self.batch[start..] {
                    self.pool.lend(self.peer, d).map_err(ipc_err)?;
                }
                if let Some((_, n)) = in_place {
                    for (i, piece) in f.iter().skip(f.pieces() - n).enumerate() {
                        let lent_as = alias_of(piece, aliases).zip(piece.place());
                        let Some((alias, (_, index, offset))) = lent_as else {
                            return Err(ipc_err("a piece in_place took is off its pool"));
                        };
                        let flags = if i + 1 < n { Descriptor::MORE } else { 0 };
                        self.batch.push(Descriptor { pool: alias, flags, index, offset, len: piece.len() as u32 });
                        self.lent.push_back((alias, index, piece.clone()));
                    }
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
                if d.pool == self.pool.id() {
                    self.pool.give_back(self.peer, d).map_err(peer_err)?;
                    continue;
                }
                // A buffer lent in place (the first lent of it: any of its
                // loans frees the same buffer).
                match self.lent.iter().position(|(a, i, _)| (*a, *i) == (d.pool, d.index)) {
                    Some(k) => drop(self.lent.remove(k)),
                    None => return Err(RuntimeError::Peer(format!("peer returned {d:?}, which it was never lent"))),
                }
            }
        }
    }
}

/// How frame `f` goes to the driver in place, if it can: the length of its
/// headers (the leading handles of our own, at most [`MAX_HEAD`] bytes) and
/// how many handles its payload is — when every one of those lies in a pool
/// of `aliases`.
fn in_place(f: &Chain, aliases: &[(PoolKey, u16)]) -> Option<(usize, usize)> {
    if aliases.is_empty() {
        return None;
    }
    let head_pieces = f.iter().take_while(|l| !l.borrowed()).count();
    let head: usize = f.iter().take(head_pieces).map(Lent::len).sum();
    let payload = f.pieces() - head_pieces;
    // With its header's and a TSO piece, one frame fits a batch.
    if head == 0 || head > MAX_HEAD || payload == 0 || payload + 2 > BATCH {
        return None;
    }
    f.iter().skip(head_pieces).all(|l| alias_of(l, aliases).is_some()).then_some((head, payload))
}

/// The alias of the pool handle `l` lies in, if `aliases` names it.
fn alias_of(l: &Lent, aliases: &[(PoolKey, u16)]) -> Option<u16> {
    let key = l.pool_key()?;
    aliases.iter().find(|(k, _)| *k == key).map(|(_, a)| *a)
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
        let to_driver = kind == Peer::Driver;
        Ok((FramesIn::new(rx, view_id, peer.pool)?, FramesOut::new(tx, tx_pool, peer_reader, to_driver)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use capnet_ipc::lent::Ledger;
    use capnet_ipc::pool::PoolLayout;
    use capnet_proto::app::SEND_POOL;

    const ALIAS: u16 = 0x100;

    /// ip's end of channel T and the driver's, joined here.
    fn channel_t() -> (FramesOut, FramesIn) {
        let (driver, stack) = (DriverHalf::new().expect("driver half"), StackHalf::new().expect("stack half"));
        let (to_stack, to_driver) = (driver.grant().expect("grant"), stack.grant().expect("grant"));
        let (_from_driver, out) = stack.attach(to_stack, Peer::Driver).expect("stack attaches");
        let t = shm_channel::attach::<Descriptor>(driver.0.t_area, to_driver.t_area, End::B, ChannelParams::default())
            .expect("driver attaches");
        (out, FramesIn::new(t, TX_POOL, to_driver.pool).expect("driver's end"))
    }

    /// An application's send pool, and ip's view of it: a borrowed handle on
    /// `payload` in one of its buffers (as tcp lends it on), with the key.
    fn lent_payload(payload: &[u8]) -> (LoanPool, PoolKey, Lent, Views) {
        let layout = PoolLayout { buf_size: 65536, count: 4, headroom: 0 };
        let mut app = LoanPool::create("capnet-test-app-send", SEND_POOL, layout).expect("app pool");
        let mut views = Views::new();
        let fd = app.region().fd().try_clone_to_owned().expect("dup");
        let key = views.add_beside(SEND_POOL, fd).expect("ip's view");
        let mine = app.fill(payload).expect("a buffer");
        let loan = Ledger::new(4).lend(&mine).expect("lent");
        let theirs = views.borrow(&loan, &Returns::new()).expect("borrowed");
        (app, key, theirs, views)
    }

    /// The driver's writer views the application's pool as [`ALIAS`].
    fn driver_views(input: &mut FramesIn, app: &LoanPool) {
        input.add_alias(ALIAS, app.region().fd().try_clone_to_owned().expect("dup")).expect("driver's view");
    }

    /// The driver gives back all it holds: ip has both its header buffers and
    /// the application's buffers back.
    fn all_back(out: &mut FramesOut, input: &mut FramesIn) {
        input.flush_returns().expect("returns");
        out.take_returns().expect("returns");
        assert_eq!((out.lent.len(), out.pool.held_by(out.peer)), (0, 0), "everything came back");
    }

    fn frame(header: &[u8], payload: Lent) -> VecDeque<(Chain, Option<u16>)> {
        let mut f = Chain::from(header.to_vec());
        f.push(payload);
        VecDeque::from([(f, None)])
    }

    #[test]
    fn a_payload_in_an_application_pool_reaches_the_driver_in_place_and_comes_back() {
        let (mut out, mut input) = channel_t();
        let (app, key, piece, _views) = lent_payload(&[7; 3000]);
        driver_views(&mut input, &app);
        let mut backlog = frame(&[1; 54], piece);
        out.send(&mut backlog, &[(key, ALIAS)]).expect("send");
        assert!(backlog.is_empty());
        assert_eq!(out.lent.len(), 1, "the payload's buffer is lent, not copied");
        let mut got = Vec::new();
        input
            .recv(256, |f, _| {
                got.push(f.to_vec());
                Ok(())
            })
            .expect("recv");
        assert_eq!(got, vec![[vec![1; 54], vec![7; 3000]].concat()], "headers then the payload");
        assert_eq!(input.borrowed_pieces, 1);
        all_back(&mut out, &mut input);
    }

    #[test]
    fn without_the_drivers_view_a_frame_is_copied_whole() {
        let (mut out, mut input) = channel_t();
        let (_app, _key, piece, _views) = lent_payload(&[7; 3000]);
        let mut backlog = frame(&[1; 54], piece);
        out.send(&mut backlog, &[]).expect("send");
        assert_eq!(out.lent.len(), 0);
        let mut got = Vec::new();
        input
            .recv(256, |f, _| {
                got.push(f.len());
                Ok(())
            })
            .expect("recv");
        assert_eq!((got, input.borrowed_pieces), (vec![3054], 0));
    }

    #[test]
    fn a_driver_refuses_an_unknown_pool_and_drops_a_forgotten_ones_frame() {
        // ip names a pool the driver was never granted: ip broke the channel.
        let (mut out, mut input) = channel_t();
        let (_app, key, piece, _views) = lent_payload(&[7; 3000]);
        out.send(&mut frame(&[1; 54], piece), &[(key, ALIAS)]).expect("send");
        assert!(input.recv(256, |_, _| Ok(())).is_err(), "a pool it may not lend");

        // Forgotten since (the application left): the frame is dropped, its
        // pieces given back.
        let (mut out, mut input) = channel_t();
        let (app, key, piece, _views) = lent_payload(&[7; 3000]);
        driver_views(&mut input, &app);
        input.forget_alias(ALIAS);
        out.send(&mut frame(&[1; 54], piece), &[(key, ALIAS)]).expect("send");
        let mut frames = 0;
        input
            .recv(256, |_, _| {
                frames += 1;
                Ok(())
            })
            .expect("recv");
        assert_eq!((frames, input.dropped_gone), (0, 1));
        all_back(&mut out, &mut input);
    }

    #[test]
    fn past_the_drivers_quota_of_loans_in_place_frames_are_copied() {
        let (mut out, mut input) = channel_t();
        let (app, key, piece, _views) = lent_payload(&[7; 3000]);
        driver_views(&mut input, &app);
        let n = QUOTA as usize / 2 + 8;
        let frame = || {
            let mut f = Chain::from(vec![1u8; 54]);
            f.push(piece.slice(0..1000));
            f.push(piece.slice(1000..2000));
            (f, None)
        };
        let mut backlog: VecDeque<_> = (0..n).map(|_| frame()).collect();
        // The driver takes every frame and gives nothing back.
        let mut held = Vec::new();
        for _ in 0..100 {
            out.send(&mut backlog, &[(key, ALIAS)]).expect("send");
            input
                .recv(1024, |f, _| {
                    held.push(f.clone());
                    Ok(())
                })
                .expect("recv");
        }
        assert!(backlog.is_empty(), "no frame waits for the driver's returns");
        assert_eq!(out.lent.len(), QUOTA as usize, "lent in place up to the quota, then copied");
        assert_eq!(held.len(), n);
        assert!(held.iter().all(|f| f.to_vec() == [vec![1; 54], vec![7; 2000]].concat()));
    }

    #[test]
    fn ip_refuses_a_return_of_a_buffer_it_never_lent() {
        let (mut out, mut input) = channel_t();
        let bogus = Descriptor { pool: ALIAS, flags: Descriptor::RETURN, index: 3, offset: 0, len: 0 };
        input.end.send(&[bogus]).expect("send the return");
        assert!(out.take_returns().is_err());
    }
}
