//! capnet-sockets: the sockets domain's core — the socket table and the calls
//! applications make.
//!
//! Applications name sockets by [`Handle`]s: a slot, a generation and the secret of
//! the application the socket belongs to. Every call checks all three, so an
//! application can name only its own sockets, a guessed handle is refused, and a
//! handle to a closed socket (or to one from before a restart, whose table is new)
//! is stale — each a distinct error the client library turns into an `io::Error`.
//!
//! Sans-IO: the transport cores are reached through the [`Transports`] context
//! trait (direct calls in one group, messages between groups), requests arrive as
//! [`Request`]s and leave as [`Response`]s via [`SocketsCore::pop_response`]. A
//! call that would block (a receive, an accept, a handshake, a poll) is parked
//! and answered when it can complete (or cancelled by the client when its timeout
//! passes).

#![forbid(unsafe_code)]

pub use std::collections::VecDeque;

pub use capnet_ipc::lent::Chain;
pub use capnet_proto::app::{
    Handle, Incoming, Outgoing, SocketError, TcpOption, ERROR, HANGUP, MAX_TCP_READ, READABLE, UDP_BATCH, WRITABLE,
};

/// A call as the core takes it: bytes to send are handles (on the
/// application's pool when it lent them, or its message's bytes).
pub type Call = capnet_proto::app::Call<Chain>;
/// A request as the core takes it (see [`Call`]).
pub type Request = capnet_proto::app::Request<Chain>;

/// An outcome as the core makes it: a stream's bytes are the handles tcp
/// gave (the runtime lends them on to the application, or copies them).
pub type Reply = capnet_proto::app::Reply<Chain>;
/// A response as the core makes it (see [`Reply`]).
pub type Response = capnet_proto::app::Response<Chain>;
pub use capnet_tcp::{Endpoints, Ready, SocketId as TcpId};
use capnet_tcp::{Keepalive, Received, SockOpt};
pub use capnet_udp::Ipv4Address;
use capnet_udp::SocketId;

/// Which application (a per-attachment index the runtime assigns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppId(pub u32);

/// What the sockets domain needs from the transport and ip domains: direct
/// calls in one group, calls over a channel between groups (so every method may
/// need to send, and every error is already the one the application sees).
pub trait Transports {
    /// UDP: bind a port (0: ephemeral).
    fn udp_bind(&mut self, port: u16) -> Result<SocketId, SocketError>;
    /// UDP: the bound port.
    fn udp_port(&mut self, s: SocketId) -> Result<u16, SocketError>;
    /// UDP: fix the peer.
    fn udp_connect(&mut self, s: SocketId, addr: Ipv4Address, port: u16) -> Result<(), SocketError>;
    /// UDP: send.
    fn udp_send(&mut self, s: SocketId, to: Option<(Ipv4Address, u16)>, data: &[u8]) -> Result<(), SocketError>;
    /// UDP: the datagrams queued, at most `max` and about [`UDP_BATCH_BYTES`]
    /// of payload (one call for many: between groups each call is a round trip).
    fn udp_recv(&mut self, s: SocketId, max: usize) -> Result<Vec<capnet_udp::Datagram>, SocketError>;
    /// UDP: close.
    fn udp_close(&mut self, s: SocketId) -> Result<(), SocketError>;
    /// ICMP: claim echo identifier `ident` for replies (false if taken).
    fn echo_claim(&mut self, ident: u16) -> Result<bool, SocketError>;
    /// ICMP: release an identifier.
    fn echo_release(&mut self, ident: u16) -> Result<(), SocketError>;
    /// ICMP: send an echo request.
    fn echo_send(&mut self, dst: Ipv4Address, ident: u16, seq: u16, data: &[u8]) -> Result<(), SocketError>;
    /// TCP: listen.
    fn tcp_listen(&mut self, port: u16, backlog: usize) -> Result<TcpId, SocketError>;
    /// TCP: the port of a listener or connection.
    fn tcp_local_port(&mut self, s: TcpId) -> Result<u16, SocketError>;
    /// TCP: take an established connection from a listener.
    fn tcp_accept(&mut self, l: TcpId) -> Result<Option<TcpId>, SocketError>;
    /// TCP: a connection's endpoints.
    fn tcp_endpoints(&mut self, s: TcpId) -> Result<Endpoints, SocketError>;
    /// TCP: open a connection.
    fn tcp_connect(&mut self, addr: Ipv4Address, port: u16) -> Result<TcpId, SocketError>;
    /// TCP: has the handshake finished (or failed)?
    fn tcp_connected(&mut self, s: TcpId) -> Result<bool, SocketError>;
    /// TCP: queue what fits of `data` (its handles: tcp keeps them until they
    /// are acknowledged); how much fit.
    fn tcp_send(&mut self, s: TcpId, data: Chain) -> Result<usize, SocketError>;
    /// TCP: take received bytes.
    fn tcp_recv(&mut self, s: TcpId, max: usize) -> Result<Received, SocketError>;
    /// TCP: shut down reading and/or writing.
    fn tcp_shutdown(&mut self, s: TcpId, read: bool, write: bool) -> Result<(), SocketError>;
    /// TCP: let go (graceful close in the background).
    fn tcp_close(&mut self, s: TcpId) -> Result<(), SocketError>;
    /// TCP: reset now.
    fn tcp_abort(&mut self, s: TcpId) -> Result<(), SocketError>;
    /// TCP: a socket option.
    fn tcp_set_option(&mut self, s: TcpId, opt: SockOpt) -> Result<(), SocketError>;
    /// TCP: readiness.
    fn tcp_ready(&mut self, s: TcpId) -> Result<Ready, SocketError>;
}

