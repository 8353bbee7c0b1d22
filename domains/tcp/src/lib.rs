//! capnet-tcp: the tcp domain's protocol core — TCP connections per RFC 9293,
//! with RFC 6298 retransmission timing, RFC 5681/6582 congestion control and
//! recovery, RFC 7323 window scaling, RFC 6528 initial sequence numbers and
//! RFC 5961's defences against blind resets.
//!
//! Sans-IO like every core: segments arrive from the ip domain
//! ([`TcpCore::receive`], [`TcpCore::on_icmp`]), applications' calls through the
//! sockets domain ([`TcpCore::listen`], [`TcpCore::connect`], [`TcpCore::send`],
//! [`TcpCore::recv`], …), time through `now` arguments and [`TcpCore::poll`];
//! segments to send come out of [`TcpCore::pop_output`] and the next deadline out
//! of [`TcpCore::poll_at`]. One connection's rules live in `conn`; this module
//! owns the table: listeners, the demux of segments to connections, accept queues,
//! ephemeral ports and ISNs. `docs/tcp.md` lists each RFC feature with its test.

#![forbid(unsafe_code)]

pub mod cc;
mod conn;
mod cookie;
pub mod rtt;
pub mod rx;
pub mod sack;
pub mod seq;
mod stats;

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use capnet_ipc::lent::Chain;
pub use conn::Endpoints;
use conn::{Conn, Cx, Disposition, Segment};
pub use cookie::COOKIE_MSS;
use slotmap::SlotMap;
pub use smoltcp::time::{Duration, Instant};
pub use smoltcp::wire::Ipv4Address;
pub use stats::{DropReason, Stats};

slotmap::new_key_type! {
    /// A listener or connection of the tcp core. Generational: the id of a
    /// closed socket never names its successor in the same slot.
    pub struct SocketId;
}

impl SocketId {
    /// The id as a number, to cross a channel between groups.
    pub fn to_raw(self) -> u64 {
        slotmap::Key::data(&self).as_ffi()
    }

    /// An id from [`SocketId::to_raw`]'s number. Any number is accepted: the core
    /// checks slot and generation on every call, so a made-up one is `BadSocket`.
    pub fn from_raw(raw: u64) -> Self {
        slotmap::KeyData::from_ffi(raw).into()
    }
}

/// The tcp core's settings. Timers that make tests slow are here so tests can
/// set them short (DESIGN, "Testing against the real world").
#[derive(Debug, Clone)]
pub struct Config {
    /// Our address.
    pub local: Ipv4Address,
    /// The route MTU (bytes of IP datagram); our MSS is this minus 40.
    pub mtu: usize,
    /// Maximum segment lifetime; TIME-WAIT lasts twice this.
    pub msl: Duration,
    /// RFC 6298 §2.4's lower bound on the RTO (default 200 ms, as Linux).
    pub min_rto: Duration,
    /// Upper bound on the RTO (RFC 6298 §2.5: at least 60 s).
    pub max_rto: Duration,
    /// The RTO before any measurement (RFC 6298 §2.1: 1 s).
    pub initial_rto: Duration,
    /// SYN / SYN-ACK retransmissions before giving up.
    pub syn_retries: u32,
    /// Data retransmissions before giving up.
    pub data_retries: u32,
    /// Zero-window probes a connection its application has closed sends
    /// without the window opening by a segment before it gives up and resets
    /// (Linux's `tcp_orphan_retries`, 8 by default): a peer holding a closed
    /// connection's data behind a zero (or dripping) window pins it only so long.
    pub orphan_retries: u32,
    /// Send buffer per connection, bytes.
    pub send_buffer: usize,
    /// Receive buffer per connection, bytes (sets the window scale).
    pub recv_buffer: usize,
    /// Bytes all connections together may hold: queued to send, received and
    /// unread, and the receive windows offered (each connection may hold
    /// [`MEMORY_FLOOR`] whatever the others hold). Past it, sends take nothing
    /// (the application sees back-pressure) and windows open no further: what
    /// the core buffers is bounded by this, not by what peers send or withhold.
    pub memory: usize,
    /// How long an ACK may be delayed (RFC 9293 §3.8.6.3: under 500 ms); zero
    /// acknowledges every segment at once.
    pub delayed_ack: Duration,
    /// The secret of RFC 6528's ISN function and RFC 6056's port choice; the
    /// runtime draws it from the system's random source.
    pub secret: [u64; 2],
    /// The ephemeral port range (inclusive).
    pub ephemeral: (u16, u16),
    /// TCP segmentation offload: when nonzero, new data goes out in segments of
    /// up to this many payload bytes (whole MSS-sized pieces) for the device to
    /// cut. The runtime sets it when its device does TSO; 0 (off) by default.
    pub tso: usize,
    /// Offer SACK (RFC 2018) in our SYNs and accept it in the peer's.
    pub sack: bool,
    /// Offer timestamps (RFC 7323 §3) likewise.
    pub timestamps: bool,
    /// The congestion control new connections start with (the domain's
    /// default; a socket may choose another).
    pub congestion_control: cc::Algorithm,
    /// Handles on lenders' buffers (received data still in the lender's pool)
    /// all connections may hold at once; past it, arriving data is copied and
    /// the buffer goes back, so a reader that does not read cannot hold a
    /// lender's pool shut.
    pub max_loans: usize,
}

