//! A group: one sandboxed process running one or more domains of the graph
//! (`capnet-domain`), and the protocol it speaks with the supervisor over its
//! supervisor socket (granted fd 3).
//!
//! Setup, in order (DESIGN, "Who may write what": each region's one writer
//! creates and seals it, others map it read-only):
//! 1. the supervisor sends the [`GroupSpec`];
//! 2. the group creates its stats region, its status region, and its side of every
//!    channel that leaves the group (channel area and pool; for driver | ip the
//!    frame pools and areas), and sends them as capabilities, in the spec's order;
//! 3. the supervisor sends the device (if the group runs the driver) and the
//!    other side of each of those channels, as the peer groups sent them;
//! 4. the group joins the channels, starts its threads, enters its sandbox (the
//!    union of its domains' seccomp policies) and says [`Event::Ready`]; the
//!    supervisor then checks every thread of it before it reports the graph up.
//!
//! After that the supervisor sends [`Control`] messages (applications attaching
//! to and leaving the sockets domain, stop), and the group publishes a
//! [`GroupReport`] in its status region five times a second. The group exits
//! when its supervisor socket closes: a dead supervisor leaves no domain behind.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

mod counters;

use anyhow::{anyhow, bail, Context, Result};
use capnet_ip::{Config, EthernetAddress, Ipv4Cidr};
use capnet_ipc::msg::{MsgGrant, MsgHalf};
use capnet_ipc::region::Region;
use capnet_ipc::End;
use capnet_kernel_shim::cap::{recv_caps, send_caps, send_held, Cap, CapKind, Rights};
use capnet_kernel_shim::sandbox::{self, StatsRegion};
use capnet_runtime::domain::sockets::SocketsHost;
use capnet_runtime::frames::{DriverHalf, HalfGrant, Peer, StackHalf};
use capnet_runtime::StackGroup;
use capnet_runtime::{AppHost, Cores, DeviceStats, FrameTap, LinkImpairment, MonoStack, Plain};

use capnet_proto::group::{recv_msg, send_msg, Control, Event, GroupSpec, STATUS_LEN, WIRE};
use capnet_proto::report::{GroupReport, RouteEntry};
use capnet_proto::{end_of, Kind};

/// How often a group publishes its report.
pub const REPORT_EVERY: Duration = Duration::from_millis(100);
/// How long a group's loop may wait before it looks at its supervisor socket.
const CONTROL_TICK: Duration = Duration::from_millis(20);
/// UDP receive queue per socket.
const UDP_QUEUE: usize = 4 << 20;

fn kind(name: &str) -> Result<Kind> {
    Kind::parse(name).ok_or_else(|| anyhow!("unknown domain kind {name:?}"))
}

/// What a group created and sends to the supervisor, in order.
struct Made {
    stats: &'static Region,
    status: Region,
    /// Per link: its message side.
    halves: Vec<MsgHalf>,
    /// The frame side of driver | ip, if that channel leaves the group here.
    frames: Option<Frames>,
}

enum Frames {
    Driver(DriverHalf),
    Stack(StackHalf),
}

/// The running engine: whatever waits on the device or the driver's channels,
/// with the cores of this group.
enum Engine {
    Mono(Box<MonoStack>),
    Stack(Box<capnet_runtime::StackGroup>),
    Plain(Box<Plain>),
}

impl Engine {
    fn host(&mut self) -> &mut dyn AppHost {
        match self {
            Engine::Mono(s) => &mut **s,
            Engine::Stack(s) => &mut **s,
            Engine::Plain(s) => &mut **s,
        }
    }
}

/// `capnet-domain`'s main: runs the group its supervisor describes.
pub fn main() -> Result<()> {
    main_with(|_| {})
}

/// The main of a domain program of your own: runs the group its supervisor
/// describes, with `tcp` adjusting the tcp core's settings (after the graph's)
/// when the group runs the tcp domain — `capnet-tcp-cubic` is the example.
pub fn main_with(tcp: fn(&mut capnet_tcp::Config)) -> Result<()> {
    // Events go to standard error, which the supervisor points at this group's
    // log (`capnet logs`); UTC timestamps, so no time zone file is opened.
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_target(false).init();
    let sock = UnixStream::from(
        capnet_kernel_shim::spawn::take_granted_fd(0).ok_or_else(|| anyhow!("no supervisor socket at fd 3"))?,
    );
    let spec: GroupSpec = recv_msg(&sock).context("reading the group's spec")?;
    let span = tracing::info_span!("group", name = %spec.name);
    let _entered = span.enter();
    let r = run(&sock, &spec, tcp);
    if let Err(e) = &r {
        tracing::error!("the group stops: {e:#}");
    }
    r
}

