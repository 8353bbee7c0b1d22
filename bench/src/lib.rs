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

use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use capnet_proto::report::Status;
use capnet_supervisor::control::{self, Reply, Request};
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
    /// TCP request/response of `size` bytes each way, one transaction at a time.
    Rr(usize),
    /// TCP connections opened, one byte each way, closed.
    Connect,
    /// UDP datagrams of `size` bytes from Linux to the stack.
    Udp(usize),
}

const WORKS: [Work; 9] = [
    Work::BulkSend(1),
    Work::BulkRecv(1),
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
            Work::Rr(1) => "TCP request/response, 1 B".into(),
            Work::Rr(s) => format!("TCP request/response, {} KiB", s / 1024),
            Work::Connect => "TCP connection setup".into(),
            Work::Udp(s) => format!("UDP {s} B datagrams, Linux → stack"),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Work::BulkSend(_) | Work::BulkRecv(_) => "Gbit/s",
            Work::Rr(_) => "transactions/s",
            Work::Connect => "connections/s",
            Work::Udp(_) => "datagrams/s",
        }
    }

    fn runs_on(self, c: Comp) -> bool {
        matches!(self, Work::Udp(_)) || c != Comp::Device
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
                let s = env.measure(c, w, &sizes).with_context(|| format!("{} on {}", w.name(), c.label()))?;
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
    let report = Report::new(rounds, args.quick, sizes, &results, wake_us);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        println!("{}", report.table());
    }
    if let Some(dir) = &args.write_docs {
        report.write_docs(dir)?;
    }
    Ok(())
}

/// A figure: the median of the rounds and the spread, (max − min) / median.
#[derive(Debug)]
struct Figure {
    workload: String,
    unit: &'static str,
    composition: &'static str,
    median: f64,
    spread_pct: f64,
    samples: Vec<f64>,
    /// Request/response: the median of each round's p50, p99 and p99.9, µs.
    latency_us: Option<[f64; 3]>,
    /// capnet: each domain's CPU seconds (median of the rounds).
    cpu_s: Vec<(String, f64)>,
    /// capnet: the medians of the samples' costs.
    costs: Costs,
}

