//! The socket table: handles are unforgeable, per application and generation-checked;
//! receives park and complete; detaching closes everything; TCP calls over a
//! connection of the tcp core to itself.

use capnet_sockets::{
    AppId, Call, Handle, Incoming, Ipv4Address, Outgoing, Reply, Request, Response, SocketError, SocketsCore,
    Transports,
};
use capnet_tcp::{Endpoints, Instant, Ready, Received, SockOpt, TcpCore};
use capnet_udp::{Datagram, SocketId, UdpCore};

type TcpId = capnet_sockets::TcpId;

const US: Ipv4Address = Ipv4Address::new(10, 77, 0, 2);
const PEER: Ipv4Address = Ipv4Address::new(10, 77, 0, 1);

/// The udp and tcp cores for real, and a recorded ICMP side.
struct Fake {
    udp: UdpCore,
    tcp: TcpCore,
    claimed: Vec<u16>,
    echoes: Vec<(Ipv4Address, u16, u16, Vec<u8>)>,
    /// Receive calls made to the udp side.
    udp_recvs: usize,
}

impl Transports for Fake {
    fn udp_bind(&mut self, port: u16) -> Result<SocketId, SocketError> {
        self.udp.bind(port).map_err(capnet_sockets::udp_error)
    }
    fn udp_port(&mut self, s: SocketId) -> Result<u16, SocketError> {
        self.udp.local_port(s).map_err(capnet_sockets::udp_error)
    }
    fn udp_connect(&mut self, s: SocketId, addr: Ipv4Address, port: u16) -> Result<(), SocketError> {
        self.udp.connect(s, addr, port).map_err(capnet_sockets::udp_error)
    }
    fn udp_send(&mut self, s: SocketId, to: Option<(Ipv4Address, u16)>, data: &[u8]) -> Result<(), SocketError> {
        self.udp.send_to(s, to, data).map_err(capnet_sockets::udp_error)
    }
    fn udp_recv(&mut self, s: SocketId, max: usize) -> Result<Vec<Datagram>, SocketError> {
        self.udp_recvs += 1;
        self.udp.recv_many(s, max, capnet_sockets::UDP_BATCH_BYTES).map_err(capnet_sockets::udp_error)
    }
    fn udp_close(&mut self, s: SocketId) -> Result<(), SocketError> {
        self.udp.close(s).map_err(capnet_sockets::udp_error)
    }
    fn echo_claim(&mut self, ident: u16) -> Result<bool, SocketError> {
        Ok(!self.claimed.contains(&ident) && {
            self.claimed.push(ident);
            true
        })
    }
    fn echo_release(&mut self, ident: u16) -> Result<(), SocketError> {
        self.claimed.retain(|i| *i != ident);
        Ok(())
    }
    fn echo_send(&mut self, dst: Ipv4Address, ident: u16, seq: u16, data: &[u8]) -> Result<(), SocketError> {
        self.echoes.push((dst, ident, seq, data.to_vec()));
        Ok(())
    }
    fn tcp_listen(&mut self, port: u16, backlog: usize) -> Result<TcpId, SocketError> {
        self.tcp.listen(port, backlog).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_local_port(&mut self, s: TcpId) -> Result<u16, SocketError> {
        self.tcp.local_port(s).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_accept(&mut self, l: TcpId) -> Result<Option<TcpId>, SocketError> {
        self.tcp.accept(l).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_endpoints(&mut self, s: TcpId) -> Result<Endpoints, SocketError> {
        self.tcp.endpoints(s).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_connect(&mut self, addr: Ipv4Address, port: u16) -> Result<TcpId, SocketError> {
        self.tcp.connect(NOW, addr, port).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_connected(&mut self, s: TcpId) -> Result<bool, SocketError> {
        self.tcp.connected(s).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_send(&mut self, s: TcpId, data: capnet_sockets::Chain) -> Result<usize, SocketError> {
        self.tcp.send(NOW, s, data).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_recv(&mut self, s: TcpId, max: usize) -> Result<Received, SocketError> {
        self.tcp.recv(NOW, s, max).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_shutdown(&mut self, s: TcpId, read: bool, write: bool) -> Result<(), SocketError> {
        self.tcp.shutdown(NOW, s, read, write).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_close(&mut self, s: TcpId) -> Result<(), SocketError> {
        self.tcp.close(NOW, s).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_abort(&mut self, s: TcpId) -> Result<(), SocketError> {
        self.tcp.abort(s).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_set_option(&mut self, s: TcpId, opt: SockOpt) -> Result<(), SocketError> {
        self.tcp.set_option(NOW, s, opt).map_err(capnet_sockets::tcp_error)
    }
    fn tcp_ready(&mut self, s: TcpId) -> Result<Ready, SocketError> {
        self.tcp.ready(s).map_err(capnet_sockets::tcp_error)
    }
}

const NOW: Instant = Instant::from_millis_const(1000);

impl Fake {
    /// Loops the tcp core's segments back into it (it talks to itself).
    fn loop_tcp(&mut self) {
        while let Some(capnet_tcp::Output::Send { segment, .. }) = self.tcp.pop_output() {
            self.tcp.receive(NOW, US, US, &segment);
        }
    }
}

fn setup() -> (SocketsCore, Fake, AppId, AppId) {
    let mut core = SocketsCore::new();
    let a = core.attach(0x1111_2222_3333_4444);
    let b = core.attach(0x5555_6666_7777_8888);
    let tcp = TcpCore::new(capnet_tcp::Config::new(US, [7, 7]));
    (core, Fake { udp: UdpCore::new(US, 1 << 16), tcp, claimed: vec![], echoes: vec![], udp_recvs: 0 }, a, b)
}

fn call(core: &mut SocketsCore, t: &mut Fake, app: AppId, id: u64, c: Call) -> Option<Reply> {
    core.request(app, Request { id, call: c }, t);
    let r = core.pop_response();
    r.map(|(to, Response { id: rid, reply })| {
        assert_eq!((to, rid), (app, id));
        reply
    })
}

fn bind(core: &mut SocketsCore, t: &mut Fake, app: AppId, port: u16) -> Handle {
    match call(core, t, app, 1, Call::UdpBind { port }) {
        Some(Reply::Bound { handle, port: p }) => {
            assert!(port == 0 || p == port);
            handle
        }
        other => panic!("bind: {other:?}"),
    }
}

fn segment(dport: u16, data: &[u8]) -> Vec<u8> {
    let mut s = vec![0u8; 8 + data.len()];
    s[0..2].copy_from_slice(&9u16.to_be_bytes());
    s[2..4].copy_from_slice(&dport.to_be_bytes());
    s[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    s[8..].copy_from_slice(data);
    s
}

#[test]
fn forged_foreign_and_stale_handles_are_refused() {
    let (mut core, mut t, a, b) = setup();
    let h = bind(&mut core, &mut t, a, 7);
    let recv = |h| Call::Recv { handle: h, max: 0, wait: false };
    assert_eq!(call(&mut core, &mut t, a, 2, recv(h)), Some(Reply::Err(SocketError::WouldBlock)), "the owner may");
    let forged = Handle { secret: h.secret ^ 1, ..h };
    assert_eq!(call(&mut core, &mut t, a, 3, recv(forged)), Some(Reply::Err(SocketError::BadHandle)), "forged");
    assert_eq!(call(&mut core, &mut t, b, 4, recv(h)), Some(Reply::Err(SocketError::BadHandle)), "foreign");
    let guessed = Handle { slot: 99, ..h };
    assert_eq!(call(&mut core, &mut t, a, 5, recv(guessed)), Some(Reply::Err(SocketError::BadHandle)), "no such slot");
    assert_eq!(call(&mut core, &mut t, a, 6, Call::Close { handle: h }), Some(Reply::Done));
    assert_eq!(call(&mut core, &mut t, a, 7, recv(h)), Some(Reply::Err(SocketError::StaleHandle)), "closed");
    let again = bind(&mut core, &mut t, a, 7);
    assert_eq!(again.slot, h.slot, "the slot is reused");
    assert_eq!(call(&mut core, &mut t, a, 8, recv(h)), Some(Reply::Err(SocketError::StaleHandle)), "old generation");
    assert_eq!(call(&mut core, &mut t, a, 9, recv(again)), Some(Reply::Err(SocketError::WouldBlock)));
}

#[test]
fn a_parked_receive_completes_when_data_arrives_or_is_cancelled() {
    let (mut core, mut t, a, _) = setup();
    let h = bind(&mut core, &mut t, a, 7);
    assert_eq!(call(&mut core, &mut t, a, 10, Call::Recv { handle: h, max: 0, wait: true }), None, "parked");
    t.udp.receive(PEER, US, &segment(7, b"hello"), &[0x45; 20]);
    core.poll_ready(&mut t);
    let (to, r) = core.pop_response().expect("completed");
    assert_eq!((to, r.id), (a, 10));
    assert_eq!(r.reply, datagrams(&[b"hello"]));
    assert_eq!(call(&mut core, &mut t, a, 11, Call::Recv { handle: h, max: 0, wait: true }), None);
    core.request(a, Request { id: 12, call: Call::Cancel { id: 11 } }, &mut t);
    let (_, parked) = core.pop_response().expect("the parked receive's answer");
    assert_eq!((parked.id, parked.reply), (11, Reply::Err(SocketError::TimedOut)), "the parked one times out");
    let (_, done) = core.pop_response().expect("cancel's own reply");
    assert_eq!((done.id, done.reply), (12, Reply::Done));
}

#[test]
fn one_receive_takes_every_queued_datagram_and_the_next_ones_are_answered_from_them() {
    let (mut core, mut t, a, _) = setup();
    let h = bind(&mut core, &mut t, a, 7);
    for i in 0..5u8 {
        t.udp.receive(PEER, US, &segment(7, &[i; 3]), &[0x45; 20]);
    }
    for i in 0..5u8 {
        let r = call(&mut core, &mut t, a, 20 + u64::from(i), Call::Recv { handle: h, max: 0, wait: false });
        assert_eq!(r, Some(datagrams(&[&[i; 3]])), "in order");
        // The first receive took all five from the udp side in one call.
        assert_eq!(t.udp_recvs, 1, "receive {i}");
        if i == 0 {
            let poll =
                call(&mut core, &mut t, a, 30, Call::Poll { items: vec![(h, capnet_sockets::READABLE)], wait: false });
            assert_eq!(
                poll,
                Some(Reply::Ready { events: vec![(0, capnet_sockets::READABLE)] }),
                "readable from its own queue"
            );
        }
    }
    let r = call(&mut core, &mut t, a, 40, Call::Recv { handle: h, max: 0, wait: false });
    assert_eq!(r, Some(Reply::Err(SocketError::WouldBlock)), "all five taken");
    assert_eq!(t.udp_recvs, 2, "the empty queue asked the udp side again");
}

/// What a receive of these datagrams from the peer's port 9 answers.
fn datagrams(data: &[&[u8]]) -> Reply {
    let datagrams = data.iter().map(|d| Incoming { from: (PEER.octets(), 9), data: d.to_vec() }).collect();
    Reply::Datagrams { datagrams }
}

/// A send of these datagrams, all to `to`.
fn send(to: Option<([u8; 4], u16)>, handle: Handle, data: &[&[u8]]) -> Call {
    Call::UdpSend { handle, datagrams: data.iter().map(|d| Outgoing { to, data: d.to_vec() }).collect() }
}

/// One call moves several datagrams each way (like `recvmmsg` and
/// `sendmmsg`); a batched send reports how many went, an error only when the
/// first could not.
#[test]
fn datagrams_move_in_batches_both_ways() {
    let (mut core, mut t, a, _) = setup();
    let h = bind(&mut core, &mut t, a, 7);
    for i in 0..5u8 {
        t.udp.receive(PEER, US, &segment(7, &[i; 3]), &[0x45; 20]);
    }
    let r = call(&mut core, &mut t, a, 1, Call::Recv { handle: h, max: 3, wait: false });
    assert_eq!(r, Some(datagrams(&[&[0; 3], &[1; 3], &[2; 3]])), "the first three, in order");
    let r = call(&mut core, &mut t, a, 2, Call::Recv { handle: h, max: 64, wait: false });
    assert_eq!(r, Some(datagrams(&[&[3; 3], &[4; 3]])), "what is left");
    let to = Some((PEER.octets(), 9));
    let r = call(&mut core, &mut t, a, 3, send(to, h, &[b"one", b"two", b"six"]));
    assert_eq!(r, Some(Reply::Sent { n: 3 }));
    let mut sent = Vec::new();
    while let Some(capnet_udp::Output::Send { segment, .. }) = t.udp.pop_output() {
        sent.push(segment[8..].to_vec());
    }
    assert_eq!(sent, [b"one", b"two", b"six"], "each its own datagram, in order");
    // The second has no destination: the first went, the rest did not.
    let mixed = Call::UdpSend {
        handle: h,
        datagrams: vec![
            Outgoing { to, data: vec![1] },
            Outgoing { to: None, data: vec![2] },
            Outgoing { to, data: vec![3] },
        ],
    };
    assert_eq!(call(&mut core, &mut t, a, 4, mixed), Some(Reply::Sent { n: 1 }));
}

#[test]
fn sends_go_out_and_detach_closes_everything() {
    let (mut core, mut t, a, b) = setup();
    let h = bind(&mut core, &mut t, a, 5000);
    let data = vec![7u8; 1000];
    let r = call(&mut core, &mut t, a, 2, send(Some((PEER.octets(), 9)), h, &[&data]));
    assert_eq!(r, Some(Reply::Sent { n: 1 }));
    assert!(matches!(t.udp.pop_output(), Some(capnet_udp::Output::Send { dst, .. }) if dst == PEER));
    let r = call(&mut core, &mut t, a, 3, send(None, h, &[&[1]]));
    assert_eq!(r, Some(Reply::Err(SocketError::NoDestination)));
    assert_eq!(call(&mut core, &mut t, b, 4, Call::UdpBind { port: 5000 }), Some(Reply::Err(SocketError::AddrInUse)));
    core.detach(a, &mut t);
    assert!(
        matches!(call(&mut core, &mut t, b, 5, Call::UdpBind { port: 5000 }), Some(Reply::Bound { .. })),
        "port freed by detach"
    );
    assert_eq!(
        call(&mut core, &mut t, a, 6, Call::UdpBind { port: 1 }),
        Some(Reply::Err(SocketError::BadHandle)),
        "a detached app is gone"
    );
}

#[test]
fn echo_sockets_send_requests_and_receive_their_replies() {
    let (mut core, mut t, a, _) = setup();
    let Some(Reply::Bound { handle, port: ident }) = call(&mut core, &mut t, a, 1, Call::EchoOpen) else { panic!() };
    let r = call(&mut core, &mut t, a, 2, Call::EchoSend { handle, dst: PEER.octets(), seq: 1, data: b"abc".to_vec() });
    assert_eq!(r, Some(Reply::Done));
    assert_eq!(t.echoes, vec![(PEER, ident, 1, b"abc".to_vec())]);
    core.echo_reply(ident, PEER, 1, b"abc".to_vec());
    let r = call(&mut core, &mut t, a, 3, Call::Recv { handle, max: 0, wait: true });
    assert_eq!(r, Some(Reply::EchoReply { from: PEER.octets(), seq: 1, data: b"abc".to_vec() }));
    let udp = bind(&mut core, &mut t, a, 7);
    let r = call(&mut core, &mut t, a, 4, Call::EchoSend { handle: udp, dst: PEER.octets(), seq: 1, data: vec![] });
    assert_eq!(r, Some(Reply::Err(SocketError::WrongKind)));
    assert_eq!(call(&mut core, &mut t, a, 5, Call::Close { handle }), Some(Reply::Done));
    assert!(t.claimed.is_empty(), "the identifier is released");
}

#[test]
fn tcp_accept_connect_and_poll_park_until_ready() {
    let (mut core, mut t, a, b) = setup();
    let Some(Reply::Bound { handle: l, port }) =
        call(&mut core, &mut t, a, 1, Call::TcpListen { port: 80, backlog: 8 })
    else {
        panic!()
    };
    assert_eq!(port, 80);
    assert_eq!(call(&mut core, &mut t, a, 2, Call::TcpAccept { handle: l, wait: true }), None, "parked");
    let Some(Reply::Bound { handle: c, port: cport }) =
        call(&mut core, &mut t, b, 3, Call::TcpConnect { addr: US.octets(), port: 80 })
    else {
        panic!()
    };
    assert_eq!(call(&mut core, &mut t, b, 4, Call::TcpConnected { handle: c, wait: true }), None, "handshaking");
    assert_eq!(call(&mut core, &mut t, b, 5, Call::Recv { handle: c, max: 100, wait: true }), None);
    t.loop_tcp();
    core.poll_ready(&mut t);
    let mut got: Vec<(AppId, Response)> = std::iter::from_fn(|| core.pop_response()).collect();
    got.sort_by_key(|(_, r)| r.id);
    let Reply::Accepted { handle: s, port: 80, peer } = got[0].1.reply.clone() else { panic!("{got:?}") };
    assert_eq!(peer, (US.octets(), cport));
    assert_eq!(got[1].1, Response { id: 4, reply: Reply::Done });
    assert_eq!(got.len(), 2, "the receive stays parked");
    // A write on one side completes the other's parked receive.
    assert_eq!(
        call(&mut core, &mut t, a, 6, Call::TcpSend { handle: s, data: b"hello".to_vec().into() }),
        Some(Reply::Sent { n: 5 })
    );
    t.loop_tcp();
    core.poll_ready(&mut t);
    let (_, r) = core.pop_response().expect("data");
    assert_eq!(r, Response { id: 5, reply: Reply::Data { data: b"hello"[..].into() } });
    // Poll: writable now, readable after the peer's FIN.
    let items = vec![(c, capnet_sockets::READABLE)];
    assert_eq!(call(&mut core, &mut t, b, 7, Call::Poll { items: items.clone(), wait: true }), None);
    assert_eq!(
        call(&mut core, &mut t, a, 8, Call::TcpShutdown { handle: s, read: false, write: true }),
        Some(Reply::Done)
    );
    t.loop_tcp();
    core.poll_ready(&mut t);
    let (_, r) = core.pop_response().expect("ready");
    assert_eq!(r, Response { id: 7, reply: Reply::Ready { events: vec![(0, capnet_sockets::READABLE)] } });
    assert_eq!(
        call(&mut core, &mut t, b, 9, Call::Recv { handle: c, max: 100, wait: true }),
        Some(Reply::Data { data: capnet_sockets::Chain::new() }),
        "EOF"
    );
    // The other application cannot touch these sockets.
    assert_eq!(
        call(&mut core, &mut t, a, 10, Call::TcpSend { handle: c, data: vec![1].into() }),
        Some(Reply::Err(SocketError::BadHandle))
    );
}

#[test]
fn a_restarted_transport_resets_its_sockets_and_spares_the_others() {
    let (mut core, mut t, a, _) = setup();
    let u = bind(&mut core, &mut t, a, 7);
    let l = match call(&mut core, &mut t, a, 1, Call::TcpListen { port: 80, backlog: 4 }) {
        Some(Reply::Bound { handle, .. }) => handle,
        r => panic!("listen: {r:?}"),
    };
    assert_eq!(call(&mut core, &mut t, a, 2, Call::TcpAccept { handle: l, wait: true }), None, "parked");
    core.transport_lost(capnet_sockets::Lost::Tcp);
    let (_, r) = core.pop_response().expect("the parked accept is answered at once");
    assert_eq!((r.id, r.reply), (2, Reply::Err(SocketError::Reset)));
    assert_eq!(
        call(&mut core, &mut t, a, 3, Call::TcpAccept { handle: l, wait: false }),
        Some(Reply::Err(SocketError::Reset)),
        "and every later call on it"
    );
    assert_eq!(call(&mut core, &mut t, a, 4, Call::Close { handle: l }), Some(Reply::Done), "it can be closed");
    // The UDP socket is untouched.
    let r = call(&mut core, &mut t, a, 5, send(Some((PEER.octets(), 9)), u, &[&[1]]));
    assert_eq!(r, Some(Reply::Sent { n: 1 }));
}

#[test]
fn a_replaced_udp_domain_gets_every_socket_bound_again() {
    let (mut core, mut t, a, _) = setup();
    let h = bind(&mut core, &mut t, a, 5353);
    let r = call(&mut core, &mut t, a, 1, Call::UdpConnect { handle: h, addr: PEER.octets(), port: 53 });
    assert_eq!(r, Some(Reply::Done));
    // A new udp domain with none of the old one's sockets.
    t.udp = UdpCore::new(US, 1 << 16);
    core.udp_replaced(&mut t);
    let r = call(&mut core, &mut t, a, 2, send(None, h, &[b"again"]));
    assert_eq!(r, Some(Reply::Sent { n: 1 }), "the same handle, connected as before");
    match t.udp.pop_output() {
        Some(capnet_udp::Output::Send { dst, segment }) => {
            assert_eq!(dst, PEER);
            assert_eq!(u16::from_be_bytes([segment[0], segment[1]]), 5353, "from the same port");
            assert_eq!(u16::from_be_bytes([segment[2], segment[3]]), 53, "to the same peer");
        }
        o => panic!("no datagram: {o:?}"),
    }
}

/// Issue 18, finding 7: one application claimed all 16,384 echo identifiers in
/// 0.9 s, or every ephemeral port with binds, and one poll of 40,000 copies of
/// a handle, parked and looked at again every round, slowed everyone else.
/// Every application now has quotas: past one a call is refused with a clear
/// error, the application keeps what it has, the others are untouched, and
/// closing gives the quota back.
#[test]
fn every_application_has_quotas_and_the_others_keep_theirs() {
    use capnet_sockets::Quotas;
    let q = Quotas { sockets: 8, echo: 2, parked: 3, polled: 6 };
    let (_, mut t, _, _) = setup();
    let mut core = SocketsCore::with_quotas(q);
    let (a, b) = (core.attach(1), core.attach(2));
    let quota = |r: Option<Reply>, what: &str| match r {
        Some(Reply::Err(SocketError::Quota { what: w, .. })) => assert_eq!(w, what),
        other => panic!("{what}: refused by quota, not {other:?}"),
    };
    // Echo identifiers: two, then refused; b still gets its own.
    for i in 0..2 {
        assert!(matches!(call(&mut core, &mut t, a, 10 + i, Call::EchoOpen), Some(Reply::Bound { .. })));
    }
    quota(call(&mut core, &mut t, a, 12, Call::EchoOpen), "echo sockets");
    assert_eq!(t.claimed.len(), 2, "the refused open claimed no identifier");
    assert!(matches!(call(&mut core, &mut t, b, 13, Call::EchoOpen), Some(Reply::Bound { .. })));
    // Sockets of every kind: eight in all for a.
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(bind(&mut core, &mut t, a, 0));
        let _ = i;
    }
    quota(call(&mut core, &mut t, a, 20, Call::UdpBind { port: 0 }), "sockets");
    quota(call(&mut core, &mut t, a, 21, Call::TcpListen { port: 0, backlog: 4 }), "sockets");
    quota(call(&mut core, &mut t, a, 22, Call::TcpConnect { addr: PEER.octets(), port: 80 }), "sockets");
    assert!(matches!(call(&mut core, &mut t, b, 23, Call::UdpBind { port: 0 }), Some(Reply::Bound { .. })));
    // Closing gives the quota back.
    assert!(matches!(call(&mut core, &mut t, a, 24, Call::Close { handle: held.pop().unwrap() }), Some(Reply::Done)));
    held.push(bind(&mut core, &mut t, a, 0));
    // Parked calls: three blocked receives, the fourth refused at once.
    for (k, h) in held.iter().take(3).enumerate() {
        assert_eq!(call(&mut core, &mut t, a, 30 + k as u64, Call::Recv { handle: *h, max: 0, wait: true }), None);
    }
    quota(call(&mut core, &mut t, a, 33, Call::Recv { handle: held[3], max: 0, wait: true }), "parked calls");
    // A poll larger than the quota is refused before anything is looked at.
    let many = vec![(held[0], capnet_sockets::READABLE); 7];
    quota(call(&mut core, &mut t, b, 34, Call::Poll { items: many, wait: true }), "polled items");
    // Detaching frees everything: a new application starts with its full quotas.
    core.detach(a, &mut t);
    assert!(t.claimed.len() == 1, "a's identifiers were released");
    let c = core.attach(3);
    for i in 0..2 {
        assert!(matches!(call(&mut core, &mut t, c, 40 + i, Call::EchoOpen), Some(Reply::Bound { .. })));
    }
}