/// What the sockets domain remembers of a UDP socket to bind it again on a
/// new udp domain (a restart or a swap).
#[derive(Debug, Clone)]
struct UdpMeta {
    port: u16,
    peer: Option<(Ipv4Address, u16)>,
    /// Datagrams taken from the udp domain and not yet read (a receive takes
    /// up to [`UDP_BATCH`] at once).
    queue: VecDeque<capnet_udp::Datagram>,
}

/// Payload bytes after which a receive call stops taking datagrams (one more
/// may pass it: an answer stays under a message's size).
pub const UDP_BATCH_BYTES: usize = 128 * 1024;

#[derive(Debug)]
enum Kind {
    Udp(SocketId, UdpMeta),
    Echo {
        ident: u16,
        replies: VecDeque<(Ipv4Address, u16, Vec<u8>)>,
    },
    /// A listener on the tcp domain, and during a swap also on the one being
    /// swapped out (whose queued connections are still accepted, first).
    TcpListener {
        id: TcpId,
        old: Option<TcpId>,
        port: u16,
        backlog: u32,
    },
    Tcp(TcpId),
    /// Its transport restarted: the socket is gone there, and every call on it
    /// says so (`Reset`) until the application closes it.
    Lost,
}

/// Which transport restarted (see [`SocketsCore::transport_lost`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The tcp domain: every TCP listener and connection.
    Tcp,
    /// The udp domain: every UDP socket.
    Udp,
    /// The ip domain: every echo socket (its identifier claims are gone).
    Echo,
}

#[derive(Debug)]
struct Entry {
    app: AppId,
    kind: Kind,
}

/// What a parked call waits for.
#[derive(Debug)]
enum Wait {
    Recv { slot: usize, max: u32 },
    Accept { slot: usize },
    Connected { slot: usize },
    Poll { items: Vec<(Handle, u8)> },
}

