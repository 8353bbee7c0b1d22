//! One connection: its state and the rules of RFC 9293 §3.10 for segments,
//! calls and timers.
//!
//! The states that carry data of their own are types ([`SynSent`], [`SynRcvd`],
//! [`TimeWait`], [`Closed`]); the synchronized states share one segment-arrival
//! path, in the order RFC 9293 §3.10.7.4 writes it, and differ only where the RFC
//! says they do (what an ACK of our FIN or a FIN of the peer's moves them to).
//! Every handler returns a [`Disposition`]; segments to send go to the core's
//! output queue. Nothing here reads a clock: `now` comes in.

mod input;
mod output;

use std::collections::VecDeque;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Address, TcpControl, TcpPacket, TcpRepr, TcpTimestampRepr};

use crate::cc::{Ack, Algorithm, CongestionControl};
use capnet_ipc::lent::{Chain, Checksum, Lent};

use crate::rtt::RttEstimator;
use crate::rx::OutOfOrder;
use crate::sack::Scoreboard;
use crate::seq::Seq;
use crate::{Config, DropReason, Keepalive, Output, Stats, TcpError};

/// A parsed segment: its header copied out, its payload a handle on the
/// datagram's buffer.
#[derive(Debug, Clone)]
pub(crate) struct Segment {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: Seq,
    pub ack: Option<Seq>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub window: u16,
    pub mss: Option<u16>,
    pub wscale: Option<u8>,
    pub sack_permitted: bool,
    pub sack: [Option<(u32, u32)>; 3],
    /// (TSval, TSecr) of RFC 7323's Timestamps option.
    pub timestamp: Option<(u32, u32)>,
    pub payload: Chain,
}

impl Segment {
    /// Parses a segment from `src` to `dst`, checksum-checked unless the device
    /// vouched for it (`vouched`: TAP checksum offload). The header is copied
    /// out before it is parsed; the checksum reads the payload where it lies.
    pub fn parse(src: Ipv4Address, dst: Ipv4Address, bytes: &Chain, vouched: bool) -> Result<Self, DropReason> {
        let mut hdr = [0u8; 60];
        let got = bytes.peek(0, &mut hdr[..20]);
        if got < 20 {
            return Err(DropReason::Malformed);
        }
        let hlen = usize::from(hdr[12] >> 4) * 4;
        if hlen < 20 || hlen > bytes.len() {
            return Err(DropReason::Malformed);
        }
        bytes.peek(20, &mut hdr[20..hlen]);
        let packet = TcpPacket::new_checked(&hdr[..hlen]).map_err(|_| DropReason::Malformed)?;
        let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
        let payload = bytes.range(hlen, bytes.len() - hlen);
        if !vouched {
            let mut sum = Checksum::default();
            let len = (bytes.len() as u16).to_be_bytes();
            sum.add(&src.octets());
            sum.add(&dst.octets());
            sum.add(&[0, 6, len[0], len[1]]);
            sum.add(&hdr[..hlen]);
            payload.sum_into(&mut sum);
            if bytes.len() > usize::from(u16::MAX) || sum.fold() != 0xffff {
                return Err(DropReason::BadChecksum);
            }
        }
        let caps = ChecksumCapabilities::ignored();
        let repr = TcpRepr::parse(&packet, &s, &d, &caps).map_err(|_| DropReason::Malformed)?;
        Ok(Segment {
            src_port: repr.src_port,
            dst_port: repr.dst_port,
            seq: repr.seq_number.into(),
            ack: repr.ack_number.map(Seq::from),
            syn: repr.control == TcpControl::Syn,
            fin: repr.control == TcpControl::Fin,
            rst: repr.control == TcpControl::Rst,
            window: repr.window_len,
            mss: repr.max_seg_size,
            wscale: repr.window_scale,
            sack_permitted: repr.sack_permitted,
            sack: repr.sack_ranges,
            timestamp: repr.timestamp.map(|t| (t.tsval, t.tsecr)),
            payload,
        })
    }

    /// Its length in sequence space (RFC 9293 §3.4: SEG.LEN counts SYN and FIN).
    pub fn len(&self) -> usize {
        self.payload.len() + usize::from(self.syn) + usize::from(self.fin)
    }
}

