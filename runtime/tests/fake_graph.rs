//! The runtime's protocols between groups, tested without root, a TAP or a
//! second process: fake groups joined by real ipc channels in one process, on a
//! simulated clock, with a peer stack on an in-memory wire
//! (`capnet_runtime::fake`).
//!
//! The stack's behaviour is written once against the `Stack` trait (`cores()`,
//! the sockets domain's `Transports`; `udp_round_trip`, `tcp_transfer`, `echo`)
//! and runs on the mono composition and on the fully factored graph;
//! the rest is what only exists between groups: the push protocol, a swap's
//! hold and release, relinking after a restart, and a hostile peer on each edge.

use std::time::Duration;

use capnet_ipc::control::encode;
use capnet_ipc::lent::Chain;
use capnet_proto::edge::{Answer, IpToSockets, IpToUdp, TcpToIp, TcpToSockets, UdpToSockets};
use capnet_proto::Kind;
use capnet_runtime::fake::{FakeGraph, EDGES, PEER, STACK};
use capnet_runtime::Stack;
use capnet_sockets::Transports;
use capnet_tcp::{Received, SocketId as TcpId};

const SECOND: Duration = Duration::from_secs(1);

fn graphs() -> Vec<(&'static str, FakeGraph)> {
    vec![("mono", FakeGraph::mono().expect("mono")), ("factored", FakeGraph::factored().expect("factored"))]
}

/// A datagram from the peer to the stack's port 7 and back.
fn udp_round_trip(name: &str, g: &mut FakeGraph) {
    let s = g.cores().udp_bind(7).expect("bind 7");
    let p = g.peer(|c| c.udp().bind(40000).expect("peer binds"));
    g.peer(|c| c.udp().send_to(p, Some((STACK, 7)), b"ping over the fake wire").expect("peer sends"));
    let mut got = Vec::new();
    assert!(
        g.run_until(SECOND, |g| {
            got.extend(g.cores().udp_recv(s, 16).expect("recv"));
            !got.is_empty()
        }),
        "{name}: the stack got the peer's datagram"
    );
    assert_eq!((got[0].src, got[0].src_port, &got[0].data[..]), (PEER, 40000, &b"ping over the fake wire"[..]));
    g.cores().udp_send(s, Some((PEER, 40000)), b"pong").expect("send back");
    let mut back = None;
    assert!(
        g.run_until(SECOND, |g| {
            back = g.peer(|c| c.udp().recv_from(p).expect("peer recv"));
            back.is_some()
        }),
        "{name}: the peer got the answer"
    );
    assert_eq!(back.map(|d| d.data), Some(b"pong".to_vec()), "{name}");
}

/// The peer connects to the stack's listener `l` on port 80; the stack accepts.
/// (The stack's socket, the peer's.)
fn accepted(name: &str, g: &mut FakeGraph, l: TcpId) -> (TcpId, TcpId) {
    let now = g.clock.now();
    let c = g.peer(|p| p.tcp().connect(now, STACK, 80).expect("peer connects"));
    let mut conn = None;
    assert!(
        g.run_until(SECOND, |g| {
            conn = g.cores().tcp_accept(l).expect("accept");
            conn.is_some()
        }),
        "{name}: the connection was accepted"
    );
    (conn.expect("accepted"), c)
}

/// 300 KB from the peer to the stack and back, byte-exact.
fn tcp_transfer(name: &str, g: &mut FakeGraph) {
    let l = g.cores().tcp_listen(80, 8).expect("listen");
    let (s, c) = accepted(name, g, l);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (mut sent, mut got) = (0, Vec::new());
    assert!(
        g.run_until(10 * SECOND, |g| {
            let now = g.clock.now();
            sent += g.peer(|p| p.tcp().send(now, c, &data[sent..]).unwrap_or(0));
            if let Received::Data(d) = g.cores().tcp_recv(s, 1 << 20).expect("recv") {
                got.extend(d.to_vec());
            }
            got.len() == data.len()
        }),
        "{name}: {} of {} bytes arrived",
        got.len(),
        data.len()
    );
    assert!(got == data, "{name}: the stream arrived byte-exact");
    let mut back = 0;
    let mut echoed = Vec::new();
    assert!(
        g.run_until(10 * SECOND, |g| {
            back += g.cores().tcp_send(s, Chain::from(&got[back..])).expect("send");
            let now = g.clock.now();
            if let Ok(Received::Data(d)) = g.peer(|p| p.tcp().recv(now, c, 1 << 20)) {
                echoed.extend(d.to_vec());
            }
            echoed.len() == got.len()
        }),
        "{name}: {} bytes came back",
        echoed.len()
    );
    assert!(echoed == data, "{name}: and byte-exact");
    g.cores().tcp_close(s).expect("close");
}

