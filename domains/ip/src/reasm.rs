//! IPv4 reassembly (RFC 791 §3.2) with memory and time limits.
//!
//! Any fragment that overlaps one already held (other than an exact duplicate)
//! discards the whole datagram, as RFC 5722 requires for IPv6 and Linux does for
//! IPv4: overlaps are how reassembly attacks smuggle bytes past filters.

use std::collections::BTreeMap;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{IpProtocol, Ipv4Address};

use crate::DropReason;

/// The largest IPv4 payload.
const MAX_PAYLOAD: usize = 65535 - crate::IP_HDR;

/// Limits on reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReasmLimits {
    /// A datagram not complete by then is dropped (RFC 791 suggests 15 s upward).
    pub timeout: Duration,
    /// Bytes held across all datagrams in progress.
    pub max_bytes: usize,
    /// Datagrams in progress.
    pub max_datagrams: usize,
    /// Datagrams in progress from one source address.
    pub max_per_source: usize,
}

impl Default for ReasmLimits {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30), max_bytes: 1 << 20, max_datagrams: 64, max_per_source: 8 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub src: Ipv4Address,
    pub dst: Ipv4Address,
    pub protocol: IpProtocol,
    pub ident: u16,
}

#[derive(Debug)]
struct Partial {
    frags: Vec<(usize, Vec<u8>)>,
    total: Option<usize>,
    bytes: usize,
    deadline: Instant,
}

pub(crate) enum Added {
    Incomplete,
    Complete(Vec<u8>),
    Dropped(DropReason),
}

/// Datagrams being reassembled. At a limit (datagrams, bytes, datagrams from
/// one source) the oldest datagram in the way is evicted, not the new one
/// refused: a peer that keeps first fragments coming cannot hold reassembly
/// shut for everyone else (a datagram's fragments arrive together, so the
/// newest are the ones worth finishing, as Linux's `ipfrag` eviction judges).
#[derive(Debug)]
pub struct Reassembler {
    limits: ReasmLimits,
    partial: BTreeMap<Key, Partial>,
    bytes: usize,
    evicted: u64,
}

impl Reassembler {
    pub(crate) fn new(limits: ReasmLimits) -> Self {
        Self { limits, partial: BTreeMap::new(), bytes: 0, evicted: 0 }
    }

    /// Datagrams evicted since the last call.
    pub(crate) fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Evicts the oldest datagram that `pick` chooses (other than `keep`);
    /// whether there was one.
    fn evict_oldest(&mut self, keep: &Key, pick: impl Fn(&Key) -> bool) -> bool {
        let oldest = self.partial.iter().filter(|(k, _)| *k != keep && pick(k)).min_by_key(|(_, p)| p.deadline);
        let Some((&k, _)) = oldest else { return false };
        self.discard(&k);
        self.evicted += 1;
        true
    }

    /// Bytes held now.
    pub fn bytes_held(&self) -> usize {
        self.bytes
    }

    fn discard(&mut self, key: &Key) {
        if let Some(p) = self.partial.remove(key) {
            self.bytes -= p.bytes;
        }
    }

    pub(crate) fn add(&mut self, now: Instant, key: Key, off: usize, more: bool, data: &[u8]) -> Added {
        let end = off + data.len();
        if end > MAX_PAYLOAD {
            self.discard(&key);
            return Added::Dropped(DropReason::FragTooLarge);
        }
        if more && (data.is_empty() || data.len() % 8 != 0) {
            self.discard(&key);
            return Added::Dropped(DropReason::FragMalformed);
        }
        if data.len() > self.limits.max_bytes {
            self.discard(&key);
            return Added::Dropped(DropReason::FragMemory);
        }
        if !self.partial.contains_key(&key) {
            let from_source = self.partial.keys().filter(|k| k.src == key.src).count();
            if from_source >= self.limits.max_per_source {
                self.evict_oldest(&key, |k| k.src == key.src);
            }
            if self.partial.len() >= self.limits.max_datagrams {
                self.evict_oldest(&key, |_| true);
            }
            self.partial
                .insert(key, Partial { frags: Vec::new(), total: None, bytes: 0, deadline: now + self.limits.timeout });
        }
        while self.bytes + data.len() > self.limits.max_bytes {
            if !self.evict_oldest(&key, |_| true) {
                self.discard(&key);
                return Added::Dropped(DropReason::FragMemory);
            }
        }
        let Some(p) = self.partial.get_mut(&key) else { return Added::Dropped(DropReason::FragMemory) };
        for (s, d) in &p.frags {
            let e = s + d.len();
            if *s == off && d == data {
                return Added::Incomplete; // an exact duplicate: ignore it
            }
            if off < e && *s < end {
                self.discard(&key);
                return Added::Dropped(DropReason::FragOverlap);
            }
        }
        if !more {
            if p.total.is_some_and(|t| t != end) || p.frags.iter().any(|(s, d)| s + d.len() > end) {
                self.discard(&key);
                return Added::Dropped(DropReason::FragOverlap);
            }
            p.total = Some(end);
        } else if p.total.is_some_and(|t| end > t) {
            self.discard(&key);
            return Added::Dropped(DropReason::FragOverlap);
        }
        p.frags.push((off, data.to_vec()));
        p.bytes += data.len();
        self.bytes += data.len();
        let Some(total) = p.total else { return Added::Incomplete };
        if p.bytes != total {
            return Added::Incomplete; // no overlaps, so equal byte counts mean full coverage
        }
        let mut out = vec![0u8; total];
        for (s, d) in &p.frags {
            out[*s..s + d.len()].copy_from_slice(d);
        }
        self.discard(&key);
        Added::Complete(out)
    }

    /// Drops datagrams past their deadline; returns how many.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let late: Vec<Key> = self.partial.iter().filter(|(_, p)| p.deadline <= now).map(|(k, _)| *k).collect();
        for k in &late {
            self.discard(k);
        }
        late.len()
    }

    pub(crate) fn poll_at(&self) -> Option<Instant> {
        self.partial.values().map(|p| p.deadline).min()
    }
}
