//! The ip core against byte-level fixtures: what Linux would send it, what it must
//! answer, and every malformed frame it must drop and count. Time is simulated.

use capnet_ip::Duration;
use capnet_ip::{
    Chain, Config, DropReason, EthernetAddress, Instant, IpCore, IpProtocol, Ipv4Address, Ipv4Cidr, Output,
    ReasmLimits, SendError, TransportId,
};
use proptest::prelude::*;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Icmpv4Packet, Ipv4Packet};

const OUR_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 2]);
const PEER_MAC: EthernetAddress = EthernetAddress([0x02, 0, 0, 0, 0, 1]);
const OUR_IP: Ipv4Address = Ipv4Address::new(10, 77, 0, 2);
const PEER_IP: Ipv4Address = Ipv4Address::new(10, 77, 0, 1);

/// A frame from the driver, as a handle on a copy of `f`.
fn rx(c: &mut IpCore, now: Instant, f: &[u8]) {
    c.receive_frame(now, &capnet_ipc::lent::Chain::from(f));
}

fn t(ms: u64) -> Instant {
    Instant::from_millis(ms as i64)
}

fn core() -> IpCore {
    let mut cfg = Config::new(OUR_MAC, Ipv4Cidr::new(OUR_IP, 24));
    cfg.arp_expiry = Duration::from_secs(2);
    cfg.reasm =
        ReasmLimits { timeout: Duration::from_secs(5), max_bytes: 64 * 1024, max_datagrams: 4, max_per_source: 4 };
    let mut c = IpCore::new(cfg, t(0));
    drain(&mut c);
    c
}

fn drain(c: &mut IpCore) -> Vec<Output> {
    std::iter::from_fn(|| c.pop_output()).collect()
}

fn frames(c: &mut IpCore) -> Vec<Vec<u8>> {
    drain(c)
        .into_iter()
        .filter_map(|o| match o {
            Output::Frame(f) => Some(f.to_vec()),
            _ => None,
        })
        .collect()
}

fn eth(dst: EthernetAddress, src: EthernetAddress, ty: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload.len()];
    let mut e = EthernetFrame::new_unchecked(&mut f[..]);
    e.set_dst_addr(dst);
    e.set_src_addr(src);
    e.set_ethertype(ty);
    e.payload_mut().copy_from_slice(payload);
    f
}

fn arp(op: ArpOperation, sender: (EthernetAddress, Ipv4Address), target: (EthernetAddress, Ipv4Address)) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: op,
        source_hardware_addr: sender.0,
        source_protocol_addr: sender.1,
        target_hardware_addr: target.0,
        target_protocol_addr: target.1,
    };
    let mut p = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut p[..]));
    eth(EthernetAddress::BROADCAST, sender.0, EthernetProtocol::Arp, &p)
}

/// An IPv4 packet from the peer (optionally a fragment).
fn ip(proto: IpProtocol, ident: u16, off: usize, more: bool, payload: &[u8]) -> Vec<u8> {
    ip_from(PEER_IP, proto, ident, off, more, payload)
}

/// The same from another source address.
fn ip_from(src: Ipv4Address, proto: IpProtocol, ident: u16, off: usize, more: bool, payload: &[u8]) -> Vec<u8> {
    let total = 20 + payload.len();
    let mut b = vec![0u8; total];
    let mut p = Ipv4Packet::new_unchecked(&mut b[..]);
    p.set_version(4);
    p.set_header_len(20);
    p.set_total_len(total as u16);
    p.set_ident(ident);
    p.set_more_frags(more);
    p.set_frag_offset(off as u16);
    p.set_hop_limit(64);
    p.set_next_header(proto);
    p.set_src_addr(src);
    p.set_dst_addr(OUR_IP);
    p.payload_mut().copy_from_slice(payload);
    p.fill_checksum();
    b
}

fn to_us(packet: &[u8]) -> Vec<u8> {
    eth(OUR_MAC, PEER_MAC, EthernetProtocol::Ipv4, packet)
}

fn echo_request(id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![0u8; 8 + data.len()];
    m[0] = 8;
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&seq.to_be_bytes());
    m[8..].copy_from_slice(data);
    Icmpv4Packet::new_unchecked(&mut m[..]).fill_checksum();
    m
}