fn run(sock: &UnixStream, spec: &GroupSpec, tune_tcp: fn(&mut capnet_tcp::Config)) -> Result<()> {
    let names: Vec<&str> = spec.domains.iter().map(|(n, _)| n.as_str()).collect();
    tracing::info!(domains = %names.join(" "), "starting");
    let kinds = spec.domains.iter().map(|(_, k)| kind(k)).collect::<Result<Vec<_>>>()?;
    let has = |k: Kind| kinds.contains(&k);
    let links =
        spec.links.iter().map(|(name, l, r)| Ok((name.clone(), kind(l)?, kind(r)?))).collect::<Result<Vec<_>>>()?;

    // 2. Create what this group writes, and send it.
    let made = Made {
        stats: Box::leak(Box::new(StatsRegion::create()?)),
        status: Region::create("capnet-status", STATUS_LEN)?,
        halves: links
            .iter()
            .filter(|(_, l, r)| (*l, *r) != (Kind::Driver, Kind::Ip) && (*l, *r) != (Kind::Ip, Kind::Driver))
            .map(|(name, l, r)| MsgHalf::new(&format!("capnet-{name}"), end_of(*l, *r)))
            .collect::<Result<Vec<_>, _>>()?,
        frames: links
            .iter()
            .find_map(|(_, l, r)| match (l, r) {
                (Kind::Driver, Kind::Ip) => Some(DriverHalf::new().map(Frames::Driver)),
                (Kind::Ip, Kind::Driver) => Some(StackHalf::new().map(Frames::Stack)),
                _ => None,
            })
            .transpose()?,
    };
    send_caps(sock.as_fd(), &made.caps()?.iter().map(|c| (c, Rights::READ | Rights::MAP)).collect::<Vec<_>>())?;

    // 3. Take the spin tokens, the device and the other sides.
    let mut got = recv_caps(sock.as_fd()).context("receiving the group's capabilities")?.into_iter();
    match got.next() {
        Some(c) if c.kind == CapKind::Region && c.rights.contains(Rights::WRITE) => {
            let region = capnet_ipc::region::Region::attach_multi_writer(c.into_fd(), 64)?;
            capnet_runtime::use_spin_tokens(capnet_runtime::SpinTokens::new(
                std::sync::Arc::new(region),
                0,
                spec.spin_limit,
            ));
        }
        _ => bail!("the spin-token region is missing"),
    }
    let device = if has(Kind::Driver) && !spec.wire {
        match got.next() {
            Some(c) if c.kind == CapKind::Device => {
                let vnet = c.tag == 1;
                Some((c.into_fd(), vnet))
            }
            _ => bail!("the driver's device capability is missing"),
        }
    } else {
        None
    };
    let mut take = |what: &str| -> Result<OwnedFd> {
        got.next().map(Cap::into_fd).ok_or_else(|| anyhow!("the capability for {what} is missing"))
    };
    let mut peers = Vec::new();
    for (name, _, _) in
        links.iter().filter(|(_, l, r)| !matches!((l, r), (Kind::Driver, Kind::Ip) | (Kind::Ip, Kind::Driver)))
    {
        peers.push(MsgGrant { area: take(name)?, pool: take(name)? });
    }
    let frames_peer = match made.frames {
        Some(_) => Some(HalfGrant { pool: take("frames")?, r_area: take("frames")?, t_area: take("frames")? }),
        None => None,
    };
    let frame_pool = if spec.frame_pool { Some(take("the driver's frame pool")?) } else { None };

    // 4. Join, start, confine.
    let o = spec.addr;
    let mut cfg = Config::new(EthernetAddress(spec.mac), Ipv4Cidr::new(o.into(), spec.prefix));
    cfg.gateway = Some(spec.gateway.into());
    if spec.wire {
        cfg.mtu = capnet_runtime::frames::WIRE_MTU;
    }
    let mut cores = Cores::group(&kinds, cfg, UDP_QUEUE);
    if let Some(fd) = frame_pool {
        cores.views.add(capnet_runtime::frames::RX_POOL, fd)?;
    }
    if let Some(tcp) = cores.tcp.as_mut() {
        tcp.core.config_mut().congestion_control = spec.tcp_cc.parse().map_err(|e: String| anyhow!(e))?;
        tcp.core.config_mut().memory = spec.tcp_memory_mib as usize * (1 << 20);
        tcp.core.config_mut().orphan_retries = spec.tcp_orphan_retries;
        tune_tcp(tcp.core.config_mut());
    }
    let msg_links =
        links.iter().filter(|(_, l, r)| !matches!((l, r), (Kind::Driver, Kind::Ip) | (Kind::Ip, Kind::Driver)));
    for ((name, l, r), (half, peer)) in msg_links.zip(made.halves.into_iter().zip(peers)) {
        cores.replace_link(*l, *r, half.attach(end_of(*l, *r), peer)?)?;
        tracing::info!("channel {name} joined: {l} here, {r} in another group");
    }
    let impair = LinkImpairment::symmetric(spec.loss, spec.reorder, spec.seed);
    if spec.vnet && impair.outbound.is_none() {
        cores.use_tso(); // the driver's impairment stage keeps plain frames
    }
    let mut driver = None;
    let tap = FrameTap::default();
    let mut engine = match (made.frames, frames_peer, device) {
        (Some(Frames::Driver(half)), Some(peer), device) if device.is_some() || spec.wire => {
            let (fd, vnet) = device.map_or((None, false), |(fd, vnet)| (Some(fd), vnet));
            driver = Some(half.run(fd, vnet, peer, impair, tap.clone())?);
            Engine::Plain(Box::new(Plain::new(cores)))
        }
        // The whole stack on a wire: its stack half is the device.
        (None, None, None) if has(Kind::Driver) => {
            if !impair.inbound.is_none() || !impair.outbound.is_none() {
                bail!("a one-group stack on an in-memory wire has no impairment stage: run the driver on its own");
            }
            Engine::Stack(Box::new(StackGroup::unplugged(cores)))
        }
        (Some(Frames::Stack(half)), Some(peer), None) => Engine::Stack(Box::new(half.join(peer, cores)?)),
        (None, None, Some((fd, vnet))) => {
            Engine::Mono(Box::new(MonoStack::on_fd(fd, vnet, cores, impair, tap.clone())?))
        }
        (None, None, None) => Engine::Plain(Box::new(Plain::new(cores))),
        _ => bail!("the group's frame channel and device do not fit together"),
    };
    if let Some((name, l, r)) =
        links.iter().find(|(_, l, r)| matches!((l, r), (Kind::Driver, Kind::Ip) | (Kind::Ip, Kind::Driver)))
    {
        tracing::info!("frame channel {name} joined: {l} here, {r} in another group");
    }
    let roles = spec.seccomp.join("+");
    sandbox::enter(&roles, made.stats)?;
    tracing::info!("sandbox entered on every thread: seccomp {roles}, no capabilities");
    send_msg(sock, &Event::Ready)?;

    // 5. Run until the supervisor goes away.
    let mut sockets = has(Kind::Sockets).then(SocketsHost::default);
    let mut last_report: Option<Instant> = None;
    let mut last_control = Instant::now();
    let mut relinks = Relinks {
        wire: None,
        wire_joined: false,
        wire_refused: 0,
        links: links.clone(),
        pending: Vec::new(),
        reported: Vec::new(),
        app_pools: Default::default(),
        retiring: Vec::new(),
    };
    let mut drained = false;
    #[cfg(feature = "hostile")]
    let (mut hostile, started) = (hostile_plan(&kinds), Instant::now());
    loop {
        let host = engine.host();
        match sockets.as_mut() {
            Some(s) => {
                s.serve(host, CONTROL_TICK)?;
                for (app, why) in s.cut_off.drain(..) {
                    send_msg(sock, &Event::CutOff { app, why })?;
                }
            }
            None => host.poll_apps(CONTROL_TICK, &mut [])?,
        }
        // A wire's peer that broke the protocol was dropped: the supervisor
        // joins the wire afresh (the peer's new side, ours new too).
        let refused = driver.as_ref().map_or(0, |d| d.stats().wire_refused);
        let stack_broke = matches!(&engine, Engine::Stack(s) if s.broken().is_some()) && relinks.wire_joined;
        if refused > relinks.wire_refused || (spec.wire && stack_broke) {
            relinks.wire_refused = refused;
            relinks.wire_joined = false;
            tracing::warn!("the in-memory wire's peer broke its protocol: reporting it");
            let why = "the wire's peer broke the channel protocol".to_owned();
            send_msg(sock, &Event::Broken { channel: WIRE.into(), why, old: false })?;
        }
        // A broken channel is reported once; its peer is cut off and restarted by
        // the supervisor, which then hands us a fresh channel.
        for (channel, why, old) in broken_channels(&mut engine, &relinks.links) {
            if !relinks.reported.contains(&(channel.clone(), old)) {
                tracing::warn!("{why}: reporting it");
                send_msg(sock, &Event::Broken { channel: channel.clone(), why, old })?;
                relinks.reported.push((channel, old));
            }
        }
        #[cfg(feature = "hostile")]
        if let Some((action, at)) = hostile.as_ref() {
            if started.elapsed() >= *at {
                hostile_act(action, &mut engine, driver.as_ref());
                hostile = None;
            }
        }
        let host = engine.host();
        if let Some(d) = &driver {
            if d.ended() {
                bail!("the driver's data path ended");
            }
        }
        if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            last_report = Some(Instant::now());
            if !drained && host.cores().drained() {
                drained = true;
                tracing::info!("swapped out, and the last connection is finished: telling the supervisor");
                send_msg(sock, &Event::Drained)?;
            }
            let device = host.device_stats().or_else(|| driver.as_ref().map(|d| d.stats()));
            let loans = sockets.as_ref().map(|s| (s.loans_made, s.lent() as u64));
            let report = report(spec, host.cores(), device, loans);
            capnet_ipc::blob::publish(&made.status, serde_json::to_string(&report)?.as_bytes());
        }
        if last_control.elapsed() >= CONTROL_TICK {
            last_control = Instant::now();
            let views = &mut engine.host().cores().views;
            relinks.retiring.retain(|(at, key)| {
                let keep = at.elapsed() < RETIRE_GRACE;
                if !keep {
                    views.remove(*key);
                }
                keep
            });
            if !control(sock, sockets.as_mut(), &mut engine, driver.as_ref(), &tap, &mut relinks)? {
                tracing::info!("the supervisor is gone: exiting");
                return Ok(());
            }
        }
    }
}

