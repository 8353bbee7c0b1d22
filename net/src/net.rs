//! `capnet::net`: sockets on a running capnet stack, mirroring `std::net`.
//!
//! ```no_run
//! use capnet::net::{Stack, UdpSocket};
//! let stack = Stack::attach("capnet")?;
//! let sock = UdpSocket::bind(&stack, 7)?;
//! let mut buf = [0u8; 65536];
//! let (n, from) = sock.recv_from(&mut buf)?;
//! sock.send_to(&buf[..n], from)?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! TCP the same way:
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use capnet::net::{Stack, TcpListener};
//! let stack = Stack::attach("capnet")?;
//! let listener = TcpListener::bind(&stack, 7)?;
//! let (mut conn, peer) = listener.accept()?;
//! let mut buf = [0u8; 4096];
//! let n = conn.read(&mut buf)?;
//! conn.write_all(&buf[..n])?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! One thread can serve many sockets with [`Stack::poll`] and non-blocking mode.
//!
//! Each application gets its own channel to the sockets domain (see
//! [`crate::attach`]); calls are rkyv messages on it, answered in order of arrival.
//! Calls on one [`Stack`] take turns (a blocking call holds the channel until it
//! completes): threads that block independently attach a `Stack` each.
//! Errors are `io::Error`s with the `ErrorKind` a `std::net` user expects.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capnet_ipc::control::{decode, encode, encode_with};
use capnet_ipc::lent::{Chain, Ledger, Lent, LoanPool, Piece, Returns, Views};
use capnet_ipc::msg::MsgEnd;
use capnet_ipc::notify::{SpinPolicy, SpinTokens};
use capnet_ipc::region::Region;
use capnet_ipc::{Interest, Waiter};
use capnet_proto::app::{Call, Handle, Outgoing, Reply, Request, Response, SocketError, TcpOption, LEND_MIN};
pub use capnet_proto::app::{ERROR, HANGUP, READABLE, UDP_BATCH, WRITABLE};
use capnet_proto::edge::Payload;

fn io_err(e: SocketError) -> io::Error {
    use io::ErrorKind as K;
    let kind = match e {
        SocketError::BadHandle => K::PermissionDenied,
        SocketError::StaleHandle => K::NotConnected,
        SocketError::WrongKind | SocketError::NoDestination | SocketError::TooLarge => K::InvalidInput,
        SocketError::AddrInUse => K::AddrInUse,
        SocketError::WouldBlock => K::WouldBlock,
        SocketError::TimedOut => K::TimedOut,
        SocketError::Refused => K::ConnectionRefused,
        SocketError::NoRoute => K::HostUnreachable,
        SocketError::Icmp(..) => K::Other,
        SocketError::Reset => K::ConnectionReset,
        SocketError::NotConnected => K::NotConnected,
        SocketError::BrokenPipe => K::BrokenPipe,
        SocketError::Invalid(_) => K::InvalidInput,
        SocketError::Quota { .. } => K::QuotaExceeded,
    };
    io::Error::new(kind, e)
}

fn broken(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, format!("the capnet stack went away: {e}"))
}

#[derive(Debug)]
struct Conn {
    msg: MsgEnd,
    sock: UnixStream,
    next_id: u64,
    waiter: Waiter,
    early: HashMap<u64, Reply>,
    /// Ids whose replies nobody waits for (a cancel's own acknowledgment).
    forget: Vec<u64>,
    /// The stack's pools this application was granted at attach: a stream's
    /// bytes may come as loans of their buffers.
    views: Views,
    /// Where those loans go when read (given back on the channel).
    returns: Arc<Returns>,
    tickets: Vec<u64>,
    /// The buffers this application writes the bytes it sends into, lent to
    /// the stack (which keeps them until they are acknowledged).
    send_pool: LoanPool,
    /// What the stack holds of them, by ticket.
    lent: Ledger,
    back: Vec<u64>,
}

/// An attachment to a running stack. Cheap to clone; sockets keep it alive.
#[derive(Debug, Clone)]
pub struct Stack {
    conn: Arc<Mutex<Conn>>,
}

impl Stack {
    /// Whether the stack went away (the supervisor exited or cut this
    /// application off): a `ConnectionReset` then is for good, where otherwise it
    /// may be a transport restarting.
    pub fn is_gone(&self) -> bool {
        self.conn.lock().map_or(true, |c| c.peer_gone())
    }

