//! Every byte string as a UDP segment from ip (and as a payload to send): the udp
//! core must never panic.
#![no_main]

use capnet_udp::{Ipv4Address, UdpCore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (us, peer) = (Ipv4Address::new(10, 77, 0, 2), Ipv4Address::new(10, 77, 0, 1));
    let mut core = UdpCore::new(us, 4096);
    let port = data.get(..2).map_or(7, |p| u16::from_be_bytes([p[0], p[1]]));
    let s = core.bind(port).ok();
    core.receive(peer, us, data, &[0x45; 20]);
    if let Some(s) = s {
        let _ = core.recv_from(s);
        let _ = core.send_to(s, Some((peer, 9)), data);
    }
    while core.pop_output().is_some() {}
});
