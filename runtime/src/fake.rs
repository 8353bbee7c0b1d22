//! Fake groups: the groups of a graph inside one test process, joined by the
//! same ipc message channels as between processes (memfd regions: no root, no
//! TAP), on one simulated [`Clock`]; a second stack — the peer — sits on the
//! other end of an in-memory wire in place of the driver, the device and the
//! Linux kernel.
//!
//! Everything runs in the caller's thread, in rounds: [`FakeGraph::step`] runs
//! one round of every group and moves the frames on the wire, and
//! [`FakeGraph::run`] steps while moving the clock on. The test plays the
//! application: it calls the transports through the sockets group's
//! [`Transports`](capnet_sockets::Transports) (`FakeGraph::sockets`), as the
//! sockets core would. A call over a link waits for its answer as between
//! processes, but instead of sleeping it runs a round of the other groups, which
//! live in this thread.
//!
//! A test may also play one end of an edge itself ([`FakeGraph::factored_with`]):
//! it gets that end's raw channel and writes whatever a hostile domain would.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use capnet_ip::{Config, EthernetAddress, Ipv4Address, Ipv4Cidr};
use capnet_ipc::lent::{Chain, Lent};
use capnet_ipc::msg::{MsgEnd, MsgHalf};
use capnet_proto::{end_of, Kind};

use crate::link::Idle;
use crate::{Clock, Cores, RuntimeError, Stack};

/// The stack's address on the fake wire.
pub const STACK: Ipv4Address = Ipv4Address::new(10, 77, 0, 2);
/// The peer's.
pub const PEER: Ipv4Address = Ipv4Address::new(10, 77, 0, 1);

/// Rounds [`FakeGraph::step`] runs at one instant before it lets time move on,
/// at most (a quiet graph stops earlier).
const ROUNDS_PER_TICK: usize = 64;
/// How far [`FakeGraph::run`] moves the clock between rounds.
const TICK: Duration = Duration::from_millis(1);

/// A graph of fake groups and its peer.
#[derive(Debug)]
pub struct FakeGraph {
    /// The clock every group and the peer run on.
    pub clock: Clock,
    /// The group of the sockets domain: the test's way in (`Transports`).
    pub sockets: Cores,
    world: Arc<Mutex<World>>,
}

/// Everything but the sockets group: what a waiting call runs.
#[derive(Debug)]
struct World {
    /// The other groups, by name.
    groups: Vec<(String, Cores)>,
    /// The stack at the other end of the wire.
    peer: Cores,
    /// Frames on the wire, each way.
    to_peer: Vec<Vec<u8>>,
    to_stack: Vec<Vec<u8>>,
    /// Groups that no longer run.
    muted: Vec<String>,
}

fn broken_links(c: &mut Cores) -> impl Iterator<Item = String> + '_ {
    c.links().filter_map(|l| l.broken().map(str::to_owned))
}

fn lock(world: &Mutex<World>) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(|e| e.into_inner())
}

fn ipc(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Ipc(e.to_string())
}

fn config(addr: Ipv4Address, mac: u8) -> Config {
    Config::new(EthernetAddress([2, 0, 0, 0, 0, mac]), Ipv4Cidr::new(addr, 24))
}

/// A channel between domain `a` of one group and domain `b` of another: both
/// ends, as the supervisor would join them.
pub fn channel(a: Kind, b: Kind) -> Result<(MsgEnd, MsgEnd), RuntimeError> {
    let (ea, eb) = (end_of(a, b), end_of(b, a));
    let (ha, hb) = (MsgHalf::new("capnet-fake", ea).map_err(ipc)?, MsgHalf::new("capnet-fake", eb).map_err(ipc)?);
    let (ga, gb) = (ha.grant().map_err(ipc)?, hb.grant().map_err(ipc)?);
    Ok((ha.attach(ea, gb).map_err(ipc)?, hb.attach(eb, ga).map_err(ipc)?))
}

/// The message edges of the default (fully factored) graph, minus driver | ip.
pub const EDGES: [(Kind, Kind); 5] = [
    (Kind::Ip, Kind::Tcp),
    (Kind::Ip, Kind::Udp),
    (Kind::Ip, Kind::Sockets),
    (Kind::Sockets, Kind::Tcp),
    (Kind::Sockets, Kind::Udp),
];

impl World {
    fn group(&mut self, kind: Kind) -> Option<&mut Cores> {
        self.groups.iter_mut().find(|(n, _)| n == kind.name()).map(|(_, c)| c)
    }

    /// One round of every group and of the peer, the wire carrying what they
    /// sent; whether anything moved.
    fn round(&mut self) -> bool {
        let mut any = false;
        let World { groups, peer, to_peer, to_stack, muted } = self;
        for (_, g) in groups.iter_mut().filter(|(n, _)| !muted.contains(n)) {
            any |= g.receive_links();
            if g.ip.is_some() {
                for f in to_stack.drain(..) {
                    any = true;
                    g.receive_frame(&Chain::from(Lent::from_vec(f)), false);
                }
            }
            g.pump(|f, _| to_peer.push(f.to_vec()));
        }
        for f in to_peer.drain(..) {
            any = true;
            peer.receive_frame(&Chain::from(Lent::from_vec(f)), false);
        }
        peer.pump(|f, _| to_stack.push(f.to_vec()));
        any |= !to_stack.is_empty();
        any
    }
}

