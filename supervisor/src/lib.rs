//! `capnet up` and `capnet down`: the supervisor's life cycle.
//!
//! `up` reads the domain graph (a file, or a built-in one), makes the private
//! namespace with the TAP, starts every group as a sandboxed `capnet-domain`
//! process (`capnet_group`), passes each the capabilities the graph grants it,
//! and reports the stack up only once every thread of every group is confined.
//! It then serves the control socket (status, down) and the application socket
//! (each application gets its own channel to the sockets domain), and gathers
//! each group's report from a region it maps read-only. What `up` makes — the
//! namespace (and with it the TAP), the run directory with the sockets, pid file
//! and log, the group processes — `down` removes, also after a crash or a
//! `kill -9` of the supervisor.

pub mod control;
pub mod graph;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capnet_ipc::msg::{MsgGrant, MsgHalf};
use capnet_ipc::region::RegionRo;
use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapKind, Rights};
use capnet_kernel_shim::device::Device;
use capnet_kernel_shim::sandbox::{inspect_threads, StatsRegion};
use capnet_kernel_shim::spawn::{sibling_binary, spawn, Child, Limits, SpawnConfig};
use capnet_kernel_shim::{netns, userns};
use capnet_proto::group::{recv_msg, send_msg, Control, Event, GroupSpec, WIRE};
use capnet_proto::report::{Domain, GroupReport, Status};
use capnet_proto::Kind;
use capnet_runtime::two_group::{HalfGrant, StackHalf};
use graph::Graph;

use clap::Args;
use control::{recv, run_dir, send, socket_path, Reply, Request};
use graph::parse_cidr;

/// Which running stack.
#[derive(Debug, Args, Clone)]
pub struct Target {
    /// The network namespace the stack runs in.
    #[arg(long, default_value = "capnet")]
    pub netns: String,
}

/// `up`'s options.
#[derive(Debug, Args, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub target: Target,
    /// The domain graph to run (docs/graph.md); the built-in default graph —
    /// every domain its own sandboxed process — when none is given.
    #[arg(conflicts_with_all = ["mono", "two_group"])]
    pub graph: Option<std::path::PathBuf>,
    /// The TAP device inside the namespace [default: the graph's, else cap0].
    #[arg(long)]
    pub tap: Option<String>,
    /// No TAP: the driver runs on an in-memory wire that another capnet
    /// instance joins with `--wire-to` (two stacks with no device between them).
    #[arg(long, conflicts_with_all = ["tap", "wire_to"])]
    pub wire: bool,
    /// No TAP: join the in-memory wire of the instance in namespace NETNS
    /// (started with `--wire`); the addresses default to the other way round.
    #[arg(long, value_name = "NETNS", conflicts_with = "tap")]
    pub wire_to: Option<String>,
    /// The kernel's address on the TAP (the peer), with prefix length
    /// [default: the graph's, else 10.77.0.1/24].
    #[arg(long, value_parser = parse_cidr)]
    pub host_addr: Option<(Ipv4Addr, u8)>,
    /// The stack's address, with prefix length [default: the graph's, else 10.77.0.2/24].
    #[arg(long, value_parser = parse_cidr)]
    pub addr: Option<(Ipv4Addr, u8)>,
    /// The one-group graph: every domain in one sandboxed process.
    #[arg(long, conflicts_with = "two_group")]
    pub mono: bool,
    /// The two-group graph: the driver | ip + tcp + udp + sockets.
    #[arg(long)]
    pub two_group: bool,
    /// Detach: return once the stack is up, leaving it running.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Seeded loss on the link, each way (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Seeded reordering on the link, each way (0 to 1): a frame held back 1 ms.
    #[arg(long, default_value_t = 0.0)]
    pub reorder: f64,
    /// The tcp domain's congestion control for new connections (newreno, cubic);
    /// a socket may choose its own.
    #[arg(long, default_value = "newreno")]
    pub tcp_cc: capnet_tcp::cc::Algorithm,
    /// MiB the tcp domain may buffer for all its connections together (queued
    /// to send, received and unread): past it, sends wait and windows close.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub tcp_memory_mib: u32,
    /// Zero-window probes a connection its application closed sends, without
    /// the window opening by a segment, before it resets (Linux's
    /// tcp_orphan_retries).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=30))]
    pub tcp_orphan_retries: u32,
    /// Seed of the impairment.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Removes what `up` made when dropped.
struct Made {
    netns: String,
    /// A named namespace was made (privileged mode); unprivileged, the
    /// namespace is the supervisor's own and ends with it.
    named: bool,
}

impl Drop for Made {
    fn drop(&mut self) {
        if self.named {
            let _ = netns::delete(&self.netns);
        }
        let _ = std::fs::remove_dir_all(run_dir(&self.netns));
    }
}

