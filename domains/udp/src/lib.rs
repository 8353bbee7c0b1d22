//! capnet-udp: the udp domain's protocol core — UDP endpoints (RFC 768).
//!
//! Sans-IO like every core: datagrams arrive from the ip domain
//! ([`UdpCore::receive`]) and ICMP errors with them ([`UdpCore::on_icmp`]);
//! applications' calls arrive through the sockets domain ([`UdpCore::bind`],
//! [`UdpCore::send_to`], [`UdpCore::recv_from`], …); what is to be sent comes out of
//! [`UdpCore::pop_output`]. Receive queues are bounded in bytes and count what they
//! drop.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, VecDeque};

pub use smoltcp::wire::Ipv4Address;
use smoltcp::wire::{IpAddress, UdpPacket};

/// UDP header length.
pub const HEADER: usize = 8;
/// The largest UDP payload over IPv4 (65535 − 20 − 8).
pub const MAX_PAYLOAD: usize = 65507;

/// A socket of the udp core: a slot and a generation, so a handle to a closed
/// socket never reaches its successor in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SocketId {
    slot: u32,
    generation: u32,
}

impl SocketId {
    /// The id as a number, to cross a channel between groups.
    pub fn to_raw(self) -> u64 {
        u64::from(self.slot) << 32 | u64::from(self.generation)
    }

    /// An id from [`SocketId::to_raw`]'s number. Any number is accepted: the core
    /// checks slot and generation on every call, so a made-up one is `BadSocket`.
    pub fn from_raw(raw: u64) -> Self {
        Self { slot: (raw >> 32) as u32, generation: raw as u32 }
    }
}

/// UDP call errors, each mapping to one `io::ErrorKind` in the client library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UdpError {
    /// The port is bound already.
    #[error("port {0} is already bound")]
    AddrInUse(u16),
    /// Every ephemeral port is in use.
    #[error("no free ephemeral port")]
    NoEphemeral,
    /// The socket was closed (or never existed).
    #[error("stale or unknown UDP socket")]
    BadSocket,
    /// No destination: `send` on an unconnected socket, or port 0.
    #[error("destination address required")]
    NoDestination,
    /// The payload exceeds what one IPv4 datagram can carry.
    #[error("datagram of {0} bytes exceeds the UDP maximum of 65507")]
    TooLarge(usize),
    /// An ICMP error arrived for this socket (delivered once, then cleared).
    #[error("ICMP type {icmp_type} code {icmp_code} from {reporter}")]
    Icmp {
        /// ICMP type (3: destination unreachable).
        icmp_type: u8,
        /// ICMP code (3: port unreachable → connection refused).
        icmp_code: u8,
        /// Who reported it.
        reporter: Ipv4Address,
    },
}

/// A received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Sender's address.
    pub src: Ipv4Address,
    /// Sender's port.
    pub src_port: u16,
    /// The payload.
    pub data: Vec<u8>,
}

/// What the core asks the ip domain to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a UDP segment (header with checksum + payload) to `dst`.
    Send {
        /// Destination address.
        dst: Ipv4Address,
        /// The UDP segment.
        segment: Vec<u8>,
    },
    /// Send ICMP port unreachable to `to`, quoting `quote`.
    PortUnreachable {
        /// The sender of the datagram nobody wanted.
        to: Ipv4Address,
        /// Its IP header and first 8 bytes.
        quote: Vec<u8>,
    },
}

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// The UDP length field disagrees with the segment.
    BadLength,
    /// Checksum mismatch.
    BadChecksum,
    /// No socket on the port (port unreachable sent).
    NoSocket,
    /// A connected socket got a datagram from another peer.
    NotFromPeer,
    /// The socket's receive queue was full (or every socket's together, past
    /// the socket's floor).
    QueueFull,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 5] =
        [Self::BadLength, Self::BadChecksum, Self::NoSocket, Self::NotFromPeer, Self::QueueFull];

    /// The counter name in `capnet status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::BadLength => "udp_bad_length",
            Self::BadChecksum => "udp_bad_checksum",
            Self::NoSocket => "udp_no_socket",
            Self::NotFromPeer => "udp_not_from_peer",
            Self::QueueFull => "udp_queue_full",
        }
    }
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams delivered to sockets.
    pub datagrams_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Payload bytes queued on every socket now (a gauge, against the total
    /// limit: [`UdpCore::set_total_limit`]).
    pub queued_bytes: u64,
    /// Drops by reason.
    pub drops: [u64; 5],
}

impl Stats {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
}

#[derive(Debug)]
struct Socket {
    port: u16,
    peer: Option<(Ipv4Address, u16)>,
    rx: VecDeque<Datagram>,
    rx_bytes: usize,
    error: Option<UdpError>,
    dropped: u64,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    socket: Option<Socket>,
}

/// Payload bytes a socket may queue even when the total is spent, so that a
/// peer flooding some sockets silences none of the others: what the core queues
/// is at most the total limit plus this per socket.
pub const QUEUE_FLOOR: usize = 64 << 10;

