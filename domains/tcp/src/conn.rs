//! One connection: its state and the rules of RFC 9293 §3.10 for segments,
//! calls and timers.
//!
//! The states that carry data of their own are types ([`SynSent`], [`SynRcvd`],
//! [`TimeWait`], [`Closed`]); the synchronized states share one segment-arrival
//! path, in the order RFC 9293 §3.10.7.4 writes it, and differ only where the RFC
//! says they do (what an ACK of our FIN or a FIN of the peer's moves them to).
//! Every handler returns a [`Disposition`]; segments to send go to the core's
//! output queue. Nothing here reads a clock: `now` comes in.

use std::collections::VecDeque;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Address, TcpControl, TcpPacket, TcpRepr, TcpTimestampRepr};

use crate::cc::{Ack, Algorithm, CongestionControl};
use crate::rtt::RttEstimator;
use crate::rx::OutOfOrder;
use crate::sack::Scoreboard;
use crate::seq::Seq;
use crate::{Config, DropReason, Keepalive, Output, Stats, TcpError};

/// A parsed segment, borrowed from the datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment<'a> {
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
    pub payload: &'a [u8],
}

impl<'a> Segment<'a> {
    /// Parses a segment from `src` to `dst`, checksum-checked unless the device
    /// vouched for it (`vouched`: TAP checksum offload).
    pub fn parse(src: Ipv4Address, dst: Ipv4Address, bytes: &'a [u8], vouched: bool) -> Result<Self, DropReason> {
        let packet = TcpPacket::new_checked(bytes).map_err(|_| DropReason::Malformed)?;
        let (s, d) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
        if !vouched && !packet.verify_checksum(&s, &d) {
            return Err(DropReason::BadChecksum);
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
            payload: repr.payload,
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
    snd_buf: VecDeque<u8>,
    buf_seq: Seq,
    snd_cap: usize,
    /// Bytes this connection may hold now (its share of the core's memory
    /// budget: the budget less what the others hold), set by the core before
    /// each call.
    pub room: usize,
    /// What it held at the end of its last call, as the core counted it.
    pub charged: usize,
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
    rcv_buf: VecDeque<u8>,
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
            snd_buf: VecDeque::new(),
            buf_seq: iss.plus(1),
            snd_cap: cfg.send_buffer,
            // Until the core says what the budget leaves (its first call on the
            // connection), the SYN offers no more than the floor: a connection
            // being set up reserves little.
            room: crate::MEMORY_FLOOR,
            charged: 0,
            fin_queued: false,
            fin_seq: None,
            mss_base: mss,
            mss,
            irs: Seq(0),
            rcv_nxt: Seq(0),
            rcv_adv: Seq(0),
            rcv_wscale: wscale_for(cfg.recv_buffer),
            wscale_ok: true,
            rcv_buf: VecDeque::new(),
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

    // ---------------------------------------------------------------- output

    fn emit(&mut self, cx: &mut Cx, seq: Seq, flags: Flags, payload_at: Option<(usize, usize)>) {
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
            Some((off, len)) => deque_range(&self.snd_buf, off, len),
            None => [&[][..], &[][..]],
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
    fn ts_now(&self, now: Instant) -> u32 {
        (now.total_millis() as u32).wrapping_add(self.ts_offset)
    }

    /// The SACK option's blocks (RFC 2018 §4): the range holding the latest
    /// out-of-order arrival first, then those of the arrivals before it, then the
    /// highest others.
    fn sack_blocks(&self) -> [Option<(u32, u32)>; 3] {
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
    fn seg_cap(&self) -> usize {
        let blocks = self.sack_blocks().iter().flatten().count();
        self.mss_base.saturating_sub(options_len(self.ts_ok, blocks)).max(1)
    }

    /// Sends our SYN (active) or SYN-ACK (passive/simultaneous).
    fn send_syn(&mut self, cx: &mut Cx, now: Instant) {
        let ack = matches!(self.state, State::SynRcvd(_));
        self.emit(cx, self.iss, Flags { syn: true, ack, ..Flags::default() }, None);
        if self.rtt_timing.is_none() && self.retries == 0 {
            self.rtt_timing = Some((self.iss.plus(1), now));
        }
        self.rto_at = Some(now + self.rtt.rto());
    }

    fn send_ack(&mut self, cx: &mut Cx) {
        self.emit(cx, self.snd_nxt, Flags { ack: true, ..Flags::default() }, None);
    }

    /// RFC 5961 §3.2/§4.2: a challenge ACK, rate-limited (§7).
    fn challenge_ack(&mut self, cx: &mut Cx, now: Instant) {
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
    fn send_probe(&mut self, cx: &mut Cx) {
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

    fn fin_pending(&self) -> bool {
        self.fin_queued && self.fin_seq.is_none_or(|f| self.snd_nxt.le(f))
    }

    /// Bytes in the network by the sender's count: sent, not acknowledged and
    /// not SACKed (RFC 6675's pipe outside recovery).
    fn flight(&self) -> usize {
        self.snd_nxt.since(self.snd_una) - self.sb.sacked_between(self.snd_una, self.snd_nxt)
    }

    fn in_sack_recovery(&self) -> bool {
        self.sack_ok && self.recover.is_some()
    }

    fn send_data(&mut self, cx: &mut Cx, now: Instant, force: bool) {
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
    fn send_one(&mut self, cx: &mut Cx, now: Instant, budget: usize, force: bool) -> bool {
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
    fn pipe(&self, lost: Seq) -> usize {
        self.sb.unsacked_between(lost.max(self.snd_una), self.snd_max)
            + self.sb.unsacked_between(self.snd_una, self.high_rxt)
    }

    /// RFC 6675 §5 (C): while cwnd − pipe ≥ 1 SMSS, send what NextSeg() picks.
    fn sack_recovery_send(&mut self, cx: &mut Cx, now: Instant) {
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
    fn retransmit_hole(&mut self, cx: &mut Cx, s: Seq, n: usize) -> bool {
        let sent = self.retransmit(cx, s, n);
        self.high_rxt = s.plus(sent);
        sent > 0
    }

    fn persist_interval(&self) -> Duration {
        let base = self.rtt.rto().total_micros().saturating_mul(1 << self.persist_backoff.min(10));
        Duration::from_micros(base).min(Duration::from_secs(60))
    }

    /// Retransmits one segment of at most `max` sequence numbers from `seq` (fast
    /// retransmit, a partial ACK, a SACK hole). Returns the sequence space it
    /// covered.
    fn retransmit(&mut self, cx: &mut Cx, seq: Seq, max: usize) -> usize {
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
    fn rcv_space(&self) -> usize {
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
        let window = if self.rcv_adv.lt(self.rcv_nxt) { 0 } else { self.rcv_adv.since(self.rcv_nxt) };
        self.snd_buf.len() + self.rcv_buf.len() + window
    }

    /// The window field for a non-SYN segment. RFC 9293 §3.8.6.2.2 (receiver SWS
    /// avoidance): the right edge moves only by min(buffer/2, MSS) or more, and
    /// never left.
    fn advertise(&mut self) -> u16 {
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

    // ---------------------------------------------------------------- segments

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
    fn on_syn_sent(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> Disposition {
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

    fn acceptable(&self, seg: &Segment) -> bool {
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
    fn on_synchronized(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> Disposition {
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
                trimmed = Segment { syn: false, seq: seg.seq.plus(1), ..*seg };
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

    fn enter_time_wait(&mut self, cx: &mut Cx, now: Instant) {
        self.state = State::TimeWait(TimeWait { until: now + cx.cfg.msl * 2 });
        self.rto_at = None;
        self.persist_at = None;
        self.keepalive_at = None;
        self.fin_wait_at = None;
    }

    /// RFC 9293 §3.10.7.4, fifth check, for the synchronized states. Returns false
    /// when the segment is to be dropped (it acknowledged something never sent).
    fn process_ack(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> bool {
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
            self.snd_buf.drain(..data);
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
    fn take_rtt_sample(&mut self, now: Instant, ack: Seq, seg: &Segment) {
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
    fn take_data(&mut self, cx: &mut Cx, now: Instant, seg: &Segment) -> bool {
        let mut seq = seg.seq;
        let mut data = seg.payload;
        let mut fin = seg.fin;
        // Trim what was received already.
        if seq.lt(self.rcv_nxt) {
            let skip = self.rcv_nxt.since(seq);
            if skip > data.len() {
                return false;
            }
            data = &data[skip..];
            seq = self.rcv_nxt;
        }
        // Trim what lies beyond the window (a trimmed FIN is not received).
        let room = self.rcv_adv.since(seq);
        if data.len() > room {
            data = &data[..room];
            fin = false;
        }

        if seq != self.rcv_nxt {
            // Ahead of a hole: hold it, and say at once what is missing.
            if self.ooo.insert(seq, data, fin, self.rcv_adv.since(self.rcv_nxt)) {
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
            self.rcv_buf.extend(data);
            self.rcv_nxt = self.rcv_nxt.plus(data.len());
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

    fn send_rst(&mut self, cx: &mut Cx) {
        self.emit(cx, self.snd_nxt, Flags { rst: true, ack: true, ..Flags::default() }, None);
        cx.stats.resets_out += 1;
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

    /// Queues `data` for sending; returns how much fit.
    pub fn send(&mut self, cx: &mut Cx, now: Instant, data: &[u8]) -> Result<usize, TcpError> {
        match &self.state {
            State::Closed(c) => return Err(c.error.clone().unwrap_or(TcpError::NotConnected)),
            _ if self.fin_queued => return Err(TcpError::BrokenPipe),
            State::SynSent(_) | State::SynRcvd(_) | State::Established | State::CloseWait => {}
            _ => return Err(TcpError::BrokenPipe),
        }
        let n = data.len().min(self.send_room(self.room));
        self.snd_buf.extend(&data[..n]);
        self.output(cx, now);
        Ok(n)
    }

    /// Takes up to `max` received bytes.
    pub fn recv(&mut self, cx: &mut Cx, now: Instant, max: usize) -> Result<crate::Received, TcpError> {
        if !self.rcv_buf.is_empty() {
            let n = max.min(self.rcv_buf.len());
            let [a, b] = deque_range(&self.rcv_buf, 0, n);
            let data = [a, b].concat();
            self.rcv_buf.drain(..n);
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
            self.rcv_buf.clear();
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

    /// Whether a SYN for these endpoints may replace this connection: TIME-WAIT and
    /// a sequence number past anything of the old one (RFC 9293 §3.6.1 note,
    /// RFC 6191's idea without timestamps).
    pub fn reusable_by(&self, seg: &Segment) -> bool {
        matches!(self.state, State::TimeWait(_)) && seg.syn && seg.ack.is_none() && seg.seq.gt(self.rcv_nxt)
    }
}

/// Emits a segment from us to the endpoints' peer:
/// `repr`'s header, then `payload` (the two pieces of a ring buffer's range), then
/// one checksum pass: the payload is copied once, from the send buffer into the
/// segment.
fn push_segment(cx: &mut Cx, ends: Endpoints, repr: &TcpRepr, payload: [&[u8]; 2], tso: Option<u16>) {
    let hdr = repr.header_len();
    // Only the header is zeroed: the payload is written once, by the copy.
    let mut buf = Vec::with_capacity(hdr + payload[0].len() + payload[1].len());
    buf.resize(hdr, 0);
    buf.extend_from_slice(payload[0]);
    buf.extend_from_slice(payload[1]);
    let mut packet = TcpPacket::new_unchecked(&mut buf[..]);
    let (src, dst) = (IpAddress::Ipv4(cx.cfg.local), IpAddress::Ipv4(ends.remote));
    // `repr` carries no payload: emit writes the header only, the checksum after.
    repr.emit(&mut packet, &src, &dst, &ChecksumCapabilities::ignored());
    match tso {
        None => packet.fill_checksum(&src, &dst),
        // The device finishes each piece's checksum from the pseudo-header sum
        // (CHECKSUM_PARTIAL, as Linux's own TSO leaves it).
        Some(_) => {
            let len = packet.as_ref().len() as u32;
            let (s, d) = (cx.cfg.local, ends.remote);
            packet.set_checksum(smoltcp::wire::checksum::pseudo_header_v4(&s, &d, IpProtocol::Tcp, len));
        }
    }
    cx.stats.segments_out += 1;
    cx.out.push_back(Output::Send { dst: ends.remote, segment: buf, tso });
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
    push_segment(cx, ends, &repr, [&[], &[]], None);
}

/// Bytes `off..off + len` of `dq`, as the (at most) two contiguous pieces they
/// occupy.
fn deque_range(dq: &VecDeque<u8>, off: usize, len: usize) -> [&[u8]; 2] {
    let (a, b) = dq.as_slices();
    if off >= a.len() {
        return [&b[off - a.len()..off - a.len() + len], &[]];
    }
    let first = (a.len() - off).min(len);
    [&a[off..off + first], &b[..len - first]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deque_ranges_span_the_wrap() {
        let mut dq: VecDeque<u8> = VecDeque::with_capacity(8);
        dq.extend(0..8u8);
        dq.drain(..5);
        dq.extend(8..13u8); // now wrapped: 5 6 7 | 8 9 10 11 12
        for off in 0..8 {
            for len in 0..=(8 - off) {
                let [a, b] = deque_range(&dq, off, len);
                let got: Vec<u8> = a.iter().chain(b).copied().collect();
                let want: Vec<u8> = dq.range(off..off + len).copied().collect();
                assert_eq!(got, want, "off {off} len {len}");
            }
        }
    }
}
