//! The workloads: one server per workload over capnet's sockets or std's
//! ([`Net`]), and the Linux-side client (`capnet bench-peer`).

use std::io::{self, BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::{Sizes, Work};
use anyhow::{anyhow, bail, Context, Result};

/// The sockets a workload's server and client need, over capnet or std.
pub(crate) trait Net: Sync {
    type Listener: Send + 'static;
    type Stream: Read + Write + Send + 'static;
    type Udp: Send + 'static;
    fn listen(&self, port: u16) -> io::Result<Self::Listener>;
    fn accept(l: &Self::Listener) -> io::Result<Self::Stream>;
    fn nodelay(s: &Self::Stream);
    fn udp(&self, port: u16) -> io::Result<Self::Udp>;
    /// How many datagrams one receive took (std: one; capnet: a batch, as
    /// `recvmmsg` would), or `None` after `idle` without one.
    fn recv(u: &mut Self::Udp, buf: &mut [u8], idle: Duration) -> io::Result<Option<usize>>;
    fn connect(&self, to: SocketAddrV4) -> io::Result<Self::Stream>;
    fn shutdown_write(s: &Self::Stream) -> io::Result<()>;
    /// Reads and writes on `s` fail after `t` without progress.
    fn stall_after(s: &Self::Stream, t: Duration) -> io::Result<()>;
    /// A UDP socket on any port, sending to `to`.
    fn udp_to(&self, to: SocketAddrV4) -> io::Result<Self::Udp>;
    /// Sends `d` `k` times (std: a call each; capnet: in batches, as
    /// `sendmmsg` would); how many went.
    fn send(u: &Self::Udp, d: &[u8], k: usize) -> usize;
    /// Writes `n` bytes (`buf`'s, over and over): a bulk sender.
    fn write_bulk(s: &mut Self::Stream, n: usize, buf: &[u8]) -> io::Result<()> {
        write_bytes(s, n, buf)
    }
    /// Reads to the end of the stream (into `buf`, over and over): a bulk
    /// receiver; how many bytes.
    fn read_bulk(s: &mut Self::Stream, buf: &mut [u8]) -> io::Result<usize> {
        read_all(s, buf)
    }
}

/// Reads `r` to its end into `buf`, over and over; how many bytes.
fn read_all(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    loop {
        match r.read(buf)? {
            0 => return Ok(done),
            k => done += k,
        }
    }
}

/// A receive that timed out is `None`.
pub(crate) fn quiet(r: io::Result<usize>) -> io::Result<Option<usize>> {
    match r {
        Ok(n) => Ok(Some(n)),
        Err(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => Ok(None),
        Err(e) => Err(e),
    }
}

/// capnet's sockets: every listener and UDP socket on an attachment of its own
/// (a blocking call holds its attachment); a client's connections take turns
/// on attachments made beforehand (attaching is no part of what a run times).
pub(crate) struct CapnetNet {
    pub(crate) netns: String,
    /// Bulk streams use the borrowing calls (`write_in_place`, `read_in_place`).
    pub(crate) in_place: bool,
    /// A client's attachments, taken in turn (none: attach per socket).
    pub(crate) clients: Vec<capnet::net::Stack>,
    pub(crate) turn: std::sync::atomic::AtomicUsize,
}

impl CapnetNet {
    pub(crate) fn server(netns: &str) -> Self {
        Self { netns: netns.to_owned(), in_place: false, clients: Vec::new(), turn: Default::default() }
    }

    /// Bulk streams use the borrowing calls (or not).
    pub(crate) fn in_place(self, on: bool) -> Self {
        Self { in_place: on, ..self }
    }

    /// With an attachment for each of up to 8 connections at once.
    pub(crate) fn client(netns: &str) -> io::Result<Self> {
        let clients = (0..8).map(|_| capnet::net::Stack::attach(netns)).collect::<io::Result<_>>()?;
        Ok(Self { netns: netns.to_owned(), in_place: false, clients, turn: Default::default() })
    }

    pub(crate) fn next(&self) -> io::Result<capnet::net::Stack> {
        match self.clients.len() {
            0 => capnet::net::Stack::attach(&self.netns),
            n => Ok(self.clients[self.turn.fetch_add(1, Ordering::Relaxed) % n].clone()),
        }
    }
}

/// A capnet connection, and whether its bulk calls borrow.
pub(crate) struct CapnetStream {
    s: capnet::net::TcpStream,
    in_place: bool,
}

impl Read for CapnetStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.s.read(buf)
    }
}