/// The total limit a core starts with: [`UdpCore::set_total_limit`].
pub const DEFAULT_TOTAL_LIMIT: usize = 64 << 20;

/// The udp domain's core.
#[derive(Debug)]
pub struct UdpCore {
    local: Ipv4Address,
    rx_limit: usize,
    rx_total_limit: usize,
    slots: Vec<Slot>,
    ports: BTreeMap<u16, u32>,
    ephemeral: (u16, u16),
    next_ephemeral: u16,
    out: VecDeque<Output>,
    stats: Stats,
}

impl UdpCore {
    /// A core for local address `local`, each socket queueing at most `rx_limit`
    /// bytes of received payload.
    pub fn new(local: Ipv4Address, rx_limit: usize) -> Self {
        Self {
            local,
            rx_limit,
            rx_total_limit: DEFAULT_TOTAL_LIMIT,
            slots: Vec::new(),
            ports: BTreeMap::new(),
            ephemeral: (49152, 65535),
            next_ephemeral: 49152,
            out: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Bounds what all sockets together queue (each may still queue
    /// [`QUEUE_FLOOR`]): memory follows configuration, not what peers send.
    pub fn set_total_limit(&mut self, bytes: usize) {
        self.rx_total_limit = bytes;
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next thing to send.
    pub fn pop_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn socket(&self, id: SocketId) -> Result<&Socket, UdpError> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.socket.as_ref())
            .ok_or(UdpError::BadSocket)
    }

    fn socket_mut(&mut self, id: SocketId) -> Result<&mut Socket, UdpError> {
        self.slots
            .get_mut(id.slot as usize)
            .filter(|s| s.generation == id.generation)
            .and_then(|s| s.socket.as_mut())
            .ok_or(UdpError::BadSocket)
    }

    /// Binds a socket to `port`, or to a free ephemeral port (49152–65535) if 0.
    pub fn bind(&mut self, port: u16) -> Result<SocketId, UdpError> {
        let port = if port == 0 { self.free_ephemeral()? } else { port };
        if self.ports.contains_key(&port) {
            return Err(UdpError::AddrInUse(port));
        }
        let socket = Socket { port, peer: None, rx: VecDeque::new(), rx_bytes: 0, error: None, dropped: 0 };
        let slot = match self.slots.iter().position(|s| s.socket.is_none()) {
            Some(i) => i,
            None => {
                self.slots.push(Slot { generation: 0, socket: None });
                self.slots.len() - 1
            }
        };
        let s = &mut self.slots[slot];
        s.generation = s.generation.wrapping_add(1);
        s.socket = Some(socket);
        self.ports.insert(port, slot as u32);
        Ok(SocketId { slot: slot as u32, generation: s.generation })
    }

    fn free_ephemeral(&mut self) -> Result<u16, UdpError> {
        let (lo, hi) = self.ephemeral;
        let span = u32::from(hi - lo) + 1;
        for _ in 0..span {
            let p = self.next_ephemeral;
            self.next_ephemeral = if p >= hi { lo } else { p + 1 };
            if !self.ports.contains_key(&p) {
                return Ok(p);
            }
        }
        Err(UdpError::NoEphemeral)
    }

    /// The port a socket is bound to.
    pub fn local_port(&self, id: SocketId) -> Result<u16, UdpError> {
        Ok(self.socket(id)?.port)
    }

    /// Fixes the peer: `send` goes there and only its datagrams are received.
    pub fn connect(&mut self, id: SocketId, addr: Ipv4Address, port: u16) -> Result<(), UdpError> {
        if port == 0 {
            return Err(UdpError::NoDestination);
        }
        self.socket_mut(id)?.peer = Some((addr, port));
        Ok(())
    }

    /// Closes a socket; its port is free again and its handle is stale.
    pub fn close(&mut self, id: SocketId) -> Result<(), UdpError> {
        let port = self.socket(id)?.port;
        if let Some(s) = self.slots[id.slot as usize].socket.take() {
            self.stats.queued_bytes -= s.rx_bytes as u64;
        }
        self.ports.remove(&port);
        Ok(())
    }

    /// The sockets domain that owned every socket is gone (it restarted): close
    /// them all.
    pub fn close_all(&mut self) {
        for slot in &mut self.slots {
            slot.socket = None;
        }
        self.ports.clear();
        self.stats.queued_bytes = 0;
    }

    /// Sends `data` to `dst:port` (or to the connected peer if `to` is `None`).
    pub fn send_to(&mut self, id: SocketId, to: Option<(Ipv4Address, u16)>, data: &[u8]) -> Result<(), UdpError> {
        if data.len() > MAX_PAYLOAD {
            return Err(UdpError::TooLarge(data.len()));
        }
        let local = self.local;
        let s = self.socket(id)?;
        let (dst, dport) = to.or(s.peer).ok_or(UdpError::NoDestination)?;
        if dport == 0 {
            return Err(UdpError::NoDestination);
        }
        let mut seg = vec![0u8; HEADER + data.len()];
        seg[0..2].copy_from_slice(&s.port.to_be_bytes());
        seg[2..4].copy_from_slice(&dport.to_be_bytes());
        seg[4..6].copy_from_slice(&((HEADER + data.len()) as u16).to_be_bytes());
        seg[HEADER..].copy_from_slice(data);
        capnet_ipc::pool::count_copy(data.len());
        let mut p = UdpPacket::new_unchecked(&mut seg[..]);
        // RFC 768: a computed checksum of zero is sent as all ones.
        p.fill_checksum(&IpAddress::Ipv4(local), &IpAddress::Ipv4(dst));
        self.stats.datagrams_out += 1;
        self.out.push_back(Output::Send { dst, segment: seg });
        Ok(())
    }

    /// Takes the next datagram queued on a socket; a pending ICMP error comes first
    /// (once).
    pub fn recv_from(&mut self, id: SocketId) -> Result<Option<Datagram>, UdpError> {
        let s = self.socket_mut(id)?;
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        let d = s.rx.pop_front();
        if let Some(d) = &d {
            s.rx_bytes -= d.data.len();
            self.stats.queued_bytes -= d.data.len() as u64;
        }
        Ok(d)
    }

    /// Takes up to `max` queued datagrams, stopping once `max_bytes` of payload
    /// are taken (one more may pass it); a pending ICMP error comes first, alone.
    pub fn recv_many(&mut self, id: SocketId, max: usize, max_bytes: usize) -> Result<Vec<Datagram>, UdpError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max && bytes < max_bytes {
            match self.recv_from(id) {
                Ok(Some(d)) => {
                    bytes += d.data.len();
                    out.push(d);
                }
                Ok(None) => break,
                Err(e) if out.is_empty() => return Err(e),
                Err(e) => {
                    // Keep the error for the next call; these datagrams came first.
                    self.socket_mut(id)?.error = Some(e);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Datagrams this socket dropped because its queue was full.
    pub fn socket_drops(&self, id: SocketId) -> Result<u64, UdpError> {
        Ok(self.socket(id)?.dropped)
    }

    fn drop(&mut self, r: DropReason) {
        self.stats.drops[r as usize] += 1;
    }

    /// A UDP segment from the ip domain, with the IP header it came in.
    pub fn receive(&mut self, src: Ipv4Address, dst: Ipv4Address, segment: &[u8], ip_header: &[u8]) {
        let Ok(p) = UdpPacket::new_checked(segment) else { return self.drop(DropReason::BadLength) };
        let len = usize::from(p.len());
        if len < HEADER || len > segment.len() {
            return self.drop(DropReason::BadLength);
        }
        // A zero checksum means none was computed (RFC 768); verify_checksum accepts it.
        if !p.verify_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst)) {
            return self.drop(DropReason::BadChecksum);
        }
        let (sport, dport) = (p.src_port(), p.dst_port());
        let Some(&slot) = self.ports.get(&dport) else {
            self.drop(DropReason::NoSocket);
            if dst == self.local {
                let mut quote = ip_header.to_vec();
                quote.extend_from_slice(&segment[..segment.len().min(8)]);
                self.out.push_back(Output::PortUnreachable { to: src, quote });
            }
            return;
        };
        let (limit, total_left) = (self.rx_limit, self.rx_total_limit.saturating_sub(self.stats.queued_bytes as usize));
        let Some(s) = self.slots[slot as usize].socket.as_mut() else { return };
        if s.peer.is_some_and(|peer| peer != (src, sport)) {
            return self.drop(DropReason::NotFromPeer);
        }
        let n = len - HEADER;
        // Within the socket's own limit, and the total's (or the floor).
        if s.rx_bytes + n > limit || (n > total_left && s.rx_bytes + n > QUEUE_FLOOR) {
            s.dropped += 1;
            return self.drop(DropReason::QueueFull);
        }
        s.rx_bytes += n;
        capnet_ipc::pool::count_copy(len - HEADER);
        s.rx.push_back(Datagram { src, src_port: sport, data: segment[HEADER..len].to_vec() });
        self.stats.queued_bytes += n as u64;
        self.stats.datagrams_in += 1;
    }

    /// An ICMP error for our `local_port` (from the ip domain): surfaces on that
    /// socket's next receive call, if the socket is connected to the reporting flow
    /// or unconnected (as Linux reports errors only to connected sockets by default,
    /// unconnected ones get it here too: they asked to send there).
    pub fn on_icmp(
        &mut self,
        local_port: u16,
        remote: Ipv4Address,
        remote_port: u16,
        icmp_type: u8,
        icmp_code: u8,
        reporter: Ipv4Address,
    ) {
        let Some(&slot) = self.ports.get(&local_port) else { return };
        let Some(s) = self.slots[slot as usize].socket.as_mut() else { return };
        if s.peer.is_some_and(|peer| peer != (remote, remote_port)) {
            return;
        }
        s.error = Some(UdpError::Icmp { icmp_type, icmp_code, reporter });
    }
}
