//! Network devices the supervisor opens and grants to a driver domain.
//!
//! A TAP inside a given network namespace (opened from a thread that `setns`es into
//! it, so the supervisor's own namespace never changes), with the virtio-net header
//! and checksum/TSO offloads negotiated, or plain frames where the device refuses
//! them; and an AF_PACKET socket bound to an interface. The supervisor keeps a
//! duplicate of every device fd ([`Device::try_clone`]) so a driver crash never
//! destroys the TAP.

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;

/// `PACKET_IGNORE_OUTGOING` (Linux 4.20): a packet socket does not see what it sends.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// The virtio-net header the kernel prepends with offloads on (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// Opening a device failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The interface name is empty, too long or has a NUL.
    #[error("bad interface name {0:?}: 1 to 15 bytes, no NUL")]
    Name(String),
    /// The namespace could not be entered.
    #[error("cannot enter network namespace {path} (does it exist, and are you root?)")]
    Netns {
        /// The namespace file.
        path: PathBuf,
        /// What the kernel said.
        source: std::io::Error,
    },
    /// `/dev/net/tun` is missing or not accessible.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and may this user read and write it? root may; an ordinary user needs a node open to it)")]
    Tun(std::io::Error),
    /// An ioctl or socket call failed.
    #[error("{what} failed on {name}")]
    Sys {
        /// The call.
        what: &'static str,
        /// The interface.
        name: String,
        /// What the kernel said.
        source: std::io::Error,
    },
}

/// Which offloads a TAP accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// Frames carry a 12-byte virtio-net header.
    pub vnet_hdr: bool,
    /// Checksum offload (partial checksums may cross the device).
    pub csum: bool,
    /// TCP segmentation offload for IPv4 (and 6): segments up to 64 KiB cross.
    pub tso: bool,
}

/// What kind of device an fd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// A TAP with these offloads.
    Tap(Offloads),
    /// An AF_PACKET socket bound to an interface (plain Ethernet frames).
    Packet,
}

/// An open network device.
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
    name: String,
    kind: DeviceKind,
}

impl Device {
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it is and what it negotiated.
    pub fn kind(&self) -> &DeviceKind {
        &self.kind
    }

    /// The fd (to grant to a driver).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second handle on the same device: the supervisor keeps one so that the
    /// driver's death never closes the last fd of the TAP (which would delete it).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self { fd: self.fd.try_clone()?, name: self.name.clone(), kind: self.kind.clone() })
    }

    /// Opens (creating if needed) TAP `name` inside the network namespace at `netns`
    /// (e.g. `/run/netns/capnet`; `None`: the caller's namespace). With `offload`,
    /// asks for the virtio-net header plus checksum and TSO offloads, falling back
    /// to plain frames if the device refuses them.
    pub fn open_tap(name: &str, netns: Option<&Path>, offload: bool) -> Result<Self, DeviceError> {
        let ifname = ifname(name)?;
        in_netns(netns, || {
            if offload {
                if let Ok(dev) = tap(name, &ifname, true) {
                    return Ok(dev);
                }
            }
            tap(name, &ifname, false)
        })
    }

    /// An AF_PACKET socket bound to interface `name` inside `netns`.
    pub fn open_packet(name: &str, netns: Option<&Path>) -> Result<Self, DeviceError> {
        let ifname = ifname(name)?;
        in_netns(netns, || {
            let sys = |what, e: std::io::Error| DeviceError::Sys { what, name: name.to_owned(), source: e };
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let (family, kind) = (libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC);
            // SAFETY: plain socket(2) call; the result is checked.
            let raw = unsafe { libc::socket(family, kind, libc::c_int::from(proto)) };
            if raw < 0 {
                return Err(sys("socket(AF_PACKET)", std::io::Error::last_os_error()));
            }
            // SAFETY: socket() returned a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            // SAFETY: ifname is a NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
            if index == 0 {
                return Err(sys("if_nametoindex", std::io::Error::last_os_error()));
            }
            // SAFETY: sockaddr_ll is plain data; zero is a valid start.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = index as i32;
            // SAFETY: addr is a valid sockaddr_ll and its size is passed.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(sys("bind(AF_PACKET)", std::io::Error::last_os_error()));
            }
            // The driver's own transmissions must not come back as received frames.
            let one: libc::c_int = 1;
            // SAFETY: PACKET_IGNORE_OUTGOING takes an int; we pass its address and size.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    PACKET_IGNORE_OUTGOING,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(sys("PACKET_IGNORE_OUTGOING", std::io::Error::last_os_error()));
            }
            Ok(Device { fd, name: name.to_owned(), kind: DeviceKind::Packet })
        })
    }
}

fn ifname(name: &str) -> Result<CString, DeviceError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(DeviceError::Name(name.to_owned()));
    }
    CString::new(name).map_err(|_| DeviceError::Name(name.to_owned()))
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn tap(name: &str, ifname: &CString, offload: bool) -> Result<Device, DeviceError> {
    let sys = |what, e: std::io::Error| DeviceError::Sys { what, name: name.to_owned(), source: e };
    let file = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(DeviceError::Tun)?;
    let fd: OwnedFd = file.into();
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
    if offload {
        req.flags |= IFF_VNET_HDR;
    }
    for (dst, src) in req.name.iter_mut().zip(ifname.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads an ifreq (name + flags), which IfReq lays out with the
    // kernel's size (40 bytes); fd is an open /dev/net/tun.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } != 0 {
        return Err(sys("TUNSETIFF", std::io::Error::last_os_error()));
    }
    let mut offloads = Offloads { vnet_hdr: false, csum: false, tso: false };
    if offload {
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr as *const libc::c_int) } != 0 {
            return Err(sys("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
        }
        let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        // SAFETY: TUNSETOFFLOAD takes the flags as the argument value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } != 0 {
            return Err(sys("TUNSETOFFLOAD", std::io::Error::last_os_error()));
        }
        offloads = Offloads { vnet_hdr: true, csum: true, tso: true };
    }
    Ok(Device { fd, name: name.to_owned(), kind: DeviceKind::Tap(offloads) })
}

/// Runs `f` on a thread that has entered the network namespace at `netns`, so the
/// calling thread's namespace never changes.
fn in_netns<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> Result<T, DeviceError> + Send,
) -> Result<T, DeviceError> {
    let Some(path) = netns else { return f() };
    std::thread::scope(|s| {
        s.spawn(|| {
            let err = |source| DeviceError::Netns { path: path.to_owned(), source };
            let ns = std::fs::File::open(path).map_err(err)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| err(e.into()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(DeviceError::Name("device thread panicked".into())))
    })
}