/// The four numbers naming a connection (our address is the stack's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoints {
    /// Our port.
    pub local_port: u16,
    /// The peer's address.
    pub remote: Ipv4Address,
    /// The peer's port.
    pub remote_port: u16,
}

/// What the core must do with a connection after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Nothing.
    Keep,
    /// The handshake completed (a passive connection joins its listener's accept
    /// queue).
    Established,
    /// The connection is over: its endpoints are free again.
    Closed,
}

/// SYN-SENT: our SYN is out (active open).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SynSent;

/// SYN-RECEIVED: the peer's SYN arrived, ours is out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SynRcvd {
    /// Passive open (from a listener) or simultaneous open.
    pub passive: bool,
}

/// TIME-WAIT: both FINs are acknowledged; 2·MSL keeps old duplicates out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TimeWait {
    pub until: Instant,
}

/// CLOSED, with the reason the application will be told.
#[derive(Debug, Clone)]
pub(crate) struct Closed {
    pub error: Option<TcpError>,
}

/// RFC 9293 §3.3.2's states (LISTEN is a listener, not a connection).
#[derive(Debug, Clone)]
pub(crate) enum State {
    SynSent(SynSent),
    SynRcvd(SynRcvd),
    Established,
    FinWait1,
    FinWait2,
    Closing,
    TimeWait(TimeWait),
    CloseWait,
    LastAck,
    Closed(Closed),
}

impl State {
    /// Its public name, without what the core keeps inside it.
    pub fn kind(&self) -> crate::ConnState {
        use crate::ConnState as K;
        match self {
            State::SynSent(_) => K::SynSent,
            State::SynRcvd(_) => K::SynReceived,
            State::Established => K::Established,
            State::FinWait1 => K::FinWait1,
            State::FinWait2 => K::FinWait2,
            State::Closing => K::Closing,
            State::TimeWait(_) => K::TimeWait,
            State::CloseWait => K::CloseWait,
            State::LastAck => K::LastAck,
            State::Closed(_) => K::Closed,
        }
    }
}

/// What the core lends a connection while it handles an event.
pub(crate) struct Cx<'a> {
    pub cfg: &'a Config,
    pub out: &'a mut VecDeque<Output>,
    pub stats: &'a mut Stats,
    /// The time of the event being handled.
    pub now: Instant,
}

/// Segment flags to emit.
#[derive(Debug, Clone, Copy, Default)]
struct Flags {
    syn: bool,
    fin: bool,
    rst: bool,
    ack: bool,
    psh: bool,
    /// A TSO segment, to be cut into pieces of this size by the device.
    tso: Option<u16>,
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub ends: Endpoints,
    pub state: State,
    /// The application closed its handle: the core frees the connection once
    /// it is closed.
    pub orphan: bool,

    // Send side (RFC 9293 §3.3.1).
    iss: Seq,
    snd_una: Seq,
    snd_nxt: Seq,
    /// The highest sequence number sent (after a timeout, `snd_nxt` goes back).
    snd_max: Seq,
    snd_wnd: usize,
    max_snd_wnd: usize,
    snd_wl1: Seq,
    snd_wl2: Seq,
    /// The peer's window scale (applied to windows it sends).
    snd_wscale: u8,
    /// Bytes from `buf_seq` on: sent-unacknowledged, then unsent.
    /// Queued to send, from `buf_seq` on: handles on what the caller gave
    /// (kept until acknowledged; a retransmission reads them again).
    snd_buf: Chain,
    buf_seq: Seq,
    snd_cap: usize,
    /// Bytes this connection may hold now (its share of the core's memory
    /// budget: the budget less what the others hold), set by the core before
    /// each call.
    pub room: usize,
    /// What it held at the end of its last call, as the core counted it.
    pub charged: usize,
    /// Loans it may hold now (the core's loan quota less what the others
    /// hold), set by the core before each call; past it, data arriving on a
    /// lender's buffer is copied and the buffer goes back.
    pub loan_room: usize,
    /// Loans it held at the end of its last call, as the core counted them.
    pub loans_charged: usize,
    /// The application shut down writing: a FIN follows the data.
    fin_queued: bool,
    /// The sequence number our FIN took, once sent.
    fin_seq: Option<Seq>,
    /// The MSS both sides agreed on (RFC 9293 §3.7.1: excluding options).
    mss_base: usize,
    /// The payload of a full segment: `mss_base` less the Timestamps option
    /// every segment carries once agreed (RFC 6691). The SMSS of RFC 5681.
    mss: usize,

