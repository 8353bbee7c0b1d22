//! A connection's output: segments built and emitted, what to send and when,
//! retransmission, and the window it offers (RFC 9293 §3.8, RFC 6675, RFC 7323).

use super::*;

impl Conn {
    pub(super) fn emit(&mut self, cx: &mut Cx, seq: Seq, flags: Flags, payload_at: Option<(usize, usize)>) {
        let syn = flags.syn;
        let window = if syn {
            // RFC 7323 §2.2: the window in a SYN is not scaled.
            let w = self.rcv_space().min(65535);
            if !matches!(self.state, State::SynSent(_)) {
                self.rcv_adv = self.rcv_adv.max(self.rcv_nxt.plus(w));
            }
            w as u16
        } else {
            self.advertise()
        };
        let control = if flags.syn {
            TcpControl::Syn
        } else if flags.rst {
            TcpControl::Rst
        } else if flags.fin {
            TcpControl::Fin
        } else if flags.psh {
            TcpControl::Psh
        } else {
            TcpControl::None
        };
        let payload = match payload_at {
            Some((off, len)) => self.snd_buf.range(off, len),
            None => Chain::new(),
        };
        let offer_wscale = syn && self.wscale_ok;
        // RFC 7323 §3.2: TSecr echoes TS.Recent once the peer's TSval is known (a
        // SYN of an active open has none yet).
        let timestamp = self.ts_ok.then(|| TcpTimestampRepr {
            tsval: match self.syn_ts_bits {
                Some(bits) if syn => (self.ts_now(cx.now) & !0x3f) | bits,
                _ => self.ts_now(cx.now),
            },
            tsecr: if matches!(self.state, State::SynSent(_)) { 0 } else { self.ts_recent },
        });
        let sack_ranges = if flags.ack && !syn && !flags.rst { self.sack_blocks() } else { [None; 3] };
        let repr = TcpRepr {
            src_port: self.ends.local_port,
            dst_port: self.ends.remote_port,
            control,
            seq_number: seq.into(),
            ack_number: flags.ack.then_some(self.rcv_nxt.into()),
            window_len: window,
            window_scale: offer_wscale.then_some(self.rcv_wscale),
            max_seg_size: syn.then_some(cx.cfg.mss() as u16),
            sack_permitted: syn && self.sack_ok,
            sack_ranges,
            timestamp,
            payload: &[],
        };
        push_segment(cx, self.ends, &repr, payload, flags.tso);
        if flags.ack {
            self.ack_now = false;
            self.delack_at = None;
            self.unacked_segs = 0;
            self.last_ack_sent = self.rcv_nxt;
        }
    }

    /// Our TSval: a millisecond clock with a per-connection offset.
    pub(super) fn ts_now(&self, now: Instant) -> u32 {
        (now.total_millis() as u32).wrapping_add(self.ts_offset)
    }

    /// The SACK option's blocks (RFC 2018 §4): the range holding the latest
    /// out-of-order arrival first, then those of the arrivals before it, then the
    /// highest others.
    pub(super) fn sack_blocks(&self) -> [Option<(u32, u32)>; 3] {
        let mut out = [None; 3];
        if !self.sack_ok || self.ooo.is_empty() {
            return out;
        }
        let ranges: Vec<(Seq, Seq)> = self.ooo.ranges().collect();
        let recent =
            self.sack_recent.iter().flatten().filter_map(|s| ranges.iter().find(|(a, e)| a.le(*s) && s.lt(*e)));
        let mut n = 0;
        for &(a, e) in recent.chain(ranges.iter().rev()) {
            let block = Some((a.0, e.0));
            if n < out.len() && !out[..n].contains(&block) {
                out[n] = block;
                n += 1;
            }
        }
        out
    }

    /// The payload a data segment may carry now: the agreed MSS less the options
    /// it will carry (RFC 6691).
    pub(super) fn seg_cap(&self) -> usize {
        let blocks = self.sack_blocks().iter().flatten().count();
        self.mss_base.saturating_sub(options_len(self.ts_ok, blocks)).max(1)
    }

    /// Sends our SYN (active) or SYN-ACK (passive/simultaneous).
    pub(super) fn send_syn(&mut self, cx: &mut Cx, now: Instant) {
        let ack = matches!(self.state, State::SynRcvd(_));
        self.emit(cx, self.iss, Flags { syn: true, ack, ..Flags::default() }, None);
        if self.rtt_timing.is_none() && self.retries == 0 {
            self.rtt_timing = Some((self.iss.plus(1), now));
        }
        self.rto_at = Some(now + self.rtt.rto());
    }

