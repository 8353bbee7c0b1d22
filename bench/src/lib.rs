//! `capnet bench`: what factoring the stack costs, measured on this machine.
//!
//! Every workload runs on every composition, side by side in one run: capnet
//! monolithic, the groupings in between — one boundary added at a time (the
//! driver, then ip, then the transports from the sockets domain) — capnet fully
//! factored, and the Linux kernel to itself over a veth pair as the reference;
//! the UDP workloads also against the bare TAP (a reader that only counts
//! frames: the device's ceiling). Rounds alternate the compositions, rotating
//! which goes first, so drift hits them alike; each figure is the median of the
//! rounds with its spread.
//!
//! The Linux side is always the same program, this binary as `capnet
//! bench-peer client …` inside the namespace (and `bench-peer serve …` as the
//! veth reference's server); capnet's side runs here, an application attached
//! to the stack. The server logic is one generic function per workload, over
//! capnet's sockets or std's ([`Net`]).

mod env;
mod report;
mod workload;

use env::Env;
use report::{med, Report};

pub use workload::peer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use capnet_proto::report::Status;
use serde::Serialize;

/// `capnet bench`'s options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// One short round with small amounts (under a minute): that it runs and
    /// what it prints, not figures to quote.
    #[arg(long)]
    pub quick: bool,
    /// Rounds (default 3; 1 with --quick).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Print the results as JSON on standard output (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Write the table into docs/results.md and the chart into docs/results/ of
    /// the checkout at DIR (`make bench` passes its own).
    #[arg(long, value_name = "DIR")]
    pub write_docs: Option<PathBuf>,
    /// Only the workloads whose name contains TEXT (e.g. "request", "UDP 64").
    #[arg(long, value_name = "TEXT")]
    pub only: Option<String>,
    /// Only these compositions (mono, two-group, three-group, factored, linux, device; comma-separated).
    #[arg(long, value_name = "KEYS", value_delimiter = ',')]
    pub on: Vec<String>,
}

/// One composition of the stack (or the reference it is measured against).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Comp {
    /// capnet running a built-in graph: (key, graph text, boundaries on a flow's path).
    Capnet(&'static str, &'static str, u8),
    /// The same over an in-memory wire to a second capnet instance (always one
    /// group) whose applications are the other side: the stacks' cost with no
    /// device system call.
    Wire(&'static str, &'static str, u8),
    /// Linux to Linux over a veth pair.
    Linux,
    /// smoltcp over the same kind of TAP, serving the same workloads
    /// (`bench/smoltcp/capnet_bench_peer.rs`, built by `make smoltcp-examples`).
    Smoltcp,
    /// The TAP read by a loop that only counts frames.
    Device,
}

impl Comp {
    fn key(self) -> &'static str {
        match self {
            Comp::Capnet(k, _, _) | Comp::Wire(k, _, _) => k,
            Comp::Linux => "linux",
            Comp::Smoltcp => "smoltcp",
            Comp::Device => "device",
        }
    }

    fn label(self) -> String {
        match self {
            Comp::Capnet("mono", ..) => "capnet mono (1 process)".into(),
            Comp::Capnet("factored", ..) => "capnet factored (5 processes)".into(),
            Comp::Capnet(k, _, b) => format!("capnet {k} ({b} boundar{})", if b == 1 { "y" } else { "ies" }),
            Comp::Wire("mono-wire", ..) => "capnet mono, in-memory wire".into(),
            Comp::Wire("factored-wire", ..) => "capnet factored, in-memory wire".into(),
            Comp::Wire(k, _, b) => format!(
                "capnet {}, in-memory wire ({b} boundar{})",
                k.trim_end_matches("-wire"),
                if b == 1 { "y" } else { "ies" }
            ),
            Comp::Linux => "Linux ↔ Linux, veth".into(),
            Comp::Smoltcp => "smoltcp, TAP".into(),
            Comp::Device => "the TAP alone (ceiling)".into(),
        }
    }
}

