//! ipc benchmarks between two processes, printed as a table and written to
//! docs/results.md. Never asserted: speed is measured here, truth in the tests.
//!
//! `cargo bench -p capnet-ipc --bench ipc [-- --quick]` (what `make bench` runs).
//! Each figure is measured side by side in one run with the raw cache-line
//! ping-pong — the physical limit of two cores talking — so ratios survive a noisy
//! shared machine. Each measurement is repeated and the median taken.

use capnet_testkit::bench::median;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capnet_ipc::notify::{SpinPolicy, SpinTokens};
use capnet_ipc::pool::{BufferPool, PoolLayout, PoolView};
use capnet_ipc::region::Region;
use capnet_ipc::shm::{ShmRead, ShmWrite};
use capnet_ipc::shm_channel::{self, ShmEnd};
use capnet_ipc::{ChannelParams, Descriptor, Interest, Ordering, WaitOutcome, Waiter};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult, Pid};

type Tokens = SpinTokens<Arc<Region>>;

/// CPUs online, read once before any pinning (afterwards the affinity mask says 1).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn pin(cpu: usize) {
    let mut set = CpuSet::new();
    if set.set(cpu % cpus()).is_ok() {
        let _ = sched_setaffinity(Pid::from_raw(0), &set);
    }
}

/// Runs `child` in a forked process pinned to CPU 1 while `parent` runs pinned to
/// CPU 0; returns the parent's result. Everything shared is created before the fork.
fn in_two_processes<R>(child: impl FnOnce(), parent: impl FnOnce() -> R) -> R {
    // SAFETY: the benchmark is single-threaded at this point (no other thread can
    // hold a lock the child would need); the child only runs `child` and exits.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            pin(1);
            child();
            std::process::exit(0);
        }
        ForkResult::Parent { child } => {
            pin(0);
            let r = parent();
            waitpid(child, None).expect("waitpid");
            r
        }
    }
}

/// Raw ping-pong of one cache line's worth of words: ns one way.
fn raw_pingpong(iters: u32) -> f64 {
    let r = Region::create_multi_writer("bench-pingpong", 4096).expect("region");
    in_two_processes(
        || {
            for i in 1..=iters {
                while r.load32(0, Ordering::Acquire) != i {
                    std::hint::spin_loop();
                }
                r.store32(64, i, Ordering::Release);
            }
        },
        || {
            let t = Instant::now();
            for i in 1..=iters {
                r.store32(0, i, Ordering::Release);
                while r.load32(64, Ordering::Acquire) != i {
                    std::hint::spin_loop();
                }
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters) / 2.0
        },
    )
}

fn d(i: u32) -> Descriptor {
    Descriptor { pool: 0, flags: 0, index: i, offset: 0, len: 0 }
}

/// One descriptor there and back through a channel: ns one way. With `sleep` both
/// sides block on the futex every time (spin budget zero), so each hop pays a wake.
fn ring_pingpong(iters: u32, sleep: bool) -> f64 {
    let (mut a, mut b) = shm_channel::pair::<Descriptor>("bench-ring", ChannelParams::default()).expect("pair");
    let policy = if sleep { SpinPolicy::NEVER } else { SpinPolicy::DEFAULT };
    let recv_one = move |end: &mut ShmEnd, w: &mut Waiter, out: &mut Vec<Descriptor>| {
        out.clear();
        loop {
            if end.recv(out, 1).expect("recv") == 1 {
                return;
            }
            if sleep {
                w.wait(&mut [&mut *end], Some(Duration::from_secs(5)), None::<&Tokens>);
            } else {
                std::hint::spin_loop();
            }
        }
    };
    in_two_processes(
        || {
            let (mut w, mut out) = (Waiter::new(policy), Vec::new());
            for _ in 0..iters {
                recv_one(&mut b, &mut w, &mut out);
                b.send(&out).expect("send");
            }
        },
        || {
            let (mut w, mut out) = (Waiter::new(policy), Vec::new());
            let t = Instant::now();
            for i in 0..iters {
                a.send(&[d(i)]).expect("send");
                recv_one(&mut a, &mut w, &mut out);
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters) / 2.0
        },
    )
}