    /// Attaches to the stack `capnet up` started in namespace `netns`.
    pub fn attach(netns: &str) -> io::Result<Self> {
        let path = crate::attach::app_socket(netns);
        let sock = crate::attach::connect_trusted(&path).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => e,
            kind => {
                let why = format!("capnet is not up in namespace {netns}: start it with `capnet up`");
                io::Error::new(kind, format!("{why} ({}: {e})", path.display()))
            }
        })?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let crate::attach::Joined { msg, pools, send_pool } =
            crate::attach::join(&sock, &format!("capnet-app-{}", std::process::id())).map_err(|e| match e {
                crate::attach::AttachError::Refused(_) => io::Error::new(io::ErrorKind::ConnectionRefused, e),
                e => io::Error::other(e),
            })?;
        let mut views = Views::new();
        for (id, fd) in pools {
            views.add(id, fd).map_err(|e| broken(format!("a pool it granted is no pool: {e}")))?;
        }
        let conn = Conn {
            msg,
            sock,
            next_id: 1,
            waiter: Waiter::new(SpinPolicy::NEVER),
            early: HashMap::new(),
            forget: Vec::new(),
            views,
            returns: Returns::new(),
            tickets: Vec::new(),
            lent: Ledger::new(send_pool.layout().count as usize),
            send_pool,
            back: Vec::new(),
        };
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Makes a call and waits for its reply. Past `timeout`, a parked call is
    /// cancelled and returns `TimedOut`.
    fn call(&self, call: Call, timeout: Option<Duration>) -> io::Result<Reply> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let id = c.next_id;
        c.next_id += 1;
        let deadline = timeout.map(|t| Instant::now() + t);
        let hard = Instant::now() + timeout.unwrap_or(Duration::ZERO) + Duration::from_secs(30);
        encode_with(&Request { id, call }, |bytes| {
            while !c.msg.send(bytes).map_err(broken)? {
                c.pump()?;
                c.wait(Interest::BOTH, Some(Duration::from_millis(10)));
                if Instant::now() > hard || c.peer_gone() {
                    return Err(broken("no room to send"));
                }
            }
            Ok(())
        })
        .map_err(io::Error::other)??;
        let mut cancelled = false;
        loop {
            c.pump()?;
            if let Some(r) = c.early.remove(&id) {
                return match r {
                    Reply::Err(e) => Err(io_err(e)),
                    r => Ok(r),
                };
            }
            let now = Instant::now();
            if let (Some(d), false) = (deadline, cancelled) {
                if now >= d {
                    cancelled = true;
                    let cid = c.next_id;
                    c.next_id += 1;
                    c.forget.push(cid);
                    let b =
                        encode(&Request::<Payload> { id: cid, call: Call::Cancel { id } }).map_err(io::Error::other)?;
                    while !c.msg.send(&b).map_err(broken)? {
                        c.pump()?;
                        c.wait(Interest::BOTH, Some(Duration::from_millis(10)));
                        if Instant::now() > hard || c.peer_gone() {
                            return Err(broken("no room to cancel"));
                        }
                    }
                    continue;
                }
            }
            if now > hard && deadline.is_some() {
                return Err(broken("no reply"));
            }
            if let Some(r) = c.early.remove(&id) {
                return match r {
                    Reply::Err(e) => Err(io_err(e)),
                    r => Ok(r),
                };
            }
            let left = deadline.filter(|_| !cancelled).map(|d| d.saturating_duration_since(now));
            c.wait(Interest::RX, Some(left.unwrap_or(Duration::from_millis(200)).max(Duration::from_micros(100))));
            if !c.early.contains_key(&id) && c.peer_gone() {
                return Err(broken("the supervisor closed the attachment"));
            }
        }
    }
}

/// What a hostile application does (the test-only hostile mode of the client
/// library, with the `hostile` feature only: release builds have none of it). Each one
/// breaks a rule the sockets domain must survive.
#[cfg(feature = "hostile")]
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Hostile {
    /// Lends a message descriptor of this length (its buffer is only a message
    /// buffer long).
    Descriptor(u32),
    /// Asks to receive up to 1000 KiB on this TCP socket this many times and
    /// never reads the replies.
    RecvUnread(Handle, u32),
    /// Writes this byte over every buffer of its send pool, among them those
    /// it lent and the stack still holds.
    ScribbleSends(u8),
    /// Sends on this TCP socket a loan of its send pool past the pool's end
    /// (`false`), or of a pool it was never granted (`true`).
    LendBeyond(Handle, bool),
}

