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
//! Each application gets its own channel to the sockets domain (see
//! [`crate::attach`]); calls are rkyv messages on it, answered in order of arrival.
//! Errors are `io::Error`s with the `ErrorKind` a `std::net` user expects.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capnet_ipc::control::{decode, encode};
use capnet_ipc::msg::MsgEnd;
use capnet_ipc::notify::{SpinPolicy, SpinTokens};
use capnet_ipc::region::Region;
use capnet_ipc::{Interest, Waiter};
use capnet_sockets::{Call, Handle, Reply, Request, Response, SocketError};

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
    };
    io::Error::new(kind, e)
}

fn broken(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, format!("the capnet stack went away: {e}"))
}

#[derive(Debug)]
struct Conn {
    msg: MsgEnd,
    _sock: UnixStream,
    next_id: u64,
    waiter: Waiter,
    early: HashMap<u64, Reply>,
    inbox: Vec<Vec<u8>>,
}

/// An attachment to a running stack. Cheap to clone; sockets keep it alive.
#[derive(Debug, Clone)]
pub struct Stack {
    conn: Arc<Mutex<Conn>>,
}

impl Stack {
    /// Attaches to the stack `capnet up` started in namespace `netns`.
    pub fn attach(netns: &str) -> io::Result<Self> {
        let path = crate::attach::app_socket(netns);
        let sock = UnixStream::connect(&path).map_err(|e| {
            let why = format!("capnet is not up in namespace {netns}: start it with `capnet up`");
            io::Error::new(e.kind(), format!("{why} ({}: {e})", path.display()))
        })?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let msg =
            crate::attach::join(&sock, &format!("capnet-app-{}", std::process::id())).map_err(io::Error::other)?;
        let conn = Conn {
            msg,
            _sock: sock,
            next_id: 1,
            waiter: Waiter::new(SpinPolicy::NEVER),
            early: HashMap::new(),
            inbox: Vec::new(),
        };
        Ok(Self { conn: Arc::new(Mutex::new(conn)) })
    }

    /// Makes a call and waits for its reply. Past `timeout`, a parked receive on
    /// `cancel` is cancelled and the call returns `TimedOut`.
    fn call(&self, call: Call, timeout: Option<Duration>, cancel: Option<Handle>) -> io::Result<Reply> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let id = c.next_id;
        c.next_id += 1;
        let bytes = encode(&Request { id, call }).map_err(io::Error::other)?;
        let deadline = timeout.map(|t| Instant::now() + t);
        let hard = Instant::now() + timeout.unwrap_or(Duration::ZERO) + Duration::from_secs(30);
        while !c.msg.send(&bytes).map_err(broken)? {
            c.pump()?;
            c.wait(Interest::BOTH, Some(Duration::from_millis(10)));
            if Instant::now() > hard {
                return Err(broken("no room to send for 30 s"));
            }
        }
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
            if let (Some(d), Some(h), false) = (deadline, cancel, cancelled) {
                if now >= d {
                    cancelled = true;
                    let cid = c.next_id;
                    c.next_id += 1;
                    let b = encode(&Request { id: cid, call: Call::Cancel { handle: h } }).map_err(io::Error::other)?;
                    while !c.msg.send(&b).map_err(broken)? {
                        c.pump()?;
                        c.wait(Interest::BOTH, Some(Duration::from_millis(10)));
                    }
                    continue;
                }
            }
            if now > hard && deadline.is_some() {
                return Err(broken("no reply"));
            }
            let left = deadline.filter(|_| !cancelled).map(|d| d.saturating_duration_since(now));
            c.wait(Interest::RX, Some(left.unwrap_or(Duration::from_millis(200)).max(Duration::from_micros(100))));
        }
    }
}

impl Conn {
    fn pump(&mut self) -> io::Result<()> {
        self.inbox.clear();
        let mut inbox = std::mem::take(&mut self.inbox);
        self.msg.recv(&mut inbox).map_err(broken)?;
        for m in inbox.drain(..) {
            let r: Response = decode(&m).map_err(broken)?;
            self.early.insert(r.id, r.reply);
        }
        self.inbox = inbox;
        Ok(())
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
    stack: Stack,
    handle: Handle,
    port: u16,
    read_timeout: Option<Duration>,
    nonblocking: bool,
}

impl UdpSocket {
    /// Binds `port` on the stack's address (0: an ephemeral port).
    pub fn bind(stack: &Stack, port: u16) -> io::Result<Self> {
        match stack.call(Call::UdpBind { port }, None, None)? {
            Reply::Bound { handle, port } => {
                Ok(Self { stack: stack.clone(), handle, port, read_timeout: None, nonblocking: false })
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
        self.stack
            .call(Call::UdpConnect { handle: self.handle, addr: peer.ip().octets(), port: peer.port() }, None, None)
            .map(drop)
    }

    /// Sends a datagram to `to`.
    pub fn send_to(&self, buf: &[u8], to: SocketAddrV4) -> io::Result<usize> {
        let call = Call::UdpSend { handle: self.handle, to: Some((to.ip().octets(), to.port())), data: buf.to_vec() };
        self.stack.call(call, None, None).map(|_| buf.len())
    }

    /// Sends a datagram to the connected peer.
    pub fn send(&self, buf: &[u8]) -> io::Result<usize> {
        self.stack
            .call(Call::UdpSend { handle: self.handle, to: None, data: buf.to_vec() }, None, None)
            .map(|_| buf.len())
    }

    /// Receives a datagram (truncated to `buf`, as std does).
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)> {
        let wait = !self.nonblocking;
        let call = Call::Recv { handle: self.handle, wait };
        let timeout = if wait { self.read_timeout } else { None };
        match self.stack.call(call, timeout, Some(self.handle))? {
            Reply::Datagram { from: (addr, port), data } => {
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok((n, SocketAddrV4::new(Ipv4Addr::from(addr), port)))
            }
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

impl Drop for UdpSocket {
    fn drop(&mut self) {
        let _ = self.stack.call(Call::Close { handle: self.handle }, None, None);
    }
}

/// An ICMP echo socket (what `capnet ping` uses).
#[derive(Debug)]
pub struct PingSocket {
    stack: Stack,
    handle: Handle,
    ident: u16,
}

impl PingSocket {
    /// Opens one with a free echo identifier.
    pub fn open(stack: &Stack) -> io::Result<Self> {
        match stack.call(Call::EchoOpen, None, None)? {
            Reply::Bound { handle, port } => Ok(Self { stack: stack.clone(), handle, ident: port }),
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }

    /// Its echo identifier.
    pub fn ident(&self) -> u16 {
        self.ident
    }

    /// Sends an echo request.
    pub fn send(&self, dst: Ipv4Addr, seq: u16, data: &[u8]) -> io::Result<()> {
        self.stack
            .call(Call::EchoSend { handle: self.handle, dst: dst.octets(), seq, data: data.to_vec() }, None, None)
            .map(drop)
    }

    /// Waits up to `timeout` for an echo reply: (from, sequence, data).
    pub fn recv(&self, timeout: Duration) -> io::Result<(Ipv4Addr, u16, Vec<u8>)> {
        match self.stack.call(Call::Recv { handle: self.handle, wait: true }, Some(timeout), Some(self.handle))? {
            Reply::EchoReply { from, seq, data } => Ok((Ipv4Addr::from(from), seq, data)),
            r => Err(broken(format!("unexpected reply {r:?}"))),
        }
    }
}

impl Drop for PingSocket {
    fn drop(&mut self) {
        let _ = self.stack.call(Call::Close { handle: self.handle }, None, None);
    }
}
