//! Capabilities: a granted fd plus a rights mask, passed over Unix sockets.
//!
//! DESIGN ("Capabilities"): a domain holds exactly the fds its graph grants, passed
//! over its supervisor socket with `SCM_RIGHTS`. A capability names its kind
//! (region, channel end, pool, device, socket) and its rights (read, write, map,
//! grant); rights can only be narrowed as a capability is passed on, and passing one
//! on needs the grant right. On receipt every fd is checked against its claimed kind
//! (`fstat` type, `F_GET_SEALS`) before anyone uses it; a truncated control message
//! (`MSG_CTRUNC`) or a message whose fds and descriptions disagree is refused, and
//! every fd that arrived with it is closed.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use capnet_ipc::region::{MULTI_WRITER_SEALS, REQUIRED_SEALS};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

bitflags::bitflags! {
    /// What the holder of a capability may do with it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Rights: u8 {
        /// Read the object (map a region read-only, read a device or socket).
        const READ = 1;
        /// Write the object (a device, a socket, the multi-writer spin-token region).
        const WRITE = 2;
        /// Map the object into memory.
        const MAP = 4;
        /// Pass the capability on (narrowed or not).
        const GRANT = 8;
    }
}

/// What kind of kernel object a capability's fd must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CapKind {
    /// A memfd region (a stats region, the spin-token region).
    Region = 1,
    /// The peer's area of a channel (a sealed memfd).
    ChannelEnd = 2,
    /// A buffer pool (a sealed memfd).
    Pool = 3,
    /// A network device: a TAP character device or an AF_PACKET socket.
    Device = 4,
    /// A Unix socket (the supervisor socket, an application's socket).
    Socket = 5,
    /// A blank memfd (sealable, no seals yet) for the receiver to own: it maps
    /// and seals it, becoming its one writer (a sandboxed domain cannot create
    /// memory itself).
    Blank = 6,
}

impl CapKind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Region,
            2 => Self::ChannelEnd,
            3 => Self::Pool,
            4 => Self::Device,
            5 => Self::Socket,
            6 => Self::Blank,
            _ => return None,
        })
    }
}

/// A capability: an owned fd, what it is, what it allows, and a graph-assigned tag
/// the receiver uses to tell its capabilities apart (channel number, pool id, …).
#[derive(Debug)]
pub struct Cap {
    /// The kind the fd was checked to be.
    pub kind: CapKind,
    /// The rights granted.
    pub rights: Rights,
    /// The graph's name for this capability (e.g. a channel or pool number).
    pub tag: u32,
    fd: OwnedFd,
}