impl Made {
    /// The capabilities to send, in the agreed order.
    fn caps(&self) -> Result<Vec<Cap>> {
        let all = Rights::READ | Rights::MAP | Rights::GRANT;
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
        let mut caps = vec![
            Cap::new(CapKind::Region, all, 0, dup(self.stats.fd())?)?,
            Cap::new(CapKind::Region, all, 1, dup(self.status.fd())?)?,
        ];
        for h in &self.halves {
            let g = h.grant()?;
            caps.push(Cap::new(CapKind::ChannelEnd, all, 2, g.area)?);
            caps.push(Cap::new(CapKind::Pool, all, 3, g.pool)?);
        }
        if let Some(f) = &self.frames {
            let g = match f {
                Frames::Driver(h) => h.grant()?,
                Frames::Stack(h) => h.grant()?,
            };
            caps.push(Cap::new(CapKind::Pool, all, 4, g.pool)?);
            caps.push(Cap::new(CapKind::ChannelEnd, all, 5, g.r_area)?);
            caps.push(Cap::new(CapKind::ChannelEnd, all, 6, g.t_area)?);
        }
        Ok(caps)
    }
}

/// Handles what the supervisor sent; false when it has gone.
/// Every broken channel of the group: (name, what happened, whether its peer is
/// a swapped-out tcp domain).
fn broken_channels(engine: &mut Engine, links: &[(String, Kind, Kind)]) -> Vec<(String, String, bool)> {
    let name = |l: Kind, r: Kind| links.iter().find(|(_, a, b)| (*a, *b) == (l, r)).map(|(n, _, _)| n.clone());
    let mut out = Vec::new();
    if let Engine::Stack(s) = engine {
        if let (Some(why), Some(n)) = (s.broken(), name(Kind::Ip, Kind::Driver)) {
            out.push((n, format!("the driver broke the frame channel: {why}"), false));
        }
    }
    for l in engine.host().cores().links() {
        if let (Some(why), Some(n)) = (l.broken(), name(l.local(), l.remote())) {
            out.push((n, why.to_owned(), l.retiring()));
        }
    }
    out
}

