//! ARP (RFC 826): the neighbour cache, resolution with a bounded queue, retries and
//! expiry.

use capnet_ipc::lent::Chain;
use std::collections::BTreeMap;

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol, Ipv4Address};

use crate::ETH_HDR;

/// Request or reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ArpOp {
    Request,
    Reply,
}

/// The fields of an Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arp {
    pub op: ArpOp,
    pub sender_mac: EthernetAddress,
    pub sender_ip: Ipv4Address,
    pub target_ip: Ipv4Address,
}

/// Parses an ARP packet; `None` for anything but a well-formed Ethernet/IPv4
/// request or reply.
pub(crate) fn parse(bytes: &[u8]) -> Option<Arp> {
    let packet = ArpPacket::new_checked(bytes).ok()?;
    let ArpRepr::EthernetIpv4 { operation, source_hardware_addr, source_protocol_addr, target_protocol_addr, .. } =
        ArpRepr::parse(&packet).ok()?
    else {
        return None;
    };
    let op = match operation {
        ArpOperation::Request => ArpOp::Request,
        ArpOperation::Reply => ArpOp::Reply,
        _ => return None,
    };
    if !source_hardware_addr.is_unicast() {
        return None;
    }
    Some(Arp { op, sender_mac: source_hardware_addr, sender_ip: source_protocol_addr, target_ip: target_protocol_addr })
}

/// An Ethernet frame carrying an ARP packet from us.
pub(crate) fn build(
    op: ArpOp,
    our_mac: EthernetAddress,
    our_ip: Ipv4Address,
    eth_dst: EthernetAddress,
    target_mac: EthernetAddress,
    target_ip: Ipv4Address,
) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: match op {
            ArpOp::Request => ArpOperation::Request,
            ArpOp::Reply => ArpOperation::Reply,
        },
        source_hardware_addr: our_mac,
        source_protocol_addr: our_ip,
        target_hardware_addr: target_mac,
        target_protocol_addr: target_ip,
    };
    let mut frame = vec![0u8; ETH_HDR + repr.buffer_len()];
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    eth.set_dst_addr(eth_dst);
    eth.set_src_addr(our_mac);
    eth.set_ethertype(EthernetProtocol::Arp);
    repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
    frame
}

#[derive(Debug)]
struct Entry {
    mac: EthernetAddress,
    expires: Instant,
}

#[derive(Debug)]
struct Pending {
    packets: Vec<Chain>,
    tries: u8,
    next: Instant,
}

/// The neighbour cache and the datagrams waiting for resolution.
#[derive(Debug)]
pub struct ArpCache {
    expiry: Duration,
    retry: Duration,
    tries: u8,
    queue: usize,
    /// Entries, and resolutions in progress, held at most.
    max: usize,
    /// Entries evicted to make room (the ip core takes them into its stats).
    pub(crate) evicted: u64,
    entries: BTreeMap<Ipv4Address, Entry>,
    pending: BTreeMap<Ipv4Address, Pending>,
}

impl ArpCache {
    pub(crate) fn new(expiry: Duration, retry: Duration, tries: u8, queue: usize, max: usize) -> Self {
        Self {
            expiry,
            retry,
            tries,
            queue,
            max: max.max(1),
            evicted: 0,
            entries: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Entries held (live or not yet swept).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The MAC of `ip`, if known and not expired at `now`.
    pub fn lookup(&self, now: Instant, ip: Ipv4Address) -> Option<EthernetAddress> {
        self.entries.get(&ip).filter(|e| e.expires > now).map(|e| e.mac)
    }

    /// Every live entry (for `capnet status`).
    pub fn entries(&self, now: Instant) -> impl Iterator<Item = (Ipv4Address, EthernetAddress)> + '_ {
        self.entries.iter().filter(move |(_, e)| e.expires > now).map(|(ip, e)| (*ip, e.mac))
    }

    /// Records `ip` at `mac` (if already known, if we asked, or if `create`);
    /// returns the datagrams that were waiting for it.
    pub(crate) fn learn(&mut self, now: Instant, ip: Ipv4Address, mac: EthernetAddress, create: bool) -> Vec<Chain> {
        let waiting = self.pending.remove(&ip);
        if create || waiting.is_some() || self.entries.contains_key(&ip) {
            if !self.entries.contains_key(&ip) && self.entries.len() >= self.max {
                // Full: the entry nearest its expiry (the least recently
                // confirmed) makes room; the cache never grows past its size.
                if let Some(old) = self.entries.iter().min_by_key(|(_, e)| e.expires).map(|(ip, _)| *ip) {
                    self.entries.remove(&old);
                    self.evicted += 1;
                }
            }
            self.entries.insert(ip, Entry { mac, expires: now + self.expiry });
        }
        waiting.map(|p| p.packets).unwrap_or_default()
    }

    /// Queues datagrams for `ip`. Returns (this started a resolution, accepted).
    pub(crate) fn enqueue(&mut self, now: Instant, ip: Ipv4Address, packets: Vec<Chain>) -> (bool, bool) {
        match self.pending.get_mut(&ip) {
            Some(p) => {
                if p.packets.len() + packets.len() > self.queue {
                    return (false, false);
                }
                p.packets.extend(packets);
                (false, true)
            }
            None => {
                if packets.len() > self.queue || self.pending.len() >= self.max {
                    return (false, false);
                }
                self.pending.insert(ip, Pending { packets, tries: 1, next: now + self.retry });
                (true, true)
            }
        }
    }

    /// Retries due requests and gives up on addresses past their tries. Returns the
    /// addresses to ask again and how many queued datagrams were dropped.
    pub(crate) fn poll(&mut self, now: Instant) -> (Vec<Ipv4Address>, u64) {
        self.entries.retain(|_, e| e.expires > now);
        let mut retry = Vec::new();
        let mut failed = 0;
        let (tries, every) = (self.tries, self.retry);
        self.pending.retain(|ip, p| {
            if p.next > now {
                return true;
            }
            if p.tries >= tries {
                failed += p.packets.len() as u64;
                return false;
            }
            p.tries += 1;
            p.next = now + every;
            retry.push(*ip);
            true
        });
        (retry, failed)
    }

    pub(crate) fn poll_at(&self) -> Option<Instant> {
        let pending = self.pending.values().map(|p| p.next);
        let expiry = self.entries.values().map(|e| e.expires);
        pending.chain(expiry).min()
    }
}
