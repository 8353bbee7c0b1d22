//! The status report: the one JSON shape `capnet status --json` prints and scripts
//! rely on (DESIGN, "Supervisor and CLI"), and the pieces each group publishes
//! for the supervisor to gather.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The whole status object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// "mono" or "two-group" ("factored" arrives with the per-domain processes).
    pub mode: String,
    /// The namespace holding the TAP and the kernel peer.
    pub netns: String,
    /// The TAP's name.
    pub tap: String,
    /// The kernel's address on the TAP.
    pub host_addr: String,
    /// The stack's address.
    pub addr: String,
    /// Every domain.
    pub domains: Vec<Domain>,
    /// The ip domain's routing table, as it publishes it read-only.
    #[serde(default)]
    pub routes: Vec<RouteEntry>,
    /// The tcp domain's connections (at most [`MAX_LISTED`] of each tcp domain's).
    #[serde(default)]
    pub tcp_connections: Vec<TcpConnection>,
    /// How many connections there are, listed or not.
    #[serde(default)]
    pub tcp_connections_total: usize,
    /// The ports the tcp domain listens on.
    #[serde(default)]
    pub tcp_listening: Vec<u16>,
}

/// Connections a tcp domain lists in its report: the status must fit one
/// control message (a thousand connections in TIME-WAIT would not), and is
/// rewritten every 200 ms.
pub const MAX_LISTED: usize = 128;

/// One TCP connection, as the tcp domain reports it (`capnet status --sockets`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TcpConnection {
    /// RFC 9293 state name.
    pub state: String,
    /// Our port.
    pub local_port: u16,
    /// The peer, ADDRESS:PORT.
    pub remote: String,
    /// Congestion control algorithm.
    pub cc: String,
    /// Congestion window, bytes.
    pub cwnd: usize,
    /// Slow-start threshold, bytes (`None`: not yet set by a loss).
    pub ssthresh: Option<usize>,
    /// Smoothed RTT, µs (`None`: no sample yet).
    pub srtt_us: Option<u64>,
    /// RTT variation, µs.
    pub rttvar_us: u64,
    /// Retransmission timeout, µs.
    pub rto_us: u64,
    /// Segments retransmitted.
    pub retransmits: u64,
    /// Payload of a full segment.
    pub mss: usize,
    /// Window scales: the peer's, ours.
    pub wscale: (u8, u8),
    /// SACK agreed.
    pub sack: bool,
    /// Timestamps agreed.
    pub timestamps: bool,
    /// SACK blocks received.
    pub sack_blocks_in: u64,
    /// Ranges the peer has SACKed above the cumulative ACK now.
    pub sacked_ranges: usize,
    /// In fast recovery.
    pub recovery: bool,
    /// The peer's window, bytes.
    pub snd_wnd: usize,
    /// Bytes queued to send, unacknowledged included.
    pub snd_queued: usize,
    /// Bytes received, not yet read.
    pub rcv_queued: usize,
    /// Nagle off.
    pub nodelay: bool,
    /// Delayed acknowledgments on.
    pub delayed_ack: bool,
    /// The process of the tcp domain that holds it (during a swap there are
    /// two); filled in by the supervisor.
    #[serde(default)]
    pub pid: i32,
}

/// One published route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RouteEntry {
    /// Destination, as ADDRESS/PREFIX.
    pub dest: String,
    /// Gateway; `None` when directly connected.
    pub via: Option<String>,
}

/// One domain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Domain {
    /// driver, ip, udp, …
    pub name: String,
    /// Its process.
    pub pid: i32,
    /// "running".
    pub state: String,
    /// Restarts since `up`.
    pub restarts: u32,
    /// Seconds since it started.
    pub uptime_s: f64,
    /// CPU seconds of its process.
    pub cpu_s: f64,
    /// Resident memory of its process.
    pub rss_bytes: u64,
    /// Its counters, by name.
    pub counters: BTreeMap<String, u64>,
    /// The last error it reported, if any.
    pub last_error: Option<String>,
}

/// What one group publishes in its status region (JSON, read by the supervisor
/// through a read-only mapping): the counters of each domain it runs, and the
/// tcp domain's connections if it runs that.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GroupReport {
    /// (domain name, counters).
    pub domains: Vec<(String, BTreeMap<String, u64>)>,
    /// The tcp domain's connections, if it runs here (at most [`MAX_LISTED`]).
    pub tcp_connections: Vec<TcpConnection>,
    /// How many it has.
    pub tcp_connections_total: usize,
    /// The ports it listens on.
    pub tcp_listening: Vec<u16>,
    /// The ip domain's routes, if it runs here.
    pub routes: Vec<RouteEntry>,
}
