//! capnet-ip: the ip domain's protocol core — Ethernet II, ARP, IPv4 with
//! fragmentation and reassembly, ICMP, routing and the transport demux table.
//!
//! It is sans-IO (DESIGN, "Protocol code is sans-IO"): inputs are frames from the
//! driver, datagrams from transport domains, and `now`; outputs are frames for the
//! driver, deliveries and ICMP errors for transport domains, and the next deadline
//! ([`IpCore::poll_at`]). It never reads a clock, touches a device or logs. A
//! frame comes as a handle on the buffer it was read into ([`Lent`]): the core
//! copies its headers out (at most [`HEAD`] bytes) and parses only that copy,
//! with smoltcp's `wire` views after a length check; a datagram for a
//! transport goes on as a handle on the same buffer, past its headers. Every
//! frame it refuses is counted by [`DropReason`].

#![forbid(unsafe_code)]

mod arp;
pub mod publish;
mod reasm;
mod route;

use std::collections::VecDeque;

pub use capnet_ipc::lent::{Chain, Lent};

pub use arp::ArpCache;
pub use reasm::{ReasmLimits, Reassembler};
pub use route::{Route, RouteTable};
pub use smoltcp::time::{Duration, Instant};
pub use smoltcp::wire::{EthernetAddress, IpProtocol, Ipv4Address, Ipv4Cidr};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet, Ipv4Packet};

/// Ethernet II header length.
pub const ETH_HDR: usize = 14;
/// IPv4 header length without options (we never emit options).
pub const IP_HDR: usize = 20;
/// Bytes of a frame copied out to parse it: Ethernet, the longest IPv4 header
/// and a transport header's first 8 bytes (its ports; ICMP's quote).
pub const HEAD: usize = ETH_HDR + 60 + 8;

/// Which transport domain a packet belongs to (an index the graph assigns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportId(pub u16);

/// How the ip core is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our MAC address.
    pub mac: EthernetAddress,
    /// Our address and connected subnet.
    pub addr: Ipv4Cidr,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Address>,
    /// The IP MTU of the link (bytes of IP datagram per frame).
    pub mtu: usize,
    /// TTL of datagrams we originate.
    pub ttl: u8,
    /// How long a learned ARP entry stays valid.
    pub arp_expiry: Duration,
    /// Interval between ARP requests for an unresolved address.
    pub arp_retry: Duration,
    /// Requests sent before giving up on an address.
    pub arp_tries: u8,
    /// Datagrams queued per unresolved address (more are dropped and counted).
    pub arp_queue: usize,
    /// Neighbours the cache holds, and addresses it resolves at once: past it,
    /// the entry nearest its expiry makes room (a new resolution waits).
    pub arp_entries: usize,
    /// Reassembly limits.
    pub reasm: ReasmLimits,
}

impl Config {
    /// Defaults for `addr` with MAC `mac`.
    pub fn new(mac: EthernetAddress, addr: Ipv4Cidr) -> Self {
        Self {
            mac,
            addr,
            gateway: None,
            mtu: 1500,
            ttl: 64,
            arp_expiry: Duration::from_secs(60),
            arp_retry: Duration::from_secs(1),
            arp_tries: 3,
            arp_queue: 16,
            arp_entries: 1024,
            reasm: ReasmLimits::default(),
        }
    }
}

