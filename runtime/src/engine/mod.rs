//! The engines: what a group waits on for work, and what it does when it comes.
//!
//! - [`MonoStack`]: the group holds the device — the device and every core in
//!   one thread;
//! - [`StackGroup`]: the group holds ip but not the driver — fed by the driver's
//!   threads (`domain::driver`) over the frame channel (`frames`);
//! - [`Plain`]: a group without ip (transports and/or sockets), woken by its
//!   links and its applications' channels.

pub mod mono;
pub mod stack;

use std::time::Duration;

pub use mono::MonoStack;
pub use stack::{start, StackGroup};

use crate::{wait_on, AppHost, Cores, RuntimeError, Stack};

/// A group without the ip domain (transports and/or sockets): its cores, woken
/// by its links and the applications' channels.
#[derive(Debug)]
pub struct Plain {
    cores: Cores,
    waiter: capnet_ipc::Waiter,
}

impl Plain {
    /// The group running `cores`.
    pub fn new(cores: Cores) -> Self {
        Self { cores, waiter: capnet_ipc::Waiter::new(capnet_ipc::notify::SpinPolicy::DEFAULT) }
    }

    fn pump(&mut self) {
        // No ip here, so no frame ever comes out.
        self.cores.pump(|_, _| {});
    }
}

impl Stack for Plain {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.poll_apps(max_wait, &mut [])
    }

    fn cores(&mut self) -> &mut Cores {
        &mut self.cores
    }
}

impl AppHost for Plain {
    fn poll_apps(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError> {
        let arrived = self.cores.receive_links();
        self.pump();
        if !arrived {
            let wait = self.cores.wait_bound(max_wait);
            let mut ends: Vec<&mut capnet_ipc::shm_channel::ShmEnd> = self.cores.link_ends();
            ends.extend(apps.iter_mut().map(|e| &mut **e));
            wait_on(&mut self.waiter, ends, wait);
            self.cores.receive_links();
            self.pump();
        }
        Ok(())
    }

    fn push(&mut self) -> Result<(), RuntimeError> {
        self.pump();
        Ok(())
    }

    /// The driver's frame pool, when it is lent to this group (tcp lends its
    /// buffers on to the sockets domain, which lends them on to applications).
    fn lend_pools(&self) -> Vec<(capnet_ipc::lent::PoolKey, std::os::fd::BorrowedFd<'_>)> {
        self.cores.views.pools().collect()
    }
}
