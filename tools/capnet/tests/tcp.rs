//! TCP against the Linux kernel, on every composition: curl and Python's
//! http.server as peers of `capnet http-serve` and `capnet http-get`, 200
//! concurrent fetches, half-close with socat, refused and aborted connections,
//! keep-alive against a peer an nftables rule silences, the options Linux sees
//! (`ss -tin`), 5 MB each way through the driver's seeded loss and reordering,
//! RFC 5961 checked from a raw socket, `capnet status --sockets`, and `capnet
//! capture` read back by tcpdump.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::time::Duration;

use capnet::net::{Stack, TcpListener, TcpStream};
use capnet_testkit::{Scratch, Up};

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");
const KERNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// The compositions every test runs on.
const MODES: [&[&str]; 2] = [&[], &["--mono"]];

/// Waits until `up`'s namespace has a TCP listener on `port` (Linux side) —
/// or gives up after 10 s and lets the test fail on its own terms.
fn linux_listening(up: &Up, port: u16) {
    for _ in 0..100 {
        let out = up.in_ns(&["ss", "-Htln", &format!("sport = :{port}")]);
        if !out.stdout.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until a capnet listener on `port` accepts (a curl probe).
fn capnet_listening(up: &Up, port: u16) {
    for _ in 0..100 {
        let url = format!("http://10.77.0.2:{port}/");
        let out = up.in_ns(&["curl", "-s", "-o", "/dev/null", "--max-time", "2", &url]);
        if out.status.code() != Some(7) {
            return; // anything but "could not connect"
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A Linux server on `port` that accepts one connection and then does nothing,
/// and our connection to it.
fn connect_to_sleeper(up: &Up, stack: &Stack, port: u16) -> (capnet_testkit::Killed, TcpStream) {
    let py = format!(
        "import socket,time\ns=socket.socket()\ns.bind(('10.77.0.1',{port}))\ns.listen()\nc,_=s.accept()\ntime.sleep(600)\n"
    );
    let sleeper = up.spawn_in_ns(&["python3", "-c", &py]);
    linux_listening(up, port);
    let s = TcpStream::connect(stack, SocketAddrV4::new(KERNEL, port)).expect("connect");
    (sleeper, s)
}

/// A stack with `capnet http-serve` on port 80 serving a scratch directory that
/// holds `name`: `len` seeded bytes. Fields drop in order: server, files, stack.
struct Served {
    _server: capnet_testkit::Killed,
    dir: Scratch,
    data: Vec<u8>,
    up: Up,
}

impl Served {
    /// capnet `http-get` fetches `name` from Python's http.server on the Linux
    /// side (serving the same directory): it succeeds and its copy is
    /// byte-exact. `what` names the case in a failure.
    fn fetch_from_linux(&self, name: &str, what: &str) {
        let dir = self.dir.path("");
        let _py = self.up.spawn_in_ns(&["python3", "-m", "http.server", "8000", "--bind", "10.77.0.1", "-d", &dir]);
        linux_listening(&self.up, 8000);
        let got = self.dir.path("get-got");
        let out = self.up.capnet(&["http-get", &format!("http://10.77.0.1:8000/{name}"), "-o", &got]);
        assert!(out.status.success(), "{what}: http-get: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&got).expect("http-get output") == self.data, "{what}: http-get's copy differs");
    }
}

fn serving(tag: &str, mode: &[&str], name: &str, len: usize) -> Served {
    let up = Up::new(CAPNET, tag, mode);
    let dir = Scratch::new(tag);
    let data = dir.file(name, len);
    let server = up.spawn_capnet(&["http-serve", &dir.path(""), "--port", "80"]);
    capnet_listening(&up, 80);
    Served { _server: server, dir, data, up }
}

#[test]
fn fifty_megabytes_each_way_with_curl_and_python_byte_exact() {
    for mode in MODES {
        let served = serving("tcp-bulk", mode, "big", 50 << 20);
        let Served { up, dir, data, .. } = &served;
        // curl on the Linux side fetches from capnet.
        let got = dir.path("curl-got");
        let out = up.in_ns(&["curl", "-sS", "--max-time", "120", "-o", &got, "http://10.77.0.2/big"]);
        assert!(out.status.success(), "{mode:?}: curl: {}", String::from_utf8_lossy(&out.stderr));
        assert!(std::fs::read(&got).expect("curl output") == *data, "{mode:?}: curl's copy differs");
        // The stack hands the TAP segments of many MSS (TSO), the kernel cuts
        // them: far fewer segments than MSS-sized ones would take.
        let segments = up.counter("tcp", "data_segments_out") as usize;
        assert!(segments * 1448 * 4 < data.len(), "{mode:?}: {segments} data segments for {} bytes", data.len());
        // capnet http-get fetches from Python's http.server on the Linux side.
        served.fetch_from_linux("big", &format!("{mode:?}"));
        // Receiving, a one-group stack takes the kernel's partial TCP checksums on
        // its word (checksum offload) — and the copy is still byte-exact; a driver
        // whose frames go on to another process completes every one.
        std::thread::sleep(Duration::from_millis(500)); // status is refreshed every 200 ms
        let vouched = up.counter("driver", "checksums_vouched");
        match mode.contains(&"--mono") {
            true => assert!(vouched > 100, "{mode:?}: {vouched} checksums vouched for"),
            false => assert_eq!(vouched, 0, "{mode:?}"),
        }
    }
}

#[test]
fn two_hundred_concurrent_curls_each_get_a_byte_exact_megabyte() {
    for mode in MODES {
        let Served { up, dir, data, .. } = &serving("tcp-many", mode, "one", 1 << 20);
        let script = format!(
            "for i in $(seq 1 200); do curl -sS --max-time 120 -o {}/got-$i http://10.77.0.2/one & done; wait",
            dir.path("")
        );
        let out = up.in_ns(&["bash", "-c", &script]);
        assert!(out.stderr.is_empty(), "{mode:?}: curl said: {}", String::from_utf8_lossy(&out.stderr));
        for i in 1..=200 {
            let got = std::fs::read(dir.path(&format!("got-{i}"))).unwrap_or_default();
            assert!(got == *data, "{mode:?}: fetch {i} got {} bytes, not the file", got.len());
        }
        // HEAD and a missing file, for good measure.
        let out = up.in_ns(&["curl", "-sSI", "--max-time", "10", "http://10.77.0.2/one"]);
        let head = String::from_utf8_lossy(&out.stdout);
        assert!(head.contains("200 OK") && head.contains("Content-Length: 1048576"), "{head}");
        let out = up.in_ns(&["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "http://10.77.0.2/nope"]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
        // Status still fits one message with that many connections about (the
        // server's in TIME-WAIT): the tcp domain lists some and counts them all.
        let out = up.capnet(&["status", "--json"]);
        assert!(out.status.success(), "{mode:?}: status: {}", String::from_utf8_lossy(&out.stderr));
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        let listed = st["tcp_connections"].as_array().map_or(0, Vec::len);
        assert!(listed <= capnet_proto::report::MAX_LISTED, "{mode:?}: {listed} listed");
        assert!(
            st["tcp_connections_total"].as_u64() >= Some(listed as u64),
            "{mode:?}: {}",
            st["tcp_connections_total"]
        );
    }
}

#[test]
fn half_close_works_both_ways_against_socat() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-half", mode);
        let stack = Stack::attach(up.name()).expect("attach");
        // capnet → Linux: socat runs `cat`, which answers only after our FIN.
        let _cat = up.spawn_in_ns(&["socat", "TCP4-LISTEN:7000,bind=10.77.0.1,reuseaddr", "SYSTEM:'cat; echo done'"]);
        linux_listening(&up, 7000);
        let mut s = TcpStream::connect(&stack, SocketAddrV4::new(KERNEL, 7000)).expect("connect");
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        s.write_all(&payload).expect("write");
        s.shutdown(Shutdown::Write).expect("half-close");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut back = Vec::new();
        s.read_to_end(&mut back).expect("read to EOF after our half-close");
        let mut want = payload.clone();
        want.extend_from_slice(b"done\n");
        assert!(back == want, "{mode:?}: got {} bytes back", back.len());
        // Linux → capnet: socat sends, half-closes, and reads the echo to its end.
        let _echo = up.spawn_capnet(&["echo-serve", "--tcp", "--port", "7"]);
        capnet_listening(&up, 7);
        let script = "head -c 200000 /dev/zero | tr '\\0' 'x' | socat -t 10 - TCP4:10.77.0.2:7 | wc -c";
        let out = up.in_ns(&["bash", "-c", script]);
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200000", "{mode:?}: echo after socat's half-close");
    }
}

#[test]
fn a_closed_port_refuses_and_aborts_reach_the_other_side() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-rst", mode);
        let stack = Stack::attach(up.name()).expect("attach");
        let err = TcpStream::connect(&stack, SocketAddrV4::new(KERNEL, 9)).expect_err("nobody on port 9");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{mode:?}: {err}");

        // We abort mid-transfer: the Linux reader sees a reset.
        let py = "import socket\ns=socket.socket()\ns.setsockopt(1,2,1)\ns.bind(('10.77.0.1',7001))\ns.listen()\n\
                  c,_=s.accept()\nn=0\ntry:\n  while True:\n    d=c.recv(65536)\n    if not d: print('eof',n); break\n    n+=len(d)\nexcept Exception as e: print(type(e).__name__,n)\n";
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", up.name(), "python3", "-c", py])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python");
        linux_listening(&up, 7001);
        let s = TcpStream::connect(&stack, SocketAddrV4::new(KERNEL, 7001)).expect("connect");
        (&s).write_all(&vec![7u8; 1 << 20]).expect("write");
        s.abort().expect("abort");
        let out = child.wait_with_output().expect("python ends");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.starts_with("ConnectionResetError"), "{mode:?}: the Linux side saw {said:?}");

        // Linux aborts (SO_LINGER 0) mid-transfer: our writer and reader see a reset.
        let listener = TcpListener::bind(&stack, 7002).expect("listen");
        let py = "import socket,struct,time\nc=socket.create_connection(('10.77.0.2',7002))\nc.recv(1000)\n\
                  c.setsockopt(1,13,struct.pack('ii',1,0))\nc.close()\n";
        let _client = up.spawn_in_ns(&["python3", "-c", py]);
        let (conn, _) = listener.accept().expect("accept");
        let chunk = vec![1u8; 64 * 1024];
        let err = loop {
            if let Err(e) = (&conn).write(&chunk) {
                break e;
            }
        };
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{mode:?}: write after the peer's abort: {err}");
        let mut buf = [0u8; 16];
        assert_eq!((&conn).read(&mut buf).expect_err("reset").kind(), ErrorKind::ConnectionReset);
    }
}

#[test]
fn keepalive_finds_a_peer_silenced_by_nftables() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-keep", mode);
        let stack = Stack::attach(up.name()).expect("attach");
        let (_sleeper, s) = connect_to_sleeper(&up, &stack, 7003);
        s.set_keepalive_params(Some((Duration::from_secs(1), Duration::from_secs(1), 3))).expect("keepalive");
        // Answered probes keep an idle connection alive.
        std::thread::sleep(Duration::from_millis(3500));
        let probes = up.counter("tcp", "keepalive_probes");
        assert!(
            probes >= 2,
            "{mode:?}: {probes} probes: {}",
            String::from_utf8_lossy(&up.capnet(&["status", "--json"]).stdout)
        );
        assert_eq!(up.counter("tcp", "keepalive_timeouts"), 0);
        // An ICMP port unreachable (not a reset) refuses a connection too.
        let rules = "nft add table inet capt && \
                     nft add chain inet capt in '{ type filter hook input priority 0; }' && \
                     nft add rule inet capt in tcp dport 7005 reject";
        let out = up.in_ns(&["bash", "-c", rules]);
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
        let err = TcpStream::connect(&stack, SocketAddrV4::new(KERNEL, 7005)).expect_err("rejected");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{mode:?}: {err}");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(up.counter("tcp", "resets_in"), 0, "{mode:?}: refused by ICMP, not by a reset");
        // Silence the peer: the kernel drops everything from the stack.
        let out = up.in_ns(&["nft", "add", "rule", "inet", "capt", "in", "ip", "saddr", "10.77.0.2", "drop"]);
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
        // A connect into silence gives up at its timeout.
        let err = TcpStream::connect_timeout(&stack, SocketAddrV4::new(KERNEL, 7003), Duration::from_millis(500))
            .expect_err("silence");
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{mode:?}: {err}");
        s.set_read_timeout(Some(Duration::from_secs(60))).expect("hang guard");
        let mut buf = [0u8; 16];
        let err = (&s).read(&mut buf).expect_err("the peer is gone");
        assert_eq!(err.kind(), ErrorKind::TimedOut, "{mode:?}: {err}");
        std::thread::sleep(Duration::from_millis(500)); // status is refreshed every 200 ms
        assert_eq!(up.counter("tcp", "keepalive_timeouts"), 1, "{mode:?}: the keep-alive declared it dead");
        assert_eq!((&s).write(b"x").expect_err("closed").kind(), ErrorKind::TimedOut);
    }
}

