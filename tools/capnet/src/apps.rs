//! The applications the CLI ships: each is a separate process that attaches to
//! the running stack through `capnet::net`, like any application.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capnet::net::{PingSocket, Stack, UdpSocket};

/// `capnet ping ADDR`.
pub fn ping(netns: &str, addr: Ipv4Addr, count: u16, interval: f64, size: usize) -> Result<()> {
    if !(0.001..=60.0).contains(&interval) {
        bail!("-i {interval}: the interval must be between 0.001 and 60 seconds");
    }
    if size > 65507 - 8 {
        bail!("-s {size}: at most 65499 bytes of payload");
    }
    let stack = Stack::attach(netns)?;
    let sock = PingSocket::open(&stack).context("opening an echo socket")?;
    let data: Vec<u8> = (0..size).map(|i| (i % 256) as u8).collect();
    println!("PING {addr}: {size} data bytes (from capnet, identifier {})", sock.ident());
    let mut received = 0u16;
    for seq in 1..=count {
        let sent = Instant::now();
        sock.send(addr, seq, &data)?;
        let wait = Duration::from_secs(1).max(Duration::from_secs_f64(interval));
        match sock.recv(wait) {
            Ok((from, rseq, rdata)) if rseq == seq && rdata == data => {
                received += 1;
                println!(
                    "{} bytes from {from}: seq={seq} time={:.3} ms",
                    rdata.len() + 8,
                    sent.elapsed().as_secs_f64() * 1e3
                );
            }
            Ok((from, rseq, _)) => println!("unexpected reply from {from}: seq={rseq}"),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => println!("no reply for seq={seq}"),
            Err(e) => return Err(e.into()),
        }
        if seq < count {
            std::thread::sleep(Duration::from_secs_f64(interval).saturating_sub(sent.elapsed()));
        }
    }
    let loss = 100.0 * f64::from(count - received) / f64::from(count.max(1));
    println!(
        "--- {addr} ping statistics ---\n{count} packets transmitted, {received} received, {loss:.0}% packet loss"
    );
    if received == 0 {
        bail!("no replies from {addr}");
    }
    Ok(())
}

/// `capnet echo-serve --udp`.
pub fn echo_serve(netns: &str, port: u16) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let stack = Stack::attach(netns)?;
    let mut sock = UdpSocket::bind(&stack, port).with_context(|| format!("binding UDP port {port}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    println!("capnet echo-serve: echoing UDP on port {}", sock.local_port());
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                sock.send_to(&buf[..n], from)?;
                echoed += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!("capnet echo-serve: {echoed} datagrams echoed");
    Ok(())
}
