//! `capnet http-serve` and `capnet http-get`: HTTP/1.1 over capnet's TCP, enough
//! for curl, wget and Python's http.server. Each is an application attached to the
//! stack like any other; the server is one thread serving every connection with
//! non-blocking sockets and [`Stack::poll`].

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use capnet::net::{AsSocket, Stack, TcpStream, READABLE, WRITABLE};

/// The largest request head the server reads before answering 431.
const MAX_HEAD: usize = 16 * 1024;
/// Bytes of a file read per write.
const CHUNK: usize = 64 * 1024;

/// One client connection of the server.
struct Client {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// Bytes ready to write (headers, an error page, or a piece of the file).
    out: Vec<u8>,
    out_at: usize,
    /// The file body still to send, and how much of it.
    body: Option<(File, u64)>,
    /// Close once everything queued is written.
    close_after: bool,
    /// The peer finished sending.
    peer_done: bool,
    done: bool,
}

struct Response {
    status: &'static str,
    headers: Vec<(String, String)>,
    body: Option<(File, u64)>,
    page: Vec<u8>,
}

fn page(status: &'static str, text: &str) -> Response {
    let page = format!("<html><body><h1>{status}</h1><p>{text}</p></body></html>\n").into_bytes();
    Response { status, headers: vec![("Content-Type".into(), "text/html".into())], body: None, page }
}

/// Decodes `%XX` escapes; `None` for a malformed one or a non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The file a request path names under `root`, refusing anything that climbs out.
fn resolve(root: &Path, target: &str) -> Option<PathBuf> {
    let path = target.split(['?', '#']).next().unwrap_or("/");
    let path = percent_decode(path)?;
    let mut out = root.to_path_buf();
    for c in Path::new(path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn listing(dir: &Path, target: &str) -> Response {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| {
                    let mut n = e.file_name().to_string_lossy().into_owned();
                    if e.path().is_dir() {
                        n.push('/');
                    }
                    n
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    let base = if target.ends_with('/') { target.to_string() } else { format!("{target}/") };
    let mut html = format!("<html><body><h1>Index of {target}</h1><ul>\n");
    for n in names {
        html.push_str(&format!("<li><a href=\"{base}{n}\">{n}</a></li>\n"));
    }
    html.push_str("</ul></body></html>\n");
    Response {
        status: "200 OK",
        headers: vec![("Content-Type".into(), "text/html".into())],
        body: None,
        page: html.into_bytes(),
    }
}

/// Answers one request head. Returns the response and whether to keep the
/// connection open after it.
fn answer(root: &Path, head: &str) -> (Response, bool, bool) {
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    let mut parts = request.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return (page("400 Bad Request", "malformed request line"), false, false);
    };
    if !matches!(version, "HTTP/1.1" | "HTTP/1.0") {
        return (page("505 HTTP Version Not Supported", "HTTP/1.0 and 1.1 only"), false, false);
    }
    let mut keep = version == "HTTP/1.1";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        if name.trim().eq_ignore_ascii_case("connection") {
            let v = value.trim();
            if v.eq_ignore_ascii_case("close") {
                keep = false;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                keep = true;
            }
        }
    }
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let mut r = page("405 Method Not Allowed", "GET and HEAD only");
        r.headers.push(("Allow".into(), "GET, HEAD".into()));
        return (r, keep, head_only);
    }
    let Some(path) = resolve(root, target) else {
        return (page("403 Forbidden", "that path is outside the served directory"), keep, head_only);
    };
    let path = if path.is_dir() && path.join("index.html").is_file() { path.join("index.html") } else { path };
    if path.is_dir() {
        return (listing(&path, target.split('?').next().unwrap_or("/")), keep, head_only);
    }
    match File::open(&path).and_then(|f| f.metadata().map(|m| (f, m.len()))) {
        Ok((f, len)) => (
            Response {
                status: "200 OK",
                headers: vec![("Content-Type".into(), "application/octet-stream".into())],
                body: Some((f, len)),
                page: Vec::new(),
            },
            keep,
            head_only,
        ),
        Err(_) => (page("404 Not Found", "no such file"), keep, head_only),
    }
}

impl Client {
    fn queue(&mut self, r: Response, keep: bool, head_only: bool) {
        let len = r.body.as_ref().map_or(r.page.len() as u64, |(_, n)| *n);
        let mut h = format!("HTTP/1.1 {}\r\nServer: capnet\r\nContent-Length: {len}\r\n", r.status);
        for (k, v) in &r.headers {
            h.push_str(&format!("{k}: {v}\r\n"));
        }
        h.push_str(if keep { "Connection: keep-alive\r\n\r\n" } else { "Connection: close\r\n\r\n" });
        self.out.extend_from_slice(h.as_bytes());
        if !head_only {
            self.out.extend_from_slice(&r.page);
            self.body = r.body;
        }
        self.close_after = !keep;
    }

