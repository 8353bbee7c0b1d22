//! The stack side of driver | ip: ip and whatever else the group runs, fed by
//! the driver's threads over the frame channel.

use std::collections::VecDeque;
use std::time::Duration;

use capnet_ip::Config;
use capnet_ipc::lent::{Chain, PoolKey};
use capnet_ipc::notify::SpinPolicy;
use capnet_ipc::shm_channel::ShmEnd;
use capnet_ipc::{Interest, Waiter};
use capnet_kernel_shim::device::Device;

use crate::device::device_fd;
use crate::{Cores, LinkImpairment, RuntimeError, Stack};

use crate::domain::driver::Driver;
use crate::frames::*;

#[derive(Debug)]
pub struct StackGroup {
    cores: Cores,
    /// The frame channels, once joined: from the driver (or a wire's peer), to it.
    port: Option<(FramesIn, FramesOut)>,
    waiter: Waiter,
    /// Frames waiting for pool buffers or ring slots, with the segment size of a
    /// TSO frame (while no port is joined too).
    backlog: VecDeque<(Chain, Option<u16>)>,
    /// Why the driver's channels are broken (the driver broke the protocol), or
    /// that none is joined yet: no frame moves until a new driver is joined
    /// ([`StackGroup::rejoin`]).
    broken: Option<String>,
    /// The applications' send pools the driver views, each with the pool id
    /// channel T names it by: frames whose payload lies there are lent in place.
    aliases: Vec<(PoolKey, u16)>,
}

/// Frames a peer lends over a channel (the driver's rx pool, or a wire peer's
/// pool): each copied out whole, every loan returned at once.
impl StackGroup {
    /// A stack group with no frame channels yet (a wire whose peer has not
    /// come): frames wait in the backlog, bounded, until [`StackGroup::plug`].
    pub fn unplugged(cores: Cores) -> Self {
        StackGroup {
            cores,
            port: None,
            waiter: Waiter::new(SpinPolicy::DEFAULT),
            backlog: VecDeque::new(),
            broken: Some("no peer has joined yet".into()),
            aliases: Vec::new(),
        }
    }

    /// The driver views application send pool `key` as `alias`: frames whose
    /// payload lies there go to it in place from now on.
    pub fn lend_to_driver(&mut self, key: PoolKey, alias: u16) {
        self.aliases.retain(|(k, a)| *k != key && *a != alias);
        self.aliases.push((key, alias));
    }

    /// The pool named `alias` is gone: its frames are copied again (first:
    /// the driver forgets it next).
    pub fn forget_driver_alias(&mut self, alias: u16) {
        self.aliases.retain(|(_, a)| *a != alias);
    }

    /// Joins frame channels (from [`StackHalf::attach`]) in place of whatever
    /// was there: frames waiting in the backlog go to the new peer, a chain half
    /// read from the old one is dropped.
    pub fn plug(&mut self, port: (FramesIn, FramesOut)) -> Result<(), RuntimeError> {
        self.port = Some(port);
        self.broken = None;
        self.flush()
    }

    /// Joins a restarted driver: fresh channels and pools in place of the dead
    /// driver's.
    pub fn rejoin(&mut self, half: StackHalf, driver: HalfGrant) -> Result<(), RuntimeError> {
        self.plug(half.attach(driver, Peer::Driver)?)
    }
}

/// Starts both groups in this process (the driver as two threads) on `dev`, its
/// link impaired as `link` says, and returns the stack group to drive. The same
/// halves join across processes when the driver runs sandboxed on its own.
pub fn start(
    dev: Device,
    cfg: Config,
    udp_queue_bytes: usize,
    link: LinkImpairment,
) -> Result<(StackGroup, Driver), RuntimeError> {
    let (fd, vnet) = device_fd(&dev)?;
    let tso = vnet && link.outbound.is_none();
    let (driver, stack) = (DriverHalf::new()?, StackHalf::new()?);
    let (to_stack, to_driver) = (driver.grant()?, stack.grant()?);
    let driver = driver.run(Some(fd), vnet, to_driver, link, crate::FrameTap::default())?;
    let mut cores = Cores::new(cfg, udp_queue_bytes);
    if tso {
        cores.use_tso();
    }
    let stack = stack.join(to_stack, cores)?;
    Ok((stack, driver))
}

/// A new stack group's channels for the driver's threads (the old ip domain
/// died or broke the channels): each thread takes its part at the top of its
/// next round.
impl StackGroup {
    /// Runs the cores' outputs and sends queued frames to the driver, as far as
    /// pool buffers and ring slots allow (the rest waits in the backlog), and
    /// gives back the driver's buffers whose last handle dropped.
    fn flush(&mut self) -> Result<(), RuntimeError> {
        self.pump_to_backlog();
        match self.port.as_mut() {
            Some((input, out)) => {
                input.flush_returns()?;
                out.send(&mut self.backlog, &self.aliases)
            }
            None => Ok(()),
        }
    }