    // Receive side.
    irs: Seq,
    rcv_nxt: Seq,
    /// The right edge of the window last advertised (never moves left).
    rcv_adv: Seq,
    rcv_wscale: u8,
    /// Window scaling is on offer (active open) or agreed (RFC 7323 §2.2).
    wscale_ok: bool,
    rcv_buf: Chain,
    rcv_cap: usize,
    ooo: OutOfOrder,
    fin_rcvd: bool,
    rd_shut: bool,
    /// Where the latest out-of-order segments began, newest first: the SACK
    /// option reports their ranges first (RFC 2018 §4).
    sack_recent: [Option<Seq>; 3],

    // Options (RFC 2018, RFC 7323): on offer until the peer's SYN, then agreed.
    sack_ok: bool,
    ts_ok: bool,
    /// TS.Recent and when it was last updated (RFC 7323 §5.5: valid 24 days).
    ts_recent: u32,
    ts_recent_at: Instant,
    /// Added to our millisecond clock: a TSval that says nothing about uptime
    /// (RFC 7323 §7.1).
    ts_offset: u32,
    /// A SYN cookie's SYN-ACK: the low 6 bits its TSval carries (the peer's
    /// window scale and SACK-permitted, read back from the TSecr of its ACK).
    pub syn_ts_bits: Option<u32>,
    /// Last.ACK.sent of RFC 7323 §4.3.
    last_ack_sent: Seq,

    // Reliability and congestion.
    rtt: RttEstimator,
    /// The segment being timed (its end) and when it left (Karn: cleared by any
    /// retransmission).
    rtt_timing: Option<(Seq, Instant)>,
    cc: Box<dyn CongestionControl>,
    cc_algorithm: Algorithm,
    dupacks: u32,
    /// The recovery point while in fast recovery (RFC 6582's `recover`, RFC
    /// 6675's RecoveryPoint).
    recover: Option<Seq>,
    /// What the peer SACKed (RFC 6675's scoreboard).
    sb: Scoreboard,
    /// RFC 6675's HighRxt: the highest sequence number retransmitted in this
    /// recovery.
    high_rxt: Seq,
    /// With timestamps, an RTT is taken from TSecr once per window, after this.
    ts_rtt_mark: Seq,
    /// Our TSval when we last retransmitted: an echo older than this may be of
    /// an original whose ACK was lost, and is no measurement.
    rexmit_tsval: u32,
    /// SACK blocks received, counted for observability.
    pub sack_blocks_in: u64,
    /// The recovery point of the last loss event (RFC 6582 §3.2 step 2).
    last_recover: Seq,
    /// Window inflation during fast recovery.
    inflate: usize,
    retries: u32,
    /// Retransmissions, counted for observability.
    pub retransmits: u64,

    // Timers.
    rto_at: Option<Instant>,
    persist_at: Option<Instant>,
    persist_backoff: u32,
    delack_at: Option<Instant>,
    keepalive: Option<Keepalive>,
    keepalive_at: Option<Instant>,
    keep_probes: u32,
    fin_wait_at: Option<Instant>,

    // Acknowledgment policy.
    ack_now: bool,
    unacked_segs: u32,
    last_challenge: Option<Instant>,
    challenges: u32,
    pub nodelay: bool,
    /// Acknowledgments may wait (RFC 9293 §3.8.6.3); off: every segment is
    /// acknowledged at once.
    pub delayed_ack: bool,
    /// An ICMP error that explains a later timeout (RFC 1122 §4.2.3.9 soft error).
    soft_error: Option<TcpError>,
}

/// Bytes of TCP options on a non-SYN segment: the Timestamps option (10 bytes)
/// and a SACK option of `sack_blocks` blocks (2 + 8 each), padded to 4.
fn options_len(timestamps: bool, sack_blocks: usize) -> usize {
    let ts = if timestamps { 10 } else { 0 };
    let sack = if sack_blocks > 0 { 2 + 8 * sack_blocks } else { 0 };
    (ts + sack).next_multiple_of(4)
}

/// RFC 7323 §5.5: TS.Recent idle this long is no longer valid for PAWS.
const PAWS_IDLE: Duration = Duration::from_secs(24 * 24 * 3600);

