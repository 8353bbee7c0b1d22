//! The udp core on byte fixtures: binding, checksums both ways, bounded queues,
//! port unreachable, connected filtering and ICMP errors.

use capnet_udp::{Datagram, DropReason, Ipv4Address, Output, UdpCore, UdpError, MAX_PAYLOAD};
use proptest::prelude::*;
use smoltcp::wire::{IpAddress, UdpPacket};

const US: Ipv4Address = Ipv4Address::new(10, 77, 0, 2);
const PEER: Ipv4Address = Ipv4Address::new(10, 77, 0, 1);
const IP_HDR: [u8; 20] = [0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2];

fn segment(sport: u16, dport: u16, data: &[u8], checksum: bool) -> Vec<u8> {
    let mut s = vec![0u8; 8 + data.len()];
    s[0..2].copy_from_slice(&sport.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    s[8..].copy_from_slice(data);
    if checksum {
        UdpPacket::new_unchecked(&mut s[..]).fill_checksum(&IpAddress::Ipv4(PEER), &IpAddress::Ipv4(US));
    }
    s
}

fn sent(c: &mut UdpCore) -> Vec<Output> {
    std::iter::from_fn(|| c.pop_output()).collect()
}

#[test]
fn bind_explicit_ephemeral_and_in_use() {
    let mut c = UdpCore::new(US, 1 << 20);
    let a = c.bind(7).expect("bind 7");
    assert_eq!(c.local_port(a), Ok(7));
    assert_eq!(c.bind(7), Err(UdpError::AddrInUse(7)));
    let e = c.bind(0).expect("ephemeral");
    assert!((49152..=65535).contains(&c.local_port(e).expect("port")));
    c.close(a).expect("close");
    assert_eq!(c.local_port(a), Err(UdpError::BadSocket), "a closed socket's handle is stale");
    let again = c.bind(7).expect("port free again");
    assert_ne!(again, a, "the new socket in the same slot has a new generation");
    assert_eq!(c.recv_from(a), Err(UdpError::BadSocket));
}

#[test]
fn send_to_emits_a_checksummed_segment() {
    let mut c = UdpCore::new(US, 1 << 20);
    let s = c.bind(5000).expect("bind");
    c.send_to(s, Some((PEER, 7)), b"hello").expect("send");
    let out = sent(&mut c);
    let [Output::Send { dst, segment }] = &out[..] else { panic!("{out:?}") };
    assert_eq!(*dst, PEER);
    let p = UdpPacket::new_checked(&segment[..]).expect("udp");
    assert_eq!((p.src_port(), p.dst_port(), p.len(), p.payload()), (5000, 7, 13, &b"hello"[..]));
    assert_ne!(p.checksum(), 0);
    assert!(p.verify_checksum(&IpAddress::Ipv4(US), &IpAddress::Ipv4(PEER)));
    assert_eq!(c.send_to(s, None, b"x"), Err(UdpError::NoDestination));
    assert_eq!(c.send_to(s, Some((PEER, 7)), &vec![0; MAX_PAYLOAD + 1]), Err(UdpError::TooLarge(MAX_PAYLOAD + 1)));
    c.send_to(s, Some((PEER, 7)), &vec![1; MAX_PAYLOAD]).expect("largest datagram");
}

#[test]
fn receive_checks_length_and_checksum_and_accepts_zero_checksum() {
    let mut c = UdpCore::new(US, 1 << 20);
    let s = c.bind(7).expect("bind");
    c.receive(PEER, US, &segment(9, 7, b"one", true), &IP_HDR);
    c.receive(PEER, US, &segment(9, 7, b"two", false), &IP_HDR);
    let mut bad = segment(9, 7, b"bad", true);
    bad[8] ^= 1;
    c.receive(PEER, US, &bad, &IP_HDR);
    let mut long = segment(9, 7, b"len", true);
    long[4..6].copy_from_slice(&100u16.to_be_bytes());
    c.receive(PEER, US, &long, &IP_HDR);
    c.receive(PEER, US, &[0, 9, 0], &IP_HDR);
    assert_eq!(c.recv_from(s), Ok(Some(Datagram { src: PEER, src_port: 9, data: b"one".to_vec() })));
    assert_eq!(c.recv_from(s).expect("ok").expect("two").data, b"two");
    assert_eq!(c.recv_from(s), Ok(None));
    assert_eq!(c.stats().dropped(DropReason::BadChecksum), 1);
    assert_eq!(c.stats().dropped(DropReason::BadLength), 2);
}

#[test]
fn a_closed_port_answers_port_unreachable_quoting_the_datagram() {
    let mut c = UdpCore::new(US, 1 << 20);
    let seg = segment(9, 4444, b"anyone?", true);
    c.receive(PEER, US, &seg, &IP_HDR);
    let out = sent(&mut c);
    let [Output::PortUnreachable { to, quote }] = &out[..] else { panic!("{out:?}") };
    assert_eq!(*to, PEER);
    assert_eq!(&quote[..20], &IP_HDR);
    assert_eq!(&quote[20..], &seg[..8]);
    assert_eq!(c.stats().dropped(DropReason::NoSocket), 1);
    // Not for broadcasts.
    c.receive(PEER, Ipv4Address::BROADCAST, &seg, &IP_HDR);
    assert!(sent(&mut c).is_empty());
}

#[test]
fn receive_queues_are_bounded_and_count_their_drops() {
    let mut c = UdpCore::new(US, 1000);
    let s = c.bind(7).expect("bind");
    for _ in 0..5 {
        c.receive(PEER, US, &segment(9, 7, &[0; 300], true), &IP_HDR);
    }
    assert_eq!(c.socket_drops(s), Ok(2));
    assert_eq!(c.stats().dropped(DropReason::QueueFull), 2);
    assert_eq!(c.stats().datagrams_in, 3);
    c.recv_from(s).expect("ok");
    c.receive(PEER, US, &segment(9, 7, &[0; 300], true), &IP_HDR);
    assert_eq!(c.socket_drops(s), Ok(2), "room again after a read");
}

/// Issue 18, finding 3: what all sockets queue is bounded by configuration too
/// (the total limit), not by how many sockets a peer floods; each socket keeps
/// a floor, so flooded sockets silence none of the others.
#[test]
fn all_sockets_together_queue_at_most_the_total_and_each_keeps_its_floor() {
    use capnet_udp::QUEUE_FLOOR;
    let mut c = UdpCore::new(US, 1 << 20);
    c.set_total_limit(4 * QUEUE_FLOOR);
    let flooded: Vec<_> = (0..16).map(|p| c.bind(7000 + p).expect("bind")).collect();
    for round in 0..200 {
        for p in 0..16 {
            c.receive(PEER, US, &segment(9, 7000 + p, &[round as u8; 1000], true), &IP_HDR);
        }
        let most = 4 * QUEUE_FLOOR + 16 * QUEUE_FLOOR;
        assert!(c.stats().queued_bytes as usize <= most, "{} queued", c.stats().queued_bytes);
    }
    assert!(c.stats().dropped(DropReason::QueueFull) > 0, "the flood met the total");
    // A quiet socket still gets its datagrams.
    let quiet = c.bind(8000).expect("bind");
    c.receive(PEER, US, &segment(9, 8000, b"still heard", true), &IP_HDR);
    assert_eq!(c.recv_from(quiet).expect("ok").map(|d| d.data), Some(b"still heard".to_vec()));
    // Closing a flooded socket gives its bytes back.
    let before = c.stats().queued_bytes;
    c.close(flooded[0]).expect("close");
    assert!(c.stats().queued_bytes < before);
}

#[test]
fn connected_sockets_filter_and_see_icmp_errors_once() {
    let mut c = UdpCore::new(US, 1 << 20);
    let s = c.bind(6000).expect("bind");
    c.connect(s, PEER, 9).expect("connect");
    c.receive(Ipv4Address::new(10, 77, 0, 3), US, &segment(9, 6000, b"stranger", false), &IP_HDR);
    assert_eq!(c.stats().dropped(DropReason::NotFromPeer), 1);
    c.on_icmp(6000, Ipv4Address::new(10, 77, 0, 3), 9, 3, 3, PEER);
    assert_eq!(c.recv_from(s), Ok(None), "an error about another flow is not ours");
    c.on_icmp(6000, PEER, 9, 3, 3, PEER);
    assert_eq!(c.recv_from(s), Err(UdpError::Icmp { icmp_type: 3, icmp_code: 3, reporter: PEER }));
    assert_eq!(c.recv_from(s), Ok(None), "delivered once");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn random_segments_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), port in any::<u16>()) {
        let mut c = UdpCore::new(US, 4096);
        let _ = c.bind(port);
        c.receive(PEER, US, &bytes, &IP_HDR);
        sent(&mut c);
    }
}
