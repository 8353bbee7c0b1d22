//! The report of a run: figures per workload and composition, their ratios,
//! the table, the chart and the JSON.

use std::path::Path;

use crate::{now_utc, Comp, Costs, Sample, Sizes, Work, COMPS, WORKS};
use anyhow::{anyhow, Result};

/// A figure: the median of the rounds and the spread, (max − min) / median.
#[derive(Debug)]
pub(crate) struct Figure {
    pub(crate) workload: String,
    pub(crate) unit: &'static str,
    pub(crate) composition: &'static str,
    pub(crate) median: f64,
    pub(crate) spread_pct: f64,
    pub(crate) samples: Vec<f64>,
    /// Request/response: the median of each round's p50, p99 and p99.9, µs.
    pub(crate) latency_us: Option<[f64; 3]>,
    /// capnet: each domain's CPU seconds (median of the rounds).
    pub(crate) cpu_s: Vec<(String, f64)>,
    /// capnet: the medians of the samples' costs.
    pub(crate) costs: Costs,
}

/// What the table and chart are made from (and `--json`, in the design's
/// shape: [`Report::json`]).
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) machine: String,
    pub(crate) date: String,
    pub(crate) command: String,
    pub(crate) rounds: usize,
    pub(crate) quick: bool,
    pub(crate) sizes: Sizes,
    pub(crate) compositions: Vec<(&'static str, String)>,
    pub(crate) figures: Vec<Figure>,
    /// Per workload, capnet factored over capnet mono (over the TAP).
    pub(crate) factored_over_mono: Vec<(String, f64)>,
    /// The same over the in-memory wire.
    pub(crate) factored_over_mono_wire: Vec<(String, f64)>,
    /// What waking a sleeping domain on the same core costs here, µs (measured
    /// in this run: [`wake_cost_us`]).
    pub(crate) wake_us: f64,
    /// Runs that failed, each "WORKLOAD on COMPOSITION: why" (their cells
    /// hold only the other rounds' figures, or none).
    pub(crate) failed: Vec<String>,
}

pub(crate) fn med(v: Vec<f64>) -> f64 {
    capnet_testkit::bench::median(v).0
}

impl Report {
    pub(crate) fn new(
        rounds: usize,
        quick: bool,
        sizes: Sizes,
        results: &[(Work, Comp, Vec<Sample>)],
        wake_us: f64,
        failed: Vec<String>,
    ) -> Self {
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
            failed,
        }
    }

    /// `capnet bench --json`, in the shape DESIGN.md names: `runs` (workload,
    /// path, composition, value, unit, spread — the median and (max − min) /
    /// median in percent — and what else a run measured), `ratios` (workload,
    /// path, factored_over_mono). Paths: `tap` and `wire` (a composition's
    /// `-wire` twin), `veth` for Linux ↔ Linux.
    pub(crate) fn json(&self) -> serde_json::Value {
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
            "compositions": compositions, "runs": runs, "ratios": ratios, "failed": self.failed,
        })
    }

    pub(crate) fn figure(&self, w: &str, c: &str) -> Option<&Figure> {
        self.figures.iter().find(|f| f.workload == w && f.composition == c)
    }

    /// The table: a row per workload, a column per composition, then the
    /// factored/mono ratio; request/response latencies and the factored
    /// stack's costs below.
    pub(crate) fn table(&self) -> String {
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
        t += "\nCopies per byte of payload (medians): every copy of payload bytes the stack's processes and the \
              capnet side's applications made — into and out of pool buffers, the payload a message carries inline \
              (into the archive and the channel's buffer, out of them again), the protocol cores' queues and \
              segments, an application call's copy into or out of its buffer, and the device's read and write \
              calls (the kernel's copy) — over the payload moved. Headers copied out to be parsed, and the rest \
              of a message (a call, the loans naming lent buffers), are not payload and not counted; a borrowing \
              read's checksum reads every byte in place and copies none; on the in-memory wire the peer instance's application \
              runs in the bench's process too, so its copies are counted as well.\n\n| workload |";
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
        if !self.failed.is_empty() {
            t += "\nRuns that failed (their cells hold only the other rounds' figures, or none):\n\n";
            for f in &self.failed {
                t += &format!("- {f}\n");
            }
        }
        t
    }

    /// Rewrites the `capnet-bench` section of `DIR/docs/results.md` with the
    /// table and writes the chart to `DIR/docs/results/bench.svg`.
    pub(crate) fn write_docs(&self, dir: &Path) -> Result<()> {
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

    pub(crate) fn command_line(&self) -> String {
        format!("capnet {}", std::env::args().skip(1).collect::<Vec<_>>().join(" "))
    }

    /// Every workload's figure on each composition relative to capnet mono:
    /// one line per workload from mono through each added boundary to
    /// factored, with Linux's as a point at the end.
    pub(crate) fn chart(&self, path: &Path) -> Result<()> {
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
