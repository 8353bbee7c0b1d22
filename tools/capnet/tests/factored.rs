//! The factored stack as the kernel sees it: every domain of the default graph in
//! its own process, each thread of each one confined (`Seccomp: 2`, no
//! capability in any set, `no_new_privs`), under the uid and in the namespaces
//! its graph entry names, holding only the fds it was granted — while an
//! application is attached and a connection is up; and `capnet logs`, per domain
//! and following.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use capnet_supervisor::graph::{Graph, DEFAULT};
use capnet_testkit::Up;
use serde_json::Value;

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

/// `capnet status --json`.
fn status(up: &Up) -> Value {
    let out = up.capnet(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// The value of `Name:` in a /proc status file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("")
}

#[test]
fn every_domain_is_its_own_confined_process_holding_only_its_grants() {
    let graph = Graph::parse(DEFAULT).expect("default graph");
    let up = Up::new(CAPNET, "fac-sb", &[]);
    // An application attached (its channel is the sockets domain's), and a TCP
    // connection up through every domain, so their fds exist when we look.
    let dir = std::env::temp_dir().join(format!("capt-{}-fac-www", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("f"), b"hello").expect("file");
    let _server = up.spawn_capnet(&["http-serve", dir.to_str().expect("utf-8"), "--port", "8080"]);
    let mut fetched = false;
    for _ in 0..50 {
        let out = up.in_ns(&["curl", "-s", "--max-time", "2", "http://10.77.0.2:8080/f"]);
        if out.stdout == b"hello" {
            fetched = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(fetched, "the factored stack serves a file");

    let s = status(&up);
    let me_ns = |ns: &str| std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("own namespace");
    let mut pids = BTreeSet::new();
    for d in s["domains"].as_array().expect("domains") {
        let name = d["name"].as_str().expect("name");
        let pid = d["pid"].as_i64().expect("pid");
        assert!(pids.insert(pid), "{name} shares process {pid} with another domain");
        let group = graph.group_of(name).expect("every domain is in a group");
        let sb = &group.sandbox;

        // Every thread: seccomp filter, no capabilities, no_new_privs.
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks").flatten().collect();
        assert!(!tasks.is_empty());
        for t in &tasks {
            let st = std::fs::read_to_string(t.path().join("status")).expect("task status");
            assert_eq!(field(&st, "Seccomp:"), "2", "{name} thread {:?}", t.file_name());
            for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapInh:", "CapAmb:"] {
                assert_eq!(u64::from_str_radix(field(&st, set), 16), Ok(0), "{name}: {set} not empty");
            }
            assert_eq!(field(&st, "NoNewPrivs:"), "1", "{name}");
        }
        // Its graph entry's uid, and namespaces of its own.
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let uids: Vec<&str> = field(&st, "Uid:").split_whitespace().collect();
        assert_eq!(uids, vec![sb.uid.to_string(); 4], "{name}: real, effective, saved and fs uid");
        for (ns, own) in [
            ("user", sb.namespaces.user),
            ("pid", sb.namespaces.pid),
            ("mnt", sb.namespaces.mount),
            ("net", sb.namespaces.net),
            ("ipc", sb.namespaces.ipc),
        ] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("namespace");
            assert_eq!(theirs != me_ns(ns), own, "{name}: {ns} namespace");
        }
        // Only granted fds: stdio, the supervisor socket, memfd regions (its own and
        // those granted to it) and, for the driver alone, the TAP.
        let mut sockets = 0;
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").flatten() {
            let n: i32 = fd.file_name().to_string_lossy().parse().expect("fd number");
            let target = std::fs::read_link(fd.path()).expect("fd target").display().to_string();
            match n {
                0..=2 => continue, // stdio: the supervisor's log
                _ if target.starts_with("socket:") => sockets += 1,
                _ if target.starts_with("/memfd:capnet-") => {}
                _ if target == "/dev/net/tun" && name == "driver" => {}
                _ => panic!("{name} holds fd {n} → {target}, which no grant explains"),
            }
            let meta = std::fs::metadata(fd.path()).expect("fd metadata");
            assert!(meta.nlink() <= 1 || target == "/dev/net/tun", "{name}: fd {n} is a file with a name");
        }
        assert_eq!(sockets, 1, "{name}: exactly one socket, its supervisor socket");
    }
    assert_eq!(pids.len(), 5, "five domains, five processes");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn logs_show_each_domain_and_follow_what_comes() {
    let up = Up::new(CAPNET, "fac-log", &[]);
    let out = up.capnet(&["logs"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for d in ["driver", "ip", "tcp", "udp", "sockets"] {
        assert!(
            text.lines().any(|l| l.starts_with(d) && l.contains("sandbox entered on every thread")),
            "{d} logged its sandbox:\n{text}"
        );
    }
    assert!(text.contains("channel ip-tcp joined"), "{text}");
    // One domain's log only.
    let out = up.capnet(&["logs", "tcp"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.is_empty() && text.lines().all(|l| l.starts_with("tcp ")), "{text}");
    // An unknown one is a clear error.
    let out = up.capnet(&["logs", "sctp"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no domain \"sctp\""));
    // -f prints what is logged after it started: an application attaching.
    let follow = std::process::Command::new(CAPNET)
        .args(["logs", "sockets", "-f", "--netns", up.name()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("logs -f");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let ping = up.capnet(&["ping", "-c", "1", "10.77.0.1"]);
    assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stderr));
    std::thread::sleep(std::time::Duration::from_millis(1000));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(follow.id() as i32), nix::sys::signal::Signal::SIGINT);
    let out = follow.wait_with_output().expect("logs -f ends on SIGINT");
    let text = String::from_utf8_lossy(&out.stdout);
    let attached = text.lines().filter(|l| l.contains("attached")).count();
    assert!(attached >= 1, "the new attachment followed:\n{text}");
    assert!(text.lines().any(|l| l.contains("left: its sockets are closed")), "and its leaving:\n{text}");
}
