//! Applications as separate processes on a running stack: `capnet ping` and
//! `capnet echo-serve` against the Linux kernel, and the `capnet::net` library's
//! std-like behaviour (timeouts, non-blocking mode, refused ports) from this test
//! process, itself an attached application.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::{Command, Output};

use capnet_testkit::{Killed, Up};
use std::time::Duration;

use capnet::net::{PingSocket, Stack, UdpSocket};

const CAPNET: &str = env!("CARGO_BIN_EXE_capnet");

fn capnet(args: &[&str]) -> Output {
    Command::new(CAPNET).args(args).output().expect("run capnet")
}

/// The compositions every application test runs on.
const MODES: [&[&str]; 2] = [&[], &["--mono"]];

#[test]
fn capnet_ping_reaches_the_kernel_small_and_fragmented() {
    for mode in MODES {
        ping_case(mode);
    }
}

fn ping_case(mode: &[&str]) {
    let up = Up::new(CAPNET, "app-ping", mode);
    let out = capnet(&["ping", "--netns", up.name(), "-c", "3", "-i", "0.2", "10.77.0.1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("3 received"), "{text} {}", String::from_utf8_lossy(&out.stderr));
    let out = capnet(&["ping", "--netns", up.name(), "-c", "2", "-i", "0.2", "-s", "4000", "10.77.0.1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("2 received") && text.contains("4008 bytes from"), "{text}");
    let out = capnet(&["ping", "--netns", up.name(), "-c", "1", "10.77.0.99"]);
    assert!(!out.status.success(), "nobody at 10.77.0.99: no replies, non-zero exit");
}

#[test]
fn echo_serve_answers_socat_byte_exact_up_to_the_maximum() {
    for mode in MODES {
        echo_case(mode);
    }
}

fn echo_case(mode: &[&str]) {
    let up = Up::new(CAPNET, "app-echo", mode);
    let server = Killed(
        Command::new(CAPNET)
            .args(["echo-serve", "--netns", up.name(), "--udp", "--port", "7"])
            .spawn()
            .expect("echo-serve"),
    );
    std::thread::sleep(Duration::from_millis(500));
    for size in [1usize, 1472, 1473, 8000, 65507] {
        let payload: String = (0..size).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let file = format!("/tmp/capt-{}-app-{size}", std::process::id());
        let script = format!("printf '%s' \"$PAYLOAD\" | socat -b 65536 -t 1 -T 3 - UDP4:10.77.0.2:7 > {file}");
        let _ = Command::new("ip")
            .args(["netns", "exec", up.name(), "bash", "-c", &script])
            .env("PAYLOAD", &payload)
            .output();
        let got = std::fs::read(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        assert!(got == payload.as_bytes(), "{mode:?}: echo of {size} bytes: got {} bytes", got.len());
    }
    drop(server);
}

#[test]
fn the_library_behaves_like_std_net() {
    for mode in MODES {
        library_case(mode);
    }
}

/// A Linux UDP service on `port` of the namespace's peer address that answers
/// `count` datagrams, each with its bytes upper-cased, then exits.
fn linux_udp_shouter(up: &Up, port: u16, count: usize) -> std::process::Child {
    let script = format!(
        "import socket\ns=socket.socket(2,2)\ns.bind(('10.77.0.1',{port}))\nfor _ in range({count}):\n d,a=s.recvfrom(65535)\n s.sendto(d.upper(),a)\n"
    );
    let child =
        Command::new("ip").args(["netns", "exec", up.name(), "python3", "-c", &script]).spawn().expect("python");
    capnet_testkit::wait_bound(up.name(), true, port);
    child
}

fn library_case(mode: &[&str]) {
    let up = Up::new(CAPNET, "app-lib", mode);
    let stack = Stack::attach(up.name()).expect("attach");
    let mut sock = UdpSocket::bind(&stack, 0).expect("ephemeral bind");
    assert!(sock.local_port() >= 49152);
    assert_eq!(UdpSocket::bind(&stack, sock.local_port()).expect_err("in use").kind(), ErrorKind::AddrInUse);
    let mut buf = [0u8; 64];
    sock.set_nonblocking(true).expect("nonblocking");
    assert_eq!(sock.recv_from(&mut buf).expect_err("nothing queued").kind(), ErrorKind::WouldBlock);
    sock.set_nonblocking(false).expect("blocking");
    sock.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
    let t = std::time::Instant::now();
    assert_eq!(sock.recv_from(&mut buf).expect_err("nothing arrives").kind(), ErrorKind::TimedOut);
    assert!(t.elapsed() >= Duration::from_millis(250), "waited for the timeout");
    // A Linux UDP service answers; a closed Linux port refuses.
    let mut echo = linux_udp_shouter(&up, 7777, 1);
    sock.send_to(b"shout", SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7777)).expect("send");
    let (n, from) = sock.recv_from(&mut buf).expect("reply");
    assert_eq!((&buf[..n], from), (&b"SHOUT"[..], SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7777)));
    let _ = echo.wait();
    // Batches: twenty datagrams out in one call, their echoes (queued in the
    // stack meanwhile) back in one call, in order.
    let mut echo = linux_udp_shouter(&up, 7779, 20);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7779);
    let out: Vec<Vec<u8>> = (0..20).map(|i| format!("datagram {i}").into_bytes()).collect();
    let batch: Vec<(&[u8], Option<SocketAddrV4>)> = out.iter().map(|d| (&d[..], Some(to))).collect();
    assert_eq!(sock.send_many(&batch).expect("send many"), 20, "{mode:?}: every datagram went");
    let _ = echo.wait();
    std::thread::sleep(Duration::from_millis(200));
    let got = sock.recv_many(64).expect("receive many");
    let want: Vec<(Vec<u8>, SocketAddrV4)> = out.iter().map(|d| (d.to_ascii_uppercase(), to)).collect();
    assert_eq!(got, want, "{mode:?}: all twenty echoes in one call, in order");
    let refused = UdpSocket::bind(&stack, 0).expect("bind");
    refused.connect(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 9)).expect("connect");
    refused.send(b"x").expect("send");
    let mut r = refused;
    r.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    assert_eq!(r.recv_from(&mut buf).expect_err("refused").kind(), ErrorKind::ConnectionRefused);
    let ping = PingSocket::open(&stack).expect("echo socket");
    ping.send(Ipv4Addr::new(10, 77, 0, 1), 1, b"abc").expect("send");
    let (from, seq, data) = ping.recv(Duration::from_secs(3)).expect("echo reply");
    assert_eq!((from, seq, data.as_slice()), (Ipv4Addr::new(10, 77, 0, 1), 1, &b"abc"[..]));
    let _ = up.in_ns(&["true"]);
}

#[test]
fn attaching_to_nothing_says_so() {
    let err = Stack::attach("capt-nothing-here").expect_err("not up");
    assert!(err.to_string().contains("not up"), "{err}");
}

#[test]
fn the_stack_to_a_linux_socat_echo_is_byte_exact_up_to_the_maximum() {
    for mode in MODES {
        let up = Up::new(CAPNET, "app-out", mode);
        let _server = Killed(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    up.name(),
                    "socat",
                    "-b",
                    "65536",
                    "UDP4-RECVFROM:7777,bind=10.77.0.1,fork",
                    "PIPE",
                ])
                .spawn()
                .expect("socat echo"),
        );
        capnet_testkit::wait_bound(up.name(), true, 7777);
        let stack = Stack::attach(up.name()).expect("attach");
        let mut sock = UdpSocket::bind(&stack, 0).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let peer = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7777);
        let mut buf = vec![0u8; 65536];
        for size in [1usize, 1472, 1473, 8000, 65507] {
            let payload: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            sock.send_to(&payload, peer).expect("send");
            let (n, from) =
                sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("{mode:?}: no echo of {size} bytes: {e}"));
            assert_eq!(from, peer);
            assert!(buf[..n] == payload[..], "{mode:?}: echo of {size} bytes differs ({n} bytes back)");
        }
    }
}

