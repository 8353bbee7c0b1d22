//! Two TCP cores over a simulated link, in simulated time, with seeded loss and
//! reordering: the whole connection life cycle without a kernel or a clock.

use capnet_ipc::lent::Chain;
use capnet_tcp::cc::{cubic, Algorithm};
use capnet_tcp::{
    Config, DropReason, Duration, Instant, Ipv4Address, Keepalive, Output, Received, SockOpt, SocketId, TcpCore,
    TcpError,
};

const A: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const B: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

/// A seeded link: each segment is delayed, maybe dropped, maybe held back.
struct Net {
    a: TcpCore,
    b: TcpCore,
    now: Instant,
    /// (deliver at, to b?, src, dst, segment)
    flight: Vec<(Instant, bool, Ipv4Address, Ipv4Address, Vec<u8>)>,
    delay: Duration,
    loss: f64,
    reorder: f64,
    rng: u64,
    /// Drop everything sent by B (a silenced peer).
    silence_b: bool,
    /// Drop exactly these data segments from A (by count of data segments sent).
    drop_a_nth: Vec<usize>,
    a_data_sent: usize,
    delivered: usize,
    /// Every segment A sent, kept when set (to replay old duplicates).
    record_a: Option<Vec<Vec<u8>>>,
    /// A bottleneck in each direction, bits per second (None: no serialization
    /// delay), and when each direction's link is next free.
    rate: Option<f64>,
    free_at: [Instant; 2],
}

fn cfg(local: Ipv4Address) -> Config {
    let mut c = Config::new(local, [1, 2]);
    c.msl = Duration::from_secs(1);
    c
}

impl Net {
    fn new(loss: f64, reorder: f64, seed: u64) -> Self {
        Self::with_config(loss, reorder, seed, |_| {})
    }

    /// Both cores configured by `f` on top of the test defaults.
    fn with_config(loss: f64, reorder: f64, seed: u64, f: impl Fn(&mut Config)) -> Self {
        let (mut ca, mut cb) = (cfg(A), cfg(B));
        f(&mut ca);
        f(&mut cb);
        Net {
            a: TcpCore::new(ca),
            b: TcpCore::new(cb),
            now: Instant::from_millis(1000),
            flight: Vec::new(),
            delay: Duration::from_millis(5),
            loss,
            reorder,
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            silence_b: false,
            drop_a_nth: Vec::new(),
            a_data_sent: 0,
            delivered: 0,
            record_a: None,
            rate: None,
            free_at: [Instant::ZERO; 2],
        }
    }