const COMPS: [Comp; 11] = [
    Comp::Capnet("mono", capnet_supervisor::graph::MONO, 0),
    Comp::Capnet("two-group", capnet_supervisor::graph::TWO_GROUP, 1),
    Comp::Capnet("three-group", capnet_supervisor::graph::THREE_GROUP, 2),
    Comp::Capnet("factored", capnet_supervisor::graph::DEFAULT, 3),
    Comp::Wire("mono-wire", capnet_supervisor::graph::MONO, 0),
    Comp::Wire("two-group-wire", capnet_supervisor::graph::TWO_GROUP, 1),
    Comp::Wire("three-group-wire", capnet_supervisor::graph::THREE_GROUP, 2),
    Comp::Wire("factored-wire", capnet_supervisor::graph::DEFAULT, 3),
    Comp::Smoltcp,
    Comp::Linux,
    Comp::Device,
];

/// smoltcp's side of the runs, as `make smoltcp-examples` builds it.
const SMOLTCP_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/smoltcp/release/examples/capnet_bench_peer");

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Work {
    /// The stack (the server) sends `streams` TCP streams to Linux.
    BulkSend(usize),
    /// Linux sends to the stack.
    BulkRecv(usize),
    /// One stream like `BulkSend(1)` (`send`) or `BulkRecv(1)`, the capnet
    /// side's applications using the borrowing calls: the stack's buffers
    /// read in place, the bytes to send made in the send buffers.
    Borrowing { send: bool },
    /// TCP request/response of `size` bytes each way, one transaction at a time.
    Rr(usize),
    /// TCP connections opened, one byte each way, closed.
    Connect,
    /// UDP datagrams of `size` bytes from Linux to the stack.
    Udp(usize),
}

const WORKS: [Work; 11] = [
    Work::BulkSend(1),
    Work::BulkRecv(1),
    Work::Borrowing { send: true },
    Work::Borrowing { send: false },
    Work::BulkSend(8),
    Work::BulkRecv(8),
    Work::Rr(1),
    Work::Rr(1024),
    Work::Connect,
    Work::Udp(64),
    Work::Udp(1472),
];

impl Work {
    fn name(self) -> String {
        match self {
            Work::BulkSend(n) => format!("TCP bulk, stack sends, {n} stream{}", if n > 1 { "s" } else { "" }),
            Work::BulkRecv(n) => format!("TCP bulk, stack receives, {n} stream{}", if n > 1 { "s" } else { "" }),
            Work::Borrowing { send: true } => "TCP bulk, stack sends, 1 stream, borrowing calls".into(),
            Work::Borrowing { send: false } => "TCP bulk, stack receives, 1 stream, borrowing calls".into(),
            Work::Rr(1) => "TCP request/response, 1 B".into(),
            Work::Rr(s) => format!("TCP request/response, {} KiB", s / 1024),
            Work::Connect => "TCP connection setup".into(),
            Work::Udp(s) => format!("UDP {s} B datagrams, Linux → stack"),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Work::BulkSend(_) | Work::BulkRecv(_) | Work::Borrowing { .. } => "Gbit/s",
            Work::Rr(_) => "transactions/s",
            Work::Connect => "connections/s",
            Work::Udp(_) => "datagrams/s",
        }
    }

    fn runs_on(self, c: Comp) -> bool {
        match self {
            Work::Udp(_) => true,
            Work::Borrowing { .. } => matches!(c, Comp::Capnet(..) | Comp::Wire(..)),
            _ => c != Comp::Device,
        }
    }

    /// A bulk workload's streams, and whether the stack sends.
    fn bulk(self) -> Option<(usize, bool)> {
        match self {
            Work::BulkSend(n) => Some((n, true)),
            Work::BulkRecv(n) => Some((n, false)),
            Work::Borrowing { send } => Some((1, send)),
            _ => None,
        }
    }
}

/// How much each run moves.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sizes {
    bulk_bytes: usize,
    rr_count: usize,
    connects: usize,
    udp_secs: f64,
}

/// One run's result.
#[derive(Debug, Clone, Default)]
struct Sample {
    value: f64,
    /// Request/response latencies, µs: p50, p99, p99.9.
    latency_us: Option<[f64; 3]>,
    /// capnet: CPU seconds each domain spent in the run.
    cpu_s: Vec<(String, f64)>,
    costs: Costs,
}