#[test]
fn linux_agrees_to_our_mss_window_scale_sack_and_timestamps() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-ss", mode);
        let stack = Stack::attach(up.name()).expect("attach");
        // The handshake as the Linux side's tcpdump sees it: our SYN and its SYN-ACK.
        let dump = std::process::Command::new("ip")
            .args(["netns", "exec", up.name(), "timeout", "10", "tcpdump", "-nvl", "-i", "capt9", "-c", "2"])
            .args(["tcp[tcpflags] & tcp-syn != 0"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(500));
        let (_sleeper, s) = connect_to_sleeper(&up, &stack, 7004);
        let dump = dump.wait_with_output().expect("tcpdump output");
        let handshake = String::from_utf8_lossy(&dump.stdout);
        let syn_ack = handshake.lines().find(|l| l.contains("Flags [S.]")).unwrap_or_default();
        for option in ["sackOK", "TS val", "wscale"] {
            assert!(syn_ack.contains(option), "{mode:?}: Linux's SYN-ACK lacks {option}: {handshake}");
        }
        (&s).write_all(&[0u8; 10_000]).expect("some data so Linux measures");
        std::thread::sleep(Duration::from_millis(200));
        let out = up.in_ns(&["ss", "-tin", "dst", "10.77.0.2"]);
        let text = String::from_utf8_lossy(&out.stdout);
        // `wscale:S,R`: S is what we offered (2 MiB receive buffer → 6).
        assert!(text.contains("wscale:6,"), "{mode:?}: {text}");
        // We offered MSS 1460 (MTU 1500); Linux sends 1448 of it: 12 bytes of every
        // segment carry the timestamps both sides agreed on.
        assert!(text.contains(" mss:1448"), "{mode:?}: {text}");
        // This kernel's TCP_INFO leaves the SACK and timestamp bits out (even
        // between two Linux sockets), so `ss` prints "ts sack" only where the
        // kernel reports them.
        if text.contains(" ts ") {
            assert!(text.contains(" sack "), "{mode:?}: {text}");
        }
        let c = capnet_connection(&up, "10.77.0.1:7004");
        assert_eq!((c["sack"].as_bool(), c["timestamps"].as_bool()), (Some(true), Some(true)), "{mode:?}: {c}");
        drop(s);
    }
}

