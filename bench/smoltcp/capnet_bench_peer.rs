//! smoltcp serving `capnet bench`'s workloads over a TAP, so smoltcp — the Rust
//! user-level stack a user would otherwise pick — runs the same workloads as
//! capnet's compositions, against the same Linux client.
//!
//! Not part of the capnet workspace: `make smoltcp-examples` copies this file
//! into the smoltcp source cargo fetched and builds it there as an example, with
//! smoltcp's default features (so capnet's own smoltcp stays `wire`-only).
//!
//! `capnet_bench_peer --tap NAME serve WORK PORT BULK SECS`: the interface is
//! 10.77.0.2/24 on TAP NAME (which must exist, its kernel side configured). It
//! prints `ready` once it listens, serves one run of WORK (`bulk-send:N`,
//! `bulk-recv:N`, `rr:SIZE`, `connect`, `udp:SIZE`), and for UDP prints the
//! datagrams it received and over how many seconds.

use std::io::Write;
use std::os::unix::io::AsRawFd;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{wait as phy_wait, Medium, TunTapInterface};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr};

const BUF: usize = 256 * 1024;
/// Sockets listening for the connection-setup workload (a backlog).
const BACKLOG: usize = 8;

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(tcp::SocketBuffer::new(vec![0; BUF]), tcp::SocketBuffer::new(vec![0; BUF]))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (tap, rest) = match &args[1..] {
        [flag, tap, rest @ ..] if flag == "--tap" => (tap.clone(), rest.to_vec()),
        _ => panic!("usage: capnet_bench_peer --tap NAME serve WORK PORT BULK SECS"),
    };
    let [role, work, port, bulk, secs] = &rest[..] else { panic!("serve WORK PORT BULK SECS") };
    assert_eq!(role, "serve");
    let port: u16 = port.parse().expect("port");
    let bulk: usize = bulk.parse().expect("bulk");
    let secs: f64 = secs.parse().expect("seconds");
    let (kind, n) = work.split_once(':').unwrap_or((work.as_str(), "0"));
    let n: usize = n.parse().expect("workload size");

    let mut device = TunTapInterface::new(&tap, Medium::Ethernet).expect("open the TAP");
    let fd = device.as_raw_fd();
    let mut config = Config::new(EthernetAddress([0x02, 0xca, 0xfe, 0x00, 0x00, 0x02]).into());
    config.random_seed = std::process::id() as u64;
    let mut iface = Interface::new(config, &mut device, Instant::now());
    iface.update_ip_addrs(|a| a.push(IpCidr::new(IpAddress::v4(10, 77, 0, 2), 24)).expect("address"));
    let mut sockets = SocketSet::new(vec![]);

    let mut tcps: Vec<SocketHandle> = Vec::new();
    let mut udp_handle = None;
    match kind {
        "bulk-send" | "bulk-recv" => {
            for i in 0..n {
                let mut s = tcp_socket();
                s.listen(port + i as u16).expect("listen");
                tcps.push(sockets.add(s));
            }
        }
        "rr" => {
            let mut s = tcp_socket();
            s.listen(port).expect("listen");
            s.set_nagle_enabled(false);
            tcps.push(sockets.add(s));
        }
        "connect" => {
            for _ in 0..BACKLOG {
                let mut s = tcp_socket();
                s.listen(port).expect("listen");
                tcps.push(sockets.add(s));
            }
        }
        "udp" => {
            let meta = || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 4096], vec![0; 4096 * 1600]);
            let mut s = udp::Socket::new(meta(), meta());
            s.bind(port).expect("bind");
            udp_handle = Some(sockets.add(s));
        }
        other => panic!("no workload {other}"),
    }
    println!("ready");
    let _ = std::io::stdout().flush();

    let share = if n > 0 { bulk / n } else { 0 };
    let mut sent = vec![0usize; tcps.len()];
    let mut opened = vec![false; tcps.len()];
    let mut buf = vec![0u8; 65536];
    let (mut count, mut first, mut last) = (0u64, None::<std::time::Instant>, std::time::Instant::now());
    let mut quit = false;
    let started = std::time::Instant::now();
    loop {
        let now = Instant::now();
        iface.poll(now, &mut device, &mut sockets);
        match kind {
            "bulk-send" | "bulk-recv" | "rr" => {
                let mut all_done = true;
                for (i, h) in tcps.iter().enumerate() {
                    let s = sockets.get_mut::<tcp::Socket>(*h);
                    opened[i] |= s.is_active();
                    if kind == "bulk-send" {
                        while s.can_send() && sent[i] < share {
                            let k = s.send(|b| {
                                let k = b.len().min(share - sent[i]);
                                (k, k)
                            });
                            sent[i] += k.unwrap_or(0);
                        }
                        if sent[i] >= share && s.send_queue() == 0 && s.may_send() {
                            s.close();
                        }
                    } else {
                        while s.can_recv() {
                            let got = s.recv_slice(&mut buf).unwrap_or(0);
                            if kind == "rr" && got > 0 {
                                let _ = s.send_slice(&buf[..got]);
                            }
                        }
                        if opened[i] && !s.may_recv() && s.may_send() {
                            s.close();
                        }
                    }
                    all_done &= opened[i] && !s.is_active();
                }
                if all_done {
                    break;
                }
            }
            "connect" => {
                for h in &tcps {
                    let s = sockets.get_mut::<tcp::Socket>(*h);
                    if s.can_recv() {
                        let mut b = [0u8; 1];
                        if s.recv_slice(&mut b).unwrap_or(0) == 1 {
                            if b[0] == b'q' {
                                quit = true;
                            }
                            let _ = s.send_slice(&b);
                            s.close();
                        }
                    }
                    if !s.is_open() {
                        s.listen(port).expect("listen again");
                    }
                }
                if quit {
                    break;
                }
            }
            _ => {
                let s = sockets.get_mut::<udp::Socket>(udp_handle.expect("udp socket"));
                while s.recv_slice(&mut buf).is_ok() {
                    count += 1;
                    last = std::time::Instant::now();
                    first.get_or_insert(last);
                }
                let idle = first.map(|_| last.elapsed().as_secs_f64() > 0.3);
                let over = first.is_some_and(|f| f.elapsed().as_secs_f64() > secs + 0.5);
                if idle == Some(true) || over || (first.is_none() && started.elapsed().as_secs() > 10) {
                    break;
                }
            }
        }
        let wait = iface.poll_delay(now, &sockets).unwrap_or(Duration::from_millis(10));
        phy_wait(fd, Some(wait.min(Duration::from_millis(10)))).expect("wait");
    }
    // Let closing connections send their FINs.
    let end = std::time::Instant::now();
    while end.elapsed().as_millis() < 200 {
        iface.poll(Instant::now(), &mut device, &mut sockets);
        phy_wait(fd, Some(Duration::from_millis(5))).expect("wait");
    }
    if let Some(f) = first {
        println!("{count} {}", (last - f).as_secs_f64());
    }
}
