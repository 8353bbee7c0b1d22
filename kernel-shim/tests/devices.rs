//! Devices against the real kernel: a TAP opened inside a network namespace the
//! test makes (with virtio-net header and offloads), and an AF_PACKET socket on a
//! veth in that namespace, each carrying the ARP request the kernel sends when it
//! is asked to reach a neighbour. Namespaces are uniquely named and removed even
//! when a test fails; traffic never leaves them.

use std::os::fd::AsFd;
use std::time::Duration;

use capnet_kernel_shim::device::{Device, DeviceKind, VNET_HDR_LEN};
use capnet_testkit::Netns;

/// Reads frames until one satisfies `want` (or the deadline passes).
fn read_until(dev: &Device, skip: usize, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 65536 + VNET_HDR_LEN];
    while std::time::Instant::now() < deadline {
        let fd = dev.fd();
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let ts = rustix::time::Timespec { tv_sec: 0, tv_nsec: 200_000_000 };
        if rustix::event::poll(&mut fds, Some(&ts)).unwrap_or(0) == 0 {
            continue;
        }
        let n = rustix::io::read(dev.fd().as_fd(), &mut buf).expect("read frame");
        if n > skip && want(&buf[skip..n]) {
            return Some(buf[skip..n].to_vec());
        }
    }
    None
}

fn is_arp_request_for(frame: &[u8], ip: [u8; 4]) -> bool {
    frame.len() >= 42
        && frame[..6] == [0xff; 6]
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 1]
        && frame[38..42] == ip
}

/// Asks the kernel in the namespace to send a datagram to `ip`, which makes it ARP.
fn poke(ns: &Netns, ip: &str) {
    ns.run_ok(&["bash", "-c", &format!("echo x > /dev/udp/{ip}/9 || true")]);
}

#[test]
fn tap_in_a_namespace_carries_the_kernels_arp_with_vnet_header() {
    let ns = Netns::new("tap");
    let dev = Device::open_tap("capt0", Some(&ns.path()), true).expect("open tap");
    let DeviceKind::Tap(off) = dev.kind().clone() else { panic!("not a tap") };
    assert!(off.vnet_hdr && off.csum && off.tso, "offloads refused: {off:?}");
    assert!(ns.link_exists("capt0"), "the TAP lives in the test's namespace");
    assert!(!std::path::Path::new("/sys/class/net/capt0").exists(), "and not in ours");
    ns.run_ok(&["ip", "link", "set", "capt0", "up"]);
    ns.run_ok(&["ip", "addr", "add", "10.99.0.1/24", "dev", "capt0"]);
    poke(&ns, "10.99.0.2");
    let frame =
        read_until(&dev, VNET_HDR_LEN, |f| is_arp_request_for(f, [10, 99, 0, 2])).expect("ARP request from the kernel");
    assert_eq!(frame[28..32], [10, 99, 0, 1], "sender is the kernel's address");

    // The supervisor's duplicate keeps the TAP alive when the driver's fd goes.
    let kept = dev.try_clone().expect("dup");
    drop(dev);
    assert!(ns.link_exists("capt0"), "TAP survives the driver's fd");
    drop(kept);
    assert!(!ns.link_exists("capt0"), "the last fd closed removes a non-persistent TAP");
}

#[test]
fn plain_tap_has_no_header() {
    let ns = Netns::new("plain");
    let dev = Device::open_tap("capt1", Some(&ns.path()), false).expect("open tap");
    assert_eq!(
        dev.kind(),
        &DeviceKind::Tap(capnet_kernel_shim::device::Offloads { vnet_hdr: false, csum: false, tso: false })
    );
    ns.run_ok(&["ip", "link", "set", "capt1", "up"]);
    ns.run_ok(&["ip", "addr", "add", "10.99.1.1/24", "dev", "capt1"]);
    poke(&ns, "10.99.1.2");
    read_until(&dev, 0, |f| is_arp_request_for(f, [10, 99, 1, 2])).expect("ARP request, no header");
}

#[test]
fn packet_socket_on_a_veth_sees_the_kernels_arp() {
    let ns = Netns::new("pkt");
    ns.run_ok(&["ip", "link", "add", "cva", "type", "veth", "peer", "name", "cvb"]);
    ns.run_ok(&["ip", "link", "set", "cva", "up"]);
    ns.run_ok(&["ip", "link", "set", "cvb", "up"]);
    ns.run_ok(&["ip", "addr", "add", "10.98.0.1/24", "dev", "cva"]);
    let dev = Device::open_packet("cvb", Some(&ns.path())).expect("packet socket");
    assert_eq!(dev.kind(), &DeviceKind::Packet);
    poke(&ns, "10.98.0.2");
    read_until(&dev, 0, |f| is_arp_request_for(f, [10, 98, 0, 2])).expect("ARP request on the veth");
}

#[test]
fn bad_names_and_namespaces_are_clear_errors() {
    let err = Device::open_tap("", None, true).expect_err("empty");
    assert!(err.to_string().contains("bad interface name"), "{err}");
    let err = Device::open_tap("a-name-far-too-long", None, true).expect_err("long");
    assert!(err.to_string().contains("1 to 15 bytes"), "{err}");
    let err = Device::open_tap("capt9", Some(std::path::Path::new("/run/netns/capt-none-such")), true).expect_err("ns");
    assert!(err.to_string().contains("cannot enter network namespace"), "{err}");
}

#[test]
fn named_namespaces_are_made_and_removed_like_iproute2_does() {
    use capnet_kernel_shim::netns;
    let name = format!("capt-{}-native", std::process::id());
    let _ = netns::delete(&name);
    let path = netns::create(&name).expect("create");
    assert!(matches!(netns::create(&name), Err(netns::NetnsError::Exists(_))), "a second create is refused");
    let listed = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip");
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&name), "iproute2 sees it");
    let ours = std::fs::read_link("/proc/self/ns/net").expect("ours");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &name, "readlink", "/proc/self/ns/net"])
        .output()
        .expect("exec");
    let theirs = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(!theirs.is_empty() && theirs != ours.to_string_lossy(), "a namespace of its own: {theirs}");
    let dev = Device::open_tap("captn0", Some(&path), false).expect("tap inside");
    drop(dev);
    netns::delete(&name).expect("delete");
    assert!(!netns::exists(&name));
    netns::delete(&name).expect("deleting twice is fine");
    assert!(matches!(netns::create("../etc"), Err(netns::NetnsError::Name(_))));
}
