//! TCP bulk throughput, side by side in one run (never asserted: speed is
//! measured here, truth in the tests):
//!
//! - capnet's monolithic cores against each other over an in-memory wire (pure
//!   stack cost: no device, no system calls), beside smoltcp's own in-memory
//!   loopback benchmark;
//! - capnet over a TAP to the Linux kernel, both directions, monolithic and
//!   two-group, beside smoltcp's own TAP benchmark (its `examples/benchmark.rs`,
//!   built unmodified by `make smoltcp-examples`) and Linux to Linux over a veth
//!   pair. The Linux side is the same client everywhere: a std `TcpStream` moving
//!   the data in 1 MB calls, timed from connect to its last call, as smoltcp's is.
//!
//! The Linux sender uses the machine's default congestion control (BBR here,
//! which paces) and, in rows of their own, CUBIC (set on its socket): the ratio
//! to Linux over veth differs a lot between the two.
//!
//! Runs alternate so drift hits every configuration alike; each figure is the
//! median of the rounds. `cargo bench -p capnet --bench tcp [-- --quick]` (what
//! `make bench` runs) rewrites the tcp-bench section of docs/results.md. The
//! process also serves as the Linux-side peer, run again inside namespaces as
//! `tcp client|server …`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener as StdListener, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use capnet::net::{Stack, TcpListener};
use capnet_ip::{EthernetAddress, Ipv4Address, Ipv4Cidr};
use capnet_runtime::Cores;
use capnet_tcp::Received;
use capnet_testkit::bench::{median, write_section};
use capnet_testkit::{Netns, Up};

/// The capnet binary the TAP runs start: this build's, or `CAPNET_BIN` (to
/// hold a saved build against this one, run after run).
fn capnet_bin() -> String {
    std::env::var("CAPNET_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_capnet").into())
}

