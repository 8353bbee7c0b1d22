//! Every byte string as TCP segments from a peer with an established connection:
//! the first byte picks how the rest is cut into segments, each gets a valid
//! checksum (so it reaches the state machine, not just the parser), and time
//! advances between them. SACK and timestamps are agreed in the handshake. The
//! tcp core must never panic.
#![no_main]

use capnet_tcp::{Config, Duration, Instant, Ipv4Address, Output, TcpCore};
use libfuzzer_sys::fuzz_target;
use smoltcp::wire::{IpAddress, TcpPacket, TcpSeqNumber};

const A: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const B: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

fn seg(bytes: &[u8], seq: Option<u32>) -> Vec<u8> {
    let mut buf = bytes.to_vec();
    if buf.len() < 20 {
        buf.resize(20, 0);
    }
    let mut p = TcpPacket::new_unchecked(&mut buf[..]);
    p.set_src_port(40000);
    p.set_dst_port(80);
    if let Some(s) = seq {
        p.set_seq_number(TcpSeqNumber(s as i32));
    }
    p.fill_checksum(&IpAddress::Ipv4(A), &IpAddress::Ipv4(B));
    buf
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let mut core = TcpCore::new(Config::new(B, [1, 2]));
    let l = core.listen(80, 4).ok();
    let mut now = Instant::from_secs(1);
    // SYN, then the rest as segments of `cut`-derived size.
    // The SYN offers SACK and timestamps: the fuzzed segments meet a connection
    // that uses both (their own option bytes come from the input).
    let mut syn = vec![0u8; 32];
    syn[12] = 0x80;
    syn[13] = 0x02;
    syn[20..32].copy_from_slice(&[4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0]);
    core.receive(now, A, B, &seg(&syn, Some(1000)));
    while core.pop_output().is_some() {}
    let size = 20 + usize::from(cut) * 8;
    for chunk in rest.chunks(size) {
        core.receive(now, A, B, &seg(chunk, None));
        now += Duration::from_millis(u64::from(chunk[0]));
        core.poll(now);
        if let Some(l) = l {
            if let Ok(Some(c)) = core.accept(l) {
                let _ = core.recv(now, c, 4096);
                let _ = core.send(now, c, chunk);
            }
        }
        while let Some(Output::Send { .. }) = core.pop_output() {}
    }
});
