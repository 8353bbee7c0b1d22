//! `capnet up` and `capnet down`: the supervisor's life cycle.
//!
//! Today every group runs as threads of the supervisor's process (`--mono`, or
//! `--two-group` with the driver joined by ipc channels); the per-domain sandboxed
//! processes arrive with the factored graph. What `up` makes — the namespace (and
//! with it the TAP), the run directory with the control socket, pid file and log —
//! `down` removes, also after a crash or a `kill -9`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use capnet_ip::{Config, EthernetAddress, Ipv4Cidr};
use capnet_ipc::region::RegionRo;
use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapKind, Rights};
use capnet_kernel_shim::device::Device;
use capnet_kernel_shim::netns;
use capnet_kernel_shim::sandbox::{inspect_threads, StatsRegion};
use capnet_kernel_shim::spawn::{sibling_binary, spawn, Child, Limits, Namespaces, SpawnConfig};
use capnet_runtime::two_group::{self, HalfGrant, StackHalf};
use capnet_runtime::{AppHost, DeviceStats, LinkImpairment, MonoStack, Stack};
use std::os::fd::AsFd;

use crate::control::{self, recv, run_dir, send, socket_path, Reply, Request};
use crate::status::{Domain, RouteEntry, Status};
use crate::UpArgs;
use capnet_ipc::control::{decode, encode_with};
use capnet_ipc::msg::MsgEnd;
use capnet_sockets::{AppId, SocketsCore};

/// Removes what `up` made when dropped.
struct Made {
    netns: String,
}

impl Drop for Made {
    fn drop(&mut self) {
        let _ = netns::delete(&self.netns);
        let _ = std::fs::remove_dir_all(run_dir(&self.netns));
    }
}

fn ip_cmd(netns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .context("running `ip` (iproute2) to configure the kernel side of the TAP")?;
    if !out.status.success() {
        bail!("ip -n {netns} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn same_subnet(a: Ipv4Addr, b: Ipv4Addr, prefix: u8) -> bool {
    let mask = u32::MAX << (32 - u32::from(prefix));
    u32::from(a) & mask == u32::from(b) & mask
}

/// `capnet up`.
pub fn up(args: UpArgs) -> Result<()> {
    let (host, host_prefix) = args.host_addr;
    let (addr, prefix) = args.addr;
    if host == addr {
        bail!("--host-addr and --addr are both {addr}: the kernel and the stack need addresses of their own");
    }
    if host_prefix != prefix || !same_subnet(host, addr, prefix) {
        bail!("--host-addr {host}/{host_prefix} and --addr {addr}/{prefix} must be on one subnet");
    }
    for (name, p) in [("--loss", args.loss), ("--reorder", args.reorder)] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} {p} is not a probability between 0 and 1");
        }
    }
    netns::path(&args.target.netns)?;
    if control::ask(&args.target.netns, &Request::Status).is_ok() {
        bail!("capnet is already up in namespace {0}: `capnet status --netns {0}` shows it", args.target.netns);
    }
    if netns::exists(&args.target.netns) {
        bail!(netns::NetnsError::Exists(args.target.netns.clone()));
    }
    if args.detach {
        return detach(&args);
    }
    run(args)
}

