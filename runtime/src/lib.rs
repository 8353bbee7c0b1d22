//! capnet-runtime: binds a group's protocol cores to a device, the other
//! groups' channels and real time. The same cores run in every composition
//! (DESIGN, "Groups"); only what this crate puts around them differs.
//!
//! - [`Cores`]: the domains one group runs, each with its core and its typed
//!   links ([`link::Link`]) to domains of other groups, one module per domain in
//!   [`domain`]; outputs move by direct calls between domains here and over the
//!   links otherwise;
//! - [`engine`]: what the group waits on — [`MonoStack`] (it holds the device),
//!   [`StackGroup`] (it holds ip, fed by the driver's threads over the frame
//!   channel, [`frames`]), [`Plain`] (neither);
//! - [`device`]: frames to and from a device fd, impairment stages, capture;
//! - [`domain::driver`]: the driver domain's reader and writer threads.

#![forbid(unsafe_code)]

mod cores;
pub mod device;
pub mod domain;
pub mod edge;
pub mod engine;
pub mod fake;
pub mod frames;
pub mod link;

use std::time::Duration;

use capnet_ip::TransportId;

pub use cores::{Clock, Cores, STACK_RECV_BUFFER};
pub use device::{set_nonblocking, DeviceStats, FrameTap, LinkImpairment};
pub use engine::{MonoStack, Plain, StackGroup};

/// The transport id the udp core has in the ip core's demux table.
pub const UDP: TransportId = TransportId(1);
/// The transport id of the sockets domain's ICMP echo sockets.
pub const SOCKETS: TransportId = TransportId(2);
/// The transport id the tcp core has in the ip core's demux table.
pub const TCP: TransportId = TransportId(3);
/// The transport id of a tcp domain being swapped out, for the flows it keeps.
pub const TCP_OLD: TransportId = TransportId(4);

/// An echo reply for an echo socket: (identifier, from, sequence, data).
pub type EchoReply = (u16, capnet_ip::Ipv4Address, u16, Vec<u8>);

/// Errors running a stack.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A device read or write failed.
    #[error("device I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// Making the channels or pools between groups failed.
    #[error("cannot join the groups: {0}")]
    Ipc(String),
    /// A peer group broke the channel protocol.
    #[error("peer group broke the channel protocol: {0}")]
    Peer(String),
}

/// The spin tokens every wait of this process takes (DESIGN, "Waking up"): a
/// waiter spins through its budget only while it holds one, and at most the
/// supervisor's limit (the cores but one, or none when groups outnumber cores)
/// hold one at once, so spinning never starves the domain it waits for. Shared by every group of a stack (a multi-writer region
/// the supervisor grants); without them ([`use_spin_tokens`] not called: tests
/// in one process) every wait blocks at once.
static SPIN_TOKENS: std::sync::OnceLock<SpinTokens> = std::sync::OnceLock::new();

/// Spin tokens over a region every group maps writable.
pub type SpinTokens = capnet_ipc::notify::SpinTokens<std::sync::Arc<capnet_ipc::region::Region>>;

/// Makes this process's waits spin with `tokens` (once, before any wait).
pub fn use_spin_tokens(tokens: SpinTokens) {
    let _ = SPIN_TOKENS.set(tokens);
}

/// The spin tokens waits take, if this process has them.
pub(crate) fn tokens() -> Option<&'static SpinTokens> {
    SPIN_TOKENS.get()
}

/// A composition of the packet path an application thread drives: it polls, and
/// calls the udp core in between. Tests are written once against this trait.
pub trait Stack {
    /// Waits up to `max_wait` for work, then does all that is ready.
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError>;
    /// The cores (the application side calls the udp core between polls).
    fn cores(&mut self) -> &mut Cores;
    /// The device side's counters, where this composition keeps them in the same
    /// thread (`None` when the driver is a group of its own).
    fn device_stats(&self) -> Option<DeviceStats> {
        None
    }
}

/// A composition that also serves applications' channels (the sockets domain's
/// side of `capnet::net`).
pub trait AppHost: Stack {
    /// Like [`Stack::poll`], also returning early when one of `apps` has work.
    fn poll_apps(
        &mut self,
        max_wait: Duration,
        apps: &mut [&mut capnet_ipc::shm_channel::ShmEnd],
    ) -> Result<(), RuntimeError>;
    /// Runs the cores' outputs now (after the application side called them).
    fn push(&mut self) -> Result<(), RuntimeError>;
    /// The pools whose buffers received data lies in here (the frames read
    /// into this group's pool, or lent to it by the driver): granted to an
    /// application at attach, so the sockets domain can lend it them.
    fn lend_pools(&self) -> Vec<(capnet_ipc::lent::PoolKey, std::os::fd::BorrowedFd<'_>)> {
        Vec::new()
    }
}

/// The most payload one TSO segment carries (its IP datagram stays under 64 KiB).
pub const TSO_BYTES: usize = 64_000;

/// How long the mono composition waits on its device while applications are
/// attached: a futex wake cannot interrupt `poll(2)`, so it looks at their
/// channels at least this often (their calls wait at most this long).
pub const MONO_APP_TICK: Duration = Duration::from_millis(1);

/// Waits on `ends` (the design's spin-then-block) for at most `wait`. A group
/// with more ends than one wait covers waits on the first ones and looks at the
/// rest every [`MONO_APP_TICK`].
pub(crate) fn wait_on(
    waiter: &mut capnet_ipc::Waiter,
    mut ends: Vec<&mut capnet_ipc::shm_channel::ShmEnd>,
    wait: Duration,
) {
    if ends.is_empty() {
        std::thread::sleep(wait); // nothing to wake us but the clock
        return;
    }
    let mut wait = wait;
    if ends.len() > capnet_ipc::channel::MAX_WAIT_ENDS {
        ends.truncate(capnet_ipc::channel::MAX_WAIT_ENDS);
        wait = wait.min(MONO_APP_TICK);
    }
    waiter.wait(&mut ends, Some(wait), tokens());
}