impl Write for CapnetStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Net for CapnetNet {
    type Listener = (capnet::net::TcpListener, bool);
    type Stream = CapnetStream;
    type Udp = capnet::net::UdpSocket;
    fn listen(&self, port: u16) -> io::Result<Self::Listener> {
        let l = capnet::net::TcpListener::bind_with_backlog(&capnet::net::Stack::attach(&self.netns)?, port, 64)?;
        Ok((l, self.in_place))
    }
    fn accept((l, in_place): &Self::Listener) -> io::Result<Self::Stream> {
        l.accept().map(|(s, _)| CapnetStream { s, in_place: *in_place })
    }
    fn nodelay(s: &Self::Stream) {
        let _ = s.s.set_nodelay(true);
    }
    fn udp(&self, port: u16) -> io::Result<Self::Udp> {
        capnet::net::UdpSocket::bind(&capnet::net::Stack::attach(&self.netns)?, port)
    }
    fn recv(u: &mut Self::Udp, _buf: &mut [u8], idle: Duration) -> io::Result<Option<usize>> {
        u.set_read_timeout(Some(idle))?;
        quiet(u.recv_many(capnet::net::UDP_BATCH).map(|d| d.len()))
    }
    fn connect(&self, to: SocketAddrV4) -> io::Result<Self::Stream> {
        let s = capnet::net::TcpStream::connect_timeout(&self.next()?, to, Duration::from_secs(5))?;
        Ok(CapnetStream { s, in_place: self.in_place })
    }
    fn shutdown_write(s: &Self::Stream) -> io::Result<()> {
        s.s.shutdown(std::net::Shutdown::Write)
    }
    fn stall_after(s: &Self::Stream, t: Duration) -> io::Result<()> {
        s.s.set_read_timeout(Some(t))?;
        s.s.set_write_timeout(Some(t))
    }
    fn udp_to(&self, to: SocketAddrV4) -> io::Result<Self::Udp> {
        let u = capnet::net::UdpSocket::bind(&self.next()?, 0)?;
        u.connect(to)?;
        Ok(u)
    }
    fn send(u: &Self::Udp, d: &[u8], k: usize) -> usize {
        u.send_many(&vec![(d, None); k]).unwrap_or(0)
    }
    /// Borrowing: the bytes are made in the send buffers (zeros, as `buf`
    /// holds), not copied there.
    fn write_bulk(s: &mut Self::Stream, mut n: usize, buf: &[u8]) -> io::Result<()> {
        if !s.in_place {
            return write_bytes(s, n, buf);
        }
        while n > 0 {
            n -= s.s.write_in_place(n, |_, piece| piece.fill(0))?;
        }
        Ok(())
    }
    /// Borrowing: every byte is read where the stack's buffers hold it (its
    /// checksum taken), none copied out.
    fn read_bulk(s: &mut Self::Stream, buf: &mut [u8]) -> io::Result<usize> {
        if !s.in_place {
            return read_all(s, buf);
        }
        let mut done = 0;
        loop {
            let b = s.s.read_in_place(buf.len())?;
            if b.is_empty() {
                return Ok(done);
            }
            std::hint::black_box(b.checksum());
            done += b.len();
        }
    }
}

/// std's sockets (the veth reference's server), bound on every address.
pub(crate) struct StdNet;