/// What the table and chart are made from (and `--json`, in the design's
/// shape: [`Report::json`]).
#[derive(Debug)]
struct Report {
    machine: String,
    date: String,
    command: String,
    rounds: usize,
    quick: bool,
    sizes: Sizes,
    compositions: Vec<(&'static str, String)>,
    figures: Vec<Figure>,
    /// Per workload, capnet factored over capnet mono (over the TAP).
    factored_over_mono: Vec<(String, f64)>,
    /// The same over the in-memory wire.
    factored_over_mono_wire: Vec<(String, f64)>,
    /// What waking a sleeping domain on the same core costs here, µs (measured
    /// in this run: [`wake_cost_us`]).
    wake_us: f64,
}

fn med(v: Vec<f64>) -> f64 {
    capnet_testkit::bench::median(v).0
}

impl Report {
    fn new(rounds: usize, quick: bool, sizes: Sizes, results: &[(Work, Comp, Vec<Sample>)], wake_us: f64) -> Self {
        let figures: Vec<Figure> = results
            .iter()
            .map(|(w, c, s)| {
                let values: Vec<f64> = s.iter().map(|x| x.value).collect();
                let (median, spread_pct) = capnet_testkit::bench::median(values.clone());
                let latency_us = s[0].latency_us.map(|_| {
                    let at = |i: usize| med(s.iter().filter_map(|x| x.latency_us.map(|l| l[i])).collect());
                    [at(0), at(1), at(2)]
                });
                let cpu_s = s[0]
                    .cpu_s
                    .iter()
                    .map(|(d, _)| {
                        let v = s.iter().filter_map(|x| x.cpu_s.iter().find(|(n, _)| n == d).map(|(_, v)| *v));
                        (d.clone(), med(v.collect()))
                    })
                    .collect();
                let opt = |f: fn(&Costs) -> Option<f64>| {
                    let v: Vec<f64> = s.iter().filter_map(|x| f(&x.costs)).collect();
                    (!v.is_empty()).then(|| med(v))
                };
                Figure {
                    workload: w.name(),
                    unit: w.unit(),
                    composition: c.key(),
                    median,
                    spread_pct,
                    samples: values,
                    latency_us,
                    cpu_s,
                    costs: Costs {
                        wakes_per_msg: opt(|x| x.wakes_per_msg),
                        msgs: opt(|x| x.msgs),
                        ring_max: opt(|x| x.ring_max),
                        copies_per_byte: opt(|x| x.copies_per_byte),
                    },
                }
            })
            .collect();
        let fig = |w: &str, c: &str| figures.iter().find(|f| f.workload == w && f.composition == c).map(|f| f.median);
        let ratios = |f: &str, m: &str| -> Vec<(String, f64)> {
            WORKS.iter().filter_map(|w| Some((w.name(), fig(&w.name(), f)? / fig(&w.name(), m)?))).collect()
        };
        let (factored_over_mono, factored_over_mono_wire) =
            (ratios("factored", "mono"), ratios("factored-wire", "mono-wire"));
        Report {
            machine: capnet_testkit::bench::machine(),
            date: now_utc(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            rounds,
            quick,
            sizes,
            compositions: COMPS
                .iter()
                .filter(|c| figures.iter().any(|f| f.composition == c.key()))
                .map(|c| (c.key(), c.label()))
                .collect(),
            figures,
            factored_over_mono,
            factored_over_mono_wire,
            wake_us,
        }
    }

    /// `capnet bench --json`, in the shape DESIGN.md names: `runs` (workload,
    /// path, composition, value, unit, spread — the median and (max − min) /
    /// median in percent — and what else a run measured), `ratios` (workload,
    /// path, factored_over_mono). Paths: `tap` and `wire` (a composition's
    /// `-wire` twin), `veth` for Linux ↔ Linux.
    fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let split = |key: &str| match key.strip_suffix("-wire") {
            Some(k) => (k.to_owned(), "wire"),
            None if key == "linux" => (key.to_owned(), "veth"),
            None => (key.to_owned(), "tap"),
        };
        let runs: Vec<_> = self
            .figures
            .iter()
            .map(|f| {
                let (composition, path) = split(f.composition);
                let cpu: serde_json::Map<String, serde_json::Value> =
                    f.cpu_s.iter().map(|(d, v)| (d.clone(), json!(v))).collect();
                json!({
                    "workload": f.workload, "path": path, "composition": composition,
                    "value": f.median, "unit": f.unit, "spread": f.spread_pct,
                    "samples": f.samples, "latency_us": f.latency_us, "cpu_s": cpu,
                    "wakes_per_msg": f.costs.wakes_per_msg, "msgs": f.costs.msgs,
                    "ring_max": f.costs.ring_max, "copies_per_byte": f.costs.copies_per_byte,
                })
            })
            .collect();
        let ratios: Vec<_> = [("tap", &self.factored_over_mono), ("wire", &self.factored_over_mono_wire)]
            .into_iter()
            .flat_map(|(path, rs)| {
                rs.iter().map(move |(w, r)| json!({ "workload": w, "path": path, "factored_over_mono": r }))
            })
            .collect();
        let compositions: Vec<_> = self.compositions.iter().map(|(k, l)| json!({ "key": k, "label": l })).collect();
        json!({
            "machine": self.machine, "date": self.date, "command": self.command, "rounds": self.rounds,
            "quick": self.quick, "sizes": self.sizes, "wake_us": self.wake_us,
            "compositions": compositions, "runs": runs, "ratios": ratios,
        })
    }

    fn figure(&self, w: &str, c: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.workload == w && f.composition == c)
    }

