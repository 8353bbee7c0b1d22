//! The control socket: status, capture, restart, swap, down — what the CLI asks.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use capnet_kernel_shim::cap::{send_caps, Cap, CapKind, Rights};
use capnet_proto::group::{send_msg, Control};
use capnet_proto::report::{Domain, Status};

use crate::control::{recv, send, Reply, Request};
use crate::groups::{Change, Running};

/// `capnet capture`: a `SOCK_SEQPACKET` pair, one end to the group running the
/// driver (it copies each frame there), the other to the asking CLI.
pub(crate) fn start_capture(running: &Running, conn: &UnixStream) -> Result<()> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    let driver = &running.groups[running.driver];
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
    let rw = Rights::READ | Rights::WRITE | Rights::GRANT;
    send_msg(&driver.sock, &Control::Capture)?;
    let cap = Cap::new(CapKind::Socket, rw, 0, theirs)?;
    send_caps(driver.sock.as_fd(), &[(&cap, Rights::READ | Rights::WRITE)])?;
    send(conn, &Reply::Ok)?;
    let cap = Cap::new(CapKind::Socket, rw, 0, ours)?;
    send_caps(conn.as_fd(), &[(&cap, Rights::READ | Rights::WRITE)])?;
    Ok(())
}

/// The status object as JSON, from every group's report.
pub(crate) fn render(base: &Status, running: &Running) -> Result<String> {
    let mut status = base.clone();
    let draining = running.draining.as_ref().map(|d| (&d.process, "draining"));
    for (g, state) in running.groups.iter().map(|g| (g, "running")).chain(draining) {
        let report = g.report();
        let (cpu_s, rss_bytes) = process_usage(g.child.pid());
        for d in &g.domains {
            let counters = report.domains.iter().find(|(n, _)| n == d).map(|(_, c)| c.clone()).unwrap_or_default();
            status.domains.push(Domain {
                name: d.clone(),
                pid: g.child.pid(),
                state: state.into(),
                restarts: g.restarts,
                uptime_s: g.started.elapsed().as_secs_f64(),
                cpu_s,
                rss_bytes,
                counters,
                last_error: g.last_error.clone(),
            });
        }
        status.tcp_connections.extend(
            report.tcp_connections.into_iter().map(|c| capnet_proto::report::TcpConnection { pid: g.child.pid(), ..c }),
        );
        status.tcp_connections_total += report.tcp_connections_total;
        status.tcp_listening.extend(report.tcp_listening);
        status.routes.extend(report.routes);
    }
    Ok(serde_json::to_string(&status)?)
}

/// CPU seconds and resident bytes of process `pid`, from /proc.
pub(crate) fn process_usage(pid: i32) -> (f64, u64) {
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as u64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let rss = std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
        .unwrap_or(0);
    (ticks / tick, rss * page)
}

/// Serves the control socket: one request per connection, from our own user only.
pub(crate) fn serve(
    listener: UnixListener,
    snapshot: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    captures: std::sync::mpsc::Sender<UnixStream>,
    restarts: std::sync::mpsc::Sender<(Change, UnixStream)>,
    wake: std::sync::mpsc::Sender<()>,
) {
    let me = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let allowed = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .is_ok_and(|c| c.uid() == me || c.uid() == 0);
        if !allowed {
            let _ = send(&conn, &Reply::Refused("only the supervisor's own user may use its control socket".into()));
            continue;
        }
        let reply = match recv::<Request>(&conn) {
            Ok(Request::Status) => Reply::Status(snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            Ok(Request::Down) => {
                stop.store(true, Ordering::Relaxed);
                Reply::Ok
            }
            Ok(Request::Capture) => {
                // The loop that holds the groups' sockets answers it.
                let _ = captures.send(conn);
                let _ = wake.send(());
                continue;
            }
            Ok(Request::Restart(domain)) => {
                let _ = restarts.send((Change::Restart(domain), conn));
                let _ = wake.send(());
                continue;
            }
            Ok(Request::WireAgain) => {
                let _ = restarts.send((Change::WireAgain, conn));
                let _ = wake.send(());
                continue;
            }
            Ok(Request::Wire { from }) => {
                let _ = restarts.send((Change::Wire(from), conn));
                let _ = wake.send(());
                continue;
            }
            Ok(Request::Swap { domain, binary }) => {
                // Swap starts code with the supervisor's authority: its own user only.
                let own = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
                    .is_ok_and(|c| c.uid() == me);
                if !own {
                    let _ = send(&conn, &Reply::Refused("only the supervisor's own user may swap a domain".into()));
                    continue;
                }
                let _ = restarts.send((Change::Swap(domain, binary), conn));
                let _ = wake.send(());
                continue;
            }
            Err(e) => Reply::Refused(format!("bad request: {e}")),
        };
        let _ = send(&conn, &reply);
    }
}
