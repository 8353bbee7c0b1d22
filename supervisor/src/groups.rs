//! The running graph: each group's process, its channels and sides, and what
//! the supervisor does when one dies, breaks a channel, restarts or is swapped.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::graph::Graph;
use anyhow::{bail, Context, Result};
use capnet_ipc::msg::MsgHalf;
use capnet_ipc::region::RegionRo;
use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapKind, Rights};
use capnet_kernel_shim::device::Device;
use capnet_kernel_shim::sandbox::{inspect_threads, StatsRegion};
use capnet_kernel_shim::spawn::{sibling_binary, spawn, Child, Limits, SpawnConfig};
use capnet_proto::frames::HalfGrant;
use capnet_proto::group::{recv_msg, send_msg, Control, Event, GroupSpec, WIRE};
use capnet_proto::report::GroupReport;
use capnet_proto::Kind;

use crate::control::{recv, send, socket_path, Reply, Request};
use crate::trust::check_binary;
use crate::{control, LOG_HEADER};

/// One group of the graph, running as a sandboxed `capnet-domain` process.
pub(crate) struct GroupProcess {
    pub(crate) name: String,
    /// Its domains' names.
    pub(crate) domains: Vec<String>,
    pub(crate) child: Child,
    /// Its stats region (the sandbox-violation word), read-only.
    pub(crate) stats: RegionRo,
    /// Its status region (its [`GroupReport`]), read-only.
    pub(crate) status: RegionRo,
    /// Its supervisor socket.
    pub(crate) sock: UnixStream,
    pub(crate) started: Instant,
    /// Times it was restarted.
    pub(crate) restarts: u32,
    /// Why it last ended.
    pub(crate) last_error: Option<String>,
    /// Events it sent while the supervisor waited for another answer.
    pub(crate) stash: std::cell::RefCell<Vec<Event>>,
}

impl GroupProcess {
    /// Waits for the event `want` picks, keeping the others for the main loop.
    pub(crate) fn expect(&self, want: impl Fn(&Event) -> bool) -> Result<Event> {
        loop {
            let e = recv_msg::<Event>(&self.sock)?;
            if want(&e) {
                return Ok(e);
            }
            self.stash.borrow_mut().push(e);
        }
    }

    /// Every event it sent that nobody waited for (without blocking).
    pub(crate) fn events(&self) -> Vec<Event> {
        let mut out = std::mem::take(&mut *self.stash.borrow_mut());
        let mut probe = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        while matches!(nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(&self.sock), &mut probe, flags), Ok(n) if n > 0)
        {
            match recv_msg::<Event>(&self.sock) {
                Ok(e) => out.push(e),
                Err(_) => break,
            }
        }
        out
    }

    /// Its latest report (empty if it has not published one or it is garbled).
    pub(crate) fn report(&self) -> GroupReport {
        capnet_ipc::blob::read(&self.status).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Why it ended, if it did.
    pub(crate) fn ended(&self) -> Option<capnet_kernel_shim::spawn::ExitCause> {
        self.child.try_wait(|| StatsRegion::violation(&self.stats)).ok().flatten()
    }
}

/// Channel sides as their makers sent them: (channel, group index) → fds (area
/// and pool of a message channel; pool, R area and T area of the frame channel).
pub(crate) type Sides = std::collections::BTreeMap<(String, usize), Vec<OwnedFd>>;

/// The running graph: every group, the supervisor's copy of the device, and what
/// a restart needs to start a group again.
pub(crate) struct Running {
    pub(crate) graph: Graph,
    pub(crate) groups: Vec<GroupProcess>,
    /// The group running the sockets domain.
    pub(crate) sockets: usize,
    /// The group running the driver.
    pub(crate) driver: usize,
    /// The supervisor's own handle on the TAP: it outlives a driver crash and is
    /// granted again to a restarted driver. None: the driver runs on an
    /// in-memory wire to another capnet instance.
    pub(crate) device: Option<Device>,
    /// On a wire: the namespace of the instance at its other end, once one joined.
    pub(crate) wire_peer: Option<String>,
    /// We joined the wire (`--wire-to`) rather than own it: we connect again.
    pub(crate) wire_joiner: bool,
    /// The spin-token count every group shares (a multi-writer region).
    pub(crate) spin_tokens: capnet_ipc::region::Region,
    pub(crate) vnet: bool,
    pub(crate) spec_base: GroupSpec,
    pub(crate) logs: std::path::PathBuf,
    /// A tcp domain swapped out, finishing the connections it had.
    pub(crate) draining: Option<Draining>,
    /// The programs swapped in, each opened and checked once
    /// ([`check_binary`]): every start of a domain whose graph entry names one
    /// goes through its fd, never its path again.
    pub(crate) programs: std::collections::BTreeMap<String, OwnedFd>,
    /// The driver's frame pool now (its side of the frame channel), granted
    /// read-only to every group whose tcp ip lends it buffers of.
    pub(crate) frame_pool: Option<OwnedFd>,
    /// Each attached application's send pool and the pool id the frame
    /// channel names it by, granted read-only to every group
    /// [`Running::views_sends`] (and again to one that restarts).
    pub(crate) app_pools: Vec<(u64, u16, OwnedFd)>,
    /// The alias the next application's pool is given (the next unused from here).
    pub(crate) next_alias: u16,
}