/// An echo request from the stack's echo socket, answered by the peer.
fn echo(name: &str, g: &mut FakeGraph) {
    assert!(g.cores().echo_claim(0x4242).expect("claim"), "{name}: the identifier is free");
    g.cores().echo_send(PEER, 0x4242, 1, b"are you there").expect("echo request");
    assert!(
        g.run_until(SECOND, |g| g
            .sockets
            .sockets
            .echo_replies
            .iter()
            .any(|r| r.0 == 0x4242 && r.3 == b"are you there")),
        "{name}: the echo reply came back to the echo socket"
    );
    assert!(!g.cores().echo_claim(0x4242).expect("claim again"), "{name}: a claimed identifier is taken");
}

#[test]
fn the_stack_behaves_the_same_on_every_composition() {
    for (name, mut g) in graphs() {
        udp_round_trip(name, &mut g);
        tcp_transfer(name, &mut g);
        echo(name, &mut g);
        assert!(g.broken().is_empty(), "{name}: no link broke: {:?}", g.broken());
    }
}

/// Calls and asks the sockets group sent its tcp domain so far.
fn sent_to_tcp(g: &mut FakeGraph) -> u64 {
    let links = g.sockets.links().filter(|l| l.remote() == Kind::Tcp);
    links.flat_map(|l| l.counters()).filter(|(k, _)| k == "link_tcp_calls").map(|(_, v)| v).sum()
}

/// A receive that finds nothing asks once (`WantPush`) and is not called again:
/// what arrives is pushed, and the next receive takes it with no message at all.
#[test]
fn a_waiting_receive_is_pushed_what_arrives_without_another_call() {
    let mut g = FakeGraph::factored().expect("graph");
    let l = g.sockets.tcp_listen(80, 8).expect("listen");
    let (s, c) = accepted("factored", &mut g, l);
    let before = sent_to_tcp(&mut g);
    assert_eq!(g.sockets.tcp_recv(s, 4096), Ok(Received::Nothing), "nothing yet");
    g.settle();
    let asked = sent_to_tcp(&mut g);
    assert_eq!(asked, before + 1, "the receive asked once");
    // Receiving again while the push is awaited sends nothing more.
    assert_eq!(g.sockets.tcp_recv(s, 4096), Ok(Received::Nothing));
    assert_eq!(sent_to_tcp(&mut g), asked, "a second receive did not ask again");
    let now = g.clock.now();
    g.peer(|p| p.tcp().send(now, c, b"pushed, not fetched").expect("peer sends"));
    g.run(Duration::from_millis(50));
    assert!(g.sockets.sockets.activity, "the push told the sockets domain to look again");
    assert_eq!(g.sockets.tcp_recv(s, 4096), Ok(Received::Data(b"pushed, not fetched"[..].into())));
    assert_eq!(sent_to_tcp(&mut g), asked, "the data came without a call");
    assert!(g.broken().is_empty(), "{:?}", g.broken());
}

