//! The application socket: attach handshakes off the main loop, each with a
//! deadline, and an application's channel to the sockets domain.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::groups::Running;
use anyhow::{Context, Result};
use capnet::attach::AppSide;
use capnet_ipc::msg::{MsgGrant, MsgHalf};
use capnet_kernel_shim::cap::{send_caps, Cap, CapKind, Rights};
use capnet_proto::group::{send_msg, Control, Event};

/// Gives application `id` its channel to the sockets domain, once the
/// application's own area and pool (`theirs`) arrived: blank regions the
/// sockets group adopts (it may not create memory) and seals, the
/// application's regions (its channel's and its send pool) granted to the
/// group, then the group's granted to the application read-only. The groups
/// running tcp or ip apart view its send pool before all of this. Only the
/// group is waited on (trusted, and quick); the application was done with
/// before.
pub(crate) fn attach_app(running: &mut Running, id: u64, conn: &UnixStream, theirs: AppSide) -> Result<()> {
    // The tcp and ip domains apart view its send pool first: the sockets
    // domain lends them its buffers from its first send on.
    running.app_pool_granted(id, theirs.send_pool.try_clone()?)?;
    let sockets = &running.groups[running.sockets];
    let blank = MsgHalf::blank(&format!("capnet-app-{id}"))?;
    let rw = Rights::READ | Rights::WRITE | Rights::MAP;
    send_msg(&sockets.sock, &Control::AdoptApp(id))?;
    let caps = [
        Cap::new(CapKind::Blank, rw | Rights::GRANT, 0, blank.area.try_clone()?)?,
        Cap::new(CapKind::Blank, rw | Rights::GRANT, 1, blank.pool.try_clone()?)?,
    ];
    send_caps(sockets.sock.as_fd(), &caps.iter().map(|c| (c, rw)).collect::<Vec<_>>())?;
    let adopted = sockets
        .expect(|e| matches!(e, Event::Adopted { app, .. } if *app == id))
        .context("the sockets domain did not adopt the application's channel")?;
    let Event::Adopted { pools, .. } = adopted else { anyhow::bail!("not an adoption") };
    // The pools it may lend the application from, to grant it read-only.
    let lends: Vec<(u16, std::os::fd::OwnedFd)> = if pools.is_empty() {
        Vec::new()
    } else {
        let caps = capnet_kernel_shim::cap::recv_caps(sockets.sock.as_fd())
            .context("the sockets domain did not send the pools it lends from")?;
        if caps.len() != pools.len() || caps.iter().any(|c| c.kind != CapKind::Pool) {
            anyhow::bail!("the sockets domain named {} pools and sent {} capabilities", pools.len(), caps.len());
        }
        pools.into_iter().zip(caps.into_iter().map(Cap::into_fd)).collect()
    };
    send_msg(&sockets.sock, &Control::AppGrant(id))?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let ro = Rights::READ | Rights::MAP;
    let caps = [
        Cap::new(CapKind::ChannelEnd, all, 0, theirs.msg.area)?,
        Cap::new(CapKind::Pool, all, 1, theirs.msg.pool)?,
        Cap::new(CapKind::Pool, all, 2, theirs.send_pool)?,
    ];
    send_caps(sockets.sock.as_fd(), &caps.iter().map(|c| (c, ro)).collect::<Vec<_>>())?;
    // Sealed by the sockets domain now (recv_caps on the application's side checks).
    capnet::attach::accept(conn, MsgGrant { area: blank.area, pool: blank.pool }, lends)?;
    Ok(())
}

/// How many applications every group has fds for: the sockets group holds
/// five for each (its channel area and pool, its send pool, and the group's
/// own two), another group viewing the send pools one (its view), beside the
/// forty or so each keeps for its channels and itself. One more would
/// truncate a capability message (`MSG_CTRUNC`) and end the group.
pub(crate) fn max_applications(running: &Running) -> usize {
    let sockets = |gi: usize| gi == running.sockets;
    let each = |gi: usize| 5 * u64::from(sockets(gi)) + u64::from(running.views_sends(gi) && !sockets(gi));
    (0..running.groups.len())
        .filter(|&gi| each(gi) > 0)
        .map(|gi| running.graph.groups[gi].sandbox.nofile.saturating_sub(40) / each(gi))
        .min()
        .unwrap_or(1)
        .max(1) as usize
}

/// Handshakes with applications under way at once: the next waits for one of
/// them to end (each within [`HANDSHAKE_DEADLINE`]), so a flood of connects
/// ties up a bounded number of threads and delays others by one deadline.
pub(crate) const MAX_HANDSHAKES: usize = 16;
/// How long an application may take to send its side.
pub(crate) const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

/// Accepts applications: checks the caller, then takes its side of the channel
/// on a thread of its own with a short deadline (at most [`MAX_HANDSHAKES`]
/// at once), and hands the connection and that side to the supervisor's loop,
/// which attaches it. A handshake that fails or never finishes leaves nothing.
pub(crate) fn serve_apps(
    listener: UnixListener,
    to_loop: std::sync::mpsc::Sender<(UnixStream, AppSide)>,
    wake: std::sync::mpsc::Sender<()>,
) {
    let me = nix::unistd::geteuid().as_raw();
    let under_way = Arc::new((Mutex::new(0usize), std::sync::Condvar::new()));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let allowed = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .is_ok_and(|c| c.uid() == me || c.uid() == 0);
        if !allowed {
            continue; // closed: the application's join fails at once
        }
        let _ = conn.set_read_timeout(Some(HANDSHAKE_DEADLINE));
        let _ = conn.set_write_timeout(Some(HANDSHAKE_DEADLINE));
        {
            let (n, freed) = &*under_way;
            let mut n = n.lock().unwrap_or_else(|e| e.into_inner());
            while *n >= MAX_HANDSHAKES {
                n = freed.wait(n).unwrap_or_else(|e| e.into_inner());
            }
            *n += 1;
        }
        let (to_loop, wake, under_way) = (to_loop.clone(), wake.clone(), under_way.clone());
        let started = std::thread::Builder::new().name("app-handshake".into()).spawn(move || {
            if let Ok(theirs) = capnet::attach::take_app_side(&conn) {
                if to_loop.send((conn, theirs)).is_ok() {
                    let _ = wake.send(());
                }
            }
            let (n, freed) = &*under_way;
            *n.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
            freed.notify_one();
        });
        if started.is_err() {
            return;
        }
    }
}