    pub(super) fn send_ack(&mut self, cx: &mut Cx) {
        self.emit(cx, self.snd_nxt, Flags { ack: true, ..Flags::default() }, None);
    }

    /// RFC 5961 §3.2/§4.2: a challenge ACK, rate-limited (§7).
    pub(super) fn challenge_ack(&mut self, cx: &mut Cx, now: Instant) {
        let fresh = self.last_challenge.is_none_or(|t| micros_between(now, t) >= Duration::from_secs(1));
        if fresh {
            self.last_challenge = Some(now);
            self.challenges = 0;
        }
        if self.challenges < CHALLENGE_ACKS_PER_SEC {
            self.challenges += 1;
            cx.stats.challenge_acks += 1;
            self.send_ack(cx);
        }
    }

    /// A probe the peer must answer with an ACK: one byte below `snd_una`
    /// (keepalive, and the persist timer's zero-window probe).
    pub(super) fn send_probe(&mut self, cx: &mut Cx) {
        self.emit(cx, self.snd_una.minus(1), Flags { ack: true, ..Flags::default() }, None);
    }

    /// Sends what the windows, Nagle and SWS avoidance allow, then a pending ACK.
    pub fn output(&mut self, cx: &mut Cx, now: Instant) {
        match self.state {
            State::SynSent(_) | State::Closed(_) => return,
            State::SynRcvd(_) => {
                if self.ack_now {
                    self.ack_now = false;
                    self.send_syn(cx, now);
                }
                return;
            }
            State::Established | State::CloseWait | State::FinWait1 | State::Closing | State::LastAck => {
                self.send_data(cx, now, false)
            }
            State::FinWait2 | State::TimeWait(_) => {}
        }
        if self.ack_now {
            self.send_ack(cx);
        }
    }

    pub(super) fn fin_pending(&self) -> bool {
        self.fin_queued && self.fin_seq.is_none_or(|f| self.snd_nxt.le(f))
    }

    /// Bytes in the network by the sender's count: sent, not acknowledged and
    /// not SACKed (RFC 6675's pipe outside recovery).
    pub(super) fn flight(&self) -> usize {
        self.snd_nxt.since(self.snd_una) - self.sb.sacked_between(self.snd_una, self.snd_nxt)
    }

    pub(super) fn in_sack_recovery(&self) -> bool {
        self.sack_ok && self.recover.is_some()
    }

    pub(super) fn send_data(&mut self, cx: &mut Cx, now: Instant, force: bool) {
        if self.in_sack_recovery() {
            return self.sack_recovery_send(cx, now);
        }
        let mut force = force;
        loop {
            // After a timeout, going back N skips what the peer SACKed.
            while self.snd_nxt.lt(self.snd_max) {
                match self.sb.sacked_until(self.snd_nxt) {
                    Some(end) => self.snd_nxt = end,
                    None => break,
                }
            }
            let cwnd_room = (self.cc.cwnd() + self.inflate).saturating_sub(self.flight());
            if !self.send_one(cx, now, cwnd_room, force) {
                break;
            }
            force = false;
        }
        // RFC 9293 §3.8.6.1: data waits on a closed window; the persist timer probes.
        let off = self.snd_nxt.since(self.buf_seq);
        let waiting = self.snd_buf.len() > off;
        if waiting && self.snd_nxt == self.snd_una && self.persist_at.is_none() {
            self.persist_at = Some(now + self.persist_interval());
        } else if !waiting || self.snd_nxt != self.snd_una {
            self.persist_at = None;
            if !self.orphan {
                self.persist_backoff = 0;
            }
        }
    }

