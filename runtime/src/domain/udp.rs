//! The udp domain's runtime: its core and its links to ip and to the sockets
//! domain when those run in other groups.

use capnet_proto::app::SocketError;
use capnet_proto::edge::{Answer, IpToUdp, SocketsToUdp, UdpCall, UdpToIp, UdpToSockets};
use capnet_udp::{SocketId, UdpCore};

use crate::link::Link;

/// The udp domain of a group.
#[derive(Debug)]
pub struct UdpDomain {
    /// Its core.
    pub core: UdpCore,
    /// To the ip domain, if it runs in another group.
    pub(crate) ip: Vec<Link<UdpToIp, IpToUdp>>,
    /// To the sockets domain, if it runs in another group.
    pub(crate) sockets: Vec<Link<UdpToSockets, SocketsToUdp>>,
    /// The core saw traffic this round (an activity notice is due to a sockets
    /// domain in another group).
    pub(crate) touched: bool,
}

impl UdpDomain {
    pub(crate) fn new(core: UdpCore) -> Self {
        Self { core, ip: Vec::new(), sockets: Vec::new(), touched: false }
    }

    /// Takes what ip and the sockets domain sent; whether anything arrived.
    pub(crate) fn receive_links(&mut self) -> bool {
        let mut any = false;
        let Self { core, ip, sockets, touched } = self;
        let ip4 = capnet_ip::Ipv4Address::from;
        for l in ip.iter_mut() {
            l.recv(|l, m| {
                any = true;
                *touched = true;
                match m {
                    IpToUdp::Deliver(batch) => {
                        for d in batch {
                            match d.payload.inline() {
                                Some(b) => core.receive(ip4(d.src), ip4(d.dst), b, &d.ip_header),
                                None => {
                                    l.protocol_error("it lent bytes on an edge that carries them inline".into());
                                    break;
                                }
                            }
                        }
                    }
                    IpToUdp::Icmp(e) => core.on_icmp(
                        e.local_port,
                        ip4(e.remote),
                        e.remote_port,
                        e.icmp_type,
                        e.icmp_code,
                        ip4(e.reporter),
                    ),
                }
            });
        }
        for l in sockets.iter_mut() {
            l.recv(|l, SocketsToUdp::Call { id, call }| {
                any = true;
                l.activity_sent = false;
                let answer = serve(core, call);
                l.send(&UdpToSockets::Answer { id, answer });
            });
        }
        any
    }
}

/// Answers a call of the sockets domain with the udp core (here or from another
/// group): the one place a `UdpCall` becomes the core's method.
pub fn serve<P: AsRef<[u8]>>(core: &mut UdpCore, call: UdpCall<P>) -> Result<Answer, SocketError> {
    let e = capnet_sockets::udp_error;
    let id = SocketId::from_raw;
    Ok(match call {
        UdpCall::Bind { port } => Answer::Id(core.bind(port).map_err(e)?.to_raw()),
        UdpCall::Port { s } => Answer::Port(core.local_port(id(s)).map_err(e)?),
        UdpCall::Connect { s, addr, port } => {
            core.connect(id(s), addr.into(), port).map_err(e)?;
            Answer::Done
        }
        UdpCall::Send { s, to, data } => {
            core.send_to(id(s), to.map(|(a, p)| (a.into(), p)), data.as_ref()).map_err(e)?;
            Answer::Done
        }
        UdpCall::Recv { s, max } => Answer::Datagrams(
            core.recv_many(id(s), max as usize, capnet_sockets::UDP_BATCH_BYTES)
                .map_err(e)?
                .into_iter()
                .map(|d| (d.src.octets(), d.src_port, d.data.into()))
                .collect(),
        ),
        UdpCall::Close { s } => {
            core.close(id(s)).map_err(e)?;
            Answer::Done
        }
    })
}
