//! capnet-proto: what capnet's processes say to each other, and nothing else.
//!
//! - [`app`]: an application ⇄ the sockets domain (the calls `capnet::net` makes);
//! - [`edge`]: one domain ⇄ another across a group boundary (datagrams, transport
//!   calls, pushes);
//! - [`group`]: the supervisor ⇄ a group process (its spec, control, events);
//! - [`frames`]: the driver | ip frame channel's halves as capabilities;
//! - [`report`]: what a group publishes about itself and `capnet status` prints.
//!
//! Types only, with their codecs: no core, no runtime. An application's client
//! library, a group process and the supervisor all depend on this crate, and on
//! nothing of each other.
#![forbid(unsafe_code)]

pub mod app;
pub mod edge;
pub mod frames;
pub mod group;
pub mod report;

use capnet_ipc::End;

/// What a domain is: which core it runs (graph files name them the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Frame I/O on a device.
    Driver,
    /// Ethernet, ARP, IPv4, ICMP, the demux.
    Ip,
    /// TCP connections.
    Tcp,
    /// UDP endpoints.
    Udp,
    /// The socket table applications call.
    Sockets,
}

impl Kind {
    /// Every kind, in the order a stack is built.
    pub const ALL: [Kind; 5] = [Kind::Driver, Kind::Ip, Kind::Tcp, Kind::Udp, Kind::Sockets];

    /// Its name (in graph files, and its seccomp policy's role).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Driver => "driver",
            Kind::Ip => "ip",
            Kind::Tcp => "tcp",
            Kind::Udp => "udp",
            Kind::Sockets => "sockets",
        }
    }

    /// The kind with this name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which end of a channel a kind is: the lower kind (in [`Kind::ALL`] order) is A.
pub fn end_of(local: Kind, remote: Kind) -> End {
    if local < remote {
        End::A
    } else {
        End::B
    }
}
