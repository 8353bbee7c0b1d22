//! `capnet capture`: the driver's frames as a pcap file, readable by tcpdump.
//!
//! The supervisor hands the group running the driver one end of a
//! `SOCK_SEQPACKET` pair and this command the other; each message is 8 bytes
//! of time (µs since the epoch) and one frame, in and out of the device. This
//! side writes them with the driver core's pcap writer.

use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capnet_driver::capture::Capture;
use capnet_kernel_shim::cap::{recv_caps, CapKind};

use capnet_supervisor::control::{ask_keep, Reply, Request};

/// Keeps whole frames: a TSO super-frame is up to 64 KiB of IP plus Ethernet.
const SNAPLEN: u32 = 65_536 + 14;

/// Captures until `count` frames, `seconds`, Ctrl-C, or the stack going down.
pub fn capture(netns: &str, file: Option<&Path>, count: Option<u64>, seconds: Option<f64>) -> Result<()> {
    let out: Box<dyn Write> = match file {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?,
        )),
        None if std::io::stdout().is_terminal() => {
            bail!("pcap is binary: write it with -w FILE, or pipe it, e.g. `capnet capture | tcpdump -r -`")
        }
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let (reply, conn) = ask_keep(netns, &Request::Capture)?;
    match reply {
        Reply::Ok => {}
        Reply::Refused(why) => bail!("the supervisor refused: {why}"),
        other => bail!("unexpected answer {other:?}"),
    }
    let mut caps = recv_caps(conn.as_fd()).context("the supervisor sent no capture socket")?;
    let sock = match (caps.pop(), caps.is_empty()) {
        (Some(c), true) if c.kind == CapKind::Socket => std::os::unix::net::UnixDatagram::from(c.into_fd()),
        _ => bail!("the supervisor sent something other than a capture socket"),
    };
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    eprintln!("capnet capture: the driver's frames in namespace {netns}; Ctrl-C stops");
    let mut pcap = Capture::new(out, SNAPLEN)?;
    let started = Instant::now();
    let mut buf = vec![0u8; 8 + SNAPLEN as usize + 4096];
    while !stop.load(Ordering::Relaxed)
        && count.is_none_or(|c| pcap.frames() < c)
        && seconds.is_none_or(|s| started.elapsed().as_secs_f64() < s)
    {
        match sock.recv(&mut buf) {
            Ok(0) => break, // the stack went down
            Ok(n) if n > 8 => {
                let micros = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
                pcap.frame(Duration::from_micros(micros), &buf[8..n])?;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let frames = pcap.frames();
    pcap.into_inner().flush()?;
    eprintln!("capnet capture: {frames} frames");
    Ok(())
}