/// What a capnet TAP or veth run moves: twice smoltcp's fixed 1 GB, so that
/// slow start and the connection's setup weigh less at 15–60 Gbit/s.
const AMOUNT: usize = 2_000_000_000;
const CHUNK: usize = 1_000_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("client") => return client(&args[2..]),
        Some("server") => return server(&args[2..]),
        // For profiling the stack alone: `tcp memwire MTU BYTES`.
        Some("memwire") => {
            return println!("{:.2}", memwire(args[3].parse().expect("bytes"), args[2].parse().expect("mtu")))
        }
        // One capnet TAP run, for profiling: `tcp tap mono|two send|recv BYTES`.
        Some("tap") => {
            let bench = Bench::new();
            let up = if args[2] == "mono" { &bench.mono } else { &bench.two };
            let dir = if args[3] == "send" { Dir::CapnetSends } else { Dir::CapnetReceives };
            return println!("{:.2}", bench.capnet(up, dir, args[4].parse().expect("bytes"), args.get(5)));
        }
        // Linux to Linux over the veth pair, the figure the TAP runs are held to:
        // `tcp veth BYTES [CC]`.
        Some("veth") => return println!("{:.2}", Bench::new().veth(args[2].parse().expect("bytes"), args.get(3))),
        _ => {}
    }
    let quick = args.iter().any(|a| a == "--quick");
    let (rounds, amount) = if quick { (1, 100_000_000) } else { (5, AMOUNT) };
    let smol = smoltcp_examples();
    let bench = Bench::new();
    let cubic = String::from("cubic");
    let mut runs: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut add = |name: &'static str, v: Option<f64>| match runs.iter_mut().find(|r| r.0 == name) {
        Some(r) => r.1.extend(v),
        None => runs.push((name, v.into_iter().collect())),
    };
    for round in 0..rounds {
        eprintln!("round {}/{rounds}", round + 1);
        add("mem capnet", Some(memwire(amount / 4, 1500)));
        add("mem capnet 64k", Some(memwire(amount / 4, 65535)));
        add("mem smoltcp", smol.as_ref().and_then(smoltcp_loopback));
        add("tap mono send", Some(bench.capnet(&bench.mono, Dir::CapnetSends, amount, None)));
        add("tap mono recv", Some(bench.capnet(&bench.mono, Dir::CapnetReceives, amount, None)));
        add("tap mono recv cubic", Some(bench.capnet(&bench.mono, Dir::CapnetReceives, amount, Some(&cubic))));
        add("tap two send", Some(bench.capnet(&bench.two, Dir::CapnetSends, amount, None)));
        add("tap two recv", Some(bench.capnet(&bench.two, Dir::CapnetReceives, amount, None)));
        add("tap smoltcp send", smol.as_ref().and_then(|s| bench.smoltcp(s, Dir::CapnetSends)));
        add("tap smoltcp recv", smol.as_ref().and_then(|s| bench.smoltcp(s, Dir::CapnetReceives)));
        add("veth linux", Some(bench.veth(amount, None)));
        add("veth linux cubic", Some(bench.veth(amount, Some(&cubic))));
    }
    let fig = |name: &str| runs.iter().find(|r| r.0 == name).filter(|r| !r.1.is_empty()).map(|r| median(r.1.clone()));
    let ratio = |a: &str, b: &str| match (fig(a), fig(b)) {
        (Some((x, _)), Some((y, _))) => format!("{:.2}×", x / y),
        _ => "—".into(),
    };
    let rows: [(&str, &str, &str, String, String); 12] = [
        ("in memory, MTU 1500", "capnet mono → capnet mono", "mem capnet", "—".into(), "—".into()),
        (
            "in memory, MTU 65535",
            "capnet mono → capnet mono",
            "mem capnet 64k",
            ratio("mem capnet 64k", "mem smoltcp"),
            "—".into(),
        ),
        (
            "in memory, MTU 65535",
            "smoltcp → smoltcp (its loopback_benchmark)",
            "mem smoltcp",
            "1.00×".into(),
            "—".into(),
        ),
        (
            "TAP",
            "capnet mono → Linux",
            "tap mono send",
            ratio("tap mono send", "tap smoltcp send"),
            ratio("tap mono send", "veth linux"),
        ),
        (
            "TAP",
            "Linux → capnet mono",
            "tap mono recv",
            ratio("tap mono recv", "tap smoltcp recv"),
            ratio("tap mono recv", "veth linux"),
        ),
        (
            "TAP",
            "capnet factored → Linux",
            "tap two send",
            ratio("tap two send", "tap smoltcp send"),
            ratio("tap two send", "veth linux"),
        ),
        (
            "TAP",
            "Linux → capnet factored",
            "tap two recv",
            ratio("tap two recv", "tap smoltcp recv"),
            ratio("tap two recv", "veth linux"),
        ),
        (
            "TAP",
            "smoltcp → Linux (its benchmark, reader)",
            "tap smoltcp send",
            "1.00×".into(),
            ratio("tap smoltcp send", "veth linux"),
        ),
        (
            "TAP",
            "Linux → smoltcp (its benchmark, writer)",
            "tap smoltcp recv",
            "1.00×".into(),
            ratio("tap smoltcp recv", "veth linux"),
        ),
        ("veth", "Linux → Linux", "veth linux", "—".into(), "1.00×".into()),
        (
            "TAP",
            "Linux, CUBIC → capnet mono",
            "tap mono recv cubic",
            "—".into(),
            ratio("tap mono recv cubic", "veth linux cubic"),
        ),
        ("veth", "Linux, CUBIC → Linux", "veth linux cubic", "—".into(), "1.00× (CUBIC rows)".into()),
    ];
    let mut table = String::from(
        "| path | sender → receiver | Gbit/s (median) | spread | vs smoltcp, same path and direction | vs Linux over veth |\n|---|---|---|---|---|---|\n",
    );
    for (path, what, key, vs_smol, vs_linux) in rows {
        let (g, s) =
            fig(key).map_or(("not run".into(), "—".into()), |(g, s)| (format!("{g:.2}"), format!("{s:.0}%")));
        table += &format!("| {path} | {what} | {g} | {s} | {vs_smol} | {vs_linux} |\n");
    }
    table += &format!(
        "\n{rounds} rounds; {amount} bytes per capnet TAP and veth run, {} in memory (smoltcp's benchmarks move their own fixed 1 GB / 1 GiB). The Linux sender's congestion control: the machine's default ({}) except in the CUBIC rows, which are held to Linux → Linux with CUBIC.\n",
        amount / 4,
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control").unwrap_or_default().trim()
    );
    println!("\n{table}");
    if !quick {
        write_section(env!("CARGO_MANIFEST_DIR"), "tcp-bench", "make bench", &table);
    }
}

#[derive(Clone, Copy)]
enum Dir {
    CapnetSends,
    CapnetReceives,
}

impl Dir {
    /// The Linux-side client's mode, as smoltcp's benchmark names it.
    fn client_mode(self) -> &'static str {
        match self {
            Dir::CapnetSends => "reader",
            Dir::CapnetReceives => "writer",
        }
    }
}

/// The namespaces every round reuses (each removed when dropped).
struct Bench {
    mono: Up,
    two: Up,
    smol: Netns,
    veth: (Netns, Netns),
    exe: PathBuf,
}