/// The test-only hostile mode (the `hostile` feature only; release builds have no such
/// code): `CAPNET_HOSTILE=KIND:ACTION:DELAY_MS` makes the group running KIND, in
/// its first life, do ACTION once DELAY_MS after it started — `syscall` (one its
/// policy forbids), `garbage` (write garbage over every channel area it owns),
/// `wire` (the same over its side of an in-memory wire only, which it then
/// leaves as it is), `loans` (return
/// a loan it never had on every channel), `flood` (send ten
/// thousand activity notices on every channel), `answers` (ten thousand
/// answers to no call), `pushes` (ten thousand pushed receives nobody asked for)
/// or `grow` (grow the heap past 1 GiB and give it back).
#[cfg(feature = "hostile")]
fn hostile_plan(kinds: &[Kind]) -> Option<(String, Duration)> {
    let v = std::env::var("CAPNET_HOSTILE").ok()?;
    let mut parts = v.split(':');
    let (kind, action, delay) = (parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
    kinds.contains(&Kind::parse(kind)?).then(|| (action.to_owned(), Duration::from_millis(delay)))
}

#[cfg(feature = "hostile")]
fn hostile_act(action: &str, engine: &mut Engine, driver: Option<&capnet_runtime::domain::driver::Driver>) {
    tracing::warn!("hostile mode: {action}");
    match action {
        "syscall" => {
            // socket(2) is in no domain's policy: the trap names it.
            let _ = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::DGRAM, None);
        }
        "garbage" => {
            let garbage = 0xdead_beef;
            if let Engine::Stack(s) = engine {
                s.scribble(garbage);
            }
            if let Some(d) = driver {
                d.scribble(garbage, false);
            }
            for l in engine.host().cores().links() {
                l.scribble(garbage);
            }
        }
        "wire" => {
            if let Some(d) = driver {
                d.scribble(0xdead_beef, true);
            }
        }
        "loans" => {
            for l in engine.host().cores().links() {
                l.return_foreign_loan();
            }
        }
        "flood" | "answers" | "pushes" => {
            engine.host().cores().hostile_flood(action, 10_000);
        }
        "grow" => {
            // Not hostile, only large: what a domain's heap does when peers make
            // it buffer much (each of the allocator's fresh mappings inside the
            // sandbox, past 1 GiB, touched so it is real), then given back.
            let chunks: Vec<Vec<u8>> = (0..18).map(|_| vec![1u8; 64 << 20]).collect();
            let mib = chunks.iter().map(|c| c.len()).sum::<usize>() >> 20;
            tracing::warn!("hostile mode: grew the heap by {mib} MiB inside the sandbox");
        }
        other => tracing::warn!("hostile mode: unknown action {other}"),
    }
}