    /// Sends one segment at `snd_nxt` of at most `budget` bytes (and the peer's
    /// window), if Nagle and SWS avoidance allow; `force` sends at least a byte
    /// (the persist timer's probe, a timeout's retransmission). Returns whether
    /// to go on.
    pub(super) fn send_one(&mut self, cx: &mut Cx, now: Instant, budget: usize, force: bool) -> bool {
        let off = self.snd_nxt.since(self.buf_seq);
        let unsent = self.snd_buf.len().saturating_sub(off);
        let rwnd_room = self.snd_una.plus(self.snd_wnd).diff(self.snd_nxt).max(0) as usize;
        let seg = self.seg_cap();
        // With TSO, up to `cfg.tso` bytes in whole segments go as one.
        let cap = if cx.cfg.tso > seg { cx.cfg.tso / seg * seg } else { seg };
        let mut len = unsent.min(budget).min(rwnd_room).min(cap);
        if self.snd_nxt.lt(self.snd_max) {
            // Never resend what the peer holds.
            if let Some(n) = self.sb.next_sacked_after(self.snd_nxt) {
                len = len.min(n.since(self.snd_nxt));
            }
        }
        if force && len == 0 && unsent > 0 {
            len = 1;
        }
        // RFC 9293 §3.8.6.2.1 (sender SWS avoidance) with Nagle (RFC 896,
        // §3.7.4): a full segment, everything queued when nothing is in flight
        // (or NODELAY), or half the largest window the peer offered. A TSO segment
        // carries a short tail only when that tail could go alone.
        let nagle_ok = self.nodelay || self.snd_nxt == self.snd_una;
        if len > seg && !(len == unsent && nagle_ok) {
            len -= len % seg;
        }
        let fin = self.fin_pending() && off + len == self.snd_buf.len();
        if len == 0 && !fin {
            return false;
        }
        let sendable = force
            || len >= seg
            || fin
            || (len == unsent && nagle_ok)
            || (len > 0 && len >= self.max_snd_wnd / 2 && nagle_ok);
        if !sendable {
            return false;
        }
        let seq = self.snd_nxt;
        let retransmission = seq.lt(self.snd_max);
        let tso = (len > seg).then_some(seg as u16);
        let flags = Flags { ack: true, fin, psh: off + len == self.snd_buf.len(), tso, ..Flags::default() };
        self.emit(cx, seq, flags, (len > 0).then_some((off, len)));
        if retransmission {
            self.rexmit_tsval = self.ts_now(now);
            self.retransmits += 1;
            cx.stats.retransmits += 1;
        }
        self.snd_nxt = seq.plus(len + usize::from(fin));
        if fin {
            self.fin_seq = Some(seq.plus(len));
        }
        if self.snd_nxt.gt(self.snd_max) {
            self.snd_max = self.snd_nxt;
        }
        if !retransmission && self.rtt_timing.is_none() {
            self.rtt_timing = Some((self.snd_nxt, now));
        }
        if self.rto_at.is_none() {
            self.rto_at = Some(now + self.rtt.rto());
        }
        cx.stats.data_segments_out += u64::from(len > 0);
        !fin
    }

    /// RFC 6675 §4's pipe in recovery: un-SACKed bytes not yet deemed lost, plus
    /// those retransmitted (below HighRxt).
    pub(super) fn pipe(&self, lost: Seq) -> usize {
        self.sb.unsacked_between(lost.max(self.snd_una), self.snd_max)
            + self.sb.unsacked_between(self.snd_una, self.high_rxt)
    }

    /// RFC 6675 §5 (C): while cwnd − pipe ≥ 1 SMSS, send what NextSeg() picks.
    pub(super) fn sack_recovery_send(&mut self, cx: &mut Cx, now: Instant) {
        loop {
            let lost = self.sb.lost_below(self.snd_una, self.mss);
            let pipe = self.pipe(lost);
            let cwnd = self.cc.cwnd();
            if pipe + self.mss > cwnd {
                return;
            }
            let from = self.high_rxt.max(self.snd_una);
            // NextSeg (1): the first lost hole above HighRxt.
            if let Some((s, n)) = self.sb.hole(from, lost) {
                if self.retransmit_hole(cx, s, n) {
                    continue;
                }
                return;
            }
            // (2): new data, as the windows allow.
            self.snd_nxt = self.snd_max;
            if self.send_one(cx, now, cwnd - pipe, false) {
                continue;
            }
            // (3): a hole below the highest SACKed byte, not yet deemed lost.
            let hole = self.sb.highest().and_then(|h| self.sb.hole(from, h));
            match hole {
                Some((s, n)) if self.retransmit_hole(cx, s, n) => continue,
                _ => return,
            }
        }
    }

    /// Retransmits the start of the hole `[s, s + n)`; moves HighRxt past it.
    pub(super) fn retransmit_hole(&mut self, cx: &mut Cx, s: Seq, n: usize) -> bool {
        let sent = self.retransmit(cx, s, n);
        self.high_rxt = s.plus(sent);
        sent > 0
    }

    pub(super) fn persist_interval(&self) -> Duration {
        let base = self.rtt.rto().total_micros().saturating_mul(1 << self.persist_backoff.min(10));
        Duration::from_micros(base).min(Duration::from_secs(60))
    }