/// `capnet swap tcp`: the old domain names its connection and keeps it; a new
/// connection goes to the new domain, its first segment held by ip until the
/// old one has answered.
#[test]
fn a_swap_holds_new_connections_until_the_old_domain_names_its_flows() {
    let mut g = FakeGraph::factored().expect("graph");
    let l = g.sockets.tcp_listen(80, 8).expect("listen");
    let (s_old, old) = accepted("before the swap", &mut g, l);
    g.swap_tcp("tcp2").expect("swap");
    assert!(g.group(Kind::Tcp, |c| !c.tcp.as_ref().is_some_and(|t| t.retiring)), "not retired before ip's word");
    g.settle();
    assert!(g.group(Kind::Tcp, |c| c.tcp.as_ref().is_some_and(|t| t.retiring)), "the old domain was told to retire");
    // The listener listens on the new domain too (the sockets core does this
    // on `tcp_added`; here the test does).
    let l2 = g.sockets.tcp_listen(80, 8).expect("listen on the new domain");
    let (s_new, fresh) = accepted("after the swap", &mut g, l2);
    assert_eq!(g.named("tcp2", |c| c.tcp().sockets().0.len()), Some(1), "the new connection lives in the new domain");
    assert_eq!(g.group(Kind::Tcp, |c| c.tcp().sockets().0.len()), 1, "the old domain kept only its own");
    // Both carry data, each in its own domain.
    let now = g.clock.now();
    g.peer(|p| {
        p.tcp().send(now, old, b"old").expect("send old");
        p.tcp().send(now, fresh, b"new").expect("send new")
    });
    let (mut a, mut b) = (Vec::new(), Vec::new());
    assert!(g.run_until(SECOND, |g| {
        if let Ok(Received::Data(d)) = g.sockets.tcp_recv(s_old, 100) {
            a.extend(d.to_vec());
        }
        if let Ok(Received::Data(d)) = g.sockets.tcp_recv(s_new, 100) {
            b.extend(d.to_vec());
        }
        a == b"old" && b == b"new"
    }));
    g.sockets.tcp_close(s_old).expect("close the old connection");
    assert!(
        g.run_until(120 * SECOND, |g| g.group(Kind::Tcp, |c| c.drained())),
        "the old domain drained once its connection closed"
    );
    g.retire_tcp();
    assert!(g.broken().is_empty(), "{:?}", g.broken());
}

/// A retiring domain that never names its flows loses them: ip holds new
/// segments at most `CALL_DEADLINE` of the clock, then the new domain has them.
#[test]
fn a_silent_old_domain_holds_the_switch_up_no_longer_than_the_deadline() {
    let mut g = FakeGraph::factored().expect("graph");
    // The old tcp domain goes silent: it stays in the graph but never runs again.
    let silent = g.named("tcp", |_| ()).is_some();
    assert!(silent);
    g.swap_tcp("tcp2").expect("swap");
    g.mute("tcp");
    let l = g.sockets.tcp_listen(80, 8);
    assert!(l.is_ok(), "a new listener goes to the new domain");
    let now = g.clock.now();
    g.peer(|p| p.tcp().connect(now, STACK, 80).expect("connect"));
    g.run(Duration::from_millis(200));
    assert_eq!(g.named("tcp2", |c| c.tcp().sockets().0.len()), Some(0), "held while the old domain may still answer");
    assert!(
        g.run_until(3 * SECOND, |g| g.named("tcp2", |c| c.tcp().sockets().0.len()) == Some(1)),
        "released to the new domain after the deadline"
    );
}

/// A restarted domain is joined afresh by its neighbours and serves again.
#[test]
fn neighbours_relink_a_restarted_domain_and_traffic_resumes() {
    for kind in [Kind::Udp, Kind::Ip] {
        let mut g = FakeGraph::factored().expect("graph");
        udp_round_trip("before", &mut g);
        g.restart(kind).expect("restart");
        assert!(g.broken().is_empty(), "{kind}: the fresh channels are sound: {:?}", g.broken());
        let s = g.sockets.udp_bind(9).expect("bind on the fresh domain");
        let p = g.peer(|c| c.udp().bind(40009).expect("peer binds"));
        g.peer(|c| c.udp().send_to(p, Some((STACK, 9)), b"after").expect("peer sends"));
        let mut got = Vec::new();
        assert!(
            g.run_until(5 * SECOND, |g| {
                got.extend(g.sockets.udp_recv(s, 16).expect("recv"));
                !got.is_empty()
            }),
            "{kind}: traffic flows after the restart"
        );
        assert_eq!(got[0].data, b"after");
    }
}