impl Config {
    /// Defaults for a stack at `local`, keyed with `secret`.
    pub fn new(local: Ipv4Address, secret: [u64; 2]) -> Self {
        Self {
            local,
            mtu: 1500,
            msl: Duration::from_secs(30),
            min_rto: Duration::from_millis(200),
            max_rto: Duration::from_secs(60),
            initial_rto: Duration::from_secs(1),
            syn_retries: 6,
            data_retries: 15,
            orphan_retries: 8,
            send_buffer: 1 << 20,
            recv_buffer: 1 << 20,
            memory: 256 << 20,
            delayed_ack: Duration::from_millis(40),
            secret,
            ephemeral: (49152, 65535),
            tso: 0,
            sack: true,
            timestamps: true,
            congestion_control: cc::Algorithm::default(),
            max_loans: 256,
        }
    }

    /// The MSS we offer and send with at most.
    pub fn mss(&self) -> usize {
        self.mtu.saturating_sub(40).max(64)
    }
}

/// Keep-alive settings (RFC 1122 §4.2.3.6), per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is declared dead.
    pub count: u32,
}

impl Keepalive {
    /// Probes after `idle`, then every `idle` (at most 75 s), 9 of them, as Linux.
    pub fn after(idle: Duration) -> Self {
        Self { idle, interval: idle.min(Duration::from_secs(75)), count: 9 }
    }
}

/// TCP call and connection errors, each one `io::ErrorKind` in the client library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    /// The port is in use.
    #[error("port {0} is already in use")]
    AddrInUse(u16),
    /// No ephemeral port is free for this peer.
    #[error("no free ephemeral port")]
    NoEphemeral,
    /// No such socket (closed, or never made).
    #[error("stale or unknown TCP socket")]
    BadSocket,
    /// A listener where a connection is needed, or the reverse.
    #[error("wrong kind of TCP socket for this call")]
    WrongKind,
    /// The connection is not (or no longer) connected.
    #[error("not connected")]
    NotConnected,
    /// The peer answered our SYN with a reset, or ICMP said port unreachable.
    #[error("connection refused")]
    ConnectionRefused,
    /// The peer reset the connection.
    #[error("connection reset by peer")]
    ConnectionReset,
    /// Retransmissions or keep-alive probes went unanswered.
    #[error("connection timed out")]
    TimedOut,
    /// Writing after shutdown.
    #[error("broken pipe: the connection was shut down for writing")]
    BrokenPipe,
    /// An ICMP error about the connection.
    #[error("ICMP type {icmp_type} code {icmp_code}")]
    Unreachable {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        icmp_code: u8,
    },
}

/// What a receive found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Bytes, in order: handles on the buffers they arrived in.
    Data(capnet_ipc::lent::Chain),
    /// The peer finished sending (or reading was shut down).
    Eof,
    /// Nothing yet.
    Nothing,
}

/// Readiness of a socket, for a poll-like API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ready {
    /// A receive (or accept) would not find nothing.
    pub readable: bool,
    /// A send would take bytes (or fail at once).
    pub writable: bool,
    /// The connection ended with an error.
    pub error: bool,
    /// Both directions are finished.
    pub hup: bool,
}

/// Per-socket options ([`TcpCore::set_option`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SockOpt {
    /// Nagle's algorithm off (`true`) or on (RFC 9293 §3.7.4).
    NoDelay(bool),
    /// Delayed acknowledgments on (the default unless the domain's
    /// `delayed_ack` is zero) or off: every segment acknowledged at once.
    DelayedAck(bool),
    /// Keep-alive (`None`: off).
    KeepAlive(Option<Keepalive>),
    /// The congestion control algorithm.
    CongestionControl(cc::Algorithm),
}

/// A connection's RFC 9293 state (§3.3.2; LISTEN is a listener, not a
/// connection). Compares equal to its RFC name (`"TIME-WAIT"`), as reports print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// SYN-SENT.
    SynSent,
    /// SYN-RECEIVED.
    SynReceived,
    /// ESTABLISHED.
    Established,
    /// FIN-WAIT-1.
    FinWait1,
    /// FIN-WAIT-2.
    FinWait2,
    /// CLOSING.
    Closing,
    /// TIME-WAIT.
    TimeWait,
    /// CLOSE-WAIT.
    CloseWait,
    /// LAST-ACK.
    LastAck,
    /// CLOSED.
    Closed,
}

