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

mod apps;
pub mod control;
pub mod graph;
mod groups;
mod serve;
mod trust;

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
use capnet_kernel_shim::device::Device;
use capnet_kernel_shim::{netns, userns};
use capnet_proto::group::{send_msg, Control, Event, GroupSpec, WIRE};
use capnet_proto::report::Status;
use graph::Graph;

use apps::{attach_app, max_applications, serve_apps};
use clap::Args;
use control::{run_dir, send, socket_path, Reply, Request};
use graph::parse_cidr;
use groups::{Change, Running};
use serve::serve as serve_control;
use serve::{render, start_capture};

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
        frame_pool: false,
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
    // The threads serving the sockets wake the loop when they hand it something
    // (an application attaching waits for no tick).
    let (wake_tx, wake_rx) = std::sync::mpsc::channel::<()>();
    // Applications' socket first: the control socket answering is what says
    // the stack is up (`up -d` waits for it), so attaching works from then on.
    let (app_tx, app_rx) = std::sync::mpsc::channel::<(UnixStream, capnet::attach::AppSide)>();
    {
        let path = capnet::attach::app_socket(&name);
        let _ = std::fs::remove_file(&path);
        let apps = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let wake = wake_tx.clone();
        std::thread::Builder::new().name("apps".into()).spawn(move || serve_apps(apps, app_tx, wake))?;
    }
    let sock = socket_path(&name);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(dir.join("pid"), format!("{}\n", std::process::id()))?;
    let (capture_tx, capture_rx) = std::sync::mpsc::channel::<UnixStream>();
    let (restart_tx, restart_rx) = std::sync::mpsc::channel::<(Change, UnixStream)>();
    {
        let (snapshot, stop, wake) = (snapshot.clone(), stop.clone(), wake_tx.clone());
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || serve_control(listener, snapshot, stop, capture_tx, restart_tx, wake))?;
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
    let max_apps = max_applications(&running);
    while !stop.load(Ordering::Relaxed) {
        // Applications that closed their attach socket are gone (first: their
        // places are free for those attaching now).
        let sockets = &running.groups[running.sockets];
        let mut left = Vec::new();
        apps.retain(|(id, conn)| {
            let gone = capnet::attach::closed_by_peer(conn);
            if gone {
                let _ = send_msg(&sockets.sock, &Control::Detach(*id));
                left.push(*id);
            }
            !gone
        });
        while let Ok((conn, theirs)) = app_rx.try_recv() {
            if apps.len() >= max_apps {
                let why = format!(
                    "the stack serves at most {max_apps} applications at once (the groups' rlimits.nofile in the graph bound them)"
                );
                let _ = send(&conn, &capnet::attach::AttachReply::Refused(why));
                continue;
            }
            next_app += 1;
            match attach_app(&mut running, next_app, &conn, theirs) {
                // One that left meanwhile is found closed and detached below.
                Ok(()) => apps.push((next_app, conn)),
                Err(e) => {
                    eprintln!("capnet: an application failed to attach: {e:#}");
                    left.push(next_app);
                }
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
        // Who asked for a restart (answered when it is done), and what failed.
        let (mut asked, mut failed) = (Vec::new(), Vec::new());
        // A group that reports its peer broke a channel: the peer is cut off.
        let mut old_broke = None;
        let mut wire_broke = None;
        for (i, g) in running.groups.iter().enumerate() {
            for e in g.events() {
                if let Event::CutOff { app, why } = &e {
                    eprintln!("capnet: the sockets domain cut application {app} off: {why}");
                    apps.retain(|(id, _)| id != app); // closing its socket tells it
                    left.push(*app);
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
                // A restart (a swap of udp is one) is answered once it is done
                // and `status` shows it.
                Ok(Some(restart)) => {
                    asked.push((restart.0, conn));
                    due.push(restart);
                }
                Ok(None) => {
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
                left.extend(apps.drain(..).map(|(id, _)| id));
            }
            if let Err(e) = running.restart(&set, &cause) {
                eprintln!("capnet: restarting {} failed: {e:#}; taking the stack down", names.join(", "));
                stop.store(true, Ordering::Relaxed);
                failed.extend(set.iter().map(|&g| (g, format!("restarting {} failed: {e:#}", names.join(", ")))));
            }
            // A new driver on a wire: both instances give it fresh sides.
            if set.contains(&running.driver) {
                running.rewire(&name);
            }
        }
        for app in left {
            running.app_pool_gone(app);
        }
        *snapshot.lock().unwrap_or_else(|e| e.into_inner()) = render(&base, &running)?;
        for (g, conn) in asked {
            let reply = match failed.iter().find(|(f, _)| *f == g) {
                Some((_, why)) => Reply::Refused(why.clone()),
                None => Reply::Ok,
            };
            let _ = send(&conn, &reply);
        }
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