impl FakeGraph {
    /// Every domain in one group (the mono composition), and the peer.
    pub fn mono() -> Result<Self, RuntimeError> {
        let clock = Clock::sim();
        let mut sockets = Cores::new(config(STACK, 2), 1 << 20);
        sockets.set_clock(clock.clone());
        Ok(Self { world: Self::world(Vec::new(), &clock), sockets, clock })
    }

    /// Every domain its own group (the default graph without the driver, whose
    /// place the wire takes), and the peer.
    pub fn factored() -> Result<Self, RuntimeError> {
        Ok(Self::factored_with(None)?.0)
    }

    /// As [`FakeGraph::factored`], but the test plays domain `a` towards domain
    /// `b` on that edge: it gets `a`'s end of the channel, the graph's `b` holds
    /// the other. `None`: every domain is the graph's.
    pub fn factored_with(hostile: Option<(Kind, Kind)>) -> Result<(Self, Option<MsgEnd>), RuntimeError> {
        let clock = Clock::sim();
        let mut groups: Vec<(String, Cores)> = [Kind::Ip, Kind::Tcp, Kind::Udp]
            .into_iter()
            .map(|k| {
                let mut c = Cores::group(&[k], config(STACK, 2), 1 << 20);
                c.set_clock(clock.clone());
                (k.name().to_owned(), c)
            })
            .collect();
        let mut sockets = Cores::group(&[Kind::Sockets], config(STACK, 2), 1 << 20);
        sockets.set_clock(clock.clone());
        let mut played = None;
        for (a, b) in EDGES {
            let (end_a, end_b) = channel(a, b)?;
            let mut join = |kind: Kind, other: Kind, end: MsgEnd| -> Result<(), RuntimeError> {
                if hostile == Some((kind, other)) {
                    played = Some(end);
                    return Ok(());
                }
                match kind {
                    Kind::Sockets => sockets.replace_link(kind, other, end),
                    _ => match groups.iter_mut().find(|(n, _)| n == kind.name()) {
                        Some((_, g)) => g.replace_link(kind, other, end),
                        None => Err(RuntimeError::Ipc(format!("no {kind} group"))),
                    },
                }
            };
            join(a, b, end_a)?;
            join(b, a, end_b)?;
        }
        let world = Self::world(groups, &clock);
        let mut g = Self { world, sockets, clock };
        g.wire_calls();
        Ok((g, played))
    }

    fn world(groups: Vec<(String, Cores)>, clock: &Clock) -> Arc<Mutex<World>> {
        let mut peer = Cores::new(config(PEER, 1), 1 << 20);
        peer.set_clock(clock.clone());
        Arc::new(Mutex::new(World { groups, peer, to_peer: Vec::new(), to_stack: Vec::new(), muted: Vec::new() }))
    }

    /// Calls from the sockets group run the other groups while they wait.
    fn wire_calls(&mut self) {
        let world = self.world.clone();
        let idle = Idle(Arc::new(move || {
            let mut w = world.lock().unwrap_or_else(|e| e.into_inner());
            w.round();
        }));
        for l in &mut self.sockets.sockets.tcp {
            l.idle = Some(idle.clone());
        }
        for l in &mut self.sockets.sockets.udp {
            l.idle = Some(idle.clone());
        }
        for l in &mut self.sockets.sockets.ip {
            l.idle = Some(idle.clone());
        }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        lock(&self.world)
    }

    /// Runs `f` on the peer stack.
    pub fn peer<R>(&mut self, f: impl FnOnce(&mut Cores) -> R) -> R {
        f(&mut self.lock().peer)
    }

    /// Runs `f` on the group that runs domain `kind` (the sockets group is
    /// [`FakeGraph::sockets`]; in the mono graph it holds every domain).
    pub fn group<R>(&mut self, kind: Kind, f: impl FnOnce(&mut Cores) -> R) -> R {
        let mut w = lock(&self.world);
        match w.group(kind) {
            Some(g) => f(g),
            None => f(&mut self.sockets),
        }
    }

    /// Replaces the group running `kind` by a fresh one (its domain restarted
    /// without state), joined to its neighbours by fresh channels in place of
    /// the old ones, as the supervisor relinks a restarted group.
    pub fn restart(&mut self, kind: Kind) -> Result<(), RuntimeError> {
        let mut fresh = Cores::group(&[kind], config(STACK, 2), 1 << 20);
        fresh.set_clock(self.clock.clone());
        for (a, b) in EDGES {
            let other = match (a == kind, b == kind) {
                (true, _) => b,
                (_, true) => a,
                _ => continue,
            };
            let (mine, theirs) = channel(kind, other)?;
            fresh.replace_link(kind, other, mine)?;
            match other {
                Kind::Sockets => self.sockets.replace_link(other, kind, theirs)?,
                _ => {
                    let mut w = self.lock();
                    let g = w.group(other).ok_or_else(|| RuntimeError::Ipc(format!("no {other} group")))?;
                    g.replace_link(other, kind, theirs)?;
                }
            }
        }
        {
            let mut w = self.lock();
            let slot = w.groups.iter_mut().find(|(n, _)| n == kind.name());
            let slot = slot.ok_or_else(|| RuntimeError::Ipc(format!("no {kind} group to restart")))?;
            slot.1 = fresh;
        }
        self.wire_calls();
        Ok(())
    }

