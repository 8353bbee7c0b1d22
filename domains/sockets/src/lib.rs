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
//! receive with nothing queued is parked and answered when data arrives (or
//! cancelled by the client when its timeout passes).

#![forbid(unsafe_code)]

pub mod proto;

use std::collections::VecDeque;

pub use capnet_udp::Ipv4Address;
use capnet_udp::{SocketId, UdpError};
pub use proto::{Call, Handle, Reply, Request, Response, SocketError};

/// Which application (a per-attachment index the runtime assigns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AppId(pub u32);

/// What the sockets domain needs from the transport and ip domains.
pub trait Transports {
    /// UDP: bind a port (0: ephemeral).
    fn udp_bind(&mut self, port: u16) -> Result<SocketId, UdpError>;
    /// UDP: the bound port.
    fn udp_port(&self, s: SocketId) -> Result<u16, UdpError>;
    /// UDP: fix the peer.
    fn udp_connect(&mut self, s: SocketId, addr: Ipv4Address, port: u16) -> Result<(), UdpError>;
    /// UDP: send.
    fn udp_send(&mut self, s: SocketId, to: Option<(Ipv4Address, u16)>, data: &[u8]) -> Result<(), UdpError>;
    /// UDP: the next datagram, if any.
    fn udp_recv(&mut self, s: SocketId) -> Result<Option<capnet_udp::Datagram>, UdpError>;
    /// UDP: close.
    fn udp_close(&mut self, s: SocketId) -> Result<(), UdpError>;
    /// ICMP: claim echo identifier `ident` for replies (false if taken).
    fn echo_claim(&mut self, ident: u16) -> bool;
    /// ICMP: release an identifier.
    fn echo_release(&mut self, ident: u16);
    /// ICMP: send an echo request.
    fn echo_send(&mut self, dst: Ipv4Address, ident: u16, seq: u16, data: &[u8]) -> Result<(), SocketError>;
}

#[derive(Debug)]
enum Kind {
    Udp(SocketId),
    Echo { ident: u16, replies: VecDeque<(Ipv4Address, u16, Vec<u8>)> },
}

#[derive(Debug)]
struct Entry {
    app: AppId,
    kind: Kind,
    /// A parked receive: (request id) waiting for data.
    parked: Option<u64>,
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
}

/// The sockets domain's core.
#[derive(Debug, Default)]
pub struct SocketsCore {
    apps: Vec<App>,
    slots: Vec<Slot>,
    out: VecDeque<(AppId, Response)>,
    next_ident: u16,
}

impl SocketsCore {
    /// An empty table.
    pub fn new() -> Self {
        Self { next_ident: 0x4000, ..Self::default() }
    }

    /// Registers an application with a secret the runtime drew from the system's
    /// random source; every handle it gets carries it.
    pub fn attach(&mut self, secret: u64) -> AppId {
        self.apps.push(App { secret, live: true });
        AppId((self.apps.len() - 1) as u32)
    }

    /// An application went away: close all its sockets.
    pub fn detach<T: Transports>(&mut self, app: AppId, t: &mut T) {
        if let Some(a) = self.apps.get_mut(app.0 as usize) {
            a.live = false;
        }
        for i in 0..self.slots.len() {
            if self.slots[i].entry.as_ref().is_some_and(|e| e.app == app) {
                self.free_slot(i, t);
            }
        }
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

    fn insert(&mut self, app: AppId, kind: Kind) -> Handle {
        let secret = self.apps[app.0 as usize].secret;
        let i = match self.slots.iter().position(|s| s.entry.is_none()) {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, entry: None });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[i];
        s.generation = s.generation.wrapping_add(1);
        s.entry = Some(Entry { app, kind, parked: None });
        Handle { slot: i as u32, generation: s.generation, secret }
    }