impl Net for StdNet {
    type Listener = std::net::TcpListener;
    type Stream = std::net::TcpStream;
    type Udp = std::net::UdpSocket;
    fn listen(&self, port: u16) -> io::Result<Self::Listener> {
        std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
    }
    fn accept(l: &Self::Listener) -> io::Result<Self::Stream> {
        l.accept().map(|(s, _)| s)
    }
    fn nodelay(s: &Self::Stream) {
        let _ = s.set_nodelay(true);
    }
    fn udp(&self, port: u16) -> io::Result<Self::Udp> {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
    }
    fn recv(u: &mut Self::Udp, buf: &mut [u8], idle: Duration) -> io::Result<Option<usize>> {
        u.set_read_timeout(Some(idle))?;
        quiet(u.recv(buf).map(|_| 1))
    }
    fn connect(&self, to: SocketAddrV4) -> io::Result<Self::Stream> {
        std::net::TcpStream::connect_timeout(&to.into(), Duration::from_secs(5))
    }
    fn shutdown_write(s: &Self::Stream) -> io::Result<()> {
        s.shutdown(std::net::Shutdown::Write)
    }
    fn stall_after(s: &Self::Stream, t: Duration) -> io::Result<()> {
        s.set_read_timeout(Some(t))?;
        s.set_write_timeout(Some(t))
    }
    fn udp_to(&self, to: SocketAddrV4) -> io::Result<Self::Udp> {
        let u = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        u.connect(to)?;
        Ok(u)
    }
    fn send(u: &Self::Udp, d: &[u8], k: usize) -> usize {
        (0..k).filter(|_| u.send(d).is_ok()).count()
    }
}

/// What a server thread gives back: for UDP, (datagrams, seconds from the first to the last).
pub(crate) type Served = std::thread::JoinHandle<Result<Option<(u64, f64)>>>;

