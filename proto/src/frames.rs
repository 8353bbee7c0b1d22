//! The frame channel between the driver and ip as capabilities: what one
//! group grants the other (its pool and its areas of the two descriptor
//! channels), and the blank regions of those sizes the supervisor makes for a
//! sandboxed group that may not create memory (a restarted peer's rejoin).
//! The channels themselves are the runtime's (`capnet_runtime::frames`).

use std::os::fd::OwnedFd;

use capnet_ipc::channel::{area_len, ChannelParams};
use capnet_ipc::pool::PoolLayout;
use capnet_ipc::region::{Region, RegionError};
use capnet_ipc::Descriptor;

/// Buffers in each side's frame pool.
pub const POOL_BUFFERS: u32 = 1024;

/// Bytes of a frame buffer: the largest frame a device hands over (a 64 KiB
/// TSO or GRO super-frame, its Ethernet header and the virtio-net header),
/// rounded up to a multiple of 64. A device reads a frame straight into one
/// buffer; a buffer's pages are touched only as far as frames fill them.
pub const FRAME_BUF: u32 = 65600;

/// The shape of a frame pool (each side's, and the monolithic stack's).
pub const FRAME_LAYOUT: PoolLayout = PoolLayout { buf_size: FRAME_BUF, count: POOL_BUFFERS, headroom: 0 };

/// The pool ids channel T names the applications' send pools by: ip lends
/// the driver a frame's payload where it lies, in the application's buffer,
/// behind headers copied into the stack's own pool. The supervisor gives each
/// attached application one, unused by any other attached one.
pub const APP_POOL_ALIASES: std::ops::RangeInclusive<u16> = 0x100..=0xffff;

/// The fds one group grants the other: its pool and its areas of channels R
/// (frames in) and T (frames out).
#[derive(Debug)]
pub struct HalfGrant {
    /// The granting group's pool (the driver's rx pool, or the stack's tx pool).
    pub pool: OwnedFd,
    /// Its area of channel R (frames in).
    pub r_area: OwnedFd,
    /// Its area of channel T (frames out).
    pub t_area: OwnedFd,
}

impl HalfGrant {
    /// Blank regions of the sizes a frame-channel half needs, named for `side`
    /// ("stack" or "driver").
    pub fn blank(side: &str) -> Result<Self, RegionError> {
        let area = area_len::<Descriptor>(ChannelParams::default().capacity);
        Ok(HalfGrant {
            pool: Region::blank(&format!("capnet-{side}-pool"), FRAME_LAYOUT.region_len())?,
            r_area: Region::blank(&format!("capnet-{side}-frames-in"), area)?,
            t_area: Region::blank(&format!("capnet-{side}-frames-out"), area)?,
        })
    }
}