/// Our side of a connection to `remote`, from `capnet status --json`.
fn capnet_connection(up: &Up, remote: &str) -> serde_json::Value {
    let out = up.capnet(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let conns = status["tcp_connections"].as_array().expect("tcp_connections");
    conns.iter().find(|c| c["remote"] == remote).cloned().unwrap_or_else(|| panic!("no {remote} in {status}"))
}

#[test]
fn urgent_data_arrives_inline_and_timeouts_and_nonblocking_behave_like_std() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-urg", mode);
        let stack = Stack::attach(up.name()).expect("attach");
        let listener = TcpListener::bind(&stack, 7006).expect("listen");
        let py = "import socket,time\nc=socket.create_connection(('10.77.0.2',7006))\nc.send(b'ab')\n\
                  c.send(b'!',socket.MSG_OOB)\nc.send(b'cd')\ntime.sleep(1.5)\nc.close()\n";
        let _client = up.spawn_in_ns(&["python3", "-c", py]);
        let (conn, peer) = listener.accept().expect("accept");
        assert_eq!(*peer.ip(), KERNEL);
        conn.set_nodelay(true).expect("nodelay");
        assert!(conn.nodelay().expect("nodelay"));
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 5 {
            let n = (&conn).read(&mut buf).expect("read");
            assert!(n > 0, "{mode:?}: early EOF after {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"ab!cd", "{mode:?}: the urgent byte is in line");
        conn.set_nonblocking(true).expect("nonblocking");
        assert_eq!((&conn).read(&mut buf).expect_err("nothing yet").kind(), ErrorKind::WouldBlock);
        conn.set_nonblocking(false).expect("blocking");
        conn.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        assert_eq!((&conn).read(&mut buf).expect_err("nothing yet").kind(), ErrorKind::TimedOut);
        conn.set_read_timeout(Some(Duration::from_secs(30))).expect("hang guard");
        assert_eq!((&conn).read(&mut buf).expect("EOF"), 0, "{mode:?}: the peer's close is EOF");
        assert!(conn.set_read_timeout(Some(Duration::ZERO)).is_err(), "a zero timeout is refused, as in std");
    }
}

#[test]
fn five_megabytes_each_way_through_seeded_loss_and_reordering() {
    let impairments: [(&str, &[&str]); 2] = [
        ("tcp-loss1", &["--loss", "0.01", "--seed", "7"]),
        ("tcp-loss5", &["--loss", "0.05", "--reorder", "0.05", "--seed", "8"]),
    ];
    for (tag, impair) in impairments {
        for mode in MODES {
            let args = [mode, impair].concat();
            let served = serving(tag, &args, "five", 5 << 20);
            let Served { up, dir, data, .. } = &served;
            // capnet sends: curl fetches from http-serve (the hang guard is curl's).
            let got = dir.path("curl-got");
            let out = up.in_ns(&["curl", "-sS", "--max-time", "300", "-o", &got, "http://10.77.0.2/five"]);
            assert!(out.status.success(), "{tag} {mode:?}: curl: {}", String::from_utf8_lossy(&out.stderr));
            assert!(std::fs::read(&got).expect("curl output") == *data, "{tag} {mode:?}: curl's copy differs");
            // capnet receives: http-get from Python's http.server.
            served.fetch_from_linux("five", &format!("{tag} {mode:?}"));
            // The link really lost frames, and capnet really repaired them.
            assert!(up.counter("driver", "impair_out_dropped") > 0, "{tag} {mode:?}: nothing was dropped");
            assert!(up.counter("tcp", "retransmits") > 0, "{tag} {mode:?}: nothing was retransmitted");
        }
    }
}

#[test]
fn in_window_rst_and_syn_from_a_raw_socket_draw_challenge_acks() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/rfc5961.py");
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-5961", mode);
        let _echo = up.spawn_capnet(&["echo-serve", "--tcp", "--port", "7"]);
        capnet_listening_raw(&up, 7);
        let out = up.in_ns(&["python3", script, "capt9", "10.77.0.1", "10.77.0.2", "7"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{mode:?}: {text}{}", String::from_utf8_lossy(&out.stderr));
        for line in
            ["in-window RST: challenge ACK seen", "in-window SYN: challenge ACK seen", "exact RST: connection reset"]
        {
            assert!(text.contains(line), "{mode:?}: {text}");
        }
        assert!(up.counter("tcp", "challenge_acks") >= 2, "{mode:?}");
        assert!(up.counter("tcp", "resets_in") >= 1, "{mode:?}");
    }
}

/// Waits until something accepts TCP connections on capnet's `port`.
fn capnet_listening_raw(up: &Up, port: u16) {
    for _ in 0..100 {
        let py = format!("import socket\nsocket.create_connection(('10.77.0.2',{port}),timeout=1).close()\n");
        if up.in_ns(&["python3", "-c", &py]).status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_sockets_shows_each_connection_and_its_congestion_state() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-stat", &[mode, &["--tcp-cc", "cubic"]].concat());
        let stack = Stack::attach(up.name()).expect("attach");
        let (_sleeper, s) = connect_to_sleeper(&up, &stack, 7005);
        (&s).write_all(&[0u8; 50_000]).expect("some data so the RTT is measured");
        std::thread::sleep(Duration::from_millis(300));
        let c = capnet_connection(&up, "10.77.0.1:7005");
        assert_eq!(c["state"], "ESTABLISHED", "{mode:?}: {c}");
        assert_eq!(c["cc"], "cubic", "{mode:?}: the domain's default from --tcp-cc");
        assert!(c["cwnd"].as_u64().unwrap() >= 14_480, "{mode:?}: {c}");
        assert!(c["srtt_us"].as_u64().is_some() && c["rto_us"].as_u64().unwrap() >= 200_000, "{mode:?}: {c}");
        // The table for people shows the same connection.
        let out = up.capnet(&["status", "--sockets"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find(|l| l.contains("10.77.0.1:7005")).unwrap_or_else(|| panic!("{mode:?}: {text}"));
        assert!(line.starts_with("ESTABLISHED") && line.contains("cubic cwnd:"), "{mode:?}: {line}");
        // A socket may choose its own algorithm; an unknown one is refused.
        s.set_congestion_control("newreno").expect("newreno");
        let err = s.set_congestion_control("bbr").expect_err("unknown algorithm");
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{mode:?}: {err}");
        std::thread::sleep(Duration::from_millis(300));
        let out = up.capnet(&["status", "--sockets"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("newreno cwnd:"), "{mode:?}: {text}");
    }
}

#[test]
fn capture_is_read_back_by_tcpdump_and_shows_the_handshake() {
    for mode in MODES {
        let up = Up::new(CAPNET, "tcp-cap", mode);
        let dir = Scratch::new("cap");
        dir.file("f", 3000);
        let _server = up.spawn_capnet(&["http-serve", &dir.path(""), "--port", "8081"]);
        capnet_listening(&up, 8081);
        let pcap = dir.path("c.pcap");
        let mut capture = std::process::Command::new(CAPNET)
            .args(["capture", "--netns", up.name(), "-w", &pcap, "--seconds", "3"])
            .spawn()
            .expect("capnet capture");
        std::thread::sleep(Duration::from_millis(500)); // the driver has the capture socket
        let got = up.in_ns(&["curl", "-s", "--max-time", "5", "http://10.77.0.2:8081/f"]);
        assert_eq!(got.stdout.len(), 3000, "{mode:?}: the fetch itself");
        assert!(capture.wait().expect("wait").success(), "{mode:?}: capture exits cleanly");
        let out =
            std::process::Command::new("tcpdump").args(["-nr", &pcap, "tcp port 8081"]).output().expect("tcpdump -r");
        assert!(out.status.success(), "{mode:?}: tcpdump reads it: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        let syn = lines.iter().position(|l| l.contains("10.77.0.1.") && l.contains("Flags [S],"));
        let syn_ack = lines.iter().position(|l| l.contains("10.77.0.2.8081 >") && l.contains("Flags [S.]"));
        let ack = lines.iter().position(|l| l.contains("> 10.77.0.2.8081") && l.contains("Flags [.]"));
        match (syn, syn_ack, ack) {
            (Some(a), Some(b), Some(c)) => assert!(a < b && b < c, "{mode:?}: handshake out of order:\n{text}"),
            _ => panic!("{mode:?}: no handshake in the capture:\n{text}"),
        }
        assert!(text.contains("HTTP") || lines.len() >= 6, "{mode:?}: the exchange follows:\n{text}");
    }
}

/// A group that holds the device and ip but not tcp: it takes the kernel's
/// partial TCP checksums on its word (checksum offload, as the one-group stack
/// does) and completes each before the segment leaves for the tcp domain in
/// another process, which verifies it — nothing is dropped for its checksum.
#[test]
fn partial_checksums_are_completed_for_a_tcp_domain_in_another_process() {
    let three = capnet_supervisor::graph::THREE_GROUP;
    let groups = three.find("[groups.driver]").expect("the three-group graph's groups");
    let stack = three.find("[groups.stack]").expect("its transports' group");
    let edge = "[groups.edge]\ndomains = [\"driver\", \"ip\"]\nuid = 61100\n\
                namespaces = [\"user\", \"pid\", \"mount\", \"net\", \"ipc\"]\nseccomp = [\"driver\", \"ip\"]\n\
                rlimits = { nofile = 64, address_space_mib = 4096 }\n\n";
    let scratch = Scratch::new("tcp-edge-graph");
    let graph = scratch.path("edge.toml");
    std::fs::write(&graph, format!("{}{edge}{}", &three[..groups], &three[stack..])).expect("write the graph");
    let served = serving("tcp-edge", &[&graph], "five", 5 << 20);
    served.fetch_from_linux("five", "device and ip in one group");
    let up = &served.up;
    std::thread::sleep(Duration::from_millis(500)); // status is refreshed every 200 ms
    assert!(up.counter("driver", "checksums_vouched") > 10, "the device's group vouched for the kernel's checksums");
    assert_eq!(up.counter("tcp", "drop_tcp_bad_checksum"), 0, "and completed every one on its way to tcp");
}