#[cfg(feature = "hostile")]
impl Stack {
    /// Breaks a rule of the channel protocol on purpose (see [`Hostile`]).
    #[doc(hidden)]
    pub fn hostile(&self, what: Hostile) -> io::Result<()> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        match what {
            Hostile::Descriptor(len) => {
                let pool = c.msg.pool_id();
                let flags = capnet_ipc::Descriptor::CONTROL;
                let d = capnet_ipc::Descriptor { pool, flags, index: 0, offset: 0, len };
                c.msg.channel().send(&[d]).map_err(broken)?;
            }
            Hostile::ScribbleSends(byte) => c.send_pool.hostile_scribble(byte),
            Hostile::LendBeyond(handle, foreign) => {
                let mut pool = c.send_pool.key();
                if foreign {
                    pool.gen = pool.gen.wrapping_add(1);
                }
                let index = if foreign { 0 } else { c.send_pool.layout().count };
                let loan = capnet_ipc::lent::Loan { ticket: 1, pool, index, offset: 0, len: 4096 };
                let call = Call::TcpSend { handle, data: Payload::Lent(vec![Piece::Loan(loan)]) };
                let b = encode(&Request::<Payload> { id: 1 << 41, call }).map_err(io::Error::other)?;
                c.msg.send(&b).map_err(broken)?;
            }
            Hostile::RecvUnread(handle, count) => {
                let max = MAX_READ_BYTES as u32;
                for id in 0..u64::from(count) {
                    let b =
                        encode(&Request::<Payload> { id: 1 << 40 | id, call: Call::Recv { handle, max, wait: true } })
                            .map_err(io::Error::other)?;
                    // Sent as room allows (the domain takes each request at once);
                    // replies are never taken, so the domain's outbox grows.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while !c.msg.send(&b).map_err(broken)? {
                        if Instant::now() > deadline || c.peer_gone() {
                            return Ok(());
                        }
                        c.msg.hostile_hold_messages().map_err(broken)?;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Conn {
    fn pump(&mut self) -> io::Result<()> {
        let mut bad = None;
        let (forget, early, tickets) = (&mut self.forget, &mut self.early, &mut self.tickets);
        self.msg
            .recv(|m| match decode::<Response>(m) {
                Ok(r) => match forget.iter().position(|f| *f == r.id) {
                    Some(k) => {
                        forget.swap_remove(k);
                        // Loans in a reply nobody reads go back unread.
                        if let Reply::Data { data: Payload::Lent(pieces) } = &r.reply {
                            tickets.extend(pieces.iter().filter_map(Piece::loan).map(|l| l.ticket));
                        }
                    }
                    None => {
                        early.insert(r.id, r.reply);
                    }
                },
                Err(e) => bad = Some(e),
            })
            .map_err(broken)?;
        self.give_back()?;
        // The stack gave back buffers of ours it held (acknowledged, or not taken).
        self.msg.take_returned_loans(&mut self.back);
        for t in self.back.drain(..) {
            self.lent.returned(t).map_err(|e| broken(format!("it gave back a loan it never had: {e}")))?;
        }
        match bad {
            Some(e) => Err(broken(e)),
            None => Ok(()),
        }
    }

    /// Gives the stack back every loan read (or never to be read).
    fn give_back(&mut self) -> io::Result<()> {
        self.returns.take(&mut self.tickets);
        if !self.tickets.is_empty() {
            self.msg.return_loans(&self.tickets).map_err(broken)?;
            self.tickets.clear();
        }
        Ok(())
    }

    /// `bytes` to send, as the call carries them: written into buffers of our
    /// send pool and lent (the one copy), or — short, or with every buffer out
    /// — copied into the call.
    fn lend(&mut self, bytes: &[u8]) -> Payload {
        if bytes.len() >= LEND_MIN {
            let mut chain = Chain::new();
            if self.send_pool.fill_chain(bytes, &mut chain) {
                return self.lend_chain(&chain);
            }
        }
        capnet_ipc::pool::count_copy(bytes.len());
        Payload::Inline(bytes.to_vec())
    }

    /// `chain` (buffers of our send pool) lent, or — the stack holds its
    /// quota of them — copied into the call (counted).
    fn lend_chain(&mut self, chain: &Chain) -> Payload {
        Payload::lent_or_copied(chain, self.lent.lend_chain(chain, Lent::on_pool))
    }

    /// A stream's bytes as handles: what came in the message, or the stack's
    /// buffers it lent (checked against the pools granted at attach).
    fn bytes(&self, data: Payload) -> io::Result<Chain> {
        data.into_chain(&self.views, &self.returns).map_err(|e| broken(format!("it lent a buffer it may not: {e}")))
    }

    /// Whether the supervisor closed the attachment (it exited, or cut this
    /// application off): nothing will answer any more.
    fn peer_gone(&self) -> bool {
        crate::attach::closed_by_peer(&self.sock)
    }

    fn wait(&mut self, interest: Interest, timeout: Option<Duration>) {
        let end = self.msg.channel();
        end.interest = interest;
        self.waiter.wait(&mut [end], timeout, None::<&SpinTokens<Arc<Region>>>);
    }
}

/// A UDP socket on a capnet stack, like `std::net::UdpSocket`.
#[derive(Debug)]
pub struct UdpSocket {
    sock: Owned,
    port: u16,
    read_timeout: Option<Duration>,
    nonblocking: bool,
}

impl UdpSocket {
    /// Binds `port` on the stack's address (0: an ephemeral port).
    pub fn bind(stack: &Stack, port: u16) -> io::Result<Self> {
        match stack.call(Call::UdpBind { port }, None)? {
            Reply::Bound { handle, port } => {
                Ok(Self { sock: Owned::new(stack, handle), port, read_timeout: None, nonblocking: false })
            }
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// The bound port.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Fixes the peer: `send` goes there and only its datagrams arrive.
    pub fn connect(&self, peer: SocketAddrV4) -> io::Result<()> {
        self.sock
            .stack
            .call(Call::UdpConnect { handle: self.sock.handle, addr: peer.ip().octets(), port: peer.port() }, None)
            .map(drop)
    }

    /// Sends a datagram to `to`.
    pub fn send_to(&self, buf: &[u8], to: SocketAddrV4) -> io::Result<usize> {
        self.send_many(&[(buf, Some(to))]).map(|_| buf.len())
    }

    /// Sends a datagram to the connected peer.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.send_many(&[(buf, None)]).map(|_| buf.len())
    }

    /// Sends datagrams in order, each to its address (`None`: the connected
    /// peer), as few calls as fit ([`UDP_BATCH`] at most in one, like
    /// `sendmmsg`); how many went. An error only when the first could not go:
    /// after that the count says where sending stopped.
    pub fn send_many(&self, datagrams: &[(&[u8], Option<SocketAddrV4>)]) -> io::Result<usize> {
        let mut sent = 0;
        for batch in datagrams.chunks(UDP_BATCH) {
            let datagrams = batch
                .iter()
                .map(|(d, to)| {
                    capnet_ipc::pool::count_copy(d.len());
                    Outgoing { to: to.map(|a| (a.ip().octets(), a.port())), data: d.to_vec() }
                })
                .collect();
            match self.sock.stack.call(Call::UdpSend { handle: self.sock.handle, datagrams }, None) {
                Ok(Reply::Sent { n }) => {
                    sent += n as usize;
                    if (n as usize) < batch.len() {
                        break;
                    }
                }
                Ok(r) => return Err(broken(format!("unexpected reply {r:?}"))),
                Err(e) if sent == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(sent)
    }

    /// Receives a datagram (truncated to `buf`, as std does).
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)> {
        let (data, from) = self.recv_many(1)?.pop().ok_or_else(|| broken("an empty batch of datagrams"))?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        capnet_ipc::pool::count_copy(n);
        Ok((n, from))
    }

    /// Receives up to `max` datagrams in one call (like `recvmmsg`; at most
    /// [`UDP_BATCH`], and about 128 KiB of payload): at least one, in
    /// order, each its bytes (no copy beyond the message's) and its sender.
    /// Blocks, times out and reports as `recv_from` does.
    pub fn recv_many(&self, max: usize) -> io::Result<Vec<(Vec<u8>, SocketAddrV4)>> {
        let wait = !self.nonblocking;
        let max = max.clamp(1, UDP_BATCH) as u32;
        let timeout = if wait { self.read_timeout } else { None };
        match self.sock.stack.call(Call::Recv { handle: self.sock.handle, max, wait }, timeout)? {
            Reply::Datagrams { datagrams } if !datagrams.is_empty() => Ok(datagrams
                .into_iter()
                .map(|d| (d.data, SocketAddrV4::new(Ipv4Addr::from(d.from.0), d.from.1)))
                .collect()),
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// A timeout for `recv_from` (`None`: wait forever).
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        if t == Some(Duration::ZERO) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero timeout is not allowed (as in std)"));
        }
        self.read_timeout = t;
        Ok(())
    }

    /// Non-blocking mode: `recv_from` returns `WouldBlock` when nothing is queued.
    pub fn set_nonblocking(&mut self, on: bool) -> io::Result<()> {
        self.nonblocking = on;
        Ok(())
    }
}

/// An ICMP echo socket (what `capnet ping` uses).
#[derive(Debug)]
pub struct PingSocket {
    sock: Owned,
    ident: u16,
}

impl PingSocket {
    /// Opens one with a free echo identifier.
    pub fn open(stack: &Stack) -> io::Result<Self> {
        match stack.call(Call::EchoOpen, None)? {
            Reply::Bound { handle, port } => Ok(Self { sock: Owned::new(stack, handle), ident: port }),
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Its echo identifier.
    pub fn ident(&self) -> u16 {
        self.ident
    }

    /// Sends an echo request.
    pub fn send(&self, dst: Ipv4Addr, seq: u16, data: &[u8]) -> io::Result<()> {
        self.sock
            .stack
            .call(Call::EchoSend { handle: self.sock.handle, dst: dst.octets(), seq, data: data.to_vec() }, None)
            .map(drop)
    }

    /// Waits up to `timeout` for an echo reply: (from, sequence, data).
    pub fn recv(&self, timeout: Duration) -> io::Result<(Ipv4Addr, u16, Vec<u8>)> {
        match self.sock.stack.call(Call::Recv { handle: self.sock.handle, max: 0, wait: true }, Some(timeout))? {
            Reply::EchoReply { from, seq, data } => Ok((Ipv4Addr::from(from), seq, data)),
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }
}

/// A socket handle this application owns: closed when dropped (unless already
/// gone, e.g. aborted).
#[derive(Debug)]
struct Owned {
    stack: Stack,
    handle: Handle,
    open: Cell<bool>,
}

impl Owned {
    fn new(stack: &Stack, handle: Handle) -> Self {
        Self { stack: stack.clone(), handle, open: Cell::new(true) }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if self.open.get() {
            let _ = self.stack.call(Call::Close { handle: self.handle }, None);
        }
    }
}

/// Something [`Stack::poll`] can watch.
pub trait AsSocket {
    /// The socket's handle.
    fn handle(&self) -> Handle;
}

impl Stack {
    /// Waits until one of `items` (socket, interest: [`READABLE`] | [`WRITABLE`]) is
    /// ready, or `timeout` passes (`None`: no limit; zero: just look). Returns
    /// (index into `items`, ready bits incl. [`ERROR`] and [`HANGUP`]) for the
    /// ready ones — empty on timeout.
    pub fn poll(&self, items: &[(&dyn AsSocket, u8)], timeout: Option<Duration>) -> io::Result<Vec<(usize, u8)>> {
        let wait = timeout != Some(Duration::ZERO);
        let items = items.iter().map(|(s, i)| (s.handle(), *i)).collect();
        match self.call(Call::Poll { items, wait }, timeout.filter(|_| wait)) {
            Ok(Reply::Ready { events }) => Ok(events.into_iter().map(|(i, b)| (i as usize, b)).collect()),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(Vec::new()),
            Err(e) => Err(e),
            Ok(r) => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }
}

/// The default listen backlog (SYN queue and accept queue each).
pub const DEFAULT_BACKLOG: u32 = 256;

/// The most bytes one read asks for (messages stay under the channel's size).
const MAX_READ_BYTES: usize = capnet_proto::app::MAX_TCP_READ;

/// The most bytes one write carries: a quarter of a connection's send buffer. A
/// larger write is only partly taken while the buffer holds data, and the part
/// not taken crossed the channel for nothing (1000 KiB writes doubled the
/// copies per byte sent, `capnet bench`).
const MAX_WRITE_BYTES: usize = 256 * 1024;

/// A TCP listener on a capnet stack, like `std::net::TcpListener`.
#[derive(Debug)]
pub struct TcpListener {
    sock: Owned,
    port: u16,
    nonblocking: Cell<bool>,
}

impl TcpListener {
    /// Listens on `port` (0: an ephemeral port) with the default backlog.
    pub fn bind(stack: &Stack, port: u16) -> io::Result<Self> {
        Self::bind_with_backlog(stack, port, DEFAULT_BACKLOG)
    }

    /// Listens with a SYN queue and accept queue of `backlog` each.
    pub fn bind_with_backlog(stack: &Stack, port: u16, backlog: u32) -> io::Result<Self> {
        match stack.call(Call::TcpListen { port, backlog }, None)? {
            Reply::Bound { handle, port } => {
                Ok(Self { sock: Owned::new(stack, handle), port, nonblocking: Cell::new(false) })
            }
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// The congestion control ("newreno", "cubic") of the connections it accepts.
    pub fn set_congestion_control(&self, name: &str) -> io::Result<()> {
        set_tcp_option(&self.sock, TcpOption::CongestionControl(name.into()))
    }

    /// The port it listens on.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Takes the next connection (waits for one unless non-blocking).
    pub fn accept(&self) -> io::Result<(TcpStream, SocketAddrV4)> {
        let wait = !self.nonblocking.get();
        match self.sock.stack.call(Call::TcpAccept { handle: self.sock.handle, wait }, None)? {
            Reply::Accepted { handle, port, peer: (addr, pport) } => {
                let peer = SocketAddrV4::new(Ipv4Addr::from(addr), pport);
                Ok((TcpStream::new(&self.sock.stack, handle, port, peer), peer))
            }
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Non-blocking mode: `accept` returns `WouldBlock` when nothing is pending.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.nonblocking.set(on);
        Ok(())
    }
}

impl AsSocket for TcpListener {
    fn handle(&self) -> Handle {
        self.sock.handle
    }
}

/// A TCP connection on a capnet stack, like `std::net::TcpStream`.
#[derive(Debug)]
pub struct TcpStream {
    sock: Owned,
    local_port: u16,
    peer: SocketAddrV4,
    read_timeout: Cell<Option<Duration>>,
    write_timeout: Cell<Option<Duration>>,
    nonblocking: Cell<bool>,
    nodelay: Cell<bool>,
}

#[cfg(feature = "hostile")]
impl TcpStream {
    /// Its handle, for the test-only hostile mode ([`Hostile`]).
    #[doc(hidden)]
    pub fn hostile_handle(&self) -> Handle {
        self.sock.handle
    }
}

impl TcpStream {
    fn new(stack: &Stack, handle: Handle, local_port: u16, peer: SocketAddrV4) -> Self {
        Self {
            sock: Owned::new(stack, handle),
            local_port,
            peer,
            read_timeout: Cell::new(None),
            write_timeout: Cell::new(None),
            nonblocking: Cell::new(false),
            nodelay: Cell::new(false),
        }
    }

    /// Connects to `addr`, waiting as long as the SYN retries last (about two
    /// minutes): `ConnectionRefused` on a reset, `TimedOut` without an answer.
    pub fn connect(stack: &Stack, addr: SocketAddrV4) -> io::Result<Self> {
        Self::open(stack, addr, None)
    }

    /// Connects, giving up with `TimedOut` after `timeout` (the attempt is reset).
    pub fn connect_timeout(stack: &Stack, addr: SocketAddrV4, timeout: Duration) -> io::Result<Self> {
        if timeout.is_zero() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero timeout is not allowed (as in std)"));
        }
        Self::open(stack, addr, Some(timeout))
    }

    fn open(stack: &Stack, addr: SocketAddrV4, timeout: Option<Duration>) -> io::Result<Self> {
        let (handle, port) = match stack.call(Call::TcpConnect { addr: addr.ip().octets(), port: addr.port() }, None)? {
            Reply::Bound { handle, port } => (handle, port),
            r => return Err(broken(format!("unexpected reply {r:?}"))),
        };
        let s = Self::new(stack, handle, port, addr);
        match stack.call(Call::TcpConnected { handle, wait: true }, timeout) {
            Ok(_) => Ok(s),
            Err(e) => {
                if e.kind() == io::ErrorKind::TimedOut {
                    let _ = s.abort_in_place();
                }
                Err(e)
            }
        }
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> io::Result<SocketAddrV4> {
        Ok(self.peer)
    }

    /// Our port (the address is the stack's).
    pub fn local_port(&self) -> u16 {
        self.local_port
    }

    /// Shuts down reading, writing (a FIN after what is queued) or both.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let (read, write) = match how {
            Shutdown::Read => (true, false),
            Shutdown::Write => (false, true),
            Shutdown::Both => (true, true),
        };
        self.sock.stack.call(Call::TcpShutdown { handle: self.sock.handle, read, write }, None).map(drop)
    }

    /// Nagle's algorithm off (`true`) or on.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.option(TcpOption::NoDelay(on))?;
        self.nodelay.set(on);
        Ok(())
    }

    /// Whether Nagle's algorithm is off.
    pub fn nodelay(&self) -> io::Result<bool> {
        Ok(self.nodelay.get())
    }

    /// Keep-alive after `idle` (probing every `idle`, at most 75 s, 9 times), or off.
    pub fn set_keepalive(&self, idle: Option<Duration>) -> io::Result<()> {
        self.set_keepalive_params(idle.map(|i| (i, i.min(Duration::from_secs(75)), 9)))
    }

    /// Keep-alive with (idle, interval, probes), or off.
    pub fn set_keepalive_params(&self, k: Option<(Duration, Duration, u32)>) -> io::Result<()> {
        let k = k.map(|(idle, interval, count)| (idle.as_millis() as u64, interval.as_millis() as u64, count));
        self.option(TcpOption::KeepAlive(k))
    }

    /// Delayed acknowledgments on (the default) or off (every segment
    /// acknowledged at once, like Linux's `TCP_QUICKACK` kept on).
    pub fn set_delayed_ack(&self, on: bool) -> io::Result<()> {
        self.option(TcpOption::DelayedAck(on))
    }

    /// The congestion control algorithm ("newreno", "cubic"); the new one takes
    /// over the connection's window.
    pub fn set_congestion_control(&self, name: &str) -> io::Result<()> {
        self.option(TcpOption::CongestionControl(name.into()))
    }

    fn option(&self, option: TcpOption) -> io::Result<()> {
        set_tcp_option(&self.sock, option)
    }

    /// A timeout for reads (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        zero_timeout(t)?;
        self.read_timeout.set(t);
        Ok(())
    }

    /// A timeout for writes that wait for send-buffer room.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        zero_timeout(t)?;
        self.write_timeout.set(t);
        Ok(())
    }

    /// Non-blocking mode: reads and writes return `WouldBlock` instead of waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        self.nonblocking.set(on);
        Ok(())
    }

    /// Resets the connection (linger 0): the peer sees `ConnectionReset`.
    pub fn abort(self) -> io::Result<()> {
        self.abort_in_place()
    }

    fn abort_in_place(&self) -> io::Result<()> {
        self.sock.open.set(false);
        self.sock.stack.call(Call::TcpAbort { handle: self.sock.handle }, None).map(drop)
    }

    /// A borrowing read copied into `buf` (the one copy a read makes; the
    /// loans go back as it drops); how many.
    fn read_some(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        Ok(self.read_in_place(buf.len())?.copy_to(buf))
    }

    fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let chunk = &buf[..buf.len().min(MAX_WRITE_BYTES)];
        self.send_until_taken(|c| c.lend(chunk))
    }

    /// A borrowing read: up to `max` bytes of the stream (`max` is capped as a
    /// read's is), as the stack's buffers lent to this application, read
    /// where they lie — no copy is made until the caller makes one. Empty at
    /// the end of the stream. Blocks, times out and reports errors as `read`
    /// does. Drop it soon: an application holding the stack's buffers past its
    /// quota for seconds is cut off (docs/architecture.md, "Bounds").
    pub fn read_in_place(&self, max: usize) -> io::Result<Borrowed> {
        let wait = !self.nonblocking.get();
        let max = max.clamp(1, MAX_READ_BYTES) as u32;
        let timeout = if wait { self.read_timeout.get() } else { None };
        match self.sock.stack.call(Call::Recv { handle: self.sock.handle, max, wait }, timeout)? {
            Reply::Data { data } => {
                let chain = self.sock.stack.conn.lock().unwrap_or_else(|e| e.into_inner()).bytes(data)?;
                Ok(Borrowed { chain, stack: self.sock.stack.clone() })
            }
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// A borrowing write: `fill` writes the bytes straight into this
    /// application's send buffers (called once per buffer, with the offset of
    /// its piece among the `len` bytes, and the piece), which are lent to the
    /// stack — no copy. `len` is capped as a write's is; how many of the bytes
    /// were taken, as `write` says (the rest were not sent: fill them again).
    /// With every send buffer out the bytes are filled into the call instead
    /// (a copy, counted). Blocks, times out and reports errors as `write` does.
    pub fn write_in_place(&self, len: usize, mut fill: impl FnMut(usize, &mut [u8])) -> io::Result<usize> {
        let len = len.min(MAX_WRITE_BYTES);
        if len == 0 {
            return Ok(0);
        }
        let mut chain = Chain::new();
        let in_place = self
            .sock
            .stack
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_pool
            .fill_chain_with(len, &mut chain, &mut fill);
        if !in_place {
            let mut bytes = vec![0; len];
            fill(0, &mut bytes);
            return self.write_some(&bytes);
        }
        self.send_until_taken(|c| c.lend_chain(&chain))
    }

    /// Sends what `payload` makes of the bytes, again (made anew) after
    /// waiting for room while the stack takes none of them; how many it took.
    fn send_until_taken(&self, mut payload: impl FnMut(&mut Conn) -> Payload) -> io::Result<usize> {
        let deadline = self.write_timeout.get().map(|t| Instant::now() + t);
        loop {
            let data = payload(&mut self.sock.stack.conn.lock().unwrap_or_else(|e| e.into_inner()));
            match self.sock.stack.call(Call::TcpSend { handle: self.sock.handle, data }, None)? {
                Reply::Sent { n } if n > 0 => return Ok(n as usize),
                Reply::Sent { .. } => {}
                r => return Err(broken(format!("unexpected reply {r:?}"))),
            }
            if self.nonblocking.get() {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Err(io::Error::from(io::ErrorKind::TimedOut));
            }
            // Wait for room (or an error, which the next send reports).
            self.sock.stack.poll(&[(self, WRITABLE)], left.or(Some(Duration::from_secs(3600))))?;
        }
    }
}

/// What a borrowing read ([`TcpStream::read_in_place`]) got: the stack's
/// buffers lent to this application, read where they lie. They go back to
/// the stack when this drops.
#[derive(Debug)]
pub struct Borrowed {
    chain: Chain,
    stack: Stack,
}

impl Borrowed {
    /// How many bytes.
    pub fn len(&self) -> usize {
        self.chain.len()
    }

    /// No bytes: the end of the stream.
    pub fn is_empty(&self) -> bool {
        self.chain.is_empty()
    }

    /// How many of the bytes are the stack's buffers, read where they lie;
    /// the rest came inside the reply (short pieces, or past a quota: copied
    /// by the library as it decoded the reply, counted).
    pub fn lent(&self) -> usize {
        self.chain.iter().filter(|l| l.borrowed()).map(Lent::len).sum()
    }

    /// Copies the first `dst.len()` bytes (at most all) into `dst` (a copy,
    /// counted, as a read's); how many.
    pub fn copy_to(&self, dst: &mut [u8]) -> usize {
        self.chain.copy_to(dst)
    }

    /// The Internet checksum (RFC 1071, the folded ones'-complement sum, not
    /// inverted) of the bytes, read in place: every byte is read, none is
    /// kept.
    pub fn checksum(&self) -> u16 {
        let mut sum = capnet_ipc::lent::Checksum::default();
        self.chain.sum_into(&mut sum);
        sum.fold()
    }

    /// Writes every byte to `fd` (a file, a pipe, a kernel socket) with
    /// `writev`, the kernel reading the buffers where they lie: no copy in
    /// this process (the kernel's copy is counted, as a device write's is).
    pub fn write_all_to(&self, fd: impl std::os::fd::AsFd) -> io::Result<()> {
        let mut done = 0;
        while done < self.chain.len() {
            let rest = self.chain.range(done, self.chain.len() - done);
            match capnet_ipc::lent::write_chain(fd.as_fd(), &[], &rest) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    capnet_ipc::pool::count_copy(n);
                    done += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.chain));
        // Given back now; or, while another thread's call holds the channel,
        // by that call (every call gives back what was read).
        let c = match self.stack.conn.try_lock() {
            Ok(c) => Some(c),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if let Some(mut c) = c {
            let _ = c.give_back();
        }
    }
}

fn zero_timeout(t: Option<Duration>) -> io::Result<()> {
    if t == Some(Duration::ZERO) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "a zero timeout is not allowed (as in std)"));
    }
    Ok(())
}

impl AsSocket for TcpStream {
    fn handle(&self) -> Handle {
        self.sock.handle
    }
}

impl io::Read for TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf)
    }
}

impl io::Read for &TcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_some(buf)
    }
}

impl io::Write for TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_some(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl io::Write for &TcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_some(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Sets a TCP option on a listener or connection.
fn set_tcp_option(sock: &Owned, option: TcpOption) -> io::Result<()> {
    sock.stack.call(Call::TcpSetOption { handle: sock.handle, option }, None).map(drop)
}
