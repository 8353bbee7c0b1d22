//! The bench's hosts: namespaces, TAPs and a veth pair, the stacks brought up
//! on them, and the frame counter for the bare TAP.

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::workload::{client, serve, CapnetNet, PeerServer};
use crate::{costs, sample_of, Comp, Sample, Sizes, Work, COMPS, SMOLTCP_PEER};
use anyhow::{anyhow, bail, Result};
use capnet_proto::report::Status;
use capnet_supervisor::control::{self, Reply, Request};

/// What the bench set up: a capnet stack per graph, the veth pair, the bare TAP.
pub(crate) struct Env {
    pub(crate) exe: PathBuf,
    /// (composition key, namespace) of each capnet stack.
    pub(crate) stacks: Vec<(&'static str, String)>,
    /// The veth pair's namespaces: server, client.
    pub(crate) veth: (String, String),
    /// The bare TAP's namespace, and the TAP.
    pub(crate) device: (String, Option<capnet_kernel_shim::device::Device>),
    /// smoltcp's namespace (its TAP persists there between runs).
    pub(crate) smoltcp: String,
    pub(crate) graphs: PathBuf,
}

/// The TAP smoltcp runs on.
pub(crate) const SMOLTCP_TAP: &str = "capbs";

pub(crate) const SERVER: &str = "10.77.0.2";
pub(crate) const VETH_SERVER: &str = "10.99.0.1";
/// The bare TAP's MAC: Linux gets it as a static neighbour entry.
pub(crate) const DEVICE_MAC: &str = "02:ca:fe:00:00:02";

impl Env {
    pub(crate) fn new() -> Result<Self> {
        let pid = std::process::id();
        let graphs = std::env::temp_dir().join(format!("capb-{pid}-graphs"));
        std::fs::create_dir_all(&graphs)?;
        let mut env = Env {
            exe: std::env::current_exe()?,
            stacks: Vec::new(),
            veth: (format!("capb-{pid}-va"), format!("capb-{pid}-vb")),
            device: (format!("capb-{pid}-dev"), None),
            smoltcp: format!("capb-{pid}-smol"),
            graphs,
        };
        for c in COMPS {
            let (Comp::Capnet(key, graph, _) | Comp::Wire(key, graph, _)) = c else { continue };
            let ns = format!("capb-{pid}-{key}");
            let file = env.graphs.join(format!("{key}.toml"));
            std::fs::write(&file, graph)?;
            let mut ups = vec![(ns.clone(), vec![file.display().to_string()])];
            if let Comp::Wire(..) = c {
                ups[0].1 = vec!["--wire".into(), file.display().to_string()];
                ups.push((format!("{ns}-peer"), vec!["--mono".into(), "--wire-to".into(), ns]));
            }
            for (ns, args) in ups {
                let out = Command::new(&env.exe).args(["up", "-d", "--netns", &ns]).args(&args).output()?;
                // Recorded before the check: dropping `env` takes down what came up, this one too.
                env.stacks.push((key, ns));
                if !out.status.success() {
                    bail!("capnet up ({key}): {}", String::from_utf8_lossy(&out.stderr).trim());
                }
            }
        }
        let (a, b) = env.veth.clone();
        for n in [&a, &b] {
            capnet_kernel_shim::netns::create(n)?;
        }
        ip(&a, &["link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", &b])?;
        for (ns, addr, dev) in [(&a, "10.99.0.1/24", "veth0"), (&b, "10.99.0.2/24", "veth1")] {
            ip(ns, &["addr", "add", addr, "dev", dev])?;
            ip(ns, &["link", "set", dev, "up"])?;
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        let d = env.device.0.clone();
        let path = capnet_kernel_shim::netns::create(&d)?;
        env.device.1 = Some(capnet_kernel_shim::device::Device::open_tap("capb0", Some(&path), false)?);
        ip(&d, &["addr", "add", "10.77.0.1/24", "dev", "capb0"])?;
        ip(&d, &["link", "set", "capb0", "up"])?;
        ip(&d, &["neigh", "add", SERVER, "lladdr", DEVICE_MAC, "dev", "capb0", "nud", "permanent"])?;
        let sm = env.smoltcp.clone();
        capnet_kernel_shim::netns::create(&sm)?;
        ip(&sm, &["tuntap", "add", SMOLTCP_TAP, "mode", "tap"])?;
        ip(&sm, &["addr", "add", "10.77.0.1/24", "dev", SMOLTCP_TAP])?;
        ip(&sm, &["link", "set", SMOLTCP_TAP, "up"])?;
        Ok(env)
    }

    pub(crate) fn netns(&self, c: Comp) -> &str {
        match c {
            Comp::Capnet(k, ..) | Comp::Wire(k, ..) => {
                self.stacks.iter().find(|(key, _)| *key == k).map_or("", |(_, n)| n.as_str())
            }
            Comp::Linux => &self.veth.1,
            Comp::Smoltcp => &self.smoltcp,
            Comp::Device => &self.device.0,
        }
    }

    /// The Linux-side client in namespace `ns`: its whitespace-separated figures.
    pub(crate) fn client(&self, ns: &str, args: &[String]) -> Result<Vec<f64>> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.exe)
            .args(["bench-peer", "client"])
            .args(args)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("the client failed: {}{}", text, String::from_utf8_lossy(&out.stderr).trim());
        }
        text.split_whitespace().map(|x| x.parse().map_err(|e| anyhow!("client printed {text:?}: {e}"))).collect()
    }

    /// Runs `w` on `c` once.
    pub(crate) fn measure(&self, c: Comp, w: Work, sizes: &Sizes) -> Result<Sample> {
        let port = 5001;
        let server_addr = if c == Comp::Linux { VETH_SERVER } else { SERVER };
        let client_args: Vec<String> = match w {
            Work::BulkSend(_) | Work::BulkRecv(_) | Work::Borrowing { .. } => {
                let (n, send) = w.bulk().expect("a bulk workload");
                vec![if send { "read" } else { "write" }.into(), n.to_string(), sizes.bulk_bytes.to_string()]
            }
            Work::Rr(size) => vec!["rr".into(), size.to_string(), sizes.rr_count.to_string()],
            Work::Connect => vec!["connect".into(), sizes.connects.to_string()],
            Work::Udp(size) => vec!["udp".into(), size.to_string(), sizes.udp_secs.to_string()],
        };
        let client_args: Vec<String> =
            [server_addr.to_owned(), port.to_string()].into_iter().chain(client_args).collect();
        let before = self.status(c);
        // The capnet side's applications run in this process: their copies count too.
        let app_before = capnet_ipc::pool::bytes_copied();
        let mut sample = match c {
            Comp::Capnet(..) | Comp::Wire(..) => {
                let in_place = matches!(w, Work::Borrowing { .. });
                let net = CapnetNet::server(self.netns(c)).in_place(in_place);
                let server = serve(&net, w, port, sizes)?;
                let rings = RingWatch::start(self.netns(c));
                let figures = match c {
                    Comp::Wire(..) => {
                        let to = SocketAddrV4::new(server_addr.parse()?, port);
                        let peer = CapnetNet::client(&format!("{}-peer", self.netns(c)))?.in_place(in_place);
                        client(&peer, to, &client_args[2..])?
                    }
                    _ => self.client(self.netns(c), &client_args)?,
                };
                let udp = server.join().map_err(|_| anyhow!("the server panicked"))??;
                let mut s = sample_of(w, &figures, udp);
                s.costs.ring_max = Some(rings.finish());
                s
            }
            Comp::Linux | Comp::Smoltcp => {
                let exe = self.exe.display().to_string();
                let (ns, program) = match c {
                    Comp::Linux => (&self.veth.0, vec![exe.as_str(), "bench-peer"]),
                    _ => (&self.smoltcp, vec![SMOLTCP_PEER, "--tap", SMOLTCP_TAP]),
                };
                let mut server = PeerServer::start(&program, ns, w, port, sizes)?;
                let figures = self.client(self.netns(c), &client_args)?;
                let udp = server.finish()?;
                sample_of(w, &figures, udp)
            }
            Comp::Device => {
                let dev = self.device.1.as_ref().ok_or_else(|| anyhow!("no TAP"))?;
                let counted = count_frames(dev, sizes.udp_secs);
                let figures = self.client(self.netns(c), &client_args)?;
                let udp = counted.join().map_err(|_| anyhow!("the reader panicked"))??;
                sample_of(w, &figures, udp)
            }
        };
        if let Some(b) = before {
            // Each group publishes its report every 100 ms: wait for one made
            // after the run.
            std::thread::sleep(Duration::from_millis(150));
            if let Some(a) = self.status(c) {
                let app = capnet_ipc::pool::bytes_copied() - app_before;
                costs(&mut sample, w, sizes, &b, &a, app);
            }
        }
        Ok(sample)
    }

    pub(crate) fn status(&self, c: Comp) -> Option<Status> {
        let (Comp::Capnet(..) | Comp::Wire(..)) = c else { return None };
        match control::ask(self.netns(c), &Request::Status) {
            Ok(Reply::Status(s)) => serde_json::from_str(&s).ok(),
            _ => None,
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, ns) in &self.stacks {
            let _ = Command::new(&self.exe).args(["down", "--netns", ns]).output();
        }
        for ns in [&self.veth.0, &self.veth.1, &self.device.0, &self.smoltcp] {
            let _ = capnet_kernel_shim::netns::delete(ns);
        }
        let _ = std::fs::remove_dir_all(&self.graphs);
    }
}