/// A tcp domain swapped out (`capnet swap tcp`): it keeps its process and its
/// channels until its last connection is finished.
pub(crate) struct Draining {
    pub(crate) process: GroupProcess,
    /// Its channels, each with the group at its other end.
    pub(crate) channels: Vec<(String, usize)>,
}

/// A wire side's fds as capabilities: its pool and two channel areas.
pub(crate) fn wire_caps(side: HalfGrant) -> Result<[Cap; 3]> {
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    Ok([
        Cap::new(CapKind::Pool, all, 0, side.pool)?,
        Cap::new(CapKind::ChannelEnd, all, 1, side.r_area)?,
        Cap::new(CapKind::ChannelEnd, all, 2, side.t_area)?,
    ])
}

/// A wire side as [`wire_caps`] sends it.
pub(crate) fn take_wire(conn: &UnixStream) -> Result<HalfGrant> {
    let caps = recv_caps(conn.as_fd())?;
    let kinds: Vec<CapKind> = caps.iter().map(|c| c.kind).collect();
    if kinds != [CapKind::Pool, CapKind::ChannelEnd, CapKind::ChannelEnd] {
        bail!("a wire side is a pool and two channel areas, not {kinds:?}");
    }
    let mut fds = caps.into_iter().map(Cap::into_fd);
    let mut next = || fds.next().ok_or_else(|| anyhow::anyhow!("a wire side is three capabilities"));
    Ok(HalfGrant { pool: next()?, r_area: next()?, t_area: next()? })
}

/// Whether a channel is the frame channel between driver and ip.
pub(crate) fn is_frames(l: Kind, r: Kind) -> bool {
    matches!((l, r), (Kind::Driver, Kind::Ip) | (Kind::Ip, Kind::Driver))
}

impl Running {
    /// Starts every group of `graph`: spawns it sandboxed, exchanges the regions
    /// and channel sides the groups made, grants the device, and waits until each
    /// says it is ready and every one of its threads is confined.
    pub(crate) fn start(
        graph: Graph,
        device: Option<Device>,
        spec_base: GroupSpec,
        logs: std::path::PathBuf,
    ) -> Result<Self> {
        let vnet = matches!(device.as_ref().map(Device::kind), Some(capnet_kernel_shim::device::DeviceKind::Tap(o)) if o.vnet_hdr);
        let position =
            |k: Kind| graph.groups.iter().position(|g| g.domains.iter().any(|d| kind_in(&graph, d) == Some(k)));
        let sockets = position(Kind::Sockets).ok_or_else(|| anyhow::anyhow!("no group runs the sockets domain"))?;
        let driver = position(Kind::Driver).ok_or_else(|| anyhow::anyhow!("no group runs the driver"))?;
        let mut r = Running {
            graph,
            groups: Vec::new(),
            sockets,
            driver,
            device,
            wire_peer: None,
            wire_joiner: false,
            spin_tokens: capnet_ipc::region::Region::create_multi_writer("capnet-spin-tokens", 64)?,
            vnet,
            spec_base,
            logs,
            draining: None,
            programs: Default::default(),
            frame_pool: None,
            app_pools: Vec::new(),
            next_alias: *capnet_proto::frames::APP_POOL_ALIASES.start(),
        };
        let mut sides = Sides::new();
        for gi in 0..r.graph.groups.len() {
            let p = r.spawn(gi, &mut sides, true)?;
            r.groups.push(p);
        }
        r.note_frame_pool(&sides)?;
        for gi in 0..r.groups.len() {
            r.grant(gi, &sides)?;
        }
        for gi in 0..r.groups.len() {
            r.await_ready(gi)?;
        }
        Ok(r)
    }

    /// Whether group `gi` may be lent the driver's frame buffers from another
    /// group: the driver and ip are apart (a frame channel lends ip the
    /// driver's buffers), and it runs tcp or the sockets domain without ip (ip
    /// lends them on to tcp, tcp to the sockets domain, which lends them on to
    /// its applications).
    pub(crate) fn borrows_frames(&self, gi: usize) -> bool {
        let frames = (0..self.graph.groups.len()).any(|g| self.runs(g, Kind::Ip) && !self.runs(g, Kind::Driver));
        frames && (self.runs(gi, Kind::Tcp) || self.runs(gi, Kind::Sockets)) && !self.runs(gi, Kind::Ip)
    }

    /// Whether group `gi` is lent buffers of the applications' send pools:
    /// it runs tcp or ip apart from the sockets domain (which lends them on
    /// to tcp, tcp to ip), or it is one end of the frame channel (ip lends
    /// them on to the driver, naming each by its alias).
    pub(crate) fn views_sends(&self, gi: usize) -> bool {
        (!self.runs(gi, Kind::Sockets) && (self.runs(gi, Kind::Tcp) || self.runs(gi, Kind::Ip)))
            || self.runs(gi, Kind::Ip) != self.runs(gi, Kind::Driver)
    }