impl ConnState {
    /// The RFC's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ConnState::SynSent => "SYN-SENT",
            ConnState::SynReceived => "SYN-RECEIVED",
            ConnState::Established => "ESTABLISHED",
            ConnState::FinWait1 => "FIN-WAIT-1",
            ConnState::FinWait2 => "FIN-WAIT-2",
            ConnState::Closing => "CLOSING",
            ConnState::TimeWait => "TIME-WAIT",
            ConnState::CloseWait => "CLOSE-WAIT",
            ConnState::LastAck => "LAST-ACK",
            ConnState::Closed => "CLOSED",
        }
    }
}

impl PartialEq<&str> for ConnState {
    fn eq(&self, name: &&str) -> bool {
        self.name() == *name
    }
}

/// One connection as `capnet status --sockets` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnInfo {
    /// Its RFC 9293 state.
    pub state: ConnState,
    /// Our port.
    pub local_port: u16,
    /// Peer address.
    pub remote: Ipv4Address,
    /// Peer port.
    pub remote_port: u16,
    /// Effective send MSS.
    pub mss: usize,
    /// The peer's window scale.
    pub snd_wscale: u8,
    /// Ours.
    pub rcv_wscale: u8,
    /// Congestion window, bytes.
    pub cwnd: usize,
    /// Slow-start threshold, bytes.
    pub ssthresh: usize,
    /// Smoothed RTT, µs.
    pub srtt_us: Option<u64>,
    /// RTT variation, µs.
    pub rttvar_us: u64,
    /// Current RTO, µs.
    pub rto_us: u64,
    /// Segments retransmitted.
    pub retransmits: u64,
    /// Bytes queued to send (unacknowledged + unsent).
    pub snd_queued: usize,
    /// Bytes received, not yet read.
    pub rcv_queued: usize,
    /// The peer's window, bytes.
    pub snd_wnd: usize,
    /// The congestion control algorithm.
    pub congestion_control: &'static str,
    /// SACK agreed (RFC 2018).
    pub sack: bool,
    /// Timestamps agreed (RFC 7323).
    pub timestamps: bool,
    /// SACK blocks received from the peer.
    pub sack_blocks_in: u64,
    /// The ranges the peer has SACKed above the cumulative ACK now.
    pub sacked_ranges: usize,
    /// In fast recovery.
    pub recovery: bool,
    /// Nagle's algorithm off.
    pub nodelay: bool,
    /// Delayed acknowledgments on.
    pub delayed_ack: bool,
}

/// What the core asks the ip domain to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a TCP segment (header with checksum + payload) to `dst`.
    Send {
        /// Destination address.
        dst: Ipv4Address,
        /// The segment: its header, then handles on the payload.
        segment: Chain,
        /// `Some(mss)`: a segment of several MSS for the device to cut (TSO,
        /// [`Config::tso`]); its checksum field holds only the pseudo-header sum.
        tso: Option<u16>,
    },
}

#[derive(Debug)]
struct Listener {
    port: u16,
    backlog: usize,
    /// Established connections not yet accepted.
    accept: VecDeque<SocketId>,
    /// Connections in SYN-RECEIVED.
    syn_pending: usize,
    /// The congestion control its connections start with.
    cc: cc::Algorithm,
}

#[derive(Debug)]
enum Sock {
    Listener(Listener),
    Conn {
        conn: Box<Conn>,
        /// The listener of a passive connection not yet accepted.
        parent: Option<SocketId>,
    },
}

/// A segment's (source port, destination port), if it is long enough to have
/// them: for a runtime that routes a segment it holds without parsing TCP itself.
pub fn segment_ports(segment: &[u8]) -> Option<(u16, u16)> {
    let p = smoltcp::wire::TcpPacket::new_checked(segment).ok()?;
    Some((p.src_port(), p.dst_port()))
}

/// Completes the checksum of a segment the device vouched for (its checksum
/// field holds only the pseudo-header sum) before it leaves for a tcp core that
/// will verify it. A segment too short for a TCP header is left as it is (its
/// receiver drops it).
pub fn complete_checksum(src: Ipv4Address, dst: Ipv4Address, segment: &mut [u8]) {
    if let Ok(mut p) = smoltcp::wire::TcpPacket::new_checked(segment) {
        p.fill_checksum(&src.into(), &dst.into());
    }
}