/// RFC 5961 §7: at most this many challenge ACKs per second per connection.
const CHALLENGE_ACKS_PER_SEC: u32 = 10;

fn wscale_for(cap: usize) -> u8 {
    // RFC 7323 §2.3: the smallest shift that lets the window field cover the buffer.
    let mut s = 0u8;
    while (cap >> s) > 65535 && s < 14 {
        s += 1;
    }
    s
}

fn micros_between(later: Instant, earlier: Instant) -> Duration {
    Duration::from_micros((later.total_micros() - earlier.total_micros()).max(0) as u64)
}

impl Conn {
    fn new(cfg: &Config, now: Instant, ends: Endpoints, iss: Seq, state: State, cc: Algorithm) -> Self {
        let mss = cfg.mss();
        Conn {
            ends,
            state,
            orphan: false,
            iss,
            snd_una: iss,
            snd_nxt: iss.plus(1),
            snd_max: iss.plus(1),
            snd_wnd: 0,
            max_snd_wnd: 0,
            snd_wl1: Seq(0),
            snd_wl2: iss,
            snd_wscale: 0,
            snd_buf: Chain::new(),
            buf_seq: iss.plus(1),
            snd_cap: cfg.send_buffer,
            // Until the core says what the budget leaves (its first call on the
            // connection), the SYN offers no more than the floor: a connection
            // being set up reserves little.
            room: crate::MEMORY_FLOOR,
            charged: 0,
            loan_room: 0,
            loans_charged: 0,
            fin_queued: false,
            fin_seq: None,
            mss_base: mss,
            mss,
            irs: Seq(0),
            rcv_nxt: Seq(0),
            rcv_adv: Seq(0),
            rcv_wscale: wscale_for(cfg.recv_buffer),
            wscale_ok: true,
            rcv_buf: Chain::new(),
            rcv_cap: cfg.recv_buffer,
            ooo: OutOfOrder::default(),
            fin_rcvd: false,
            rd_shut: false,
            sack_recent: [None; 3],
            sack_ok: cfg.sack,
            ts_ok: cfg.timestamps,
            ts_recent: 0,
            ts_recent_at: now,
            ts_offset: iss.0.rotate_left(16) ^ 0x5bd1_e995,
            syn_ts_bits: None,
            last_ack_sent: Seq(0),
            rtt: RttEstimator::new(cfg.initial_rto, cfg.min_rto, cfg.max_rto),
            rtt_timing: None,
            cc: cc.build(mss),
            cc_algorithm: cc,
            dupacks: 0,
            recover: None,
            sb: Scoreboard::default(),
            high_rxt: iss,
            ts_rtt_mark: iss,
            rexmit_tsval: 0,
            sack_blocks_in: 0,
            last_recover: iss,
            inflate: 0,
            retries: 0,
            retransmits: 0,
            rto_at: None,
            persist_at: None,
            persist_backoff: 0,
            delack_at: None,
            keepalive: None,
            keepalive_at: None,
            keep_probes: 0,
            fin_wait_at: None,
            ack_now: false,
            unacked_segs: 0,
            last_challenge: None,
            challenges: 0,
            nodelay: false,
            delayed_ack: cfg.delayed_ack != Duration::ZERO,
            soft_error: None,
        }
    }

    /// An active open: SYN-SENT with our SYN out.
    pub fn connect(cx: &mut Cx, now: Instant, ends: Endpoints, iss: Seq, cc: Algorithm) -> Self {
        let mut c = Conn::new(cx.cfg, now, ends, iss, State::SynSent(SynSent), cc);
        c.send_syn(cx, now);
        c
    }

    /// A passive open: a listener got `seg` (a SYN); SYN-RECEIVED with our
    /// SYN-ACK out.
    pub fn accept_syn(cx: &mut Cx, now: Instant, ends: Endpoints, iss: Seq, seg: &Segment, cc: Algorithm) -> Self {
        Self::accept_syn_with(cx, now, ends, iss, seg, cc, None)
    }