    /// The groups [`Running::views_sends`], the driver's first (ip may lend
    /// it a pool as soon as ip views it).
    fn send_viewers(&self) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.groups.len()).filter(|&g| self.views_sends(g)).collect();
        v.sort_by_key(|&g| g != self.driver);
        v
    }

    /// Grants group `gi` a view of application `app`'s send pool `pool`
    /// (`alias` on the frame channel) and waits until it took it.
    fn grant_app_pool(&self, gi: usize, app: u64, alias: u16, pool: &OwnedFd) -> Result<()> {
        let g = &self.groups[gi];
        send_msg(&g.sock, &Control::AppPool { app, alias })?;
        let cap = Cap::new(CapKind::Pool, Rights::READ | Rights::MAP | Rights::GRANT, 0, pool.try_clone()?)?;
        send_caps(g.sock.as_fd(), &[(&cap, Rights::READ | Rights::MAP)])?;
        g.expect(|e| matches!(e, Event::Relinked(x) if x == capnet_proto::group::APP_POOL))
            .with_context(|| format!("group {} did not take application {app}'s send pool", g.name))?;
        Ok(())
    }

    /// Application `app` attaches with send pool `pool`: every group lent
    /// its buffers views it first (the sockets domain is granted the
    /// application only after this).
    pub(crate) fn app_pool_granted(&mut self, app: u64, pool: OwnedFd) -> Result<()> {
        let aliases = capnet_proto::frames::APP_POOL_ALIASES;
        let after = |a: u16| if a == *aliases.end() { *aliases.start() } else { a + 1 };
        let mut alias = self.next_alias;
        while self.app_pools.iter().any(|(_, a, _)| *a == alias) {
            alias = after(alias);
        }
        self.next_alias = after(alias);
        // Recorded first: a grant that fails half-way is taken back by app_pool_gone.
        self.app_pools.push((app, alias, pool.try_clone()?));
        for gi in self.send_viewers() {
            self.grant_app_pool(gi, app, alias, &pool)?;
        }
        Ok(())
    }

    /// Application `app` is gone (or never attached): the groups viewing its
    /// send pool forget it.
    pub(crate) fn app_pool_gone(&mut self, app: u64) {
        self.app_pools.retain(|(a, _, _)| *a != app);
        // The driver last: ip stops lending the pool before the driver lets go.
        for g in self.send_viewers().into_iter().rev() {
            let _ = send_msg(&self.groups[g].sock, &Control::AppPoolGone(app));
        }
    }

    /// A (re)started group `gi` lent send-pool buffers views every
    /// application's pool before its channels are joined.
    fn grant_app_pools(&self, gi: usize) -> Result<()> {
        if self.views_sends(gi) {
            for (app, alias, pool) in &self.app_pools {
                self.grant_app_pool(gi, *app, *alias, pool)?;
            }
        }
        Ok(())
    }

    /// Keeps the driver's side of the frame channel in `sides` (made at a
    /// start or a restart) as the frame pool; whether there was one.
    pub(crate) fn note_frame_pool(&mut self, sides: &Sides) -> Result<bool> {
        let Some((c, _, _)) = self.links_of(self.driver).into_iter().find(|(_, l, r)| is_frames(*l, *r)) else {
            return Ok(false);
        };
        match sides.get(&(c, self.driver)).and_then(|fds| fds.first()) {
            Some(pool) => {
                self.frame_pool = Some(pool.try_clone()?);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The channels that leave group `gi`, in graph order: (channel, local kind, remote kind).
    pub(crate) fn links_of(&self, gi: usize) -> Vec<(String, Kind, Kind)> {
        let (g, group) = (&self.graph, &self.graph.groups[gi]);
        g.channels
            .iter()
            .filter(|ch| g.crosses(ch))
            .filter_map(|ch| {
                let (mine, theirs) = if group.domains.contains(&ch.ends[0]) {
                    (&ch.ends[0], &ch.ends[1])
                } else if group.domains.contains(&ch.ends[1]) {
                    (&ch.ends[1], &ch.ends[0])
                } else {
                    return None;
                };
                Some((ch.name.clone(), kind_in(g, mine)?, kind_in(g, theirs)?))
            })
            .collect()
    }

    /// The group at the other end of channel `ch` from group `gi`.
    pub(crate) fn peer_of(&self, gi: usize, ch: &str) -> Option<usize> {
        let c = self.graph.channels.iter().find(|x| x.name == ch)?;
        let group = &self.graph.groups[gi];
        let other = c.ends.iter().find(|e| !group.domains.contains(e))?;
        self.graph.groups.iter().position(|g| g.domains.contains(other))
    }

    pub(crate) fn runs(&self, gi: usize, k: Kind) -> bool {
        self.graph.groups[gi].domains.iter().any(|d| kind_in(&self.graph, d) == Some(k))
    }

    /// Spawns group `gi` and takes the regions and channel sides it made.
    pub(crate) fn spawn(&self, gi: usize, sides: &mut Sides, first: bool) -> Result<GroupProcess> {
        let group = &self.graph.groups[gi];
        let links = self.links_of(gi);
        let spec = GroupSpec {
            name: group.name.clone(),
            domains: group
                .domains
                .iter()
                .filter_map(|d| Some((d.clone(), kind_in(&self.graph, d)?.name().to_owned())))
                .collect(),
            links: links.iter().map(|(c, l, r)| (c.clone(), l.name().to_owned(), r.name().to_owned())).collect(),
            seccomp: group.sandbox.seccomp.clone(),
            vnet: self.vnet,
            frame_pool: self.borrows_frames(gi),
            ..self.spec_base.clone()
        };
        let binary = self.graph.domains.iter().find(|d| group.domains.contains(&d.name)).map(|d| d.binary.clone());
        let binary = binary.ok_or_else(|| anyhow::anyhow!("group {} has no domain", group.name))?;
        let program = if binary.contains('/') {
            std::path::PathBuf::from(&binary)
        } else {
            sibling_binary(&binary).with_context(|| format!("{binary} is not installed next to capnet"))?
        };
        // A swapped-in program runs from the fd checked at the swap; the graph's
        // own (its file, or beside capnet) is opened now.
        let image = match self.programs.get(&binary) {
            Some(fd) => fd.try_clone()?,
            None => std::fs::File::open(&program).with_context(|| format!("opening {}", program.display()))?.into(),
        };
        let (ours, theirs) = UnixStream::pair()?;
        let sb = &group.sandbox;
        // Its log: standard output and error, kept by the supervisor (`capnet logs`).
        let log_path = self.logs.join(format!("{}.log", group.name));
        let new_log = !log_path.exists();
        let mut log = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(&log_path)?;
        if new_log {
            writeln!(log, "{LOG_HEADER}{}: {}", group.name, group.domains.join(" "))?;
        }
        let mut env = vec![("RUST_BACKTRACE".to_owned(), "1".to_owned())];
        // The test-only hostile mode exists in builds with the `hostile` feature alone, and acts in a
        // domain's first life only (its restart is the cure).
        if cfg!(feature = "hostile") && first {
            if let Ok(v) = std::env::var("CAPNET_HOSTILE") {
                env.push(("CAPNET_HOSTILE".into(), v));
            }
        }
        let cfg = SpawnConfig {
            program,
            args: vec![group.name.clone()],
            env,
            namespaces: sb.namespaces,
            uid: sb.uid,
            limits: Limits { address_space: sb.address_space_mib.map(|m| m << 20), open_files: sb.nofile },
            fds: vec![theirs.into()],
            log: Some(log.into()),
            image: Some(image),
        };
        let child = spawn(&cfg).with_context(|| format!("starting group {}", group.name))?;
        ours.set_read_timeout(Some(Duration::from_secs(10)))?;
        send_msg(&ours, &spec)?;
        let mut got = recv_caps(ours.as_fd())
            .with_context(|| format!("group {} did not send its regions", group.name))?
            .into_iter()
            .map(Cap::into_fd);
        let mut next = || got.next().ok_or_else(|| anyhow::anyhow!("group {} sent too few capabilities", group.name));
        let (stats, status) = (next()?, next()?);
        for (c, l, r) in links.iter().filter(|(_, l, r)| !is_frames(*l, *r)) {
            let _ = (l, r);
            sides.insert((c.clone(), gi), vec![next()?, next()?]);
        }
        if let Some((c, _, _)) = links.iter().find(|(_, l, r)| is_frames(*l, *r)) {
            sides.insert((c.clone(), gi), vec![next()?, next()?, next()?]);
        }
        Ok(GroupProcess {
            name: group.name.clone(),
            domains: group.domains.clone(),
            child,
            stats: StatsRegion::attach(stats)?,
            status: RegionRo::attach(status, capnet_proto::group::STATUS_LEN)?,
            sock: ours,
            started: Instant::now(),
            restarts: 0,
            last_error: None,
            stash: Default::default(),
        })
    }

    /// Sends group `gi` the device (if it drives it) and the other side of each of
    /// its channels, as the peer group made it, read-only.
    pub(crate) fn grant(&self, gi: usize, sides: &Sides) -> Result<()> {
        let (ro, all) = (Rights::READ | Rights::MAP, Rights::READ | Rights::MAP | Rights::GRANT);
        // The spin tokens first: every group waits with them.
        let rwm = Rights::READ | Rights::WRITE | Rights::MAP;
        let tokens = self.spin_tokens.fd().try_clone_to_owned()?;
        let mut caps = vec![(Cap::new(CapKind::Region, rwm | Rights::GRANT, 7, tokens)?, rwm)];
        if let (true, Some(device)) = (self.runs(gi, Kind::Driver), &self.device) {
            let rw = Rights::READ | Rights::WRITE | Rights::GRANT;
            let dev = device.fd().try_clone_to_owned()?;
            caps.push((Cap::new(CapKind::Device, rw, u32::from(self.vnet), dev)?, Rights::READ | Rights::WRITE));
        }
        let links = self.links_of(gi);
        // Message channels first, then the frame channel: the order the group takes them in.
        let ordered = links
            .iter()
            .filter(|(_, l, r)| !is_frames(*l, *r))
            .chain(links.iter().filter(|(_, l, r)| is_frames(*l, *r)));
        for (c, l, r) in ordered {
            let pj = self.peer_of(gi, c).ok_or_else(|| anyhow::anyhow!("channel {c} has no peer group"))?;
            let fds =
                sides.get(&(c.clone(), pj)).ok_or_else(|| anyhow::anyhow!("no side of channel {c} from its peer"))?;
            let kinds: &[CapKind] = if is_frames(*l, *r) {
                &[CapKind::Pool, CapKind::ChannelEnd, CapKind::ChannelEnd]
            } else {
                &[CapKind::ChannelEnd, CapKind::Pool]
            };
            for (k, fd) in kinds.iter().zip(fds) {
                caps.push((Cap::new(*k, all, 0, fd.try_clone()?)?, ro));
            }
        }
        if self.borrows_frames(gi) {
            let pool = self.frame_pool.as_ref().ok_or_else(|| anyhow::anyhow!("no frame pool to grant"))?;
            caps.push((Cap::new(CapKind::Pool, all, 0, pool.try_clone()?)?, ro));
        }
        send_caps(self.groups[gi].sock.as_fd(), &caps.iter().map(|(c, r)| (c, *r)).collect::<Vec<_>>())?;
        Ok(())
    }

    /// Grants every group `set` does not hold that borrows frames the
    /// frame pool made again, and waits until each took it.
    pub(crate) fn renew_frame_pool(&self, outside: &[usize]) -> Result<()> {
        let Some(pool) = self.frame_pool.as_ref() else { return Ok(()) };
        let (all, ro) = (Rights::READ | Rights::MAP | Rights::GRANT, Rights::READ | Rights::MAP);
        for &h in outside.iter().filter(|&&h| self.borrows_frames(h)) {
            let g = &self.groups[h];
            send_msg(&g.sock, &Control::FramePool)?;
            let cap = Cap::new(CapKind::Pool, all, 0, pool.try_clone()?)?;
            send_caps(g.sock.as_fd(), &[(&cap, ro)])?;
            g.expect(|e| matches!(e, Event::Relinked(x) if x == capnet_proto::group::FRAME_POOL))
                .with_context(|| format!("group {} did not take the new frame pool", g.name))?;
        }
        Ok(())
    }

    /// A fresh side of the in-memory wire: blank regions the group running the
    /// driver adopts (and seals). Returns their fds, to grant the peer read-only.
    pub(crate) fn wire_side(&self) -> Result<HalfGrant> {
        let mut fds = self.offer_blanks(self.driver, &Control::WireSide, true)?.into_iter();
        let mut next = || fds.next().ok_or_else(|| anyhow::anyhow!("a wire side is three regions"));
        Ok(HalfGrant { pool: next()?, r_area: next()?, t_area: next()? })
    }

    /// Grants the driver the wire's peer side (read-only) and waits until it joined it.
    pub(crate) fn wire_join(&self, peer: HalfGrant) -> Result<()> {
        let g = &self.groups[self.driver];
        send_msg(&g.sock, &Control::WirePeer)?;
        send_caps(
            g.sock.as_fd(),
            &wire_caps(peer)?.iter().map(|c| (c, Rights::READ | Rights::MAP)).collect::<Vec<_>>(),
        )?;
        g.expect(|e| matches!(e, Event::Joined(x) if x == WIRE)).context("the driver did not join the wire's peer")?;
        Ok(())
    }

    /// Joins the wire of the instance in namespace `peer` (after `up --wire-to`,
    /// or after our driver restarted): a fresh side of ours for it, a fresh side
    /// of its for us.
    pub(crate) fn wire_connect(&mut self, ours: &str, peer: &str) -> Result<()> {
        let side = self.wire_side()?;
        let path = socket_path(peer);
        let conn = capnet::attach::connect_trusted(&path)
            .with_context(|| format!("no capnet instance is up in namespace {peer} to join its wire"))?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        send(&conn, &Request::Wire { from: ours.to_owned() })?;
        send_caps(conn.as_fd(), &wire_caps(side)?.iter().map(|c| (c, Rights::READ | Rights::MAP)).collect::<Vec<_>>())?;
        match recv(&conn)? {
            Reply::Ok => {}
            Reply::Refused(why) => bail!("the instance in {peer} refused the wire: {why}"),
            other => bail!("the instance in {peer} answered {other:?}"),
        }
        self.wire_join(take_wire(&conn)?)?;
        self.wire_peer = Some(peer.to_owned());
        self.wire_joiner = true;
        Ok(())
    }

    /// Gives the wire fresh sides at both ends (our driver restarted, or one
    /// dropped a peer that broke it). Only the instance that joined the wire
    /// (`--wire-to`) connects: the one that owns it asks that one to, from a
    /// thread of its own, so neither supervisor ever waits on the other's loop
    /// while the other waits on its own.
    pub(crate) fn rewire(&mut self, ours: &str) {
        let Some(peer) = self.wire_peer.clone() else { return };
        if self.wire_joiner {
            if let Err(e) = self.wire_connect(ours, &peer) {
                eprintln!("capnet: joining the wire to {peer} again failed: {e:#}; it stays down");
            }
        } else {
            std::thread::spawn(move || {
                if let Err(e) = control::ask(&peer, &Request::WireAgain) {
                    eprintln!("capnet: asking {peer} to join the wire again failed: {e:#}");
                }
            });
        }
    }

    /// Serves another instance joining our wire (`Request::Wire` on `conn`, its
    /// side following): a fresh side of ours in exchange.
    pub(crate) fn wire_accept(&mut self, from: &str, conn: &UnixStream) -> Result<()> {
        if self.device.is_some() {
            bail!("this instance runs on a TAP, not an in-memory wire (start it with --wire)");
        }
        let theirs = take_wire(conn)?;
        let side = self.wire_side()?;
        self.wire_join(theirs)?;
        send(conn, &Reply::Ok)?;
        send_caps(conn.as_fd(), &wire_caps(side)?.iter().map(|c| (c, Rights::READ | Rights::MAP)).collect::<Vec<_>>())?;
        self.wire_peer = Some(from.to_owned());
        Ok(())
    }

    /// Waits until group `gi` says it is ready, then checks every thread and fd.
    pub(crate) fn await_ready(&self, gi: usize) -> Result<()> {
        let p = &self.groups[gi];
        match recv_msg::<Event>(&p.sock) {
            Ok(Event::Ready) => {}
            Ok(e) => bail!("group {} answered {e:?} instead of being ready", p.name),
            Err(e) => {
                // It may be exiting: give it a moment to say why.
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    if let Some(cause) = p.ended() {
                        bail!("group {} ({}) died during setup: {cause}", p.name, p.domains.join(" + "));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                bail!("group {} did not come up: {e:#}", p.name)
            }
        }
        // Ready only once every thread shows the sandbox (DESIGN, "Sandboxes").
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let threads = inspect_threads(p.child.pid()).unwrap_or_default();
            if !threads.is_empty() && threads.iter().all(|t| t.confined()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("group {} did not confine all its threads within 10 s: {threads:?}", p.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(bad) = unexplained_fd(p.child.pid(), self.runs(gi, Kind::Driver)) {
            bail!("group {} holds {bad}, which no grant explains: refusing to report the graph up", p.name);
        }
        p.sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(())
    }

    /// The groups to restart when `gi` died: just it (every neighbour, the
    /// driver's threads included, joins a fresh channel in place).
    pub(crate) fn restart_set(&self, gi: usize) -> Vec<usize> {
        vec![gi]
    }

    /// Restarts the groups of `set` with fresh channels: the groups outside that
    /// shared a channel with them adopt new sides of it, the new processes get
    /// those, and the old sides' users learn what state they lost.
    pub(crate) fn restart(&mut self, set: &[usize], cause: &str) -> Result<()> {
        // What the others lost with them.
        // (UDP sockets are bound again on the new udp domain once it is joined.)
        let lost: Vec<(Kind, &str)> = [(Kind::Tcp, "tcp"), (Kind::Ip, "echo")]
            .into_iter()
            .filter(|(k, _)| set.iter().any(|&s| self.runs(s, *k)))
            .collect();
        let outside: Vec<usize> = (0..self.groups.len()).filter(|g| !set.contains(g)).collect();
        for &h in &outside {
            if self.runs(h, Kind::Sockets) {
                for (_, what) in &lost {
                    send_msg(&self.groups[h].sock, &Control::Lost((*what).into()))?;
                }
            }
            if set.iter().any(|&s| self.runs(s, Kind::Sockets)) && (self.runs(h, Kind::Tcp) || self.runs(h, Kind::Udp))
            {
                send_msg(&self.groups[h].sock, &Control::Lost("sockets".into()))?;
            }
        }
        // Fresh sides of every channel between the set and the rest. A group
        // that was lent frame buffers dies with what it lent on (to the sockets
        // domain, to applications) still being read: the frame channel is made
        // again too, so the driver never writes into the old pool again (its
        // readers keep their mapping of it until they let go).
        let renew = set.iter().any(|&s| self.borrows_frames(s));
        let mut sides = Sides::new();
        let mut relinked = Vec::new();
        for &h in &outside {
            for (c, l, r) in self.links_of(h) {
                let frames_again = renew && is_frames(l, r);
                if !frames_again && !self.peer_of(h, &c).is_some_and(|p| set.contains(&p)) {
                    continue;
                }
                let blanks = self.offer_blanks(h, &Control::Relink(c.clone()), is_frames(l, r))?;
                sides.insert((c.clone(), h), blanks);
                relinked.push((h, c, is_frames(l, r)));
            }
        }
        // The frame channel is joined first: until ip holds the new one, a
        // loan it gives back (its links to the dead being dropped at their
        // join) could reach the driver on the old pool, still being read.
        relinked.sort_by_key(|(_, _, frames)| !frames);
        // Only now the old processes go (a swapped one was still serving until
        // its neighbours stopped waiting on it).
        for &s in set {
            let _ = self.groups[s].child.kill();
        }
        let first = self.groups[set[0]].domains.join("+");
        for &s in set {
            let mut p = self.spawn(s, &mut sides, false)?;
            p.restarts = self.groups[s].restarts + 1;
            // The first of the set is why; the others come along.
            p.last_error =
                Some(if s == set[0] { cause.to_owned() } else { format!("restarted with {first} ({cause})") });
            self.groups[s] = p;
        }
        // A driver, ip or a group lent frames restarted: the driver's pool is
        // made again, and the groups ip lends its buffers take a view of it
        // before any is lent.
        let renewed = self.note_frame_pool(&sides)?;
        for &s in set {
            self.grant(s, &sides)?;
        }
        for &s in set {
            self.await_ready(s)?;
            self.grant_app_pools(s)?;
        }
        if renewed {
            self.renew_frame_pool(&outside)?;
        }
        for (h, c, _) in relinked {
            self.join_peer(h, &c, &sides)?;
        }
        Ok(())
    }

    /// Sends group `h` blank regions for its side of a fresh channel, with the
    /// control message saying why (`Relink`, `Beside` or `WireSide`), and waits until it has
    /// adopted them; returns them (the new peer is granted them read-only).
    pub(crate) fn offer_blanks(&self, h: usize, why: &Control, frames: bool) -> Result<Vec<OwnedFd>> {
        let rw = Rights::READ | Rights::WRITE | Rights::MAP | Rights::GRANT;
        let c = match why {
            Control::Relink(c) | Control::Beside(c) => c.as_str(),
            Control::WireSide => WIRE,
            _ => bail!("blank regions offered for {why:?}"),
        };
        let blanks: Vec<OwnedFd> = if frames {
            let g = HalfGrant::blank("stack")?;
            vec![g.pool, g.r_area, g.t_area]
        } else {
            let g = MsgHalf::blank(&format!("capnet-{c}"))?;
            vec![g.area, g.pool]
        };
        let sock = &self.groups[h].sock;
        send_msg(sock, why)?;
        let caps = blanks
            .iter()
            .map(|fd| Cap::new(CapKind::Blank, rw, 0, fd.try_clone()?).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>>>()?;
        send_caps(sock.as_fd(), &caps.iter().map(|c| (c, rw)).collect::<Vec<_>>())?;
        self.groups[h].expect(|e| matches!(e, Event::Relinked(x) if x == c))?;
        Ok(blanks)
    }

    /// Grants group `h` the new peer's side of channel `c` (from `sides`) and
    /// waits until it has joined it.
    pub(crate) fn join_peer(&self, h: usize, c: &str, sides: &Sides) -> Result<()> {
        let s = self.peer_of(h, c).ok_or_else(|| anyhow::anyhow!("channel {c} has no peer"))?;
        let (l, r) = self
            .links_of(h)
            .into_iter()
            .find(|(x, _, _)| x == c)
            .map(|(_, l, r)| (l, r))
            .ok_or_else(|| anyhow::anyhow!("group {} has no channel {c}", self.groups[h].name))?;
        let fds = sides.get(&(c.to_owned(), s)).ok_or_else(|| anyhow::anyhow!("no new side of {c}"))?;
        let kinds: &[CapKind] = if is_frames(l, r) {
            &[CapKind::Pool, CapKind::ChannelEnd, CapKind::ChannelEnd]
        } else {
            &[CapKind::ChannelEnd, CapKind::Pool]
        };
        let all = Rights::READ | Rights::MAP | Rights::GRANT;
        let caps = kinds
            .iter()
            .zip(fds)
            .map(|(k, fd)| Cap::new(*k, all, 0, fd.try_clone()?).map_err(anyhow::Error::from))
            .collect::<Result<Vec<_>>>()?;
        let sock = &self.groups[h].sock;
        send_msg(sock, &Control::Peer(c.to_owned()))?;
        send_caps(sock.as_fd(), &caps.iter().map(|c| (c, Rights::READ | Rights::MAP)).collect::<Vec<_>>())?;
        self.groups[h].expect(|e| matches!(e, Event::Joined(x) if x == c))?;
        Ok(())
    }

    /// `capnet swap tcp`: starts the new tcp domain beside the old one (group
    /// `gi`). The sockets domain joins it first (its listeners listen there
    /// too), then ip, which from then on sends it every new connection while
    /// the old domain keeps the flows it names; the old one is stopped once it
    /// says its last connection is finished ([`Running::finish_drain`]).
    pub(crate) fn swap_tcp(&mut self, gi: usize, binary: &str) -> Result<()> {
        if let Some(d) = &self.draining {
            bail!(
                "the last tcp swap is still finishing: the old tcp domain (pid {}) holds connections; swap again once it has exited",
                d.process.child.pid()
            );
        }
        let mut channels: Vec<(String, usize)> =
            self.links_of(gi).into_iter().filter_map(|(c, _, _)| Some((c.clone(), self.peer_of(gi, &c)?))).collect();
        channels.sort_by_key(|(_, h)| !self.runs(*h, Kind::Sockets));
        let mut sides = Sides::new();
        for (c, h) in &channels {
            let blanks = self.offer_blanks(*h, &Control::Beside(c.clone()), false)?;
            sides.insert((c.clone(), *h), blanks);
        }
        let domain = self.groups[gi].domains[0].clone();
        let entry = self
            .graph
            .domains
            .iter_mut()
            .find(|d| d.name == domain)
            .ok_or_else(|| anyhow::anyhow!("no domain {domain} in the graph"))?;
        let previous = std::mem::replace(&mut entry.binary, binary.to_owned());
        let started = self.spawn(gi, &mut sides, false).map(|mut p| {
            p.restarts = self.groups[gi].restarts;
            p
        });
        let back = |r: &mut Self| {
            if let Some(d) = r.graph.domains.iter_mut().find(|d| d.name == domain) {
                d.binary = previous.clone();
            }
        };
        let p = match started {
            Ok(p) => p,
            Err(e) => {
                back(self);
                return Err(e.context("the new tcp domain did not start; the old one keeps serving"));
            }
        };
        let old = std::mem::replace(&mut self.groups[gi], p);
        if let Err(e) =
            self.grant(gi, &sides).and_then(|()| self.await_ready(gi)).and_then(|()| self.grant_app_pools(gi))
        {
            let _ = self.groups[gi].child.kill();
            self.groups[gi] = old;
            back(self);
            return Err(e.context("the new tcp domain did not come up; the old one keeps serving"));
        }
        for (c, h) in &channels {
            self.join_peer(*h, c, &sides)?;
        }
        eprintln!(
            "capnet: tcp swapped for {binary} (pid {}); the old domain (pid {}) finishes its connections",
            self.groups[gi].child.pid(),
            old.child.pid()
        );
        self.draining = Some(Draining { process: old, channels });
        Ok(())
    }

    /// Ends a tcp swap: the neighbours drop the old domain's channels (and any
    /// connection still there is reset), and its process is stopped.
    pub(crate) fn finish_drain(&mut self, why: &str) {
        let Some(d) = self.draining.take() else { return };
        eprintln!("capnet: the swapped-out tcp domain (pid {}) is stopped: {why}", d.process.child.pid());
        for (c, h) in &d.channels {
            let _ = send_msg(&self.groups[*h].sock, &Control::Retired(c.clone()));
        }
        let _ = d.process.child.kill();
    }
}

/// A change asked for on the control socket.
pub(crate) enum Change {
    /// `capnet restart DOMAIN`.
    Restart(String),
    /// `capnet swap DOMAIN --with BINARY`.
    Swap(String, String),
    /// Another instance joins our in-memory wire (from its namespace).
    Wire(String),
    /// The instance that owns the wire asks us to join it again.
    WireAgain,
}

impl Running {
    /// Checks a requested change; gives the group to restart and why (none
    /// for a tcp swap, done here). A swap also changes the domain's program in
    /// the graph (later restarts keep it).
    pub(crate) fn change(&mut self, change: &Change) -> Result<Option<(usize, String)>> {
        let (domain, binary) = match change {
            Change::Restart(d) => (d, None),
            Change::Swap(d, b) => (d, Some(b)),
            Change::Wire(_) | Change::WireAgain => bail!("a wire is joined with its connection, not as a change"),
        };
        let gi = self
            .groups
            .iter()
            .position(|g| g.domains.contains(domain))
            .ok_or_else(|| anyhow::anyhow!("there is no domain {domain:?}"))?;
        let Some(binary) = binary else { return Ok(Some((gi, "restarted on request".into()))) };
        let kind = kind_in(&self.graph, domain);
        match kind {
            Some(Kind::Udp | Kind::Tcp) => {}
            Some(k) => bail!("swapping the {k} domain is not supported: tcp and udp can be swapped"),
            None => bail!("there is no domain {domain:?}"),
        }
        if self.groups[gi].domains.len() != 1 {
            bail!(
                "{domain} shares its process with {}: a swap replaces one domain's process",
                self.groups[gi].domains.join(", ")
            );
        }
        let image = check_binary(binary)?;
        self.programs.insert(binary.clone(), image);
        if kind == Some(Kind::Tcp) {
            self.swap_tcp(gi, binary)?;
            return Ok(None);
        }
        if let Some(d) = self.graph.domains.iter_mut().find(|d| d.name == *domain) {
            d.binary = binary.clone();
        }
        Ok(Some((gi, format!("swapped for {binary}"))))
    }
}

/// The kind of domain `d` in `graph`.
pub(crate) fn kind_in(graph: &Graph, d: &str) -> Option<Kind> {
    graph.domains.iter().find(|x| x.name == d).map(|x| x.kind)
}

/// An fd of process `pid` that its grants do not explain, if any: it may hold
/// its standard streams, one socket (its supervisor socket), capnet memfd
/// regions, and — if it runs the driver — the TAP.
pub(crate) fn unexplained_fd(pid: i32, drives: bool) -> Option<String> {
    let mut sockets = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let n: i32 = fd.file_name().to_string_lossy().parse().unwrap_or(-1);
        let target = std::fs::read_link(fd.path()).map(|t| t.display().to_string()).unwrap_or_default();
        let ok = match n {
            0..=2 => true,
            _ if target.starts_with("socket:") => {
                sockets += 1;
                sockets == 1
            }
            _ => target.starts_with("/memfd:capnet-") || (drives && target == "/dev/net/tun"),
        };
        if !ok {
            return Some(format!("fd {n} → {target}"));
        }
    }
    None
}
