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

/// Prints the status of the stack in `netns`.
pub fn show(netns: &str, json: bool) -> Result<()> {
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
    Ok(())
}