    /// Drains both channels; returns whether anything arrived.
    fn drain(&mut self) -> Result<bool, RuntimeError> {
        let mut any = self.cores.receive_links();
        let Some((input, out)) = self.port.as_mut() else { return Ok(any) };
        loop {
            let cores = &mut self.cores;
            if input.recv(256, |f, _| {
                cores.receive_frame(f, false);
                Ok(())
            })? == 0
            {
                break;
            }
            any = true;
            // Answer what arrived (ACKs) before taking more.
            pump_to_backlog(cores, &mut self.backlog);
            out.send(&mut self.backlog, &self.aliases)?;
        }
        any |= out.take_returns()?;
        Ok(any)
    }

    /// Like [`Stack::poll`], also waking for the channel ends in `extra` (the
    /// applications' channels the sockets domain serves).
    ///
    /// A driver that breaks the channel protocol does not stop the stack: the
    /// channel is marked broken ([`StackGroup::broken`]), frames wait (bounded)
    /// until a new driver is joined, and everything else goes on.
    pub fn poll_with(&mut self, max_wait: Duration, extra: &mut [&mut ShmEnd]) -> Result<(), RuntimeError> {
        if self.broken.is_some() {
            self.cores.receive_links();
            self.pump_to_backlog();
            let wait = self.cores.wait_bound(max_wait);
            let mut ends: Vec<&mut ShmEnd> = self.cores.link_ends();
            ends.extend(extra.iter_mut().map(|e| &mut **e));
            crate::wait_on(&mut self.waiter, ends, wait);
            self.cores.receive_links();
            self.pump_to_backlog();
            return Ok(());
        }
        match self.poll_frames(max_wait, extra) {
            Err(RuntimeError::Peer(why)) => {
                self.broken = Some(why);
                Ok(())
            }
            r => r,
        }
    }

    /// Why the driver's channels are broken (or not joined yet), if they are.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Writes garbage over this side's frame channel indices: the hostile mode
    /// of a test (what a compromised ip domain could do to the area it owns).
    #[cfg(feature = "hostile")]
    pub fn scribble(&mut self, garbage: u32) {
        if let Some((input, out)) = self.port.as_mut() {
            input.end.scribble(garbage);
            out.end.scribble(garbage);
        }
    }

    fn pump_to_backlog(&mut self) {
        pump_to_backlog(&mut self.cores, &mut self.backlog);
    }

    fn poll_frames(&mut self, max_wait: Duration, extra: &mut [&mut ShmEnd]) -> Result<(), RuntimeError> {
        self.flush()?;
        if !self.drain()? {
            let wait = self.cores.wait_bound(max_wait);
            let Some((input, out)) = self.port.as_mut() else { return Ok(()) };
            out.end.interest = if self.backlog.is_empty() { Interest::RX } else { Interest::BOTH };
            let mut ends: Vec<&mut ShmEnd> = vec![&mut input.end, &mut out.end];
            ends.extend(self.cores.link_ends());
            ends.extend(extra.iter_mut().map(|e| &mut **e));
            crate::wait_on(&mut self.waiter, ends, wait);
            self.drain()?;
        }
        self.flush()
    }

    /// Runs the cores' outputs now (after the application side called them).
    pub fn push(&mut self) -> Result<(), RuntimeError> {
        if self.broken.is_some() {
            self.pump_to_backlog();
            return Ok(());
        }
        match self.flush() {
            Err(RuntimeError::Peer(why)) => {
                self.broken = Some(why);
                Ok(())
            }
            r => r,
        }
    }
}

/// Moves the cores' output to the backlog. A peer that stopped returning loans
/// (a driver that died and is being restarted, a wire's peer gone) must not make
/// us hold every frame since: the oldest go, as a full device queue would drop
/// them.
fn pump_to_backlog(cores: &mut Cores, backlog: &mut VecDeque<(Chain, Option<u16>)>) {
    cores.pump(|f, tso| backlog.push_back((f, tso)));
    if backlog.len() > MAX_BACKLOG {
        let excess = backlog.len() - MAX_BACKLOG;
        backlog.drain(..excess);
    }
}

impl crate::AppHost for StackGroup {
    fn poll_apps(&mut self, max_wait: Duration, apps: &mut [&mut ShmEnd]) -> Result<(), RuntimeError> {
        self.poll_with(max_wait, apps)
    }

    fn push(&mut self) -> Result<(), RuntimeError> {
        StackGroup::push(self)
    }

    fn lend_pools(&self) -> Vec<(capnet_ipc::lent::PoolKey, std::os::fd::BorrowedFd<'_>)> {
        self.port.as_ref().and_then(|(input, _)| input.pool()).into_iter().collect()
    }
}

impl Stack for StackGroup {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.poll_with(max_wait, &mut [])
    }

    fn cores(&mut self) -> &mut Cores {
        &mut self.cores
    }
}