    /// The table: a row per workload, a column per composition, then the
    /// factored/mono ratio; request/response latencies and the factored
    /// stack's costs below.
    fn table(&self) -> String {
        let fmt = |v: f64| match v {
            v if v >= 1e6 => format!("{:.2} M", v / 1e6),
            v if v >= 1e4 => format!("{:.1} k", v / 1e3),
            v => format!("{v:.2}"),
        };
        let mut t = String::from("| workload | unit |");
        for c in COMPS {
            t += &format!(" {} |", c.label());
        }
        t += " factored / mono, TAP | factored / mono, wire |\n|---|---|";
        t += &"---|".repeat(COMPS.len() + 2);
        t += "\n";
        for w in WORKS {
            let name = w.name();
            t += &format!("| {name} | {} |", w.unit());
            for c in COMPS {
                t += &match self.figure(&name, c.key()) {
                    Some(f) => format!(" {} ±{:.0}% |", fmt(f.median), f.spread_pct),
                    None => " — |".into(),
                };
            }
            for ratios in [&self.factored_over_mono, &self.factored_over_mono_wire] {
                let ratio = ratios.iter().find(|(n, _)| *n == name).map(|(_, r)| *r);
                t += &format!(" {} |", ratio.map_or("—".into(), |r| format!("**{r:.2}×**")));
            }
            t += "\n";
        }
        t += "\nRequest/response latency, µs (p50 / p99 / p99.9):\n\n| workload |";
        for c in COMPS.iter().filter(|c| **c != Comp::Device) {
            t += &format!(" {} |", c.label());
        }
        t += "\n|---|";
        t += &"---|".repeat(COMPS.len() - 1);
        t += "\n";
        for w in WORKS.iter().filter(|w| matches!(w, Work::Rr(_))) {
            t += &format!("| {} |", w.name());
            for c in COMPS.iter().filter(|c| **c != Comp::Device) {
                t += &match self.figure(&w.name(), c.key()).and_then(|f| f.latency_us) {
                    Some([a, b, c]) => format!(" {a:.0} / {b:.0} / {c:.0} |"),
                    None => " — |".into(),
                };
            }
            t += "\n";
        }
        // The latency target: factored p50 within mono's plus 1.2 × one wake per
        // added hop — three boundaries, each crossed by the request and the reply.
        let hops = 6.0;
        for w in WORKS.iter().filter(|w| matches!(w, Work::Rr(_))) {
            let p50 = |c: &str| self.figure(&w.name(), c).and_then(|f| f.latency_us).map(|l| l[0]);
            if let (Some(m), Some(f)) = (p50("mono"), p50("factored")) {
                let bound = m + 1.2 * hops * self.wake_us;
                t += &format!(
                    "\n{}: factored p50 {f:.0} µs against mono's {m:.0} + 1.2 × {hops:.0} hops × {:.1} µs (a same-core wake, measured in this run) = {bound:.0} µs: {}.",
                    w.name(),
                    self.wake_us,
                    if f <= bound { "within" } else { "over" }
                );
            }
        }
        t += "\n";
        t += "\nWhat the factored stack spends per run (medians): CPU seconds per domain; ring entries between \
              groups per unit of work (per KB moved, per transaction, per connection, per datagram) — a message \
              and the return of the buffer it was lent in are one entry each, about half of them messages; \
              futex wake calls per entry; and the most entries seen waiting in one ring (sampled every 50 ms \
              from the groups' reports). The driver–ip frame channel is not in these counts.\n\n| workload | driver | ip | tcp | udp | sockets | ring entries per unit | wakes per entry | most waiting in a ring |\n|---|---|---|---|---|---|---|---|---|\n";
        for w in WORKS {
            let Some(f) = self.figure(&w.name(), "factored") else { continue };
            t += &format!("| {} |", w.name());
            for d in ["driver", "ip", "tcp", "udp", "sockets"] {
                let v = f.cpu_s.iter().find(|(n, _)| n == d).map(|(_, v)| *v);
                t += &format!(" {} |", v.map_or("—".into(), |v| format!("{v:.2}")));
            }
            let opt = |v: Option<f64>, p: usize| v.map_or("—".into(), |v| format!("{v:.p$}"));
            let c = &f.costs;
            t += &format!(" {} | {} | {} |\n", opt(c.msgs, 2), opt(c.wakes_per_msg, 3), opt(c.ring_max, 0));
        }
        t += "\nCopies per byte of payload the stack's processes made (medians): into and out of pool buffers \
              between processes (the applications' channels included) and through the device's read and write \
              calls; not the copies inside a protocol core.\n\n| workload |";
        let capnets: Vec<Comp> =
            COMPS.iter().copied().filter(|c| matches!(c, Comp::Capnet(..) | Comp::Wire(..))).collect();
        for c in &capnets {
            t += &format!(" {} |", c.label());
        }
        t += "\n|---|";
        t += &"---|".repeat(capnets.len());
        t += "\n";
        for w in WORKS.iter().filter(|w| **w != Work::Connect) {
            t += &format!("| {} |", w.name());
            for c in &capnets {
                let v = self.figure(&w.name(), c.key()).and_then(|f| f.costs.copies_per_byte);
                t += &format!(" {} |", v.map_or("—".into(), |v| format!("{v:.1}")));
            }
            t += "\n";
        }
        t += &format!(
            "\n{} round{}, alternating; per run {} bytes of bulk (split over the streams), {} transactions, {} connections, {} s of datagrams.\n",
            self.rounds,
            if self.rounds == 1 { "" } else { "s" },
            self.sizes.bulk_bytes,
            self.sizes.rr_count,
            self.sizes.connects,
            self.sizes.udp_secs
        );
        t
    }

    /// Rewrites the `capnet-bench` section of `DIR/docs/results.md` with the
    /// table and writes the chart to `DIR/docs/results/bench.svg`.
    fn write_docs(&self, dir: &Path) -> Result<()> {
        let svg = dir.join("docs/results/bench.svg");
        std::fs::create_dir_all(svg.parent().ok_or_else(|| anyhow!("no parent"))?)?;
        self.chart(&svg)?;
        let table = format!(
            "![factored, the groupings between, and Linux, relative to capnet mono](results/bench.svg)\n\n{}",
            self.table()
        );
        capnet_testkit::bench::write_section(
            &dir.join("docs").display().to_string(),
            "capnet-bench",
            &self.command_line(),
            &table,
        );
        eprintln!("wrote {}", svg.display());
        Ok(())
    }

