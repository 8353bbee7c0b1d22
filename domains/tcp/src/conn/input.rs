//! A connection's segment arrival, in the order RFC 9293 §3.10.7 writes it:
//! SYN-SENT, then the synchronized states' shared path (acceptability, RST,
//! SYN, ACK, data, FIN), the ACK's processing and the data's.

use super::*;

impl Conn {
    /// A segment for this connection (RFC 9293 §3.10.7.3–4).
    pub fn on_segment(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> Disposition {
        if let Some(k) = self.keepalive {
            self.keep_probes = 0;
            self.keepalive_at = Some(now + k.idle);
        }
        let d = match self.state {
            State::SynSent(_) => self.on_syn_sent(cx, now, seg),
            State::Closed(_) => Disposition::Keep,
            _ => self.on_synchronized(cx, now, seg),
        };
        if d != Disposition::Closed {
            self.output(cx, now);
        }
        d
    }

    /// RFC 9293 §3.10.7.3: SYN-SENT.
    pub(super) fn on_syn_sent(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> Disposition {
        // First: the ACK must acknowledge our SYN.
        if let Some(ack) = seg.ack {
            if ack.le(self.iss) || ack.gt(self.snd_max) {
                if !seg.rst {
                    reset_for(cx, self.ends, seg);
                }
                cx.stats.drop(DropReason::Unacceptable);
                return Disposition::Keep;
            }
        }
        // Second: RST. Acceptable only with an acceptable ACK: refused.
        if seg.rst {
            if seg.ack.is_some() {
                cx.stats.resets_in += 1;
                return self.close_with(Some(TcpError::ConnectionRefused));
            }
            cx.stats.drop(DropReason::Unacceptable);
            return Disposition::Keep;
        }
        if !seg.syn {
            cx.stats.drop(DropReason::Unacceptable);
            return Disposition::Keep;
        }
        self.take_syn(seg, now);
        match seg.ack {
            Some(ack) => {
                self.snd_una = ack;
                if let Some((end, at)) = self.rtt_timing.take() {
                    if ack.ge(end) {
                        self.rtt.sample(micros_between(now, at));
                    }
                }
                self.retries = 0;
                self.rto_at = None;
                self.state = State::Established;
                // RFC 9293: SND.WL1 <- SEG.SEQ, SND.WL2 <- SEG.ACK; the window of a
                // SYN-ACK is not scaled.
                self.snd_wl2 = ack;
                self.ack_now = true;
                cx.stats.active_opens += 1;
                Disposition::Established
            }
            None => {
                // Simultaneous open: SYN-RECEIVED, SYN-ACK with the same ISS.
                self.state = State::SynRcvd(SynRcvd { passive: false });
                self.send_syn(cx, now);
                Disposition::Keep
            }
        }
    }

    pub(super) fn acceptable(&self, seg: &Segment) -> bool {
        // RFC 9293 §3.10.7.4, first check: the four cases.
        let wnd = self.rcv_adv.since(self.rcv_nxt);
        let in_window = |s: Seq| self.rcv_nxt.le(s) && s.lt(self.rcv_nxt.plus(wnd));
        match (seg.len(), wnd) {
            (0, 0) => seg.seq == self.rcv_nxt,
            (0, _) => in_window(seg.seq),
            (_, 0) => false,
            (n, _) => in_window(seg.seq) || in_window(seg.seq.plus(n - 1)),
        }
    }

    /// RFC 9293 §3.10.7.4: SYN-RECEIVED and the synchronized states.
    pub(super) fn on_synchronized(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> Disposition {
        let trimmed;
        let mut seg = seg;
        if let State::SynRcvd(_) = self.state {
            if seg.syn && seg.seq == self.irs && !seg.rst {
                if seg.ack.is_none() {
                    // The peer's SYN again: our SYN-ACK was lost.
                    self.ack_now = true;
                    return Disposition::Keep;
                }
                // Simultaneous open: the peer's SYN-ACK. Its SYN is old news; what
                // is left (RFC 9293 §3.10.7.4: trim to the window) is its ACK.
                trimmed = Segment { syn: false, seq: seg.seq.plus(1), ..seg.clone() };
                seg = &trimmed;
            }
        }
        // RFC 7323 §5.3 R1 (PAWS): a TSval older than TS.Recent marks an old
        // duplicate; it is answered with an ACK and dropped.
        if let Some((tsval, _)) = seg.timestamp.filter(|_| self.ts_ok && !seg.rst) {
            let valid = micros_between(now, self.ts_recent_at) < PAWS_IDLE;
            if valid && (tsval.wrapping_sub(self.ts_recent) as i32) < 0 {
                cx.stats.drop(DropReason::Paws);
                self.ack_now = true;
                return Disposition::Keep;
            }
        }
        if !self.acceptable(seg) {
            if seg.rst {
                cx.stats.drop(DropReason::Unacceptable);
                return Disposition::Keep;
            }
            // A zero window still takes valid ACKs (RFC 9293: "special allowance").
            let zero_window_ack =
                self.rcv_adv == self.rcv_nxt && seg.seq == self.rcv_nxt && seg.ack.is_some() && !seg.syn;
            if zero_window_ack && self.synchronized() {
                self.process_ack(cx, now, seg);
            } else {
                cx.stats.drop(DropReason::Unacceptable);
            }
            if let State::TimeWait(_) = self.state {
                if seg.fin {
                    // RFC 9293: a retransmitted FIN restarts the 2·MSL timer.
                    self.state = State::TimeWait(TimeWait { until: now + cx.cfg.msl * 2 });
                }
                self.send_ack(cx);
                return Disposition::Keep;
            }
            self.ack_now = true;
            return Disposition::Keep;
        }
        // RFC 7323 §4.3 (R3): TS.Recent follows the segment that the last ACK
        // we sent asked for.
        if let Some((tsval, _)) = seg.timestamp.filter(|_| self.ts_ok) {
            if seg.seq.le(self.last_ack_sent) && (tsval.wrapping_sub(self.ts_recent) as i32) >= 0 {
                self.ts_recent = tsval;
                self.ts_recent_at = now;
            }
        }
        // Second: RST (RFC 5961 §3.2: only the exact next sequence number resets;
        // anywhere else in the window draws a challenge ACK).
        if seg.rst {
            if seg.seq != self.rcv_nxt {
                self.challenge_ack(cx, now);
                return Disposition::Keep;
            }
            cx.stats.resets_in += 1;
            let error = match self.state {
                State::SynRcvd(SynRcvd { passive: false }) => Some(TcpError::ConnectionRefused),
                State::SynRcvd(_) => None,
                State::Closing | State::LastAck | State::TimeWait(_) => None,
                _ => Some(TcpError::ConnectionReset),
            };
            return self.close_with(error);
        }
        // Fourth: SYN in a synchronized state (RFC 5961 §4.2: challenge ACK).
        if seg.syn {
            self.challenge_ack(cx, now);
            return Disposition::Keep;
        }
        // Fifth: the ACK field.
        let Some(ack) = seg.ack else {
            cx.stats.drop(DropReason::NoAck);
            return Disposition::Keep;
        };
        let mut disposition = Disposition::Keep;
        if let State::SynRcvd(_) = self.state {
            if !(self.snd_una.lt(ack) && ack.le(self.snd_max)) {
                reset_for(cx, self.ends, seg);
                return Disposition::Keep;
            }
            self.state = State::Established;
            // The handshake's window update: SND.WND <- SEG.WND (scaled now).
            self.snd_wl1 = seg.seq.minus(1);
            disposition = Disposition::Established;
            cx.stats.passive_opens += 1;
            if self.fin_queued {
                self.state = State::FinWait1;
            }
        }
        if !self.process_ack(cx, now, seg) {
            return disposition;
        }
        let fin_acked = self.fin_seq.is_some_and(|f| self.snd_una.gt(f));
        match self.state {
            State::FinWait1 if fin_acked => {
                self.state = State::FinWait2;
                if self.orphan {
                    self.fin_wait_at = Some(now + cx.cfg.msl * 2);
                }
            }
            State::Closing if fin_acked => self.enter_time_wait(cx, now),
            State::LastAck if fin_acked => return self.close_with(None),
            _ => {}
        }
        // Seventh: segment text, in the states that still receive.
        let receiving = matches!(self.state, State::Established | State::FinWait1 | State::FinWait2);
        if receiving && !seg.payload.is_empty() && self.orphan {
            // RFC 9293 §3.10.4 / RFC 2525: data for a closed socket is lost; say so.
            self.send_rst(cx);
            return self.close_with(None);
        }
        if receiving && (!seg.payload.is_empty() || seg.fin) {
            let fin = self.take_data(cx, now, seg);
            // Eighth: FIN, once everything before it arrived.
            if fin {
                self.rcv_nxt = self.rcv_nxt.plus(1);
                self.fin_rcvd = true;
                self.ack_now = true;
                match self.state {
                    State::Established => self.state = State::CloseWait,
                    State::FinWait1 => {
                        if self.fin_seq.is_some_and(|f| self.snd_una.gt(f)) {
                            self.enter_time_wait(cx, now);
                        } else {
                            self.state = State::Closing;
                        }
                    }
                    State::FinWait2 => self.enter_time_wait(cx, now),
                    _ => {}
                }
            }
        }
        disposition
    }

    pub(super) fn enter_time_wait(&mut self, cx: &mut Cx, now: Instant) {
        self.state = State::TimeWait(TimeWait { until: now + cx.cfg.msl * 2 });
        self.rto_at = None;
        self.persist_at = None;
        self.keepalive_at = None;
        self.fin_wait_at = None;
    }

    /// RFC 9293 §3.10.7.4, fifth check, for the synchronized states. Returns false
    /// when the segment is to be dropped (it acknowledged something never sent).
    pub(super) fn process_ack(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> bool {
        let Some(ack) = seg.ack else { return false };
        if ack.gt(self.snd_max) {
            self.ack_now = true;
            cx.stats.drop(DropReason::AckUnsent);
            return false;
        }
        if ack.lt(self.snd_una) {
            return true; // an old duplicate: ignore the ACK, keep the text
        }
        let wnd = usize::from(seg.window) << self.snd_wscale;
        let old_wnd = self.snd_wnd;
        // Window update rule: SND.WL1 < SEG.SEQ, or equal and SND.WL2 =< SEG.ACK.
        if self.snd_wl1.lt(seg.seq) || (self.snd_wl1 == seg.seq && self.snd_wl2.le(ack)) {
            self.snd_wnd = wnd;
            self.snd_wl1 = seg.seq;
            self.snd_wl2 = ack;
            self.max_snd_wnd = self.max_snd_wnd.max(wnd);
        }
        let acked = ack.since(self.snd_una);
        if acked > 0 {
            let data = ack.since(self.buf_seq).min(self.snd_buf.len());
            self.snd_buf.advance(data);
            self.buf_seq = self.buf_seq.plus(data);
            self.snd_una = ack;
            if self.snd_nxt.lt(ack) {
                self.snd_nxt = ack;
            }
            self.sb.acked(ack);
        }
        // RFC 2018 §3 / RFC 6675: the scoreboard takes the SACK blocks.
        let mut newly_sacked = 0;
        if self.sack_ok {
            for &(l, r) in seg.sack.iter().flatten() {
                self.sack_blocks_in += 1;
                newly_sacked += self.sb.add(Seq(l), Seq(r), self.snd_una, self.snd_max);
            }
        }
        if acked > 0 {
            self.take_rtt_sample(now, ack, seg);
            self.retries = 0;
            let flight = self.snd_max.since(self.snd_una);
            match self.recover {
                // RFC 6582 §3.2 (5), without SACK: a partial ACK retransmits the
                // next hole and deflates the window by what it acknowledged. With
                // SACK the scoreboard picks what to send (RFC 6675 §5 (C)).
                Some(rec) if ack.lt(rec) => {
                    if !self.sack_ok {
                        self.retransmit(cx, self.snd_una, self.seg_cap() + 1);
                        let deflate = if acked >= self.mss { self.mss } else { 0 };
                        self.inflate = (self.inflate + deflate).saturating_sub(acked);
                    }
                }
                // (3) / RFC 6675 §5: a full ACK ends recovery.
                Some(_) => {
                    self.recover = None;
                    self.inflate = 0;
                    self.cc.on_recovered(flight, self.mss);
                }
                None => {
                    let srtt = self.rtt.srtt().unwrap_or(self.rtt.rto());
                    self.cc.on_ack(&Ack { acked, mss: self.mss, now, srtt });
                }
            }
            self.dupacks = 0;
            // RFC 6298 §5.2–5.3: stop the timer when all is acknowledged, else restart it.
            self.rto_at = (self.snd_una != self.snd_max).then(|| now + self.rtt.rto());
        } else if self.snd_una != self.snd_max {
            // RFC 5681 §2's duplicate ACK; with SACK, RFC 6675 §2: one that SACKs
            // something new.
            let dup =
                if self.sack_ok { newly_sacked > 0 } else { seg.payload.is_empty() && !seg.fin && wnd == old_wnd };
            if dup {
                self.dupacks += 1;
                if self.recover.is_some() && !self.sack_ok {
                    // RFC 6582 §3.2 (4): each further duplicate inflates the window.
                    self.inflate += self.mss;
                }
            }
        }
        // RFC 5681 §3.2 / RFC 6582 §3.2 (2) / RFC 6675 §5 (4): fast retransmit
        // after DupThresh duplicates, or when SACKs show the first byte lost; not
        // again for losses of a window already reduced for (`last_recover`).
        let sack_lost = self.sack_ok && self.sb.lost_below(self.snd_una, self.mss).gt(self.snd_una);
        if self.recover.is_none()
            && self.snd_una != self.snd_max
            && self.snd_una.gt(self.last_recover)
            && (self.dupacks as usize >= crate::sack::DUP_THRESH || sack_lost)
        {
            let flight = self.snd_max.since(self.snd_una);
            self.cc.on_loss(now, flight, self.mss);
            self.recover = Some(self.snd_max);
            self.last_recover = self.snd_max;
            cx.stats.fast_retransmits += 1;
            if self.sack_ok {
                // (4.3): the first hole goes at once; NextSeg() does the rest.
                self.high_rxt = self.snd_una;
                let n = self.sb.hole(self.snd_una, self.snd_max).map_or(0, |h| h.1);
                self.retransmit_hole(cx, self.snd_una, n);
            } else {
                self.inflate = 3 * self.mss;
                self.retransmit(cx, self.snd_una, self.seg_cap() + 1);
            }
        }
        // A window that opened ends the backoff — for a closed connection only
        // one that opened by a segment (a dripping window is no progress).
        if self.snd_wnd > old_wnd && (!self.orphan || self.snd_wnd >= self.mss) {
            self.persist_backoff = 0;
        }
        true
    }

    /// RFC 6298 RTT measurement: the timed segment, if this ACK covers it
    /// (microseconds, Karn's rule); else, with timestamps, TSecr once per window
    /// (RFC 7323 §4: valid across retransmissions too).
    pub(super) fn take_rtt_sample(&mut self, now: Instant, ack: Seq, seg: &Segment) {
        if let Some((end, at)) = self.rtt_timing {
            if ack.ge(end) {
                self.rtt.sample(micros_between(now, at));
                self.rtt_timing = None;
                self.ts_rtt_mark = self.snd_max;
                return;
            }
        }
        let Some((_, tsecr)) = seg.timestamp.filter(|_| self.ts_ok) else { return };
        let after_rexmit = tsecr.wrapping_sub(self.rexmit_tsval) as i32 >= 0;
        if tsecr != 0 && after_rexmit && self.rtt_timing.is_none() && ack.gt(self.ts_rtt_mark) {
            let ms = self.ts_now(now).wrapping_sub(tsecr);
            if ms < 1 << 30 {
                self.rtt.sample(Duration::from_millis(u64::from(ms)));
            }
            self.ts_rtt_mark = self.snd_max;
        }
    }

    /// Takes the segment's text (and notes its FIN) into the receive buffer or the
    /// out-of-order queue. Returns whether a FIN is now next in sequence.
    pub(super) fn take_data(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> bool {
        let mut seq = seg.seq;
        let mut data = seg.payload.clone();
        let mut fin = seg.fin;
        // Trim what was received already.
        if seq.lt(self.rcv_nxt) {
            let skip = self.rcv_nxt.since(seq);
            if skip > data.len() {
                return false;
            }
            data = data.range(skip, data.len() - skip);
            seq = self.rcv_nxt;
        }
        // Trim what lies beyond the window (a trimmed FIN is not received).
        let room = self.rcv_adv.since(seq);
        if data.len() > room {
            data = data.range(0, room);
            fin = false;
        }
        // Past the loan quota the bytes are copied and the lender's buffer
        // goes back at once (DESIGN: a borrower holds at most a quota).
        if data.loans() > 0 && self.loans() + data.loans() > self.loan_room {
            data.privatize();
            cx.stats.loans_copied += 1;
        }

        if seq != self.rcv_nxt {
            // Ahead of a hole: hold it, and say at once what is missing.
            if self.ooo.insert(seq, &data, fin, self.rcv_adv.since(self.rcv_nxt)) {
                self.sack_recent.rotate_right(1);
                self.sack_recent[0] = Some(seq);
            } else {
                cx.stats.drop(DropReason::OutOfOrderFull);
            }
            self.ack_now = true;
            return false;
        }
        if self.rd_shut {
            // Shut down for reading: acknowledged and discarded.
            self.rcv_nxt = self.rcv_nxt.plus(data.len());
        } else {
            self.rcv_nxt = self.rcv_nxt.plus(data.len());
            self.rcv_buf.append(data.clone());
        }
        let filled = !self.ooo.is_empty();
        let (nxt, ooo_fin) = self.ooo.drain_into(self.rcv_nxt, &mut self.rcv_buf);
        self.rcv_nxt = nxt;
        cx.stats.bytes_in += data.len() as u64;
        // RFC 9293 §3.8.6.3 / RFC 5681 §4.2: ACK at least every second full-sized
        // segment, at once when a hole fills, else within the delayed-ACK time.
        self.unacked_segs += data.len().div_ceil(self.mss.max(1)) as u32;
        if filled || self.unacked_segs >= 2 || !self.delayed_ack {
            self.ack_now = true;
        } else if self.delack_at.is_none() {
            self.delack_at = Some(now + cx.cfg.delayed_ack);
        }
        fin || ooo_fin
    }

    pub(super) fn send_rst(&mut self, cx: &mut Cx) {
        self.emit(cx, self.snd_nxt, Flags { rst: true, ack: true, ..Flags::default() }, None);
        cx.stats.resets_out += 1;
    }
}
