//! A peer that sends anything at all: random flags, sequence and acknowledgment
//! numbers, windows, SACK blocks, timestamps and payloads (with valid checksums,
//! so they reach the state machine), interleaved with time. The core must never panic, and the
//! connection's bookkeeping must stay consistent.

use capnet_ipc::lent::Chain;
use capnet_tcp::{Config, Duration, Instant, Ipv4Address, Output, Received, TcpCore};
use proptest::prelude::*;
use smoltcp::wire::{IpAddress, TcpPacket};

const A: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const B: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

/// TCP options of a forged segment: SACK blocks (start offset from our ISS + 1,
/// length) and a timestamp.
#[derive(Debug, Clone, Default)]
struct Opts {
    sack: Vec<(i32, u16)>,
    ts: Option<(u32, u32)>,
}

#[derive(Debug, Clone)]
enum Action {
    Segment { flags: u8, seq_off: i32, ack_off: i32, window: u16, opts: Opts, payload: Vec<u8> },
    Advance(u32),
    Read,
    Write(u16),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (any::<u8>(), -70_000i32..70_000, -70_000i32..70_000, any::<u16>(), opts(), proptest::collection::vec(any::<u8>(), 0..1400))
            .prop_map(|(flags, seq_off, ack_off, window, opts, payload)| Action::Segment { flags, seq_off, ack_off, window, opts, payload }),
        1 => (1u32..5_000_000).prop_map(Action::Advance),
        1 => Just(Action::Read),
        1 => (1u16..20_000).prop_map(Action::Write),
    ]
}

fn opts() -> impl Strategy<Value = Opts> {
    (
        proptest::collection::vec((-70_000i32..70_000, any::<u16>()), 0..4),
        proptest::option::of((any::<u32>(), any::<u32>())),
    )
        .prop_map(|(sack, ts)| Opts { sack, ts })
}

/// The option bytes: SACK blocks relative to `base`, then the timestamp, padded.
fn option_bytes(opts: &Opts, base: u32, syn: bool) -> Vec<u8> {
    let mut o = Vec::new();
    if syn {
        o.extend([4, 2]); // SACK permitted
    } else if !opts.sack.is_empty() {
        o.extend([5, 2 + 8 * opts.sack.len() as u8]);
        for &(off, len) in &opts.sack {
            let l = base.wrapping_add(off as u32);
            o.extend(l.to_be_bytes());
            o.extend(l.wrapping_add(u32::from(len)).to_be_bytes());
        }
    }
    if let Some((val, ecr)) = opts.ts {
        o.extend([8, 10]);
        o.extend(val.to_be_bytes());
        o.extend(ecr.to_be_bytes());
    }
    while o.len() % 4 != 0 {
        o.push(1); // NOP
    }
    o
}

#[allow(clippy::too_many_arguments)]
fn segment(src_port: u16, seq: u32, ack: u32, flags: u8, window: u16, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let hdr = 20 + options.len();
    let mut buf = vec![0u8; hdr + payload.len()];
    let mut p = TcpPacket::new_unchecked(&mut buf[..]);
    p.set_src_port(src_port);
    p.set_dst_port(80);
    p.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
    p.set_ack_number(smoltcp::wire::TcpSeqNumber(ack as i32));
    p.set_header_len(hdr as u8);
    p.set_fin(flags & 1 != 0);
    p.set_syn(flags & 2 != 0);
    p.set_rst(flags & 4 != 0);
    p.set_psh(flags & 8 != 0);
    p.set_ack(flags & 16 != 0);
    p.set_urg(flags & 32 != 0);
    p.set_window_len(window);
    buf[20..hdr].copy_from_slice(options);
    let mut p = TcpPacket::new_unchecked(&mut buf[..]);
    p.payload_mut().copy_from_slice(payload);
    p.fill_checksum(&IpAddress::Ipv4(A), &IpAddress::Ipv4(B));
    buf
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]
    #[test]
    fn anything_a_peer_sends_is_survived(actions in proptest::collection::vec(action(), 1..60)) {
        let mut b = TcpCore::new(Config::new(B, [5, 6]));
        let l = b.listen(80, 4).unwrap();
        let mut now = Instant::from_secs(1);
        // A real handshake first, so most segments meet an established connection.
        let (isn, port) = (1000u32, 40000u16);
        // The SYN offers SACK and timestamps, so both are agreed.
        let syn_opts = option_bytes(&Opts { sack: vec![], ts: Some((1, 0)) }, 0, true);
        b.receive(now, A, B, &Chain::from(&segment(port, isn, 0, 2, 65535, &syn_opts, &[])[..]));
        let Some(Output::Send { segment: synack, .. }) = b.pop_output() else { panic!("no SYN-ACK") };
        let our = TcpPacket::new_checked(&synack.to_vec()[..]).unwrap().seq_number().0 as u32;
        b.receive(now, A, B, &Chain::from(&segment(port, isn + 1, our.wrapping_add(1), 16, 65535, &[], &[])[..]));
        let conn = b.accept(l).unwrap().expect("established");
        let agreed = b.info(conn).unwrap();
        prop_assert!(agreed.sack && agreed.timestamps, "SACK and timestamps agreed: {agreed:?}");
        for a in actions {
            match a {
                Action::Segment { flags, seq_off, ack_off, window, opts, payload } => {
                    let seq = (isn + 1).wrapping_add(seq_off as u32);
                    let ack = our.wrapping_add(1).wrapping_add(ack_off as u32);
                    let options = option_bytes(&opts, our.wrapping_add(1), false);
                    b.receive(now, A, B, &Chain::from(&segment(port, seq, ack, flags, window, &options, &payload)[..]));
                }
                Action::Advance(us) => {
                    now += Duration::from_micros(u64::from(us));
                    b.poll(now);
                    // Every due timer ran: nothing left in the past to spin on.
                    prop_assert!(b.poll_at().is_none_or(|at| at > now), "a timer stuck at {:?} (now {now})", b.poll_at());
                }
                Action::Read => {
                    let r = b.recv(now, conn, 65536);
                    prop_assert!(!matches!(r, Ok(Received::Data(ref d)) if d.is_empty()));
                }
                Action::Write(n) => {
                    let _ = b.send(now, conn, vec![0x55; usize::from(n)]);
                }
            }
            while let Some(Output::Send { dst, segment, .. }) = b.pop_output() {
                prop_assert_eq!(dst, A);
                prop_assert!(TcpPacket::new_checked(&segment.to_vec()[..]).unwrap().verify_checksum(&B.into(), &A.into()));
            }
            if let Ok(info) = b.info(conn) {
                prop_assert!(info.rcv_queued <= (1 << 20) + 65536, "receive queue bounded: {}", info.rcv_queued);
                prop_assert!(info.snd_queued <= 1 << 20, "send queue bounded");
                prop_assert!(info.cwnd >= 1, "a window to send with");
                prop_assert!(info.sacked_ranges <= capnet_tcp::sack::MAX_RANGES, "scoreboard bounded");
            }
        }
    }
}
