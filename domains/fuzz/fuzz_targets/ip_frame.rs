//! Every byte string as a frame from the driver, in sequences (so reassembly and
//! ARP state are reached), with time advancing: the ip core must never panic.
#![no_main]

use capnet_ip::{Config, EthernetAddress, Instant, IpCore, IpProtocol, Ipv4Address, Ipv4Cidr, TransportId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = Config::new(EthernetAddress([2, 0, 0, 0, 0, 2]), Ipv4Cidr::new(Ipv4Address::new(10, 77, 0, 2), 24));
    let mut core = IpCore::new(cfg, Instant::ZERO);
    core.demux.insert(IpProtocol::Udp, 0..=65535, TransportId(1));
    let mut now = 0;
    // Frames are separated by a 0xFF 0x00 marker; each advances time by 100 ms.
    for frame in data.split(|b| *b == 0xff) {
        now += 100;
        core.receive_frame(Instant::from_millis(now), frame);
        core.poll(Instant::from_millis(now));
        while core.pop_output().is_some() {}
    }
    let _ = core.send(Instant::from_millis(now), Ipv4Address::new(10, 77, 0, 1), IpProtocol::Udp, data, false);
});
