//! The applications the CLI ships: each is a separate process that attaches to
//! the running stack through `capnet::net`, like any application.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capnet::net::{AsSocket, PingSocket, Stack, TcpListener, TcpStream, UdpSocket, READABLE, WRITABLE};
use std::io::{ErrorKind, Read, Write};

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

/// What a one-thread TCP server starts with: a stop flag that SIGINT and SIGTERM
/// set, the stack, and a non-blocking listener on `port`.
pub fn tcp_server(netns: &str, port: u16) -> Result<(Arc<AtomicBool>, Stack, TcpListener)> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let stack = Stack::attach(netns)?;
    let listener = TcpListener::bind(&stack, port).with_context(|| format!("listening on TCP port {port}"))?;
    listener.set_nonblocking(true)?;
    Ok((stop, stack, listener))
}

/// Every connection waiting on a non-blocking listener, each made non-blocking.
pub fn accept_pending(listener: &TcpListener) -> Result<Vec<TcpStream>> {
    let mut out = Vec::new();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(true)?;
                out.push(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(e.into()),
        }
    }
}

/// `capnet echo-serve --tcp`: every connection gets its bytes back, in one
/// thread with non-blocking sockets and `Stack::poll`.
pub fn echo_serve_tcp(netns: &str, port: u16) -> Result<()> {
    let (stop, stack, listener) = tcp_server(netns, port)?;
    println!("capnet echo-serve: echoing TCP on port {}", listener.local_port());
    let _ = std::io::stdout().flush();
    // (stream, bytes read but not yet echoed, the peer finished)
    let mut conns: Vec<(TcpStream, Vec<u8>, bool)> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut items: Vec<(&dyn AsSocket, u8)> = vec![(&listener, READABLE)];
        for (s, pending, _) in &conns {
            // Read only while the echo has room; write while something waits.
            let mut interest = if pending.len() < buf.len() { READABLE } else { 0 };
            if !pending.is_empty() {
                interest |= WRITABLE;
            }
            items.push((s, interest));
        }
        let events = stack.poll(&items, Some(Duration::from_millis(200)))?;
        drop(items);
        let mut gone = Vec::new();
        for (i, bits) in events {
            if i == 0 {
                conns.extend(accept_pending(&listener)?.into_iter().map(|s| (s, Vec::new(), false)));
                continue;
            }
            let (s, pending, eof) = &mut conns[i - 1];
            if bits & READABLE != 0 && pending.len() < buf.len() {
                let room = buf.len() - pending.len();
                match (&*s).read(&mut buf[..room]) {
                    Ok(0) => *eof = true,
                    Ok(n) => pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => gone.push(i - 1),
                }
            }
            if !pending.is_empty() {
                match (&*s).write(pending) {
                    Ok(n) => {
                        pending.drain(..n);
                        echoed += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => gone.push(i - 1),
                }
            }
            if *eof && pending.is_empty() {
                // Half-closed by the peer: everything echoed, so finish our side too.
                let _ = s.shutdown(std::net::Shutdown::Write);
                gone.push(i - 1);
            }
        }
        gone.sort_unstable();
        gone.dedup();
        for i in gone.into_iter().rev() {
            conns.remove(i);
        }
    }
    println!("capnet echo-serve: {echoed} bytes echoed");
    Ok(())
}

/// An error a UDP service rides out: an ICMP error for an earlier datagram, or
/// its transport being restarted or swapped.
fn transient(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::ConnectionReset)
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
            Ok((n, from)) => match sock.send_to(&buf[..n], from) {
                Ok(_) => echoed += 1,
                // A datagram that cannot go now (the peer refused an earlier
                // one, the udp domain is being restarted) is lost, as UDP may.
                Err(e) if transient(&e) && !stack.is_gone() => {}
                Err(e) => return Err(e.into()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut || (transient(&e) && !stack.is_gone()) => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!("capnet echo-serve: {echoed} datagrams echoed");
    Ok(())
}
