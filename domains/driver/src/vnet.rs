//! The virtio-net header a TAP with offloads puts in front of every frame.
//!
//! With checksum offload on, the kernel hands over frames whose transport checksum
//! is only partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`: the field holds the
//! pseudo-header sum, the rest is ours to add), and takes ours without computing
//! anything. The driver completes partial checksums at the device edge, so the
//! protocol cores only ever see plain frames, and sends with a header that asks
//! for nothing — except where the frame goes straight to a TCP core in the same
//! process, which can be told: there a partial TCP checksum is taken on the
//! kernel's word (the frame never crossed a wire; Linux's own virtio-net guests
//! treat it as `CHECKSUM_PARTIAL`, valid), and neither completed nor verified. A TCP segmentation-offload super-frame (GSO TCPv4, up to 64 KiB)
//! is taken whole, as one large segment: the IP total length covers it and its
//! checksum is completed like any other, so TCP receives it in one piece (what
//! GRO would have made of its segments). Other GSO types were never negotiated
//! and are refused.

/// `sizeof(struct virtio_net_hdr_v1)`.
pub const HEADER_LEN: usize = 12;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_ECN`, or-ed into the GSO type.
pub const GSO_ECN: u8 = 0x80;
/// The header we send: no checksum to finish, no segmentation.
pub const PLAIN: [u8; HEADER_LEN] = [0; HEADER_LEN];

/// The header that asks the kernel to cut an Ethernet/IPv4/TCP super-frame into
/// `mss`-byte segments and finish their checksums (TSO): the TCP checksum field
/// holds the pseudo-header sum, as Linux's own TSO leaves it. `None` when the
/// frame is not a TCPv4 frame with a whole header.
pub fn tso_header(frame: &[u8], mss: u16) -> Option<[u8; HEADER_LEN]> {
    const ETH: usize = 14;
    let ip = frame.get(ETH..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip[0] >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let tcp_len = usize::from(ip.get(ihl + 12)? >> 4) * 4;
    let hdr_len = u16::try_from(ETH + ihl + tcp_len).ok()?;
    let csum_start = u16::try_from(ETH + ihl).ok()?;
    let mut h = [0u8; HEADER_LEN];
    h[0] = F_NEEDS_CSUM;
    h[1] = GSO_TCPV4;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&mss.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&16u16.to_le_bytes()); // the checksum's offset in TCP
    Some(h)
}

/// Why a frame from the device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VnetError {
    /// Shorter than the header, or the checksum position lies outside the frame.
    #[error("virtio-net header or checksum offsets do not fit the frame")]
    Malformed,
    /// A segmentation-offload super-frame (not negotiated for anything we speak).
    #[error("GSO super-frame of type {0} refused")]
    Gso(u8),
}

/// The frame behind the header of `frame`, and whether its TCP checksum was
/// left partial for the kernel's word. With `vouch`, a TCP/IPv4 frame whose
/// checksum the kernel left partial keeps it (the caller must tell its TCP core
/// not to verify it); every other partial checksum is completed in place (no
/// copy: a super-frame is 64 KiB).
pub fn to_plain(frame: &mut [u8], vouch: bool) -> Result<(&[u8], bool), VnetError> {
    let (hdr, out) = frame.split_at_mut_checked(HEADER_LEN).ok_or(VnetError::Malformed)?;
    let (flags, gso_type) = (hdr[0], hdr[1]);
    if gso_type != 0 && gso_type & !GSO_ECN != GSO_TCPV4 {
        return Err(VnetError::Gso(gso_type));
    }
    if flags & F_NEEDS_CSUM != 0 {
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let field = start + usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        if start > out.len() || field + 2 > out.len() {
            return Err(VnetError::Malformed);
        }
        // Ethernet type IPv4, protocol TCP, the checksum at TCP's offset 16.
        if vouch && out.get(12..14) == Some(&[8, 0]) && out.get(23) == Some(&6) && field - start == 16 {
            return Ok((out, true));
        }
        // RFC 1071 over everything from csum_start, the partial sum included
        // (smoltcp's sum: unrolled, vectorised; a super-frame is 64 KiB).
        let mut csum = !smoltcp::wire::checksum::data(&out[start..]);
        if csum == 0 {
            csum = 0xffff; // UDP sends a computed zero as all ones (RFC 768)
        }
        out[field..field + 2].copy_from_slice(&csum.to_be_bytes());
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_udp_checksum_is_completed() {
        // UDP 10.0.0.1:1 -> 10.0.0.2:2, payload "hi", in an Ethernet/IPv4 frame.
        let mut frame = vec![0u8; HEADER_LEN + 14 + 20 + 8 + 2];
        let ip = HEADER_LEN + 14;
        frame[ip + 12..ip + 16].copy_from_slice(&[10, 0, 0, 1]);
        frame[ip + 16..ip + 20].copy_from_slice(&[10, 0, 0, 2]);
        let udp = ip + 20;
        frame[udp..udp + 8].copy_from_slice(&[0, 1, 0, 2, 0, 10, 0, 0]);
        frame[udp + 8..].copy_from_slice(b"hi");
        // Pseudo-header sum as the kernel leaves it: src + dst + proto 17 + length 10.
        let pseudo: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + 10;
        frame[udp + 6..udp + 8].copy_from_slice(&(pseudo as u16).to_be_bytes());
        frame[0] = F_NEEDS_CSUM;
        frame[6..8].copy_from_slice(&((udp - HEADER_LEN) as u16).to_le_bytes());
        frame[8..10].copy_from_slice(&6u16.to_le_bytes());
        // UDP is completed even where TCP would be vouched for.
        let (out, vouched) = to_plain(&mut frame, true).expect("plain");
        assert!(!vouched);
        let out = out.to_vec();
        // Verify: the full checksum over pseudo-header + segment folds to all ones.
        let seg = &out[udp - HEADER_LEN..];
        let mut sum: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + 10;
        for c in seg.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }

    #[test]
    fn the_tso_header_describes_the_frame() {
        // Ethernet, IPv4 (IHL 5, TCP), TCP with a 32-byte header (timestamps).
        let mut frame = vec![0u8; 14 + 20 + 32 + 3000];
        frame[14] = 0x45;
        frame[14 + 9] = 6;
        frame[14 + 20 + 12] = 8 << 4;
        let h = tso_header(&frame, 1448).expect("a TCPv4 frame");
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_TCPV4));
        let le = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        assert_eq!((le(2), le(4), le(6), le(8)), (66, 1448, 34, 16), "hdr_len, gso_size, csum_start, csum_offset");
        frame[14 + 9] = 17;
        assert_eq!(tso_header(&frame, 1448), None, "not TCP");
        assert_eq!(tso_header(&frame[..20], 1448), None, "no IP header");
    }

    #[test]
    fn tcp_gso_is_taken_whole_other_gso_and_bad_offsets_are_refused() {
        let mut f = vec![0u8; 40];
        f[1] = GSO_TCPV4 | GSO_ECN;
        assert_eq!(to_plain(&mut f, false).map(|(p, _)| p.len()), Ok(40 - HEADER_LEN));
        f[1] = 3; // VIRTIO_NET_HDR_GSO_UDP: never negotiated
        assert_eq!(to_plain(&mut f, false), Err(VnetError::Gso(3)));
        f[1] = 0;
        f[0] = F_NEEDS_CSUM;
        f[6..8].copy_from_slice(&500u16.to_le_bytes());
        assert_eq!(to_plain(&mut f, true), Err(VnetError::Malformed));
        assert_eq!(to_plain(&mut f[..5], false), Err(VnetError::Malformed));
    }

    #[test]
    fn a_partial_tcp_checksum_is_vouched_for_only_when_asked() {
        // Ethernet (type IPv4), IPv4 (protocol TCP), a 20-byte TCP header, 10 bytes.
        let mut frame = vec![0u8; HEADER_LEN + 14 + 20 + 20 + 10];
        let eth = HEADER_LEN;
        frame[eth + 12..eth + 14].copy_from_slice(&[8, 0]);
        frame[eth + 14] = 0x45;
        frame[eth + 14 + 9] = 6;
        frame[0] = F_NEEDS_CSUM;
        frame[6..8].copy_from_slice(&34u16.to_le_bytes());
        frame[8..10].copy_from_slice(&16u16.to_le_bytes());
        frame[eth + 34 + 16..eth + 34 + 18].copy_from_slice(&[0x12, 0x34]); // the partial sum
        let (out, vouched) = to_plain(&mut frame.clone(), true).map(|(p, v)| (p.to_vec(), v)).expect("plain");
        assert!(vouched, "left partial, on the kernel's word");
        assert_eq!(out[34 + 16..34 + 18], [0x12, 0x34], "untouched");
        let (out, vouched) = to_plain(&mut frame, false).map(|(p, v)| (p.to_vec(), v)).expect("plain");
        assert!(!vouched);
        assert_ne!(out[34 + 16..34 + 18], [0x12, 0x34], "completed");
    }
}