/// What a hostile domain can write on each edge: garbage, and messages of the
/// edge's own type that the protocol does not allow unasked.
fn hostile_messages(a: Kind, b: Kind) -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let bytes = |m: &dyn Fn() -> Vec<u8>| m();
    let flood = |one: Vec<u8>| (0..50).map(|_| one.clone()).collect::<Vec<_>>();
    let mut v = vec![("garbage", vec![vec![0xa5; 48]])];
    match (a, b) {
        (Kind::Tcp, Kind::Sockets) => {
            v.push(("an activity flood", flood(encode(&TcpToSockets::Activity).expect("encode").to_vec())));
            v.push((
                "an unasked push",
                vec![bytes(&|| encode(&TcpToSockets::Pushed { s: 1, got: Ok(Answer::Eof) }).expect("encode").to_vec())],
            ));
            v.push((
                "an answer to no call",
                vec![bytes(&|| {
                    encode(&TcpToSockets::Answer { id: 99, answer: Ok(Answer::Done) }).expect("encode").to_vec()
                })],
            ));
        }
        (Kind::Udp, Kind::Sockets) => {
            v.push(("an activity flood", flood(encode(&UdpToSockets::Activity).expect("encode").to_vec())));
            v.push((
                "an answer to no call",
                vec![bytes(&|| {
                    encode(&UdpToSockets::Answer { id: 99, answer: Ok(Answer::Done) }).expect("encode").to_vec()
                })],
            ));
        }
        (Kind::Ip, Kind::Sockets) => v.push((
            "an answer to no call",
            vec![bytes(&|| {
                encode(&IpToSockets::Answer { id: 99, answer: Ok(Answer::Done) }).expect("encode").to_vec()
            })],
        )),
        (Kind::Tcp, Kind::Ip) => v.push((
            "flows nobody asked for",
            vec![bytes(&|| encode(&TcpToIp::Flows(vec![(80, [1, 2, 3, 4], 9)])).expect("encode").to_vec())],
        )),
        // The other directions carry nothing a receiver may refuse but what is
        // not a message of its edge.
        _ => {}
    }
    v
}

/// A hostile domain on each end of each edge: the domain at the other end
/// breaks that link (and reports it), and no other link of any group breaks.
#[test]
fn a_hostile_peer_on_any_edge_breaks_that_link_alone() {
    for (x, y) in EDGES {
        for (a, b) in [(x, y), (y, x)] {
            for (what, msgs) in hostile_messages(a, b) {
                let (mut g, end) = FakeGraph::factored_with(Some((a, b))).expect("graph");
                let mut end = end.expect("the played end");
                for m in &msgs {
                    let _ = end.send(m);
                }
                g.run(Duration::from_millis(20));
                let broken = g.broken();
                assert_eq!(broken.len(), 1, "{a} → {b}, {what}: exactly one link broke: {broken:?}");
                let (group, why) = &broken[0];
                assert_eq!(group, b.name(), "{a} → {b}, {what}: the receiving group noticed");
                assert!(why.contains(&format!("from {b} to {a}")), "{a} → {b}, {what}: {why}");
            }
        }
    }
    // Shapes of another edge: what ip sends udp is no message of ip → tcp.
    let (mut g, end) = FakeGraph::factored_with(Some((Kind::Ip, Kind::Tcp))).expect("graph");
    let mut end = end.expect("played");
    let _ = end.send(
        &encode(&IpToUdp::Icmp(capnet_proto::edge::IcmpError {
            local_port: 1,
            remote: [1, 2, 3, 4],
            remote_port: 2,
            icmp_type: 3,
            icmp_code: 3,
            reporter: [1, 2, 3, 4],
        }))
        .expect("encode"),
    );
    let _ = end.send(&[0x02; 3]);
    g.run(Duration::from_millis(20));
    assert_eq!(g.broken().len(), 1, "{:?}", g.broken());
}