/// Streams `n` descriptors one way in batches of `batch` (spin-then-block on both
/// sides, spin tokens for this machine): returns (descriptors/s, futex calls per
/// message counting both sides' wakes and sleeps).
fn stream(n: u32, batch: usize) -> (f64, f64) {
    let (mut a, mut b) = shm_channel::pair::<Descriptor>("bench-stream", ChannelParams::default()).expect("pair");
    let tokens = shm_channel::spin_tokens(cpus() as u32 - 1).expect("tokens");
    let report = Region::create_multi_writer("bench-report", 4096).expect("report");
    let elapsed = in_two_processes(
        || {
            let mut w = Waiter::new(SpinPolicy::DEFAULT);
            let mut out = Vec::with_capacity(1024);
            let mut got = 0u32;
            while got < n {
                out.clear();
                let k = b.recv(&mut out, 1024).expect("recv");
                got += k as u32;
                if k == 0 {
                    w.wait(&mut [&mut b], Some(Duration::from_secs(5)), Some(&tokens));
                }
            }
            report.store64(0, b.stats.wakes + w.stats.sleeps, Ordering::Relaxed);
            b.send(&[d(0)]).expect("ack");
        },
        || {
            let mut w = Waiter::new(SpinPolicy::DEFAULT);
            a.interest = Interest::SPACE;
            let items: Vec<_> = (0..batch as u32).map(d).collect();
            let t = Instant::now();
            let mut sent = 0u32;
            while sent < n {
                let want = batch.min((n - sent) as usize);
                let k = a.send(&items[..want]).expect("send");
                sent += k as u32;
                if k == 0 {
                    w.wait(&mut [&mut a], Some(Duration::from_secs(5)), Some(&tokens));
                }
            }
            a.interest = Interest::RX;
            let mut out = Vec::new();
            while a.recv(&mut out, 1).expect("ack") == 0 {
                if w.wait(&mut [&mut a], Some(Duration::from_secs(5)), Some(&tokens)) == WaitOutcome::Idle {
                    continue;
                }
            }
            let calls = a.stats.wakes + w.stats.sleeps;
            (t.elapsed(), calls)
        },
    );
    let child_calls = report.load64(0, Ordering::Relaxed);
    let rate = f64::from(n) / elapsed.0.as_secs_f64();
    (rate, (elapsed.1 + child_calls) as f64 / f64::from(n))
}

