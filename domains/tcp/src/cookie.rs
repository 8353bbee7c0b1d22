//! SYN cookies (RFC 4987 §3.6): a listener whose SYN queue is full answers
//! with a SYN-ACK whose sequence number encodes the connection, and keeps
//! nothing until the peer's ACK brings it back.

use super::*;

/// The MSS values a SYN cookie can say (its index, in 2 bits): Linux's table,
/// the common MSSs of IPv4 paths, rounded down to.
pub const COOKIE_MSS: [u16; 4] = [536, 1300, 1440, 1460];

/// SYN cookie time: 64-second steps.
fn cookie_time(now: Instant) -> u32 {
    (now.total_millis() / 64_000) as u32
}

/// The SYN a cookie stands for, as the core answers or rebuilds it: the
/// peer's ISN, its MSS rounded down to the table, and — only with timestamps —
/// its window scale and SACK-permitted (`options`).
fn cookie_syn(seg: &Segment, peer_isn: seq::Seq, mss_idx: usize, options: Option<(Option<u8>, bool)>) -> Segment {
    Segment {
        seq: peer_isn,
        ack: None,
        syn: true,
        fin: false,
        rst: false,
        mss: Some(COOKIE_MSS[mss_idx]),
        wscale: options.and_then(|o| o.0),
        sack_permitted: options.is_some_and(|o| o.1),
        sack: [None; 3],
        timestamp: if options.is_some() { seg.timestamp.map(|(tsval, _)| (tsval, 0)) } else { None },
        payload: capnet_ipc::lent::Chain::new(),
        ..seg.clone()
    }
}

impl TcpCore {
    /// The two keyed hashes of a SYN cookie for `ends`: the flow's, and the
    /// flow's at cookie time `t`.
    pub(crate) fn cookie_hashes(&self, ends: Endpoints, t: u32) -> (u32, u32) {
        let flow = (self.cfg.local.octets(), ends.local_port, ends.remote.octets(), ends.remote_port);
        (self.keyed_hash(("syn cookie", flow)) as u32, self.keyed_hash(("syn cookie", flow, t)) as u32)
    }

    /// Answers a SYN with a SYN cookie and keeps no state (RFC 4987 §3.6, laid
    /// out as Linux's): our ISN is a keyed hash of the flow, plus the peer's ISN,
    /// plus the time in 64 s steps in the top 8 bits, plus (another keyed hash
    /// of the flow and the time, plus the index of the peer's MSS in
    /// [`COOKIE_MSS`] in bits 22–23) in the low 24 — unlike Linux, whose index
    /// sits in the lowest bits, so a segment one byte later than the first
    /// passed there for it with the next index down. With timestamps the peer's
    /// window scale and SACK-permitted ride in our TSval's low 6 bits; without,
    /// the SYN-ACK offers neither (they could not be recovered).
    pub(crate) fn send_cookie(&mut self, now: Instant, ends: Endpoints, seg: &Segment, cc: cc::Algorithm) {
        let peer_mss = seg.mss.unwrap_or(536);
        let idx = COOKIE_MSS.iter().rposition(|m| *m <= peer_mss).unwrap_or(0);
        let t = cookie_time(now);
        let (h1, h2) = self.cookie_hashes(ends, t);
        let low = h2.wrapping_add((idx as u32) << 22) & 0x00ff_ffff;
        let iss = seq::Seq(h1.wrapping_add(seg.seq.0).wrapping_add(t << 24).wrapping_add(low));
        let ts = seg.timestamp.is_some() && self.cfg.timestamps;
        let bits = ts.then(|| Conn::cookie_bits(seg));
        let syn = cookie_syn(seg, seg.seq, idx, ts.then_some((seg.wscale, seg.sack_permitted)));
        let mut cx = Cx { cfg: &self.cfg, out: &mut self.out, stats: &mut self.stats, now: self.now };
        // A connection built only to say its SYN-ACK, then forgotten.
        drop(Conn::accept_syn_with(&mut cx, now, ends, iss, &syn, cc, bits));
        self.stats.syn_cookies_sent += 1;
    }

    /// An ACK for a listener with no connection: if it acknowledges a SYN
    /// cookie of the last two minutes, the connection it stands for is built
    /// (established by this ACK, which may carry data) and queued for accept.
    /// Whether it was one (false: reset as any stray ACK).
    pub(crate) fn accept_cookie(&mut self, now: Instant, ends: Endpoints, seg: &Segment, lid: SocketId) -> bool {
        let Some(ack) = seg.ack else { return false };
        let (iss, peer_isn) = (ack.minus(1), seg.seq.minus(1));
        let t = cookie_time(now);
        let (h1, _) = self.cookie_hashes(ends, t);
        let diff = iss.0.wrapping_sub(h1).wrapping_sub(peer_isn.0);
        let age = (t.wrapping_sub(diff >> 24)) & 0xff;
        if age > 2 {
            return false;
        }
        let (_, h2) = self.cookie_hashes(ends, t.wrapping_sub(age));
        let v = (diff & 0x00ff_ffff).wrapping_sub(h2) & 0x00ff_ffff;
        // The low 22 bits check the peer's ISN exactly: a later segment of the
        // connection (its first data lost, say) must not pass for its first, or
        // the connection would start past bytes it never received.
        if v & 0x003f_ffff != 0 {
            return false;
        }
        let idx = (v >> 22) as usize;
        let Some(Sock::Listener(l)) = self.socks.get(lid) else { return false };
        // The peer holds the connection established already: dropping its ACK
        // would leave it sending into nothing we could match again. So it is
        // queued for accept even past the backlog, while the memory budget has
        // room for it (that, not the backlog, bounds what cookies admit).
        if self.memory_used() + 2 * MEMORY_FLOOR > self.cfg.memory {
            self.stats.drop(DropReason::AcceptQueueFull);
            return true;
        }
        let cc = l.cc;
        let options = match seg.timestamp {
            Some((_, tsecr)) if self.cfg.timestamps => {
                let w = (tsecr & 0xf) as u8;
                Some(((w != 0xf).then_some(w), tsecr & 0x10 != 0))
            }
            _ => None,
        };
        let syn = cookie_syn(seg, peer_isn, idx, options);
        let mut scratch = VecDeque::new();
        let mut cx = Cx { cfg: &self.cfg, out: &mut scratch, stats: &mut self.stats, now: self.now };
        let conn = Conn::accept_syn_with(&mut cx, now, ends, iss, &syn, cc, None);
        let id = self.socks.insert(Sock::Conn { conn: Box::new(conn), parent: Some(lid) });
        self.conns.insert(ends, id);
        if let Some(Sock::Listener(l)) = self.socks.get_mut(lid) {
            l.syn_pending += 1;
        }
        self.stats.syn_cookies_accepted += 1;
        let _ = self.with_conn(id, |c, cx| ((), c.on_segment(cx, now, seg)));
        true
    }
}
