//! Surviving a dead domain, on the default (fully factored) graph: `kill -9` of
//! the driver, ip or udp during a TCP transfer — the supervisor restarts it with
//! fresh channels, tcp keeps its connections, retransmission covers the gap, and
//! the transfer completes byte-exact; a crash of tcp or sockets reaches the
//! application as `ConnectionReset` (never a hang) and new connections work
//! afterwards; `capnet restart DOMAIN` does the same on request.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capnet::net::{Stack, TcpStream};
use capnet_testkit::{Scratch, Up};
use serde_json::Value;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

fn status(up: &Up) -> Value {
    let out = up.capnet(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn domain(up: &Up, name: &str) -> Value {
    status(up)["domains"].as_array().expect("domains").iter().find(|d| d["name"] == name).cloned().expect("domain")
}

/// Waits (hang guard 20 s) until `name` runs again under a pid other than `old`.
fn restarted(up: &Up, name: &str, old: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = domain(up, name);
        if d["pid"].as_i64() != Some(old) && d["restarts"].as_u64() >= Some(1) {
            return d;
        }
        assert!(Instant::now() < deadline, "{name} never came back: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Length of the file the transfers fetch.
const LEN: usize = 50_000_000;

/// Serves `dir` with `http-serve` on port 80 of the stack and starts curl on
/// the Linux side fetching `big` into `got` at 25 MB/s (so what happens next
/// lands mid-transfer); returns once 10 % has arrived.
fn slow_fetch(up: &Up, dir: &Scratch, got: &std::path::Path) -> (capnet_testkit::Killed, capnet_testkit::Killed) {
    let server = up.spawn_capnet(&["http-serve", dir.0.to_str().expect("utf-8"), "--port", "80"]);
    for _ in 0..100 {
        let probe = up.in_ns(&["curl", "-s", "-o", "/dev/null", "--max-time", "2", "http://10.77.0.2/"]);
        if probe.status.code() != Some(7) {
            break; // anything but "could not connect": the server is up
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(got);
    let curl = up.spawn_in_ns(&[
        "curl",
        "-s",
        "--retry",
        "0",
        "--max-time",
        "60",
        "--limit-rate",
        "25M",
        "-o",
        got.to_str().expect("utf-8"),
        "http://10.77.0.2/big",
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(got).map_or(0, |m| m.len()) < (LEN / 10) as u64 {
        assert!(Instant::now() < deadline, "the transfer never reached 10 %");
        std::thread::sleep(Duration::from_millis(20));
    }
    (server, curl)
}

#[test]
fn a_tcp_transfer_survives_kill_9_of_the_driver_ip_or_udp() {
    let dir = Scratch::new("rs-www");
    let data = dir.file("big", LEN);
    for victim in ["driver", "ip", "udp"] {
        let up = Up::new(CAPNET, &format!("rs-{victim}"), &[]);
        let got = dir.0.join(format!("got-{victim}"));
        let (_server, mut curl) = slow_fetch(&up, &dir, &got);
        let old = domain(&up, victim)["pid"].as_i64().expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::Signal::SIGKILL)
            .expect("kill -9");
        let at = std::fs::metadata(&got).map_or(0, |m| m.len());
        let d = restarted(&up, victim, old);
        assert_eq!(d["restarts"], 1, "{victim}: {d}");
        assert!(d["last_error"].as_str().is_some_and(|e| e.contains("SIGKILL")), "{victim}: the cause: {d}");
        let st = curl.0.wait().expect("curl");
        assert!(st.success(), "{victim}: curl failed ({st}) after the kill at {at} bytes");
        assert!(at < LEN as u64, "{victim}: the kill landed before the end");
        let copy = std::fs::read(&got).expect("curl's copy");
        assert!(copy == data, "{victim}: the copy differs ({} bytes of {LEN})", copy.len());
        // The driver (a new one, too) wrote the server's buffers in place:
        // it views every application's send pool again after its restart.
        assert!(up.counter("driver", "send_pieces_in_place") > 0, "{victim}: the driver copied every frame");
        // Only the victim restarted: the others joined fresh channels in place.
        for n in ["driver", "ip", "tcp", "udp", "sockets"] {
            if n != victim {
                assert_eq!(domain(&up, n)["restarts"], 0, "{victim} killed: {n}");
            }
        }
    }
}

#[test]
fn a_tcp_or_sockets_crash_is_connection_reset_and_new_connections_work() {
    for victim in ["tcp", "sockets"] {
        let up = Up::new(CAPNET, &format!("rs-{victim}"), &[]);
        let _echo = capnet_testkit::tcp_echo_server(&up, 7100);
        let stack = Stack::attach(up.name()).expect("attach");
        let peer = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7100);
        let mut s = TcpStream::connect(&stack, peer).expect("connect");
        s.write_all(b"before").expect("write");
        let mut buf = [0u8; 6];
        s.read_exact(&mut buf).expect("echo");
        let old = domain(&up, victim)["pid"].as_i64().expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::Signal::SIGKILL)
            .expect("kill -9");
        // The application learns it at once: a hang guard, not a speed assertion.
        s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
        let err = s.read(&mut buf).expect_err("the connection is gone");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{victim}: {err}");
        restarted(&up, victim, old);
        // A new connection works (through a new attachment if sockets restarted).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            let stack = Stack::attach(up.name());
            match stack.and_then(|st| TcpStream::connect(&st, peer).map(|c| (st, c))) {
                Ok((_st, c)) => break (_st, c),
                Err(e) => assert!(Instant::now() < deadline, "{victim}: no new connection: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        s.1.write_all(b"after!").expect("write");
        s.1.read_exact(&mut buf).expect("echo after the restart");
        assert_eq!(&buf, b"after!");
        if victim == "tcp" {
            // The application attached before the crash sends through the
            // new tcp domain as loans of its send pool: the supervisor
            // granted the new process the pool before it joined the sockets
            // domain (else tcp would refuse the first loan as a protocol
            // error and the sockets domain would be cut off).
            let mut c = TcpStream::connect(&stack, peer).expect("connect from the first attachment");
            let big: Vec<u8> = (0..1 << 20).map(|i: usize| (i % 251) as u8).collect();
            let mut echoed = vec![0u8; big.len()];
            for (out, back) in big.chunks(65536).zip(echoed.chunks_mut(65536)) {
                c.write_all(out).expect("write");
                c.read_exact(back).expect("echo");
            }
            assert!(echoed == big, "the echo through the new tcp domain differs");
            std::thread::sleep(Duration::from_millis(250)); // the groups' next report
            assert!(up.counter("sockets", "link_tcp_loans_made") > 0, "the new tcp domain was lent nothing");
            assert_eq!(domain(&up, "sockets")["restarts"], 0, "the sockets domain kept running");
        }
    }
}

#[test]
fn capnet_restart_restarts_a_domain_on_request() {
    let up = Up::new(CAPNET, "rs-req", &[]);
    let old = domain(&up, "udp")["pid"].as_i64().expect("pid");
    let out = up.capnet(&["restart", "udp"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let d = restarted(&up, "udp", old);
    assert_eq!(d["last_error"], "restarted on request");
    // UDP works again: an echo service on the new domain answers Linux.
    let _echo = up.spawn_capnet(&["echo-serve", "--udp", "--port", "7"]);
    std::thread::sleep(Duration::from_millis(500));
    let mut socat = Command::new("ip")
        .args(["netns", "exec", up.name(), "socat", "-t", "2", "-", "UDP4:10.77.0.2:7"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("socat");
    socat.stdin.take().expect("stdin").write_all(b"still here").expect("write");
    let out = socat.wait_with_output().expect("socat");
    assert_eq!(out.stdout, b"still here");
    let out = up.capnet(&["restart", "sctp"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no domain \"sctp\""));
}

/// Sends a numbered datagram to the stack's UDP echo every 10 ms for 4 s and
/// prints: sent, received, last number echoed.
const UDP_LOOP: &str = "
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.005)
s.connect(('10.77.0.2', 7))
got, last, n = set(), -1, 400
for i in range(n):
    s.send(str(i).encode())
    end = time.time() + 0.01
    while time.time() < end:
        try:
            k = int(s.recv(100)); got.add(k); last = max(last, k)
        except (socket.timeout, ConnectionRefusedError, ValueError):
            pass
end = time.time() + 0.5
while time.time() < end:
    try:
        k = int(s.recv(100)); got.add(k); last = max(last, k)
    except (socket.timeout, ConnectionRefusedError, ValueError):
        pass
print(n, len(got), last)
";

#[test]
fn swap_udp_replaces_the_domain_while_an_echo_loop_runs() {
    let up = Up::new(CAPNET, "rs-swap", &[]);
    let _echo = up.spawn_capnet(&["echo-serve", "--udp", "--port", "7"]);
    std::thread::sleep(Duration::from_millis(500));
    // The "new" udp domain: a copy of capnet-domain, as an experimental build would be.
    let dir = Scratch::new("rs-swap");
    let domain_bin = std::path::Path::new(CAPNET).with_file_name("capnet-domain");
    let next = dir.0.join("udp-next");
    std::fs::copy(&domain_bin, &next).expect("copy capnet-domain");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let old = domain(&up, "udp")["pid"].as_i64().expect("pid");
    let looped = up.spawn_in_ns(&["python3", "-c", UDP_LOOP]);
    std::thread::sleep(Duration::from_millis(1500));
    let out = up.capnet(&["swap", "udp", "--with", next.to_str().expect("utf-8")]);
    assert!(out.status.success(), "swap: {}", String::from_utf8_lossy(&out.stderr));
    let d = restarted(&up, "udp", old);
    assert_eq!(d["last_error"], format!("swapped for {}", next.display()));
    let exe = std::fs::read_link(format!("/proc/{}/exe", d["pid"])).expect("the new domain's program");
    assert_eq!(exe, next, "the udp domain runs the new program");
    // That loop only kept traffic flowing across the first swap; the counted one
    // runs across a second swap, back to the stock program.
    drop(looped);
    let counted = |swap_to: Option<&std::path::Path>| {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", up.name(), "python3", "-c", UDP_LOOP])
            .stdout(Stdio::piped())
            .spawn()
            .expect("udp loop");
        if let Some(bin) = swap_to {
            std::thread::sleep(Duration::from_millis(1500));
            let out = up.capnet(&["swap", "udp", "--with", bin.to_str().expect("utf-8")]);
            assert!(out.status.success(), "swap: {}", String::from_utf8_lossy(&out.stderr));
        }
        let out = child.wait_with_output().expect("loop");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Vec<i64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        assert_eq!(v.len(), 3, "loop output: {text}");
        (v[0], v[1], v[2])
    };
    let (sent, got, last) = counted(Some(&domain_bin));
    assert_eq!(last, sent - 1, "the echo goes on after the swap ({got} of {sent})");
    assert!(sent - got <= 40, "only the datagrams in flight during the swap are lost: {got} of {sent}");
    // What may not be swapped in, and what cannot be swapped yet.
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let out = up.capnet(&["swap", "udp", "--with", next.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("writable by others"), "{out:?}");
    let out = up.capnet(&["swap", "udp", "--with", "/nonexistent/udp"]);
    assert!(!out.status.success());
    let out = up.capnet(&["swap", "ip", "--with", domain_bin.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not supported"), "{out:?}");
}

/// Holds a connection to the stack's port 80 open for 3 s (a second client).
const HOLD: &str = "
import socket, time
s = socket.create_connection(('10.77.0.2', 80))
time.sleep(3)
";

#[test]
fn swap_tcp_sends_new_connections_to_the_new_domain_while_the_old_finishes_its_own() {
    let dir = Scratch::new("rs-tswap");
    let data = dir.file("big", LEN);
    let up = Up::new(CAPNET, "rs-tswap", &[]);
    let got = dir.0.join("got");
    let (_server, mut curl) = slow_fetch(&up, &dir, &got);
    let old = domain(&up, "tcp")["pid"].as_i64().expect("pid");
    // The experimental tcp domain shipped with capnet (CUBIC, other defaults).
    // Built with the workspace, next to `capnet` (it is capnet-group's binary).
    let next = std::path::Path::new(CAPNET).with_file_name("capnet-tcp-cubic");
    let out = up.capnet(&["swap", "tcp", "--with", next.to_str().expect("utf-8")]);
    assert!(out.status.success(), "swap: {}", String::from_utf8_lossy(&out.stderr));
    let tcps = |s: &Value| -> Vec<Value> {
        s["domains"].as_array().expect("domains").iter().filter(|d| d["name"] == "tcp").cloned().collect()
    };
    let s = status(&up);
    let both = tcps(&s);
    assert_eq!(both.len(), 2, "old and new tcp while the transfer runs: {both:?}");
    let new = both.iter().find(|d| d["state"] == "running").expect("the new tcp")["pid"].as_i64().expect("pid");
    assert!(both.iter().any(|d| d["state"] == "draining" && d["pid"] == old), "{both:?}");
    let exe = std::fs::read_link(format!("/proc/{new}/exe")).expect("the new domain's program");
    assert_eq!(exe, next, "the new tcp domain runs the new program");
    assert!(
        s["tcp_connections"].as_array().expect("connections").iter().any(|c| c["pid"] == old),
        "the transfer stays on the old domain: {s}"
    );
    // One swap at a time.
    let out = up.capnet(&["swap", "tcp", "--with", next.to_str().expect("utf-8")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("still finishing"), "{out:?}");
    // A new connection reaches the same listener, on the new domain, with its CUBIC.
    let _hold = up.spawn_in_ns(&["python3", "-c", HOLD]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&up);
        let conns = s["tcp_connections"].as_array().expect("connections").clone();
        if let Some(c) = conns.iter().find(|c| c["pid"] == new) {
            assert_eq!(c["cc"], "cubic", "the new domain's default: {c}");
            break;
        }
        assert!(Instant::now() < deadline, "no connection reached the new tcp domain: {conns:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let small =
        up.in_ns(&["curl", "-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "http://10.77.0.2/big"]);
    assert_eq!(small.stdout, b"200", "a whole new fetch through the new domain");
    // The transfer that spans the swap completes byte-exact on the old domain.
    let st = curl.0.wait().expect("curl");
    assert!(st.success(), "curl failed ({st}) across the swap");
    let copy = std::fs::read(&got).expect("curl's copy");
    assert!(copy == data, "the copy differs ({} bytes of {LEN})", copy.len());
    // Then the old domain exits on its own.
    let deadline = Instant::now() + Duration::from_secs(20);
    while tcps(&status(&up)).len() != 1 || std::path::Path::new(&format!("/proc/{old}")).exists() {
        assert!(Instant::now() < deadline, "the old tcp domain never exited: {}", status(&up));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(domain(&up, "tcp")["pid"], new);
    for n in ["driver", "ip", "udp", "sockets"] {
        assert_eq!(domain(&up, n)["restarts"], 0, "{n} kept its process");
    }
}

/// Issue 18, finding 6: `swap --with` followed symlinks, checked only the final
/// file, once, and every later restart ran whatever the path named then — a
/// symlink in another user's directory, repointed after the swap, ran their
/// script as the udp domain. Now the binary is opened once without following a
/// symlink, checked with every directory above it, and every restart starts
/// the file that was checked, through its fd.
#[test]
fn swap_runs_the_binary_it_checked_at_every_restart() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let up = Up::new(CAPNET, "rs-swapfd", &[]);
    let domain_bin = std::path::Path::new(CAPNET).with_file_name("capnet-domain");
    let swap = |bin: &std::path::Path| up.capnet(&["swap", "udp", "--with", bin.to_str().expect("utf-8")]);
    // Another user's directory, with a symlink to the real program: refused.
    let theirs = Scratch::new("rs-swapfd-theirs");
    std::os::unix::fs::symlink(&domain_bin, theirs.0.join("udp")).expect("symlink");
    std::os::unix::fs::chown(&theirs.0, Some(65533), Some(65533)).expect("chown");
    let out = swap(&theirs.0.join("udp"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("belongs to uid 65533"), "another user's directory: {err}");
    // A symlink in a directory of ours: refused too.
    let ours = Scratch::new("rs-swapfd");
    std::os::unix::fs::symlink(&domain_bin, ours.0.join("link")).expect("symlink");
    let out = swap(&ours.0.join("link"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("is a symlink"), "a symlink: {err}");
    // A real copy is swapped in.
    let next = ours.0.join("udp-next");
    std::fs::copy(&domain_bin, &next).expect("copy capnet-domain");
    std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let checked = std::fs::metadata(&next).expect("stat").ino();
    let old = domain(&up, "udp")["pid"].as_i64().expect("pid");
    let out = swap(&next);
    assert!(out.status.success(), "swap: {}", String::from_utf8_lossy(&out.stderr));
    let d = restarted(&up, "udp", old);
    let pid = d["pid"].as_i64().expect("pid");
    // Then its path names a script; a restart still starts the checked file.
    let marker = ours.0.join("ran");
    let evil = ours.0.join("evil");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\nsleep 30\n", marker.display())).expect("script");
    std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&evil, &next).expect("replace the swapped-in path");
    let out = up.capnet(&["restart", "udp"]);
    assert!(out.status.success(), "restart: {}", String::from_utf8_lossy(&out.stderr));
    let d = restarted(&up, "udp", pid);
    let exe = std::fs::metadata(format!("/proc/{}/exe", d["pid"])).expect("the restarted domain's program");
    assert_eq!(exe.ino(), checked, "the restart runs the file checked at the swap, not what the path names now");
    assert_eq!(d["state"], "running", "{d}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "the script never ran");
    let ping = up.in_ns(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.0.2"]);
    assert_eq!(capnet_testkit::ping_received(&ping), 2, "the stack still answers");
}

/// Loans come back whatever dies: while a Linux sender floods a slow reader on
/// the stack — so tcp holds the driver's frame buffers, lent on by ip, and
/// lends them on to the sockets domain, which lends them to the reader —
/// `victim` is killed with SIGKILL twenty times (the stream goes on through
/// the driver's and ip's deaths; a new one, through a new attachment, follows
/// each of tcp's and the sockets domain's); every byte read is the sender's
/// zero. Afterwards the driver's frame pool holds what it held before, and no
/// domain holds a loan or has one out. (Whenever a domain holding the
/// driver's buffers dies, the pool is made again: what the others still read
/// of the old one stays theirs until they let go.) Restarts back off (up to
/// 5 s for a domain that keeps dying), so each victim has a test of its own.
fn every_loan_comes_back_after_twenty_kill_9s_of(victim: &str) {
    use capnet::net::TcpListener;
    let up = Up::new(CAPNET, &format!("rs-loans-{victim}"), &[]);
    std::thread::sleep(Duration::from_millis(300));
    let before = up.counter("driver", "frame_pool_in_use");
    // An attachment, a listener, a flooding sender and the accepted
    // connection (the attachment retried while a sockets domain restarts).
    let open = |round: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (stack, listener) = loop {
            match Stack::attach(up.name()).and_then(|st| TcpListener::bind(&st, 7200).map(|l| (st, l))) {
                Ok(x) => break x,
                Err(e) => assert!(Instant::now() < deadline, "{victim} round {round}: listen: {e}"),
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let sender = up.spawn_in_ns(&["socat", "-u", "/dev/zero", "TCP4:10.77.0.2:7200,retry=50,interval=0.1"]);
        let (conn, _) = listener.accept().unwrap_or_else(|e| panic!("{victim} round {round}: accept: {e}"));
        (stack, listener, sender, conn)
    };
    let mut buf = vec![0u8; 65536];
    let mut flow = None;
    for round in 0..20 {
        let (_, _, _, conn) = flow.get_or_insert_with(|| open(round));
        // Read a little, slowly: the rest queues in tcp, on the driver's buffers.
        for _ in 0..3 {
            if let Ok(n) = conn.read(&mut buf) {
                assert!(buf[..n].iter().all(|&b| b == 0), "{victim} round {round}: read bytes the sender never sent");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let old = domain(&up, victim)["pid"].as_i64().expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old as i32), nix::sys::signal::Signal::SIGKILL)
            .expect("kill -9");
        restarted(&up, victim, old);
        if victim == "tcp" || victim == "sockets" {
            flow = None; // its connections and listener died with it
        }
    }
    assert_eq!(domain(&up, victim)["restarts"], 20, "{victim}");
    drop(flow);
    // Every sender gone and every connection closed: what was lent comes back.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = [
            up.counter("driver", "frame_pool_in_use"),
            up.counter("tcp", "loans_held"),
            up.counter("ip", "link_tcp_lent"),
            up.counter("tcp", "link_sockets_lent"),
            up.counter("sockets", "app_loans_held"),
        ];
        if now == [before, 0, 0, 0, 0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{victim}: pool occupancy {before} before; (pool, tcp's loans, ip's out, tcp's out, \
             the applications') {now:?} after"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_loan_comes_back_after_twenty_kill_9s_of_the_driver() {
    every_loan_comes_back_after_twenty_kill_9s_of("driver");
}

#[test]
fn every_loan_comes_back_after_twenty_kill_9s_of_ip() {
    every_loan_comes_back_after_twenty_kill_9s_of("ip");
}

#[test]
fn every_loan_comes_back_after_twenty_kill_9s_of_tcp() {
    every_loan_comes_back_after_twenty_kill_9s_of("tcp");
}

#[test]
fn every_loan_comes_back_after_twenty_kill_9s_of_sockets() {
    every_loan_comes_back_after_twenty_kill_9s_of("sockets");
}