/// Channels being replaced because their peer restarts.
struct Relinks {
    /// This group's side of an in-memory wire, adopted, waiting for the peer's.
    wire: Option<StackHalf>,
    /// A wire's peer is joined (and has not broken it since).
    wire_joined: bool,
    /// The driver's count of wire peers refused, as last reported.
    wire_refused: u64,
    /// This group's channels: (name, local kind, remote kind).
    links: Vec<(String, Kind, Kind)>,
    /// Sides adopted, waiting for the restarted peer's.
    pending: Vec<(String, Side)>,
    /// Channels whose breaking was reported (until they are joined again), and
    /// whether it was the swapped-out tcp domain's.
    reported: Vec<(String, bool)>,
    /// The applications' send pools viewed here, by application.
    app_pools: std::collections::BTreeMap<u64, (Option<capnet_ipc::lent::PoolKey>, u16)>,
    /// Send pools of applications gone, retired since when (forgotten after
    /// [`RETIRE_GRACE`]).
    retiring: Vec<(Instant, capnet_ipc::lent::PoolKey)>,
}

/// How long a departed application's send pool is still read: longer than
/// any loan of it takes to cross a ring.
const RETIRE_GRACE: Duration = Duration::from_secs(10);

/// This group's side of a fresh channel.
enum Side {
    Msg(MsgHalf),
    /// A channel to a second tcp domain, beside the present one.
    Beside(MsgHalf),
    /// ip's side of the frame channel.
    Frames(StackHalf),
    /// The driver's side of the frame channel.
    DriverFrames(DriverHalf),
}