    /// As [`Conn::accept_syn`], the SYN-ACK's TSval carrying `ts_bits` in its
    /// low 6 bits (a SYN cookie's).
    pub fn accept_syn_with(
        cx: &mut Cx,
        now: Instant,
        ends: Endpoints,
        iss: Seq,
        seg: &Segment,
        cc: Algorithm,
        ts_bits: Option<u32>,
    ) -> Self {
        let mut c = Conn::new(cx.cfg, now, ends, iss, State::SynRcvd(SynRcvd { passive: true }), cc);
        c.syn_ts_bits = ts_bits;
        c.take_syn(seg, now);
        c.send_syn(cx, now);
        c
    }

    /// What a SYN cookie keeps of the SYN it answers: the peer's window scale
    /// and SACK-permitted as 6 bits (RFC 4987 §3.6 leaves the encoding to the
    /// implementation; this is Linux's: `wscale | sack << 4`, 0xf for none),
    /// meaningful only when both sides use timestamps (else they are lost, as
    /// on Linux).
    pub fn cookie_bits(seg: &Segment) -> u32 {
        u32::from(seg.wscale.map_or(0xf, |w| w.min(14))) | u32::from(seg.sack_permitted) << 4
    }

    /// Records the peer's SYN: its ISN and options (RFC 9293 §3.7.1 MSS; RFC 7323
    /// §2.2 window scale, §3.2 timestamps and RFC 2018 §2 SACK-permitted: each
    /// only if both sides offer it).
    fn take_syn(&mut self, seg: &Segment, now: Instant) {
        self.irs = seg.seq;
        self.rcv_nxt = seg.seq.plus(1);
        self.last_ack_sent = self.rcv_nxt;
        self.sack_ok &= seg.sack_permitted;
        match seg.timestamp {
            Some((tsval, _)) if self.ts_ok => {
                self.ts_recent = tsval;
                self.ts_recent_at = now;
            }
            _ => self.ts_ok = false,
        }
        // RFC 9293 §3.7.1: without the option, assume 536.
        let peer_mss = usize::from(seg.mss.unwrap_or(536)).max(64);
        self.mss_base = self.mss_base.min(peer_mss);
        self.mss = self.mss_base - options_len(self.ts_ok, 0);
        match seg.wscale {
            Some(s) => self.snd_wscale = s.min(14),
            None => {
                self.snd_wscale = 0;
                self.rcv_wscale = 0;
                self.wscale_ok = false;
            }
        }
        self.cc = self.cc_algorithm.build(self.mss);
        // The window in a SYN is never scaled (RFC 7323 §2.2).
        self.snd_wnd = usize::from(seg.window);
        self.max_snd_wnd = self.snd_wnd;
        self.snd_wl1 = seg.seq;
        self.rcv_adv = self.rcv_nxt;
    }

    fn synchronized(&self) -> bool {
        !matches!(self.state, State::SynSent(_) | State::SynRcvd(_) | State::Closed(_))
    }

    /// Is the connection over?
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// The error the connection ended with, if any.
    pub fn error(&self) -> Option<&TcpError> {
        match &self.state {
            State::Closed(c) => c.error.as_ref(),
            _ => None,
        }
    }

    fn close_with(&mut self, error: Option<TcpError>) -> Disposition {
        self.state = State::Closed(Closed { error });
        self.rto_at = None;
        self.persist_at = None;
        self.delack_at = None;
        self.keepalive_at = None;
        self.fin_wait_at = None;
        Disposition::Closed
    }

    // ---------------------------------------------------------------- timers

