//! A group's counters and connections as its report ([`capnet_proto::report`])
//! names them, read from the cores it runs.

use std::collections::BTreeMap;

use capnet_proto::report::TcpConnection;

/// The driver's counters by name.
pub fn driver_counters(d: &capnet_runtime::DeviceStats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    c.insert("frames_in".into(), d.frames_read);
    c.insert("frames_out".into(), d.frames_written);
    c.insert("write_errors".into(), d.write_errors);
    c.insert("wire_refused".into(), d.wire_refused);
    c.insert("rx_dropped".into(), d.rx_dropped);
    c.insert("frame_pool_in_use".into(), d.pool_in_use);
    c.insert("device_bytes".into(), d.device_bytes);
    c.insert("checksums_vouched".into(), d.checksums_vouched);
    c.insert("send_pieces_in_place".into(), d.send_pieces_in_place);
    c.insert("frames_dropped_pool_gone".into(), d.frames_dropped_pool_gone);
    for (dir, s) in [("in", d.inbound), ("out", d.outbound)] {
        c.insert(format!("impair_{dir}_dropped"), s.dropped);
        c.insert(format!("impair_{dir}_duplicated"), s.duplicated);
        c.insert(format!("impair_{dir}_reordered"), s.reordered);
        c.insert(format!("impair_{dir}_corrupted"), s.corrupted);
    }
    c
}

/// The ip domain's counters by name, with the gauges of what it holds.
pub fn ip_counters(ip: &capnet_ip::IpCore) -> BTreeMap<String, u64> {
    let s = ip.stats();
    let mut c = BTreeMap::new();
    c.insert("arp_entries".into(), ip.arp().len() as u64);
    c.insert("reassembly_bytes".into(), ip.reassembly_bytes() as u64);
    c.insert("frames_in".into(), s.frames_in);
    c.insert("frames_out".into(), s.frames_out);
    c.insert("packets_in".into(), s.packets_in);
    c.insert("packets_out".into(), s.packets_out);
    c.insert("echo_replies".into(), s.echo_replies);
    c.insert("arp_requests".into(), s.arp_requests);
    c.insert("arp_evicted".into(), s.arp_evicted);
    for r in capnet_ip::DropReason::ALL {
        c.insert(format!("drop_{}", r.name()), s.dropped(r));
    }
    c
}

/// The udp domain's counters by name.
pub fn udp_counters(s: &capnet_udp::Stats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    c.insert("queued_bytes".into(), s.queued_bytes);
    c.insert("datagrams_in".into(), s.datagrams_in);
    c.insert("datagrams_out".into(), s.datagrams_out);
    for r in capnet_udp::DropReason::ALL {
        c.insert(format!("drop_{}", r.name()), s.dropped(r));
    }
    c
}

/// The tcp domain's counters by name.
pub fn tcp_counters(s: &capnet_tcp::Stats) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    for (k, v) in [
        ("segments_in", s.segments_in),
        ("segments_out", s.segments_out),
        ("data_segments_out", s.data_segments_out),
        ("bytes_in", s.bytes_in),
        ("retransmits", s.retransmits),
        ("fast_retransmits", s.fast_retransmits),
        ("timeouts", s.timeouts),
        ("active_opens", s.active_opens),
        ("passive_opens", s.passive_opens),
        ("resets_in", s.resets_in),
        ("resets_out", s.resets_out),
        ("challenge_acks", s.challenge_acks),
        ("keepalive_probes", s.keepalive_probes),
        ("keepalive_timeouts", s.keepalive_timeouts),
        ("syn_cookies_sent", s.syn_cookies_sent),
        ("syn_cookies_accepted", s.syn_cookies_accepted),
        ("orphans_given_up", s.orphans_given_up),
        ("memory_held", s.memory_held),
        ("loans_held", s.loans_held),
        ("loans_copied", s.loans_copied),
    ] {
        c.insert(k.into(), v);
    }
    for r in capnet_tcp::DropReason::ALL {
        c.insert(format!("drop_{}", r.name()), s.dropped(r));
    }
    c
}

/// A tcp connection as the report shows it.
pub fn tcp_connection(i: capnet_tcp::ConnInfo) -> TcpConnection {
    TcpConnection {
        state: i.state.name().into(),
        local_port: i.local_port,
        remote: format!("{}:{}", i.remote, i.remote_port),
        cc: i.congestion_control.into(),
        cwnd: i.cwnd,
        ssthresh: (i.ssthresh != usize::MAX).then_some(i.ssthresh),
        srtt_us: i.srtt_us,
        rttvar_us: i.rttvar_us,
        rto_us: i.rto_us,
        retransmits: i.retransmits,
        mss: i.mss,
        wscale: (i.snd_wscale, i.rcv_wscale),
        sack: i.sack,
        timestamps: i.timestamps,
        sack_blocks_in: i.sack_blocks_in,
        sacked_ranges: i.sacked_ranges,
        recovery: i.recovery,
        snd_wnd: i.snd_wnd,
        snd_queued: i.snd_queued,
        rcv_queued: i.rcv_queued,
        nodelay: i.nodelay,
        delayed_ack: i.delayed_ack,
        pid: 0,
    }
}
