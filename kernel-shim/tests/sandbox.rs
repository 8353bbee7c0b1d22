//! Sandbox rules, tested by a process that breaks them: the probe domain, spawned
//! with clone3 into its own namespaces under its own uid, must die on forbidden
//! syscalls (and the parent must name them), must not map a granted read-only region
//! writable, must not reach fds it was not granted, and every one of its threads
//! must show seccomp filter mode and empty capability sets.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnet_ipc::region::{Region, RegionRo};
use capnet_kernel_shim::cap::{recv_caps, CapKind};
use capnet_kernel_shim::sandbox::{inspect_threads, StatsRegion};
use capnet_kernel_shim::spawn::{spawn, Child, ExitCause, Limits, Namespaces, SpawnConfig};

const PROBE_UID: u32 = 61_001;

struct Probe {
    child: Child,
    stats: RegionRo,
    lines: BufReader<UnixStream>,
    out: UnixStream,
}

impl Probe {
    fn start(extra: Option<&Region>) -> Probe {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        let mut fds = vec![theirs.into()];
        if let Some(r) = extra {
            fds.push(r.fd().try_clone_to_owned().expect("dup region"));
        }
        let cfg = SpawnConfig {
            program: env!("CARGO_BIN_EXE_capnet-probe").into(),
            args: vec![],
            env: vec![("RUST_BACKTRACE".into(), "0".into())],
            namespaces: Namespaces::ALL,
            uid: PROBE_UID,
            limits: Limits::default(),
            fds,
            log: None,
            image: None,
        };
        let child = spawn(&cfg).expect("spawn probe");
        drop(cfg);
        ours.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut caps = recv_caps(ours.as_fd()).expect("stats region capability");
        let cap = caps.pop().expect("one cap");
        assert_eq!(cap.kind, CapKind::Region);
        let stats = StatsRegion::attach(cap.into_fd()).expect("map stats read-only");
        let out = ours.try_clone().expect("clone");
        let mut p = Probe { child, stats, lines: BufReader::new(ours), out };
        if p.ask("ping").as_deref() != Some("pong") {
            panic!("probe did not come up sandboxed: {}", p.death());
        }
        p
    }

    fn ask(&mut self, cmd: &str) -> Option<String> {
        writeln!(self.out, "{cmd}").ok()?;
        let mut line = String::new();
        match self.lines.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_owned()),
        }
    }

    fn death(self) -> ExitCause {
        let stats = &self.stats;
        self.child.wait(|| StatsRegion::violation(stats)).expect("wait")
    }
}

#[test]
fn forbidden_syscalls_kill_the_domain_and_are_named() {
    for (cmd, expect) in [("socket", "socket"), ("memfd_create", "memfd_create"), ("execve", "execve")] {
        let mut p = Probe::start(None);
        assert_eq!(p.ask(cmd), None, "{cmd} must not return: the sandbox stops the domain");
        let cause = p.death();
        let named = match &cause {
            ExitCause::SandboxViolation { syscall } => syscall.clone(),
            other => panic!("{cmd}: expected a sandbox violation, got {other}"),
        };
        assert_eq!(named, expect, "{cmd}");
        assert_eq!(cause.to_string(), format!("sandbox violation: syscall {named}"));
    }
}

#[test]
fn a_refused_open_fails_with_eacces_and_the_domain_lives_on() {
    let mut p = Probe::start(None);
    let got = p.ask("openat").expect("openat returns: it is refused, not trapped");
    assert_eq!(got, "err 13", "EACCES");
    assert!(p.ask("socket").is_none(), "still sandboxed: the next forbidden call stops it");
}