/// Bytes a connection may queue to send, and offer as its window, even when
/// the memory budget is spent, so that a few peers filling it stall none of the
/// others (Linux keeps the same kind of floor, `tcp_rmem`/`tcp_wmem`'s minimum,
/// under `tcp_mem` pressure): what the core holds is at most
/// [`Config::memory`] plus twice this per connection.
pub const MEMORY_FLOOR: usize = 16 << 10;

/// What `conn` may hold: the budget less what every other connection holds
/// (`used` counts `conn`'s own charge too).
fn room_for(cfg: &Config, used: usize, conn: &Conn) -> usize {
    cfg.memory.saturating_sub(used - conn.charged)
}

/// The tcp domain's core.
#[derive(Debug)]
pub struct TcpCore {
    cfg: Config,
    socks: SlotMap<SocketId, Sock>,
    conns: HashMap<Endpoints, SocketId>,
    listeners: HashMap<u16, SocketId>,
    out: VecDeque<Output>,
    stats: Stats,
    next_ephemeral: u32,
    /// No connection has a timer due before this (it may be early: a timer that
    /// moved later is found by the next scan). Spares a scan of every connection
    /// on each packet.
    next_timer: Option<Instant>,
    /// The latest time a call brought (for the calls that bring none).
    now: Instant,
    /// Connections whose windows the memory budget holds shut.
    starved: std::collections::BTreeSet<SocketId>,
}