/// Errors creating, narrowing, sending or receiving capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapError {
    /// Narrowing asked for rights the capability does not have.
    #[error("cannot widen a capability: it has {have:?}, {asked:?} was asked for")]
    Widen {
        /// Rights held.
        have: Rights,
        /// Rights asked for.
        asked: Rights,
    },
    /// Passing on a capability needs the grant right.
    #[error("capability {tag} ({kind:?}) lacks the GRANT right and cannot be passed on")]
    NoGrant {
        /// Its tag.
        tag: u32,
        /// Its kind.
        kind: CapKind,
    },
    /// The fd is not the kind of object the capability claims.
    #[error("capability {tag} claims to be {kind:?} but its fd is {found}; refused and closed")]
    WrongType {
        /// Its tag.
        tag: u32,
        /// The claimed kind.
        kind: CapKind,
        /// What the fd really is.
        found: &'static str,
    },
    /// A memfd capability lacks a seal it must carry.
    #[error("capability {tag} ({kind:?}) is missing seal {missing:?}; refused and closed")]
    Seals {
        /// Its tag.
        tag: u32,
        /// Its kind.
        kind: CapKind,
        /// The first missing seal.
        missing: memfd::FileSeal,
    },
    /// The kernel truncated the control message: fds were lost.
    #[error("capability message truncated (MSG_CTRUNC): fds were dropped by the kernel; all refused")]
    Truncated,
    /// The message is not a well-formed capability message.
    #[error("malformed capability message: {0}; all fds in it refused and closed")]
    Malformed(&'static str),
    /// The peer closed the socket.
    #[error("the supervisor socket was closed")]
    Closed,
    /// A system call failed.
    #[error("capability transfer failed: {0}")]
    Io(#[from] nix::Error),
}

/// How many capabilities one message may carry.
pub const MAX_CAPS_PER_MESSAGE: usize = 32;
const MAGIC: [u8; 4] = *b"CAPS";
const ENTRY: usize = 6;

impl Cap {
    /// Wraps an fd as a capability after checking it is what `kind` and `rights`
    /// require (see [`Cap::check`]).
    pub fn new(kind: CapKind, rights: Rights, tag: u32, fd: OwnedFd) -> Result<Self, CapError> {
        let cap = Self { kind, rights, tag, fd };
        cap.check()?;
        Ok(cap)
    }

    /// The fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Gives up the capability wrapper, keeping the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// A copy of this capability with rights narrowed to `rights` (a subset).
    pub fn narrowed(&self, rights: Rights) -> Result<Self, CapError> {
        if !self.rights.contains(rights) {
            return Err(CapError::Widen { have: self.rights, asked: rights });
        }
        let fd = self.fd.try_clone().map_err(|e| CapError::Io(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
        Ok(Self { kind: self.kind, rights, tag: self.tag, fd })
    }

    /// Checks the fd against the claimed kind and rights.
    ///
    /// Regions, channel ends and pools must be memfds with every single-writer seal
    /// (`FUTURE_WRITE | SHRINK | GROW | SEAL`); a region granted with `WRITE` is the
    /// multi-writer kind and must carry `SHRINK | GROW | SEAL`. Devices must be a
    /// character device or a packet socket; sockets must be sockets.
    pub fn check(&self) -> Result<(), CapError> {
        check_fd(self.kind, self.rights, self.tag, self.fd.as_fd())
    }
}

/// [`Cap::check`] for an fd of kind `kind` granted with `rights` (tagged `tag`).
fn check_fd(kind: CapKind, rights: Rights, tag: u32, fd: BorrowedFd<'_>) -> Result<(), CapError> {
    let st = rustix::fs::fstat(fd).map_err(|e| CapError::Io(nix::Error::from_raw(e.raw_os_error())))?;
    let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
    let found = match ft {
        rustix::fs::FileType::RegularFile => "a regular file",
        rustix::fs::FileType::CharacterDevice => "a character device",
        rustix::fs::FileType::Socket => "a socket",
        rustix::fs::FileType::Fifo => "a pipe",
        rustix::fs::FileType::Directory => "a directory",
        _ => "another kind of file",
    };
    let wrong = || CapError::WrongType { tag, kind, found };
    match kind {
        CapKind::Region | CapKind::ChannelEnd | CapKind::Pool | CapKind::Blank => {
            if ft != rustix::fs::FileType::RegularFile {
                return Err(wrong());
            }
            let seals = rustix::fs::fcntl_get_seals(fd).map_err(|_| CapError::WrongType {
                tag,
                kind,
                found: "a file that is not a sealable memfd",
            })?;
            if kind == CapKind::Blank {
                // To be owned by the receiver: nobody may have sealed it yet.
                return match seals.is_empty() {
                    true => Ok(()),
                    false => Err(CapError::WrongType { tag, kind, found: "an already sealed memfd" }),
                };
            }
            let need: &[memfd::FileSeal] = if kind == CapKind::Region && rights.contains(Rights::WRITE) {
                &MULTI_WRITER_SEALS
            } else {
                &REQUIRED_SEALS
            };
            let have = seal_set(seals);
            if let Some(missing) = need.iter().find(|s| !have.contains(s)) {
                return Err(CapError::Seals { tag, kind, missing: *missing });
            }
            Ok(())
        }
        CapKind::Device => match ft {
            rustix::fs::FileType::CharacterDevice | rustix::fs::FileType::Socket => Ok(()),
            _ => Err(wrong()),
        },
        CapKind::Socket => match ft {
            rustix::fs::FileType::Socket => Ok(()),
            _ => Err(wrong()),
        },
    }
}

fn seal_set(flags: rustix::fs::SealFlags) -> Vec<memfd::FileSeal> {
    use memfd::FileSeal::*;
    use rustix::fs::SealFlags as F;
    [
        (F::SEAL, SealSeal),
        (F::SHRINK, SealShrink),
        (F::GROW, SealGrow),
        (F::WRITE, SealWrite),
        (F::FUTURE_WRITE, SealFutureWrite),
    ]
    .into_iter()
    .filter(|(f, _)| flags.contains(*f))
    .map(|(_, s)| s)
    .collect()
}

/// Sends capabilities over a Unix socket in one message. Each must hold `GRANT`;
/// what the receiver gets is each capability with the rights given in `rights`
/// (which must be a subset: narrowing is the only change allowed in passing).
pub fn send_caps(sock: BorrowedFd<'_>, caps: &[(&Cap, Rights)]) -> Result<(), CapError> {
    let entries: Vec<_> = caps.iter().map(|(c, r)| (c.kind, c.rights, *r, c.tag, c.fd.as_fd())).collect();
    send_entries(sock, &entries)
}

/// Grants `rights` on fds this process keeps (kind, tag, fd each), checked as
/// [`Cap::check`] checks: for a domain that may not duplicate an fd, handing
/// on a read-only view of a region it holds.
pub fn send_held(
    sock: BorrowedFd<'_>,
    rights: Rights,
    caps: &[(CapKind, u32, BorrowedFd<'_>)],
) -> Result<(), CapError> {
    for (kind, tag, fd) in caps {
        check_fd(*kind, rights, *tag, *fd)?;
    }
    let entries: Vec<_> = caps.iter().map(|(k, t, fd)| (*k, rights | Rights::GRANT, rights, *t, *fd)).collect();
    send_entries(sock, &entries)
}

/// One capability message: (kind, rights held, rights given, tag, fd) each.
fn send_entries(sock: BorrowedFd<'_>, caps: &[(CapKind, Rights, Rights, u32, BorrowedFd<'_>)]) -> Result<(), CapError> {
    if caps.is_empty() || caps.len() > MAX_CAPS_PER_MESSAGE {
        return Err(CapError::Malformed("a message carries 1 to 32 capabilities"));
    }
    let mut payload = Vec::with_capacity(6 + caps.len() * ENTRY);
    payload.extend_from_slice(&MAGIC);
    payload.extend_from_slice(&(caps.len() as u16).to_le_bytes());
    let mut fds: Vec<RawFd> = Vec::with_capacity(caps.len());
    for (kind, have, rights, tag, fd) in caps {
        if !have.contains(Rights::GRANT) {
            return Err(CapError::NoGrant { tag: *tag, kind: *kind });
        }
        if !have.contains(*rights) {
            return Err(CapError::Widen { have: *have, asked: *rights });
        }
        payload.push(*kind as u8);
        payload.push(rights.bits());
        payload.extend_from_slice(&tag.to_le_bytes());
        fds.push(fd.as_raw_fd());
    }
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&payload)], &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Closes the fds of a truncated SCM_RIGHTS message, which the kernel installed as
/// far as they fit but nix will not parse (it refuses truncated control data).
fn close_truncated_rights(space: &[u8]) {
    let hdr = std::mem::size_of::<libc::cmsghdr>();
    if space.len() < hdr {
        return;
    }
    // SAFETY: `space` holds at least one cmsghdr written by recvmsg; read_unaligned
    // copies it out without assuming alignment.
    let cmsg: libc::cmsghdr = unsafe { std::ptr::read_unaligned(space.as_ptr().cast()) };
    if cmsg.cmsg_level != libc::SOL_SOCKET || cmsg.cmsg_type != libc::SCM_RIGHTS {
        return;
    }
    let len = (cmsg.cmsg_len as usize).min(space.len());
    for chunk in space[hdr.min(len)..len].chunks_exact(4) {
        let fd = i32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        if fd >= 0 {
            // SAFETY: the kernel installed this fd for us with the truncated message;
            // nothing else refers to it. Owning it closes it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// Receives one capability message, checking every fd before returning any.
pub fn recv_caps(sock: BorrowedFd<'_>) -> Result<Vec<Cap>, CapError> {
    let mut buf = [0u8; 6 + MAX_CAPS_PER_MESSAGE * ENTRY + 1];
    let mut space = nix::cmsg_space!([RawFd; MAX_CAPS_PER_MESSAGE]);
    let (len, truncated_data, ctrunc, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: SCM_RIGHTS just installed these fds in our table and
                    // nothing else refers to them; owning them here closes every one
                    // on every error path below.
                    fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                }
            }
        }
        (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC), msg.flags.contains(MsgFlags::MSG_CTRUNC), fds)
    };
    if ctrunc {
        if fds.is_empty() {
            close_truncated_rights(&space);
        }
        return Err(CapError::Truncated);
    }
    if len == 0 && fds.is_empty() {
        return Err(CapError::Closed);
    }
    if truncated_data || len > buf.len() - 1 {
        return Err(CapError::Malformed("message longer than any capability message"));
    }
    let data = &buf[..len];
    if data.len() < 6 || data[..4] != MAGIC {
        return Err(CapError::Malformed("bad magic"));
    }
    let count = usize::from(u16::from_le_bytes([data[4], data[5]]));
    if count != fds.len() || data.len() != 6 + count * ENTRY {
        return Err(CapError::Malformed("descriptions and fds disagree in number"));
    }
    let mut caps = Vec::with_capacity(count);
    for (entry, fd) in data[6..].chunks_exact(ENTRY).zip(fds) {
        let kind = CapKind::from_u8(entry[0]).ok_or(CapError::Malformed("unknown capability kind"))?;
        let rights = Rights::from_bits(entry[1]).ok_or(CapError::Malformed("unknown rights bits"))?;
        let tag = u32::from_le_bytes([entry[2], entry[3], entry[4], entry[5]]);
        caps.push(Cap::new(kind, rights, tag, fd)?);
    }
    Ok(caps)
}