#[test]
fn granted_read_only_region_cannot_be_mapped_writable_and_other_fds_are_closed() {
    let region = Region::create("t-probe-ro", 4096).expect("region");
    let mut p = Probe::start(Some(&region));
    assert_eq!(p.ask("map-writable").as_deref(), Some("err 1"), "EPERM expected");
    // Our end of some pipe is open here; its number means nothing in the child.
    let (_r, w) = rustix::pipe::pipe().expect("pipe");
    let n = std::os::fd::AsRawFd::as_raw_fd(&w);
    assert_eq!(p.ask(&format!("use-fd {n}")).as_deref(), Some("err 9"), "EBADF expected");
    assert_eq!(p.ask("use-fd 60").as_deref(), Some("err 9"));
    // Beyond stdio the domain holds only its grant (the socket; the region was
    // consumed by the mapping attempt) and what it made itself (its stats region and
    // copies of those fds): no pipe, no file of ours, not the spawn error pipe.
    let dir = format!("/proc/{}/fd", p.child.pid());
    for entry in std::fs::read_dir(&dir).expect("fd dir") {
        let entry = entry.expect("entry");
        let n: i32 = entry.file_name().to_string_lossy().parse().expect("fd number");
        if n <= 2 {
            continue;
        }
        let target = std::fs::read_link(entry.path()).expect("link").to_string_lossy().into_owned();
        assert!(
            target.starts_with("socket:[") || target.starts_with("/memfd:capnet-stats"),
            "fd {n} -> {target} was never granted"
        );
    }
    assert_eq!(p.ask("exit"), None);
    assert_eq!(p.death(), ExitCause::Exited(0));
}

#[test]
fn every_thread_is_filtered_and_without_capabilities_in_own_namespaces() {
    let mut p = Probe::start(None);
    let pid = p.child.pid();
    let threads = inspect_threads(pid).expect("inspect");
    assert!(threads.len() >= 2, "the probe runs two threads: {threads:?}");
    for t in &threads {
        assert!(t.confined(), "thread {} not confined: {t:?}", t.tid);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(field("NSpid:"), vec![pid.to_string(), "1".to_string()], "own pid namespace, pid 1 inside");
    assert!(field("Uid:").iter().all(|u| *u == PROBE_UID.to_string()), "uid {:?}", field("Uid:"));
    assert!(field("Gid:").iter().all(|g| *g == PROBE_UID.to_string()), "gid {:?}", field("Gid:"));
    for ns in ["user", "pid", "mnt", "net", "ipc"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("our ns");
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("their ns");
        assert_ne!(ours, theirs, "{ns} namespace shared with the supervisor");
    }
    assert_eq!(p.ask("exit"), None);
    assert_eq!(p.death(), ExitCause::Exited(0));
}

#[test]
fn a_killed_domain_is_reported_by_signal() {
    let p = Probe::start(None);
    p.child.kill().expect("kill");
    assert_eq!(p.death(), ExitCause::Signaled(libc::SIGKILL));
}

#[test]
fn root_uid_and_missing_binaries_are_refused() {
    let base = || SpawnConfig {
        program: env!("CARGO_BIN_EXE_capnet-probe").into(),
        args: vec![],
        env: vec![],
        namespaces: Namespaces::ALL,
        uid: PROBE_UID,
        limits: Limits::default(),
        fds: vec![],
        log: None,
        image: None,
    };
    let err = spawn(&SpawnConfig { uid: 0, ..base() }).expect_err("uid 0");
    assert!(err.to_string().contains("uid 0"), "{err}");
    let err = spawn(&SpawnConfig { program: "/nonexistent/domain".into(), ..base() }).expect_err("missing");
    assert!(err.to_string().contains("execve"), "{err}");
}

/// A binary given as an fd is what runs, whatever its path names by then (the
/// supervisor checks a swapped-in binary once, keeps the fd, and starts every
/// restart through it): here the path names nothing at all.
#[test]
fn a_binary_given_as_an_fd_runs_whatever_its_path_names() {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let image = std::fs::File::open(env!("CARGO_BIN_EXE_capnet-probe")).expect("open the probe");
    let cfg = SpawnConfig {
        program: "/nonexistent/probe".into(),
        args: vec![],
        env: vec![("RUST_BACKTRACE".into(), "0".into())],
        namespaces: Namespaces::ALL,
        uid: PROBE_UID,
        limits: Limits::default(),
        fds: vec![theirs.into()],
        log: None,
        image: Some(image.into()),
    };
    let child = spawn(&cfg).expect("spawn the probe through its fd");
    ours.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let caps = recv_caps(ours.as_fd()).expect("the probe runs and sends its stats region");
    assert_eq!(caps.len(), 1);
    drop(child);
}