/// What a capnet run cost beyond its time (a sample's, or the median of a
/// figure's samples).
#[derive(Debug, Clone, Default)]
struct Costs {
    /// Futex wake calls per ring entry on the links between groups.
    wakes_per_msg: Option<f64>,
    /// Ring entries between groups per unit of work (per KB moved, per
    /// transaction, per connection, per datagram) — each message, and the
    /// return of the buffer it was lent in, is one (the frame channel between
    /// driver and ip is not counted).
    msgs: Option<f64>,
    /// The most messages seen waiting in one ring between groups (sampled
    /// from the groups' reports during the run).
    ring_max: Option<f64>,
    /// Bytes the stack's processes copied per byte of payload — into
    /// and out of pool buffers between processes (their applications' channels
    /// included), and through the device's read and write calls.
    copies_per_byte: Option<f64>,
}

/// `capnet bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let sizes = if args.quick {
        Sizes { bulk_bytes: 20_000_000, rr_count: 150, connects: 40, udp_secs: 0.15 }
    } else {
        Sizes { bulk_bytes: 400_000_000, rr_count: 5000, connects: 1000, udp_secs: 1.0 }
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
    eprintln!("capnet bench: setting up {} compositions", COMPS.len());
    let env = Env::new()?;
    let mut results: Vec<(Work, Comp, Vec<Sample>)> = Vec::new();
    let works: Vec<Work> =
        WORKS.iter().copied().filter(|w| args.only.as_ref().is_none_or(|t| w.name().contains(t.as_str()))).collect();
    let smoltcp = Path::new(SMOLTCP_PEER).exists();
    if !smoltcp {
        eprintln!("capnet bench: smoltcp's peer is not built (make smoltcp-examples): its column stays empty");
    }
    let chosen =
        |c: &Comp| (args.on.is_empty() || args.on.iter().any(|k| k == c.key())) && (smoltcp || *c != Comp::Smoltcp);
    if works.is_empty() || !COMPS.iter().any(chosen) {
        bail!("--only and --on leave nothing to run");
    }
    let total =
        rounds * works.iter().map(|w| COMPS.iter().filter(|c| w.runs_on(**c) && chosen(c)).count()).sum::<usize>();
    let mut done = 0;
    let mut failed = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        for &w in &works {
            let comps: Vec<Comp> = COMPS.iter().copied().filter(|c| w.runs_on(*c) && chosen(c)).collect();
            for k in 0..comps.len() {
                // Each round starts the rotation one later, so none is always first.
                let c = comps[(k + round) % comps.len()];
                if stop.load(Ordering::Relaxed) {
                    bail!("interrupted");
                }
                done += 1;
                eprint!("\r[{done}/{total}] round {}/{rounds}: {} on {:<40}", round + 1, w.name(), c.label());
                // A run that fails is reported, and the others go on.
                let s = match env.measure(c, w, &sizes) {
                    Ok(s) => s,
                    Err(e) => {
                        let why = format!("{} on {}: {e:#}", w.name(), c.label());
                        eprintln!("\rcapnet bench: failed: {why}");
                        failed.push(why);
                        continue;
                    }
                };
                match results.iter_mut().find(|r| r.0 == w && r.1 == c) {
                    Some(r) => r.2.push(s),
                    None => results.push((w, c, vec![s])),
                }
            }
        }
    }
    eprintln!("\rcapnet bench: {total} runs in {:.0} s{:60}", started.elapsed().as_secs_f64(), "");
    drop(env);
    let wake_us = wake_cost_us(if args.quick { 500 } else { 5000 })?;
    let report = Report::new(rounds, args.quick, sizes, &results, wake_us, failed);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        println!("{}", report.table());
    }
    if let Some(dir) = &args.write_docs {
        report.write_docs(dir)?;
    }
    if !report.failed.is_empty() {
        bail!("{} of {total} runs failed (listed with the tables)", report.failed.len());
    }
    Ok(())
}