/// Teaches the core the peer's MAC, as Linux's first ARP request would.
/// An ICMP destination unreachable (`code`) from the peer quoting our datagram of
/// IP protocol `proto` from our `local_port` to its `remote_port`.
fn unreachable(code: u8, proto: u8, local_port: u16, remote_port: u16) -> Vec<u8> {
    let mut quoted = vec![0u8; 28];
    quoted[0] = 0x45;
    quoted[9] = proto;
    quoted[12..16].copy_from_slice(&OUR_IP.octets());
    quoted[16..20].copy_from_slice(&PEER_IP.octets());
    quoted[20..22].copy_from_slice(&local_port.to_be_bytes());
    quoted[22..24].copy_from_slice(&remote_port.to_be_bytes());
    let mut m = vec![0u8; 8 + quoted.len()];
    m[0] = 3;
    m[1] = code;
    m[8..].copy_from_slice(&quoted);
    Icmpv4Packet::new_unchecked(&mut m[..]).fill_checksum();
    m
}

fn learn_peer(c: &mut IpCore) {
    rx(c, t(1), &arp(ArpOperation::Request, (PEER_MAC, PEER_IP), (EthernetAddress([0; 6]), OUR_IP)));
    drain(c);
}

fn parse_ip(frame: &[u8]) -> (Ipv4Packet<&[u8]>, EthernetAddress) {
    let e = EthernetFrame::new_checked(frame).expect("eth");
    let dst = e.dst_addr();
    assert_eq!(e.ethertype(), EthernetProtocol::Ipv4);
    (Ipv4Packet::new_checked(&frame[14..]).expect("ipv4"), dst)
}

#[test]
fn announces_itself_with_gratuitous_arp() {
    let mut cfg = Config::new(OUR_MAC, Ipv4Cidr::new(OUR_IP, 24));
    cfg.gateway = None;
    let mut c = IpCore::new(cfg, t(0));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1);
    let e = EthernetFrame::new_checked(&f[0][..]).expect("eth");
    assert!(e.dst_addr().is_broadcast());
    let ArpRepr::EthernetIpv4 { source_protocol_addr, target_protocol_addr, .. } =
        ArpRepr::parse(&ArpPacket::new_checked(e.payload()).expect("arp")).expect("repr")
    else {
        panic!("not ethernet/ipv4 arp")
    };
    assert_eq!((source_protocol_addr, target_protocol_addr), (OUR_IP, OUR_IP));
}

#[test]
fn answers_arp_for_its_address_only() {
    let mut c = core();
    rx(
        &mut c,
        t(1),
        &arp(ArpOperation::Request, (PEER_MAC, PEER_IP), (EthernetAddress([0; 6]), Ipv4Address::new(10, 77, 0, 9))),
    );
    assert!(frames(&mut c).is_empty(), "not our address");
    assert_eq!(c.arp().lookup(t(1), PEER_IP), None, "nor learned from a request for someone else");
    rx(&mut c, t(1), &arp(ArpOperation::Request, (PEER_MAC, PEER_IP), (EthernetAddress([0; 6]), OUR_IP)));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1);
    let e = EthernetFrame::new_checked(&f[0][..]).expect("eth");
    assert_eq!(e.dst_addr(), PEER_MAC);
    let repr = ArpRepr::parse(&ArpPacket::new_checked(e.payload()).expect("arp")).expect("repr");
    assert!(matches!(
        repr,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: OUR_MAC,
            source_protocol_addr: OUR_IP,
            ..
        }
    ));
    assert_eq!(c.arp().lookup(t(1), PEER_IP), Some(PEER_MAC));
}