/// Runs `ip ARGS` in the stack's namespace: the named one `netns`, or
/// (unprivileged) the supervisor's own.
fn ip_cmd(netns: Option<&str>, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(netns.map(|n| ["-n", n]).into_iter().flatten())
        .args(args)
        .output()
        .context("running `ip` (iproute2) to configure the kernel side of the TAP")?;
    if !out.status.success() {
        bail!("ip {} {}: {}", netns.unwrap_or(""), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX << (32 - u32::from(prefix));
    u32::from(a) & mask == u32::from(b) & mask
}

/// `capnet up`.
pub fn up(args: UpArgs) -> Result<()> {
    // The graph first: a bad one is refused before anything is made.
    let graph = load_graph(&args)?;
    let (_, (host, host_prefix), (addr, prefix)) = addressing(&args, &graph);
    if host == addr {
        bail!("the host address and the stack's are both {addr}: the kernel and the stack need addresses of their own");
    }
    if host_prefix != prefix || !same_subnet(host, addr, prefix) {
        bail!("the host address {host}/{host_prefix} and the stack's {addr}/{prefix} must be on one subnet");
    }
    for (name, p) in [("--loss", args.loss), ("--reorder", args.reorder)] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} {p} is not a probability between 0 and 1");
        }
    }
    netns::path(&args.target.netns)?;
    if let Some(peer) = &args.wire_to {
        netns::path(peer)?;
        if *peer == args.target.netns {
            bail!("--wire-to {peer}: an instance cannot join its own wire");
        }
    }
    if control::ask(&args.target.netns, &Request::Status).is_ok() {
        bail!("capnet is already up in namespace {0}: `capnet status --netns {0}` shows it", args.target.netns);
    }
    if userns::privileged() && netns::exists(&args.target.netns) {
        bail!(netns::NetnsError::Exists(args.target.netns.clone()));
    }
    if args.detach {
        return detach(&args);
    }
    run(args, graph)
}