fn control(
    sock: &UnixStream,
    mut sockets: Option<&mut SocketsHost>,
    engine: &mut Engine,
    driver: Option<&capnet_runtime::domain::driver::Driver>,
    tap: &FrameTap,
    relinks: &mut Relinks,
) -> Result<bool> {
    let mut probe = [0u8; 1];
    let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(std::os::fd::AsRawFd::as_raw_fd(sock), &mut probe, flags) {
        Ok(0) => return Ok(false),
        Ok(_) => {}
        Err(nix::errno::Errno::EAGAIN) => return Ok(true),
        Err(e) => return Err(e.into()),
    }
    // The socket stays blocking (switching needs ioctl, which no domain may
    // call): the peek above said a message is there, and it comes whole.
    let r = (|| -> Result<()> {
        let msg: Control = recv_msg(sock)?;
        if msg == Control::Capture {
            let mut caps = recv_caps(sock.as_fd())?;
            match (caps.pop(), caps.is_empty()) {
                (Some(c), true) if c.kind == CapKind::Socket => {
                    tap.install(c.into_fd());
                    tracing::info!("capture started");
                }
                _ => bail!("a capture without exactly its socket"),
            }
            return Ok(());
        }
        if msg == Control::FramePool {
            let mut caps = recv_caps(sock.as_fd())?;
            match (caps.pop(), caps.is_empty()) {
                (Some(c), true) if c.kind == CapKind::Pool => {
                    let cores = engine.host().cores();
                    // The old generation stays readable through the handles on it.
                    let key = cores.views.add(capnet_runtime::frames::RX_POOL, c.into_fd())?;
                    tracing::info!("the driver's frame pool was made again: viewing {key:?}");
                }
                _ => bail!("a frame pool without exactly its pool"),
            }
            send_msg(sock, &Event::Relinked(capnet_proto::group::FRAME_POOL.into()))?;
            return Ok(());
        }
        if let Control::AppPool { app, alias } = msg {
            let mut caps = recv_caps(sock.as_fd())?;
            match (caps.pop(), caps.is_empty()) {
                (Some(c), true) if c.kind == CapKind::Pool => {
                    let fd = c.into_fd();
                    // The application made it: a bad one is its failure alone
                    // (every group refuses it alike; the sockets domain,
                    // granted it last, cuts the application off).
                    if let Some(d) = driver {
                        // The driver's writer reads ip's frames from it (and
                        // checks it, as every view does).
                        d.app_pool(alias, Some(fd));
                        relinks.app_pools.insert(app, (None, alias));
                    } else if sockets.is_some() {
                        // The sockets domain here views it already (granted
                        // with its application, after this): ip, lent nothing
                        // of it by another group, needs only its key, to name
                        // it to the driver.
                        match capnet_ipc::region::inode(fd.as_fd()) {
                            Ok(gen) => {
                                let key = capnet_ipc::lent::PoolKey { id: capnet_proto::app::SEND_POOL, gen };
                                relinks.app_pools.insert(app, (None, alias));
                                if let Engine::Stack(stack) = engine {
                                    stack.lend_to_driver(key, alias);
                                }
                            }
                            Err(e) => tracing::warn!("application {app}'s send pool is refused: {e}"),
                        }
                    } else {
                        match engine.host().cores().views.add_beside(capnet_proto::app::SEND_POOL, fd) {
                            Ok(key) => {
                                relinks.app_pools.insert(app, (Some(key), alias));
                                // ip lends the driver frames in place from it.
                                if let Engine::Stack(stack) = engine {
                                    stack.lend_to_driver(key, alias);
                                }
                            }
                            Err(e) => tracing::warn!("application {app}'s send pool is refused: {e}"),
                        }
                    }
                }
                _ => bail!("an application's send pool without exactly its pool"),
            }
            send_msg(sock, &Event::Relinked(capnet_proto::group::APP_POOL.into()))?;
            return Ok(());
        }
        if let Control::AppPoolGone(app) = msg {
            if let Some((key, alias)) = relinks.app_pools.remove(&app) {
                if let Some(key) = key {
                    // Lent on no more from now; loans of it already on their
                    // way here (a tcp lending before it heard) are still read
                    // until the grace is over.
                    engine.host().cores().views.retire(key);
                    relinks.retiring.push((Instant::now(), key));
                }
                if let Engine::Stack(stack) = engine {
                    stack.forget_driver_alias(alias);
                }
                if let Some(d) = driver {
                    d.app_pool(alias, None);
                }
            }
            return Ok(());
        }
        if let Control::WireSide | Control::WirePeer = msg {
            let mut caps = recv_caps(sock.as_fd())?.into_iter().map(Cap::into_fd);
            let mut next = || caps.next().ok_or_else(|| anyhow!("too few capabilities for the wire"));
            let grant = HalfGrant { pool: next()?, r_area: next()?, t_area: next()? };
            if msg == Control::WireSide {
                relinks.wire = Some(StackHalf::adopt(grant)?);
                send_msg(sock, &Event::Relinked(WIRE.into()))?;
                return Ok(());
            }
            let ours = relinks.wire.take().ok_or_else(|| anyhow!("a wire's peer before our side of it"))?;
            match (driver, engine) {
                (Some(d), _) => d.plug(ours, grant)?,
                (None, Engine::Stack(s)) => s.plug(ours.attach(grant, Peer::Wire)?)?,
                _ => bail!("a wire's peer for a group that does not run the driver"),
            }
            relinks.wire_joined = true;
            send_msg(sock, &Event::Joined(WIRE.into()))?;
            tracing::info!("the in-memory wire's peer joined");
            return Ok(());
        }
        if let Control::Retired(c) = &msg {
            let cores = engine.host().cores();
            cores.tcp_retired();
            if let Some(s) = sockets {
                let is_old = |id| cores.sockets.tcp_socket_retiring(id);
                s.core.tcp_retired(is_old);
            }
            relinks.reported.retain(|(x, old)| x != c || !*old);
            tracing::info!("channel {c}: the swapped-out tcp domain is gone");
            return Ok(());
        }
        if let Control::Relink(c) | Control::Peer(c) | Control::Beside(c) = &msg {
            let (_, l, r) =
                relinks.links.iter().find(|(n, _, _)| n == c).cloned().ok_or_else(|| anyhow!("no channel {c} here"))?;
            let mut caps = recv_caps(sock.as_fd())?.into_iter().map(Cap::into_fd);
            let mut next = || caps.next().ok_or_else(|| anyhow!("too few capabilities for channel {c}"));
            if let Control::Beside(_) = msg {
                if r != Kind::Tcp {
                    bail!("only a tcp domain may join beside another, not {r}");
                }
                let side = Side::Beside(MsgHalf::adopt(MsgGrant { area: next()?, pool: next()? }, end_of(l, r))?);
                relinks.pending.retain(|(n, _)| n != c);
                relinks.pending.push((c.clone(), side));
                send_msg(sock, &Event::Relinked(c.clone()))?;
                return Ok(());
            }
            if let Control::Relink(_) = msg {
                let side = if (l, r) == (Kind::Ip, Kind::Driver) {
                    Side::Frames(StackHalf::adopt(HalfGrant { pool: next()?, r_area: next()?, t_area: next()? })?)
                } else if (l, r) == (Kind::Driver, Kind::Ip) {
                    Side::DriverFrames(DriverHalf::adopt(HalfGrant {
                        pool: next()?,
                        r_area: next()?,
                        t_area: next()?,
                    })?)
                } else {
                    Side::Msg(MsgHalf::adopt(MsgGrant { area: next()?, pool: next()? }, end_of(l, r))?)
                };
                relinks.pending.retain(|(n, _)| n != c);
                relinks.pending.push((c.clone(), side));
                // Until the new peer is joined, nothing waits on the old one.
                if let Some(link) = engine.host().cores().links().find(|x| (x.local(), x.remote()) == (l, r)) {
                    link.set_replacing(true);
                }
                send_msg(sock, &Event::Relinked(c.clone()))?;
                return Ok(());
            }
            let k = relinks.pending.iter().position(|(n, _)| n == c).ok_or_else(|| anyhow!("no fresh side of {c}"))?;
            match (relinks.pending.remove(k).1, engine) {
                (Side::Msg(half), engine) => {
                    let end = half.attach(end_of(l, r), MsgGrant { area: next()?, pool: next()? })?;
                    engine.host().cores().replace_link(l, r, end)?;
                    if (l, r) == (Kind::Sockets, Kind::Udp) {
                        // A new udp domain: every UDP socket bound again there,
                        // before any application call can reach it.
                        if let Some(s) = sockets.as_mut() {
                            s.core.udp_replaced(engine.host().cores());
                            tracing::info!("every UDP socket is bound again on the new udp domain");
                        }
                    }
                }
                (Side::Beside(half), engine) => {
                    let end = half.attach(end_of(l, r), MsgGrant { area: next()?, pool: next()? })?;
                    let cores = engine.host().cores();
                    cores.tcp_beside(l, end)?;
                    if let Some(s) = sockets.as_mut() {
                        s.core.tcp_added(cores);
                        tracing::info!("every TCP listener listens on the new tcp domain too");
                    }
                    send_msg(sock, &Event::Joined(c.clone()))?;
                    tracing::info!(
                        "channel {c}: a new tcp domain joined beside the old one, which finishes its connections"
                    );
                    return Ok(());
                }
                (Side::Frames(half), Engine::Stack(stack)) => {
                    stack.rejoin(half, HalfGrant { pool: next()?, r_area: next()?, t_area: next()? })?
                }
                (Side::Frames(_), _) => bail!("a fresh frame channel for a group that does not wait on one"),
                (Side::DriverFrames(half), _) => match driver {
                    Some(d) => d.rejoin(half, HalfGrant { pool: next()?, r_area: next()?, t_area: next()? })?,
                    None => bail!("a fresh frame channel for a group without the driver's threads"),
                },
            }
            relinks.reported.retain(|(x, old)| x != c || *old);
            send_msg(sock, &Event::Joined(c.clone()))?;
            tracing::info!("channel {c} joined again: the {r} domain restarted");
            return Ok(());
        }
        if let Control::Lost(what) = &msg {
            let cores = engine.host().cores();
            let now = cores.now();
            match (what.as_str(), sockets) {
                ("tcp", Some(s)) => s.core.transport_lost(capnet_sockets::Lost::Tcp),
                ("udp", Some(s)) => s.core.transport_lost(capnet_sockets::Lost::Udp),
                ("echo", Some(s)) => s.core.transport_lost(capnet_sockets::Lost::Echo),
                ("sockets", _) => {
                    if let Some(tcp) = cores.tcp.as_mut() {
                        tcp.core.abort_all(now);
                    }
                    if let Some(udp) = cores.udp.as_mut() {
                        udp.core.close_all();
                    }
                }
                (other, _) => bail!("told that {other} was lost, which means nothing here"),
            }
            tracing::info!("the {what} domain restarted: what this group held of it is gone");
            return Ok(());
        }
        let host = engine.host();
        let Some(sockets) = sockets else { bail!("a {msg:?} for a group without the sockets domain") };
        match msg {
            Control::AdoptApp(app) => {
                let blank = take_pair(sock)?;
                let half = MsgHalf::adopt(blank, End::A)?;
                // The pools received data lies in here go to the application
                // (read-only), so its data can be lent, not copied.
                let lends = host.lend_pools();
                let keys = lends.iter().map(|(k, _)| *k).collect();
                let pools = lends.iter().map(|(k, _)| k.id).collect();
                send_msg(sock, &Event::Adopted { app, pools })?;
                if !lends.is_empty() {
                    let held: Vec<_> = lends.iter().map(|(k, fd)| (CapKind::Pool, u32::from(k.id), *fd)).collect();
                    send_held(sock.as_fd(), Rights::READ | Rights::MAP, &held)?;
                }
                sockets.pending.push((app, half, keys));
            }
            Control::AppGrant(app) => {
                let mut caps = recv_caps(sock.as_fd())?.into_iter();
                let shape = [CapKind::ChannelEnd, CapKind::Pool, CapKind::Pool];
                let (Some(area), Some(pool), Some(send_pool), None) =
                    (caps.next(), caps.next(), caps.next(), caps.next())
                else {
                    bail!("an application's grant is its channel's area and pool and its send pool");
                };
                if [area.kind, pool.kind, send_pool.kind] != shape {
                    bail!("an application's grant is its channel's area and pool and its send pool");
                }
                let theirs = MsgGrant { area: area.into_fd(), pool: pool.into_fd() };
                let k = sockets
                    .pending
                    .iter()
                    .position(|(a, _, _)| *a == app)
                    .ok_or_else(|| anyhow!("no pending application {app}"))?;
                let (_, half, lends) = sockets.pending.remove(k);
                // The application made its regions: a bad one is its failure alone.
                match half.attach(End::A, theirs).map_err(|e| e.to_string()).and_then(|end| {
                    sockets
                        .add(app, end, lends, send_pool.into_fd(), host.cores())
                        .map_err(|e| format!("its send pool: {e}"))
                }) {
                    Ok(()) => tracing::info!("application {app} attached"),
                    Err(e) => {
                        tracing::warn!("application {app} granted regions that are not what they claim ({e}): refused");
                        let why = format!("it granted regions that are not what they claim: {e}");
                        send_msg(sock, &Event::CutOff { app, why })?;
                    }
                }
            }
            Control::Detach(app) => {
                sockets.detach(app, host.cores());
                tracing::info!("application {app} left: its sockets are closed");
            }
            Control::Capture
            | Control::FramePool
            | Control::AppPool { .. }
            | Control::AppPoolGone(_)
            | Control::WireSide
            | Control::WirePeer
            | Control::Relink(_)
            | Control::Peer(_)
            | Control::Beside(_)
            | Control::Retired(_)
            | Control::Lost(_) => {}
        }
        Ok(())
    })();
    r.map(|_| true)
}