#[test]
fn echo_request_gets_a_reply_with_the_same_data() {
    let mut c = core();
    learn_peer(&mut c);
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 7, 0, false, &echo_request(0x1234, 9, b"abcdefgh"))));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1);
    let (p, mac) = parse_ip(&f[0]);
    assert_eq!(mac, PEER_MAC);
    assert!(p.verify_checksum());
    assert_eq!((p.src_addr(), p.dst_addr()), (OUR_IP, PEER_IP));
    let icmp = Icmpv4Packet::new_checked(p.payload()).expect("icmp");
    assert!(icmp.verify_checksum());
    assert_eq!((p.payload()[0], icmp.echo_ident(), icmp.echo_seq_no(), icmp.data()), (0, 0x1234, 9, &b"abcdefgh"[..]));
    assert_eq!(c.stats().echo_replies, 1);
}

#[test]
fn a_reply_to_an_unknown_mac_waits_for_arp() {
    let mut c = core();
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 7, 0, false, &echo_request(1, 1, b"x"))));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1, "an ARP request, not the reply");
    assert_eq!(EthernetFrame::new_checked(&f[0][..]).expect("eth").ethertype(), EthernetProtocol::Arp);
    rx(&mut c, t(3), &arp(ArpOperation::Reply, (PEER_MAC, PEER_IP), (OUR_MAC, OUR_IP)));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1, "the queued echo reply");
    assert_eq!(parse_ip(&f[0]).0.payload()[0], 0);
}

#[test]
fn udp_is_demuxed_or_answered_with_port_unreachable() {
    let mut c = core();
    learn_peer(&mut c);
    c.demux.insert(IpProtocol::Udp, 1..=1023, TransportId(3));
    let udp = |dport: u16| {
        let mut u = vec![0u8; 12];
        u[0..2].copy_from_slice(&5555u16.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u[4..6].copy_from_slice(&12u16.to_be_bytes());
        u
    };
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Udp, 1, 0, false, &udp(7))));
    let out = drain(&mut c);
    assert!(
        matches!(&out[..], [Output::Deliver(d)] if d.to == TransportId(3) && d.src == PEER_IP && d.payload.to_vec() == udp(7))
    );
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Udp, 2, 0, false, &udp(4000))));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1);
    let (p, _) = parse_ip(&f[0]);
    assert_eq!((p.payload()[0], p.payload()[1]), (3, 3), "ICMP port unreachable");
    assert_eq!(&p.payload()[8 + 20 + 2..8 + 20 + 4], &4000u16.to_be_bytes(), "quotes the offending header");
    assert_eq!(c.stats().dropped(DropReason::NoTransport), 1);
}

#[test]
fn fragments_in_any_order_reassemble_and_big_replies_fragment() {
    let mut c = core();
    learn_peer(&mut c);
    let data: Vec<u8> = (0..4000u32).map(|i| (i % 251) as u8).collect();
    let msg = echo_request(5, 1, &data);
    let chunks: Vec<(usize, &[u8])> = msg.chunks(1480).enumerate().map(|(i, ch)| (i * 1480, ch)).collect();
    for &(off, ch) in chunks.iter().rev() {
        let more = off + ch.len() < msg.len();
        rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 99, off, more, ch)));
    }
    let f = frames(&mut c);
    assert_eq!(f.len(), 3, "4008 bytes of ICMP leave in three fragments");
    let mut reply = vec![0u8; msg.len()];
    for (i, fr) in f.iter().enumerate() {
        let (p, _) = parse_ip(fr);
        assert!(p.verify_checksum());
        assert_eq!(p.more_frags(), i < 2);
        assert_eq!(p.frag_offset() % 8, 0);
        let off = usize::from(p.frag_offset());
        reply[off..off + p.payload().len()].copy_from_slice(p.payload());
    }
    assert_eq!(&reply[8..], &data[..], "the reply carries the request's data");
    assert_eq!(c.reassembly_bytes(), 0);
}

