//! The driver's side of an in-memory wire, in one process: a peer that lends
//! frames faster than the stack returns them — 2000 frames of 50 KB, more
//! than the driver may lend ip and the wire's ring holds, while the ip side
//! never takes a frame — fills the driver's quota toward ip; the driver holds
//! back, stays up, and passes what fits.

use std::collections::VecDeque;
use std::time::Duration;

use capnet_ip::{Config, EthernetAddress, Ipv4Address, Ipv4Cidr};
use capnet_runtime::frames::{DriverHalf, Peer, StackHalf};
use capnet_runtime::{Cores, FrameTap, LinkImpairment};

#[test]
fn a_peer_faster_than_the_stack_never_stops_the_driver() {
    let (driver, ip) = (DriverHalf::new().expect("driver half"), StackHalf::new().expect("stack half"));
    let (to_ip, to_driver) = (driver.grant().expect("grant"), ip.grant().expect("grant"));
    let d = driver.run(None, false, to_driver, LinkImpairment::NONE, FrameTap::default()).expect("driver");
    let cfg = Config::new(EthernetAddress([2, 0, 0, 0, 0, 2]), Ipv4Cidr::new(Ipv4Address::new(10, 9, 0, 2), 24));
    // Joined, never polled: it holds every frame the driver lends it.
    let _ip = ip.join(to_ip, Cores::new(cfg, 1 << 20)).expect("ip joins");
    let (ours, peer) = (StackHalf::new().expect("wire side"), StackHalf::new().expect("peer side"));
    let (ours_grant, peer_grant) = (ours.grant().expect("grant"), peer.grant().expect("grant"));
    d.plug(ours, peer_grant).expect("plug the wire");
    let (_from_driver, mut to_driver) = peer.attach(ours_grant, Peer::Wire).expect("peer attaches");
    let mut backlog: VecDeque<(capnet_ipc::lent::Chain, Option<u16>)> =
        (0..2000).map(|i| (vec![i as u8; 50_000].into(), None)).collect();
    for _ in 0..400 {
        to_driver.take_returns().expect("returns");
        to_driver.send(&mut backlog, &[]).expect("send");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(!d.ended(), "the driver's threads are running");
    let s = d.stats();
    assert!(s.frames_read >= 20, "frames came over the wire: {s:?}");
    assert!(!backlog.is_empty(), "the driver held back what the stack could not take: {s:?}");
    d.stop().expect("the driver stops cleanly");
}
