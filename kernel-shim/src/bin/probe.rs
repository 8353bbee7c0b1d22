//! capnet-probe: a stand-in domain that kernel-shim's tests spawn to check the
//! sandbox from the inside. It is granted its supervisor socket (granted fd 0, that
//! is fd 3) and optionally a region (fd 4); it creates its stats region and sends it
//! to the supervisor, starts a second thread, enters the `probe` sandbox, then obeys
//! one-line commands on the socket — some of which break the rules on purpose.
//!
//! Commands: `ping` → `pong`; `map-writable` → the outcome of a shared writable
//! mmap of fd 4; `use-fd N` → the outcome of writing to fd N; `openat`, `socket`,
//! `memfd_create`, `execve` → attempt it (the sandbox must stop us); `exit`.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use capnet_kernel_shim::cap::{send_caps, Cap, CapKind, Rights};
use capnet_kernel_shim::sandbox::{self, StatsRegion};
use capnet_kernel_shim::spawn::take_granted_fd;

fn outcome<T>(r: std::io::Result<T>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("err {}", e.raw_os_error().unwrap_or(0)),
    }
}

fn main() {
    let Some(sock_fd) = take_granted_fd(0) else {
        eprintln!("capnet-probe: no supervisor socket at fd 3");
        std::process::exit(2);
    };
    let mut region = take_granted_fd(1);
    let sock = UnixStream::from(sock_fd);
    let stats: &'static _ = Box::leak(Box::new(StatsRegion::create().expect("stats region")));
    let stats_fd = stats.fd().try_clone_to_owned().expect("dup stats");
    let cap = Cap::new(CapKind::Region, Rights::READ | Rights::MAP | Rights::GRANT, 0, stats_fd).expect("stats cap");
    send_caps(sock.as_fd(), &[(&cap, Rights::READ | Rights::MAP)]).expect("send stats");
    // A second thread, so the supervisor can check the filter reached every thread.
    // It must have finished starting (glibc's thread start makes syscalls with
    // signals blocked) before the filter goes on.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let idle = std::thread::spawn(move || {
        let _ = started_tx.send(());
        let _ = rx.recv();
    });
    started.recv().expect("idle thread started");
    let mut out = sock.try_clone().expect("clone socket"); // dup is forbidden once sandboxed
    sandbox::enter("probe", stats).expect("enter sandbox");
    for line in BufReader::new(&sock).lines() {
        let Ok(line) = line else { break };
        let reply = match line.trim() {
            "ping" => "pong".to_owned(),
            // A shared writable mapping of a granted (FUTURE_WRITE-sealed) region.
            "map-writable" => match region.take() {
                Some(fd) => match capnet_ipc::region::Region::attach_multi_writer(fd, 4096) {
                    Ok(_) => "ok".into(),
                    Err(capnet_ipc::region::RegionError::Map(e)) => outcome::<()>(Err(e)),
                    Err(e) => format!("refused: {e}"),
                },
                None => "no region granted".into(),
            },
            // Using an fd number that was not granted: it is not open here.
            cmd if cmd.starts_with("use-fd ") => {
                let n: usize = cmd[7..].parse().unwrap_or(0);
                match n.checked_sub(3).and_then(take_granted_fd) {
                    Some(fd) => outcome(rustix::io::write(&fd, b"x").map_err(std::io::Error::from)),
                    None => outcome::<()>(Err(std::io::Error::from_raw_os_error(libc::EBADF))),
                }
            }
            "openat" => outcome(std::fs::File::open("/etc/hostname")),
            "socket" => outcome(std::net::UdpSocket::bind("127.0.0.1:0")),
            "memfd_create" => outcome(memfd::MemfdOptions::new().create("x").map_err(std::io::Error::other)),
            "execve" => {
                let prog = std::ffi::CString::new("/bin/true").expect("path");
                outcome(nix::unistd::execv(&prog, std::slice::from_ref(&prog)).map_err(std::io::Error::from))
            }
            "exit" => break,
            other => format!("unknown command {other:?}"),
        };
        if writeln!(out, "{reply}").is_err() {
            break;
        }
    }
    drop(tx);
    let _ = idle.join();
}
