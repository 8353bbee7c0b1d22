//! `capnet status`: the one JSON shape scripts and tests rely on (DESIGN,
//! "Supervisor and CLI"), and a table for people.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::{bail, Result};

use capnet_supervisor::control::{ask, Reply, Request};

use capnet_proto::report::Status;

/// Prints the status of the stack in `netns`; `sockets` adds the TCP
/// connections (the JSON always holds them).
pub fn show(netns: &str, json: bool, sockets: bool) -> Result<()> {
    let text = match ask(netns, &Request::Status)? {
        Reply::Status(s) => s,
        Reply::Refused(why) => bail!("status refused: {why}"),
        Reply::Ok => bail!("the supervisor answered without a status"),
    };
    if json {
        return print(&format!("{text}\n"));
    }
    let s: Status = serde_json::from_str(&text)?;
    let mut out = String::new();
    // On an in-memory wire the other side is another capnet instance, not the kernel.
    let other = if s.tap == capnet_proto::group::WIRE { "peer" } else { "kernel" };
    writeln!(out, "mode {}  netns {}  tap {}  {other} {}  stack {}", s.mode, s.netns, s.tap, s.host_addr, s.addr)?;
    for r in &s.routes {
        writeln!(out, "route {} {}", r.dest, r.via.as_deref().map_or("connected".to_owned(), |v| format!("via {v}")))?;
    }
    for d in &s.domains {
        writeln!(
            out,
            "{:<8} pid {:<7} {:<8} restarts {}  up {:.0}s  cpu {:.2}s  rss {} KiB{}",
            d.name,
            d.pid,
            d.state,
            d.restarts,
            d.uptime_s,
            d.cpu_s,
            d.rss_bytes / 1024,
            d.last_error.as_deref().map(|e| format!("  last error: {e}")).unwrap_or_default()
        )?;
        let nonzero: Vec<String> =
            d.counters.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k}={v}")).collect();
        if !nonzero.is_empty() {
            writeln!(out, "         {}", nonzero.join(" "))?;
        }
    }
    if sockets {
        print_sockets(&s, &mut out)?;
    }
    print(&out)
}

/// Writes `text` to standard output; a reader that went away (`capnet status |
/// head`) is no error.
fn print(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// The TCP table: one line per connection, like `ss -tin`.
fn print_sockets(s: &Status, out: &mut String) -> std::fmt::Result {
    let ports: Vec<String> = s.tcp_listening.iter().map(u16::to_string).collect();
    writeln!(out, "tcp listening: {}", if ports.is_empty() { "none".into() } else { ports.join(" ") })?;
    if s.tcp_connections_total > s.tcp_connections.len() {
        writeln!(
            out,
            "tcp connections: {} ({} listed; each tcp domain lists at most {})",
            s.tcp_connections_total,
            s.tcp_connections.len(),
            capnet_proto::report::MAX_LISTED
        )?;
    }
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
        writeln!(
            out,
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
        )?;
        opts.push(format!("tcp-pid:{}", c.pid));
        writeln!(out, "             {}", opts.join(" "))?;
    }
    Ok(())
}