    fn busy(&self) -> bool {
        self.out_at < self.out.len() || self.body.is_some()
    }

    /// Reads what is there and answers complete requests, one at a time.
    fn on_readable(&mut self, root: &Path) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match (&self.stream).read(&mut buf) {
                Ok(0) => {
                    self.peer_done = true;
                    break;
                }
                Ok(n) => self.inbuf.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
            if self.inbuf.len() > MAX_HEAD {
                break;
            }
        }
        self.next_request(root);
    }

    fn next_request(&mut self, root: &Path) {
        if self.busy() || self.close_after {
            return;
        }
        match self.inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => {
                let head = String::from_utf8_lossy(&self.inbuf[..end]).into_owned();
                self.inbuf.drain(..end + 4);
                let (r, keep, head_only) = answer(root, &head);
                self.queue(r, keep, head_only);
            }
            None if self.inbuf.len() > MAX_HEAD => {
                self.queue(page("431 Request Header Fields Too Large", "the request head is too large"), false, false)
            }
            None if self.peer_done => self.done = true,
            None => {}
        }
    }

    /// Writes as much as the connection takes.
    fn on_writable(&mut self, root: &Path) {
        loop {
            if self.out_at == self.out.len() {
                self.out.clear();
                self.out_at = 0;
                if let Some((f, left)) = self.body.as_mut() {
                    let want = (*left).min(CHUNK as u64) as usize;
                    self.out.resize(want, 0);
                    if f.read_exact(&mut self.out).is_err() {
                        self.done = true; // the file changed under us: cut the response short
                        return;
                    }
                    *left -= want as u64;
                    if *left == 0 {
                        self.body = None;
                    }
                } else {
                    if self.close_after {
                        let _ = self.stream.shutdown(Shutdown::Write);
                        self.done = true;
                        return;
                    }
                    self.next_request(root);
                    if !self.busy() {
                        return;
                    }
                    continue;
                }
            }
            match (&self.stream).write(&self.out[self.out_at..]) {
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
        }
    }
}

/// `capnet http-serve DIR`.
pub fn serve(netns: &str, dir: &Path, port: u16) -> Result<()> {
    let root = dir.canonicalize().with_context(|| format!("{}: no such directory", dir.display()))?;
    if !root.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let (stop, stack, listener) = crate::apps::tcp_server(netns, port)?;
    println!("capnet http-serve: serving {} on port {}", root.display(), listener.local_port());
    let _ = std::io::stdout().flush();
    let mut clients: Vec<Client> = Vec::new();
    let mut served = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut items: Vec<(&dyn AsSocket, u8)> = vec![(&listener, READABLE)];
        for c in &clients {
            let interest = if c.busy() { READABLE | WRITABLE } else { READABLE };
            items.push((&c.stream, interest));
        }
        let events = stack.poll(&items, Some(Duration::from_millis(200)))?;
        drop(items);
        for (i, bits) in events {
            if i == 0 {
                for stream in crate::apps::accept_pending(&listener)? {
                    clients.push(Client {
                        stream,
                        inbuf: Vec::new(),
                        out: Vec::new(),
                        out_at: 0,
                        body: None,
                        close_after: false,
                        peer_done: false,
                        done: false,
                    });
                    served += 1;
                }
                continue;
            }
            let c = &mut clients[i - 1];
            if bits & READABLE != 0 {
                c.on_readable(&root);
            }
            if !c.done && (bits & WRITABLE != 0 || c.busy()) {
                c.on_writable(&root);
            }
        }
        clients.retain(|c| !c.done);
    }
    println!("capnet http-serve: {served} connections served");
    Ok(())
}

