//! [`MonoStack`]: the device and every core of the group in one thread.

use std::os::fd::OwnedFd;
use std::time::Duration;

use capnet_ip::Config;
use capnet_kernel_shim::device::{Device, VNET_HDR_LEN};

use crate::device::{device_fd, plain_frame, read_frame, set_nonblocking, wait_readable, write_frame, Stage};
use crate::{wait_on, AppHost, Cores, DeviceStats, FrameTap, LinkImpairment, RuntimeError, Stack};

/// The ip and udp cores in one thread over one device.
#[derive(Debug)]
pub struct MonoStack {
    fd: OwnedFd,
    vnet: bool,
    cores: Cores,
    buf: Vec<u8>,
    inbound: Stage,
    outbound: Stage,
    /// The device side's counters.
    pub stats: DeviceStats,
    /// Copies of the device's frames for `capnet capture`.
    pub tap: FrameTap,
    /// Rings while the stack sleeps on channels and a frame arrives.
    watch: DeviceWatch,
    waiter: capnet_ipc::Waiter,
    /// The last round stopped reading at its budget: the device may hold more.
    backlog: bool,
}

/// How the mono stack sleeps on its applications' channels (futexes) and its
/// device (`poll(2)`) at once, which no one system call does: while it sleeps,
/// a thread of its own blocks in `poll(2)` on the device and, when a frame is
/// there, rings a doorbell — a message on an in-process channel the stack waits
/// on among the others. Without it the stack would have to look at one of the
/// two every [`MONO_APP_TICK`], and every call or frame would wait for that tick.
#[derive(Debug)]
struct DeviceWatch {
    /// The stack's end of the doorbell channel.
    bell: capnet_ipc::shm_channel::ShmEnd,
    /// 1 while the stack sleeps and wants a ring (the watcher waits for it).
    armed: std::sync::Arc<std::sync::atomic::AtomicU32>,
    rung: Vec<capnet_ipc::Descriptor>,
}

/// `armed` value that tells the watcher to end.
const WATCH_STOP: u32 = 2;

impl DeviceWatch {
    /// Starts the watcher on a copy of `fd` (before the sandbox: no thread may
    /// be started inside it).
    fn start(fd: &OwnedFd) -> Result<Self, RuntimeError> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let ipc = |e: capnet_ipc::shm_channel::ShmChannelError| RuntimeError::Ipc(e.to_string());
        let params = capnet_ipc::channel::ChannelParams { capacity: 16, epoch: 1 };
        let (mut ring, bell) = capnet_ipc::shm_channel::pair("capnet-doorbell", params).map_err(ipc)?;
        let fd = fd.try_clone().map_err(RuntimeError::Io)?;
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let watcher = armed.clone();
        // Returns only once the thread has finished starting: thread start runs
        // with signals blocked, and a sandbox entered meanwhile would kill it there.
        let started = std::sync::Arc::new(std::sync::Barrier::new(2));
        let up = started.clone();
        std::thread::Builder::new()
            .name("device-watch".into())
            .spawn(move || {
                up.wait();
                loop {
                    let mut a = watcher.load(Acquire);
                    while a == 0 {
                        let _ = rustix::thread::futex::wait(&watcher, rustix::thread::futex::Flags::PRIVATE, 0, None);
                        a = watcher.load(Acquire);
                    }
                    if a == WATCH_STOP {
                        return;
                    }
                    // Woken every 100 ms while idle, to see whether the stack is gone
                    // (a pipe to stop it would be an fd no grant explains).
                    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
                    let tick = rustix::time::Timespec { tv_sec: 0, tv_nsec: 100_000_000 };
                    if !matches!(rustix::event::poll(&mut fds, Some(&tick)), Ok(1..)) {
                        continue;
                    }
                    if watcher.compare_exchange(1, 0, AcqRel, Acquire).is_ok() {
                        let _ = ring.send(&[capnet_ipc::Descriptor::default()]);
                    }
                }
            })
            .map_err(RuntimeError::Io)?;
        started.wait();
        Ok(Self { bell, armed, rung: Vec::new() })
    }

    /// The stack is about to sleep: ring when a frame arrives.
    fn arm(&self) {
        let (acqrel, acq) = (std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire);
        if self.armed.compare_exchange(0, 1, acqrel, acq).is_ok() {
            let _ = rustix::thread::futex::wake(&self.armed, rustix::thread::futex::Flags::PRIVATE, 1);
        }
    }

    /// The stack woke: forget the rings (it reads the device whatever woke it).
    fn quiet(&mut self) {
        let _ = self.armed.compare_exchange(
            1,
            0,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        );
        self.rung.clear();
        let _ = self.bell.recv(&mut self.rung, 16);
    }
}

impl Drop for DeviceWatch {
    fn drop(&mut self) {
        // Ends a watcher waiting to be armed, or one in poll(2) at its next tick.
        self.armed.store(WATCH_STOP, std::sync::atomic::Ordering::Release);
        let _ = rustix::thread::futex::wake(&self.armed, rustix::thread::futex::Flags::PRIVATE, 1);
    }
}