/// Why a frame or datagram was dropped. Counted per reason in [`Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum DropReason {
    /// Shorter than an Ethernet header.
    EthTruncated,
    /// Addressed to another MAC.
    EthNotForUs,
    /// Neither IPv4 nor ARP.
    EthUnknownType,
    /// A malformed ARP packet (not Ethernet/IPv4, bad lengths).
    ArpMalformed,
    /// An IPv4 header or total length that does not fit the frame.
    IpTruncated,
    /// Version is not 4.
    IpBadVersion,
    /// IHL below 5 or beyond the packet.
    IpBadHeaderLen,
    /// Header checksum mismatch.
    IpBadChecksum,
    /// Not addressed to us (we do not forward).
    IpNotForUs,
    /// A fragment overlapping one already held: the whole datagram is dropped.
    FragOverlap,
    /// Fragments that would make a datagram larger than 65535 bytes.
    FragTooLarge,
    /// A datagram evicted from reassembly to make room (the oldest, at a limit
    /// of datagrams, bytes or datagrams from one source), or one fragment larger
    /// than all reassembly memory.
    FragMemory,
    /// A non-final fragment whose length is not a multiple of 8, or empty.
    FragMalformed,
    /// A datagram not completed within the reassembly timeout.
    FragTimeout,
    /// A malformed ICMP message or bad ICMP checksum.
    IcmpMalformed,
    /// No transport domain claims the protocol and port.
    NoTransport,
    /// The ARP queue for an unresolved address is full.
    ArpQueueFull,
    /// An address did not answer ARP: its queued datagrams are dropped.
    ArpUnresolved,
    /// No route to the destination.
    NoRoute,
    /// Larger than the MTU with DF set.
    TooBigDf,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 20] = [
        Self::EthTruncated,
        Self::EthNotForUs,
        Self::EthUnknownType,
        Self::ArpMalformed,
        Self::IpTruncated,
        Self::IpBadVersion,
        Self::IpBadHeaderLen,
        Self::IpBadChecksum,
        Self::IpNotForUs,
        Self::FragOverlap,
        Self::FragTooLarge,
        Self::FragMemory,
        Self::FragMalformed,
        Self::FragTimeout,
        Self::IcmpMalformed,
        Self::NoTransport,
        Self::ArpQueueFull,
        Self::ArpUnresolved,
        Self::NoRoute,
        Self::TooBigDf,
    ];

    /// The counter name used in `capnet status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::EthTruncated => "eth_truncated",
            Self::EthNotForUs => "eth_not_for_us",
            Self::EthUnknownType => "eth_unknown_type",
            Self::ArpMalformed => "arp_malformed",
            Self::IpTruncated => "ip_truncated",
            Self::IpBadVersion => "ip_bad_version",
            Self::IpBadHeaderLen => "ip_bad_header_len",
            Self::IpBadChecksum => "ip_bad_checksum",
            Self::IpNotForUs => "ip_not_for_us",
            Self::FragOverlap => "frag_overlap",
            Self::FragTooLarge => "frag_too_large",
            Self::FragMemory => "frag_memory",
            Self::FragMalformed => "frag_malformed",
            Self::FragTimeout => "frag_timeout",
            Self::IcmpMalformed => "icmp_malformed",
            Self::NoTransport => "no_transport",
            Self::ArpQueueFull => "arp_queue_full",
            Self::ArpUnresolved => "arp_unresolved",
            Self::NoRoute => "no_route",
            Self::TooBigDf => "too_big_df",
        }
    }
}

/// Counters of the ip core.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Frames received from the driver.
    pub frames_in: u64,
    /// Frames handed to the driver.
    pub frames_out: u64,
    /// IPv4 datagrams accepted (after reassembly).
    pub packets_in: u64,
    /// IPv4 packets sent (fragments count one each).
    pub packets_out: u64,
    /// Echo requests answered.
    pub echo_replies: u64,
    /// ARP requests sent (the gratuitous one at start included).
    pub arp_requests: u64,
    /// Neighbour entries evicted to make room (`Config::arp_entries`).
    pub arp_evicted: u64,
    /// Drops by reason, indexed by `DropReason as usize`.
    pub drops: [u64; 20],
}

impl Stats {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }
}

/// A datagram for a transport domain: its payload a handle on the buffer the
/// frame arrived in (a reassembled one: on private memory).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The transport domain it belongs to.
    pub to: TransportId,
    /// Source address.
    pub src: Ipv4Address,
    /// Destination address (ours, or a broadcast).
    pub dst: Ipv4Address,
    /// Transport protocol.
    pub protocol: IpProtocol,
    /// The transport header and payload.
    pub payload: Chain,
    /// The IPv4 header it arrived with (first fragment's), for the transport to
    /// quote in an ICMP error (e.g. UDP's port unreachable).
    pub ip_header: IpHeader,
}

/// An IPv4 header copied out of a frame (at most 60 bytes, no allocation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    bytes: [u8; 60],
    len: u8,
}

impl IpHeader {
    /// The first (at most) 60 bytes of `b`.
    pub fn new(b: &[u8]) -> Self {
        let mut bytes = [0; 60];
        let len = b.len().min(60);
        bytes[..len].copy_from_slice(&b[..len]);
        Self { bytes, len: len as u8 }
    }
}

impl std::ops::Deref for IpHeader {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl std::fmt::Debug for IpHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpHeader({:02x?})", &**self)
    }
}

/// An ICMP error concerning a flow of a transport domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpError {
    /// The transport domain that owns the flow.
    pub to: TransportId,
    /// Who sent the error.
    pub reporter: Ipv4Address,
    /// ICMP type and code.
    pub icmp_type: u8,
    /// ICMP code.
    pub icmp_code: u8,
    /// The protocol of the datagram that caused it.
    pub protocol: IpProtocol,
    /// Its destination (the remote end of our flow).
    pub remote: Ipv4Address,
    /// Our port in it (source port of the original datagram).
    pub local_port: u16,
    /// The remote port (its destination port).
    pub remote_port: u16,
}

