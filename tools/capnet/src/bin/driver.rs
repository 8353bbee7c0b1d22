//! capnet-driver: the driver domain as a sandboxed process of its own.
//!
//! Spawned by the supervisor (kernel-shim `spawn`: own namespaces, own uid, no
//! capabilities) with its supervisor socket as granted fd 3. It receives the device
//! (a TAP or packet socket fd), creates its stats region, rx pool and channel areas
//! and sends them, receives the stack group's, starts its reader and writer threads,
//! enters the `driver` sandbox, and from then on publishes its counters until the
//! supervisor goes away (its socket closes) or kills it.
#![forbid(unsafe_code)]

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapKind, Rights};
use capnet_kernel_shim::sandbox::{self, StatsRegion};
use capnet_kernel_shim::spawn::take_granted_fd;
use capnet_runtime::two_group::{DriverHalf, HalfGrant};
use capnet_runtime::LinkImpairment;

fn main() {
    if let Err(e) = run() {
        eprintln!("capnet-driver: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let sock = UnixStream::from(take_granted_fd(0).ok_or_else(|| anyhow::anyhow!("no supervisor socket at fd 3"))?);
    // The impairment comes as arguments: --loss P --reorder P --seed S.
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let loss: f64 = arg("--loss").map_or(Ok(0.0), |v| v.parse())?;
    let reorder: f64 = arg("--reorder").map_or(Ok(0.0), |v| v.parse())?;
    let seed: u64 = arg("--seed").map_or(Ok(1), |v| v.parse())?;
    let link = LinkImpairment::symmetric(loss, reorder, seed);

    let mut caps = recv_caps(sock.as_fd())?;
    // The device's tag says whether its frames carry the virtio-net header (1).
    let (device, vnet) = match caps.pop() {
        Some(c) if c.kind == CapKind::Device && caps.is_empty() => {
            let vnet = c.tag == 1;
            (c.into_fd(), vnet)
        }
        _ => anyhow::bail!("expected exactly the device capability first"),
    };
    let stats: &'static _ = Box::leak(Box::new(StatsRegion::create()?));
    let half = DriverHalf::new()?;
    let g = half.grant()?;
    let all = Rights::READ | Rights::MAP | Rights::GRANT;
    let ro = Rights::READ | Rights::MAP;
    let mine = [
        Cap::new(CapKind::Region, all, 0, stats.fd().try_clone_to_owned()?)?,
        Cap::new(CapKind::Pool, all, 1, g.pool)?,
        Cap::new(CapKind::ChannelEnd, all, 2, g.r_area)?,
        Cap::new(CapKind::ChannelEnd, all, 3, g.t_area)?,
    ];
    send_caps(sock.as_fd(), &mine.iter().map(|c| (c, ro)).collect::<Vec<_>>())?;
    let mut theirs = recv_caps(sock.as_fd())?;
    if theirs.len() != 3 {
        anyhow::bail!("expected the stack group's pool and two channel areas, got {} capabilities", theirs.len());
    }
    let t_area = theirs.pop().map(Cap::into_fd);
    let r_area = theirs.pop().map(Cap::into_fd);
    let pool = theirs.pop().map(Cap::into_fd);
    let (Some(pool), Some(r_area), Some(t_area)) = (pool, r_area, t_area) else {
        anyhow::bail!("missing capabilities")
    };
    let driver = half.run(device, vnet, HalfGrant { pool, r_area, t_area }, link)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?; // setsockopt: before the sandbox
    sandbox::enter("driver", stats)?;

    // Publish counters until the supervisor goes away.
    let mut probe = [0u8; 1];
    loop {
        let d = driver.stats();
        let values = [
            d.frames_read,
            d.frames_written,
            d.write_errors,
            d.inbound.dropped,
            d.inbound.duplicated,
            d.inbound.reordered,
            d.inbound.corrupted,
            d.outbound.dropped,
            d.outbound.duplicated,
            d.outbound.reordered,
            d.outbound.corrupted,
        ];
        for (i, v) in values.into_iter().enumerate() {
            StatsRegion::set(stats, i, v);
        }
        if driver.ended() {
            // Only an error ends a thread: the device or a channel failed.
            driver.stop()?;
            anyhow::bail!("the data path ended");
        }
        match (&sock).read(&mut probe) {
            Ok(0) => return Ok(()), // the supervisor is gone
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.into()),
        }
    }
}