    fn command_line(&self) -> String {
        format!("capnet {}", std::env::args().skip(1).collect::<Vec<_>>().join(" "))
    }

    /// Every workload's figure on each composition relative to capnet mono:
    /// one line per workload from mono through each added boundary to
    /// factored, with Linux's as a point at the end.
    fn chart(&self, path: &Path) -> Result<()> {
        use plotters::prelude::*;
        let capnets: Vec<Comp> = COMPS.iter().copied().filter(|c| matches!(c, Comp::Capnet(..))).collect();
        // … then the others as points: smoltcp (if it ran) and Linux.
        let others: Vec<Comp> = [Comp::Smoltcp, Comp::Linux]
            .into_iter()
            .filter(|c| self.figures.iter().any(|f| f.composition == c.key()))
            .collect();
        let xs = capnets.len() + others.len();
        let mut lines = Vec::new();
        let (mut top, mut bottom) = (1.5f64, 0.8f64);
        for w in WORKS {
            let Some(base) = self.figure(&w.name(), "mono").map(|f| f.median).filter(|m| *m > 0.0) else { continue };
            let pts: Vec<(f64, f64)> = capnets
                .iter()
                .chain(&others)
                .enumerate()
                .filter_map(|(i, c)| Some((i as f64, self.figure(&w.name(), c.key())?.median / base)))
                .collect();
            top = pts.iter().map(|p| p.1).fold(top, f64::max);
            bottom = pts.iter().map(|p| p.1).filter(|v| *v > 0.0).fold(bottom, f64::min);
            lines.push((w.name(), pts));
        }
        let root = SVGBackend::new(path, (960, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("capnet bench, {} — each figure over capnet mono's (log scale)", self.date),
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .right_y_label_area_size(0)
            .build_cartesian_2d(-0.3f64..(xs as f64 - 0.7), ((bottom * 0.8)..(top * 1.25)).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        let names: Vec<String> = capnets
            .iter()
            .map(|c| c.key().to_owned())
            .chain(others.iter().map(|c| if *c == Comp::Linux { "Linux (veth)".into() } else { c.key().to_owned() }))
            .collect();
        chart
            .configure_mesh()
            .x_labels(xs)
            .x_label_formatter(&|x| {
                let i = x.round() as usize;
                if (x - i as f64).abs() < 0.01 {
                    names.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_labels(12)
            .y_label_formatter(&|v| format!("{v:.2}"))
            .y_desc("figure / capnet mono's")
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (k, (name, pts)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let capnet_pts: Vec<(f64, f64)> = pts.iter().copied().filter(|p| p.0 < capnets.len() as f64).collect();
            chart
                .draw_series(LineSeries::new(capnet_pts, color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }
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

/// What the bench set up: a capnet stack per graph, the veth pair, the bare TAP.
struct Env {
    exe: PathBuf,
    /// (composition key, namespace) of each capnet stack.
    stacks: Vec<(&'static str, String)>,
    /// The veth pair's namespaces: server, client.
    veth: (String, String),
    /// The bare TAP's namespace, and the TAP.
    device: (String, Option<capnet_kernel_shim::device::Device>),
    /// smoltcp's namespace (its TAP persists there between runs).
    smoltcp: String,
    graphs: PathBuf,
}

/// The TAP smoltcp runs on.
const SMOLTCP_TAP: &str = "capbs";

const SERVER: &str = "10.77.0.2";
const VETH_SERVER: &str = "10.99.0.1";
/// The bare TAP's MAC: Linux gets it as a static neighbour entry.
const DEVICE_MAC: &str = "02:ca:fe:00:00:02";

impl Env {
    fn new() -> Result<Self> {
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

    fn netns(&self, c: Comp) -> &str {
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
    fn client(&self, ns: &str, args: &[String]) -> Result<Vec<f64>> {
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
    fn measure(&self, c: Comp, w: Work, sizes: &Sizes) -> Result<Sample> {
        let port = 5001;
        let server_addr = if c == Comp::Linux { VETH_SERVER } else { SERVER };
        let client_args: Vec<String> = match w {
            Work::BulkSend(n) => vec!["read".into(), n.to_string(), sizes.bulk_bytes.to_string()],
            Work::BulkRecv(n) => vec!["write".into(), n.to_string(), sizes.bulk_bytes.to_string()],
            Work::Rr(size) => vec!["rr".into(), size.to_string(), sizes.rr_count.to_string()],
            Work::Connect => vec!["connect".into(), sizes.connects.to_string()],
            Work::Udp(size) => vec!["udp".into(), size.to_string(), sizes.udp_secs.to_string()],
        };
        let client_args: Vec<String> =
            [server_addr.to_owned(), port.to_string()].into_iter().chain(client_args).collect();
        let before = self.status(c);
        let mut sample = match c {
            Comp::Capnet(..) | Comp::Wire(..) => {
                let net = CapnetNet::server(self.netns(c));
                let server = serve(&net, w, port, sizes)?;
                let rings = RingWatch::start(self.netns(c));
                let figures = match c {
                    Comp::Wire(..) => {
                        let to = SocketAddrV4::new(server_addr.parse()?, port);
                        client(&CapnetNet::client(&format!("{}-peer", self.netns(c)))?, to, &client_args[2..])?
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
                costs(&mut sample, w, sizes, &b, &a);
            }
        }
        Ok(sample)
    }

    fn status(&self, c: Comp) -> Option<Status> {
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

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(["-n", ns]).args(args).output()?;
    if !out.status.success() {
        bail!("ip -n {ns} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
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

/// Samples a stack's status every 50 ms while a run lasts: the most messages
/// waiting in any one ring between groups (each group publishes its report
/// every 100 ms, so this sees a few snapshots per run, not every peak).
struct RingWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RingWatch {
    fn start(netns: &str) -> Self {
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

    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0) as f64
    }
}

/// The factored costs of a run, from the status before and after it.
fn costs(s: &mut Sample, w: Work, sizes: &Sizes, before: &Status, after: &Status) {
    let total = |st: &Status, want: &dyn Fn(&str) -> bool| -> u64 {
        st.domains.iter().flat_map(|d| d.counters.iter()).filter(|(k, _)| want(k)).map(|(_, v)| *v).sum()
    };
    let sum = |st: &Status, suffix: &str| total(st, &|k| k.starts_with("link_") && k.ends_with(suffix));
    let copied = |st: &Status| total(st, &|k| k == "bytes_copied" || k == "device_bytes");
    let payload = match w {
        Work::BulkSend(_) | Work::BulkRecv(_) => sizes.bulk_bytes as f64,
        Work::Rr(size) => (2 * size * sizes.rr_count) as f64,
        Work::Connect => 0.0,
        Work::Udp(size) => s.value * sizes.udp_secs * size as f64,
    };
    if payload > 0.0 {
        s.costs.copies_per_byte = Some(copied(after).saturating_sub(copied(before)) as f64 / payload);
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
            Work::BulkSend(_) | Work::BulkRecv(_) => sizes.bulk_bytes as f64 / 1000.0,
            Work::Rr(_) => sizes.rr_count as f64,
            Work::Connect => sizes.connects as f64,
            Work::Udp(_) => (s.value * sizes.udp_secs).max(1.0),
        };
        s.costs.msgs = Some(msgs as f64 / units);
    }
}

/// Counts the frames the bare TAP delivers until the sender has been quiet for
/// 300 ms after the first: (frames, seconds from the first to the last).
fn count_frames(
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

/// The sockets a workload's server and client need, over capnet or std.
trait Net: Sync {
    type Listener: Send + 'static;
    type Stream: Read + Write + Send + 'static;
    type Udp: Send + 'static;
    fn listen(&self, port: u16) -> io::Result<Self::Listener>;
    fn accept(l: &Self::Listener) -> io::Result<Self::Stream>;
    fn nodelay(s: &Self::Stream);
    fn udp(&self, port: u16) -> io::Result<Self::Udp>;
    /// A datagram, or `None` after `idle` without one.
    fn recv(u: &mut Self::Udp, buf: &mut [u8], idle: Duration) -> io::Result<Option<usize>>;
    fn connect(&self, to: SocketAddrV4) -> io::Result<Self::Stream>;
    fn shutdown_write(s: &Self::Stream) -> io::Result<()>;
    /// A UDP socket on any port, sending to `to`.
    fn udp_to(&self, to: SocketAddrV4) -> io::Result<Self::Udp>;
    fn send(u: &Self::Udp, d: &[u8]) -> io::Result<usize>;
}

/// A receive that timed out is `None`.
fn quiet(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => Ok(None),
        Err(e) => Err(e),
    }
}

/// capnet's sockets: every listener and UDP socket on an attachment of its own
/// (a blocking call holds its attachment); a client's connections take turns
/// on attachments made beforehand (attaching is no part of what a run times).
struct CapnetNet {
    netns: String,
    /// A client's attachments, taken in turn (none: attach per socket).
    clients: Vec<capnet::net::Stack>,
    turn: std::sync::atomic::AtomicUsize,
}

impl CapnetNet {
    fn server(netns: &str) -> Self {
        Self { netns: netns.to_owned(), clients: Vec::new(), turn: Default::default() }
    }

    /// With an attachment for each of up to 8 connections at once.
    fn client(netns: &str) -> io::Result<Self> {
        let clients = (0..8).map(|_| capnet::net::Stack::attach(netns)).collect::<io::Result<_>>()?;
        Ok(Self { netns: netns.to_owned(), clients, turn: Default::default() })
    }

    fn next(&self) -> io::Result<capnet::net::Stack> {
        match self.clients.len() {
            0 => capnet::net::Stack::attach(&self.netns),
            n => Ok(self.clients[self.turn.fetch_add(1, Ordering::Relaxed) % n].clone()),
        }
    }
}

impl Net for CapnetNet {
    type Listener = capnet::net::TcpListener;
    type Stream = capnet::net::TcpStream;
    type Udp = capnet::net::UdpSocket;
    fn listen(&self, port: u16) -> io::Result<Self::Listener> {
        capnet::net::TcpListener::bind_with_backlog(&capnet::net::Stack::attach(&self.netns)?, port, 64)
    }
    fn accept(l: &Self::Listener) -> io::Result<Self::Stream> {
        l.accept().map(|(s, _)| s)
    }
    fn nodelay(s: &Self::Stream) {
        let _ = s.set_nodelay(true);
    }
    fn udp(&self, port: u16) -> io::Result<Self::Udp> {
        capnet::net::UdpSocket::bind(&capnet::net::Stack::attach(&self.netns)?, port)
    }
    fn recv(u: &mut Self::Udp, buf: &mut [u8], idle: Duration) -> io::Result<Option<usize>> {
        u.set_read_timeout(Some(idle))?;
        quiet(u.recv_from(buf).map(|(n, _)| n))
    }
    fn connect(&self, to: SocketAddrV4) -> io::Result<Self::Stream> {
        capnet::net::TcpStream::connect_timeout(&self.next()?, to, Duration::from_secs(5))
    }
    fn shutdown_write(s: &Self::Stream) -> io::Result<()> {
        s.shutdown(std::net::Shutdown::Write)
    }
    fn udp_to(&self, to: SocketAddrV4) -> io::Result<Self::Udp> {
        let u = capnet::net::UdpSocket::bind(&self.next()?, 0)?;
        u.connect(to)?;
        Ok(u)
    }
    fn send(u: &Self::Udp, d: &[u8]) -> io::Result<usize> {
        u.send(d)
    }
}

/// std's sockets (the veth reference's server), bound on every address.
struct StdNet;

impl Net for StdNet {
    type Listener = std::net::TcpListener;
    type Stream = std::net::TcpStream;
    type Udp = std::net::UdpSocket;
    fn listen(&self, port: u16) -> io::Result<Self::Listener> {
        std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
    }
    fn accept(l: &Self::Listener) -> io::Result<Self::Stream> {
        l.accept().map(|(s, _)| s)
    }
    fn nodelay(s: &Self::Stream) {
        let _ = s.set_nodelay(true);
    }
    fn udp(&self, port: u16) -> io::Result<Self::Udp> {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
    }
    fn recv(u: &mut Self::Udp, buf: &mut [u8], idle: Duration) -> io::Result<Option<usize>> {
        u.set_read_timeout(Some(idle))?;
        quiet(u.recv(buf))
    }
    fn connect(&self, to: SocketAddrV4) -> io::Result<Self::Stream> {
        std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))
    }
    fn shutdown_write(s: &Self::Stream) -> io::Result<()> {
        s.shutdown(std::net::Shutdown::Write)
    }
    fn udp_to(&self, to: SocketAddrV4) -> io::Result<Self::Udp> {
        let u = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        u.connect(to)?;
        Ok(u)
    }
    fn send(u: &Self::Udp, d: &[u8]) -> io::Result<usize> {
        u.send(d)
    }
}

/// What a server thread gives back: for UDP, (datagrams, seconds from the first to the last).
type Served = std::thread::JoinHandle<Result<Option<(u64, f64)>>>;

/// Starts `w`'s server on `port` (listening before it returns) and runs it in a
/// thread until its work is done.
fn serve<N: Net>(net: &N, w: Work, port: u16, sizes: &Sizes) -> Result<Served> {
    const CHUNK: usize = 1 << 20;
    let (bulk, udp_secs) = (sizes.bulk_bytes, sizes.udp_secs);
    Ok(match w {
        Work::BulkSend(n) | Work::BulkRecv(n) => {
            let listeners = (0..n).map(|i| net.listen(port + i as u16)).collect::<io::Result<Vec<_>>>()?;
            let send = matches!(w, Work::BulkSend(_));
            std::thread::spawn(move || {
                let threads: Vec<_> = listeners
                    .into_iter()
                    .map(|l| {
                        std::thread::spawn(move || -> io::Result<()> {
                            let mut s = N::accept(&l)?;
                            let mut buf = vec![0u8; CHUNK];
                            if send {
                                write_bytes(&mut s, bulk / n, &buf)?;
                            } else {
                                while s.read(&mut buf)? > 0 {}
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().map_err(|_| anyhow!("a stream's thread panicked"))??;
                }
                Ok(None)
            })
        }
        Work::Rr(_) => {
            let l = net.listen(port)?;
            std::thread::spawn(move || {
                let mut s = N::accept(&l)?;
                N::nodelay(&s);
                let mut buf = vec![0u8; 65536];
                loop {
                    let k = s.read(&mut buf)?;
                    if k == 0 {
                        return Ok(None);
                    }
                    s.write_all(&buf[..k])?;
                }
            })
        }
        Work::Connect => {
            let l = net.listen(port)?;
            std::thread::spawn(move || loop {
                let mut s = N::accept(&l)?;
                let mut b = [0u8; 1];
                if s.read(&mut b)? == 0 || b[0] == b'q' {
                    return Ok(None);
                }
                s.write_all(&b)?;
            })
        }
        Work::Udp(_) => {
            let mut u = net.udp(port)?;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 2048];
                let (mut n, mut first, mut last) = (0u64, None::<Instant>, Instant::now());
                // Wait long for the first, then until 300 ms pass without one or
                // the sending is well over (what a slow receiver has queued
                // after that is not its rate).
                let idle = |first: Option<Instant>| {
                    if first.is_some() {
                        Duration::from_millis(300)
                    } else {
                        Duration::from_secs(10)
                    }
                };
                while let Some(_len) = N::recv(&mut u, &mut buf, idle(first))? {
                    n += 1;
                    last = Instant::now();
                    if first.get_or_insert(last).elapsed().as_secs_f64() > udp_secs + 0.5 {
                        break;
                    }
                }
                Ok(first.map(|f| (n, (last - f).as_secs_f64())))
            })
        }
    })
}

/// A server in another process — the veth reference's (`capnet bench-peer
/// serve …`) or smoltcp's (`capnet_bench_peer --tap NAME serve …`) — run in
/// namespace `ns` and started once it says it listens.
struct PeerServer(Child);

impl PeerServer {
    fn start(program: &[&str], ns: &str, w: Work, port: u16, sizes: &Sizes) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(program)
            .args(["serve", &work_arg(w), &port.to_string()])
            .args([sizes.bulk_bytes.to_string(), sizes.udp_secs.to_string()])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let out = child.stdout.as_mut().ok_or_else(|| anyhow!("no stdout"))?;
        io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("{} did not start: {line:?}", program.join(" "));
        }
        Ok(Self(child))
    }

    fn finish(&mut self) -> Result<Option<(u64, f64)>> {
        let mut text = String::new();
        if let Some(out) = self.0.stdout.as_mut() {
            out.read_to_string(&mut text)?;
        }
        self.0.wait()?;
        let v: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        Ok(match v[..] {
            [n, secs] => Some((n as u64, secs)),
            _ => None,
        })
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn work_arg(w: Work) -> String {
    match w {
        Work::BulkSend(n) => format!("bulk-send:{n}"),
        Work::BulkRecv(n) => format!("bulk-recv:{n}"),
        Work::Rr(s) => format!("rr:{s}"),
        Work::Connect => "connect".into(),
        Work::Udp(s) => format!("udp:{s}"),
    }
}

fn parse_work(s: &str) -> Result<Work> {
    let (kind, n) = s.split_once(':').unwrap_or((s, "0"));
    let n: usize = n.parse()?;
    Ok(match kind {
        "bulk-send" => Work::BulkSend(n),
        "bulk-recv" => Work::BulkRecv(n),
        "rr" => Work::Rr(n),
        "connect" => Work::Connect,
        "udp" => Work::Udp(n),
        _ => bail!("no workload {s:?}"),
    })
}

/// `capnet bench-peer serve WORK PORT BULK SECS` (std sockets; says "ready" once it
/// listens, prints UDP counts at the end) or `capnet bench-peer client ADDR
/// PORT MODE …` (the Linux side of every run; prints its figures).
pub fn peer(args: &[String]) -> Result<()> {
    match args {
        [role, w, port, bulk, secs] if role == "serve" => {
            let sizes = Sizes { bulk_bytes: bulk.parse()?, udp_secs: secs.parse()?, rr_count: 0, connects: 0 };
            let served = serve(&StdNet, parse_work(w)?, port.parse()?, &sizes)?;
            println!("ready");
            io::stdout().flush()?;
            if let Some((n, secs)) = served.join().map_err(|_| anyhow!("the server panicked"))?? {
                println!("{n} {secs}");
            }
            Ok(())
        }
        [role, addr, port, rest @ ..] if role == "client" => {
            let to = SocketAddrV4::new(addr.parse()?, port.parse()?);
            let figures = client(&StdNet, to, rest)?;
            println!("{}", figures.iter().map(|f| format!("{f:.3}")).collect::<Vec<_>>().join(" "));
            Ok(())
        }
        _ => bail!("usage: capnet bench-peer serve WORK PORT BULK SECS | client ADDR PORT MODE ARGS…"),
    }
}

/// Writes `n` bytes of `buf`'s contents, a buffer at a time.
fn write_bytes(w: &mut impl Write, mut n: usize, buf: &[u8]) -> io::Result<()> {
    while n > 0 {
        let k = n.min(buf.len());
        w.write_all(&buf[..k])?;
        n -= k;
    }
    Ok(())
}

/// Connects, retrying while the server is not up yet (a bench's own setup race).
fn connect<N: Net>(net: &N, to: SocketAddrV4) -> Result<N::Stream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match net.connect(to) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e).context(format!("connecting to {to}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The client side of every run (the Linux side over a TAP or veth; the peer
/// instance's applications over the in-memory wire): its figures.
fn client<N: Net>(net: &N, to: SocketAddrV4, args: &[String]) -> Result<Vec<f64>> {
    const CHUNK: usize = 1 << 20;
    let num = |i: usize| -> Result<usize> { Ok(args.get(i).ok_or_else(|| anyhow!("missing argument"))?.parse()?) };
    match args.first().map(String::as_str) {
        Some(mode @ ("read" | "write")) => {
            let (streams, amount) = (num(1)?, num(2)?);
            let start = Instant::now();
            let total = std::thread::scope(|scope| -> Result<usize> {
                let threads: Vec<_> = (0..streams)
                    .map(|i| {
                        let to = SocketAddrV4::new(*to.ip(), to.port() + i as u16);
                        let write = mode == "write";
                        scope.spawn(move || -> Result<usize> {
                            let mut s = connect(net, to)?;
                            let mut buf = vec![0u8; CHUNK];
                            let mut done = 0;
                            if write {
                                done = amount / streams;
                                write_bytes(&mut s, done, &buf)?;
                                N::shutdown_write(&s)?;
                                // Timed to the server's end: it closes once it read everything.
                                while s.read(&mut buf)? > 0 {}
                            } else {
                                loop {
                                    match s.read(&mut buf)? {
                                        0 => break,
                                        k => done += k,
                                    }
                                }
                            }
                            Ok(done)
                        })
                    })
                    .collect();
                let mut total = 0;
                for t in threads {
                    total += t.join().map_err(|_| anyhow!("a stream panicked"))??;
                }
                Ok(total)
            })?;
            Ok(vec![total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9])
        }
        Some("rr") => {
            let (size, count) = (num(1)?, num(2)?);
            let mut s = connect(net, to)?;
            N::nodelay(&s);
            let req = vec![b'r'; size];
            let mut buf = vec![0u8; size];
            let mut lat = Vec::with_capacity(count);
            let start = Instant::now();
            for _ in 0..count {
                let t = Instant::now();
                s.write_all(&req)?;
                s.read_exact(&mut buf)?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let rate = count as f64 / start.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            Ok(vec![rate, pct(0.50), pct(0.99), pct(0.999)])
        }
        Some("connect") => {
            let count = num(1)?;
            let start = Instant::now();
            for _ in 0..count {
                let mut s = connect(net, to)?;
                s.write_all(b"c")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
            }
            let rate = count as f64 / start.elapsed().as_secs_f64();
            connect(net, to)?.write_all(b"q")?;
            Ok(vec![rate])
        }
        Some("udp") => {
            let size = num(1)?;
            let secs: f64 = args.get(2).ok_or_else(|| anyhow!("missing seconds"))?.parse()?;
            let u = net.udp_to(to)?;
            let d = vec![0u8; size];
            let (mut sent, until) = (0u64, Instant::now() + Duration::from_secs_f64(secs));
            while Instant::now() < until {
                for _ in 0..64 {
                    // A full socket buffer is the device's pace: keep going.
                    if N::send(&u, &d).is_ok() {
                        sent += 1;
                    }
                }
            }
            Ok(vec![sent as f64 / secs])
        }
        _ => bail!("client modes: read|write STREAMS BYTES, rr SIZE COUNT, connect COUNT, udp SIZE SECONDS"),
    }
}
