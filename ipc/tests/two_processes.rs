//! A channel between two real processes: each creates and seals its own area, the
//! fds cross a Unix socket (`SCM_RIGHTS`), each maps the other's read-only, and a
//! stream of descriptors goes there and back with spin-then-block on both sides —
//! the shared futex waking across process boundaries through read-only mappings.
#![cfg(not(loom))]

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use capnet_ipc::notify::SpinPolicy;
use capnet_ipc::region::Region;
use capnet_ipc::shm_channel;
use capnet_ipc::{ChannelParams, Descriptor, End, Interest, Waiter};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

const CHILD_ENV: &str = "CAPNET_TEST_CHILD_SOCK";
const N: u32 = 300_000;
const PARAMS: ChannelParams = ChannelParams { capacity: 1024, epoch: 7 };

fn send_fds(sock: &UnixStream, fds: &[RawFd]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(b"f")], &cmsg, MsgFlags::empty(), None).expect("sendmsg");
}

fn recv_fds(sock: &UnixStream) -> Vec<OwnedFd> {
    let mut buf = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).expect("recvmsg");
    assert!(!msg.flags.contains(MsgFlags::MSG_CTRUNC), "control message truncated");
    let mut out = Vec::new();
    for c in msg.cmsgs().expect("cmsgs") {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: SCM_RIGHTS just installed these fds in our table; nobody else
            // owns them.
            out.extend(fds.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    out
}

/// End B, run in the child: echo every descriptor back, then exit.
fn child(sock: UnixStream) {
    let mine = shm_channel::create_area::<Descriptor>("t-proc.b", End::B, PARAMS).expect("area");
    send_fds(&sock, &[mine.fd().as_raw_fd()]);
    let mut fds = recv_fds(&sock);
    let tokens_region = Region::attach_multi_writer(fds.pop().expect("tokens fd"), 64).expect("tokens");
    let peer = fds.pop().expect("peer fd");
    let tokens = capnet_ipc::notify::SpinTokens::new(std::sync::Arc::new(tokens_region), 0, 1);
    let mut end = shm_channel::attach::<Descriptor>(mine, peer, End::B, PARAMS).expect("attach");
    end.interest = Interest::RX;
    let mut w = Waiter::new(SpinPolicy::DEFAULT);
    let mut out = Vec::with_capacity(1024);
    let mut echoed = 0u32;
    while echoed < N {
        out.clear();
        if end.recv(&mut out, 1024).expect("recv") == 0 {
            w.wait(&mut [&mut end], Some(Duration::from_secs(10)), Some(&tokens));
            continue;
        }
        let mut k = 0;
        while k < out.len() {
            let n = end.send(&out[k..]).expect("echo");
            k += n;
            if n == 0 {
                end.interest = Interest::SPACE;
                w.wait(&mut [&mut end], Some(Duration::from_secs(10)), Some(&tokens));
                end.interest = Interest::RX;
            }
        }
        echoed += out.len() as u32;
    }
}

#[test]
fn stream_echoes_between_two_processes() {
    if let Ok(fd) = std::env::var(CHILD_ENV) {
        let raw: RawFd = fd.parse().expect("fd number");
        // SAFETY: the parent passed us this inherited socket fd and nothing else in
        // this process owns it.
        child(UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) }));
        return;
    }
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    // The child's end must survive exec: a dup without CLOEXEC.
    let inherit = rustix::io::dup(theirs.as_fd()).expect("dup");
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args(["--exact", "stream_echoes_between_two_processes", "--nocapture"])
        .env(CHILD_ENV, inherit.as_raw_fd().to_string())
        .spawn()
        .expect("spawn child");
    drop((inherit, theirs));

    let mine = shm_channel::create_area::<Descriptor>("t-proc.a", End::A, PARAMS).expect("area");
    let tokens_region = Region::create_multi_writer("t-proc.tokens", 64).expect("tokens");
    let peer = recv_fds(&ours).pop().expect("child's area");
    send_fds(&ours, &[mine.fd().as_raw_fd(), tokens_region.fd().as_raw_fd()]);
    let tokens = capnet_ipc::notify::SpinTokens::new(std::sync::Arc::new(tokens_region), 0, 1);
    let mut end = shm_channel::attach::<Descriptor>(mine, peer, End::A, PARAMS).expect("attach");
    end.interest = Interest::BOTH;
    let mut w = Waiter::new(SpinPolicy::DEFAULT);
    let (mut sent, mut back) = (0u32, 0u32);
    let mut out = Vec::with_capacity(1024);
    let batch: Vec<Descriptor> = (0..64).map(|i| Descriptor { index: i, len: i, ..Default::default() }).collect();
    while back < N {
        let mut progressed = false;
        if sent < N {
            let want = 64.min(N - sent) as usize;
            let k = end.send(&batch[..want]).expect("send");
            sent += k as u32;
            progressed |= k > 0;
        }
        out.clear();
        let k = end.recv(&mut out, 1024).expect("recv");
        for (i, d) in out.iter().enumerate() {
            let expect = (back + i as u32) % 64;
            assert_eq!(d.index, expect, "order lost at {}", back + i as u32);
        }
        back += k as u32;
        progressed |= k > 0;
        if !progressed {
            w.wait(&mut [&mut end], Some(Duration::from_secs(10)), Some(&tokens));
        }
    }
    let status = child.wait().expect("wait child");
    assert!(status.success(), "child failed: {status}");
    assert_eq!(end.stats.received, u64::from(N));
    // Wake-ups are per sleep, never per message (the streaming budget).
    assert!(end.stats.wakes < u64::from(N) / 10, "wakes {}", end.stats.wakes);
}