impl MonoStack {
    /// A stack on `dev` (plain frames) with ip configuration `cfg`, its link
    /// impaired as `link` says.
    pub fn new(dev: Device, cfg: Config, udp_queue_bytes: usize, link: LinkImpairment) -> Result<Self, RuntimeError> {
        Self::with_cores(dev, Cores::new(cfg, udp_queue_bytes), link)
    }

    /// A stack on `dev` running `cores` (which must include ip).
    pub fn with_cores(dev: Device, cores: Cores, link: LinkImpairment) -> Result<Self, RuntimeError> {
        let (fd, vnet) = device_fd(&dev)?;
        Self::on_fd(fd, vnet, cores, link)
    }

    /// A stack on a device fd granted as a capability (`vnet`: its frames carry
    /// the virtio-net header), running `cores` (which must include ip).
    pub fn on_fd(fd: OwnedFd, vnet: bool, mut cores: Cores, link: LinkImpairment) -> Result<Self, RuntimeError> {
        let fd = set_nonblocking(fd)?;
        if vnet && link.outbound.is_none() {
            cores.use_tso();
        }
        let mut s = Self {
            vnet,
            cores,
            buf: vec![0u8; 65536 + VNET_HDR_LEN],
            inbound: Stage::new(link.inbound)?,
            outbound: Stage::new(link.outbound)?,
            stats: DeviceStats::default(),
            tap: FrameTap::default(),
            watch: DeviceWatch::start(&fd)?,
            waiter: capnet_ipc::Waiter::new(capnet_ipc::notify::SpinPolicy::DEFAULT),
            backlog: false,
            fd,
        };
        s.flush();
        Ok(s)
    }

    /// The device side's counters, with the impairment stages'.
    pub fn device_stats(&self) -> DeviceStats {
        DeviceStats { inbound: self.inbound.stage.stats, outbound: self.outbound.stage.stats, ..self.stats }
    }

    /// Delivers inbound frames that are due, runs the cores, and writes outbound
    /// frames that are due.
    fn flush(&mut self) {
        self.cores.receive_links();
        while let Some(f) = self.inbound.pop() {
            self.cores.receive_frame(&f, false);
        }
        let (out, fd, vnet, stats, tap) = (&mut self.outbound, &self.fd, self.vnet, &mut self.stats, &self.tap);
        self.cores.pump(|frame, tso| {
            if out.passthrough {
                out.passed();
                write_frame(fd, &frame, vnet, tso, stats, tap);
            } else {
                out.push(frame);
            }
        });
        while let Some(frame) = self.outbound.pop() {
            write_frame(&self.fd, &frame, self.vnet, None, &mut self.stats, &self.tap);
        }
    }
}

/// Frames the monolithic stack reads from its device in one round, before it
/// serves its applications again.
const MONO_READ_BUDGET: usize = 8;

impl MonoStack {
    /// Sleeps until a frame, a message on a link or an application's channel,
    /// or the cores' next deadline; then takes every frame and runs the cores.
    fn run(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError> {
        self.flush();
        let mut wait = self.cores.wait_bound(max_wait);
        for due in [self.inbound.due_in(), self.outbound.due_in()].into_iter().flatten() {
            wait = wait.min(due);
        }
        if self.backlog {
            // Frames are waiting: no sleep (and no doorbell to ring at once).
        } else if apps.is_empty() && self.cores.links().is_empty() {
            wait_readable(&self.fd, wait)?;
        } else if !wait.is_zero() {
            self.watch.arm();
            let mut ends: Vec<&mut capnet_ipc::shm_channel::ShmEnd> = self.cores.link_ends();
            ends.extend(apps.iter_mut().map(|e| &mut **e));
            ends.insert(0, &mut self.watch.bell);
            wait_on(&mut self.waiter, ends, wait);
            self.watch.quiet();
        }
        // At most a budget of frames a round: a sender the ACKs keep busy fills
        // the device as fast as it is read, and the applications' calls (which
        // drain the receive buffers and so open the windows) wait for the round.
        let mut budget = MONO_READ_BUDGET;
        self.backlog = false;
        while let Some(n) = read_frame(&self.fd, &mut self.buf)? {
            budget -= 1;
            self.backlog = budget == 0;
            self.stats.frames_read += 1;
            self.stats.device_bytes += n as u64;
            // Checksums are vouched for only on frames that go straight to the
            // cores: an impairment stage may corrupt what it holds.
            let vouch = self.inbound.passthrough;
            let Some((frame, vouched)) = plain_frame(&mut self.buf[..n], self.vnet, vouch, &mut self.stats) else {
                continue;
            };
            self.tap.record(frame);
            if self.inbound.passthrough {
                self.inbound.passed();
                self.cores.receive_frame(frame, vouched);
            } else {
                self.inbound.push(frame.to_vec());
            }
            self.flush();
            if self.backlog {
                break;
            }
        }
        self.flush();
        Ok(())
    }
}

impl Stack for MonoStack {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.run(max_wait, &mut [])
    }

    fn cores(&mut self) -> &mut Cores {
        &mut self.cores
    }

    fn device_stats(&self) -> Option<DeviceStats> {
        Some(MonoStack::device_stats(self))
    }
}

impl AppHost for MonoStack {
    fn poll_apps(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError> {
        self.run(max_wait, apps)
    }

    fn push(&mut self) -> Result<(), RuntimeError> {
        self.flush();
        Ok(())
    }
}