/// Starts the supervisor in the background and returns once it answers.
fn detach(args: &UpArgs) -> Result<()> {
    let dir = run_dir(&args.target.netns);
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
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

enum Running {
    Mono(Box<MonoStack>),
    TwoGroup(Box<two_group::StackGroup>, DriverProcess),
}

/// The driver domain running sandboxed as its own process.
struct DriverProcess {
    child: Child,
    stats: RegionRo,
    /// Closing it tells the driver the supervisor is gone.
    _sock: UnixStream,
    /// The supervisor's own handle on the device: the TAP outlives a driver crash.
    _device: Device,
}

/// The uid the driver domain runs under.
const DRIVER_UID: u32 = 61_100;

/// Spawns the driver domain, grants it the device, exchanges halves with it, and
/// waits until every one of its threads is confined.
fn spawn_driver(dev: Device, args: &UpArgs, stack: &StackHalf) -> Result<(DriverProcess, HalfGrant)> {
    let program = sibling_binary("capnet-driver").context("capnet-driver is not installed next to capnet")?;
    let (ours, theirs) = UnixStream::pair()?;
    let cfg = SpawnConfig {
        program,
        args: [
            "--loss",
            &args.loss.to_string(),
            "--reorder",
            &args.reorder.to_string(),
            "--seed",
            &args.seed.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        env: vec![("RUST_BACKTRACE".into(), "1".into())],
        namespaces: Namespaces::ALL,
        uid: DRIVER_UID,
        limits: Limits::default(),
        fds: vec![theirs.into()],
    };
    let child = spawn(&cfg)?;
    ours.set_read_timeout(Some(Duration::from_secs(10)))?;
    // The tag tells the driver whether frames carry the virtio-net header (1).
    let vnet = matches!(dev.kind(), capnet_kernel_shim::device::DeviceKind::Tap(o) if o.vnet_hdr);
    let rights = Rights::READ | Rights::WRITE | Rights::GRANT;
    let device = Cap::new(CapKind::Device, rights, u32::from(vnet), dev.fd().try_clone_to_owned()?)?;
    send_caps(ours.as_fd(), &[(&device, Rights::READ | Rights::WRITE)])?;
    let mut got = recv_caps(ours.as_fd()).context("the driver did not send its regions")?;
    if got.len() != 4 {
        bail!("the driver sent {} capabilities instead of its stats region, pool and two channel areas", got.len());
    }
    let t_area = got.pop().map(Cap::into_fd);
    let r_area = got.pop().map(Cap::into_fd);
    let pool = got.pop().map(Cap::into_fd);
    let stats = got.pop().map(Cap::into_fd);
    let (Some(stats), Some(pool), Some(r_area), Some(t_area)) = (stats, pool, r_area, t_area) else {
        bail!("the driver's capabilities are incomplete")
    };
    let stats = StatsRegion::attach(stats)?;
    let g = stack.grant()?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let ro = Rights::READ | Rights::MAP;
    let mine = [
        Cap::new(CapKind::Pool, all, 1, g.pool)?,
        Cap::new(CapKind::ChannelEnd, all, 2, g.r_area)?,
        Cap::new(CapKind::ChannelEnd, all, 3, g.t_area)?,
    ];
    send_caps(ours.as_fd(), &mine.iter().map(|c| (c, ro)).collect::<Vec<_>>())?;
    // Ready only once every thread of the driver shows the sandbox (DESIGN, "Sandboxes").
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(cause) = child.try_wait(|| StatsRegion::violation(&stats))? {
            bail!("the driver domain died during setup: {cause}");
        }
        let threads = inspect_threads(child.pid()).unwrap_or_default();
        if threads.len() >= 3 && threads.iter().all(|t| t.confined()) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the driver domain did not confine all its threads within 10 s: {threads:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((DriverProcess { child, stats, _sock: ours, _device: dev }, HalfGrant { pool, r_area, t_area }))
}

/// The foreground supervisor: makes everything, runs until Ctrl-C or `down`.
fn run(args: UpArgs) -> Result<()> {
    let name = args.target.netns.clone();
    let dir = run_dir(&name);
    // The namespace first: if it exists (someone else's), nothing of it is touched.
    let path = netns::create(&name)?;
    // From here on, any error (and the end of the run) removes what was made.
    let made = Made { netns: name.clone() };
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    // Offloads where the TAP allows them (the driver completes partial checksums).
    let dev = Device::open_tap(&args.tap, Some(&path), true)?;
    let (host, prefix) = args.host_addr;
    let (addr, _) = args.addr;
    let _ = Command::new("ip")
        .args(["netns", "exec", &name, "sysctl", "-qw", &format!("net.ipv6.conf.{}.disable_ipv6=1", args.tap)])
        .output();
    ip_cmd(&name, &["link", "set", "lo", "up"])?;
    ip_cmd(&name, &["link", "set", &args.tap, "up"])?;
    ip_cmd(&name, &["addr", "add", &format!("{host}/{prefix}"), "dev", &args.tap])?;

    let o = addr.octets();
    let mac = EthernetAddress([0x02, 0xca, 0xfe, o[1], o[2], o[3]]);
    let mut cfg = Config::new(mac, Ipv4Cidr::new(addr, prefix));
    cfg.gateway = Some(host);
    let link = LinkImpairment::symmetric(args.loss, args.reorder, args.seed);
    let mode = if args.mono { "mono" } else { "two-group" };
    let mut stack = if !args.mono {
        let half = StackHalf::new()?;
        // TSO when the TAP takes virtio-net headers and the driver does not
        // impair the link (its stage keeps plain frames).
        let vnet = matches!(dev.kind(), capnet_kernel_shim::device::DeviceKind::Tap(o) if o.vnet_hdr);
        let mut cores = capnet_runtime::Cores::new(cfg, 4 << 20);
        if vnet && args.loss == 0.0 && args.reorder == 0.0 {
            cores.use_tso();
        }
        let (driver, grant) = spawn_driver(dev, &args, &half)?;
        let s = half.join(grant, cores)?;
        Running::TwoGroup(Box::new(s), driver)
    } else {
        Running::Mono(Box::new(MonoStack::new(dev, cfg, 4 << 20, link)?))
    };
    let cores = match &mut stack {
        Running::Mono(s) => s.cores(),
        Running::TwoGroup(s, _) => s.cores(),
    };
    cores.tcp().config_mut().congestion_control = args.tcp_cc;

    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    let started = Instant::now();
    // The routing table, published by ip in a sealed region; the supervisor reads
    // it through a read-only mapping like any other domain would.
    let routes_fd = match &mut stack {
        Running::Mono(s) => s.cores().publish_routes()?.fd().try_clone_to_owned()?,
        Running::TwoGroup(s, _) => s.cores().publish_routes()?.fd().try_clone_to_owned()?,
    };
    let routes_view = RegionRo::attach(routes_fd, capnet_ip::publish::REGION_LEN)?;
    let routes = capnet_ip::publish::read(&routes_view)?
        .iter()
        .map(|r| RouteEntry { dest: r.dest.to_string(), via: r.via.map(|v| v.to_string()) })
        .collect();
    let base = Status {
        mode: mode.into(),
        netns: name.clone(),
        tap: args.tap.clone(),
        host_addr: format!("{host}/{prefix}"),
        addr: format!("{addr}/{prefix}"),
        domains: Vec::new(),
        routes,
        tcp_connections: Vec::new(),
        tcp_listening: Vec::new(),
    };
    let snapshot = Arc::new(Mutex::new(String::new()));
    *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = render(&base, &mut stack, started)?;
    let sock = socket_path(&name);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(dir.join("pid"), format!("{}\n", std::process::id()))?;
    {
        let (snapshot, stop) = (snapshot.clone(), stop.clone());
        std::thread::Builder::new().name("control".into()).spawn(move || serve(listener, snapshot, stop))?;
    }
    let (app_tx, app_rx) = std::sync::mpsc::channel::<(MsgEnd, UnixStream)>();
    {
        let path = capnet::attach::app_socket(&name);
        let _ = std::fs::remove_file(&path);
        let apps = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        std::thread::Builder::new().name("apps".into()).spawn(move || serve_apps(apps, app_tx))?;
    }
    let mut apps = Apps::default();
    println!("capnet up: {mode} stack at {addr}/{prefix} on {} in namespace {name}; the kernel is {host}", args.tap);
    println!("try: ip netns exec {name} ping {addr}");
    let _ = std::io::stdout().flush();

    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        while let Ok((msg, sock)) = app_rx.try_recv() {
            apps.add(msg, sock);
        }
        let r = match &mut stack {
            Running::Mono(s) => apps.serve(&mut **s),
            Running::TwoGroup(s, _) => apps.serve(&mut **s),
        };
        if let Err(e) = r {
            eprintln!("capnet: the stack failed: {e}; taking it down");
            break;
        }
        if last.elapsed() >= Duration::from_millis(200) {
            *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = render(&base, &mut stack, started)?;
            last = Instant::now();
        }
    }
    if let Running::TwoGroup(_, d) = &stack {
        if let Ok(Some(cause)) = d.child.try_wait(|| StatsRegion::violation(&d.stats)) {
            eprintln!("capnet: the driver domain ended: {cause}");
        }
    }
    drop(stack);
    drop(made);
    println!("capnet down: namespace {name} and its TAP removed");
    Ok(())
}

/// The status object as JSON, from the live counters.
fn render(base: &Status, stack: &mut Running, started: Instant) -> Result<String> {
    let me = std::process::id() as i32;
    let (device, driver_pid, cores) = match stack {
        Running::Mono(s) => (s.device_stats(), me, s.cores()),
        Running::TwoGroup(s, d) => (driver_process_stats(&d.stats), d.child.pid(), s.cores()),
    };
    let domain = |name: &str, pid: i32, counters: BTreeMap<String, u64>| {
        let (cpu_s, rss_bytes) = process_usage(pid);
        Domain {
            name: name.into(),
            pid,
            state: "running".into(),
            restarts: 0,
            uptime_s: started.elapsed().as_secs_f64(),
            cpu_s,
            rss_bytes,
            counters,
            last_error: None,
        }
    };
    let mut status = base.clone();
    status.domains = vec![
        domain("driver", driver_pid, driver_counters(&device)),
        domain("ip", me, ip_counters(cores.ip().stats())),
        domain("udp", me, udp_counters(cores.udp().stats())),
        domain("tcp", me, tcp_counters(cores.tcp().stats())),
    ];
    let (conns, listening) = cores.tcp().sockets();
    status.tcp_connections = conns.into_iter().map(Into::into).collect();
    status.tcp_listening = listening;
    Ok(serde_json::to_string(&status)?)
}

fn driver_counters(d: &DeviceStats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    c.insert("frames_in".into(), d.frames_read);
    c.insert("frames_out".into(), d.frames_written);
    c.insert("write_errors".into(), d.write_errors);
    for (dir, s) in [("in", d.inbound), ("out", d.outbound)] {
        c.insert(format!("impair_{dir}_dropped"), s.dropped);
        c.insert(format!("impair_{dir}_duplicated"), s.duplicated);
        c.insert(format!("impair_{dir}_reordered"), s.reordered);
        c.insert(format!("impair_{dir}_corrupted"), s.corrupted);
    }
    c
}

fn ip_counters(s: &capnet_ip::Stats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    c.insert("frames_in".into(), s.frames_in);
    c.insert("frames_out".into(), s.frames_out);
    c.insert("packets_in".into(), s.packets_in);
    c.insert("packets_out".into(), s.packets_out);
    c.insert("echo_replies".into(), s.echo_replies);
    c.insert("arp_requests".into(), s.arp_requests);
    for r in capnet_ip::DropReason::ALL {
        c.insert(format!("drop_{}", r.name()), s.dropped(r));
    }
    c
}

fn udp_counters(s: &capnet_udp::Stats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    c.insert("datagrams_in".into(), s.datagrams_in);
    c.insert("datagrams_out".into(), s.datagrams_out);
    for r in capnet_udp::DropReason::ALL {
        c.insert(format!("drop_{}", r.name()), s.dropped(r));
    }
    c
}

fn tcp_counters(s: &capnet_tcp::Stats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    for (k, v) in [
        ("segments_in", s.segments_in),
        ("segments_out", s.segments_out),
        ("data_segments_out", s.data_segments_out),
        ("bytes_in", s.bytes_in),
        ("retransmits", s.retransmits),
        ("fast_retransmits", s.fast_retransmits),
        ("timeouts", s.timeouts),
        ("active_opens", s.active_opens),
        ("passive_opens", s.passive_opens),
        ("resets_in", s.resets_in),
        ("resets_out", s.resets_out),
        ("challenge_acks", s.challenge_acks),
        ("keepalive_probes", s.keepalive_probes),
        ("keepalive_timeouts", s.keepalive_timeouts),
    ] {
        c.insert(k.into(), v);
    }
    for r in capnet_tcp::DropReason::ALL {
        c.insert(format!("drop_{}", r.name()), s.dropped(r));
    }
    c
}

/// The driver domain's counters, as it publishes them in its stats region (the
/// order `capnet-driver` writes them in).
fn driver_process_stats(stats: &RegionRo) -> DeviceStats {
    let g = |i| StatsRegion::get(stats, i);
    let mut d = DeviceStats { frames_read: g(0), frames_written: g(1), write_errors: g(2), ..DeviceStats::default() };
    (d.inbound.dropped, d.inbound.duplicated, d.inbound.reordered, d.inbound.corrupted) = (g(3), g(4), g(5), g(6));
    (d.outbound.dropped, d.outbound.duplicated, d.outbound.reordered, d.outbound.corrupted) = (g(7), g(8), g(9), g(10));
    d
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

/// One attached application.
struct App {
    id: AppId,
    msg: MsgEnd,
    sock: UnixStream,
    outbox: std::collections::VecDeque<Vec<u8>>,
}

/// The sockets domain and the applications it serves (in the stack group).
#[derive(Default)]
struct Apps {
    sockets: Option<SocketsCore>,
    list: Vec<App>,
    checked: Option<Instant>,
}

impl Apps {
    fn add(&mut self, msg: MsgEnd, sock: UnixStream) {
        let mut secret = [0u8; 8];
        let _ = rustix::rand::getrandom(&mut secret, rustix::rand::GetRandomFlags::empty());
        let id = self.sockets.get_or_insert_with(SocketsCore::new).attach(u64::from_ne_bytes(secret));
        let _ = sock.set_nonblocking(true);
        self.list.push(App { id, msg, sock, outbox: Default::default() });
    }

    /// One round: wait for the device side or an application, run calls, answer.
    fn serve<S: AppHost>(&mut self, stack: &mut S) -> Result<(), capnet_runtime::RuntimeError> {
        {
            let mut ends: Vec<_> = self.list.iter_mut().map(|a| a.msg.channel()).collect();
            stack.poll_apps(Duration::from_millis(50), &mut ends)?;
        }
        let Some(sockets) = self.sockets.as_mut() else { return Ok(()) };
        let mut gone = Vec::new();
        for (i, app) in self.list.iter_mut().enumerate() {
            let mut garbage = false;
            let r = app.msg.recv(|m| match decode::<capnet_sockets::Request>(m) {
                Ok(req) if !garbage => sockets.request(app.id, req, stack.cores()),
                Ok(_) => {}
                Err(_) => garbage = true,
            });
            if r.is_err() || garbage {
                gone.push(i); // broke the channel protocol: cut off
            }
        }
        let cores = stack.cores();
        for (ident, from, seq, data) in std::mem::take(&mut cores.echo_replies) {
            sockets.echo_reply(ident, from, seq, data);
        }
        sockets.poll_ready(cores);
        while let Some((id, resp)) = sockets.pop_response() {
            let Some(app) = self.list.iter_mut().find(|a| a.id == id) else { continue };
            // Straight into the channel when nothing waits before it; else queued.
            let _ = encode_with(&resp, |bytes| {
                if !app.outbox.is_empty() || !matches!(app.msg.send(bytes), Ok(true)) {
                    app.outbox.push_back(bytes.to_vec());
                }
            });
        }
        for app in &mut self.list {
            while let Some(m) = app.outbox.front() {
                match app.msg.send(m) {
                    Ok(true) => {
                        app.outbox.pop_front();
                    }
                    _ => break,
                }
            }
        }
        // Applications that closed their attach socket are gone.
        if self.checked.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            self.checked = Some(Instant::now());
            for (i, app) in self.list.iter().enumerate() {
                if capnet::attach::closed_by_peer(&app.sock) {
                    gone.push(i);
                }
            }
        }
        gone.sort_unstable();
        gone.dedup();
        for i in gone.into_iter().rev() {
            let app = self.list.remove(i);
            sockets.detach(app.id, stack.cores());
        }
        stack.push()
    }
}

/// Accepts applications: checks the caller, runs the attach handshake, hands the
/// new channel to the stack's thread.
fn serve_apps(listener: UnixListener, to_stack: std::sync::mpsc::Sender<(MsgEnd, UnixStream)>) {
    let me = nix::unistd::geteuid().as_raw();
    for (n, conn) in listener.incoming().enumerate() {
        let Ok(conn) = conn else { continue };
        let allowed = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .is_ok_and(|c| c.uid() == me || c.uid() == 0);
        if !allowed {
            continue;
        }
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        match capnet::attach::serve(&conn, &format!("capnet-sockets-{n}")) {
            Ok(msg) => {
                if to_stack.send((msg, conn)).is_err() {
                    return;
                }
            }
            Err(e) => eprintln!("capnet: an application failed to attach: {e}"),
        }
    }
}

/// Serves the control socket: one request per connection, from our own user only.
fn serve(listener: UnixListener, snapshot: Arc<Mutex<String>>, stop: Arc<AtomicBool>) {
    let me = nix::unistd::geteuid().as_raw();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let allowed = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
            .is_ok_and(|c| c.uid() == me || c.uid() == 0);
        if !allowed {
            let _ =
                send(&mut conn, &Reply::Refused("only the supervisor's own user may use its control socket".into()));
            continue;
        }
        let reply = match recv::<Request>(&mut conn) {
            Ok(Request::Status) => Reply::Status(snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone()),
            Ok(Request::Down) => {
                stop.store(true, Ordering::Relaxed);
                Reply::Ok
            }
            Err(e) => Reply::Refused(format!("bad request: {e}")),
        };
        let _ = send(&mut conn, &reply);
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
            if !dir.exists() && !netns::exists(name) {
                println!("capnet down: namespace {name} and its TAP removed");
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
    let had = netns::exists(name) || dir.exists();
    netns::delete(name)?;
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