/// Starts the supervisor in the background and returns once it answers.
fn detach(args: &UpArgs) -> Result<()> {
    let dir = control::make_run_dir(&args.target.netns)?;
    let log_path = dir.join("log");
    let log = std::fs::File::create(&log_path)?;
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "-d" && a != "--detach").collect();
    let mut child = Command::new(std::env::current_exe()?)
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the supervisor in the background")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_dir_all(&dir);
            bail!("the supervisor exited ({status}): {}", log.trim());
        }
        if control::ask(&args.target.netns, &Request::Status).is_ok() {
            println!(
                "capnet up (pid {}) in namespace {}: log in {}",
                child.id(),
                args.target.netns,
                log_path.display()
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    bail!("the supervisor did not come up within 20 s; see {}", log_path.display())
}

/// The first line of a group's log: `# capnet group NAME: DOMAIN…`.
pub const LOG_HEADER: &str = "# capnet group ";

/// One group of the graph, running as a sandboxed `capnet-domain` process.
struct GroupProcess {
    name: String,
    /// Its domains' names.
    domains: Vec<String>,
    child: Child,
    /// Its stats region (the sandbox-violation word), read-only.
    stats: RegionRo,
    /// Its status region (its [`GroupReport`]), read-only.
    status: RegionRo,
    /// Its supervisor socket.
    sock: UnixStream,
    started: Instant,
    /// Times it was restarted.
    restarts: u32,
    /// Why it last ended.
    last_error: Option<String>,
    /// Events it sent while the supervisor waited for another answer.
    stash: std::cell::RefCell<Vec<Event>>,
}

impl GroupProcess {
    /// Waits for the event `want` picks, keeping the others for the main loop.
    fn expect(&self, want: impl Fn(&Event) -> bool) -> Result<Event> {
        loop {
            let e = recv_msg::<Event>(&self.sock)?;
            if want(&e) {
                return Ok(e);
            }
            self.stash.borrow_mut().push(e);
        }
    }

    /// Every event it sent that nobody waited for (without blocking).
    fn events(&self) -> Vec<Event> {
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
    fn report(&self) -> GroupReport {
        capnet_ipc::blob::read(&self.status).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    /// Why it ended, if it did.
    fn ended(&self) -> Option<capnet_kernel_shim::spawn::ExitCause> {
        self.child.try_wait(|| StatsRegion::violation(&self.stats)).ok().flatten()
    }
}

/// Channel sides as their makers sent them: (channel, group index) → fds (area
/// and pool of a message channel; pool, R area and T area of the frame channel).
type Sides = std::collections::BTreeMap<(String, usize), Vec<OwnedFd>>;

/// The running graph: every group, the supervisor's copy of the device, and what
/// a restart needs to start a group again.
struct Running {
    graph: Graph,
    groups: Vec<GroupProcess>,
    /// The group running the sockets domain.
    sockets: usize,
    /// The group running the driver.
    driver: usize,
    /// The supervisor's own handle on the TAP: it outlives a driver crash and is
    /// granted again to a restarted driver. None: the driver runs on an
    /// in-memory wire to another capnet instance.
    device: Option<Device>,
    /// On a wire: the namespace of the instance at its other end, once one joined.
    wire_peer: Option<String>,
    /// We joined the wire (`--wire-to`) rather than own it: we connect again.
    wire_joiner: bool,
    /// The spin-token count every group shares (a multi-writer region).
    spin_tokens: capnet_ipc::region::Region,
    vnet: bool,
    spec_base: GroupSpec,
    logs: std::path::PathBuf,
    /// A tcp domain swapped out, finishing the connections it had.
    draining: Option<Draining>,
    /// The programs swapped in, each opened and checked once
    /// ([`check_binary`]): every start of a domain whose graph entry names one
    /// goes through its fd, never its path again.
    programs: std::collections::BTreeMap<String, OwnedFd>,
}

/// A tcp domain swapped out (`capnet swap tcp`): it keeps its process and its
/// channels until its last connection is finished.
struct Draining {
    process: GroupProcess,
    /// Its channels, each with the group at its other end.
    channels: Vec<(String, usize)>,
}

/// A wire side's fds as capabilities: its pool and two channel areas.
fn wire_caps(side: HalfGrant) -> Result<[Cap; 3]> {
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    Ok([
        Cap::new(CapKind::Pool, all, 0, side.pool)?,
        Cap::new(CapKind::ChannelEnd, all, 1, side.r_area)?,
        Cap::new(CapKind::ChannelEnd, all, 2, side.t_area)?,
    ])
}

/// A wire side as [`wire_caps`] sends it.
fn take_wire(conn: &UnixStream) -> Result<HalfGrant> {
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
fn is_frames(l: Kind, r: Kind) -> bool {
    matches!((l, r), (Kind::Driver, Kind::Ip) | (Kind::Ip, Kind::Driver))
}

impl Running {
    /// Starts every group of `graph`: spawns it sandboxed, exchanges the regions
    /// and channel sides the groups made, grants the device, and waits until each
    /// says it is ready and every one of its threads is confined.
    fn start(graph: Graph, device: Option<Device>, spec_base: GroupSpec, logs: std::path::PathBuf) -> Result<Self> {
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
        };
        let mut sides = Sides::new();
        for gi in 0..r.graph.groups.len() {
            let p = r.spawn(gi, &mut sides, true)?;
            r.groups.push(p);
        }
        for gi in 0..r.groups.len() {
            r.grant(gi, &sides)?;
        }
        for gi in 0..r.groups.len() {
            r.await_ready(gi)?;
        }
        Ok(r)
    }

    /// The channels that leave group `gi`, in graph order: (channel, local kind, remote kind).
    fn links_of(&self, gi: usize) -> Vec<(String, Kind, Kind)> {
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
    fn peer_of(&self, gi: usize, ch: &str) -> Option<usize> {
        let c = self.graph.channels.iter().find(|x| x.name == ch)?;
        let group = &self.graph.groups[gi];
        let other = c.ends.iter().find(|e| !group.domains.contains(e))?;
        self.graph.groups.iter().position(|g| g.domains.contains(other))
    }

    fn runs(&self, gi: usize, k: Kind) -> bool {
        self.graph.groups[gi].domains.iter().any(|d| kind_in(&self.graph, d) == Some(k))
    }

    /// Spawns group `gi` and takes the regions and channel sides it made.
    fn spawn(&self, gi: usize, sides: &mut Sides, first: bool) -> Result<GroupProcess> {
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
    fn grant(&self, gi: usize, sides: &Sides) -> Result<()> {
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
        send_caps(self.groups[gi].sock.as_fd(), &caps.iter().map(|(c, r)| (c, *r)).collect::<Vec<_>>())?;
        Ok(())
    }

    /// A fresh side of the in-memory wire: blank regions the group running the
    /// driver adopts (and seals). Returns their fds, to grant the peer read-only.
    fn wire_side(&self) -> Result<HalfGrant> {
        let mut fds = self.offer_blanks(self.driver, &Control::WireSide, true)?.into_iter();
        let mut next = || fds.next().ok_or_else(|| anyhow::anyhow!("a wire side is three regions"));
        Ok(HalfGrant { pool: next()?, r_area: next()?, t_area: next()? })
    }

    /// Grants the driver the wire's peer side (read-only) and waits until it joined it.
    fn wire_join(&self, peer: HalfGrant) -> Result<()> {
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
    fn wire_connect(&mut self, ours: &str, peer: &str) -> Result<()> {
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
    fn rewire(&mut self, ours: &str) {
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
    fn wire_accept(&mut self, from: &str, conn: &UnixStream) -> Result<()> {
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
    fn await_ready(&self, gi: usize) -> Result<()> {
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
    fn restart_set(&self, gi: usize) -> Vec<usize> {
        vec![gi]
    }

    /// Restarts the groups of `set` with fresh channels: the groups outside that
    /// shared a channel with them adopt new sides of it, the new processes get
    /// those, and the old sides' users learn what state they lost.
    fn restart(&mut self, set: &[usize], cause: &str) -> Result<()> {
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
        // Fresh sides of every channel between the set and the rest.
        let mut sides = Sides::new();
        let mut relinked = Vec::new();
        for &h in &outside {
            for (c, l, r) in self.links_of(h) {
                if !self.peer_of(h, &c).is_some_and(|p| set.contains(&p)) {
                    continue;
                }
                let blanks = self.offer_blanks(h, &Control::Relink(c.clone()), is_frames(l, r))?;
                sides.insert((c.clone(), h), blanks);
                relinked.push((h, c));
            }
        }
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
        for &s in set {
            self.grant(s, &sides)?;
        }
        for &s in set {
            self.await_ready(s)?;
        }
        for (h, c) in relinked {
            self.join_peer(h, &c, &sides)?;
        }
        Ok(())
    }

    /// Sends group `h` blank regions for its side of a fresh channel, with the
    /// control message saying why (`Relink`, `Beside` or `WireSide`), and waits until it has
    /// adopted them; returns them (the new peer is granted them read-only).
    fn offer_blanks(&self, h: usize, why: &Control, frames: bool) -> Result<Vec<OwnedFd>> {
        let rw = Rights::READ | Rights::WRITE | Rights::MAP | Rights::GRANT;
        let c = match why {
            Control::Relink(c) | Control::Beside(c) => c.as_str(),
            Control::WireSide => WIRE,
            _ => bail!("blank regions offered for {why:?}"),
        };
        let blanks: Vec<OwnedFd> = if frames {
            let g = StackHalf::blank()?;
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
    fn join_peer(&self, h: usize, c: &str, sides: &Sides) -> Result<()> {
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
    fn swap_tcp(&mut self, gi: usize, binary: &str) -> Result<()> {
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
        if let Err(e) = self.grant(gi, &sides).and_then(|()| self.await_ready(gi)) {
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
    fn finish_drain(&mut self, why: &str) {
        let Some(d) = self.draining.take() else { return };
        eprintln!("capnet: the swapped-out tcp domain (pid {}) is stopped: {why}", d.process.child.pid());
        for (c, h) in &d.channels {
            let _ = send_msg(&self.groups[*h].sock, &Control::Retired(c.clone()));
        }
        let _ = d.process.child.kill();
    }
}

/// A change asked for on the control socket.
enum Change {
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
    fn change(&mut self, change: &Change) -> Result<Option<(usize, String)>> {
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

/// Opens a program the supervisor may start as a domain, once, and checks what
/// it opened: an absolute path, walked one component at a time from `/` without
/// following a symlink (`O_NOFOLLOW` at every step), through directories that
/// belong to root or the supervisor's user and that nobody else may write
/// (unless sticky, as `/tmp`: then nobody else may replace what is ours), to an
/// executable regular file that only root or the supervisor's user owns and
/// nobody else may write (it runs with the authority the graph grants). The fd
/// is what the domain is started through, at the swap and at every restart
/// after it: what the path names later does not matter.
fn check_binary(path: &str) -> Result<OwnedFd> {
    use rustix::fs::{fstat, openat, FileType, Mode, OFlags, CWD};
    let p = std::path::Path::new(path);
    if !p.is_absolute() {
        bail!("{path}: give the binary's absolute path");
    }
    let me = nix::unistd::geteuid().as_raw();
    // In its own user namespace an unprivileged supervisor sees root's and every
    // other user's files as the overflow uid: directories can then only be
    // checked for their mode (the file itself must be the user's own).
    let overflow = (!userns::privileged())
        .then(|| std::fs::read_to_string("/proc/sys/kernel/overflowuid").ok()?.trim().parse::<u32>().ok())
        .flatten();
    let owner_ok = |uid: u32| uid == 0 || uid == me || Some(uid) == overflow;
    let mut names = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::RootDir => {}
            std::path::Component::Normal(n) => names.push(n),
            _ => bail!("{path}: give the binary's path without . or .. in it"),
        }
    }
    let Some((file, dirs)) = names.split_last() else { bail!("{path} is not a file") };
    let mut dir = openat(CWD, "/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?;
    let mut at = std::path::PathBuf::from("/");
    for name in dirs.iter().copied().map(Some).chain([None]) {
        let st = fstat(&dir)?;
        if !owner_ok(st.st_uid) {
            bail!("{path}: {} belongs to uid {}, neither root nor the supervisor's user", at.display(), st.st_uid);
        }
        if st.st_mode & 0o022 != 0 && st.st_mode & 0o1000 == 0 {
            bail!(
                "{path}: {} may be written by others (mode {:o}): refusing to run a domain from it",
                at.display(),
                st.st_mode & 0o7777
            );
        }
        let Some(name) = name else { break };
        at.push(name);
        dir = openat(&dir, name, OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| anyhow::anyhow!("{path}: {} is not a directory of its own (a symlink?): {e}", at.display()))?;
    }
    let fd = openat(&dir, *file, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
        if e == rustix::io::Errno::LOOP {
            anyhow::anyhow!("{path} is a symlink: give the path of the file itself")
        } else {
            anyhow::anyhow!("{path}: cannot open it: {e}")
        }
    })?;
    let st = fstat(&fd)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        bail!("{path} is not a regular file");
    }
    if st.st_mode & 0o111 == 0 {
        bail!("{path} is not executable");
    }
    if st.st_mode & 0o022 != 0 {
        bail!("{path} is writable by others (mode {:o}): refusing to run it as a domain", st.st_mode & 0o777);
    }
    if !userns::privileged() && st.st_uid != me {
        bail!("{path} is not the user's own file (an unprivileged supervisor runs only those): copy it to a file of yours");
    }
    if st.st_uid != 0 && st.st_uid != me {
        bail!("{path} belongs to uid {}, neither root nor the supervisor's user", st.st_uid);
    }
    Ok(fd)
}

/// The kind of domain `d` in `graph`.
fn kind_in(graph: &Graph, d: &str) -> Option<Kind> {
    graph.domains.iter().find(|x| x.name == d).map(|x| x.kind)
}

/// An fd of process `pid` that its grants do not explain, if any: it may hold
/// its standard streams, one socket (its supervisor socket), capnet memfd
/// regions, and — if it runs the driver — the TAP.
fn unexplained_fd(pid: i32, drives: bool) -> Option<String> {
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

/// Which graph `up` runs: a file, or a built-in one.
fn load_graph(args: &UpArgs) -> Result<Graph> {
    let (what, text) = match (&args.graph, args.mono, args.two_group) {
        (Some(path), _, _) => (
            path.display().to_string(),
            std::fs::read_to_string(path).with_context(|| format!("cannot read graph file {}", path.display()))?,
        ),
        (None, true, _) => ("the mono graph".into(), graph::MONO.to_owned()),
        (None, _, true) => ("the two-group graph".into(), graph::TWO_GROUP.to_owned()),
        (None, false, false) => ("the default graph".into(), graph::DEFAULT.to_owned()),
    };
    Graph::parse(&text).map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

/// The addresses `up` uses: the command line's, else the graph's, else the
/// defaults — the graph's or default pair the other way round for an instance
/// joining a wire with `--wire-to` (it is the peer its `--wire` instance expects).
fn addressing(args: &UpArgs, graph: &Graph) -> (String, (Ipv4Addr, u8), (Ipv4Addr, u8)) {
    let a = &graph.addressing;
    let mut peer = a.host_addr.unwrap_or((Ipv4Addr::new(10, 77, 0, 1), 24));
    let mut ours = a.addr.unwrap_or((Ipv4Addr::new(10, 77, 0, 2), 24));
    if args.wire_to.is_some() {
        std::mem::swap(&mut peer, &mut ours);
    }
    (
        args.tap.clone().or_else(|| a.tap.clone()).unwrap_or_else(|| "cap0".into()),
        args.host_addr.unwrap_or(peer),
        args.addr.unwrap_or(ours),
    )
}

/// How many groups may spin at once (docs/performance.md, "Spin tokens"): the
/// cores but one when every group can have a core of its own, else none — with
/// more groups than cores a spinning group holds the core the one it waits for
/// needs (measured: factored request/response 20 % slower with a token, mono
/// and two groups 30–50 % faster).
fn spin_limit(groups: usize) -> u32 {
    let limit = capnet_ipc::notify::SpinTokens::<capnet_ipc::region::Region>::limit_for_this_machine();
    if groups <= limit as usize + 1 {
        limit
    } else {
        0
    }
}

/// The foreground supervisor: makes everything, runs until Ctrl-C or `down`.
fn run(args: UpArgs, graph: Graph) -> Result<()> {
    let name = args.target.netns.clone();
    let (tap, (host, prefix), (addr, _)) = addressing(&args, &graph);
    // Root makes a named namespace (if it exists, someone else's, nothing of it
    // is touched); an ordinary user a user namespace of its own owning a network
    // namespace, which this process enters (it has one thread still).
    let named = userns::privileged().then(|| netns::create(&name)).transpose()?;
    if named.is_none() {
        userns::enter_own()?;
    }
    // From here on, any error (and the end of the run) removes what was made.
    let made = Made { netns: name.clone(), named: named.is_some() };
    let dir = control::make_run_dir(&name)?;
    let ns = named.is_some().then_some(name.as_str());
    ip_cmd(ns, &["link", "set", "lo", "up"])?;
    let wired = args.wire || args.wire_to.is_some();
    let dev = if wired {
        None
    } else {
        // Offloads where the TAP allows them (the driver completes partial checksums).
        let dev = Device::open_tap(&tap, named.as_deref(), true)?;
        let sysctl = format!("net.ipv6.conf.{tap}.disable_ipv6=1");
        let _ = match ns {
            Some(n) => Command::new("ip").args(["netns", "exec", n, "sysctl", "-qw", &sysctl]).output(),
            None => Command::new("sysctl").args(["-qw", &sysctl]).output(),
        };
        ip_cmd(ns, &["link", "set", &tap, "up"])?;
        ip_cmd(ns, &["addr", "add", &format!("{host}/{prefix}"), "dev", &tap])?;
        Some(dev)
    };

    let o = addr.octets();
    let spec = GroupSpec {
        name: String::new(),
        domains: Vec::new(),
        links: Vec::new(),
        seccomp: Vec::new(),
        mac: [0x02, 0xca, 0xfe, o[1], o[2], o[3]],
        addr: o,
        prefix,
        gateway: host.octets(),
        tcp_cc: args.tcp_cc.name().into(),
        tcp_memory_mib: args.tcp_memory_mib,
        tcp_orphan_retries: args.tcp_orphan_retries,
        loss: args.loss,
        reorder: args.reorder,
        seed: args.seed,
        vnet: false,
        wire: wired,
        spin_limit: spin_limit(graph.groups.len()),
    };
    let mode = if graph.groups.len() == 1 { "mono" } else { "factored" };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::set_permissions(&logs, std::fs::Permissions::from_mode(0o700))?;
    let mut running = Running::start(graph, dev, spec, logs)?;
    if let Some(peer) = &args.wire_to {
        running.wire_connect(&name, peer)?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let base = Status {
        mode: mode.into(),
        netns: name.clone(),
        tap: if wired { WIRE.into() } else { tap.clone() },
        host_addr: format!("{host}/{prefix}"),
        addr: format!("{addr}/{prefix}"),
        domains: Vec::new(),
        routes: Vec::new(),
        tcp_connections: Vec::new(),
        tcp_connections_total: 0,
        tcp_listening: Vec::new(),
    };
    let snapshot = Arc::new(Mutex::new(String::new()));
    *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = render(&base, &running)?;
    let sock = socket_path(&name);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(dir.join("pid"), format!("{}\n", std::process::id()))?;
    let (capture_tx, capture_rx) = std::sync::mpsc::channel::<UnixStream>();
    let (restart_tx, restart_rx) = std::sync::mpsc::channel::<(Change, UnixStream)>();
    // The threads serving the sockets wake the loop when they hand it something
    // (an application attaching waits for no tick).
    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
    {
        let (snapshot, stop, wake) = (snapshot.clone(), stop.clone(), wake_tx.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve(listener, snapshot, stop, capture_tx, restart_tx, wake))?;
    }
    let (app_tx, app_rx) = std::sync::mpsc::channel::<(UnixStream, MsgGrant)>();
    {
        let path = capnet::attach::app_socket(&name);
        let _ = std::fs::remove_file(&path);
        let apps = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let wake = wake_tx.clone();
        std::thread::Builder::new().name("apps".into()).spawn(move || serve_apps(apps, app_tx, wake))?;
    }
    let groups: Vec<String> =
        running.groups.iter().map(|g| format!("{} (pid {})", g.domains.join("+"), g.child.pid())).collect();
    match (&args.wire_to, wired) {
        (Some(peer), _) => println!(
            "capnet up: {mode} stack at {addr}/{prefix} in namespace {name}, on an in-memory wire to the instance in {peer} ({host})"
        ),
        (None, true) => println!(
            "capnet up: {mode} stack at {addr}/{prefix} in namespace {name}, on an in-memory wire that `capnet up --wire-to {name}` joins"
        ),
        (None, false) => {
            println!("capnet up: {mode} stack at {addr}/{prefix} on {tap} in namespace {name}; the kernel is {host}")
        }
    }
    println!("groups: {}", groups.join(" | "));
    if wired {
        println!("try: capnet status --netns {name}");
    } else if made.named {
        println!("try: ip netns exec {name} ping {addr}");
    } else {
        println!("try: capnet exec --netns {name} -- ping {addr}   (unprivileged: a user namespace of its own)");
    }
    let _ = std::io::stdout().flush();

    let mut apps: Vec<(u64, UnixStream)> = Vec::new();
    let mut next_app = 0u64;
    let max_apps = max_applications(&running.graph.groups[running.sockets]);
    while !stop.load(Ordering::Relaxed) {
        // Applications that closed their attach socket are gone (first: their
        // places are free for those attaching now).
        let sockets = &running.groups[running.sockets];
        apps.retain(|(id, conn)| {
            let gone = capnet::attach::closed_by_peer(conn);
            if gone {
                let _ = send_msg(&sockets.sock, &Control::Detach(*id));
            }
            !gone
        });
        while let Ok((conn, theirs)) = app_rx.try_recv() {
            if apps.len() >= max_apps {
                let why = format!(
                    "the stack serves at most {max_apps} applications at once (the sockets group's rlimits.nofile in the graph bounds them)"
                );
                let _ = send(&conn, &capnet::attach::AttachReply::Refused(why));
                continue;
            }
            next_app += 1;
            match attach_app(&running.groups[running.sockets], next_app, &conn, theirs) {
                // One that left meanwhile is found closed and detached below.
                Ok(()) => apps.push((next_app, conn)),
                Err(e) => eprintln!("capnet: an application failed to attach: {e:#}"),
            }
        }
        while let Ok(conn) = capture_rx.try_recv() {
            if let Err(e) = start_capture(&running, &conn) {
                let _ = send(&conn, &Reply::Refused(format!("{e:#}")));
            }
        }
        // A group that ended (or was asked to restart) comes back with fresh
        // channels; one that keeps dying waits longer each time (100 ms, doubling,
        // at most 5 s), counted from its last start.
        let mut due: Vec<(usize, String)> =
            running.groups.iter().enumerate().filter_map(|(i, g)| g.ended().map(|c| (i, c.to_string()))).collect();
        // A group that reports its peer broke a channel: the peer is cut off.
        let mut old_broke = None;
        let mut wire_broke = None;
        for (i, g) in running.groups.iter().enumerate() {
            for e in g.events() {
                if let Event::CutOff { app, why } = &e {
                    eprintln!("capnet: the sockets domain cut application {app} off: {why}");
                    apps.retain(|(id, _)| id != app); // closing its socket tells it
                }
                if let Event::Broken { channel, why, old } = e {
                    if channel == WIRE {
                        wire_broke = Some(why);
                    } else if old {
                        old_broke = Some(format!("cut off: it broke channel {channel} ({why})"));
                    } else if let Some(p) = running.peer_of(i, &channel) {
                        eprintln!(
                            "capnet: {} reports that {} broke channel {channel}: {why}",
                            g.domains.join("+"),
                            running.groups[p].domains.join("+")
                        );
                        due.push((p, format!("cut off: it broke channel {channel} ({why})")));
                    }
                }
            }
        }
        if let Some(why) = wire_broke {
            eprintln!("capnet: the driver dropped the wire ({why}): it is joined afresh");
            running.rewire(&name);
        }
        due.sort_by_key(|(i, _)| *i);
        due.dedup_by_key(|(i, _)| *i);
        while let Ok((change, conn)) = restart_rx.try_recv() {
            if let Change::WireAgain = &change {
                let _ = send(&conn, &Reply::Ok);
                running.rewire(&name);
                continue;
            }
            if let Change::Wire(from) = &change {
                match running.wire_accept(from, &conn) {
                    Ok(()) => eprintln!("capnet: the instance in namespace {from} joined the wire"),
                    Err(e) => {
                        eprintln!("capnet: the instance in namespace {from} could not join the wire: {e:#}");
                        let _ = send(&conn, &Reply::Refused(format!("{e:#}")));
                    }
                }
                continue;
            }
            match running.change(&change) {
                Ok(restart) => {
                    due.extend(restart);
                    let _ = send(&conn, &Reply::Ok);
                }
                Err(e) => {
                    let _ = send(&conn, &Reply::Refused(format!("{e:#}")));
                }
            }
        }
        // A swapped-out tcp domain goes when it says it is done, dies, or is cut off.
        if let Some(why) = old_broke {
            running.finish_drain(&why);
        }
        if let Some(d) = &running.draining {
            let drained = d.process.events().iter().any(|e| matches!(e, Event::Drained));
            match (drained, d.process.ended()) {
                (true, _) => running.finish_drain("its last connection is finished"),
                (_, Some(cause)) => running.finish_drain(&format!("it ended ({cause}); its connections are lost")),
                _ => {}
            }
        }
        if !due.is_empty() {
            // Restarts rebuild channels from the graph, which knows one tcp domain.
            running.finish_drain("a restart ends the swap; its connections are lost");
        }
        for (i, cause) in due {
            if running.groups[i].restarts > 0 && running.groups[i].started.elapsed() < Duration::from_secs(10) {
                let wait = Duration::from_millis(100 << running.groups[i].restarts.min(6)).min(Duration::from_secs(5));
                std::thread::sleep(wait.saturating_sub(running.groups[i].started.elapsed()));
            }
            let set = running.restart_set(i);
            let names: Vec<String> = set.iter().map(|&g| running.groups[g].domains.join("+")).collect();
            eprintln!(
                "capnet: {} ended: {cause}; restarting {}",
                running.groups[i].domains.join("+"),
                names.join(", ")
            );
            if set.contains(&running.sockets) {
                // Their channels died with the sockets domain: the applications
                // see the stack go away (ConnectionReset) and may attach again.
                apps.clear();
            }
            if let Err(e) = running.restart(&set, &cause) {
                eprintln!("capnet: restarting {} failed: {e:#}; taking the stack down", names.join(", "));
                stop.store(true, Ordering::Relaxed);
            }
            // A new driver on a wire: both instances give it fresh sides.
            if set.contains(&running.driver) {
                running.rewire(&name);
            }
        }
        *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = render(&base, &running)?;
        let _ = wake_rx.recv_timeout(Duration::from_millis(100));
        while wake_rx.try_recv().is_ok() {}
    }
    drop(apps);
    for g in &running.groups {
        let _ = g.child.kill();
    }
    drop(running);
    drop(made);
    println!("capnet down: namespace {name} and everything the stack made there removed");
    Ok(())
}

/// Gives application `id` its channel to the sockets domain, once the
/// application's own area and pool (`theirs`) arrived: blank regions the
/// sockets group adopts (it may not create memory) and seals, the
/// application's regions granted to the group, then the group's granted to the
/// application read-only. Only the group is waited on (trusted, and quick); the
/// application was done with before.
fn attach_app(sockets: &GroupProcess, id: u64, conn: &UnixStream, theirs: MsgGrant) -> Result<()> {
    let blank = MsgHalf::blank(&format!("capnet-app-{id}"))?;
    let rw = Rights::READ | Rights::WRITE | Rights::MAP;
    send_msg(&sockets.sock, &Control::AdoptApp(id))?;
    let caps = [
        Cap::new(CapKind::Blank, rw | Rights::GRANT, 0, blank.area.try_clone()?)?,
        Cap::new(CapKind::Blank, rw | Rights::GRANT, 1, blank.pool.try_clone()?)?,
    ];
    send_caps(sockets.sock.as_fd(), &caps.iter().map(|c| (c, rw)).collect::<Vec<_>>())?;
    sockets
        .expect(|e| matches!(e, Event::Adopted(a) if *a == id))
        .context("the sockets domain did not adopt the application's channel")?;
    send_msg(&sockets.sock, &Control::AppGrant(id))?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let ro = Rights::READ | Rights::MAP;
    let caps = [Cap::new(CapKind::ChannelEnd, all, 0, theirs.area)?, Cap::new(CapKind::Pool, all, 1, theirs.pool)?];
    send_caps(sockets.sock.as_fd(), &caps.iter().map(|c| (c, ro)).collect::<Vec<_>>())?;
    // Sealed by the sockets domain now (recv_caps on the application's side checks).
    capnet::attach::accept(conn, MsgGrant { area: blank.area, pool: blank.pool })?;
    Ok(())
}

/// How many applications the sockets group has fds for: each holds four (its
/// channel area and pool, and the group's own two), beside the forty or so the
/// group keeps for its channels and itself. One more would truncate a
/// capability message (`MSG_CTRUNC`) and end the group.
fn max_applications(group: &graph::Group) -> usize {
    (group.sandbox.nofile.saturating_sub(40) / 4).max(1) as usize
}

/// Handshakes with applications under way at once: the next waits for one of
/// them to end (each within [`HANDSHAKE_DEADLINE`]), so a flood of connects
/// ties up a bounded number of threads and delays others by one deadline.
const MAX_HANDSHAKES: usize = 16;
/// How long an application may take to send its side.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

/// `capnet capture`: a `SOCK_SEQPACKET` pair, one end to the group running the
/// driver (it copies each frame there), the other to the asking CLI.
fn start_capture(running: &Running, conn: &UnixStream) -> Result<()> {
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
fn render(base: &Status, running: &Running) -> Result<String> {
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
fn process_usage(pid: i32) -> (f64, u64) {
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

/// Accepts applications: checks the caller, then takes its side of the channel
/// on a thread of its own with a short deadline (at most [`MAX_HANDSHAKES`]
/// at once), and hands the connection and that side to the supervisor's loop,
/// which attaches it. A handshake that fails or never finishes leaves nothing.
fn serve_apps(
    listener: UnixListener,
    to_loop: std::sync::mpsc::Sender<(UnixStream, MsgGrant)>,
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

/// Serves the control socket: one request per connection, from our own user only.
fn serve(
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

/// `capnet down`: asks the supervisor to stop; if it is gone (crashed, killed),
/// removes what it left behind itself.
pub fn down(name: &str) -> Result<()> {
    netns::path(name)?;
    let dir = run_dir(name);
    if matches!(control::ask(name, &Request::Down), Ok(Reply::Ok)) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let left = dir.exists() || (userns::privileged() && netns::exists(name));
            if !left {
                println!("capnet down: namespace {name} and everything the stack made there removed");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the supervisor acknowledged but did not finish within 15 s; run `capnet down --netns {name}` again");
    }
    // No supervisor answers: kill a leftover one (by its pid file), then clean up.
    if let Some(pid) = std::fs::read_to_string(dir.join("pid")).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("capnet") {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    let named = userns::privileged();
    let had = (named && netns::exists(name)) || dir.exists();
    if named {
        netns::delete(name)?;
    }
    let _ = UnixStream::connect(socket_path(name));
    std::fs::remove_dir_all(&dir)
        .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })?;
    if had {
        println!("capnet down: the supervisor was gone; removed namespace {name} and {}", dir.display());
    } else {
        println!("capnet down: nothing is up in namespace {name}");
    }
    Ok(())
}