/// Starts `w`'s server on `port` (listening before it returns) and runs it in a
/// thread until its work is done.
pub(crate) fn serve<N: Net>(net: &N, w: Work, port: u16, sizes: &Sizes) -> Result<Served> {
    const CHUNK: usize = 1 << 20;
    let (bulk, udp_secs) = (sizes.bulk_bytes, sizes.udp_secs);
    Ok(match w {
        Work::BulkSend(_) | Work::BulkRecv(_) | Work::Borrowing { .. } => {
            let (n, send) = w.bulk().expect("a bulk workload");
            let listeners = (0..n).map(|i| net.listen(port + i as u16)).collect::<io::Result<Vec<_>>>()?;
            std::thread::spawn(move || {
                let threads: Vec<_> = listeners
                    .into_iter()
                    .map(|l| {
                        std::thread::spawn(move || -> io::Result<()> {
                            let mut s = N::accept(&l)?;
                            let mut buf = vec![0u8; CHUNK];
                            if send {
                                N::write_bulk(&mut s, bulk / n, &buf)?;
                            } else {
                                N::read_bulk(&mut s, &mut buf)?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                for t in threads {
                    t.join().map_err(|_| anyhow!("a stream's thread panicked"))??;
                }
                Ok(None)
            })
        }
        Work::Rr(_) => {
            let l = net.listen(port)?;
            std::thread::spawn(move || {
                let mut s = N::accept(&l)?;
                N::nodelay(&s);
                let mut buf = vec![0u8; 65536];
                loop {
                    let k = s.read(&mut buf)?;
                    if k == 0 {
                        return Ok(None);
                    }
                    s.write_all(&buf[..k])?;
                }
            })
        }
        Work::Connect => {
            let l = net.listen(port)?;
            std::thread::spawn(move || loop {
                let mut s = N::accept(&l)?;
                let mut b = [0u8; 1];
                if s.read(&mut b)? == 0 || b[0] == b'q' {
                    return Ok(None);
                }
                s.write_all(&b)?;
            })
        }
        Work::Udp(_) => {
            let mut u = net.udp(port)?;
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 2048];
                let (mut n, mut first, mut last) = (0u64, None::<Instant>, Instant::now());
                // Wait long for the first, then until 300 ms pass without one or
                // the sending is well over (what a slow receiver has queued
                // after that is not its rate).
                let idle = |first: Option<Instant>| {
                    if first.is_some() {
                        Duration::from_millis(300)
                    } else {
                        Duration::from_secs(10)
                    }
                };
                while let Some(k) = N::recv(&mut u, &mut buf, idle(first))? {
                    n += k as u64;
                    last = Instant::now();
                    if first.get_or_insert(last).elapsed().as_secs_f64() > udp_secs + 0.5 {
                        break;
                    }
                }
                Ok(first.map(|f| (n, (last - f).as_secs_f64())))
            })
        }
    })
}

/// A server in another process — the veth reference's (`capnet bench-peer
/// serve …`) or smoltcp's (`capnet_bench_peer --tap NAME serve …`) — run in
/// namespace `ns` and started once it says it listens.
pub(crate) struct PeerServer(Child);

impl PeerServer {
    pub(crate) fn start(program: &[&str], ns: &str, w: Work, port: u16, sizes: &Sizes) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(program)
            .args(["serve", &work_arg(w), &port.to_string()])
            .args([sizes.bulk_bytes.to_string(), sizes.udp_secs.to_string()])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let out = child.stdout.as_mut().ok_or_else(|| anyhow!("no stdout"))?;
        io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("{} did not start: {line:?}", program.join(" "));
        }
        Ok(Self(child))
    }

    pub(crate) fn finish(&mut self) -> Result<Option<(u64, f64)>> {
        let mut text = String::new();
        if let Some(out) = self.0.stdout.as_mut() {
            out.read_to_string(&mut text)?;
        }
        self.0.wait()?;
        let v: Vec<f64> = text.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        Ok(match v[..] {
            [n, secs] => Some((n as u64, secs)),
            _ => None,
        })
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn work_arg(w: Work) -> String {
    match w {
        Work::BulkSend(n) => format!("bulk-send:{n}"),
        Work::BulkRecv(n) => format!("bulk-recv:{n}"),
        Work::Borrowing { send: true } => "borrowing-send".into(),
        Work::Borrowing { send: false } => "borrowing-recv".into(),
        Work::Rr(s) => format!("rr:{s}"),
        Work::Connect => "connect".into(),
        Work::Udp(s) => format!("udp:{s}"),
    }
}

pub(crate) fn parse_work(s: &str) -> Result<Work> {
    let (kind, n) = s.split_once(':').unwrap_or((s, "0"));
    let n: usize = n.parse()?;
    Ok(match kind {
        "bulk-send" => Work::BulkSend(n),
        "bulk-recv" => Work::BulkRecv(n),
        "borrowing-send" => Work::Borrowing { send: true },
        "borrowing-recv" => Work::Borrowing { send: false },
        "rr" => Work::Rr(n),
        "connect" => Work::Connect,
        "udp" => Work::Udp(n),
        _ => bail!("no workload {s:?}"),
    })
}

/// `capnet bench-peer serve WORK PORT BULK SECS` (std sockets; says "ready" once it
/// listens, prints UDP counts at the end) or `capnet bench-peer client ADDR
/// PORT MODE …` (the Linux side of every run; prints its figures).
pub fn peer(args: &[String]) -> Result<()> {
    match args {
        [role, w, port, bulk, secs] if role == "serve" => {
            let sizes = Sizes { bulk_bytes: bulk.parse()?, udp_secs: secs.parse()?, rr_count: 0, connects: 0 };
            let served = serve(&StdNet, parse_work(w)?, port.parse()?, &sizes)?;
            println!("ready");
            io::stdout().flush()?;
            if let Some((n, secs)) = served.join().map_err(|_| anyhow!("the server panicked"))?? {
                println!("{n} {secs}");
            }
            Ok(())
        }
        [role, addr, port, rest @ ..] if role == "client" => {
            let to = SocketAddrV4::new(addr.parse()?, port.parse()?);
            let figures = client(&StdNet, to, rest)?;
            println!("{}", figures.iter().map(|f| format!("{f:.3}")).collect::<Vec<_>>().join(" "));
            Ok(())
        }
        _ => bail!("usage: capnet bench-peer serve WORK PORT BULK SECS | client ADDR PORT MODE ARGS…"),
    }
}

/// Writes `n` bytes of `buf`'s contents, a buffer at a time.
pub(crate) fn write_bytes(w: &mut impl Write, mut n: usize, buf: &[u8]) -> io::Result<()> {
    while n > 0 {
        let k = n.min(buf.len());
        w.write_all(&buf[..k])?;
        n -= k;
    }
    Ok(())
}

/// How long a client's connection may make no progress before its run fails
/// (a stalled run is reported, not waited for).
const STALL: Duration = Duration::from_secs(60);

/// Connects, retrying while the server is not up yet (a bench's own setup race).
pub(crate) fn connect<N: Net>(net: &N, to: SocketAddrV4) -> Result<N::Stream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match net.connect(to) {
            Ok(s) => {
                N::stall_after(&s, STALL).context("setting the stall timeouts")?;
                return Ok(s);
            }
            Err(e) if Instant::now() > deadline => return Err(e).context(format!("connecting to {to}")),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The client side of every run (the Linux side over a TAP or veth; the peer
/// instance's applications over the in-memory wire): its figures.
pub(crate) fn client<N: Net>(net: &N, to: SocketAddrV4, args: &[String]) -> Result<Vec<f64>> {
    const CHUNK: usize = 1 << 20;
    let num = |i: usize| -> Result<usize> { Ok(args.get(i).ok_or_else(|| anyhow!("missing argument"))?.parse()?) };
    match args.first().map(String::as_str) {
        Some(mode @ ("read" | "write")) => {
            let (streams, amount) = (num(1)?, num(2)?);
            let start = Instant::now();
            let total = std::thread::scope(|scope| -> Result<usize> {
                let threads: Vec<_> = (0..streams)
                    .map(|i| {
                        let to = SocketAddrV4::new(*to.ip(), to.port() + i as u16);
                        let write = mode == "write";
                        scope.spawn(move || -> Result<usize> {
                            let mut s = connect(net, to)?;
                            let mut buf = vec![0u8; CHUNK];
                            if write {
                                let done = amount / streams;
                                N::write_bulk(&mut s, done, &buf)?;
                                N::shutdown_write(&s)?;
                                // Timed to the server's end: it closes once it read everything.
                                N::read_bulk(&mut s, &mut buf)?;
                                Ok(done)
                            } else {
                                Ok(N::read_bulk(&mut s, &mut buf)?)
                            }
                        })
                    })
                    .collect();
                let mut total = 0;
                for t in threads {
                    total += t.join().map_err(|_| anyhow!("a stream panicked"))??;
                }
                Ok(total)
            })?;
            Ok(vec![total as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9])
        }
        Some("rr") => {
            let (size, count) = (num(1)?, num(2)?);
            let mut s = connect(net, to)?;
            N::nodelay(&s);
            let req = vec![b'r'; size];
            let mut buf = vec![0u8; size];
            let mut lat = Vec::with_capacity(count);
            let start = Instant::now();
            for _ in 0..count {
                let t = Instant::now();
                s.write_all(&req)?;
                s.read_exact(&mut buf)?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let rate = count as f64 / start.elapsed().as_secs_f64();
            lat.sort_by(f64::total_cmp);
            let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
            Ok(vec![rate, pct(0.50), pct(0.99), pct(0.999)])
        }
        Some("connect") => {
            let count = num(1)?;
            let start = Instant::now();
            for _ in 0..count {
                let mut s = connect(net, to)?;
                s.write_all(b"c")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
            }
            let rate = count as f64 / start.elapsed().as_secs_f64();
            connect(net, to)?.write_all(b"q")?;
            Ok(vec![rate])
        }
        Some("udp") => {
            let size = num(1)?;
            let secs: f64 = args.get(2).ok_or_else(|| anyhow!("missing seconds"))?.parse()?;
            let u = net.udp_to(to)?;
            let d = vec![0u8; size];
            let (mut sent, until) = (0u64, Instant::now() + Duration::from_secs_f64(secs));
            while Instant::now() < until {
                // A full socket buffer is the device's pace: keep going.
                sent += N::send(&u, &d, 64) as u64;
            }
            Ok(vec![sent as f64 / secs])
        }
        _ => bail!("client modes: read|write STREAMS BYTES, rr SIZE COUNT, connect COUNT, udp SIZE SECONDS"),
    }
}