    /// A second tcp domain joins beside the present one (`capnet swap tcp`),
    /// as a group of its own named `name`.
    pub fn swap_tcp(&mut self, name: &str) -> Result<(), RuntimeError> {
        let mut fresh = Cores::group(&[Kind::Tcp], config(STACK, 2), 1 << 20);
        fresh.set_clock(self.clock.clone());
        let (to_ip, ip_side) = channel(Kind::Tcp, Kind::Ip)?;
        let (to_sockets, sockets_side) = channel(Kind::Tcp, Kind::Sockets)?;
        fresh.replace_link(Kind::Tcp, Kind::Ip, to_ip)?;
        fresh.replace_link(Kind::Tcp, Kind::Sockets, to_sockets)?;
        self.sockets.tcp_beside(Kind::Sockets, sockets_side)?;
        {
            let mut w = self.lock();
            let ip = w.group(Kind::Ip).ok_or_else(|| RuntimeError::Ipc("no ip group".into()))?;
            ip.tcp_beside(Kind::Ip, ip_side)?;
            w.groups.push((name.to_owned(), fresh));
        }
        self.wire_calls();
        Ok(())
    }

    /// Runs `f` on the group named `name` (a swapped-in tcp domain's).
    pub fn named<R>(&mut self, name: &str, f: impl FnOnce(&mut Cores) -> R) -> Option<R> {
        let mut w = self.lock();
        w.groups.iter_mut().find(|(n, _)| n == name).map(|(_, c)| f(c))
    }

    /// The old tcp domain is gone: the others drop it (`Control::Retired`).
    pub fn retire_tcp(&mut self) {
        self.sockets.tcp_retired();
        let mut w = self.lock();
        if let Some(ip) = w.group(Kind::Ip) {
            ip.tcp_retired();
        }
        w.groups.retain(|(n, _)| n != "tcp");
    }

    /// One round of every group at this instant, the wire carrying their
    /// frames; whether anything moved.
    pub fn step(&mut self) -> bool {
        let mut any = self.sockets.receive_links();
        let mut w = self.world.lock().unwrap_or_else(|e| e.into_inner());
        if self.sockets.ip.is_some() {
            for f in w.to_stack.drain(..).collect::<Vec<_>>() {
                any = true;
                self.sockets.receive_frame(&Chain::from(Lent::from_vec(f)), false);
            }
        }
        let mut out = Vec::new();
        self.sockets.pump(|f, _| out.push(f.to_vec()));
        w.to_peer.extend(out);
        any |= w.round();
        any
    }

    /// Rounds until nothing moves at this instant (at most a bound).
    pub fn settle(&mut self) {
        for _ in 0..ROUNDS_PER_TICK {
            if !self.step() {
                break;
            }
        }
    }

    /// Runs for `d` of simulated time: settles, moves the clock a tick, and again.
    pub fn run(&mut self, d: Duration) {
        let mut left = d;
        loop {
            self.settle();
            if left.is_zero() {
                return;
            }
            let t = TICK.min(left);
            self.clock.advance(t);
            left -= t;
        }
    }

    /// Runs until `done` holds, for at most `max` of simulated time; whether it did.
    pub fn run_until(&mut self, max: Duration, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        let mut spent = Duration::ZERO;
        while spent <= max {
            self.settle();
            if done(self) {
                return true;
            }
            self.clock.advance(TICK);
            spent += TICK;
        }
        false
    }

    /// Every broken link of every group (the sockets group's included), with
    /// the group's name.
    pub fn broken(&mut self) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> =
            broken_links(&mut self.sockets).map(|why| ("sockets".into(), why)).collect();
        let mut w = self.lock();
        for (n, g) in w.groups.iter_mut() {
            all.extend(broken_links(g).map(|why| (n.clone(), why)));
        }
        all
    }

    /// The group named `name` stops running (a silent domain: its channels stay
    /// open, nobody reads them).
    pub fn mute(&mut self, name: &str) {
        self.lock().muted.push(name.to_owned());
    }
}

/// A fake graph is a composition like the others: polling it runs it for that
/// long in simulated time, and its cores are the sockets group's (whose
/// `Transports` reach every transport, wherever it runs).
impl Stack for FakeGraph {
    fn poll(&mut self, max_wait: Duration) -> Result<(), RuntimeError> {
        self.run(max_wait);
        Ok(())
    }

    fn cores(&mut self) -> &mut Cores {
        &mut self.sockets
    }
}