impl Wait {
    fn slot(&self) -> Option<usize> {
        match self {
            Wait::Recv { slot, .. } | Wait::Accept { slot } | Wait::Connected { slot } => Some(*slot),
            Wait::Poll { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Parked {
    app: AppId,
    id: u64,
    wait: Wait,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

#[derive(Debug)]
struct App {
    secret: u64,
    live: bool,
    /// What it holds, against the [`Quotas`].
    sockets: u32,
    echo: u32,
    parked: u32,
    polled: u32,
}

/// What one application may hold, so that none can exhaust the domain (or the
/// transports' ports and identifiers) for the others: past a quota a call is
/// refused with [`SocketError::Quota`]; the application keeps what it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Sockets of every kind (each UDP or TCP socket holds a port or a
    /// connection's four-tuple: 4096 of the 16,384 ephemeral ports at most).
    pub sockets: u32,
    /// Echo sockets (each holds one of the 16,384 echo identifiers).
    pub echo: u32,
    /// Calls parked at once (blocked receives, accepts, connects, polls).
    pub parked: u32,
    /// Items of all its parked polls together, and of any one poll (each is
    /// looked at again whenever something may have changed).
    pub polled: u32,
}

impl Default for Quotas {
    fn default() -> Self {
        Self { sockets: 4096, echo: 64, parked: 256, polled: 4096 }
    }
}

/// The sockets domain's core.
#[derive(Debug, Default)]
pub struct SocketsCore {
    apps: Vec<App>,
    slots: Vec<Slot>,
    out: VecDeque<(AppId, Response)>,
    parked: Vec<Parked>,
    next_ident: u16,
    quotas: Quotas,
}

impl SocketsCore {
    /// An empty table, with the default [`Quotas`].
    pub fn new() -> Self {
        Self::with_quotas(Quotas::default())
    }

    /// An empty table whose applications each hold at most `quotas`.
    pub fn with_quotas(quotas: Quotas) -> Self {
        Self { next_ident: 0x4000, quotas, ..Self::default() }
    }

    /// The quotas every application has.
    pub fn quotas(&self) -> Quotas {
        self.quotas
    }

    /// Registers an application with a secret the runtime drew from the system's
    /// random source; every handle it gets carries it.
    pub fn attach(&mut self, secret: u64) -> AppId {
        self.apps.push(App { secret, live: true, sockets: 0, echo: 0, parked: 0, polled: 0 });
        AppId((self.apps.len() - 1) as u32)
    }

    /// Refuses a call past one of `app`'s quotas: `need` more sockets (`echo`:
    /// echo sockets) than it may hold.
    fn room_for(&self, app: AppId, need: u32, echo: bool) -> Result<(), SocketError> {
        let a = &self.apps[app.0 as usize];
        let q = self.quotas;
        if a.sockets + need > q.sockets {
            return Err(SocketError::Quota { what: "sockets".into(), limit: q.sockets });
        }
        if echo && a.echo + need > q.echo {
            return Err(SocketError::Quota { what: "echo sockets".into(), limit: q.echo });
        }
        Ok(())
    }

    /// An application went away: close all its sockets.
    pub fn detach<T: Transports>(&mut self, app: AppId, t: &mut T) {
        if let Some(a) = self.apps.get_mut(app.0 as usize) {
            a.live = false;
        }
        let mut k = 0;
        while k < self.parked.len() {
            if self.parked[k].app == app {
                self.unpark(k);
            } else {
                k += 1;
            }
        }
        for i in 0..self.slots.len() {
            if self.slots[i].entry.as_ref().is_some_and(|e| e.app == app) {
                self.free_slot(i, t);
            }
        }
    }

    /// A transport restarted with none of its sockets: each socket of that kind
    /// becomes [`Lost`] — its parked calls are answered `Reset` now, its later
    /// calls too — so applications see the connection reset, never a hang.
    pub fn transport_lost(&mut self, which: Lost) {
        for i in 0..self.slots.len() {
            let hit = match self.slots[i].entry.as_ref().map(|e| &e.kind) {
                Some(Kind::Tcp(_) | Kind::TcpListener { .. }) => which == Lost::Tcp,
                Some(Kind::Udp(..)) => which == Lost::Udp,
                Some(Kind::Echo { .. }) => which == Lost::Echo,
                _ => false,
            };
            if hit {
                self.unpark_slot(i, SocketError::Reset);
                if let Some(e) = self.slots[i].entry.as_mut() {
                    e.kind = Kind::Lost;
                }
            }
        }
        // A poll over a lost socket reports it at once.
        let mut k = 0;
        while k < self.parked.len() {
            let p = &self.parked[k];
            let events: Vec<(u32, u8)> = match &p.wait {
                Wait::Poll { items } => items
                    .iter()
                    .enumerate()
                    .filter(|(_, (h, _))| self.lost(p.app, *h))
                    .map(|(k, _)| (k as u32, ERROR | HANGUP))
                    .collect(),
                _ => Vec::new(),
            };
            if events.is_empty() {
                k += 1;
                continue;
            }
            let p = self.unpark(k);
            self.out.push_back((p.app, Response { id: p.id, reply: Reply::Ready { events } }));
        }
    }

    /// A new udp domain took over (a restart or a swap): every UDP socket is
    /// bound again there on its port (and connected to its peer), so
    /// applications keep their sockets and lose only the datagrams that were
    /// queued in the old domain. A socket whose port cannot be bound again
    /// becomes [`Lost`].
    pub fn udp_replaced<T: Transports>(&mut self, t: &mut T) {
        for i in 0..self.slots.len() {
            let Some(Entry { kind: Kind::Udp(_, meta), .. }) = self.slots[i].entry.as_ref() else { continue };
            let meta = meta.clone();
            let again = t.udp_bind(meta.port).and_then(|s| match meta.peer {
                Some((addr, port)) => t.udp_connect(s, addr, port).map(|_| s),
                None => Ok(s),
            });
            match again {
                Ok(s) => {
                    if let Some(e) = self.slots[i].entry.as_mut() {
                        e.kind = Kind::Udp(s, meta);
                    }
                }
                Err(_) => {
                    self.unpark_slot(i, SocketError::Reset);
                    if let Some(e) = self.slots[i].entry.as_mut() {
                        e.kind = Kind::Lost;
                    }
                }
            }
        }
    }

    /// A new tcp domain joined beside the present one (`capnet swap tcp`):
    /// every listener listens there too, so new connections find it, while the
    /// connections queued on the old domain are still accepted.
    pub fn tcp_added<T: Transports>(&mut self, t: &mut T) {
        for i in 0..self.slots.len() {
            let Some(Entry { kind: Kind::TcpListener { id, old: None, port, backlog }, .. }) = &self.slots[i].entry
            else {
                continue;
            };
            let (id, port, backlog) = (*id, *port, *backlog);
            // A listener the new domain refuses keeps only the old one, until it goes.
            if let Ok(new) = t.tcp_listen(port, backlog as usize) {
                if let Some(e) = self.slots[i].entry.as_mut() {
                    e.kind = Kind::TcpListener { id: new, old: Some(id), port, backlog };
                }
            }
        }
    }

    /// The tcp domain that was swapped out is gone: listeners forget it, and a
    /// connection that still lived there (`retired` says which) is reset.
    pub fn tcp_retired(&mut self, retired: impl Fn(TcpId) -> bool) {
        for i in 0..self.slots.len() {
            match self.slots[i].entry.as_mut().map(|e| &mut e.kind) {
                Some(Kind::TcpListener { old, .. }) => *old = None,
                Some(Kind::Tcp(s)) if retired(*s) => {
                    self.unpark_slot(i, SocketError::Reset);
                    if let Some(e) = self.slots[i].entry.as_mut() {
                        e.kind = Kind::Lost;
                    }
                }
                _ => {}
            }
        }
    }

    fn lost(&self, app: AppId, h: Handle) -> bool {
        self.check(app, h).is_ok_and(|i| matches!(self.slots[i].entry, Some(Entry { kind: Kind::Lost, .. })))
    }

    /// The next response for an application.
    pub fn pop_response(&mut self) -> Option<(AppId, Response)> {
        self.out.pop_front()
    }

    fn check(&self, app: AppId, h: Handle) -> Result<usize, SocketError> {
        let a = self.apps.get(app.0 as usize).filter(|a| a.live).ok_or(SocketError::BadHandle)?;
        let slot = self.slots.get(h.slot as usize).ok_or(SocketError::BadHandle)?;
        if h.secret != a.secret {
            return Err(SocketError::BadHandle); // forged, or another application's
        }
        match &slot.entry {
            Some(e) if slot.generation == h.generation && e.app == app => Ok(h.slot as usize),
            Some(e) if e.app != app => Err(SocketError::BadHandle),
            _ => Err(SocketError::StaleHandle),
        }
    }

    /// Answers and forgets every parked call on slot `i` (it is being closed).
    fn unpark_slot(&mut self, i: usize, err: SocketError) {
        let mut k = 0;
        while k < self.parked.len() {
            if self.parked[k].wait.slot() == Some(i) {
                let p = self.unpark(k);
                self.out.push_back((p.app, Response { id: p.id, reply: Reply::Err(err.clone()) }));
            } else {
                k += 1;
            }
        }
    }

    /// Takes parked call `k` off the list, and off its application's quota.
    fn unpark(&mut self, k: usize) -> Parked {
        let p = self.parked.remove(k);
        if let Some(a) = self.apps.get_mut(p.app.0 as usize) {
            a.parked -= 1;
            if let Wait::Poll { items } = &p.wait {
                a.polled -= items.len() as u32;
            }
        }
        p
    }

    /// Empties slot `i`, and takes its socket off its application's quota.
    fn remove_entry(&mut self, i: usize) -> Option<Entry> {
        let e = self.slots[i].entry.take()?;
        if let Some(a) = self.apps.get_mut(e.app.0 as usize) {
            a.sockets -= 1;
            a.echo -= u32::from(matches!(e.kind, Kind::Echo { .. }));
        }
        Some(e)
    }

    fn insert(&mut self, app: AppId, kind: Kind) -> Handle {
        let a = &mut self.apps[app.0 as usize];
        a.sockets += 1;
        a.echo += u32::from(matches!(kind, Kind::Echo { .. }));
        let secret = a.secret;
        let i = match self.slots.iter().position(|s| s.entry.is_none()) {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, entry: None });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        s.generation = s.generation.wrapping_add(1);
        s.entry = Some(Entry { app, kind });
        Handle { slot: i as u32, generation: s.generation, secret }
    }

    fn free_slot<T: Transports>(&mut self, i: usize, t: &mut T) {
        self.unpark_slot(i, SocketError::StaleHandle);
        if let Some(e) = self.remove_entry(i) {
            match e.kind {
                Kind::Udp(s, _) => {
                    let _ = t.udp_close(s);
                }
                Kind::Echo { ident, .. } => {
                    let _ = t.echo_release(ident);
                }
                Kind::TcpListener { id, old, .. } => {
                    for s in std::iter::once(id).chain(old) {
                        let _ = t.tcp_close(s);
                    }
                }
                Kind::Tcp(s) => {
                    let _ = t.tcp_close(s);
                }
                Kind::Lost => {}
            }
        }
    }

    /// Parks a call, within `app`'s quotas of parked calls and polled items
    /// (else it is answered with the refusal at once).
    fn park(&mut self, app: AppId, id: u64, wait: Wait) -> Option<Reply> {
        let q = self.quotas;
        let a = &mut self.apps[app.0 as usize];
        let items = match &wait {
            Wait::Poll { items } => items.len() as u32,
            _ => 0,
        };
        if a.parked >= q.parked {
            return Some(Reply::Err(SocketError::Quota { what: "parked calls".into(), limit: q.parked }));
        }
        if a.polled + items > q.polled {
            return Some(Reply::Err(SocketError::Quota { what: "polled items".into(), limit: q.polled }));
        }
        a.parked += 1;
        a.polled += items;
        self.parked.push(Parked { app, id, wait });
        None
    }

    /// Handles one request from `app`; its response (now, or when a parked
    /// receive completes) comes out of [`SocketsCore::pop_response`].
    pub fn request<T: Transports>(&mut self, app: AppId, req: Request, t: &mut T) {
        let id = req.id;
        let reply = self.call(app, id, req.call, t);
        if let Some(reply) = reply {
            self.out.push_back((app, Response { id, reply }));
        }
    }

    fn call<T: Transports>(&mut self, app: AppId, id: u64, call: Call, t: &mut T) -> Option<Reply> {
        if self.apps.get(app.0 as usize).is_none_or(|a| !a.live) {
            return Some(Reply::Err(SocketError::BadHandle));
        }
        let r = match call {
            Call::UdpBind { port } => self.room_for(app, 1, false).and_then(|()| t.udp_bind(port)).and_then(|s| {
                let local = t.udp_port(s)?;
                Ok(Reply::Bound {
                    handle: self.insert(app, Kind::Udp(s, UdpMeta { port: local, peer: None, queue: VecDeque::new() })),
                    port: local,
                })
            }),
            Call::UdpConnect { handle, addr, port } => self.udp(app, handle).and_then(|s| {
                t.udp_connect(s, Ipv4Address::from(addr), port)?;
                if let Ok(i) = self.check(app, handle) {
                    if let Some(Entry { kind: Kind::Udp(_, meta), .. }) = self.slots[i].entry.as_mut() {
                        meta.peer = Some((Ipv4Address::from(addr), port));
                    }
                }
                Ok(Reply::Done)
            }),
            Call::UdpSend { handle, datagrams } => self.udp(app, handle).and_then(|s| {
                let mut sent = 0;
                for d in &datagrams {
                    let to = d.to.map(|(a, p)| (Ipv4Address::from(a), p));
                    match t.udp_send(s, to, &d.data) {
                        Ok(()) => sent += 1,
                        Err(e) if sent == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                Ok(Reply::Sent { n: sent })
            }),
            Call::Recv { handle, max, wait } => match self.check(app, handle) {
                Err(e) => Err(e),
                Ok(i) => match self.take_ready(i, max, t) {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) if wait => return self.park(app, id, Wait::Recv { slot: i, max }),
                    Ok(None) => Err(SocketError::WouldBlock),
                    Err(e) => Err(e),
                },
            },
            Call::Cancel { id: which } => {
                if let Some(k) = self.parked.iter().position(|p| p.app == app && p.id == which) {
                    let p = self.unpark(k);
                    self.out.push_back((app, Response { id: p.id, reply: Reply::Err(SocketError::TimedOut) }));
                }
                Ok(Reply::Done)
            }
            Call::Close { handle } => self.check(app, handle).map(|i| {
                self.free_slot(i, t);
                Reply::Done
            }),
            Call::TcpListen { port, backlog } => self.room_for(app, 1, false).and_then(|()| {
                let id = t.tcp_listen(port, backlog as usize)?;
                let port = t.tcp_local_port(id)?;
                Ok(Reply::Bound { handle: self.insert(app, Kind::TcpListener { id, old: None, port, backlog }), port })
            }),
            Call::TcpAccept { handle, wait } => match self.listener(app, handle) {
                Err(e) => Err(e),
                Ok(i) => match self.accept(app, i, t) {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) if wait => return self.park(app, id, Wait::Accept { slot: i }),
                    Ok(None) => Err(SocketError::WouldBlock),
                    Err(e) => Err(e),
                },
            },
            Call::TcpConnect { addr, port } => self.room_for(app, 1, false).and_then(|()| {
                let s = t.tcp_connect(Ipv4Address::from(addr), port)?;
                let port = t.tcp_local_port(s)?;
                Ok(Reply::Bound { handle: self.insert(app, Kind::Tcp(s)), port })
            }),
            Call::TcpConnected { handle, wait } => match self.tcp(app, handle) {
                Err(e) => Err(e),
                Ok((i, s)) => match t.tcp_connected(s) {
                    Ok(true) => Ok(Reply::Done),
                    Ok(false) if wait => return self.park(app, id, Wait::Connected { slot: i }),
                    Ok(false) => Err(SocketError::WouldBlock),
                    Err(e) => Err(e),
                },
            },
            Call::TcpSend { handle, data } => {
                self.tcp(app, handle).and_then(|(_, s)| t.tcp_send(s, data)).map(|n| Reply::Sent { n: n as u32 })
            }
            Call::TcpShutdown { handle, read, write } => {
                self.tcp(app, handle).and_then(|(_, s)| t.tcp_shutdown(s, read, write)).map(|_| Reply::Done)
            }
            Call::TcpAbort { handle } => self.tcp(app, handle).map(|(i, s)| {
                let _ = t.tcp_abort(s);
                self.unpark_slot(i, SocketError::StaleHandle);
                self.remove_entry(i);
                Reply::Done
            }),
            Call::TcpSetOption { handle, option } => self.tcp(app, handle).and_then(|(_, s)| {
                let opt = match option {
                    TcpOption::NoDelay(on) => SockOpt::NoDelay(on),
                    TcpOption::DelayedAck(on) => SockOpt::DelayedAck(on),
                    TcpOption::KeepAlive(k) => SockOpt::KeepAlive(k.map(|(idle, interval, count)| Keepalive {
                        idle: capnet_tcp::Duration::from_millis(idle.max(1)),
                        interval: capnet_tcp::Duration::from_millis(interval.max(1)),
                        count: count.max(1),
                    })),
                    TcpOption::CongestionControl(name) => {
                        SockOpt::CongestionControl(name.parse().map_err(SocketError::Invalid)?)
                    }
                };
                t.tcp_set_option(s, opt).map(|_| Reply::Done)
            }),
            Call::Poll { items, .. } if items.len() > self.quotas.polled as usize => {
                Err(SocketError::Quota { what: "polled items".into(), limit: self.quotas.polled })
            }
            Call::Poll { items, wait } => {
                let events = self.readiness(app, &items, t);
                if events.is_empty() && wait {
                    return self.park(app, id, Wait::Poll { items });
                }
                Ok(Reply::Ready { events })
            }
            Call::EchoOpen => {
                let mut found = self.room_for(app, 1, true).map(|()| None);
                for _ in 0..if found.is_ok() { 0x4000 } else { 0 } {
                    let ident = self.next_ident;
                    self.next_ident = if self.next_ident == 0x7fff { 0x4000 } else { self.next_ident + 1 };
                    match t.echo_claim(ident) {
                        Ok(false) => continue,
                        Ok(true) => found = Ok(Some(ident)),
                        Err(e) => found = Err(e),
                    }
                    break;
                }
                match found {
                    Ok(Some(ident)) => Ok(Reply::Bound {
                        handle: self.insert(app, Kind::Echo { ident, replies: VecDeque::new() }),
                        port: ident,
                    }),
                    Ok(None) => Err(SocketError::AddrInUse),
                    Err(e) => Err(e),
                }
            }
            Call::EchoSend { handle, dst, seq, data } => match self.check(app, handle) {
                Err(e) => Err(e),
                Ok(i) => match &self.slots[i].entry {
                    Some(Entry { kind: Kind::Echo { ident, .. }, .. }) => {
                        t.echo_send(Ipv4Address::from(dst), *ident, seq, &data).map(|_| Reply::Done)
                    }
                    Some(Entry { kind: Kind::Lost, .. }) => Err(SocketError::Reset),
                    _ => Err(SocketError::WrongKind),
                },
            },
        };
        Some(r.unwrap_or_else(Reply::Err))
    }

    fn tcp(&self, app: AppId, h: Handle) -> Result<(usize, TcpId), SocketError> {
        let i = self.check(app, h)?;
        match &self.slots[i].entry {
            Some(Entry { kind: Kind::Tcp(s), .. }) => Ok((i, *s)),
            Some(Entry { kind: Kind::Lost, .. }) => Err(SocketError::Reset),
            _ => Err(SocketError::WrongKind),
        }
    }

    fn listener(&self, app: AppId, h: Handle) -> Result<usize, SocketError> {
        let i = self.check(app, h)?;
        match &self.slots[i].entry {
            Some(Entry { kind: Kind::TcpListener { .. }, .. }) => Ok(i),
            Some(Entry { kind: Kind::Lost, .. }) => Err(SocketError::Reset),
            _ => Err(SocketError::WrongKind),
        }
    }

    /// Takes a connection from the listener in slot `i` and gives it a handle:
    /// during a swap, those queued on the old tcp domain first.
    fn accept<T: Transports>(&mut self, app: AppId, i: usize, t: &mut T) -> Result<Option<Reply>, SocketError> {
        let Some(Entry { kind: Kind::TcpListener { id, old, .. }, .. }) = &self.slots[i].entry else {
            return Err(SocketError::StaleHandle);
        };
        let (id, old) = (*id, *old);
        self.room_for(app, 1, false)?;
        // The old domain's listener failing is its end, not this listener's.
        let c = match old.map(|o| t.tcp_accept(o)) {
            Some(Ok(Some(c))) => c,
            _ => match t.tcp_accept(id)? {
                Some(c) => c,
                None => return Ok(None),
            },
        };
        let ends = t.tcp_endpoints(c)?;
        let handle = self.insert(app, Kind::Tcp(c));
        Ok(Some(Reply::Accepted { handle, port: ends.local_port, peer: (ends.remote.octets(), ends.remote_port) }))
    }

    /// Which of `items` are ready, as (index, bits); a bad handle reads as an error.
    fn readiness<T: Transports>(&self, app: AppId, items: &[(Handle, u8)], t: &mut T) -> Vec<(u32, u8)> {
        let mut events = Vec::new();
        for (k, (h, interest)) in items.iter().enumerate() {
            let bits = match self.check(app, *h).map(|i| &self.slots[i].entry) {
                Ok(Some(Entry { kind: Kind::Tcp(s), .. })) => match t.tcp_ready(*s) {
                    Ok(r) => {
                        let bit = |on: bool, b: u8| if on { b } else { 0 };
                        bit(r.readable, READABLE) | bit(r.writable, WRITABLE) | bit(r.error, ERROR) | bit(r.hup, HANGUP)
                    }
                    Err(_) => ERROR,
                },
                Ok(Some(Entry { kind: Kind::TcpListener { id, old, .. }, .. })) => match t.tcp_ready(*id) {
                    Ok(r) if r.readable || old.is_some_and(|o| t.tcp_ready(o).is_ok_and(|r| r.readable)) => READABLE,
                    Ok(_) => 0,
                    Err(_) => ERROR,
                },
                Ok(Some(Entry { kind: Kind::Echo { replies, .. }, .. })) => {
                    if replies.is_empty() {
                        WRITABLE
                    } else {
                        READABLE | WRITABLE
                    }
                }
                // UDP readiness would need a peek at the udp core's queue: report
                // writable only; receive with `wait` instead.
                Ok(Some(Entry { kind: Kind::Udp(_, meta), .. })) if !meta.queue.is_empty() => READABLE | WRITABLE,
                Ok(Some(Entry { kind: Kind::Udp(..), .. })) => WRITABLE,
                Ok(Some(Entry { kind: Kind::Lost, .. })) => ERROR | HANGUP,
                _ => ERROR,
            };
            let bits = bits & (*interest | ERROR | HANGUP);
            if bits != 0 {
                events.push((k as u32, bits));
            }
        }
        events
    }

    fn udp(&self, app: AppId, h: Handle) -> Result<SocketId, SocketError> {
        let i = self.check(app, h)?;
        match &self.slots[i].entry {
            Some(Entry { kind: Kind::Udp(s, _), .. }) => Ok(*s),
            Some(Entry { kind: Kind::Lost, .. }) => Err(SocketError::Reset),
            _ => Err(SocketError::WrongKind),
        }
    }

    fn take_ready<T: Transports>(&mut self, i: usize, max: u32, t: &mut T) -> Result<Option<Reply>, SocketError> {
        let Some(e) = self.slots[i].entry.as_mut() else { return Err(SocketError::StaleHandle) };
        match &mut e.kind {
            Kind::Udp(s, meta) => {
                if meta.queue.is_empty() {
                    meta.queue.extend(t.udp_recv(*s, UDP_BATCH)?);
                }
                let (most, mut bytes) = ((max as usize).clamp(1, UDP_BATCH), 0);
                let mut datagrams = Vec::new();
                while datagrams.len() < most && bytes < UDP_BATCH_BYTES {
                    let Some(d) = meta.queue.pop_front() else { break };
                    bytes += d.data.len();
                    datagrams.push(Incoming { from: (d.src.octets(), d.src_port), data: d.data });
                }
                Ok((!datagrams.is_empty()).then_some(Reply::Datagrams { datagrams }))
            }
            Kind::Echo { replies, .. } => {
                Ok(replies.pop_front().map(|(from, seq, data)| Reply::EchoReply { from: from.octets(), seq, data }))
            }
            Kind::Tcp(s) => match t.tcp_recv(*s, (max as usize).clamp(1, MAX_TCP_READ))? {
                Received::Data(data) => Ok(Some(Reply::Data { data })),
                Received::Eof => Ok(Some(Reply::Data { data: Chain::new() })),
                Received::Nothing => Ok(None),
            },
            Kind::TcpListener { .. } => Err(SocketError::WrongKind),
            Kind::Lost => Err(SocketError::Reset),
        }
    }

    /// An echo reply for identifier `ident` (from the ip domain).
    pub fn echo_reply(&mut self, ident: u16, from: Ipv4Address, seq: u16, data: Vec<u8>) {
        for s in &mut self.slots {
            if let Some(Entry { kind: Kind::Echo { ident: i, replies }, .. }) = s.entry.as_mut() {
                if *i == ident && replies.len() < 1024 {
                    replies.push_back((from, seq, data));
                    return;
                }
            }
        }
    }

    /// Answers parked calls that can now complete (call after the transports ran).
    pub fn poll_ready<T: Transports>(&mut self, t: &mut T) {
        let mut k = 0;
        while k < self.parked.len() {
            let (app, id) = (self.parked[k].app, self.parked[k].id);
            let r = match &self.parked[k].wait {
                Wait::Recv { slot, max } => self.take_ready(*slot, *max, t),
                Wait::Accept { slot } => {
                    let slot = *slot;
                    self.accept(app, slot, t)
                }
                Wait::Connected { slot } => match &self.slots[*slot].entry {
                    Some(Entry { kind: Kind::Tcp(s), .. }) => match t.tcp_connected(*s) {
                        Ok(true) => Ok(Some(Reply::Done)),
                        Ok(false) => Ok(None),
                        Err(e) => Err(e),
                    },
                    _ => Err(SocketError::StaleHandle),
                },
                Wait::Poll { items } => {
                    let events = self.readiness(app, items, t);
                    Ok((!events.is_empty()).then_some(Reply::Ready { events }))
                }
            };
            let reply = match r {
                Ok(None) => {
                    k += 1;
                    continue;
                }
                Ok(Some(r)) => r,
                Err(e) => Reply::Err(e),
            };
            self.unpark(k);
            self.out.push_back((app, Response { id, reply }));
        }
    }
}

/// What an application hears for a tcp core's error.
pub fn tcp_error(e: capnet_tcp::TcpError) -> SocketError {
    use capnet_tcp::TcpError as T;
    match e {
        T::AddrInUse(_) | T::NoEphemeral => SocketError::AddrInUse,
        T::BadSocket => SocketError::StaleHandle,
        T::WrongKind => SocketError::WrongKind,
        T::NotConnected => SocketError::NotConnected,
        T::ConnectionRefused => SocketError::Refused,
        T::ConnectionReset => SocketError::Reset,
        T::TimedOut => SocketError::TimedOut,
        T::BrokenPipe => SocketError::BrokenPipe,
        T::Unreachable { icmp_type: 3, icmp_code: 0 | 1 } => SocketError::NoRoute,
        T::Unreachable { icmp_type, icmp_code } => SocketError::Icmp(icmp_type, icmp_code),
    }
}

/// What an application hears for a udp core's error.
pub fn udp_error(e: capnet_udp::UdpError) -> SocketError {
    use capnet_udp::UdpError as U;
    match e {
        U::AddrInUse(_) | U::NoEphemeral => SocketError::AddrInUse,
        U::BadSocket => SocketError::StaleHandle,
        U::NoDestination => SocketError::NoDestination,
        U::TooLarge(_) => SocketError::TooLarge,
        U::Icmp { icmp_type: 3, icmp_code: 3, .. } => SocketError::Refused,
        U::Icmp { icmp_type, icmp_code, .. } => SocketError::Icmp(icmp_type, icmp_code),
    }
}