/// An `http://A.B.C.D[:PORT]/path` URL.
fn parse_url(url: &str) -> Result<(SocketAddrV4, String)> {
    let rest = url.strip_prefix("http://").ok_or_else(|| anyhow!("{url}: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| anyhow!("{url}: bad port {p:?}"))?),
        None => (authority, 80),
    };
    let ip: Ipv4Addr = host.parse().map_err(|_| anyhow!("{url}: {host:?} is not an IPv4 address (no DNS here)"))?;
    Ok((SocketAddrV4::new(ip, port), path.to_string()))
}

/// A response head: status code, headers (names lower-cased), and the bytes read
/// past it.
type Head = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads a response head.
fn read_head(stream: &TcpStream) -> Result<Head> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        if buf.len() > MAX_HEAD {
            bail!("the response head is larger than {MAX_HEAD} bytes");
        }
        let n = (&*stream).read(&mut chunk)?;
        if n == 0 {
            bail!("the server closed the connection before a complete response head");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let code = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("malformed status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())))
        .collect();
    Ok((code, headers, rest))
}

/// Copies a chunked body (RFC 9112 §7.1) to `out`.
fn dechunk(stream: &TcpStream, mut pending: Vec<u8>, out: &mut dyn Write) -> Result<u64> {
    let mut total = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    let mut fill = |pending: &mut Vec<u8>, need: usize| -> Result<()> {
        while pending.len() < need {
            let n = (&*stream).read(&mut chunk)?;
            if n == 0 {
                bail!("the server closed the connection inside a chunked body");
            }
            pending.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    loop {
        let line_end = loop {
            if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                break i;
            }
            let need = pending.len() + 1;
            fill(&mut pending, need)?;
        };
        let line = String::from_utf8_lossy(&pending[..line_end]).into_owned();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| anyhow!("malformed chunk size {line:?}"))?;
        pending.drain(..line_end + 2);
        if size == 0 {
            return Ok(total);
        }
        fill(&mut pending, size + 2)?;
        out.write_all(&pending[..size])?;
        total += size as u64;
        pending.drain(..size + 2);
    }
}

/// `capnet http-get URL [-o FILE]`.
pub fn get(netns: &str, url: &str, output: Option<&Path>) -> Result<()> {
    let (addr, path) = parse_url(url)?;
    let stack = Stack::attach(netns)?;
    let started = Instant::now();
    let stream = TcpStream::connect_timeout(&stack, addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: capnet-http-get\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        addr
    );
    (&stream).write_all(req.as_bytes())?;
    let (code, headers, rest) = read_head(&stream)?;
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let mut out: Box<dyn Write> = match output {
        Some(p) => {
            Box::new(std::io::BufWriter::new(File::create(p).with_context(|| format!("creating {}", p.display()))?))
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let total = if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        dechunk(&stream, rest, &mut out)?
    } else {
        let expect: Option<u64> = match header("content-length") {
            Some(v) => Some(v.parse().map_err(|_| anyhow!("malformed Content-Length {v:?}"))?),
            None => None,
        };
        let mut total = rest.len() as u64;
        out.write_all(&rest)?;
        let mut buf = vec![0u8; CHUNK];
        while expect.is_none_or(|e| total < e) {
            let n = (&stream).read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
            total += n as u64;
        }
        if let Some(e) = expect {
            if total != e {
                bail!("truncated: {total} of {e} bytes arrived");
            }
        }
        total
    };
    out.flush()?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "capnet http-get: {code} from {addr}, {total} bytes in {secs:.2} s ({:.1} Mbit/s)",
        total as f64 * 8.0 / secs / 1e6
    );
    if !(200..300).contains(&code) {
        bail!("the server answered {code}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside_the_root() {
        let root = Path::new("/srv");
        assert_eq!(resolve(root, "/a/b.txt?x=1"), Some(PathBuf::from("/srv/a/b.txt")));
        assert_eq!(resolve(root, "/a%20b"), Some(PathBuf::from("/srv/a b")));
        assert_eq!(resolve(root, "/../etc/passwd"), None);
        assert_eq!(resolve(root, "/a/%2e%2e/%2e%2e/etc"), None);
        assert_eq!(resolve(root, "/%zz"), None);
    }

    #[test]
    fn urls_are_ip_literals() {
        assert_eq!(parse_url("http://10.0.0.1:8080/x").unwrap(), ("10.0.0.1:8080".parse().unwrap(), "/x".into()));
        assert_eq!(parse_url("http://10.0.0.1").unwrap(), ("10.0.0.1:80".parse().unwrap(), "/".into()));
        assert!(parse_url("https://10.0.0.1/").is_err());
        assert!(parse_url("http://example.com/").is_err());
        assert!(parse_url("http://10.0.0.1:99999/").is_err());
    }

    #[test]
    fn request_heads_are_answered() {
        let dir = std::env::temp_dir().join(format!("capnet-http-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("f"), b"hello").unwrap();
        let (r, keep, head) = answer(&dir, "GET /f HTTP/1.1\r\nHost: x");
        assert_eq!((r.status, keep, head), ("200 OK", true, false));
        assert_eq!(r.body.map(|b| b.1), Some(5));
        let (r, keep, _) = answer(&dir, "GET /f HTTP/1.0");
        assert_eq!((r.status, keep), ("200 OK", false));
        let (r, _, head) = answer(&dir, "HEAD /f HTTP/1.1\r\nConnection: close");
        assert_eq!((r.status, head), ("200 OK", true));
        assert_eq!(answer(&dir, "GET /nope HTTP/1.1").0.status, "404 Not Found");
        assert_eq!(answer(&dir, "POST /f HTTP/1.1").0.status, "405 Method Not Allowed");
        assert_eq!(answer(&dir, "GET /f").0.status, "400 Bad Request");
        assert_eq!(answer(&dir, "GET /../f HTTP/1.1").0.status, "403 Forbidden");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
