//! The tcp core's counters, and why it drops what it drops.

/// Why a received segment was dropped (or only answered with a reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// Too short or a header that does not parse.
    Malformed,
    /// Checksum mismatch.
    BadChecksum,
    /// Not addressed to us (e.g. a broadcast).
    NotForUs,
    /// No connection or listener: reset sent.
    NoSocket,
    /// Outside the receive window (or a bad ACK in SYN-SENT): ACKed or dropped.
    Unacceptable,
    /// A synchronized-state segment without ACK.
    NoAck,
    /// It acknowledged data never sent.
    AckUnsent,
    /// The out-of-order queue was full.
    OutOfOrderFull,
    /// A SYN beyond the listener's SYN queue.
    SynQueueFull,
    /// A SYN while the listener's accept queue was full.
    AcceptQueueFull,
    /// An old duplicate by its timestamp (RFC 7323 PAWS): ACKed and dropped.
    Paws,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 11] = [
        Self::Malformed,
        Self::BadChecksum,
        Self::NotForUs,
        Self::NoSocket,
        Self::Unacceptable,
        Self::NoAck,
        Self::AckUnsent,
        Self::OutOfOrderFull,
        Self::SynQueueFull,
        Self::AcceptQueueFull,
        Self::Paws,
    ];

    /// The counter name in `capnet status --json`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "tcp_malformed",
            Self::BadChecksum => "tcp_bad_checksum",
            Self::NotForUs => "tcp_not_for_us",
            Self::NoSocket => "tcp_no_socket",
            Self::Unacceptable => "tcp_unacceptable",
            Self::NoAck => "tcp_no_ack",
            Self::AckUnsent => "tcp_ack_unsent",
            Self::OutOfOrderFull => "tcp_ooo_full",
            Self::SynQueueFull => "tcp_syn_queue_full",
            Self::AcceptQueueFull => "tcp_accept_queue_full",
            Self::Paws => "tcp_paws",
        }
    }
}

/// The core's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Segments received.
    pub segments_in: u64,
    /// Segments sent.
    pub segments_out: u64,
    /// Segments sent carrying data.
    pub data_segments_out: u64,
    /// Payload bytes received in order.
    pub bytes_in: u64,
    /// Segments retransmitted (timeouts, fast retransmits, go-back-N).
    pub retransmits: u64,
    /// Fast retransmits (three duplicate ACKs).
    pub fast_retransmits: u64,
    /// Retransmission timer expirations.
    pub timeouts: u64,
    /// Connections we opened that completed the handshake.
    pub active_opens: u64,
    /// Connections accepted from listeners that completed the handshake.
    pub passive_opens: u64,
    /// Resets received that closed a connection.
    pub resets_in: u64,
    /// Resets sent.
    pub resets_out: u64,
    /// Challenge ACKs sent (RFC 5961).
    pub challenge_acks: u64,
    /// Keep-alive probes sent.
    pub keepalive_probes: u64,
    /// Connections closed by unanswered keep-alive probes.
    pub keepalive_timeouts: u64,
    /// SYN-ACKs sent with a SYN cookie (the SYN queue was full).
    pub syn_cookies_sent: u64,
    /// Connections built from a valid SYN cookie's ACK.
    pub syn_cookies_accepted: u64,
    /// Closed connections given up on: their peer held the window shut past
    /// [`Config::orphan_retries`] probes.
    pub orphans_given_up: u64,
    /// Bytes all connections hold now (a gauge, against [`Config::memory`]).
    pub memory_held: u64,
    /// Handles on lenders' buffers all connections hold now (a gauge, against
    /// [`Config::max_loans`]).
    pub loans_held: u64,
    /// Segments whose payload was copied off its lender's buffer because the
    /// connection held its share of the loan quota.
    pub loans_copied: u64,
    drops: [u64; DropReason::ALL.len()],
}

impl Stats {
    /// Drops for one reason.
    pub fn dropped(&self, r: DropReason) -> u64 {
        self.drops[r as usize]
    }

    pub(crate) fn drop(&mut self, r: DropReason) {
        self.drops[r as usize] += 1;
    }
}