/// A datagram that fits the MTU goes whole. At the in-memory wire's MTU of
/// 65535 the largest datagram's payload, 65515 bytes, is not a multiple of 8,
/// and every full-size TCP segment left in two fragments (65512 + 3 bytes):
/// the receiver reassembled each one into a copy.
#[test]
fn a_datagram_that_fits_the_mtu_is_not_fragmented() {
    let mut cfg = Config::new(OUR_MAC, Ipv4Cidr::new(OUR_IP, 24));
    cfg.mtu = 65535;
    let mut c = IpCore::new(cfg, t(0));
    learn_peer(&mut c);
    for len in [65515usize, 65514, 1481] {
        let data = Chain::from(vec![7u8; len]);
        c.send(t(2), PEER_IP, IpProtocol::Udp, &data, false).expect("send");
        let f = frames(&mut c);
        assert_eq!(f.len(), 1, "{len} bytes go as one datagram");
        let (p, _) = parse_ip(&f[0]);
        assert!(!p.more_frags() && p.frag_offset() == 0);
        assert_eq!(p.payload().len(), len);
    }
    c.send(t(3), PEER_IP, IpProtocol::Udp, &Chain::from(vec![7u8; 65516]), false).expect_err("past the largest");
}

#[test]
fn overlapping_fragments_drop_the_datagram_and_pings_keep_working() {
    let mut c = core();
    learn_peer(&mut c);
    let msg = echo_request(5, 1, &[7u8; 64]);
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 50, 0, true, &msg[..40])));
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 50, 32, false, &msg[32..])));
    assert!(frames(&mut c).is_empty());
    assert_eq!(c.stats().dropped(DropReason::FragOverlap), 1);
    // An exact duplicate fragment is harmless.
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 51, 0, true, &msg[..40])));
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 51, 0, true, &msg[..40])));
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 51, 40, false, &msg[40..])));
    assert_eq!(frames(&mut c).len(), 1, "reassembled despite the duplicate");
    rx(&mut c, t(3), &to_us(&ip(IpProtocol::Icmp, 52, 0, false, &echo_request(5, 2, b"ok"))));
    assert_eq!(frames(&mut c).len(), 1);
}

#[test]
fn malformed_frames_are_dropped_by_reason() {
    let mut c = core();
    learn_peer(&mut c);
    let good = ip(IpProtocol::Icmp, 1, 0, false, &echo_request(1, 1, b"hi"));
    let mut bad_sum = good.clone();
    bad_sum[10] ^= 0xff;
    let mut bad_ver = good.clone();
    bad_ver[0] = 0x65;
    let mut short_ihl = good.clone();
    short_ihl[0] = 0x44;
    let mut long_ihl = good.clone();
    long_ihl[0] = 0x4f;
    let mut long_total = good.clone();
    long_total[2..4].copy_from_slice(&500u16.to_be_bytes());
    let cases: Vec<(Vec<u8>, DropReason)> = vec![
        (vec![1, 2, 3], DropReason::EthTruncated),
        (eth(EthernetAddress([2, 9, 9, 9, 9, 9]), PEER_MAC, EthernetProtocol::Ipv4, &good), DropReason::EthNotForUs),
        (eth(OUR_MAC, PEER_MAC, EthernetProtocol::Unknown(0x88b5), &good), DropReason::EthUnknownType),
        (eth(OUR_MAC, PEER_MAC, EthernetProtocol::Arp, &[0; 10]), DropReason::ArpMalformed),
        (to_us(&good[..12]), DropReason::IpTruncated),
        (to_us(&bad_sum), DropReason::IpBadChecksum),
        (to_us(&bad_ver), DropReason::IpBadVersion),
        (to_us(&short_ihl), DropReason::IpBadHeaderLen),
        (to_us(&long_ihl), DropReason::IpBadHeaderLen),
        (to_us(&long_total), DropReason::IpTruncated),
    ];
    for (frame, reason) in cases {
        let before = c.stats().dropped(reason);
        rx(&mut c, t(2), &frame);
        assert_eq!(c.stats().dropped(reason), before + 1, "{reason:?}");
        assert!(frames(&mut c).is_empty(), "{reason:?} must produce nothing");
    }
    rx(&mut c, t(2), &to_us(&good));
    assert_eq!(frames(&mut c).len(), 1, "pings still work");
}

