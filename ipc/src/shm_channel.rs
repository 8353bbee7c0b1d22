//! Channels over real memfd regions: the composition every domain runtime uses.
//!
//! Each end creates its own area ([`create_area`]), which the supervisor grants to
//! the other end; each end then attaches its own area read-write and the peer's
//! read-only ([`attach`]). [`pair`] does both halves in one process, for tests,
//! benchmarks and groups that share a process.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::channel::{area_len, init_area, AttachError, ChannelEnd, ChannelParams, End};
use crate::descriptor::{Descriptor, ShmSafe};
use crate::notify::{LinuxFutex, SpinTokens};
use crate::region::{Region, RegionError, RegionRo};

/// A channel end over memfd regions, carrying descriptors.
pub type ShmEnd<T = Descriptor> = ChannelEnd<Arc<Region>, Arc<RegionRo>, T, LinuxFutex>;

/// Making or attaching a memfd channel failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmChannelError {
    /// The region could not be made, or the peer's region was refused.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// The peer's area does not match ours.
    #[error(transparent)]
    Attach(#[from] AttachError),
}

/// Creates, initialises and seals the area of end `end`.
pub fn create_area<T: ShmSafe>(name: &str, end: End, params: ChannelParams) -> Result<Region, ShmChannelError> {
    let region = Region::create(name, area_len::<T>(params.capacity))?;
    init_area::<_, T>(&region, end, params)?;
    Ok(region)
}

/// Adopts a blank region (`Region::blank`, made by the supervisor) as the area of
/// end `end`: maps it, seals it and initialises it.
pub fn adopt_area<T: ShmSafe>(fd: OwnedFd, end: End, params: ChannelParams) -> Result<Region, ShmChannelError> {
    let region = Region::adopt(fd, area_len::<T>(params.capacity))?;
    init_area::<_, T>(&region, end, params)?;
    Ok(region)
}

/// Attaches end `end`: our own area, and the peer's area from its granted fd.
pub fn attach<T: ShmSafe>(
    mine: Region,
    peer: OwnedFd,
    end: End,
    params: ChannelParams,
) -> Result<ShmEnd<T>, ShmChannelError> {
    let peer = RegionRo::attach(peer, area_len::<T>(params.capacity))?;
    Ok(ChannelEnd::attach(Arc::new(mine), Arc::new(peer), end, params, LinuxFutex)?)
}

/// Both ends of a channel, in this process (each may then move to its own thread).
pub fn pair<T: ShmSafe>(name: &str, params: ChannelParams) -> Result<(ShmEnd<T>, ShmEnd<T>), ShmChannelError> {
    let a = create_area::<T>(&format!("{name}.a"), End::A, params)?;
    let b = create_area::<T>(&format!("{name}.b"), End::B, params)?;
    let a_fd = a.fd().try_clone_to_owned().map_err(RegionError::Map)?;
    let b_fd = b.fd().try_clone_to_owned().map_err(RegionError::Map)?;
    Ok((attach(a, b_fd, End::A, params)?, attach(b, a_fd, End::B, params)?))
}

/// The spin-token area: the one region every domain writes, so it is sealed only
/// against resizing (not `FUTURE_WRITE`); see [`SpinTokens`] for why that is safe.
pub fn spin_tokens(limit: u32) -> Result<SpinTokens<Arc<Region>>, RegionError> {
    Ok(SpinTokens::new(Arc::new(Region::create_multi_writer("capnet-spin-tokens", 64)?), 0, limit))
}