    /// The next time [`Conn::poll`] has work.
    pub fn poll_at(&self) -> Option<Instant> {
        let tw = match self.state {
            State::TimeWait(t) => Some(t.until),
            _ => None,
        };
        [self.rto_at, self.persist_at, self.delack_at, self.keepalive_at, self.fin_wait_at, tw]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs the timers that are due.
    pub fn poll(&mut self, cx: &mut Cx, now: Instant) -> Disposition {
        if let State::TimeWait(t) = self.state {
            if now >= t.until {
                return self.close_with(None);
            }
        }
        if self.fin_wait_at.is_some_and(|t| now >= t) {
            return self.close_with(None);
        }
        if self.rto_at.is_some_and(|t| now >= t) {
            if let Disposition::Closed = self.on_rto(cx, now) {
                return Disposition::Closed;
            }
        }
        if self.persist_at.is_some_and(|t| now >= t) {
            self.persist_at = None;
            self.persist_backoff += 1;
            if self.orphan && self.persist_backoff > cx.cfg.orphan_retries {
                cx.stats.orphans_given_up += 1;
                return self.abort(cx);
            }
            if self.snd_wnd == 0 {
                self.send_probe(cx);
            } else {
                self.send_data(cx, now, true);
            }
            if self.persist_at.is_none() && self.snd_nxt == self.snd_una {
                self.persist_at = Some(now + self.persist_interval());
            }
        }
        if self.delack_at.is_some_and(|t| now >= t) {
            self.delack_at = None;
            self.ack_now = true;
        }
        if self.keepalive_at.is_some_and(|t| now >= t) {
            if let Disposition::Closed = self.on_keepalive(cx, now) {
                return Disposition::Closed;
            }
        }
        self.output(cx, now);
        Disposition::Keep
    }

    /// RFC 6298 §5.4–5.7: the retransmission timer expired.
    fn on_rto(&mut self, cx: &mut Cx, now: Instant) -> Disposition {
        self.rtt.back_off();
        self.retries += 1;
        self.rtt_timing = None;
        cx.stats.timeouts += 1;
        let timed_out = |c: &Conn| Some(c.soft_error.clone().unwrap_or(TcpError::TimedOut));
        match self.state {
            State::SynSent(_) | State::SynRcvd(_) => {
                if self.retries > cx.cfg.syn_retries {
                    return self.close_with(timed_out(self));
                }
                self.retransmits += 1;
                cx.stats.retransmits += 1;
                self.send_syn(cx, now);
            }
            _ => {
                if self.retries > cx.cfg.data_retries {
                    return self.close_with(timed_out(self));
                }
                let flight = self.snd_max.since(self.snd_una);
                self.cc.on_timeout(now, flight, self.mss);
                // RFC 6675 §5.1: SACK information is kept, unless the first byte
                // is SACKed yet unacknowledged: the peer reneged, forget it all.
                if self.sb.sacked_until(self.snd_una).is_some() {
                    self.sb.clear();
                }
                // RFC 6582 §3.2 (4)... and go back N: resend from the first hole.
                self.recover = None;
                self.last_recover = self.snd_max;
                self.inflate = 0;
                self.dupacks = 0;
                self.snd_nxt = self.snd_una;
                self.rto_at = Some(now + self.rtt.rto());
                self.send_data(cx, now, true);
                self.rto_at = Some(now + self.rtt.rto());
            }
        }
        Disposition::Keep
    }

    /// RFC 9293 §3.8.4 / RFC 1122 §4.2.3.6: keep-alive.
    fn on_keepalive(&mut self, cx: &mut Cx, now: Instant) -> Disposition {
        let Some(k) = self.keepalive else {
            self.keepalive_at = None;
            return Disposition::Keep;
        };
        let idle_state = matches!(self.state, State::Established | State::CloseWait | State::FinWait2);
        if !idle_state || self.snd_una != self.snd_max {
            // Data in flight: the retransmission timer watches the peer.
            self.keepalive_at = Some(now + k.idle);
            return Disposition::Keep;
        }
        if self.keep_probes >= k.count {
            cx.stats.keepalive_timeouts += 1;
            return self.close_with(Some(TcpError::TimedOut));
        }
        self.keep_probes += 1;
        cx.stats.keepalive_probes += 1;
        self.send_probe(cx);
        self.keepalive_at = Some(now + k.interval);
        Disposition::Keep
    }

    /// An ICMP error about this connection (RFC 1122 §4.2.3.9, RFC 5927).
    pub fn on_icmp(&mut self, error: TcpError, hard: bool) -> Disposition {
        if hard && matches!(self.state, State::SynSent(_)) {
            return self.close_with(Some(error));
        }
        self.soft_error = Some(error);
        Disposition::Keep
    }

    // ---------------------------------------------------------------- calls

    /// Queues what fits of `data` for sending (its handles: no copy); returns
    /// how much fit.
    pub fn send(&mut self, cx: &mut Cx, now: Instant, mut data: Chain) -> Result<usize, TcpError> {
        match &self.state {
            State::Closed(c) => return Err(c.error.clone().unwrap_or(TcpError::NotConnected)),
            _ if self.fin_queued => return Err(TcpError::BrokenPipe),
            State::SynSent(_) | State::SynRcvd(_) | State::Established | State::CloseWait => {}
            _ => return Err(TcpError::BrokenPipe),
        }
        let n = data.len().min(self.send_room(self.room));
        self.snd_buf.append(data.split_to(n));
        self.output(cx, now);
        Ok(n)
    }

    /// Takes up to `max` received bytes.
    pub fn recv(&mut self, cx: &mut Cx, now: Instant, max: usize) -> Result<crate::Received, TcpError> {
        if !self.rcv_buf.is_empty() {
            let data = self.rcv_buf.split_to(max);
            self.reopen(cx, now);
            return Ok(crate::Received::Data(data));
        }
        if self.fin_rcvd || self.rd_shut {
            return Ok(crate::Received::Eof);
        }
        match &self.state {
            State::Closed(c) => Err(c.error.clone().unwrap_or(TcpError::NotConnected)),
            _ => Ok(crate::Received::Nothing),
        }
    }

    /// Shuts down writing (a FIN after the queued data) and/or reading.
    pub fn shutdown(&mut self, cx: &mut Cx, now: Instant, read: bool, write: bool) -> Result<(), TcpError> {
        if let State::Closed(c) = &self.state {
            return match &c.error {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            };
        }
        if read {
            self.rd_shut = true;
            self.rcv_buf = Chain::new();
        }
        if write && !self.fin_queued {
            self.fin_queued = true;
            match self.state {
                State::Established => self.state = State::FinWait1,
                State::CloseWait => self.state = State::LastAck,
                State::SynSent(_) => {
                    self.close_with(None);
                    return Ok(());
                }
                _ => {}
            }
            self.output(cx, now);
        }
        Ok(())
    }

    /// The application let go of the connection. Unread data means the peer's
    /// data is lost: reset (RFC 2525 §2.17); otherwise close gracefully.
    pub fn close(&mut self, cx: &mut Cx, now: Instant) -> Disposition {
        self.orphan = true;
        if self.is_closed() {
            return Disposition::Closed;
        }
        if !self.rcv_buf.is_empty() {
            return self.abort(cx);
        }
        let _ = self.shutdown(cx, now, true, true);
        if matches!(self.state, State::FinWait2) {
            self.fin_wait_at = Some(now + cx.cfg.msl * 2);
        }
        if self.is_closed() {
            Disposition::Closed
        } else {
            Disposition::Keep
        }
    }

    /// Reset now (linger 0).
    pub fn abort(&mut self, cx: &mut Cx) -> Disposition {
        if matches!(
            self.state,
            State::SynRcvd(_) | State::Established | State::FinWait1 | State::FinWait2 | State::CloseWait
        ) {
            self.send_rst(cx);
        }
        self.close_with(None)
    }

    /// Sets keep-alive (`None`: off).
    pub fn set_keepalive(&mut self, now: Instant, k: Option<Keepalive>) {
        self.keepalive = k;
        self.keep_probes = 0;
        self.keepalive_at = k.map(|k| now + k.idle);
    }

    /// Readiness for the application.
    pub fn ready(&self) -> crate::Ready {
        let closed = self.is_closed();
        let readable = !self.rcv_buf.is_empty() || self.fin_rcvd || self.rd_shut || closed;
        let writable = closed
            || (matches!(self.state, State::Established | State::CloseWait)
                && !self.fin_queued
                && self.snd_buf.len() < self.snd_cap);
        crate::Ready {
            readable,
            writable,
            error: self.error().is_some(),
            hup: closed || (self.fin_rcvd && self.fin_queued),
        }
    }

    /// What `capnet status --sockets` shows.
    pub fn info(&self) -> crate::ConnInfo {
        crate::ConnInfo {
            state: self.state.kind(),
            local_port: self.ends.local_port,
            remote: self.ends.remote,
            remote_port: self.ends.remote_port,
            mss: self.mss,
            snd_wscale: self.snd_wscale,
            rcv_wscale: self.rcv_wscale,
            cwnd: self.cc.cwnd(),
            ssthresh: self.cc.ssthresh(),
            srtt_us: self.rtt.srtt().map(|d| d.total_micros()),
            rttvar_us: self.rtt.rttvar().total_micros(),
            rto_us: self.rtt.rto().total_micros(),
            retransmits: self.retransmits,
            snd_queued: self.snd_buf.len(),
            rcv_queued: self.rcv_buf.len(),
            snd_wnd: self.snd_wnd,
            congestion_control: self.cc.name(),
            sack: self.sack_ok && self.synchronized(),
            timestamps: self.ts_ok && self.synchronized(),
            sack_blocks_in: self.sack_blocks_in,
            sacked_ranges: self.sb.ranges().len(),
            recovery: self.recover.is_some(),
            nodelay: self.nodelay,
            delayed_ack: self.delayed_ack,
        }
    }

    /// Switches congestion control; the new algorithm takes over the window.
    pub fn set_congestion_control(&mut self, algorithm: Algorithm) {
        if algorithm != self.cc_algorithm {
            self.cc = algorithm.take_over(self.cc.cwnd(), self.cc.ssthresh());
            self.cc_algorithm = algorithm;
        }
    }

    /// Loans it holds: handles on lenders' buffers in its receive queues.
    pub fn loans(&self) -> usize {
        self.rcv_buf.loans() + self.ooo.loans()
    }

    /// Whether a SYN for these endpoints may replace this connection: TIME-WAIT and
    /// a sequence number past anything of the old one (RFC 9293 §3.6.1 note,
    /// RFC 6191's idea without timestamps).
    pub fn reusable_by(&self, seg: &Segment) -> bool {
        matches!(self.state, State::TimeWait(_)) && seg.syn && seg.ack.is_none() && seg.seq.gt(self.rcv_nxt)
    }
}

/// Pieces a segment's payload may be made of: past this (a stream of tiny
/// writes), it is copied into one, so a frame stays far inside a `writev`'s
/// limit.
pub const MAX_SEGMENT_PIECES: usize = 64;

/// Emits a segment from us to the endpoints' peer: `repr`'s header, then
/// `payload` — handles on the send buffer, not a copy — and the checksum,
/// read over both.
fn push_segment(cx: &mut Cx, ends: Endpoints, repr: &TcpRepr, mut payload: Chain, tso: Option<u16>) {
    if payload.pieces() > MAX_SEGMENT_PIECES {
        payload = Lent::from_vec(payload.to_vec()).into();
    }
    let mut head = vec![0u8; repr.header_len()];
    let mut packet = TcpPacket::new_unchecked(&mut head[..]);
    let (src, dst) = (IpAddress::Ipv4(cx.cfg.local), IpAddress::Ipv4(ends.remote));
    // `repr` carries no payload: emit writes the header only, the checksum after.
    repr.emit(&mut packet, &src, &dst, &ChecksumCapabilities::ignored());
    packet.set_checksum(0);
    let len = packet.as_ref().len() + payload.len();
    let (s, d) = (cx.cfg.local, ends.remote);
    match tso {
        None => {
            let mut sum = Checksum::default();
            let total = (len as u16).to_be_bytes();
            sum.add(&s.octets());
            sum.add(&d.octets());
            sum.add(&[0, 6, total[0], total[1]]);
            sum.add(packet.as_ref());
            payload.sum_into(&mut sum);
            packet.set_checksum(!sum.fold());
        }
        // The device finishes each piece's checksum from the pseudo-header sum
        // (CHECKSUM_PARTIAL, as Linux's own TSO leaves it).
        Some(_) => {
            packet.set_checksum(smoltcp::wire::checksum::pseudo_header_v4(&s, &d, IpProtocol::Tcp, len as u32));
        }
    }
    cx.stats.segments_out += 1;
    let mut segment = Chain::from(Lent::from_vec(head));
    segment.append(payload);
    cx.out.push_back(Output::Send { dst: ends.remote, segment, tso });
}

/// RFC 9293 §3.10.7.1: the reset for a segment no connection wants. With an ACK,
/// `<SEQ=SEG.ACK><CTL=RST>`; without, `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`.
pub(crate) fn reset_for(cx: &mut Cx, ends: Endpoints, seg: &Segment) {
    if seg.rst {
        return;
    }
    let (seq, ack) = match seg.ack {
        Some(a) => (a, None),
        None => (Seq(0), Some(seg.seq.plus(seg.len()))),
    };
    let repr = TcpRepr {
        src_port: ends.local_port,
        dst_port: ends.remote_port,
        control: TcpControl::Rst,
        seq_number: seq.into(),
        ack_number: ack.map(Into::into),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    cx.stats.resets_out += 1;
    push_segment(cx, ends, &repr, Chain::new(), None);
}