pub(crate) fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(["-n", ns]).args(args).output()?;
    if !out.status.success() {
        bail!("ip -n {ns} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Samples a stack's status every 50 ms while a run lasts: the most messages
/// waiting in any one ring between groups (each group publishes its report
/// every 100 ms, so this sees a few snapshots per run, not every peak).
pub(crate) struct RingWatch {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: std::thread::JoinHandle<u64>,
}

impl RingWatch {
    pub(crate) fn start(netns: &str) -> Self {
        let (stop, netns) = (Arc::new(AtomicBool::new(false)), netns.to_owned());
        let done = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut most = 0;
            while !done.load(Ordering::Relaxed) {
                if let Ok(Reply::Status(s)) = control::ask(&netns, &Request::Status) {
                    if let Ok(st) = serde_json::from_str::<Status>(&s) {
                        let waiting = st.domains.iter().flat_map(|d| d.counters.iter());
                        let waiting = waiting.filter(|(k, _)| k.ends_with("_ring_waiting")).map(|(_, v)| *v);
                        most = waiting.fold(most, u64::max);
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            most
        });
        Self { stop, thread }
    }

    pub(crate) fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0) as f64
    }
}

/// Counts the frames the bare TAP delivers until the sender has been quiet for
/// 300 ms after the first: (frames, seconds from the first to the last).
pub(crate) fn count_frames(
    dev: &capnet_kernel_shim::device::Device,
    secs: f64,
) -> std::thread::JoinHandle<Result<Option<(u64, f64)>>> {
    let fd = dev.fd().try_clone_to_owned();
    std::thread::spawn(move || {
        let fd = capnet_runtime::set_nonblocking(fd?)?;
        let mut buf = vec![0u8; 65536];
        let (mut n, mut first, mut last) = (0u64, None, Instant::now());
        let give_up = Instant::now() + Duration::from_secs_f64(secs + 10.0);
        loop {
            match nix::unistd::read(&fd, &mut buf) {
                Ok(len) if len >= 34 && buf[12..14] == [0x08, 0x00] && buf[23] == 17 => {
                    n += 1;
                    last = Instant::now();
                    first.get_or_insert(last);
                }
                Ok(_) => {}
                Err(nix::errno::Errno::EAGAIN) => {
                    let idle = first.map_or(Duration::ZERO, |_| last.elapsed());
                    if idle > Duration::from_millis(300) || Instant::now() > give_up {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(first.map(|f| (n, (last - f).as_secs_f64())))
    })
}