#[test]
fn an_application_sending_garbage_is_cut_off_and_the_others_keep_working() {
    let up = Up::new(CAPNET, "app-rogue", &[]);
    let good = Stack::attach(up.name()).expect("good app");
    let ping = PingSocket::open(&good).expect("echo socket");
    // The rogue attaches like any application, then writes bytes that are not a call.
    let sock = std::os::unix::net::UnixStream::connect(capnet::attach::app_socket(up.name())).expect("connect");
    let mut rogue = capnet::attach::join(&sock, "rogue").expect("handshake").msg;
    assert!(rogue.send(b"\xde\xad\xbe\xef not an rkyv archive").expect("send"), "the message went out");
    std::thread::sleep(Duration::from_millis(300));
    // Cut off: even a well-formed call gets no answer any more.
    let call =
        capnet_proto::app::Request::<capnet_proto::edge::Payload> { id: 1, call: capnet_proto::app::Call::EchoOpen };
    let _ = rogue.send(&capnet_ipc::control::encode(&call).expect("encode"));
    std::thread::sleep(Duration::from_millis(300));
    let mut replies = 0;
    let _ = rogue.recv(|_| replies += 1);
    assert_eq!(replies, 0, "the rogue is cut off");
    // The well-behaved application and the supervisor are unaffected.
    ping.send(Ipv4Addr::new(10, 77, 0, 1), 1, b"still here").expect("send");
    let (_, seq, data) = ping.recv(Duration::from_secs(3)).expect("echo reply");
    assert_eq!((seq, data.as_slice()), (1, &b"still here"[..]));
    assert!(capnet(&["status", "--netns", up.name()]).status.success());
}

