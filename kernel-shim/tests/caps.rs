//! Capability transfer over SCM_RIGHTS: rights only narrow, grant is needed to pass
//! on, and every forged, truncated or mistyped message is refused with its fds
//! closed.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use capnet_ipc::region::{Region, RegionRo};
use capnet_ipc::shm::{ShmRead, ShmWrite};
use capnet_ipc::Ordering;
use capnet_kernel_shim::cap::{recv_caps, send_caps, Cap, CapError, CapKind, Rights};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn region_cap() -> (Region, Cap) {
    let r = Region::create("t-cap", 4096).expect("region");
    r.store32(0, 0xcafe, Ordering::Relaxed);
    let fd = r.fd().try_clone_to_owned().expect("dup");
    (r, Cap::new(CapKind::Region, Rights::READ | Rights::MAP | Rights::GRANT, 7, fd).expect("cap"))
}

fn raw_send(sock: &UnixStream, payload: &[u8], fds: &[RawFd]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(payload)], &cmsg, MsgFlags::empty(), None).expect("sendmsg");
}

#[test]
fn a_region_crosses_narrowed_and_maps_read_only() {
    let (a, b) = UnixStream::pair().expect("pair");
    let (_r, cap) = region_cap();
    send_caps(a.as_fd(), &[(&cap, Rights::READ | Rights::MAP)]).expect("send");
    let got = recv_caps(b.as_fd()).expect("recv").pop().expect("one");
    assert_eq!((got.kind, got.rights, got.tag), (CapKind::Region, Rights::READ | Rights::MAP, 7));
    let ro = RegionRo::attach(got.into_fd(), 4096).expect("map");
    assert_eq!(ro.load32(0, Ordering::Relaxed), 0xcafe);
}

#[test]
fn rights_only_narrow_and_passing_on_needs_grant() {
    let (a, _b) = UnixStream::pair().expect("pair");
    let (_r, cap) = region_cap();
    let read_only = cap.narrowed(Rights::READ | Rights::MAP).expect("narrow");
    assert!(matches!(read_only.narrowed(Rights::READ | Rights::GRANT), Err(CapError::Widen { .. })));
    assert!(matches!(send_caps(a.as_fd(), &[(&read_only, Rights::READ)]), Err(CapError::NoGrant { tag: 7, .. })));
    assert!(matches!(send_caps(a.as_fd(), &[(&cap, Rights::WRITE)]), Err(CapError::Widen { .. })));
}

#[test]
fn forged_messages_are_refused_and_their_fds_closed() {
    let (a, b) = UnixStream::pair().expect("pair");
    let (_r, cap) = region_cap();
    let fd = cap.fd().as_raw_fd();
    let before = open_fds();
    for (payload, what) in [
        (b"JUNK\x01\x00\x01\x07\x07\x00\x00\x00".to_vec(), "bad magic"),
        (b"CAPS\x02\x00\x01\x07\x07\x00\x00\x00".to_vec(), "count says 2, one fd"),
        (b"CAPS\x01\x00\x09\x07\x07\x00\x00\x00".to_vec(), "unknown kind"),
        (b"CAPS\x01\x00\x01\xff\x07\x00\x00\x00".to_vec(), "unknown rights"),
    ] {
        raw_send(&a, &payload, &[fd]);
        let err = recv_caps(b.as_fd()).expect_err(what);
        assert!(matches!(err, CapError::Malformed(_)), "{what}: {err}");
        assert_eq!(open_fds(), before, "{what}: the received fd must be closed");
    }
}

#[test]
fn a_truncated_control_message_is_refused() {
    let (a, b) = UnixStream::pair().expect("pair");
    let (_r, cap) = region_cap();
    let fds = vec![cap.fd().as_raw_fd(); 40];
    let before = open_fds();
    raw_send(&a, b"CAPS\x28\x00", &fds);
    assert!(matches!(recv_caps(b.as_fd()), Err(CapError::Truncated)));
    assert_eq!(open_fds(), before, "fds that did arrive are closed");
}

#[test]
fn mistyped_and_unsealed_fds_are_refused() {
    let (a, b) = UnixStream::pair().expect("pair");
    let (pr, _pw) = rustix::pipe::pipe().expect("pipe");
    raw_send(&a, b"CAPS\x01\x00\x01\x05\x01\x00\x00\x00", &[pr.as_raw_fd()]);
    let err = recv_caps(b.as_fd()).expect_err("pipe as region");
    assert!(matches!(err, CapError::WrongType { found: "a pipe", .. }), "{err}");

    let mfd = memfd::MemfdOptions::new().allow_sealing(true).create("t-noshrink").expect("memfd");
    mfd.as_file().set_len(4096).expect("len");
    mfd.add_seals(&[memfd::FileSeal::SealFutureWrite, memfd::FileSeal::SealGrow, memfd::FileSeal::SealSeal])
        .expect("seal");
    let unsealed: OwnedFd = mfd.into_file().into();
    raw_send(&a, b"CAPS\x01\x00\x02\x05\x02\x00\x00\x00", &[unsealed.as_raw_fd()]);
    let err = recv_caps(b.as_fd()).expect_err("no shrink seal");
    assert!(matches!(err, CapError::Seals { missing: memfd::FileSeal::SealShrink, .. }), "{err}");
    assert!(err.to_string().contains("SealShrink"), "{err}");

    let (_r, cap) = region_cap();
    raw_send(&a, b"CAPS\x01\x00\x05\x01\x03\x00\x00\x00", &[cap.fd().as_raw_fd()]);
    assert!(matches!(recv_caps(b.as_fd()), Err(CapError::WrongType { kind: CapKind::Socket, .. })));
}

#[test]
fn a_closed_peer_is_reported() {
    let (a, b) = UnixStream::pair().expect("pair");
    drop(a);
    assert!(matches!(recv_caps(b.as_fd()), Err(CapError::Closed)));
}