/// 1500-byte payloads copied into pool buffers, lent across, copied out by the
/// reader and returned: payload GB/s.
fn payload_stream(n: u32) -> f64 {
    let params = ChannelParams::default();
    let (mut a, mut b) = shm_channel::pair::<Descriptor>("bench-payload", params).expect("pair");
    let mut pool = BufferPool::create("bench-pool", 1, PoolLayout::with_count(2048)).expect("pool");
    let pool_fd = pool.region().fd().as_fd().try_clone_to_owned().expect("dup");
    let tokens = shm_channel::spin_tokens(cpus() as u32 - 1).expect("tokens");
    let payload = vec![0xa5u8; 1500];
    let reader = pool.add_reader(1536);
    in_two_processes(
        || {
            let view = PoolView::attach(pool_fd, 1).expect("view");
            let mut w = Waiter::new(SpinPolicy::DEFAULT);
            let (mut out, mut bytes) = (Vec::with_capacity(1024), Vec::with_capacity(1500 * 64));
            let mut got = 0u32;
            while got < n {
                out.clear();
                let k = b.recv(&mut out, 256).expect("recv");
                got += k as u32;
                for dsc in &out {
                    bytes.clear();
                    view.read_into(dsc, &mut bytes).expect("read");
                }
                let mut returned = 0;
                while returned < out.len() {
                    returned += b.send(&out[returned..]).expect("return");
                }
                if k == 0 {
                    w.wait(&mut [&mut b], Some(Duration::from_secs(5)), Some(&tokens));
                }
            }
        },
        || {
            let mut w = Waiter::new(SpinPolicy::DEFAULT);
            let mut back = Vec::with_capacity(1024);
            let mut batch = Vec::with_capacity(32);
            let (mut sent, mut done) = (0u32, 0u32);
            let t = Instant::now();
            while done < n {
                batch.clear();
                while sent + (batch.len() as u32) < n && batch.len() < 32 {
                    match pool.fill(&payload).expect("fill") {
                        Some(dsc) => {
                            pool.lend(reader, &dsc).expect("lend");
                            batch.push(dsc);
                        }
                        None => break,
                    }
                }
                let mut pushed = 0;
                while pushed < batch.len() {
                    let k = a.send(&batch[pushed..]).expect("send");
                    pushed += k;
                    if k == 0 {
                        break;
                    }
                }
                // Buffers that did not fit go back to the pool (rare: the ring is deep).
                for dsc in &batch[pushed..] {
                    pool.give_back(reader, dsc).expect("unlend");
                }
                sent += pushed as u32;
                back.clear();
                let k = a.recv(&mut back, 1024).expect("recv");
                for dsc in &back {
                    pool.give_back(reader, dsc).expect("give back");
                }
                done += k as u32;
                if k == 0 && pushed == 0 {
                    a.interest = Interest::RX;
                    w.wait(&mut [&mut a], Some(Duration::from_secs(5)), Some(&tokens));
                }
            }
            f64::from(n) * 1500.0 / t.elapsed().as_secs_f64() / 1e9
        },
    )
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    if cpus() < 2 {
        eprintln!("these benchmarks pin two processes to two CPUs; this machine has one");
        return;
    }
    let reps = if quick { 3 } else { 7 };
    let scale = if quick { 1 } else { 4 };
    let mut rows: Vec<(String, String, String, String)> = Vec::new();
    let run = |name: &str, unit: &str, f: &mut dyn FnMut() -> f64| {
        let (m, spread) = median((0..reps).map(|_| f()).collect());
        eprintln!("{name}: {m:.2} {unit} (spread {spread:.0}%)");
        (name.to_owned(), m, unit.to_owned(), spread)
    };
    // Latencies alternate within each repetition (ping-pong, spinning ring, waking
    // ring), and each ratio is taken inside its repetition before the median, so
    // drift on this shared machine hits numerator and denominator alike.
    let (mut pps, mut spins, mut wakes, mut spin_ratios, mut wake_ratios) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let pp = raw_pingpong(50_000 * scale);
        let spin = ring_pingpong(50_000 * scale, false);
        let wake = ring_pingpong(5_000 * scale, true);
        pps.push(pp);
        spins.push(spin);
        wakes.push(wake);
        spin_ratios.push(spin / pp);
        wake_ratios.push(wake / pp);
    }
    let named = |name: &str, v: Vec<f64>| {
        let (m, spread) = median(v);
        eprintln!("{name}: {m:.2} ns (spread {spread:.0}%)");
        (name.to_owned(), m, "ns".to_owned(), spread)
    };
    let pp = named("raw cache-line ping-pong, one way", pps);
    let spin = named("ring one way, spinning", spins);
    let wake = named("ring one way, futex wake every hop", wakes);
    let mut add = |r: (String, f64, String, f64), ratio: Option<f64>| {
        rows.push((
            r.0,
            format!("{:.1} {}", r.1, r.2),
            ratio.map_or("—".into(), |x| format!("{x:.2}×")),
            format!("{:.0}%", r.3),
        ));
    };
    add(pp, Some(1.0));
    add(spin, Some(median(spin_ratios).0));
    add(wake, Some(median(wake_ratios).0));
    let mut futex_per_msg = 0.0;
    for batch in [1usize, 8, 32] {
        let mut calls = Vec::new();
        let r = run(&format!("descriptors/s one way, batch {batch}"), "M/s", &mut || {
            let (rate, c) = stream(2_000_000 * scale, batch);
            calls.push(c);
            rate / 1e6
        });
        let (c, _) = median(calls);
        if batch == 32 {
            futex_per_msg = c;
        }
        add(r, None);
    }
    let gb =
        run("1500-byte payloads through a pool, copied in and out", "GB/s", &mut || payload_stream(200_000 * scale));
    add(gb, None);
    rows.push((
        "futex calls per message, streaming (batch 32, window 1024)".into(),
        format!("{futex_per_msg:.5}"),
        "—".into(),
        "—".into(),
    ));

    let mut table =
        String::from("| measurement | median | ratio to ping-pong (median of per-run ratios) | spread (max−min)/median |\n|---|---|---|---|\n");
    for (name, value, ratio, spread) in &rows {
        table.push_str(&format!("| {name} | {value} | {ratio} | {spread} |\n"));
    }
    println!("\n{table}");
    if !quick {
        capnet_testkit::bench::write_section(env!("CARGO_MANIFEST_DIR"), "ipc-bench", "make bench", &table);
    }
}