#[test]
fn options_are_skipped() {
    let mut c = core();
    learn_peer(&mut c);
    let icmp = echo_request(3, 3, b"opt");
    let mut b = vec![0u8; 24 + icmp.len()];
    b[0] = 0x46; // IHL 6: one word of options (NOPs and end-of-list)
    let total = b.len() as u16;
    b[2..4].copy_from_slice(&total.to_be_bytes());
    b[8] = 64;
    b[9] = 1;
    b[12..16].copy_from_slice(&PEER_IP.octets());
    b[16..20].copy_from_slice(&OUR_IP.octets());
    b[20..24].copy_from_slice(&[1, 1, 1, 0]);
    b[24..].copy_from_slice(&icmp);
    Ipv4Packet::new_unchecked(&mut b[..]).fill_checksum();
    rx(&mut c, t(2), &to_us(&b));
    let f = frames(&mut c);
    assert_eq!(f.len(), 1);
    assert_eq!(&parse_ip(&f[0]).0.payload()[8..], b"opt");
}

#[test]
fn reassembly_is_bounded_in_time_and_memory() {
    let mut c = core();
    learn_peer(&mut c);
    rx(&mut c, t(0), &to_us(&ip(IpProtocol::Icmp, 60, 0, true, &[0u8; 8])));
    assert!(c.poll_at().is_some_and(|at| at <= t(5000)), "the reassembly deadline is a timer");
    c.poll(t(5000));
    assert_eq!(c.stats().dropped(DropReason::FragTimeout), 1);
    assert_eq!(c.reassembly_bytes(), 0);
    // A flood of first fragments: at most 4 datagrams in progress (each new one
    // evicts the oldest).
    for id in 0..100u16 {
        rx(&mut c, t(6000), &to_us(&ip(IpProtocol::Icmp, 1000 + id, 0, true, &[0u8; 1024])));
    }
    assert_eq!(c.stats().dropped(DropReason::FragMemory), 96);
    assert!(c.reassembly_bytes() <= 64 * 1024);
    // A fragment reaching past 65535 bytes.
    rx(&mut c, t(6000), &to_us(&ip(IpProtocol::Icmp, 7, 65528, false, &[0u8; 16])));
    assert_eq!(c.stats().dropped(DropReason::FragTooLarge), 1);
}

#[test]
fn arp_entries_expire_and_silent_hosts_are_given_up() {
    let mut c = core();
    learn_peer(&mut c);
    c.send(t(100), PEER_IP, IpProtocol::Udp, &Chain::from(&[0u8; 8]), false).expect("send");
    assert_eq!(frames(&mut c).len(), 1, "resolved: sent at once");
    assert_eq!(c.arp().lookup(t(2001), PEER_IP), None, "expired after 2 s");
    c.poll(t(2001));
    c.send(t(2001), PEER_IP, IpProtocol::Udp, &Chain::from(&[0u8; 8]), false).expect("send");
    let f = frames(&mut c);
    assert_eq!(EthernetFrame::new_checked(&f[0][..]).expect("eth").ethertype(), EthernetProtocol::Arp, "asks again");
    // Nobody answers: two retries, then the queued datagram is dropped.
    let mut requests = 1;
    let mut now = 2001;
    while let Some(at) = c.poll_at() {
        now = at.total_millis() as u64;
        c.poll(t(now));
        requests += frames(&mut c).len();
        if c.stats().dropped(DropReason::ArpUnresolved) > 0 {
            break;
        }
    }
    assert_eq!(requests, 3);
    assert_eq!(c.stats().dropped(DropReason::ArpUnresolved), 1);
    assert!(now >= 4001);
}

#[test]
fn send_errors_are_clear() {
    let mut c = core();
    let err = c
        .send(t(1), Ipv4Address::new(192, 0, 2, 1), IpProtocol::Udp, &Chain::from(&[0; 8]), false)
        .expect_err("no gateway");
    assert_eq!(err, SendError::NoRoute(Ipv4Address::new(192, 0, 2, 1)));
    let err = c.send(t(1), PEER_IP, IpProtocol::Udp, &Chain::from(&[0; 2000]), true).expect_err("DF");
    assert_eq!(err, SendError::TooBig { len: 2020, mtu: 1500 });
    assert_eq!(c.stats().dropped(DropReason::TooBigDf), 1);
}