/// What the core produced.
#[derive(Debug, Clone)]
pub enum Output {
    /// A frame for the driver: its headers, then the payload's handles.
    Frame(Chain),
    /// A frame holding a TCP segment larger than the MTU, for the device to cut
    /// into `mss`-byte segments (TSO; see [`IpCore::send_tso`]).
    TsoFrame {
        /// The frame.
        frame: Chain,
        /// The segment size to cut it into.
        mss: u16,
    },
    /// A datagram for a transport domain.
    Deliver(Delivery),
    /// An ICMP error for a transport domain.
    Icmp(IcmpError),
    /// An echo reply for the echo socket that owns its identifier.
    EchoReply(EchoReply),
}

/// An ICMP echo reply (RFC 792), parsed and checksum-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply {
    /// The domain owning the identifier (the sockets domain's echo sockets).
    pub to: TransportId,
    /// Who answered.
    pub from: Ipv4Address,
    /// The echo identifier.
    pub ident: u16,
    /// The sequence number.
    pub seq: u16,
    /// The data echoed back.
    pub data: Vec<u8>,
}

/// Sending a datagram failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No route.
    #[error("no route to {0}")]
    NoRoute(Ipv4Address),
    /// Too big with DF.
    #[error("datagram of {len} bytes exceeds the MTU {mtu} and DF is set")]
    TooBig {
        /// IP datagram length.
        len: usize,
        /// The MTU.
        mtu: usize,
    },
    /// Larger than an IPv4 datagram can be.
    #[error("payload of {0} bytes exceeds the IPv4 maximum")]
    TooLarge(usize),
    /// The ARP queue for the next hop is full.
    #[error("too many datagrams waiting for {0} to answer ARP")]
    QueueFull(Ipv4Address),
}

/// What an ICMP error quotes (RFC 792): the offending datagram's IP header and
/// the first 8 bytes of its payload.
pub fn quote(ip_header: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut q = ip_header.to_vec();
    q.extend_from_slice(&payload[..payload.len().min(8)]);
    q
}

/// The demux table: (protocol, local port range) → transport domain. For ICMP the
/// "port" is the echo identifier (the ping socket's).
#[derive(Debug, Clone, Default)]
pub struct Demux {
    entries: Vec<(IpProtocol, std::ops::RangeInclusive<u16>, TransportId)>,
    /// Single flows that go elsewhere than their port's entry: (protocol
    /// number, local port, remote address, remote port) → transport. A swap
    /// keeps the old domain's connections here while new ones reach the new.
    flows: std::collections::HashMap<(u8, u16, Ipv4Address, u16), TransportId>,
}

impl Demux {
    /// Routes `protocol` packets whose local port is in `ports` to `to`. Later
    /// entries take precedence (a swapped-in domain claims a range over the old).
    pub fn insert(&mut self, protocol: IpProtocol, ports: std::ops::RangeInclusive<u16>, to: TransportId) {
        self.entries.push((protocol, ports, to));
    }

    /// Removes the entries for exactly `protocol` and `ports`.
    pub fn remove_range(&mut self, protocol: IpProtocol, ports: std::ops::RangeInclusive<u16>) {
        self.entries.retain(|e| !(e.0 == protocol && e.1 == ports));
    }

    /// Removes every entry pointing at `to`, flows included.
    pub fn remove(&mut self, to: TransportId) {
        self.entries.retain(|e| e.2 != to);
        self.flows.retain(|_, t| *t != to);
    }

    /// Who gets `protocol` traffic for local port `port`.
    pub fn lookup(&self, protocol: IpProtocol, port: u16) -> Option<TransportId> {
        self.entries.iter().rev().find(|(p, r, _)| *p == protocol && r.contains(&port)).map(|e| e.2)
    }

    /// Routes the one flow (local port, remote address and port) to `to`, ahead
    /// of its port's entry.
    pub fn insert_flow(
        &mut self,
        protocol: IpProtocol,
        local_port: u16,
        remote: Ipv4Address,
        remote_port: u16,
        to: TransportId,
    ) {
        self.flows.insert((u8::from(protocol), local_port, remote, remote_port), to);
    }