/// An area and a pool, as capabilities on the supervisor socket.
fn take_pair(sock: &UnixStream) -> Result<MsgGrant> {
    let mut caps = recv_caps(sock.as_fd())?;
    if caps.len() != 2 {
        bail!("expected an area and a pool, got {} capabilities", caps.len());
    }
    let pool = caps.pop().map(Cap::into_fd);
    let area = caps.pop().map(Cap::into_fd);
    match (area, pool) {
        (Some(area), Some(pool)) => Ok(MsgGrant { area, pool }),
        _ => bail!("missing capabilities"),
    }
}

/// The report this group publishes.
/// `app_loans`: the sockets domain's loans to applications (made so far, held now).
fn report(
    spec: &GroupSpec,
    cores: &mut Cores,
    device: Option<DeviceStats>,
    app_loans: Option<(u64, u64)>,
) -> GroupReport {
    let mut r = GroupReport::default();
    for (name, k) in &spec.domains {
        let counters = match Kind::parse(k) {
            Some(Kind::Driver) => device.map(|d| counters::driver_counters(&d)).unwrap_or_default(),
            Some(Kind::Ip) => cores.ip.as_ref().map(|d| counters::ip_counters(&d.core)).unwrap_or_default(),
            Some(Kind::Udp) => cores.udp.as_ref().map(|d| counters::udp_counters(d.core.stats())).unwrap_or_default(),
            Some(Kind::Tcp) => cores.tcp.as_ref().map(|d| counters::tcp_counters(d.core.stats())).unwrap_or_default(),
            Some(Kind::Sockets) => app_loans
                .map(|(made, held)| BTreeMap::from([("app_loans".into(), made), ("app_loans_held".into(), held)]))
                .unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        let mut counters = counters;
        if let Some(k) = Kind::parse(k) {
            for l in cores.links().filter(|l| l.local() == k) {
                counters.extend(l.counters());
            }
        }
        r.domains.push((name.clone(), counters));
    }
    // The process's copies through pools, on its first domain (a group is one
    // process: summing over domains counts them once).
    if let Some((_, c)) = r.domains.first_mut() {
        c.insert("bytes_copied".into(), capnet_ipc::pool::bytes_copied());
        c.insert("header_bytes_copied".into(), capnet_ipc::lent::header_bytes());
    }
    if let Some(tcp) = cores.tcp.as_ref() {
        let (conns, listening) = tcp.core.sockets();
        r.tcp_connections_total = conns.len();
        r.tcp_connections =
            conns.into_iter().take(capnet_proto::report::MAX_LISTED).map(counters::tcp_connection).collect();
        r.tcp_listening = listening;
    }
    if let Some(ip) = cores.ip.as_ref() {
        r.routes = ip
            .core
            .routes()
            .routes()
            .iter()
            .map(|x| RouteEntry { dest: x.dest.to_string(), via: x.via.map(|v| v.to_string()) })
            .collect();
    }
    r
}
