//! `capnet status`: the one JSON shape scripts and tests rely on (DESIGN,
//! "Supervisor and CLI"), and a table for people.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::control::{ask, Reply, Request};

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
    /// The tcp domain's connections.
    #[serde(default)]
    pub tcp_connections: Vec<TcpConnection>,
    /// The ports the tcp domain listens on.
    #[serde(default)]
    pub tcp_listening: Vec<u16>,
}

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
}

impl From<capnet_tcp::ConnInfo> for TcpConnection {
    fn from(i: capnet_tcp::ConnInfo) -> Self {
        Self {
            state: i.state.into(),
            local_port: i.local_port,
            remote: format!("{}:{}", i.remote, i.remote_port),
            cc: i.congestion_control.into(),
            cwnd: i.cwnd,
            ssthresh: (i.ssthresh != usize::MAX).then_some(i.ssthresh),
            srtt_us: i.srtt_us,
            rttvar_us: i.rttvar_us,
            rto_us: i.rto_us,
            retransmits: i.retransmits,
            mss: i.mss,
            wscale: (i.snd_wscale, i.rcv_wscale),
            sack: i.sack,
            timestamps: i.timestamps,
            sack_blocks_in: i.sack_blocks_in,
            sacked_ranges: i.sacked_ranges,
            recovery: i.recovery,
            snd_wnd: i.snd_wnd,
            snd_queued: i.snd_queued,
            rcv_queued: i.rcv_queued,
            nodelay: i.nodelay,
            delayed_ack: i.delayed_ack,
        }
    }
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

/// Prints the status of the stack in `netns`; `sockets` adds the TCP
/// connections (the JSON always holds them).
pub fn show(netns: &str, json: bool, sockets: bool) -> Result<()> {
    let text = match ask(netns, &Request::Status)? {
        Reply::Status(s) => s,
        Reply::Refused(why) => bail!("status refused: {why}"),
        Reply::Ok => bail!("the supervisor answered without a status"),
    };
    if json {
        println!("{text}");
        return Ok(());
    }
    let s: Status = serde_json::from_str(&text)?;
    println!("mode {}  netns {}  tap {}  kernel {}  stack {}", s.mode, s.netns, s.tap, s.host_addr, s.addr);
    for r in &s.routes {
        println!("route {} {}", r.dest, r.via.as_deref().map_or("connected".to_owned(), |v| format!("via {v}")));
    }
    for d in &s.domains {
        println!(
            "{:<8} pid {:<7} {:<8} restarts {}  up {:.0}s  cpu {:.2}s  rss {} KiB{}",
            d.name,
            d.pid,
            d.state,
            d.restarts,
            d.uptime_s,
            d.cpu_s,
            d.rss_bytes / 1024,
            d.last_error.as_deref().map(|e| format!("  last error: {e}")).unwrap_or_default()
        );
        let nonzero: Vec<String> =
            d.counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
        if !nonzero.is_empty() {
            println!("         {}", nonzero.join(" "));
        }
    }
    if sockets {
        print_sockets(&s);
    }
    Ok(())
}

/// The TCP table: one line per connection, like `ss -tin`.
fn print_sockets(s: &Status) {
    let ports: Vec<String> = s.tcp_listening.iter().map(u16::to_string).collect();
    println!("tcp listening: {}", if ports.is_empty() { "none".into() } else { ports.join(" ") });
    let ms = |us: u64| format!("{:.1}", us as f64 / 1000.0);
    for c in &s.tcp_connections {
        let mut opts = Vec::new();
        if c.sack {
            opts.push("sack".to_owned());
        }
        if c.timestamps {
            opts.push("ts".to_owned());
        }
        opts.push(format!("wscale:{},{}", c.wscale.0, c.wscale.1));
        println!(
            "{:<12} :{:<5} {:<21} {} cwnd:{} ssthresh:{} rtt:{}/{} rto:{} mss:{} retrans:{} sack_blocks:{} sacked:{}{} send-q:{} recv-q:{}",
            c.state,
            c.local_port,
            c.remote,
            c.cc,
            c.cwnd,
            c.ssthresh.map_or("-".into(), |t| t.to_string()),
            c.srtt_us.map_or("-".into(), ms),
            ms(c.rttvar_us),
            ms(c.rto_us),
            c.mss,
            c.retransmits,
            c.sack_blocks_in,
            c.sacked_ranges,
            if c.recovery { " recovery" } else { "" },
            c.snd_queued,
            c.rcv_queued,
        );
        println!("             {}", opts.join(" "));
    }
}