#[test]
fn the_gateway_is_resolved_for_off_link_destinations() {
    let mut cfg = Config::new(OUR_MAC, Ipv4Cidr::new(OUR_IP, 24));
    cfg.gateway = Some(PEER_IP);
    let mut c = IpCore::new(cfg, t(0));
    drain(&mut c);
    c.send(t(1), Ipv4Address::new(192, 0, 2, 1), IpProtocol::Udp, &Chain::from(&[0; 8]), false).expect("via gateway");
    let f = frames(&mut c);
    let e = EthernetFrame::new_checked(&f[0][..]).expect("eth");
    let ArpRepr::EthernetIpv4 { target_protocol_addr, .. } =
        ArpRepr::parse(&ArpPacket::new_checked(e.payload()).expect("arp")).expect("repr")
    else {
        panic!()
    };
    assert_eq!(target_protocol_addr, PEER_IP, "ARP for the gateway, not the destination");
}

#[test]
fn icmp_errors_reach_the_transport_that_owns_the_port() {
    let mut c = core();
    learn_peer(&mut c);
    c.demux.insert(IpProtocol::Udp, 40000..=40010, TransportId(4));
    // Linux's port unreachable quoting our datagram 10.77.0.2:40001 -> 10.77.0.1:9.
    let m = unreachable(3, 17, 40001, 9);
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 3, 0, false, &m)));
    let out = drain(&mut c);
    assert!(
        matches!(&out[..], [Output::Icmp(e)] if e.to == TransportId(4) && e.icmp_type == 3 && e.icmp_code == 3 && e.local_port == 40001 && e.remote_port == 9 && e.remote == PEER_IP),
        "{out:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
        let mut c = core();
        rx(&mut c, t(1), &bytes);
        prop_assert_eq!(c.stats().frames_in, 1);
        drain(&mut c);
    }

    #[test]
    fn mutated_valid_frames_never_panic(pos in 0usize..80, val in any::<u8>(), frag in any::<bool>(), cut in 0usize..80) {
        let mut c = core();
        learn_peer(&mut c);
        c.demux.insert(IpProtocol::Udp, 0..=65535, TransportId(1));
        let base = ip(if frag { IpProtocol::Udp } else { IpProtocol::Icmp }, 9, 0, frag, &echo_request(1, 1, &[5u8; 48]));
        let mut f = to_us(&base);
        let p = pos % f.len();
        f[p] = val;
        f.truncate(f.len() - cut.min(f.len()));
        rx(&mut c, t(2), &f);
        c.poll(t(60_000));
        drain(&mut c);
    }
}

#[test]
fn a_flow_set_apart_reaches_its_own_transport_and_the_rest_follow_the_port() {
    let mut c = core();
    learn_peer(&mut c);
    // tcp A owns every port; one established flow stays with tcp B (as a swap
    // leaves the old domain's connections where they are).
    c.demux.insert(IpProtocol::Tcp, 0..=65535, TransportId(3));
    c.demux.insert_flow(IpProtocol::Tcp, 80, PEER_IP, 40000, TransportId(9));
    let seg = |sport: u16| {
        let mut s = vec![0u8; 20];
        s[0..2].copy_from_slice(&sport.to_be_bytes());
        s[2..4].copy_from_slice(&80u16.to_be_bytes());
        s[12] = 0x50;
        s
    };
    let to = |c: &mut IpCore, sport: u16| {
        rx(c, t(2), &to_us(&ip(IpProtocol::Tcp, sport, 0, false, &seg(sport))));
        match &drain(c)[..] {
            [Output::Deliver(d)] => d.to,
            o => panic!("{o:?}"),
        }
    };
    assert_eq!(to(&mut c, 40000), TransportId(9), "the flow set apart");
    assert_eq!(to(&mut c, 40001), TransportId(3), "another flow to the same port");
    // ICMP errors about the flow follow it too.
    let m = unreachable(1, 6, 80, 40000);
    rx(&mut c, t(2), &to_us(&ip(IpProtocol::Icmp, 7, 0, false, &m)));
    assert!(matches!(&drain(&mut c)[..], [Output::Icmp(e)] if e.to == TransportId(9)));
    // Forgotten, or its transport removed: the port's entry again.
    c.demux.remove_flow(IpProtocol::Tcp, 80, PEER_IP, 40000);
    assert_eq!(to(&mut c, 40000), TransportId(3));
    c.demux.insert_flow(IpProtocol::Tcp, 80, PEER_IP, 40000, TransportId(9));
    c.demux.remove(TransportId(9));
    assert_eq!(to(&mut c, 40000), TransportId(3));
}