impl TcpCore {
    /// An empty table.
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            socks: SlotMap::with_key(),
            conns: HashMap::new(),
            listeners: HashMap::new(),
            out: VecDeque::new(),
            stats: Stats::default(),
            next_ephemeral: 0,
            next_timer: None,
            now: Instant::ZERO,
            starved: Default::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The settings, to change for sockets opened from now on (the domain's
    /// defaults: congestion control, buffers, timers).
    pub fn config_mut(&mut self) -> &mut Config {
        &mut self.cfg
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The next segment to send.
    pub fn pop_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    fn keyed_hash(&self, parts: impl Hash) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.cfg.secret.hash(&mut h);
        parts.hash(&mut h);
        h.finish()
    }

    /// RFC 6528: ISN = M + F(localip, localport, remoteip, remoteport, secretkey),
    /// M a 4 µs timer, F a keyed hash (SipHash with the secret as its first input).
    fn isn(&self, now: Instant, ends: Endpoints) -> seq::Seq {
        let f = self.keyed_hash((self.cfg.local.octets(), ends.local_port, ends.remote.octets(), ends.remote_port));
        seq::Seq((now.total_micros() / 4) as u32).plus(f as u32 as usize)
    }

    /// Listens on `port` (0: an ephemeral port) with a SYN queue and an accept
    /// queue of `backlog` each (at least 1).
    pub fn listen(&mut self, port: u16, backlog: usize) -> Result<SocketId, TcpError> {
        let port = if port == 0 { self.free_listen_port()? } else { port };
        if self.listeners.contains_key(&port) {
            return Err(TcpError::AddrInUse(port));
        }
        let cc = self.cfg.congestion_control;
        let l = Listener { port, backlog: backlog.max(1), accept: VecDeque::new(), syn_pending: 0, cc };
        let id = self.socks.insert(Sock::Listener(l));
        self.listeners.insert(port, id);
        Ok(id)
    }

    fn free_listen_port(&mut self) -> Result<u16, TcpError> {
        let (lo, hi) = self.cfg.ephemeral;
        let n = u32::from(hi - lo) + 1;
        for _ in 0..n {
            let p = lo + (self.next_ephemeral % n) as u16;
            self.next_ephemeral = self.next_ephemeral.wrapping_add(1);
            if !self.listeners.contains_key(&p) && !self.conns.keys().any(|e| e.local_port == p) {
                return Ok(p);
            }
        }
        Err(TcpError::NoEphemeral)
    }

    /// The port a listener or connection is on.
    pub fn local_port(&self, id: SocketId) -> Result<u16, TcpError> {
        match self.socks.get(id) {
            Some(Sock::Listener(l)) => Ok(l.port),
            Some(Sock::Conn { conn, .. }) => Ok(conn.ends.local_port),
            None => Err(TcpError::BadSocket),
        }
    }

    /// A connection's endpoints.
    pub fn endpoints(&self, id: SocketId) -> Result<Endpoints, TcpError> {
        match self.socks.get(id) {
            Some(Sock::Conn { conn, .. }) => Ok(conn.ends),
            Some(Sock::Listener(_)) => Err(TcpError::WrongKind),
            None => Err(TcpError::BadSocket),
        }
    }

    /// The next established connection of a listener, if any.
    pub fn accept(&mut self, listener: SocketId) -> Result<Option<SocketId>, TcpError> {
        let Some(Sock::Listener(l)) = self.socks.get_mut(listener) else {
            return Err(self.kind_error(listener));
        };
        let queue = std::mem::take(&mut l.accept);
        let mut found = None;
        let mut rest = VecDeque::new();
        for id in queue {
            if found.is_none()
                && matches!(self.socks.get(id), Some(Sock::Conn { parent: Some(p), .. }) if *p == listener)
            {
                found = Some(id);
            } else if found.is_some() {
                rest.push_back(id);
            }
        }
        if let Some(Sock::Listener(l)) = self.socks.get_mut(listener) {
            l.accept = rest;
        }
        if let Some(id) = found {
            if let Some(Sock::Conn { parent, .. }) = self.socks.get_mut(id) {
                *parent = None;
            }
        }
        Ok(found)
    }

    fn kind_error(&self, id: SocketId) -> TcpError {
        if self.socks.contains_key(id) {
            TcpError::WrongKind
        } else {
            TcpError::BadSocket
        }
    }

    /// Opens a connection to `remote:port` from an ephemeral port (RFC 6056
    /// algorithm 3: a keyed hash of the peer picks where the search starts).
    pub fn connect(&mut self, now: Instant, remote: Ipv4Address, port: u16) -> Result<SocketId, TcpError> {
        self.connect_from(now, 0, remote, port)
    }

    /// Opens a connection from `local_port` (0: an ephemeral one) to `remote:port`.
    pub fn connect_from(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: Ipv4Address,
        port: u16,
    ) -> Result<SocketId, TcpError> {
        self.tick(now);
        if port == 0 || remote.is_unspecified() || remote.is_broadcast() || remote.is_multicast() {
            return Err(TcpError::ConnectionRefused);
        }
        let (lo, hi) = self.cfg.ephemeral;
        let n = u32::from(hi - lo) + 1;
        let offset = self.keyed_hash((remote.octets(), port)) as u32;
        let mut ends = None;
        for i in 0..if local_port == 0 { n } else { 0 } {
            let p = lo + (offset.wrapping_add(self.next_ephemeral).wrapping_add(i) % n) as u16;
            let e = Endpoints { local_port: p, remote, remote_port: port };
            if !self.listeners.contains_key(&p) && !self.conns.contains_key(&e) {
                ends = Some(e);
                self.next_ephemeral = self.next_ephemeral.wrapping_add(i + 1);
                break;
            }
        }
        if local_port != 0 {
            let e = Endpoints { local_port, remote, remote_port: port };
            if self.listeners.contains_key(&local_port) || self.conns.contains_key(&e) {
                return Err(TcpError::AddrInUse(local_port));
            }
            ends = Some(e);
        }
        let ends = ends.ok_or(TcpError::NoEphemeral)?;
        let iss = self.isn(now, ends);
        let mut cx = Cx { cfg: &self.cfg, out: &mut self.out, stats: &mut self.stats, now: self.now };
        let conn = Conn::connect(&mut cx, now, ends, iss, self.cfg.congestion_control);
        self.note_timer(conn.poll_at());
        let id = self.socks.insert(Sock::Conn { conn: Box::new(conn), parent: None });
        self.conns.insert(ends, id);
        Ok(id)
    }

    /// Runs `f` on connection `id` and settles what it returned.
    fn with_conn<R>(
        &mut self,
        id: SocketId,
        f: impl FnOnce(&mut Conn, &mut Cx) -> (R, Disposition),
    ) -> Result<R, TcpError> {
        let Some(Sock::Conn { conn, .. }) = self.socks.get_mut(id) else {
            return Err(self.kind_error(id));
        };
        // What it may hold: the budget less what every other connection holds.
        let used = self.stats.memory_held as usize;
        conn.room = room_for(&self.cfg, used, conn);
        let loans = self.stats.loans_held as usize;
        conn.loan_room = self.cfg.max_loans.saturating_sub(loans - conn.loans_charged);
        let mut cx = Cx { cfg: &self.cfg, out: &mut self.out, stats: &mut self.stats, now: self.now };
        let (r, d) = f(conn, &mut cx);
        let held = conn.held();
        let freed = held < conn.charged;
        self.stats.memory_held = (used - conn.charged + held) as u64;
        conn.charged = held;
        let lent = conn.loans();
        self.stats.loans_held = (loans - conn.loans_charged + lent) as u64;
        conn.loans_charged = lent;
        if conn.window_starved() {
            self.starved.insert(id);
        }
        let at = conn.poll_at();
        self.note_timer(at);
        self.settle(id, d);
        if freed && !self.starved.is_empty() {
            self.reopen_starved();
        }
        Ok(r)
    }

    /// Memory was freed: connections whose windows the budget held shut offer
    /// what it allows now (their peers would otherwise wait for a zero-window
    /// probe, backed off up to minutes), oldest first, while there is room.
    fn reopen_starved(&mut self) {
        let now = self.now;
        while self.memory_used() < self.cfg.memory {
            let Some(id) = self.starved.pop_first() else { break };
            // (Settling inside frees nothing: no reopening from within.)
            let _ = self.with_conn(id, |c, cx| {
                c.reopen(cx, now);
                ((), Disposition::Keep)
            });
            if self.starved.first() == Some(&id) {
                break; // still starved: nothing left to give
            }
        }
    }

    /// Frees a socket, and what its connection held of the memory budget.
    fn remove_sock(&mut self, id: SocketId) {
        if let Some(Sock::Conn { conn, .. }) = self.socks.remove(id) {
            self.stats.memory_held -= conn.charged as u64;
            self.stats.loans_held -= conn.loans_charged as u64;
            self.starved.remove(&id);
        }
    }

    /// Bytes all connections hold (against [`Config::memory`]).
    pub fn memory_used(&self) -> usize {
        self.stats.memory_held as usize
    }

    /// Time moves on (never back).
    fn tick(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn note_timer(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            self.next_timer = Some(self.next_timer.map_or(at, |t| t.min(at)));
        }
    }

    /// Applies a connection's disposition to the table.
    fn settle(&mut self, id: SocketId, d: Disposition) {
        let Some(Sock::Conn { conn, parent }) = self.socks.get(id) else { return };
        let (ends, orphan, parent) = (conn.ends, conn.orphan, *parent);
        match d {
            Disposition::Keep => {}
            Disposition::Established => {
                if let Some(Some(Sock::Listener(l))) = parent.map(|p| self.socks.get_mut(p)) {
                    l.syn_pending = l.syn_pending.saturating_sub(1);
                    l.accept.push_back(id);
                }
            }
            Disposition::Closed => {
                if self.conns.get(&ends) == Some(&id) {
                    self.conns.remove(&ends);
                }
                if let Some(Some(Sock::Listener(l))) = parent.map(|p| self.socks.get_mut(p)) {
                    if let Some(at) = l.accept.iter().position(|c| *c == id) {
                        l.accept.remove(at);
                    } else {
                        l.syn_pending = l.syn_pending.saturating_sub(1);
                    }
                }
                if orphan || parent.is_some() {
                    self.remove_sock(id);
                }
            }
        }
    }

    /// Queues what fits of `data` to send, keeping its handles until they
    /// are acknowledged (bytes given as a slice are copied once, here); returns
    /// how many fit (0: the send buffer is full).
    pub fn send(&mut self, now: Instant, id: SocketId, data: impl Into<Chain>) -> Result<usize, TcpError> {
        let data = data.into();
        self.tick(now);
        self.with_conn(id, |c, cx| (c.send(cx, now, data), Disposition::Keep))?
    }

    /// Takes up to `max` bytes received in order.
    pub fn recv(&mut self, now: Instant, id: SocketId, max: usize) -> Result<Received, TcpError> {
        self.tick(now);
        self.with_conn(id, |c, cx| (c.recv(cx, now, max), Disposition::Keep))?
    }

    /// Shuts down reading and/or writing (half-close: a FIN after queued data).
    pub fn shutdown(&mut self, now: Instant, id: SocketId, read: bool, write: bool) -> Result<(), TcpError> {
        self.tick(now);
        self.with_conn(id, |c, cx| {
            let r = c.shutdown(cx, now, read, write);
            let d = if c.is_closed() { Disposition::Closed } else { Disposition::Keep };
            (r, d)
        })?
    }

    /// The application lets go of a socket: a listener resets its unaccepted
    /// connections; a connection closes gracefully in the background (or resets
    /// if data it received was never read).
    pub fn close(&mut self, now: Instant, id: SocketId) -> Result<(), TcpError> {
        self.tick(now);
        match self.socks.get(id) {
            Some(Sock::Listener(l)) => {
                let port = l.port;
                self.listeners.remove(&port);
                let children: Vec<SocketId> = self
                    .socks
                    .iter()
                    .filter_map(|(c, s)| matches!(s, Sock::Conn { parent: Some(p), .. } if *p == id).then_some(c))
                    .collect();
                for c in children {
                    let _ = self.with_conn(c, |conn, cx| ((), conn.abort(cx)));
                }
                self.remove_sock(id);
                Ok(())
            }
            Some(Sock::Conn { .. }) => self.with_conn(id, |c, cx| ((), c.close(cx, now))),
            None => Err(TcpError::BadSocket),
        }
    }

    /// The sockets domain that owned every socket is gone (it restarted): close
    /// every listener and reset every connection (the peers hear RST), as a
    /// kernel does for the sockets of a process that died.
    pub fn abort_all(&mut self, now: Instant) {
        let ids: Vec<(SocketId, bool)> =
            self.socks.iter().map(|(id, s)| (id, matches!(s, Sock::Listener(_)))).collect();
        for (id, listener) in ids {
            let _ = if listener { self.close(now, id) } else { self.abort(id) };
        }
    }

    /// Resets a connection now (linger 0) and frees it.
    pub fn abort(&mut self, id: SocketId) -> Result<(), TcpError> {
        self.with_conn(id, |c, cx| {
            c.orphan = true;
            ((), c.abort(cx))
        })
    }

    /// Sets a per-socket option. Congestion control may be set on a listener
    /// (for the connections it accepts) or a connection (the new algorithm takes
    /// over its window); the rest apply to connections.
    pub fn set_option(&mut self, now: Instant, id: SocketId, opt: SockOpt) -> Result<(), TcpError> {
        self.tick(now);
        if let (Some(Sock::Listener(l)), SockOpt::CongestionControl(a)) = (self.socks.get_mut(id), opt) {
            l.cc = a;
            return Ok(());
        }
        self.with_conn(id, |c, cx| {
            match opt {
                SockOpt::NoDelay(on) => c.nodelay = on,
                SockOpt::DelayedAck(on) => c.delayed_ack = on,
                SockOpt::KeepAlive(k) => c.set_keepalive(now, k),
                SockOpt::CongestionControl(a) => c.set_congestion_control(a),
            }
            c.output(cx, now);
            ((), Disposition::Keep)
        })
    }

    /// A socket's readiness.
    pub fn ready(&self, id: SocketId) -> Result<Ready, TcpError> {
        match self.socks.get(id) {
            Some(Sock::Listener(l)) => {
                Ok(Ready { readable: l.accept.iter().any(|c| self.socks.contains_key(*c)), ..Ready::default() })
            }
            Some(Sock::Conn { conn, .. }) => {
                let mut r = conn.ready();
                // Past the budget a send takes nothing: not writable (a parked
                // write comes back when an acknowledgment frees memory).
                let room = room_for(&self.cfg, self.memory_used(), conn);
                r.writable &= conn.is_closed() || conn.send_room(room) > 0;
                Ok(r)
            }
            None => Err(TcpError::BadSocket),
        }
    }

    /// Whether a connection finished its handshake (or failed: then its error).
    pub fn connected(&self, id: SocketId) -> Result<bool, TcpError> {
        match self.socks.get(id) {
            Some(Sock::Conn { conn, .. }) => match conn.error() {
                Some(e) => Err(e.clone()),
                None if conn.is_closed() => Err(TcpError::NotConnected),
                None => Ok(!matches!(conn.state, conn::State::SynSent(_) | conn::State::SynRcvd(_))),
            },
            Some(Sock::Listener(_)) => Err(TcpError::WrongKind),
            None => Err(TcpError::BadSocket),
        }
    }

    /// One connection's state.
    pub fn info(&self, id: SocketId) -> Result<ConnInfo, TcpError> {
        match self.socks.get(id) {
            Some(Sock::Conn { conn, .. }) => Ok(conn.info()),
            Some(Sock::Listener(_)) => Err(TcpError::WrongKind),
            None => Err(TcpError::BadSocket),
        }
    }

    /// Every connection's state, and the listening ports.
    pub fn sockets(&self) -> (Vec<ConnInfo>, Vec<u16>) {
        let mut conns = Vec::new();
        let mut listening = Vec::new();
        for s in self.socks.values() {
            match s {
                Sock::Conn { conn, .. } => conns.push(conn.info()),
                Sock::Listener(l) => listening.push(l.port),
            }
        }
        (conns, listening)
    }

    /// A segment from the ip domain (`src` → `dst`, TCP header and payload):
    /// its payload is kept as a handle on the buffer it arrived in.
    pub fn receive(&mut self, now: Instant, src: Ipv4Address, dst: Ipv4Address, segment: &Chain) {
        self.receive_segment(now, src, dst, segment, false)
    }

    /// A segment whose checksum the device vouched for and left partial (a TAP
    /// with checksum offload, read in this process): taken without verifying it.
    pub fn receive_vouched(&mut self, now: Instant, src: Ipv4Address, dst: Ipv4Address, segment: &Chain) {
        self.receive_segment(now, src, dst, segment, true)
    }

    fn receive_segment(&mut self, now: Instant, src: Ipv4Address, dst: Ipv4Address, bytes: &Chain, vouched: bool) {
        self.tick(now);
        self.stats.segments_in += 1;
        let seg = match Segment::parse(src, dst, bytes, vouched) {
            Ok(s) => s,
            Err(r) => return self.stats.drop(r),
        };
        if dst != self.cfg.local {
            return self.stats.drop(DropReason::NotForUs);
        }
        let ends = Endpoints { local_port: seg.dst_port, remote: src, remote_port: seg.src_port };
        if let Some(&id) = self.conns.get(&ends) {
            let reuse = matches!(self.socks.get(id), Some(Sock::Conn { conn, .. }) if conn.reusable_by(&seg));
            if !reuse {
                let _ = self.with_conn(id, |c, cx| ((), c.on_segment(cx, now, &seg)));
                return;
            }
            // A new incarnation replaces a connection in TIME-WAIT.
            self.conns.remove(&ends);
            if let Some(Sock::Conn { conn, .. }) = self.socks.get(id) {
                if conn.orphan {
                    self.remove_sock(id);
                }
            }
        }
        let mut cx = Cx { cfg: &self.cfg, out: &mut self.out, stats: &mut self.stats, now: self.now };
        let Some(&lid) = self.listeners.get(&seg.dst_port) else {
            cx.stats.drop(DropReason::NoSocket);
            return conn::reset_for(&mut cx, ends, &seg);
        };
        // RFC 9293 §3.10.7.2: LISTEN.
        if seg.rst {
            return;
        }
        if seg.ack.is_some() {
            if !seg.syn && self.accept_cookie(now, ends, &seg, lid) {
                return;
            }
            let mut cx = Cx { cfg: &self.cfg, out: &mut self.out, stats: &mut self.stats, now: self.now };
            cx.stats.drop(DropReason::NoSocket);
            return conn::reset_for(&mut cx, ends, &seg);
        }
        if !seg.syn {
            return self.stats.drop(DropReason::NoAck);
        }
        let Some(Sock::Listener(l)) = self.socks.get(lid) else { return };
        let cc = l.cc;
        if l.accept.len() >= l.backlog {
            return self.stats.drop(DropReason::AcceptQueueFull);
        }
        if l.syn_pending >= l.backlog {
            // RFC 4987 §3.6: a full SYN queue answers with a SYN cookie and
            // keeps nothing, so a flood of SYNs shuts nobody out.
            return self.send_cookie(now, ends, &seg, cc);
        }
        let iss = self.isn(now, ends);
        let mut cx = Cx { cfg: &self.cfg, out: &mut self.out, stats: &mut self.stats, now: self.now };
        let conn = Conn::accept_syn(&mut cx, now, ends, iss, &seg, cc);
        self.note_timer(conn.poll_at());
        let id = self.socks.insert(Sock::Conn { conn: Box::new(conn), parent: Some(lid) });
        self.conns.insert(ends, id);
        if let Some(Sock::Listener(l)) = self.socks.get_mut(lid) {
            l.syn_pending += 1;
        }
    }

    /// An ICMP error about a flow of ours (RFC 1122 §4.2.3.9): protocol and port
    /// unreachable are hard errors that end a connection still in SYN-SENT; the
    /// rest are soft, explaining a later timeout.
    pub fn on_icmp(&mut self, local_port: u16, remote: Ipv4Address, remote_port: u16, icmp_type: u8, icmp_code: u8) {
        let ends = Endpoints { local_port, remote, remote_port };
        let Some(&id) = self.conns.get(&ends) else { return };
        let hard = icmp_type == 3 && matches!(icmp_code, 2 | 3);
        let error = if hard && icmp_code == 3 {
            TcpError::ConnectionRefused
        } else {
            TcpError::Unreachable { icmp_type, icmp_code }
        };
        if icmp_type == 3 && icmp_code == 4 {
            return; // fragmentation needed: segments go without DF, see docs/tcp.md
        }
        let _ = self.with_conn(id, |c, _| ((), c.on_icmp(error, hard)));
    }

    /// Runs the timers that are due.
    pub fn poll(&mut self, now: Instant) {
        self.tick(now);
        if self.next_timer.is_none_or(|t| t > now) {
            return;
        }
        self.next_timer = None;
        let due: Vec<SocketId> = self
            .socks
            .iter()
            .filter_map(|(id, s)| match s {
                Sock::Conn { conn, .. } if conn.poll_at().is_some_and(|t| t <= now) => Some(id),
                _ => None,
            })
            .collect();
        for id in due {
            let _ = self.with_conn(id, |c, cx| ((), c.poll(cx, now)));
        }
        // Everything not due keeps its (possibly later) deadline.
        let rest = self
            .socks
            .values()
            .filter_map(|s| match s {
                Sock::Conn { conn, .. } => conn.poll_at(),
                Sock::Listener(_) => None,
            })
            .min();
        self.note_timer(rest);
    }

    /// When [`TcpCore::poll`] next has work (possibly early: a poll then finds
    /// nothing due and says the real time).
    pub fn poll_at(&self) -> Option<Instant> {
        self.next_timer
    }
}
