//! Hostile domains, on the default (fully factored) graph, driven by the
//! test-only hostile mode (`CAPNET_HOSTILE=KIND:ACTION:DELAY_MS`, compiled into
//! debug builds only): a domain that writes garbage over its channel areas is
//! detected by its neighbours, reported, cut off and restarted, while the
//! neighbours keep running with their state — pings and an established TCP
//! connection keep working; one that returns loans it never had, or floods its
//! neighbours with notices, answers or pushed data nobody asked for, likewise; a domain that makes a
//! forbidden syscall is reported with the syscall's name and restarted.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use capnet::net::{Stack, TcpStream};
use capnet_testkit::Up;
use serde_json::Value;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

fn domains(up: &Up) -> Vec<Value> {
    let out = up.capnet(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    s["domains"].as_array().expect("domains").clone()
}

fn pid_of(ds: &[Value], name: &str) -> i64 {
    ds.iter().find(|d| d["name"] == name).and_then(|d| d["pid"].as_i64()).expect("pid")
}

/// Brings the stack up with the hostile mode set for `kind`.
fn hostile_up(tag: &str, spec: &str) -> Up {
    std::env::set_var("CAPNET_HOSTILE", spec);
    let up = Up::new(CAPNET, tag, &[]);
    std::env::remove_var("CAPNET_HOSTILE");
    up
}

/// Waits (hang guard 20 s) until `name` was restarted, and returns its entry.
fn restarted(up: &Up, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ds = domains(up);
        let d = ds.iter().find(|d| d["name"] == name).cloned().expect("domain");
        if d["restarts"].as_u64() >= Some(1) {
            return d;
        }
        assert!(Instant::now() < deadline, "{name} was never cut off: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_domain_writing_garbage_is_cut_off_and_its_neighbours_keep_their_state() {
    for victim in ["driver", "ip", "tcp", "udp", "sockets"] {
        let up = hostile_up(&format!("ho-{victim}"), &format!("{victim}:garbage:2500"));
        let _echo = capnet_testkit::tcp_echo_server(&up, 7200);
        // An established connection, before the domain turns hostile.
        let stack = Stack::attach(up.name()).expect("attach");
        let mut conn =
            TcpStream::connect(&stack, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7200)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 6];
        conn.write_all(b"before").expect("write");
        conn.read_exact(&mut buf).expect("echo before");
        let before = domains(&up);

        let d = restarted(&up, victim);
        let why = d["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(why.contains("cut off") && why.contains("broke channel"), "{victim}: the supervisor says why: {d}");

        // Neighbours keep their processes, each joining a fresh channel in place.
        let after = domains(&up);
        for n in ["driver", "ip", "tcp", "udp", "sockets"] {
            if n == victim {
                continue;
            }
            assert_eq!(pid_of(&after, n), pid_of(&before, n), "{victim} hostile: {n} kept its process");
        }
        // The kernel still pings the stack.
        let ping = up.in_ns(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"]);
        assert!(capnet_testkit::ping_received(&ping) >= 1, "{victim} hostile: pings: {ping:?}");
        // The established connection goes on — unless it lived in the cut-off
        // domain itself (tcp holds it; sockets holds the application's channel).
        if !["tcp", "sockets"].contains(&victim) {
            conn.write_all(b"after!").expect("write after");
            conn.read_exact(&mut buf).expect("echo after the cut-off");
            assert_eq!(&buf, b"after!", "{victim} hostile");
        }
    }
}

#[test]
fn a_forbidden_syscall_is_named_and_the_domain_restarted() {
    let up = hostile_up("ho-sys", "udp:syscall:1000");
    let d = restarted(&up, "udp");
    assert_eq!(d["last_error"], "sandbox violation: syscall socket", "{d}");
    // Restarted without the hostile mode: it stays up.
    std::thread::sleep(Duration::from_millis(1500));
    let d = restarted(&up, "udp");
    assert_eq!(d["restarts"], 1, "{d}");
    let logs = up.capnet(&["logs", "supervisor"]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("sandbox violation: syscall socket"), "the log says it too");
}

#[test]
fn returning_foreign_loans_or_flooding_is_cut_off_too() {
    for (kind, action) in [("udp", "loans"), ("udp", "flood"), ("udp", "answers"), ("tcp", "pushes")] {
        let up = hostile_up(&format!("ho-{action}"), &format!("{kind}:{action}:1500"));
        let before = domains(&up);
        let d = restarted(&up, kind);
        let why = d["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(why.contains("cut off") && why.contains("broke channel"), "{action}: {d}");
        let after = domains(&up);
        for n in ["driver", "ip", "tcp", "udp", "sockets"].into_iter().filter(|n| *n != kind) {
            assert_eq!(pid_of(&after, n), pid_of(&before, n), "{kind} {action}: {n} kept its process");
        }
        let ping = up.in_ns(&["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.77.0.2"]);
        assert!(capnet_testkit::ping_received(&ping) >= 1, "{kind} {action}: pings: {ping:?}");
    }
}

/// Waits (hang guard 10 s) until the stack has let `stack` go.
fn let_go(stack: &Stack) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.is_gone() {
        assert!(Instant::now() < deadline, "the hostile application was never cut off");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every domain still runs in the process it ran in before, never restarted.
fn nobody_restarted(up: &Up, before: &[Value], what: &str) {
    for d in domains(up) {
        let name = d["name"].as_str().expect("name");
        assert_eq!(d["restarts"], 0, "{what}: {name} restarted: {d}");
        assert_eq!(d["pid"].as_i64(), Some(pid_of(before, name)), "{what}: {name} kept its process");
    }
}

/// Issue 18, finding 1: a descriptor whose length is `0xffffffff` made the
/// sockets domain grow a 4 GiB buffer before its bounds check, abort and restart
/// (under `--mono`, the whole stack). Now the application alone is cut off.
#[test]
fn an_application_lending_a_huge_descriptor_is_cut_off_alone() {
    use capnet::net::Hostile;
    for (tag, mode) in [("ho-len", &[][..]), ("ho-lenm", &["--mono"][..])] {
        let up = Up::new(CAPNET, tag, mode);
        let _echo = capnet_testkit::tcp_echo_server(&up, 7201);
        let good = Stack::attach(up.name()).expect("attach");
        let mut conn =
            TcpStream::connect(&good, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7201)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut buf = [0u8; 6];
        conn.write_all(b"before").expect("write");
        conn.read_exact(&mut buf).expect("echo before");
        let before = domains(&up);

        let bad = Stack::attach(up.name()).expect("attach the hostile one");
        bad.hostile(Hostile::Descriptor(u32::MAX)).expect("lend it");
        let_go(&bad);
        assert!(capnet::net::UdpSocket::bind(&bad, 0).is_err(), "{tag}: a cut-off application's calls fail");

        nobody_restarted(&up, &before, tag);
        conn.write_all(b"after!").expect("write after");
        conn.read_exact(&mut buf).expect("echo after");
        assert_eq!(&buf, b"after!", "{tag}: the other application's connection goes on");
        let logs = String::from_utf8_lossy(&up.capnet(&["logs", "supervisor"]).stdout).into_owned();
        assert!(logs.contains("cut application") && logs.contains("too large"), "{tag}: the log says why: {logs}");
    }
}
