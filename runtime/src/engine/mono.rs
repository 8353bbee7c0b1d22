//! [`MonoStack`]: the device and every core of the group in one thread.

use std::os::fd::OwnedFd;
use std::time::Duration;

use capnet_ip::Config;
use capnet_ipc::lent::LoanPool;
use capnet_kernel_shim::device::Device as NetDevice;
use capnet_proto::frames::FRAME_LAYOUT;

use crate::device::{Captured, Device, FdDevice, Impaired};
use crate::{wait_on, AppHost, Cores, DeviceStats, FrameTap, LinkImpairment, RuntimeError, Stack};

/// Every core of the group in one thread over one device.
#[derive(Debug)]
pub struct MonoStack {
    /// The device, behind the capture and the link's impairment.
    dev: Impaired<Captured<FdDevice>>,
    /// The pool frames are read into: the cores keep handles on its buffers.
    frames: LoanPool,
    cores: Cores,
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
    /// A stack on `dev` with ip configuration `cfg`, its link impaired as
    /// `link` says.
    pub fn new(
        dev: NetDevice,
        cfg: Config,
        udp_queue_bytes: usize,
        link: LinkImpairment,
    ) -> Result<Self, RuntimeError> {
        let dev = FdDevice::of(&dev)?;
        Self::on(dev, Cores::new(cfg, udp_queue_bytes), link, FrameTap::default())
    }

    /// A stack on a device fd granted as a capability (`vnet`: its frames carry
    /// the virtio-net header), running `cores` (which must include ip), its
    /// frames copied to `tap`'s capture while one runs.
    pub fn on_fd(
        fd: OwnedFd,
        vnet: bool,
        cores: Cores,
        link: LinkImpairment,
        tap: FrameTap,
    ) -> Result<Self, RuntimeError> {
        Self::on(FdDevice::new(fd, vnet)?, cores, link, tap)
    }

    fn on(dev: FdDevice, mut cores: Cores, link: LinkImpairment, tap: FrameTap) -> Result<Self, RuntimeError> {
        if dev.vnet() && link.outbound.is_none() {
            cores.use_tso();
        }
        let dev = Impaired::new(Captured::new(dev, tap), link)?;
        let frames = LoanPool::create("capnet-mono-frames", crate::frames::RX_POOL, FRAME_LAYOUT)
            .map_err(crate::frames::ipc_err)?;
        let mut s = Self {
            watch: DeviceWatch::start(dev.fd())?,
            dev,
            frames,
            cores,
            waiter: capnet_ipc::Waiter::new(capnet_ipc::notify::SpinPolicy::DEFAULT),
            backlog: false,
        };
        s.flush();
        Ok(s)
    }

    /// The device side's counters, with the impairment stages' and the frame
    /// pool's occupancy.
    pub fn device_stats(&self) -> DeviceStats {
        DeviceStats { pool_in_use: self.frames.out() as u64, ..self.dev.stats() }
    }

    /// Runs the cores and hands the device what they send (and what the
    /// impairment holds that is due).
    fn flush(&mut self) {
        self.cores.receive_links();
        let dev = &mut self.dev;
        self.cores.pump(|frame, tso| dev.transmit(&frame, tso));
        self.dev.transmit_due();
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
        if let Some(due) = self.dev.due_in() {
            wait = wait.min(due);
        }
        if self.backlog {
            // Frames are waiting: no sleep (and no doorbell to ring at once).
        } else if apps.is_empty() && self.cores.links().next().is_none() {
            self.dev.wait(wait)?;
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
        // Checksums are vouched for on frames that go straight to the cores
        // (the impairment takes that back for what it holds).
        loop {
            let Some((frame, vouched)) = self.dev.receive(&mut self.frames, true)? else { break };
            self.cores.receive_frame(&frame, vouched);
            drop(frame);
            budget -= 1;
            self.backlog = budget == 0;
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

    fn lend_pools(&self) -> Vec<(capnet_ipc::lent::PoolKey, std::os::fd::BorrowedFd<'_>)> {
        vec![(self.frames.key(), self.frames.region().fd())]
    }
}