    /// Forgets one flow (its traffic follows its port's entry again).
    pub fn remove_flow(&mut self, protocol: IpProtocol, local_port: u16, remote: Ipv4Address, remote_port: u16) {
        self.flows.remove(&(u8::from(protocol), local_port, remote, remote_port));
    }

    /// Who gets this flow's traffic: its own entry, else its port's.
    pub fn lookup_flow(
        &self,
        protocol: IpProtocol,
        local_port: u16,
        remote: Ipv4Address,
        remote_port: u16,
    ) -> Option<TransportId> {
        // No hashing on the per-packet path unless a flow was ever set apart.
        if self.flows.is_empty() {
            return self.lookup(protocol, local_port);
        }
        match self.flows.get(&(u8::from(protocol), local_port, remote, remote_port)) {
            Some(to) => Some(*to),
            None => self.lookup(protocol, local_port),
        }
    }
}

/// The ip domain's core.
#[derive(Debug)]
pub struct IpCore {
    cfg: Config,
    routes: RouteTable,
    /// The demux table (the supervisor edits it through control messages).
    pub demux: Demux,
    arp: ArpCache,
    reasm: Reassembler,
    ident: u16,
    out: VecDeque<Output>,
    stats: Stats,
}

impl IpCore {
    /// A core with `cfg`, announcing itself with a gratuitous ARP.
    pub fn new(cfg: Config, now: Instant) -> Self {
        let routes = RouteTable::connected(cfg.addr, cfg.gateway);
        let arp = ArpCache::new(cfg.arp_expiry, cfg.arp_retry, cfg.arp_tries, cfg.arp_queue, cfg.arp_entries);
        let reasm = Reassembler::new(cfg.reasm);
        let mut core = Self {
            cfg,
            routes,
            demux: Demux::default(),
            arp,
            reasm,
            ident: 1,
            out: VecDeque::new(),
            stats: Stats::default(),
        };
        let addr = core.cfg.addr.address();
        // A gratuitous ARP announces us (and refreshes stale caches) at start.
        core.emit_arp(arp::ArpOp::Request, EthernetAddress::BROADCAST, EthernetAddress([0; 6]), addr);
        let _ = now; // the announcement needs no timer
        core
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The routing table (published read-only by the runtime).
    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    /// Adds a static route.
    pub fn add_route(&mut self, route: Route) {
        self.routes.add(route);
    }

    /// The ARP cache.
    pub fn arp(&self) -> &ArpCache {
        &self.arp
    }

    /// Bytes held by reassembly now.
    pub fn reassembly_bytes(&self) -> usize {
        self.reasm.bytes_held()
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Takes the next output.
    pub fn pop_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`IpCore::poll`] next has work (ARP retries and expiry, reassembly
    /// timeouts).
    pub fn poll_at(&self) -> Option<Instant> {
        match (self.arp.poll_at(), self.reasm.poll_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs timers.
    pub fn poll(&mut self, now: Instant) {
        let (retries, failed) = self.arp.poll(now);
        for ip in retries {
            self.emit_arp(arp::ArpOp::Request, EthernetAddress::BROADCAST, EthernetAddress([0; 6]), ip);
        }
        for _ in 0..failed {
            self.drop(DropReason::ArpUnresolved);
        }
        for _ in 0..self.reasm.expire(now) {
            self.drop(DropReason::FragTimeout);
        }
    }

    fn drop(&mut self, r: DropReason) {
        self.stats.drops[r as usize] += 1;
    }

    /// Takes one frame from the driver; a datagram for a transport comes out as
    /// [`Output::Deliver`].
    pub fn receive_frame(&mut self, now: Instant, frame: &Chain) {
        if let Some(d) = self.receive_frame_local(now, frame) {
            self.out.push_back(Output::Deliver(d));
        }
    }

    /// Takes one frame from the driver, like [`IpCore::receive_frame`], but
    /// returns an unfragmented datagram for a transport instead of queueing it:
    /// for a composition that hands it to a core in the same thread.
    #[must_use = "the datagram is not queued: hand it to its transport"]
    pub fn receive_frame_local(&mut self, now: Instant, frame: &Chain) -> Option<Delivery> {
        self.stats.frames_in += 1;
        let mut head = [0u8; HEAD];
        let n = frame.peek(0, &mut head);
        let Ok(eth) = EthernetFrame::new_checked(&head[..n]) else {
            self.drop(DropReason::EthTruncated);
            return None;
        };
        let dst = eth.dst_addr();
        if dst != self.cfg.mac && !dst.is_broadcast() {
            self.drop(DropReason::EthNotForUs);
            return None;
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.receive_arp(now, &head[ETH_HDR..n]),
            EthernetProtocol::Ipv4 => {
                return self.receive_ipv4(now, frame.range(ETH_HDR, frame.len() - ETH_HDR), &head[ETH_HDR..n])
            }
            _ => self.drop(DropReason::EthUnknownType),
        }
        None
    }

    fn receive_arp(&mut self, now: Instant, bytes: &[u8]) {
        let Some(a) = arp::parse(bytes) else { return self.drop(DropReason::ArpMalformed) };
        let ours = self.cfg.addr.address();
        // RFC 826: update an entry we have; add one if the packet is for us —
        // only for a sender on our link (we never send to another directly).
        let for_us = a.target_ip == ours;
        if a.sender_ip != ours && !a.sender_ip.is_unspecified() && self.cfg.addr.contains_addr(&a.sender_ip) {
            let released = self.arp.learn(now, a.sender_ip, a.sender_mac, for_us);
            self.stats.arp_evicted += std::mem::take(&mut self.arp.evicted);
            for packet in released {
                self.emit_ip_frame(a.sender_mac, packet);
            }
        }
        if for_us && a.op == arp::ArpOp::Request {
            self.emit_arp(arp::ArpOp::Reply, a.sender_mac, a.sender_mac, a.sender_ip);
        }
    }

    /// An IPv4 datagram: `bytes` the whole of it (and what follows in the
    /// frame), `head` its first bytes copied out.
    fn receive_ipv4(&mut self, now: Instant, bytes: Chain, head: &[u8]) -> Option<Delivery> {
        let (ihl, total) = match self.check_ipv4(head, bytes.len()) {
            Ok(v) => v,
            Err(reason) => {
                self.drop(reason);
                return None;
            }
        };
        // The header was checked, so the view's accessors cannot panic.
        let ip = Ipv4Packet::new_unchecked(&head[..ihl]);
        let dst = ip.dst_addr();
        let ours = self.cfg.addr.address();
        if dst != ours && !dst.is_broadcast() && Some(dst) != self.cfg.addr.broadcast() {
            self.drop(DropReason::IpNotForUs);
            return None;
        }
        let (src, protocol) = (ip.src_addr(), ip.next_header());
        // Options (IHL > 5) are skipped: the payload starts after the full header.
        let payload = bytes.range(ihl, total - ihl);
        let ip_header = IpHeader::new(&head[..ihl]);
        // The transport header's first bytes, as far as the datagram has them.
        let thead = &head[ihl..head.len().min(total)];
        if ip.more_frags() || ip.frag_offset() != 0 {
            let key = reasm::Key { src, dst, protocol, ident: ip.ident() };
            // Held past this frame: copied (DESIGN: a reassembly queue copies).
            let piece = payload.to_vec();
            match self.reasm.add(now, key, usize::from(ip.frag_offset()), ip.more_frags(), &piece) {
                reasm::Added::Incomplete => {}
                reasm::Added::Complete(d) => {
                    self.stats.packets_in += 1;
                    let thead = d[..d.len().min(8)].to_vec();
                    let payload = Chain::from(Lent::from_vec(d));
                    if let Some(to) = self.demux_or_answer(now, src, dst, protocol, &payload, &thead, &ip_header) {
                        self.out.push_back(Output::Deliver(Delivery { to, src, dst, protocol, payload, ip_header }));
                    }
                }
                reasm::Added::Dropped(r) => self.drop(r),
            }
            for _ in 0..self.reasm.take_evicted() {
                self.drop(DropReason::FragMemory);
            }
            return None;
        }
        self.stats.packets_in += 1;
        let to = self.demux_or_answer(now, src, dst, protocol, &payload, thead, &ip_header)?;
        Some(Delivery { to, src, dst, protocol, payload, ip_header })
    }

    /// The header checks of an IPv4 datagram of `len` bytes (and what follows
    /// in the frame) whose first bytes are `head`: (header length, total length).
    fn check_ipv4(&self, head: &[u8], len: usize) -> Result<(usize, usize), DropReason> {
        if head.len() < IP_HDR {
            return Err(DropReason::IpTruncated);
        }
        if head[0] >> 4 != 4 {
            return Err(DropReason::IpBadVersion);
        }
        let ihl = usize::from(head[0] & 0x0f) * 4;
        if ihl < IP_HDR || ihl > head.len() {
            return Err(DropReason::IpBadHeaderLen);
        }
        let total = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if total < ihl || total > len {
            return Err(DropReason::IpTruncated);
        }
        if smoltcp::wire::checksum::data(&head[..ihl]) != !0 {
            return Err(DropReason::IpBadChecksum);
        }
        Ok((ihl, total))
    }

    /// The transport a datagram for us goes to; ICMP is answered here, and a
    /// datagram nobody takes is dropped (with a port or protocol unreachable).
    /// `thead` is the transport header's first (up to 8) bytes.
    #[allow(clippy::too_many_arguments)]
    fn demux_or_answer(
        &mut self,
        now: Instant,
        src: Ipv4Address,
        dst: Ipv4Address,
        protocol: IpProtocol,
        payload: &Chain,
        thead: &[u8],
        ip_header: &[u8],
    ) -> Option<TransportId> {
        match protocol {
            IpProtocol::Icmp => self.receive_icmp(now, src, dst, payload.to_vec()),
            IpProtocol::Udp | IpProtocol::Tcp => {
                if thead.len() < 4 {
                    self.drop(DropReason::NoTransport);
                    return None;
                }
                let (remote_port, port) =
                    (u16::from_be_bytes([thead[0], thead[1]]), u16::from_be_bytes([thead[2], thead[3]]));
                if let Some(to) = self.demux.lookup_flow(protocol, port, src, remote_port) {
                    return Some(to);
                }
                self.drop(DropReason::NoTransport);
                // RFC 1122 §3.2.2.1: a host SHOULD send port unreachable for a UDP
                // port nobody listens on (TCP answers with RST itself).
                if protocol == IpProtocol::Udp && dst == self.cfg.addr.address() {
                    let q = quote(ip_header, thead);
                    self.send_unreachable(now, src, 3, &q);
                }
            }
            _ => {
                self.drop(DropReason::NoTransport);
                if dst == self.cfg.addr.address() {
                    let q = quote(ip_header, thead);
                    self.send_unreachable(now, src, 2, &q);
                }
            }
        }
        None
    }

    fn receive_icmp(&mut self, now: Instant, src: Ipv4Address, dst: Ipv4Address, payload: Vec<u8>) {
        let Ok(icmp) = Icmpv4Packet::new_checked(&payload[..]) else { return self.drop(DropReason::IcmpMalformed) };
        if !icmp.verify_checksum() {
            return self.drop(DropReason::IcmpMalformed);
        }
        match icmp.msg_type() {
            Icmpv4Message::EchoRequest => {
                if dst != self.cfg.addr.address() {
                    return; // no replies to broadcast pings
                }
                let mut reply = payload.clone();
                reply[0] = 0; // echo reply
                reply[2] = 0;
                reply[3] = 0;
                let mut p = Icmpv4Packet::new_unchecked(&mut reply[..]);
                p.fill_checksum();
                self.stats.echo_replies += 1;
                let _ = self.send(now, src, IpProtocol::Icmp, &Lent::from_vec(reply).into(), false);
            }
            Icmpv4Message::EchoReply => match self.demux.lookup(IpProtocol::Icmp, icmp.echo_ident()) {
                Some(to) => self.out.push_back(Output::EchoReply(EchoReply {
                    to,
                    from: src,
                    ident: icmp.echo_ident(),
                    seq: icmp.echo_seq_no(),
                    data: icmp.data().to_vec(),
                })),
                None => self.drop(DropReason::NoTransport),
            },
            Icmpv4Message::DstUnreachable | Icmpv4Message::TimeExceeded => {
                // The quoted datagram: its header and at least 8 bytes of transport.
                let quoted = &payload[8..];
                if quoted.len() < IP_HDR + 4 || quoted[0] >> 4 != 4 {
                    return self.drop(DropReason::IcmpMalformed);
                }
                let ihl = usize::from(quoted[0] & 0x0f) * 4;
                if ihl < IP_HDR || quoted.len() < ihl + 4 {
                    return self.drop(DropReason::IcmpMalformed);
                }
                let protocol = IpProtocol::from(quoted[9]);
                let remote = Ipv4Address::new(quoted[16], quoted[17], quoted[18], quoted[19]);
                let local_port = u16::from_be_bytes([quoted[ihl], quoted[ihl + 1]]);
                let remote_port = u16::from_be_bytes([quoted[ihl + 2], quoted[ihl + 3]]);
                match self.demux.lookup_flow(protocol, local_port, remote, remote_port) {
                    Some(to) => self.out.push_back(Output::Icmp(IcmpError {
                        to,
                        reporter: src,
                        icmp_type: payload[0],
                        icmp_code: payload[1],
                        protocol,
                        remote,
                        local_port,
                        remote_port,
                    })),
                    None => self.drop(DropReason::NoTransport),
                }
            }
            _ => {}
        }
    }

    /// Sends an ICMP echo request (RFC 792) for an echo socket.
    pub fn send_echo_request(
        &mut self,
        now: Instant,
        dst: Ipv4Address,
        ident: u16,
        seq: u16,
        data: &[u8],
    ) -> Result<(), SendError> {
        let mut m = vec![0u8; 8 + data.len()];
        m[0] = 8;
        m[4..6].copy_from_slice(&ident.to_be_bytes());
        m[6..8].copy_from_slice(&seq.to_be_bytes());
        m[8..].copy_from_slice(data);
        Icmpv4Packet::new_unchecked(&mut m[..]).fill_checksum();
        self.send(now, dst, IpProtocol::Icmp, &Lent::from_vec(m).into(), false)
    }

    /// ICMP destination unreachable with `code`, quoting `quote` (the offending
    /// header and 8 bytes: see [`quote`]).
    pub fn send_unreachable(&mut self, now: Instant, to: Ipv4Address, code: u8, quote: &[u8]) {
        let mut msg = vec![0u8; 8 + quote.len()];
        msg[0] = 3;
        msg[1] = code;
        msg[8..].copy_from_slice(quote);
        Icmpv4Packet::new_unchecked(&mut msg[..]).fill_checksum();
        let _ = self.send(now, to, IpProtocol::Icmp, &Lent::from_vec(msg).into(), false);
    }

    /// Sends `payload` (a transport header and data) to `dst`, fragmenting above the
    /// MTU unless `dont_frag`, resolving the next hop with ARP (queueing meanwhile).
    /// The payload is not copied: each frame is its headers, then handles on it.
    pub fn send(
        &mut self,
        now: Instant,
        dst: Ipv4Address,
        protocol: IpProtocol,
        payload: &Chain,
        dont_frag: bool,
    ) -> Result<(), SendError> {
        if payload.len() > 65535 - IP_HDR {
            return Err(SendError::TooLarge(payload.len()));
        }
        let Some(hop) = self.routes.next_hop(dst) else {
            self.drop(DropReason::NoRoute);
            return Err(SendError::NoRoute(dst));
        };
        let mtu = self.cfg.mtu;
        if IP_HDR + payload.len() > mtu && dont_frag {
            self.drop(DropReason::TooBigDf);
            return Err(SendError::TooBig { len: IP_HDR + payload.len(), mtu });
        }
        let ident = self.ident;
        self.ident = self.ident.wrapping_add(1);
        // RFC 791: every fragment but the last carries a multiple of 8 bytes;
        // a datagram that fits the MTU is not cut (at an MTU of 65535 the
        // largest, 65515 bytes, is not a multiple of 8).
        let per = match IP_HDR + payload.len() <= mtu {
            true => payload.len(),
            false => (mtu - IP_HDR) / 8 * 8,
        };
        let pieces = || {
            let mut off = 0;
            std::iter::from_fn(move || {
                if off >= payload.len() && off > 0 {
                    return None;
                }
                let end = (off + per).min(payload.len());
                let piece = (off, end < payload.len(), payload.range(off, end - off));
                off = end.max(1);
                Some(piece)
            })
        };
        let broadcast = dst.is_broadcast() || Some(dst) == self.cfg.addr.broadcast();
        let mac = if broadcast { Some(EthernetAddress::BROADCAST) } else { self.arp.lookup(now, hop) };
        match mac {
            Some(mac) => {
                // Straight into frames, the payload where it is.
                for (off, more, data) in pieces() {
                    let frame = self.build_frame(mac, dst, protocol, ident, off, more, dont_frag, data);
                    self.out.push_back(Output::Frame(frame));
                }
                Ok(())
            }
            None => {
                let packets = pieces()
                    .map(|(off, more, data)| self.build_ip(dst, protocol, ident, off, more, dont_frag, data))
                    .collect();
                let (first, accepted) = self.arp.enqueue(now, hop, packets);
                if !accepted {
                    self.drop(DropReason::ArpQueueFull);
                    return Err(SendError::QueueFull(hop));
                }
                if first {
                    self.emit_arp(arp::ArpOp::Request, EthernetAddress::BROADCAST, EthernetAddress([0; 6]), hop);
                }
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build_ip(
        &self,
        dst: Ipv4Address,
        protocol: IpProtocol,
        ident: u16,
        off: usize,
        more: bool,
        df: bool,
        data: Chain,
    ) -> Chain {
        let mut hdr = vec![0u8; IP_HDR];
        self.write_ip_header(&mut hdr, IP_HDR + data.len(), dst, protocol, ident, off, more, df);
        let mut packet = Chain::from(Lent::from_vec(hdr));
        packet.append(data);
        packet
    }

    /// An Ethernet frame to `mac` holding the datagram `build_ip` would build.
    #[allow(clippy::too_many_arguments)]
    fn build_frame(
        &mut self,
        mac: EthernetAddress,
        dst: Ipv4Address,
        protocol: IpProtocol,
        ident: u16,
        off: usize,
        more: bool,
        df: bool,
        data: Chain,
    ) -> Chain {
        let mut hdr = self.eth_header(mac, IP_HDR);
        self.write_ip_header(&mut hdr[ETH_HDR..], IP_HDR + data.len(), dst, protocol, ident, off, more, df);
        let mut frame = Chain::from(Lent::from_vec(hdr));
        frame.append(data);
        frame
    }

    /// The Ethernet header of an IPv4 frame to `mac`, and `room` zeroed bytes
    /// for the headers the caller writes after it. Counted as a packet and a
    /// frame out.
    fn eth_header(&mut self, mac: EthernetAddress, room: usize) -> Vec<u8> {
        let mut frame = vec![0u8; ETH_HDR + room];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        eth.set_dst_addr(mac);
        eth.set_src_addr(self.cfg.mac);
        eth.set_ethertype(EthernetProtocol::Ipv4);
        self.stats.packets_out += 1;
        self.stats.frames_out += 1;
        frame
    }

    /// Writes into `buf` the IPv4 header of a datagram `total` bytes long.
    #[allow(clippy::too_many_arguments)]
    fn write_ip_header(
        &self,
        buf: &mut [u8],
        total: usize,
        dst: Ipv4Address,
        protocol: IpProtocol,
        ident: u16,
        off: usize,
        more: bool,
        df: bool,
    ) {
        let total = total as u16;
        let mut p = Ipv4Packet::new_unchecked(&mut buf[..IP_HDR]);
        p.set_version(4);
        p.set_header_len(IP_HDR as u8);
        p.set_total_len(total);
        p.set_ident(ident);
        p.set_dont_frag(df);
        p.set_more_frags(more);
        p.set_frag_offset(off as u16);
        p.set_hop_limit(self.cfg.ttl);
        p.set_next_header(protocol);
        p.set_src_addr(self.cfg.addr.address());
        p.set_dst_addr(dst);
        p.fill_checksum();
    }

    fn emit_ip_frame(&mut self, mac: EthernetAddress, packet: Chain) {
        let mut frame = Chain::from(Lent::from_vec(self.eth_header(mac, 0)));
        frame.append(packet);
        self.out.push_back(Output::Frame(frame));
    }

    /// Sends a TCP segment that may be larger than the MTU whole, with DF, for
    /// the device to cut into `mss`-byte segments (TSO: [`Output::TsoFrame`]). A
    /// segment that fits the MTU, or one whose next hop is not resolved yet, goes
    /// as [`IpCore::send`] sends it.
    pub fn send_tso(&mut self, now: Instant, dst: Ipv4Address, segment: &Chain, mss: u16) -> Result<(), SendError> {
        if IP_HDR + segment.len() <= self.cfg.mtu {
            return self.send(now, dst, IpProtocol::Tcp, segment, false);
        }
        if segment.len() > 65535 - IP_HDR {
            return Err(SendError::TooLarge(segment.len()));
        }
        let Some(hop) = self.routes.next_hop(dst) else {
            self.drop(DropReason::NoRoute);
            return Err(SendError::NoRoute(dst));
        };
        let Some(mac) = self.arp.lookup(now, hop) else {
            return self.send(now, dst, IpProtocol::Tcp, segment, false);
        };
        let ident = self.ident;
        self.ident = self.ident.wrapping_add(1);
        let frame = self.build_frame(mac, dst, IpProtocol::Tcp, ident, 0, false, true, segment.clone());
        self.out.push_back(Output::TsoFrame { frame, mss });
        Ok(())
    }

    fn emit_arp(
        &mut self,
        op: arp::ArpOp,
        eth_dst: EthernetAddress,
        target_mac: EthernetAddress,
        target_ip: Ipv4Address,
    ) {
        let frame = arp::build(op, self.cfg.mac, self.cfg.addr.address(), eth_dst, target_mac, target_ip);
        self.stats.frames_out += 1;
        if op == arp::ArpOp::Request {
            self.stats.arp_requests += 1;
        }
        self.out.push_back(Output::Frame(Lent::from_vec(frame).into()));
    }
}