    fn rand(&mut self) -> f64 {
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn collect(&mut self) {
        while let Some(Output::Send { dst, segment, .. }) = self.a.pop_output() {
            assert_eq!(dst, B);
            let segment = segment.to_vec();
            if let Some(r) = &mut self.record_a {
                r.push(segment.clone());
            }
            if segment.len() > usize::from(segment[12] >> 4) * 4 {
                self.a_data_sent += 1;
                if self.drop_a_nth.contains(&self.a_data_sent) {
                    continue;
                }
            }
            self.enqueue(true, A, B, segment);
        }
        while let Some(Output::Send { dst, segment, .. }) = self.b.pop_output() {
            assert_eq!(dst, A);
            let segment = segment.to_vec();
            if self.silence_b {
                continue;
            }
            self.enqueue(false, B, A, segment);
        }
    }

    fn enqueue(&mut self, to_b: bool, src: Ipv4Address, dst: Ipv4Address, seg: Vec<u8>) {
        if self.rand() < self.loss {
            return;
        }
        let extra = if self.rand() < self.reorder { self.delay * 3 } else { Duration::ZERO };
        let mut at = self.now;
        if let Some(rate) = self.rate {
            // 40 bytes of IP and Ethernet framing beside the segment.
            let bits = ((seg.len() + 40) * 8) as f64;
            let link = &mut self.free_at[usize::from(to_b)];
            *link = (*link).max(self.now) + Duration::from_micros((bits / rate * 1e6) as u64);
            at = *link;
        }
        self.flight.push((at + self.delay + extra, to_b, src, dst, seg));
    }

    /// Advances to the next event and handles it. Returns false if nothing is
    /// pending at all.
    fn step(&mut self) -> bool {
        self.collect();
        let next_seg = self.flight.iter().map(|f| f.0).min();
        let next = [next_seg, self.a.poll_at(), self.b.poll_at()].into_iter().flatten().min();
        let Some(next) = next else { return false };
        if next > self.now {
            self.now = next;
        }
        let now = self.now;
        let mut due: Vec<_> = Vec::new();
        let mut i = 0;
        while i < self.flight.len() {
            if self.flight[i].0 <= now {
                due.push(self.flight.remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|d| d.0);
        for (_, to_b, src, dst, seg) in due {
            self.delivered += 1;
            if to_b {
                self.b.receive(now, src, dst, &Chain::from(&seg[..]));
            } else {
                self.a.receive(now, src, dst, &Chain::from(&seg[..]));
            }
        }
        self.a.poll(now);
        self.b.poll(now);
        self.collect();
        true
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&mut Net) -> bool) {
        let end = self.now + limit;
        while !done(self) {
            assert!(self.now < end, "not done within {limit} of simulated time");
            if !self.step() {
                assert!(done(self), "nothing pending and not done");
                return;
            }
        }
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Connects A to a listener on B; returns (a's conn, b's listener, b's conn).
fn connected(net: &mut Net) -> (SocketId, SocketId, SocketId) {
    let l = net.b.listen(80, 16).unwrap();
    let c = net.a.connect(net.now, B, 80).unwrap();
    let mut accepted = None;
    net.run_until(Duration::from_secs(5), |n| {
        if accepted.is_none() {
            accepted = n.b.accept(l).unwrap();
        }
        accepted.is_some() && n.a.connected(c) == Ok(true)
    });
    (c, l, accepted.unwrap())
}

/// Moves `data` from `tx` to `rx` (true: A sends) and returns what arrived.
fn transfer(net: &mut Net, a_sends: bool, tx: SocketId, rx: SocketId, data: &[u8]) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::new();
    let mut eof = false;
    net.run_until(Duration::from_secs(600), |n| {
        let now = n.now;
        let (s, r) = if a_sends { (&mut n.a, &mut n.b) } else { (&mut n.b, &mut n.a) };
        if sent < data.len() {
            sent += s.send(now, tx, &data[sent..]).unwrap();
            if sent == data.len() {
                s.shutdown(now, tx, false, true).unwrap();
            }
        }
        loop {
            match r.recv(now, rx, 65536).unwrap() {
                Received::Data(d) => got.extend(d.to_vec()),
                Received::Eof => {
                    eof = true;
                    break;
                }
                Received::Nothing => break,
            }
        }
        eof
    });
    got
}

#[test]
fn handshake_negotiates_mss_and_window_scale() {
    let mut net = Net::new(0.0, 0.0, 1);
    let (c, _, s) = connected(&mut net);
    let (ia, ib) = (net.a.info(c).unwrap(), net.b.info(s).unwrap());
    assert_eq!((ia.state.name(), ib.state.name()), ("ESTABLISHED", "ESTABLISHED"));
    // 1460 agreed; every segment carries the 12 bytes of the Timestamps option.
    assert_eq!((ia.mss, ib.mss), (1448, 1448));
    assert!(ia.sack && ia.timestamps && ib.sack && ib.timestamps);
    // 1 MiB buffers need a shift of 5 (2^20 >> 5 = 32768).
    assert_eq!((ia.rcv_wscale, ia.snd_wscale, ib.rcv_wscale, ib.snd_wscale), (5, 5, 5, 5));
    assert!(ia.srtt_us.is_some(), "the handshake gave an RTT sample");
}

#[test]
fn bulk_both_ways_byte_exact_on_a_clean_link() {
    let mut net = Net::new(0.0, 0.0, 2);
    let (c, _, s) = connected(&mut net);
    let data = pattern(3 << 20);
    assert!(transfer(&mut net, true, c, s, &data) == data);
    let back = pattern(1 << 20);
    assert!(transfer(&mut net, false, s, c, &back) == back);
    assert_eq!(net.a.stats().retransmits + net.b.stats().retransmits, 0);
}

#[test]
fn bulk_survives_loss_and_reordering() {
    for (seed, loss, reorder) in [(3, 0.01, 0.0), (4, 0.05, 0.05), (5, 0.02, 0.2)] {
        let mut net = Net::new(loss, reorder, seed);
        let (c, _, s) = connected(&mut net);
        let data = pattern(1 << 20);
        assert!(transfer(&mut net, true, c, s, &data) == data, "A→B seed {seed}");
        let back = pattern(700_000);
        assert!(transfer(&mut net, false, s, c, &back) == back, "B→A seed {seed}");
        assert!(net.a.stats().retransmits > 0);
    }
}

#[test]
fn one_lost_segment_is_fast_retransmitted_without_a_timeout() {
    let mut net = Net::new(0.0, 0.0, 6);
    let (c, _, s) = connected(&mut net);
    net.drop_a_nth = vec![20];
    let data = pattern(400_000);
    assert!(transfer(&mut net, true, c, s, &data) == data);
    let st = net.a.stats();
    assert_eq!(st.fast_retransmits, 1);
    assert_eq!(st.timeouts, 0, "NewReno recovered without the RTO");
}

#[test]
fn a_syn_to_a_closed_port_is_refused() {
    let mut net = Net::new(0.0, 0.0, 7);
    let c = net.a.connect(net.now, B, 81).unwrap();
    net.run_until(Duration::from_secs(5), |n| n.a.connected(c).is_err());
    assert_eq!(net.a.connected(c), Err(TcpError::ConnectionRefused));
    assert_eq!(net.b.stats().resets_out, 1);
}

#[test]
fn an_unanswered_syn_times_out_after_its_retries() {
    let mut net = Net::new(0.0, 0.0, 8);
    net.silence_b = true;
    let c = net.a.connect(net.now, B, 80).unwrap();
    net.run_until(Duration::from_secs(600), |n| n.a.connected(c).is_err());
    assert_eq!(net.a.connected(c), Err(TcpError::TimedOut), "at {}", net.now);
    // RFC 6298 backoff from 1 s, doubling, capped at 60 s: 1+2+4+8+16+32+60.
    assert_eq!(net.now.total_millis(), 1000 + 123_000, "gave up at {}", net.now);
}

#[test]
fn simultaneous_open_and_simultaneous_close() {
    let mut net = Net::new(0.0, 0.0, 9);
    let a = net.a.connect_from(net.now, 5000, B, 6000).unwrap();
    let b = net.b.connect_from(net.now, 6000, A, 5000).unwrap();
    net.run_until(Duration::from_secs(5), |n| n.a.connected(a) == Ok(true) && n.b.connected(b) == Ok(true));
    net.a.shutdown(net.now, a, false, true).unwrap();
    net.b.shutdown(net.now, b, false, true).unwrap();
    net.step();
    // Both FINs crossed: CLOSING on both sides, then TIME-WAIT.
    net.run_until(Duration::from_secs(5), |n| {
        n.a.info(a).unwrap().state == "TIME-WAIT" && n.b.info(b).unwrap().state == "TIME-WAIT"
    });
    // TIME-WAIT lasts 2·MSL (2 s here), then the connection is closed.
    let entered = net.now;
    net.run_until(Duration::from_secs(5), |n| n.a.info(a).unwrap().state == "CLOSED");
    let waited = net.now.total_millis() - entered.total_millis();
    assert!((1900..=2100).contains(&waited), "TIME-WAIT lasted {waited} ms");
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    let mut net = Net::new(0.0, 0.0, 10);
    let (c, _, s) = connected(&mut net);
    net.a.shutdown(net.now, c, false, true).unwrap();
    net.run_until(Duration::from_secs(5), |n| {
        n.b.recv(n.now, s, 100) == Ok(Received::Eof) && n.a.info(c).unwrap().state == "FIN-WAIT-2"
    });
    assert_eq!(net.b.info(s).unwrap().state, "CLOSE-WAIT");
    assert_eq!(net.a.info(c).unwrap().state, "FIN-WAIT-2");
    assert_eq!(net.a.send(net.now, c, b"x"), Err(TcpError::BrokenPipe));
    let back = pattern(200_000);
    assert!(transfer(&mut net, false, s, c, &back) == back);
    net.run_until(Duration::from_secs(5), |n| n.b.info(s).map(|i| i.state.name()) == Ok("CLOSED"));
}

#[test]
fn abort_resets_the_peer() {
    let mut net = Net::new(0.0, 0.0, 11);
    let (c, _, s) = connected(&mut net);
    net.a.send(net.now, c, pattern(10_000)).unwrap();
    net.step();
    net.a.abort(c).unwrap();
    net.run_until(Duration::from_secs(5), |n| n.b.ready(s).unwrap().error);
    // Data that arrived before the reset is still readable, then the error.
    let mut got = 0;
    let err = loop {
        match net.b.recv(net.now, s, 65536) {
            Ok(Received::Data(d)) => got += d.len(),
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(err, TcpError::ConnectionReset);
    assert!(got <= 10_000);
    assert_eq!(net.a.info(c), Err(TcpError::BadSocket), "an aborted connection is gone");
}

#[test]
fn closing_with_unread_data_resets() {
    let mut net = Net::new(0.0, 0.0, 12);
    let (c, _, s) = connected(&mut net);
    net.a.send(net.now, c, b"unread").unwrap();
    net.run_until(Duration::from_secs(5), |n| n.b.ready(s).unwrap().readable);
    net.b.close(net.now, s).unwrap();
    net.run_until(Duration::from_secs(5), |n| n.a.ready(c).unwrap().error);
    assert_eq!(net.a.recv(net.now, c, 10), Err(TcpError::ConnectionReset));
}

#[test]
fn the_backlog_bounds_pending_connections() {
    let mut net = Net::new(0.0, 0.0, 13);
    let l = net.b.listen(80, 2).unwrap();
    let cs: Vec<_> = (0..3).map(|_| net.a.connect(net.now, B, 80).unwrap()).collect();
    net.run_until(Duration::from_millis(500), |n| n.b.ready(l).unwrap().readable && n.now.total_millis() > 1100);
    // The SYN queue held two; the third SYN, past it, was answered with a cookie
    // and nothing kept — until its ACK, which the peer holds for established:
    // that one is queued past the backlog (the memory budget bounds cookies).
    assert!(net.b.stats().syn_cookies_sent >= 1, "the third SYN is answered with a cookie");
    assert_eq!(net.b.stats().syn_cookies_accepted, 1);
    let mut accepted = Vec::new();
    while let Some(s) = net.b.accept(l).unwrap() {
        accepted.push(s);
    }
    assert_eq!(accepted.len(), 3, "all three are accepted");
    // And the cookie's connection carries data like the others.
    net.a.send(net.now, cs[2], b"hello").unwrap();
    let third = *accepted
        .iter()
        .find(|s| net.b.info(**s).unwrap().remote_port == net.a.info(cs[2]).unwrap().local_port)
        .unwrap();
    let mut got = Vec::new();
    net.run_until(Duration::from_secs(5), |n| {
        if let Received::Data(d) = n.b.recv(n.now, third, 64).unwrap() {
            got.extend(d.to_vec());
        }
        got == b"hello"
    });
}

#[test]
fn keepalive_detects_a_silent_peer() {
    let mut net = Net::new(0.0, 0.0, 14);
    let (c, _, _s) = connected(&mut net);
    let k = Keepalive { idle: Duration::from_secs(1), interval: Duration::from_secs(1), count: 3 };
    net.a.set_option(net.now, c, SockOpt::KeepAlive(Some(k))).unwrap();
    // Answered probes keep it alive.
    let t0 = net.now;
    net.run_until(Duration::from_secs(10), |n| n.now.total_millis() - t0.total_millis() >= 5000);
    assert!(net.a.stats().keepalive_probes >= 3);
    assert_eq!(net.a.connected(c), Ok(true));
    net.silence_b = true;
    net.run_until(Duration::from_secs(10), |n| n.a.connected(c).is_err());
    assert_eq!(net.a.connected(c), Err(TcpError::TimedOut));
}

#[test]
fn a_zero_window_stalls_the_sender_until_the_reader_reads() {
    let mut net = Net::new(0.0, 0.0, 15);
    let (c, _, s) = connected(&mut net);
    let data = pattern(3 << 20);
    let mut sent = 0;
    net.run_until(Duration::from_secs(30), |n| {
        sent += n.a.send(n.now, c, &data[sent..]).unwrap();
        n.b.info(s).unwrap().rcv_queued >= (1 << 20) - 1460
    });
    // The receiver's buffer is full: the window closed; the persist timer probes.
    let t0 = net.now;
    net.run_until(Duration::from_secs(30), |n| n.now.total_millis() - t0.total_millis() > 3000);
    assert_eq!(net.a.info(c).unwrap().snd_wnd, 0);
    assert_eq!(net.a.connected(c), Ok(true), "probes keep a closed window from timing out");
    let mut got = Vec::new();
    net.run_until(Duration::from_secs(60), |n| {
        sent += n.a.send(n.now, c, &data[sent..]).unwrap();
        while let Ok(Received::Data(d)) = n.b.recv(n.now, s, 65536) {
            got.extend(d.to_vec());
        }
        got.len() == data.len()
    });
    assert!(got == data);
}

#[test]
fn an_in_window_rst_draws_a_challenge_ack_and_the_connection_survives() {
    let mut net = Net::new(0.0, 0.0, 16);
    let (c, _, s) = connected(&mut net);
    let before = net.b.stats().challenge_acks;
    // A blind RST a little inside B's window, from "A".
    let info = net.a.info(c).unwrap();
    let mut seg = [0u8; 20];
    let mut p = smoltcp::wire::TcpPacket::new_unchecked(&mut seg[..]);
    p.set_src_port(info.local_port);
    p.set_dst_port(80);
    p.set_header_len(20);
    p.set_rst(true);
    // Any sequence number but the exact next one: take A's and add 1000.
    let probe_seq = {
        net.a.send(net.now, c, b"!").unwrap();
        let Some(Output::Send { segment, .. }) = net.a.pop_output() else { panic!() };
        smoltcp::wire::TcpPacket::new_checked(&segment.to_vec()[..]).unwrap().seq_number()
    };
    p.set_seq_number(probe_seq + 1000);
    p.fill_checksum(&A.into(), &B.into());
    net.b.receive(net.now, A, B, &Chain::from(&seg[..]));
    assert_eq!(net.b.stats().challenge_acks, before + 1);
    assert_eq!(net.b.connected(s), Ok(true));
}

#[test]
fn isns_are_keyed_per_connection_and_advance_with_a_4_microsecond_clock() {
    // RFC 6528: ISN = M + F(4-tuple, secret).
    let syn_seq = |core: &mut TcpCore| {
        let Some(Output::Send { segment, .. }) = core.pop_output() else { panic!("no SYN") };
        smoltcp::wire::TcpPacket::new_checked(&segment.to_vec()[..]).unwrap().seq_number().0 as u32
    };
    let mut a = TcpCore::new(cfg(A));
    let t0 = Instant::from_secs(10);
    a.connect_from(t0, 5000, B, 80).unwrap();
    let first = syn_seq(&mut a);
    a.connect_from(t0, 5001, B, 80).unwrap();
    let other_port = syn_seq(&mut a);
    assert_ne!(first, other_port, "another 4-tuple, another offset");
    let mut again = TcpCore::new(cfg(A));
    again.connect_from(t0 + Duration::from_secs(1), 5000, B, 80).unwrap();
    assert_eq!(syn_seq(&mut again).wrapping_sub(first), 250_000, "1 s later: 250 000 ticks of 4 µs");
    let mut other_key = TcpCore::new(Config::new(A, [3, 4]));
    other_key.connect_from(t0, 5000, B, 80).unwrap();
    assert_ne!(syn_seq(&mut other_key), first, "another secret, another ISN");
}

#[test]
fn sack_repairs_several_holes_in_one_round_trip_without_a_timeout() {
    let holes = vec![30, 33, 36, 40];
    let mut took = Vec::new();
    for sack in [true, false] {
        let mut net = Net::with_config(0.0, 0.0, 12, |c| c.sack = sack);
        let (c, _, s) = connected(&mut net);
        net.drop_a_nth = holes.clone();
        let start = net.now;
        let data = pattern(600_000);
        assert!(transfer(&mut net, true, c, s, &data) == data);
        let st = net.a.stats();
        assert_eq!(st.timeouts, 0, "sack {sack}: recovered without the RTO");
        assert_eq!(st.fast_retransmits, 1, "sack {sack}: one loss event, one window reduction");
        if sack {
            assert_eq!(st.retransmits, holes.len() as u64, "exactly the lost segments again");
            assert!(net.a.info(c).unwrap().sack_blocks_in > 0);
        }
        took.push(net.now - start);
    }
    // NewReno without SACK learns of one hole per round trip.
    assert!(took[0] < took[1], "with SACK {} vs without {}", took[0], took[1]);
}

#[test]
fn paws_drops_an_old_duplicate_by_its_timestamp() {
    let mut net = Net::new(0.0, 0.0, 13);
    let (c, _, s) = connected(&mut net);
    net.record_a = Some(Vec::new());
    let first = pattern(3000);
    assert!(transfer_some(&mut net, c, s, &first) == first);
    // Time passes and more data moves: TS.Recent moves on.
    net.now += Duration::from_secs(2);
    let more = pattern(3000);
    assert!(transfer_some(&mut net, c, s, &more) == more);
    let old = net.record_a.as_ref().unwrap()[0].clone();
    let before = net.b.stats().dropped(DropReason::Paws);
    let now = net.now;
    net.b.receive(now, A, B, &Chain::from(&old[..]));
    assert_eq!(net.b.stats().dropped(DropReason::Paws), before + 1);
    assert_eq!(net.b.recv(now, s, 100).unwrap(), Received::Nothing, "nothing from the old segment was taken");
}

/// Moves `data` from A to B without closing.
fn transfer_some(net: &mut Net, tx: SocketId, rx: SocketId, data: &[u8]) -> Vec<u8> {
    let mut sent = 0;
    let mut got = Vec::new();
    net.run_until(Duration::from_secs(60), |n| {
        let now = n.now;
        if sent < data.len() {
            sent += n.a.send(now, tx, &data[sent..]).unwrap();
        }
        while let Received::Data(d) = n.b.recv(now, rx, 65536).unwrap() {
            got.extend(d.to_vec());
        }
        got.len() == data.len()
    });
    got
}

/// A's window as A streams to B with segment `drop` lost: (cwnd, ssthresh, in
/// recovery) sampled at every simulated event, with the time.
fn stream_with_one_loss(
    algorithm: Algorithm,
    drop: usize,
    until: Duration,
) -> (Vec<(Instant, usize, usize, bool)>, usize) {
    let mut net = Net::with_config(0.0, 0.0, 14, |c| {
        c.congestion_control = algorithm;
        c.send_buffer = 8 << 20;
        c.recv_buffer = 8 << 20;
    });
    net.delay = Duration::from_millis(50);
    // A 1 Gbit/s bottleneck spreads a window's ACKs over the round trip, so
    // the samples see the window as it was when the loss was found.
    net.rate = Some(1e9);
    let (c, _, s) = connected(&mut net);
    net.drop_a_nth = vec![drop];
    let chunk = pattern(1 << 20);
    let end = net.now + until;
    let mut samples = Vec::new();
    while net.now < end {
        let now = net.now;
        while net.a.send(now, c, &chunk).unwrap() > 0 {}
        while let Received::Data(_) = net.b.recv(now, s, 1 << 20).unwrap() {}
        let i = net.a.info(c).unwrap();
        samples.push((now, i.cwnd, i.ssthresh, i.recovery));
        assert!(net.step());
    }
    (samples, net.a.info(c).unwrap().mss)
}

#[test]
fn newreno_halves_its_window_on_a_loss_event() {
    let (samples, _) = stream_with_one_loss(Algorithm::NewReno, 400, Duration::from_secs(3));
    let at = samples.iter().position(|s| s.3).expect("a recovery");
    let before = samples[at - 1].1;
    let ssthresh = samples[at].2;
    // ssthresh = FlightSize / 2; in slow start the flight is the window.
    let ratio = ssthresh as f64 / before as f64;
    assert!((0.45..=0.55).contains(&ratio), "ssthresh {ssthresh} after cwnd {before}: {ratio}");
}

#[test]
fn cubic_window_follows_w_cubic_of_rfc_9438() {
    let (samples, mss) = stream_with_one_loss(Algorithm::Cubic, 300, Duration::from_secs(30));
    let at = samples.iter().position(|s| s.3).expect("a recovery");
    let w_max = samples[at - 1].1 as f64 / mss as f64;
    let end = at + samples[at..].iter().position(|s| !s.3).expect("recovery ends");
    let (t0, cwnd_epoch) = (samples[end].0, samples[end].1 as f64 / mss as f64);
    assert!((cwnd_epoch / w_max - cubic::BETA).abs() < 0.05, "β: {cwnd_epoch} after {w_max}");
    let k = cubic::k_for(w_max, cwnd_epoch);
    for frac in [0.25, 1.0, 1.75] {
        let t = k * frac;
        let at_t = t0 + Duration::from_micros((t * 1e6) as u64);
        let s = samples.iter().find(|s| s.0 >= at_t).expect("ran long enough");
        let got = s.1 as f64 / mss as f64;
        let want = cubic::w_cubic(t, k, w_max);
        assert!((got / want - 1.0).abs() < 0.03, "t = {t:.2} s (K = {k:.2}): cwnd {got:.1} vs W_cubic {want:.1}");
    }
}

/// One bulk transfer of `bytes` A→B over a 100 Mbit/s, 20 ms link losing `loss`
/// of the segments each way: (goodput in Mbit/s, retransmissions, timeouts,
/// the longest time without new data at B).
fn goodput_run(loss: f64, seed: u64, sack: bool, algorithm: Algorithm, bytes: usize) -> (f64, u64, u64, Duration) {
    let mut net = Net::with_config(loss, 0.0, seed, |c| {
        c.sack = sack;
        c.congestion_control = algorithm;
    });
    net.delay = Duration::from_millis(10);
    net.rate = Some(100e6);
    let (c, _, s) = connected(&mut net);
    let data = pattern(bytes);
    let start = net.now;
    let (mut sent, mut got) = (0, Vec::with_capacity(bytes));
    let (mut last_progress, mut longest_gap) = (net.now, Duration::ZERO);
    net.run_until(Duration::from_secs(3600), |n| {
        let now = n.now;
        if sent < data.len() {
            sent += n.a.send(now, c, &data[sent..]).unwrap();
        }
        let before = got.len();
        while let Received::Data(d) = n.b.recv(now, s, 1 << 20).unwrap() {
            got.extend(d.to_vec());
        }
        if got.len() > before {
            longest_gap = longest_gap.max(now - last_progress);
            last_progress = now;
        }
        got.len() == data.len()
    });
    assert!(got == data, "byte-exact at {loss} seed {seed}");
    let secs = (net.now - start).total_micros() as f64 / 1e6;
    let st = net.a.stats();
    (bytes as f64 * 8.0 / secs / 1e6, st.retransmits, st.timeouts, longest_gap)
}

/// Goodput against loss, averaged over seeds, for NewReno with and without SACK
/// and CUBIC with SACK: never rising as loss rises, nothing stalling, and the
/// table equal to the committed snapshot (`UPDATE_SNAPSHOTS=1` rewrites it).
#[test]
fn goodput_falls_as_loss_rises_and_matches_the_snapshot() {
    const SEEDS: u64 = 4;
    const BYTES: usize = 4 << 20;
    let variants = [
        ("newreno+sack", true, Algorithm::NewReno),
        ("newreno", false, Algorithm::NewReno),
        ("cubic+sack", true, Algorithm::Cubic),
    ];
    let mut table = String::from(
        "# Goodput (Mbit/s) of 4 MiB over a simulated 100 Mbit/s link, 20 ms RTT, random loss\n\
         # each way; mean of 4 seeds. Columns per variant: goodput, retransmits, RTOs, longest stall (ms).\n",
    );
    table += &format!("{:>6}", "loss%");
    for (name, ..) in variants {
        table += &format!(" | {name:>28}");
    }
    table += "\n";
    let mut last = [f64::INFINITY; 3];
    for loss_pct in [0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0] {
        table += &format!("{loss_pct:>6.1}");
        for (v, &(name, sack, algorithm)) in variants.iter().enumerate() {
            let runs: Vec<_> =
                (1..=SEEDS).map(|seed| goodput_run(loss_pct / 100.0, seed, sack, algorithm, BYTES)).collect();
            let goodput = runs.iter().map(|r| r.0).sum::<f64>() / SEEDS as f64;
            let rtx = runs.iter().map(|r| r.1).sum::<u64>() / SEEDS;
            let rtos = runs.iter().map(|r| r.2).sum::<u64>() / SEEDS;
            let stall = runs.iter().map(|r| r.3).max().unwrap();
            assert!(goodput <= last[v], "{name}: goodput rose from {:.2} to {goodput:.2} at {loss_pct}% loss", last[v]);
            last[v] = goodput;
            table += &format!(" | {goodput:>8.2} {rtx:>6} {rtos:>4} {:>7}", stall.total_millis());
        }
        table += "\n";
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goodput.snap");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &table).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == table,
        "goodput table differs from {}:\n{table}\n(UPDATE_SNAPSHOTS=1 rewrites it)",
        path.display()
    );
}

/// Issue 18 (findings 3 and 8): a peer that never reads pins at most the core's
/// memory budget in all, not a send buffer per connection: with eight
/// connections and a 1 MiB budget, B's application writes until sends take
/// nothing and the sockets stop being writable; B never holds more than the
/// budget (and each connection's floor), sent or received, and once A reads,
/// every byte arrives in order.
#[test]
fn peers_that_never_read_pin_at_most_the_memory_budget() {
    let budget = 1 << 20;
    let mut net = Net::with_config(0.0, 0.0, 7, |c| {
        c.memory = budget;
        c.recv_buffer = 256 << 10;
    });
    let l = net.b.listen(80, 16).unwrap();
    let cs: Vec<SocketId> = (0..8).map(|_| net.a.connect(net.now, B, 80).unwrap()).collect();
    let mut accepted = Vec::new();
    net.run_until(Duration::from_secs(5), |n| {
        while let Some(s) = n.b.accept(l).unwrap() {
            accepted.push(s);
        }
        accepted.len() == 8
    });
    let data = pattern(1 << 20);
    let mut sent = [0usize; 8];
    // B writes to every connection while A reads nothing, until nothing moves.
    for _ in 0..2000 {
        for (i, s) in accepted.iter().enumerate() {
            sent[i] += net.b.send(net.now, *s, &data[sent[i]..]).unwrap();
        }
        let most = budget + 16 * capnet_tcp::MEMORY_FLOOR;
        assert!(net.b.memory_used() <= most, "B holds {} of a {budget} budget", net.b.memory_used());
        if !net.step() {
            break;
        }
    }
    let total: usize = sent.iter().sum();
    assert!(total < 8 * data.len(), "the budget stopped the writes ({total} taken)");
    assert!(net.b.memory_used() > budget / 2, "B's queues fill its budget: {}", net.b.memory_used());
    assert!(
        accepted.iter().all(|s| !net.b.ready(*s).unwrap().writable),
        "no socket is writable while the budget is spent"
    );
    assert_eq!(net.b.send(net.now, accepted[0], b"more").unwrap(), 0, "a send takes nothing");
    // A reads everything: the budget frees and every byte arrives, in order.
    let mut got = vec![Vec::new(); 8];
    net.run_until(Duration::from_secs(120), |n| {
        let now = n.now;
        for (i, s) in accepted.iter().enumerate() {
            sent[i] += n.b.send(now, *s, &data[sent[i]..]).unwrap();
        }
        for (i, c) in cs.iter().enumerate() {
            while let Received::Data(d) = n.a.recv(now, *c, 65536).unwrap() {
                got[i].extend(d.to_vec());
            }
        }
        let most = budget + 16 * capnet_tcp::MEMORY_FLOOR;
        assert!(n.b.memory_used() <= most && n.a.memory_used() <= most);
        got.iter().all(|g| g.len() == data.len())
    });
    assert!(got.iter().all(|g| g[..] == data[..]), "byte-exact on every connection");
}

/// A connection that heard the peer's FIN can receive nothing more, so the
/// window it offered no longer holds memory. Before, every TIME-WAIT kept its
/// window charged: the server end of a connection-setup bench over the
/// 64 KiB-MTU wire (windows of ~500 KB) spent a 256 MiB budget after ~540
/// connections and the next ones stalled until they were reset.
#[test]
fn time_wait_connections_hold_no_window() {
    let mut net = Net::with_config(0.0, 0.0, 11, |c| {
        c.memory = 1 << 20;
        c.recv_buffer = 256 << 10;
    });
    let l = net.b.listen(80, 16).unwrap();
    for i in 0..24 {
        let c = net.a.connect(net.now, B, 80).unwrap();
        let mut s = None;
        net.run_until(Duration::from_secs(5), |n| {
            s = s.or_else(|| n.b.accept(l).unwrap());
            s.is_some() && n.a.connected(c) == Ok(true)
        });
        let s = s.unwrap();
        // A sends a byte; B reads it and closes first (it ends in TIME-WAIT),
        // as the bench's server does; A closes when it hears B's FIN.
        assert_eq!(net.a.send(net.now, c, b"c").unwrap(), 1);
        let mut got = Vec::new();
        net.run_until(Duration::from_secs(5), |n| {
            if let Received::Data(d) = n.b.recv(n.now, s, 16).unwrap() {
                got.extend(d.to_vec());
            }
            !got.is_empty()
        });
        assert_eq!(got, b"c", "connection {i} carries its byte");
        net.b.close(net.now, s).unwrap();
        net.run_until(Duration::from_secs(5), |n| matches!(n.a.recv(n.now, c, 16), Ok(Received::Eof)));
        net.a.close(net.now, c).unwrap();
        net.run_until(Duration::from_secs(5), |n| {
            n.b.info(s).is_ok_and(|i| i.state == capnet_tcp::ConnState::TimeWait)
        });
    }
    let waiting = net.b.sockets().0.iter().filter(|i| i.state == capnet_tcp::ConnState::TimeWait).count();
    assert_eq!(waiting, 24, "B keeps every TIME-WAIT");
    assert_eq!(net.b.memory_used(), 0, "and charges none of their windows");
}

/// Issue 18, finding 8: a peer that holds its window shut kept a connection its
/// application had closed, and the data queued on it, for ever. A closed
/// connection now gives up after `orphan_retries` probes (Linux's
/// `tcp_orphan_retries`) and resets, freeing what it held; one still open keeps
/// probing, as RFC 9293 §3.8.6.1 wants.
#[test]
fn a_closed_connection_behind_a_shut_window_gives_up() {
    let mut net = Net::with_config(0.0, 0.0, 3, |c| {
        c.recv_buffer = 16 << 10;
        c.orphan_retries = 4;
    });
    let (a1, l, b1) = connected(&mut net);
    let a2 = net.a.connect(net.now, B, 80).unwrap();
    let mut b2 = None;
    net.run_until(Duration::from_secs(5), |n| {
        b2 = b2.or_else(|| n.b.accept(l).unwrap());
        b2.is_some() && n.a.connected(a2) == Ok(true)
    });
    // A fills both windows; B never reads.
    let data = pattern(256 << 10);
    for c in [a1, a2] {
        let mut sent = 0;
        net.run_until(Duration::from_secs(30), |n| {
            sent += n.a.send(n.now, c, &data[sent..]).unwrap();
            n.a.ready(c).is_ok_and(|r| !r.writable) || sent == data.len()
        });
    }
    let held = net.a.memory_used();
    assert!(held > 0);
    // A's application closes the first; the second stays open.
    net.a.close(net.now, a1).unwrap();
    net.run_until(Duration::from_secs(3600), |n| n.a.stats().orphans_given_up == 1);
    assert!(net.a.memory_used() < held, "what the given-up connection held is freed");
    assert!(net.a.ready(a2).is_ok_and(|r| !r.error), "the open one still probes");
    // B hears the reset on the first and still holds the second.
    net.run_until(Duration::from_secs(5), |n| {
        n.b.recv(n.now, b1, 1 << 20).is_err() || n.b.ready(b1).is_ok_and(|r| r.error)
    });
    assert!(net.b.ready(b2.unwrap()).is_ok_and(|r| !r.error));
}

/// Issue 18, finding 4: a full SYN queue dropped new SYNs, so half-open
/// connections that never complete (a SYN flood) shut everyone out. Now a full
/// queue answers with a SYN cookie (RFC 4987 §3.6) and keeps nothing: the
/// connection is built from the cookie's ACK, with the MSS, window scale, SACK
/// and timestamps the SYN asked for, and carries data like any other.
#[test]
fn a_full_syn_queue_answers_with_cookies_and_the_connection_works() {
    let mut net = Net::new(0.0, 0.0, 11);
    let l = net.b.listen(80, 4).unwrap();
    // Four half-open connections whose SYN-ACKs never arrive: the queue is full.
    net.silence_b = true;
    let stuck: Vec<SocketId> = (0..4).map(|_| net.a.connect(net.now, B, 80).unwrap()).collect();
    for _ in 0..20 {
        net.step();
    }
    assert_eq!(net.b.stats().syn_cookies_sent, 0, "the queue took the first four");
    net.silence_b = false;
    // A new connection now: answered with a cookie.
    let c = net.a.connect(net.now, B, 80).unwrap();
    let mut accepted = Vec::new();
    net.run_until(Duration::from_secs(5), |n| {
        while let Some(s) = n.b.accept(l).unwrap() {
            accepted.push(s);
        }
        n.a.connected(c) == Ok(true) && n.b.stats().syn_cookies_accepted >= 1
    });
    assert!(net.b.stats().syn_cookies_sent >= 1);
    net.run_until(Duration::from_secs(5), |n| {
        while let Some(s) = n.b.accept(l).unwrap() {
            accepted.push(s);
        }
        accepted.iter().any(|s| n.b.info(*s).is_ok_and(|i| i.remote_port == n.a.info(c).unwrap().local_port))
    });
    let cookie_conn = *accepted
        .iter()
        .find(|s| net.b.info(**s).is_ok_and(|i| i.remote_port == net.a.info(c).unwrap().local_port))
        .expect("the cookie's connection is accepted");
    let info = net.b.info(cookie_conn).unwrap();
    assert!(info.sack && info.timestamps, "SACK and timestamps survive the cookie: {info:?}");
    let theirs = net.a.info(c).unwrap();
    assert_eq!((info.snd_wscale, info.rcv_wscale), (theirs.rcv_wscale, theirs.snd_wscale), "window scales agree");
    assert_eq!(info.mss, 1460 - 12, "the MSS rounded down to the cookie's table, less the timestamp option");
    // Window scaling too: a megabyte each way, byte-exact.
    let data = pattern(1 << 20);
    assert_eq!(transfer(&mut net, true, c, cookie_conn, &data), data);
    let _ = stuck;
}

/// A SYN cookie checks the peer's ISN exactly: the ACK that completes the
/// handshake, or the first data, is recognised; a segment that starts later
/// (the first data lost) is not taken for the first — with Linux's layout (the
/// MSS index in the lowest bits) it passes with the next index down, and the
/// connection starts past a byte it never got (found with 1500 Linux clients
/// at once). It draws a reset; the first data, when it comes, is taken.
#[test]
fn a_cookie_checks_the_peers_isn_exactly() {
    let (mut a, mut b) = (TcpCore::new(cfg(A)), TcpCore::new(cfg(B)));
    let now = Instant::from_millis(1000);
    let outs = |c: &mut TcpCore| {
        std::iter::from_fn(|| c.pop_output()).map(|Output::Send { segment, .. }| segment.to_vec()).collect::<Vec<_>>()
    };
    let l = b.listen(80, 1).unwrap();
    // One half-open connection fills the SYN queue (its SYN-ACK goes nowhere).
    let _half = a.connect(now, B, 80).unwrap();
    for seg in outs(&mut a) {
        b.receive(now, A, B, &Chain::from(&seg[..]));
    }
    outs(&mut b);
    // The next is answered with a cookie.
    let c = a.connect(now, B, 80).unwrap();
    for seg in outs(&mut a) {
        b.receive(now, A, B, &Chain::from(&seg[..]));
    }
    assert_eq!(b.stats().syn_cookies_sent, 1);
    for seg in outs(&mut b) {
        a.receive(now, B, A, &Chain::from(&seg[..]));
    }
    assert_eq!(a.connected(c), Ok(true));
    a.set_option(now, c, SockOpt::NoDelay(true)).unwrap();
    let ack = outs(&mut a);
    a.send(now, c, b"A").unwrap();
    let first = outs(&mut a);
    a.send(now, c, b"B").unwrap();
    let second = outs(&mut a);
    assert_eq!((ack.len(), first.len(), second.len()), (1, 1, 1));
    // The handshake's ACK and the first byte are lost; the second arrives.
    b.receive(now, A, B, &Chain::from(&second[0][..]));
    assert_eq!(b.stats().syn_cookies_accepted, 0, "a segment one byte late is not the first");
    assert_eq!(b.stats().resets_out, 1, "it is reset");
    // The first byte's retransmission is the first: the connection is built.
    b.receive(now, A, B, &Chain::from(&first[0][..]));
    assert_eq!(b.stats().syn_cookies_accepted, 1);
    b.receive(now, A, B, &Chain::from(&second[0][..]));
    let mut s = None;
    while let Some(x) = b.accept(l).unwrap() {
        if b.info(x).unwrap().remote_port == a.info(c).unwrap().local_port {
            s = Some(x);
        }
    }
    assert_eq!(b.recv(now, s.expect("accepted"), 16).unwrap(), Received::Data(b"AB"[..].into()));
}