    fn free_slot<T: Transports>(&mut self, i: usize, t: &mut T) {
        if let Some(e) = self.slots[i].entry.take() {
            match e.kind {
                Kind::Udp(s) => {
                    let _ = t.udp_close(s);
                }
                Kind::Echo { ident, .. } => t.echo_release(ident),
            }
        }
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
            Call::UdpBind { port } => t.udp_bind(port).map_err(SocketError::from).and_then(|s| {
                let local = t.udp_port(s).map_err(SocketError::from)?;
                Ok(Reply::Bound { handle: self.insert(app, Kind::Udp(s)), port: local })
            }),
            Call::UdpConnect { handle, addr, port } => self.udp(app, handle).and_then(|s| {
                t.udp_connect(s, Ipv4Address::from(addr), port).map(|_| Reply::Done).map_err(SocketError::from)
            }),
            Call::UdpSend { handle, to, data } => self.udp(app, handle).and_then(|s| {
                let to = to.map(|(a, p)| (Ipv4Address::from(a), p));
                t.udp_send(s, to, &data).map(|_| Reply::Done).map_err(SocketError::from)
            }),
            Call::Recv { handle, wait } => match self.check(app, handle) {
                Err(e) => Err(e),
                Ok(i) => match self.take_ready(i, t) {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) if wait => {
                        // Parked: answered by `poll_ready` when data arrives, or by a
                        // Cancel from the client's timeout. A second park replaces the first.
                        if let Some(old) = self.slots[i].entry.as_mut().and_then(|e| e.parked.replace(id)) {
                            self.out.push_back((app, Response { id: old, reply: Reply::Err(SocketError::WouldBlock) }));
                        }
                        return None;
                    }
                    Ok(None) => Err(SocketError::WouldBlock),
                    Err(e) => Err(e),
                },
            },
            Call::Cancel { handle } => self.check(app, handle).map(|i| {
                if let Some(old) = self.slots[i].entry.as_mut().and_then(|e| e.parked.take()) {
                    self.out.push_back((app, Response { id: old, reply: Reply::Err(SocketError::TimedOut) }));
                }
                Reply::Done
            }),
            Call::Close { handle } => self.check(app, handle).map(|i| {
                if let Some(old) = self.slots[i].entry.as_mut().and_then(|e| e.parked.take()) {
                    self.out.push_back((app, Response { id: old, reply: Reply::Err(SocketError::StaleHandle) }));
                }
                self.free_slot(i, t);
                Reply::Done
            }),
            Call::EchoOpen => {
                let mut found = None;
                for _ in 0..0x4000 {
                    let ident = self.next_ident;
                    self.next_ident = if self.next_ident == 0x7fff { 0x4000 } else { self.next_ident + 1 };
                    if t.echo_claim(ident) {
                        found = Some(ident);
                        break;
                    }
                }
                match found {
                    Some(ident) => Ok(Reply::Bound {
                        handle: self.insert(app, Kind::Echo { ident, replies: VecDeque::new() }),
                        port: ident,
                    }),
                    None => Err(SocketError::AddrInUse),
                }
            }
            Call::EchoSend { handle, dst, seq, data } => match self.check(app, handle) {
                Err(e) => Err(e),
                Ok(i) => match &self.slots[i].entry {
                    Some(Entry { kind: Kind::Echo { ident, .. }, .. }) => {
                        t.echo_send(Ipv4Address::from(dst), *ident, seq, &data).map(|_| Reply::Done)
                    }
                    _ => Err(SocketError::WrongKind),
                },
            },
        };
        Some(r.unwrap_or_else(Reply::Err))
    }

    fn udp(&self, app: AppId, h: Handle) -> Result<SocketId, SocketError> {
        let i = self.check(app, h)?;
        match &self.slots[i].entry {
            Some(Entry { kind: Kind::Udp(s), .. }) => Ok(*s),
            _ => Err(SocketError::WrongKind),
        }
    }

    fn take_ready<T: Transports>(&mut self, i: usize, t: &mut T) -> Result<Option<Reply>, SocketError> {
        let Some(e) = self.slots[i].entry.as_mut() else { return Err(SocketError::StaleHandle) };
        match &mut e.kind {
            Kind::Udp(s) => match t.udp_recv(*s) {
                Ok(Some(d)) => Ok(Some(Reply::Datagram { from: (d.src.octets(), d.src_port), data: d.data })),
                Ok(None) => Ok(None),
                Err(e) => Err(SocketError::from(e)),
            },
            Kind::Echo { replies, .. } => {
                Ok(replies.pop_front().map(|(from, seq, data)| Reply::EchoReply { from: from.octets(), seq, data }))
            }
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

    /// Answers parked receives that now have data (call after the transports ran).
    pub fn poll_ready<T: Transports>(&mut self, t: &mut T) {
        for i in 0..self.slots.len() {
            let Some(e) = self.slots[i].entry.as_ref() else { continue };
            let (app, Some(id)) = (e.app, e.parked) else { continue };
            match self.take_ready(i, t) {
                Ok(None) => {}
                r => {
                    if let Some(e) = self.slots[i].entry.as_mut() {
                        e.parked = None;
                    }
                    let reply = match r {
                        Ok(Some(r)) => r,
                        Err(e) => Reply::Err(e),
                        Ok(None) => continue,
                    };
                    self.out.push_back((app, Response { id, reply }));
                }
            }
        }
    }
}