/// What waking a sleeping domain on the same core costs: two threads pinned to
/// one CPU pass a message back and forth over an ipc channel, each asleep on its
/// futex (no spinning) until the other's arrives; the median of half of each
/// round trip, µs.
fn wake_cost_us(trips: usize) -> Result<f64> {
    const NO_TOKENS: Option<&capnet_ipc::notify::SpinTokens<Arc<capnet_ipc::region::Region>>> = None;
    use capnet_ipc::notify::SpinPolicy;
    use capnet_ipc::{Descriptor, Waiter};
    let params = capnet_ipc::channel::ChannelParams { capacity: 16, epoch: 1 };
    let (mut a, mut b) = capnet_ipc::shm_channel::pair::<Descriptor>("capnet-bench-wake", params)?;
    let pin = || {
        let mut set = nix::sched::CpuSet::new();
        let _ = set.set(0);
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    };
    let echo = std::thread::spawn(move || -> Result<()> {
        pin();
        let mut w = Waiter::new(SpinPolicy::NEVER);
        let mut got = Vec::new();
        for _ in 0..trips {
            while b.recv(&mut got, 1)? == 0 {
                w.wait(&mut [&mut b], Some(Duration::from_secs(1)), NO_TOKENS);
            }
            got.clear();
            while b.send(&[Descriptor::default()])? == 0 {}
        }
        Ok(())
    });
    let me = nix::unistd::Pid::from_raw(0);
    let was = nix::sched::sched_getaffinity(me)?;
    pin();
    let mut w = Waiter::new(SpinPolicy::NEVER);
    let (mut got, mut half) = (Vec::new(), Vec::with_capacity(trips));
    for _ in 0..trips {
        let t = Instant::now();
        while a.send(&[Descriptor::default()])? == 0 {}
        while a.recv(&mut got, 1)? == 0 {
            w.wait(&mut [&mut a], Some(Duration::from_secs(1)), NO_TOKENS);
        }
        got.clear();
        half.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    echo.join().map_err(|_| anyhow!("the echo thread panicked"))??;
    let _ = nix::sched::sched_setaffinity(me, &was);
    Ok(med(half))
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The run's figure from what the client printed and what the server counted
/// (UDP: datagrams received and over how long).
fn sample_of(w: Work, figures: &[f64], udp: Option<(u64, f64)>) -> Sample {
    let value = match (w, udp) {
        (Work::Udp(_), Some((n, secs))) if secs > 0.0 => n as f64 / secs,
        (Work::Udp(_), _) => 0.0,
        _ => figures.first().copied().unwrap_or(0.0),
    };
    let latency_us = matches!(w, Work::Rr(_)).then(|| [figures[1], figures[2], figures[3]]);
    Sample { value, latency_us, ..Sample::default() }
}

/// The factored costs of a run, from the status before and after it, and the
/// bytes the applications (in this process) copied meanwhile.
fn costs(s: &mut Sample, w: Work, sizes: &Sizes, before: &Status, after: &Status, app_copied: u64) {
    let total = |st: &Status, want: &dyn Fn(&str) -> bool| -> u64 {
        st.domains.iter().flat_map(|d| d.counters.iter()).filter(|(k, _)| want(k)).map(|(_, v)| *v).sum()
    };
    let sum = |st: &Status, suffix: &str| total(st, &|k| k.starts_with("link_") && k.ends_with(suffix));
    let copied = |st: &Status| total(st, &|k| k == "bytes_copied" || k == "device_bytes");
    let payload = match w {
        Work::BulkSend(_) | Work::BulkRecv(_) | Work::Borrowing { .. } => sizes.bulk_bytes as f64,
        Work::Rr(size) => (2 * size * sizes.rr_count) as f64,
        Work::Connect => 0.0,
        Work::Udp(size) => s.value * sizes.udp_secs * size as f64,
    };
    if payload > 0.0 {
        let stack = copied(after).saturating_sub(copied(before));
        s.costs.copies_per_byte = Some((stack + app_copied) as f64 / payload);
    }
    s.cpu_s = after
        .domains
        .iter()
        .map(|d| {
            let was = before.domains.iter().find(|b| b.name == d.name && b.pid == d.pid).map_or(0.0, |b| b.cpu_s);
            (d.name.clone(), d.cpu_s - was)
        })
        .collect();
    let msgs = sum(after, "_sent").saturating_sub(sum(before, "_sent"));
    let wakes = sum(after, "_futex_wakes").saturating_sub(sum(before, "_futex_wakes"));
    if msgs > 0 {
        s.costs.wakes_per_msg = Some(wakes as f64 / msgs as f64);
        let units = match w {
            Work::BulkSend(_) | Work::BulkRecv(_) | Work::Borrowing { .. } => sizes.bulk_bytes as f64 / 1000.0,
            Work::Rr(_) => sizes.rr_count as f64,
            Work::Connect => sizes.connects as f64,
            Work::Udp(_) => (s.value * sizes.udp_secs).max(1.0),
        };
        s.costs.msgs = Some(msgs as f64 / units);
    }
}