impl Bench {
    fn new() -> Self {
        let mono = Up::new(&capnet_bin(), "bench-mono", &["--mono"]);
        let two = Up::new(&capnet_bin(), "bench-fact", &[]); // the default graph: five processes
                                                             // smoltcp's benchmark expects tap0 with the kernel at 192.168.69.100.
        let smol = Netns::new("bench-smol");
        smol.run_ok(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
        smol.run_ok(&["ip", "addr", "add", "192.168.69.100/24", "dev", "tap0"]);
        smol.run_ok(&["ip", "link", "set", "tap0", "up"]);
        let (a, b) = (Netns::new("bench-va"), Netns::new("bench-vb"));
        a.run_ok(&["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", b.name()]);
        for (ns, addr, dev) in [(&a, "10.99.0.1/24", "veth0"), (&b, "10.99.0.2/24", "veth1")] {
            ns.run_ok(&["ip", "addr", "add", addr, "dev", dev]);
            ns.run_ok(&["ip", "link", "set", dev, "up"]);
            ns.run_ok(&["ip", "link", "set", "lo", "up"]);
        }
        Self { mono, two, smol, veth: (a, b), exe: std::env::current_exe().expect("own path") }
    }

    /// The Linux-side client in namespace `ns`: Gbit/s as it timed itself, or
    /// `None` if it could not connect.
    fn client(&self, ns: &str, mode: &str, addr: &str, port: u16, amount: usize, cc: Option<&String>) -> Option<f64> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.exe)
            .args(["client", mode, addr, &port.to_string(), &amount.to_string()])
            .args(cc)
            .output()
            .expect("run the client");
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }

    /// capnet serves through `capnet::net` (an attached application, as users
    /// run it); the Linux kernel is the client (sending with `cc`, if given).
    fn capnet(&self, up: &Up, dir: Dir, amount: usize, cc: Option<&String>) -> f64 {
        let stack = Stack::attach(up.name()).expect("attach");
        let port = match dir {
            Dir::CapnetSends => 1234,
            Dir::CapnetReceives => 1235,
        };
        let listener = TcpListener::bind(&stack, port).expect("listen");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut buf = vec![0u8; CHUNK];
            match dir {
                Dir::CapnetSends => {
                    let mut left = amount;
                    while left > 0 {
                        let n = left.min(CHUNK);
                        (&s).write_all(&buf[..n]).expect("write");
                        left -= n;
                    }
                }
                Dir::CapnetReceives => while (&s).read(&mut buf).expect("read") > 0 {},
            }
            drop(s);
            drop(stack);
        });
        let g = self.client(up.name(), dir.client_mode(), "10.77.0.2", port, amount, cc).expect("the client ran");
        server.join().expect("server");
        g
    }

    /// smoltcp's own TAP benchmark: it runs its Linux-side client thread itself.
    fn smoltcp(&self, s: &Smoltcp, dir: Dir) -> Option<f64> {
        let mode = dir.client_mode();
        // Its own benchmark sometimes stalls for good (seen once in ~20 runs): a
        // run longer than a minute is given up and left out of the figures.
        let out = self.smol.run(&["timeout", "60", s.benchmark.to_str()?, "--tap", "tap0", mode]);
        let text = String::from_utf8_lossy(&out.stdout);
        let g = text.split("throughput: ").nth(1).and_then(|t| t.split_whitespace().next()?.parse().ok());
        if g.is_none() {
            eprintln!("smoltcp benchmark {mode}: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        g
    }

    /// Linux to Linux over the veth pair, with the same client (the server
    /// sends, with `cc` if given).
    fn veth(&self, amount: usize, cc: Option<&String>) -> f64 {
        let (a, b) = &self.veth;
        let mut server = Command::new("ip")
            .args(["netns", "exec", a.name()])
            .arg(&self.exe)
            .args(["server", "10.99.0.1:1234", &amount.to_string()])
            .args(cc)
            .spawn()
            .expect("server");
        // The server may not listen yet: the client retries.
        let g = (0..100).find_map(|_| {
            let g = self.client(b.name(), "reader", "10.99.0.1", 1234, amount, None);
            if g.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            g
        });
        let _ = server.wait();
        g.expect("the veth client ran")
    }
}

/// `client reader|writer ADDR PORT AMOUNT [CC]`: connects, moves AMOUNT bytes in
/// 1 MB calls and prints Gbit/s from connect to its last call (exit 2: no
/// connection). CC: the congestion control its socket sends with.
fn client(args: &[String]) {
    let (mode, addr, port, amount, cc) = match args {
        [m, a, p, n] => (m, a, p, n, None),
        [m, a, p, n, cc] => (m, a, p, n, Some(cc)),
        _ => panic!("client MODE ADDR PORT AMOUNT [CC]"),
    };
    let amount: usize = amount.parse().expect("amount");
    let Ok(mut s) = StdStream::connect((addr.as_str(), port.parse::<u16>().expect("port"))) else {
        std::process::exit(2);
    };
    congestion_control(&s, cc);
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut done = 0;
    while done < amount {
        let n = (amount - done).min(CHUNK);
        let r = if mode == "reader" { s.read(&mut buf[..n]) } else { s.write(&buf[..n]) };
        match r.expect("transfer") {
            0 => break,
            k => done += k,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = s.shutdown(Shutdown::Write);
    println!("{:.3}", done as f64 * 8.0 / secs / 1e9);
}

/// `server ADDR:PORT AMOUNT [CC]`: accepts one connection and writes AMOUNT
/// bytes (with congestion control CC).
fn server(args: &[String]) {
    let (addr, amount, cc) = match args {
        [a, n] => (a, n, None),
        [a, n, cc] => (a, n, Some(cc)),
        _ => panic!("server ADDR:PORT AMOUNT [CC]"),
    };
    let amount: usize = amount.parse().expect("amount");
    let l = StdListener::bind(addr.as_str()).expect("bind");
    let (mut s, _) = l.accept().expect("accept");
    congestion_control(&s, cc);
    let buf = vec![0u8; CHUNK];
    let mut left = amount;
    while left > 0 {
        let n = left.min(CHUNK);
        s.write_all(&buf[..n]).expect("write");
        left -= n;
    }
}

/// Sets the socket's congestion control (Linux's `TCP_CONGESTION`), if asked.
fn congestion_control(s: &StdStream, cc: Option<&String>) {
    if let Some(cc) = cc {
        rustix::net::sockopt::set_tcp_congestion(s, cc).expect("set the congestion control");
    }
}

/// Two capnet cores (ip + tcp, as the monolithic group links them) joined by an
/// in-memory wire with `mtu` in one thread: Gbit/s of a bulk transfer of
/// `amount` bytes.
fn memwire(amount: usize, mtu: usize) -> f64 {
    let core = |last: u8| {
        let mac = EthernetAddress([0x02, 0, 0, 0, 0, last]);
        let mut cfg = capnet_ip::Config::new(mac, Ipv4Cidr::new(Ipv4Address::new(10, 9, 0, last), 24));
        cfg.mtu = mtu;
        Cores::new(cfg, 1 << 20)
    };
    let (mut a, mut b) = (core(1), core(2));
    let l = b.tcp().listen(5001, 4).expect("listen");
    let now = a.now();
    let c = a.tcp().connect(now, Ipv4Address::new(10, 9, 0, 2), 5001).expect("connect");
    let chunk = vec![0u8; 256 * 1024];
    let (mut conn, mut got) = (None, 0usize);
    let mut wire: Vec<Vec<u8>> = Vec::new();
    let start = Instant::now();
    while got < amount {
        let now = a.now();
        if conn.is_some() {
            while a.tcp().send(now, c, &chunk[..]).unwrap_or(0) > 0 {}
        }
        a.pump(|f, _| wire.push(f.to_vec()));
        for f in wire.drain(..) {
            b.receive_frame(&capnet_ipc::lent::Chain::from(capnet_ipc::lent::Lent::from_vec(f)), false);
        }
        b.pump(|f, _| wire.push(f.to_vec()));
        for f in wire.drain(..) {
            a.receive_frame(&capnet_ipc::lent::Chain::from(capnet_ipc::lent::Lent::from_vec(f)), false);
        }
        if conn.is_none() {
            conn = b.tcp().accept(l).expect("accept");
        }
        if let Some(s) = conn {
            while let Ok(Received::Data(d)) = {
                let now = b.now();
                b.tcp().recv(now, s, 1 << 20)
            } {
                got += d.len();
            }
        }
    }
    got as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9
}

/// smoltcp's benchmark examples, built by `make smoltcp-examples`.
struct Smoltcp {
    benchmark: PathBuf,
    loopback: PathBuf,
}

fn smoltcp_examples() -> Option<Smoltcp> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/smoltcp/release/examples"));
    let s = Smoltcp { benchmark: dir.join("benchmark"), loopback: dir.join("loopback_benchmark") };
    if s.benchmark.exists() && s.loopback.exists() {
        Some(s)
    } else {
        eprintln!("smoltcp's examples are not built (make smoltcp-examples): its rows stay empty");
        None
    }
}

/// smoltcp's in-memory loopback benchmark (1 GiB).
fn smoltcp_loopback(s: &Smoltcp) -> Option<f64> {
    let out = Command::new(&s.loopback).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("bandwidth is ").nth(1)?.split_whitespace().next()?.parse().ok()
}