/// A TCP stream from a Linux echo back to the application arrives lent: the
/// sockets domain lends the buffers the frames were read into (no copy into
/// the reply), the application reads them and gives every one back — on the
/// monolithic stack (its own frame pool), on two groups (the driver's pool,
/// lent on twice) and factored (the driver's pool lent by ip to tcp, by tcp to
/// the sockets domain, by that to the application, each in its own process).
/// What the application sends goes the other way as loans of its send pool
/// (factored: the sockets domain lends them to tcp, tcp to ip; with the driver
/// apart, ip lends the driver the payload in place), and every one comes back. A rogue giving back a loan it never had is cut off alone.
#[test]
fn data_is_lent_both_ways_and_comes_back() {
    use std::io::{Read, Write};
    for mode in [&["--mono"][..], &["--two-group"][..], &[][..]] {
        let up = Up::new(CAPNET, "app-lent", mode);
        let _server = Killed(
            Command::new("ip")
                .args(["netns", "exec", up.name(), "socat", "TCP4-LISTEN:7778,bind=10.77.0.1,reuseaddr", "PIPE"])
                .spawn()
                .expect("socat echo"),
        );
        capnet_testkit::wait_bound(up.name(), false, 7778);
        let stack = Stack::attach(up.name()).expect("attach");
        let mut s = capnet::net::TcpStream::connect(&stack, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), 7778))
            .expect("connect");
        let payload: Vec<u8> = (0..2_000_000).map(|i: usize| (i * 7 % 253) as u8).collect();
        let mut back = vec![0u8; payload.len()];
        for (out, got) in payload.chunks(65536).zip(back.chunks_mut(65536)) {
            s.write_all(out).expect("write");
            s.read_exact(got).expect("read the echo");
        }
        assert!(back == payload, "{mode:?}: the echo differs");
        // The borrowing calls: the bytes are written into the send buffers in
        // place and read where the stack's buffers hold them. Neither makes a
        // copy in this process (each test is its own process under nextest);
        // the check after copies them out, counted apart. A read shorter than
        // `INLINE_BELOW` came inside the message (a loan costs more), so only
        // the longer ones are held to none.
        // (What fills the buffers here is the test's own copy_from_slice, not
        // counted: the library's copies are.)
        // Each chunk goes as a short write, then the rest: the echo's short
        // segment comes inline (under `INLINE_BELOW`) in front of lent ones,
        // and a read of both lends those still (the short piece rides
        // between the loans: decoding it is copies, at most three a byte,
        // of those bytes only).
        let (mut echoed, mut wrote, mut made, mut inline) = (Vec::new(), 0, 0, 0);
        for out in payload.chunks(65536) {
            let mut sent = 0;
            while sent < out.len() {
                let len = if sent == 0 { 100 } else { out.len() - sent };
                let before = capnet_ipc::pool::bytes_copied();
                sent += s
                    .write_in_place(len, |at, buf| buf.copy_from_slice(&out[sent + at..][..buf.len()]))
                    .expect("write in place");
                wrote += capnet_ipc::pool::bytes_copied() - before;
            }
            std::thread::sleep(Duration::from_millis(20));
            let mut read = 0;
            while read < out.len() {
                let before = capnet_ipc::pool::bytes_copied();
                let b = s.read_in_place(out.len() - read).expect("read in place");
                if b.len() >= capnet_runtime::link::INLINE_BELOW {
                    made += capnet_ipc::pool::bytes_copied() - before;
                    inline += 3 * (b.len() - b.lent()) as u64;
                }
                assert!(!b.is_empty(), "{mode:?}: the echo ended early");
                read += b.len();
                let mut v = vec![0u8; b.len()];
                b.copy_to(&mut v);
                echoed.extend(v);
            }
        }
        assert!(echoed == payload, "{mode:?}: the echo in place differs");
        assert_eq!(wrote, 0, "{mode:?}: the borrowing writes copied bytes");
        assert!(
            made <= inline,
            "{mode:?}: the borrowing calls copied {made} bytes, beyond the {inline} short pieces may"
        );
        assert!(
            inline < payload.len() as u64 / 10,
            "{mode:?}: {inline} copies of bytes that came inline: most were not lent"
        );
        std::thread::sleep(Duration::from_millis(250));
        let made = up.counter("sockets", "app_loans");
        assert!(made > 0, "{mode:?}: nothing was lent to the application");
        assert_eq!(up.counter("sockets", "app_loans_held"), 0, "{mode:?}: every loan came back");
        if mode != ["--mono"] {
            // The driver apart wrote the application's buffers in place (ip
            // lent them, behind headers in its own pool).
            assert!(up.counter("driver", "send_pieces_in_place") > 0, "{mode:?}: the driver copied every frame");
        }
        if mode.is_empty() {
            assert_eq!(up.counter("tcp", "link_sockets_lent"), 0, "factored: tcp has every loan back");
            // And what the application sent went as loans of its send pool:
            // the sockets domain lent them to tcp, tcp lent them on to ip.
            assert!(up.counter("sockets", "link_tcp_loans_made") > 0, "factored: the sockets domain lent tcp nothing");
            assert!(up.counter("tcp", "link_ip_loans_made") > 0, "factored: tcp lent ip nothing");
            assert_eq!(up.counter("sockets", "link_tcp_lent"), 0, "factored: tcp gave back every send loan");
            assert_eq!(up.counter("tcp", "link_ip_lent"), 0, "factored: ip gave back every send loan");
        }

        // A rogue returns a ticket it was never given: cut off, and the good
        // application's stream goes on.
        let sock = std::os::unix::net::UnixStream::connect(capnet::attach::app_socket(up.name())).expect("connect");
        let mut rogue = capnet::attach::join(&sock, "rogue").expect("handshake").msg;
        rogue.return_loans(&[0xdead_beef_0000_0007]).expect("send the return");
        let call = capnet_proto::app::Request::<capnet_proto::edge::Payload> {
            id: 1,
            call: capnet_proto::app::Call::EchoOpen,
        };
        std::thread::sleep(Duration::from_millis(300));
        let _ = rogue.send(&capnet_ipc::control::encode(&call).expect("encode"));
        std::thread::sleep(Duration::from_millis(300));
        let mut replies = 0;
        let _ = rogue.recv(|_| replies += 1);
        assert_eq!(replies, 0, "{mode:?}: the rogue is cut off");
        s.write_all(b"still here").expect("write");
        let mut more = [0u8; 10];
        s.read_exact(&mut more).expect("read");
        assert_eq!(&more, b"still here");
    }
}