/// Issue 18, finding 8: 64 first fragments that never complete, and 3 more a
/// second, kept every fragmented ping from being answered: reassembly refused
/// new datagrams while full. Now the oldest is evicted, and one source holds at
/// most its share, so a ping split in two is answered through any such flood.
#[test]
fn a_flood_of_first_fragments_cannot_hold_reassembly_shut() {
    let mut c = core();
    learn_peer(&mut c);
    let flooders = [Ipv4Address::new(10, 77, 0, 9), Ipv4Address::new(10, 77, 0, 10)];
    let ping = echo_request(7, 1, &[0x5a; 3000]);
    for round in 0..50u16 {
        let now = t(100 + u64::from(round) * 300);
        // Three new first fragments a round, from two sources, none completed.
        for k in 0..3u16 {
            let src = flooders[usize::from(k % 2)];
            rx(&mut c, now, &to_us(&ip_from(src, IpProtocol::Icmp, round * 3 + k, 0, true, &[0u8; 1480])));
        }
        assert!(c.reassembly_bytes() <= 64 * 1024);
        if round % 10 == 9 {
            // The peer's ping in two fragments, between flood rounds (its MAC
            // learned afresh: entries expire after 2 s here).
            rx(&mut c, now, &arp(ArpOperation::Request, (PEER_MAC, PEER_IP), (EthernetAddress([0; 6]), OUR_IP)));
            drain(&mut c);
            rx(&mut c, now, &to_us(&ip(IpProtocol::Icmp, 9000 + round, 0, true, &ping[..1480])));
            rx(&mut c, now, &to_us(&ip(IpProtocol::Icmp, 9000 + round, 1480, false, &ping[1480..])));
            let replies =
                frames(&mut c).into_iter().filter(|f| parse_ip(f).0.next_header() == IpProtocol::Icmp).count();
            assert!(replies >= 1, "round {round}: the fragmented ping is answered through the flood");
        }
        drain(&mut c);
    }
    assert!(c.stats().dropped(DropReason::FragMemory) > 0, "the flood's datagrams were the ones evicted");
}

/// Issue 18, finding 8: the neighbour cache took an entry for any sender, without
/// bound (600k requests made ip burn half a core for a minute). Now it holds at
/// most `arp_entries`, learns only senders on its link, and still resolves
/// the neighbours it talks to.
#[test]
fn the_neighbour_cache_is_bounded_and_learns_only_its_link() {
    let mut cfg = Config::new(OUR_MAC, Ipv4Cidr::new(OUR_IP, 16));
    cfg.arp_entries = 64;
    let mut c = IpCore::new(cfg, t(0));
    drain(&mut c);
    for i in 0..5000u32 {
        let sender = Ipv4Address::from(u32::from(Ipv4Address::new(10, 77, 1, 0)) + i);
        let mac = EthernetAddress([0x02, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]);
        rx(&mut c, t(1), &arp(ArpOperation::Request, (mac, sender), (EthernetAddress([0; 6]), OUR_IP)));
    }
    assert_eq!(c.arp().entries(t(1)).count(), 64, "at most arp_entries neighbours");
    assert_eq!(c.stats().arp_evicted, 5000 - 64);
    // Off our link: answered (it asked for us) but not learned.
    let far = Ipv4Address::new(192, 0, 2, 7);
    rx(&mut c, t(2), &arp(ArpOperation::Request, (PEER_MAC, far), (EthernetAddress([0; 6]), OUR_IP)));
    assert_eq!(c.arp().lookup(t(2), far), None, "an off-link sender is not learned");
    drain(&mut c);
    // The peer we talk to is still resolved and reached.
    learn_peer(&mut c);
    c.send(t(3), PEER_IP, IpProtocol::Udp, &Chain::from(&[0u8; 8]), false).expect("send");
    assert_eq!(frames(&mut c).len(), 1, "resolved: sent at once");
}