    /// Retransmits one segment of at most `max` sequence numbers from `seq` (fast
    /// retransmit, a partial ACK, a SACK hole). Returns the sequence space it
    /// covered.
    pub(super) fn retransmit(&mut self, cx: &mut Cx, seq: Seq, max: usize) -> usize {
        let off = seq.since(self.buf_seq);
        let len = self.snd_buf.len().saturating_sub(off).min(self.seg_cap()).min(max);
        let fin = self.fin_seq.is_some_and(|f| seq.plus(len) == f) && len < max;
        if len == 0 && !fin {
            return 0;
        }
        let flags = Flags { ack: true, fin, ..Flags::default() };
        self.emit(cx, seq, flags, (len > 0).then_some((off, len)));
        self.rtt_timing = None; // Karn
        self.rexmit_tsval = self.ts_now(cx.now);
        self.retransmits += 1;
        cx.stats.retransmits += 1;
        len + usize::from(fin)
    }

    /// The window we can offer: buffer space not holding unread data, within
    /// what the memory budget leaves.
    pub(super) fn rcv_space(&self) -> usize {
        // At most half of what the budget leaves, so that a few connections'
        // windows cannot take all of it; and the floor whatever the others hold.
        let left = self.room.saturating_sub(self.snd_buf.len() + self.rcv_buf.len()) / 2;
        let budget = left.max(crate::MEMORY_FLOOR.saturating_sub(self.rcv_buf.len()));
        self.rcv_cap.saturating_sub(self.rcv_buf.len()).min(budget)
    }

    /// What a send may queue with `room` of budget: the send buffer's room,
    /// within the budget left, and the floor whatever the others hold.
    pub fn send_room(&self, room: usize) -> usize {
        let budget = room.saturating_sub(self.held()).max(crate::MEMORY_FLOOR.saturating_sub(self.snd_buf.len()));
        self.snd_cap.saturating_sub(self.snd_buf.len()).min(budget)
    }

    /// Whether the memory budget, not the receive buffer, holds this
    /// connection's window shut (so it wants a window update when memory frees).
    pub fn window_starved(&self) -> bool {
        let buffer = self.rcv_cap.saturating_sub(self.rcv_buf.len());
        self.synchronized() && self.rcv_space() < buffer && self.rcv_adv.since(self.rcv_nxt) < buffer / 2
    }

    /// Room to receive came free (the application read, or memory freed
    /// elsewhere): a window update once the advertised window fell below half
    /// the buffer and its edge can move by the SWS step (RFC 9293 §3.8.6.2.2).
    pub fn reopen(&mut self, cx: &mut Cx, now: Instant) {
        let edge = self.rcv_nxt.plus(self.rcv_space());
        let (step, open) = ((self.rcv_cap / 2).min(self.mss), self.rcv_adv.since(self.rcv_nxt));
        if self.synchronized() && open < self.rcv_cap / 2 && edge.since(self.rcv_adv) >= step {
            self.ack_now = true;
            self.output(cx, now);
        }
    }

    /// Bytes held against the memory budget: queued to send, received and
    /// unread, and the window offered (what the peer may send us: data ahead of
    /// a hole lies inside it). Counting the window, not only what arrived, keeps
    /// the windows of all connections within the budget, so no data inside a
    /// window offered is ever dropped for want of memory.
    pub fn held(&self) -> usize {
        // After the peer's FIN nothing more can arrive: the window it was
        // offered is no longer a promise (a TIME-WAIT holds only itself).
        let window = if self.fin_rcvd || self.rcv_adv.lt(self.rcv_nxt) { 0 } else { self.rcv_adv.since(self.rcv_nxt) };
        self.snd_buf.len() + self.rcv_buf.len() + window
    }

    /// The window field for a non-SYN segment. RFC 9293 §3.8.6.2.2 (receiver SWS
    /// avoidance): the right edge moves only by min(buffer/2, MSS) or more, and
    /// never left.
    pub(super) fn advertise(&mut self) -> u16 {
        let edge = self.rcv_nxt.plus(self.rcv_space());
        let step = (self.rcv_cap / 2).min(self.mss);
        if edge.since(self.rcv_adv) >= step || self.rcv_adv.lt(self.rcv_nxt) {
            self.rcv_adv = edge.max(self.rcv_adv);
        }
        let wnd = self.rcv_adv.since(self.rcv_nxt);
        // Round up: rounding down would shrink the edge by up to 2^scale - 1.
        let scaled = wnd.div_ceil(1 << self.rcv_wscale).min(65535);
        self.rcv_adv = self.rcv_adv.max(self.rcv_nxt.plus(scaled << self.rcv_wscale));
        scaled as u16
    }
}