/// An application that writes, closes and leaves while tcp still sends what
/// it wrote (a slow Linux reader): every byte arrives and no domain is cut
/// off. Its send pool is retired, not forgotten at once, so loans of it still
/// crossing a ring are read (ip once cut tcp off at such a detach: "it lent a
/// buffer we may not read"). That race is rare: this test did not hit it with
/// the grace set to nothing either; it guards the detach-while-sending path.
#[test]
fn an_application_leaving_while_its_data_is_sent_loses_nothing() {
    use std::io::Write;
    let reader = "
import socket, sys, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('10.77.0.1', int(sys.argv[1])))
l.listen(1)
c, _ = l.accept()
time.sleep(0.3)
n = 0
while True:
    d = c.recv(65536)
    if not d:
        break
    n += len(d)
print(n)
";
    let up = Up::new(CAPNET, "app-leave", &[]);
    for round in 0..6u16 {
        let port = 7400 + round;
        let reading = Command::new("ip")
            .args(["netns", "exec", up.name(), "python3", "-c", reader, &port.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the reader");
        capnet_testkit::wait_bound(up.name(), false, port);
        let stack = Stack::attach(up.name()).expect("attach");
        let mut s = capnet::net::TcpStream::connect(&stack, SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 1), port))
            .expect("connect");
        for _ in 0..16 {
            s.write_all(&[0x5a; 65536]).expect("write");
        }
        drop(s);
        drop(stack); // leaves while tcp still holds most of it
        let out = reading.wait_with_output().expect("the reader");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (16 * 65536).to_string(), "round {round}");
    }
    let status = String::from_utf8_lossy(&up.capnet(&["status", "--json"]).stdout).into_owned();
    assert!(!status.contains("cut off"), "a domain was cut off: {status}");
}
