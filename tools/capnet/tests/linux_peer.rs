//! The runtime's packet path against the Linux kernel (root: a namespace and
//! a TAP; the runtime's own tests need neither): a TAP inside a namespace the
//! test makes, the kernel at 10.77.0.1 on one side, the mono stack at 10.77.0.2 on
//! the other. Linux's ping gets replies (also 4000-byte ones, fragmented both
//! ways), socat's UDP datagrams come back byte-exact from an echo service on the
//! stack, and a datagram to a closed port makes Linux see port unreachable.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capnet_driver::impair::Impairment;
use capnet_ip::{Config, EthernetAddress, Ipv4Address, Ipv4Cidr};
use capnet_kernel_shim::device::Device;
use capnet_runtime::domain::driver::Driver;
use capnet_runtime::engine::start as start_two_groups;
use capnet_runtime::{Cores, DeviceStats, LinkImpairment, MonoStack, Stack};
use capnet_testkit::Netns;

/// The compositions every test here runs on.
#[derive(Debug, Clone, Copy)]
enum Composition {
    /// One group: cores and device in one thread.
    Mono,
    /// Two groups: driver | ip + udp, over ipc channels and pools.
    TwoGroup,
}

const ALL: [Composition; 2] = [Composition::Mono, Composition::TwoGroup];

/// Work for the stack's thread (it owns the cores).
type Job = Box<dyn FnOnce(&mut Cores) + Send>;

/// A running stack: namespace, the stack thread, and its stop flag.
struct Running {
    ns: Netns,
    jobs: std::sync::mpsc::Sender<Job>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Box<dyn Stack + Send>>>,
    driver: Option<Driver>,
}

impl Running {
    /// Runs `f` on the stack's thread and returns its result.
    fn on_stack<T: Send + 'static>(&self, f: impl FnOnce(&mut Cores) -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        self.jobs.send(Box::new(move |c| drop(tx.send(f(c))))).expect("stack thread alive");
        rx.recv_timeout(Duration::from_secs(10)).expect("stack thread answered")
    }

    /// Stops the stack and hands back its cores and the device-side counters.
    fn finish(mut self) -> (Box<dyn Stack + Send>, DeviceStats) {
        self.stop.store(true, Ordering::Relaxed);
        let s = self.thread.take().expect("running").join().expect("stack thread");
        let stats = match self.driver.take() {
            Some(d) => d.stop().expect("driver"),
            None => s.device_stats().expect("a mono stack keeps device counters"),
        };
        assert!(stats.frames_written > 0 && stats.write_errors == 0, "{stats:?}");
        (s, stats)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(d) = self.driver.take() {
            let _ = d.stop();
        }
    }
}

/// Brings up namespace + TAP + stack in `comp` with a UDP echo service on port 7,
/// served from the stack's thread.
fn stack(tag: &str, comp: Composition) -> Running {
    stack_with(tag, comp, LinkImpairment::NONE)
}

fn stack_with(tag: &str, comp: Composition, link: LinkImpairment) -> Running {
    stack_cfg(tag, comp, link, |_| {})
}

fn stack_cfg(tag: &str, comp: Composition, link: LinkImpairment, tweak: impl FnOnce(&mut Config)) -> Running {
    let ns = Netns::new(tag);
    // Mono takes plain frames, two groups the virtio-net header with offloads: both
    // device paths are covered by every test.
    let dev = Device::open_tap("cap0", Some(&ns.path()), matches!(comp, Composition::TwoGroup)).expect("tap");
    // IPv4 only (the design's scope): no IPv6 chatter from the kernel side.
    ns.run_ok(&["sysctl", "-qw", "net.ipv6.conf.cap0.disable_ipv6=1"]);
    ns.run_ok(&["ip", "link", "set", "cap0", "up"]);
    ns.run_ok(&["ip", "addr", "add", "10.77.0.1/24", "dev", "cap0"]);
    let mut cfg =
        Config::new(EthernetAddress([0x02, 0xca, 0xfe, 0, 0, 2]), Ipv4Cidr::new(Ipv4Address::new(10, 77, 0, 2), 24));
    tweak(&mut cfg);
    let (mut s, driver): (Box<dyn Stack + Send>, Option<Driver>) = match comp {
        Composition::Mono => (Box::new(MonoStack::new(dev, cfg, 1 << 20, link).expect("stack")), None),
        Composition::TwoGroup => {
            let (s, d) = start_two_groups(dev, cfg, 1 << 20, link).expect("two groups");
            (Box::new(s), Some(d))
        }
    };
    let echo = s.cores().udp().bind(7).expect("bind 7");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
    let thread = std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            s.poll(Duration::from_millis(20)).expect("poll");
            while let Ok(job) = inbox.try_recv() {
                job(s.cores());
            }
            let udp = s.cores().udp();
            while let Ok(Some(d)) = udp.recv_from(echo) {
                udp.send_to(echo, Some((d.src, d.src_port)), &d.data).expect("echo");
            }
        }
        s
    });
    Running { ns, jobs, stop, thread: Some(thread), driver }
}

#[test]
fn linux_ping_gets_replies_small_and_fragmented() {
    for comp in ALL {
        ping_case(comp);
    }
}

fn ping_case(comp: Composition) {
    let run = stack("ping", comp);
    let ns = &run.ns;
    let out = ns.run(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("3 received"), "{comp:?} ping: {text}");
    let big = ns.run(&["ping", "-c", "2", "-s", "4000", "-W", "2", "10.77.0.2"]);
    let text = String::from_utf8_lossy(&big.stdout).into_owned();
    assert!(
        big.status.success() && text.contains("2 received") && text.contains("4008 bytes from"),
        "{comp:?} ping -s 4000: {text}"
    );
    let (mut s, _) = run.finish();
    assert!(s.cores().ip().stats().echo_replies >= 5, "the replies Linux counted came from this stack");
}

#[test]
fn udp_echo_against_socat_is_byte_exact_up_to_the_maximum() {
    for comp in ALL {
        udp_case(comp);
    }
}

fn udp_case(comp: Composition) {
    let run = stack("udp", comp);
    let ns = &run.ns;
    for size in [1usize, 1472, 1473, 8000, 65507] {
        let payload: String = (0..size).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let script = format!(
            "printf '%s' \"$PAYLOAD\" | socat -b 65536 -t 1 -T 3 - UDP4:10.77.0.2:7 > /tmp/capt-{}-{size}",
            std::process::id()
        );
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), "bash", "-c", &script]).env("PAYLOAD", &payload);
        let socat = cmd.output().expect("socat");
        let path = format!("/tmp/capt-{}-{size}", std::process::id());
        let got = std::fs::read(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            got.len(),
            size,
            "{comp:?}: echo of {size} bytes; socat: {}",
            String::from_utf8_lossy(&socat.stderr)
        );
        assert!(got == payload.as_bytes(), "{comp:?}: echo of {size} bytes differs");
    }
    let (mut s, _) = run.finish();
    assert!(s.cores().ip().stats().packets_in >= 5);
}

#[test]
fn a_closed_udp_port_is_refused_to_linux() {
    for comp in ALL {
        closed_case(comp);
    }
}

fn closed_case(comp: Composition) {
    let run = stack("closed", comp);
    let ns = &run.ns;
    // Linux reports ICMP port unreachable on a connected UDP socket as ECONNREFUSED.
    let script = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.connect(('10.77.0.2',9))\ns.send(b'x')\ntry:\n    s.recv(10)\nexcept ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    print('timeout')\n";
    let out = ns.run(&["python3", "-c", script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("refused"), "{comp:?}: python said: {text} {}", String::from_utf8_lossy(&out.stderr));
    let (mut s, _) = run.finish();
    assert_eq!(s.cores().udp().stats().dropped(capnet_udp::DropReason::NoSocket), 1);
}

#[test]
fn ten_percent_loss_each_way_and_the_counters_agree() {
    for comp in ALL {
        let link = LinkImpairment { inbound: Impairment::loss(0.10, 11), outbound: Impairment::loss(0.10, 12) };
        let run = stack_with("loss", comp, link);
        let out = run.ns.run(&["ping", "-q", "-c", "500", "-i", "0.01", "-W", "1", "10.77.0.2"]);
        let received = capnet_testkit::ping_received(&out);
        // Each way loses 10%: about 81% of pings come back.
        assert!((350..=450).contains(&received), "{comp:?}: {received}/500 replies");
        std::thread::sleep(Duration::from_millis(200));
        let (mut s, dev) = run.finish();
        let ip = s.cores().ip().stats().clone();
        assert!(dev.inbound.dropped > 20 && dev.outbound.dropped > 20, "{comp:?}: {dev:?}");
        assert_eq!(
            ip.frames_in,
            dev.inbound.frames - dev.inbound.dropped,
            "{comp:?}: every frame not dropped reached ip"
        );
        assert_eq!(
            dev.frames_written,
            dev.outbound.frames - dev.outbound.dropped,
            "{comp:?}: every frame not dropped was written"
        );
        assert_eq!(dev.inbound.frames, dev.frames_read, "{comp:?}: every frame read went through the stage");
    }
}

/// Crafted frames from a raw packet socket on the Linux side of the TAP.
const MALFORMED: &str = r#"
import socket, struct, sys
US = bytes.fromhex('02cafe000002')
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(('cap0', 0))
me = s.getsockname()[4]

def csum(b):
    if len(b) % 2: b += b'\0'
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while t >> 16: t = (t & 0xffff) + (t >> 16)
    return (~t) & 0xffff

def ip(payload, ident=1, proto=1, frag=0, ihl=5, total=None, good_sum=True, ver=4):
    total = total if total is not None else ihl * 4 + len(payload)
    h = struct.pack('!BBHHHBBH4s4s', (ver << 4) | ihl, 0, total, ident, frag, 64, proto, 0,
                    bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2]))
    h += b'\0' * (ihl * 4 - 20) if ihl >= 5 else b''
    c = csum(h[:20] if ihl < 5 else h)
    if not good_sum: c ^= 0xffff
    h = h[:10] + struct.pack('!H', c) + h[12:]
    return h + payload

def frame(p, ethertype=0x0800):
    s.send(US + me + struct.pack('!H', ethertype) + p)

echo = b'\x08\x00' + b'\0\0' + struct.pack('!HH', 7, 1) + b'x' * 32
echo = echo[:2] + struct.pack('!H', csum(echo)) + echo[4:]
frame(ip(echo, good_sum=False))                       # ip_bad_checksum
frame(ip(echo)[:12])                                  # ip_truncated (header cut)
frame(ip(echo, ihl=4)[:len(echo) + 16])               # ip_bad_header_len
frame(ip(echo, total=500))                            # ip_truncated (total > frame)
frame(ip(echo, ver=6))                                # ip_bad_version
frame(ip(echo[:24], ident=9, frag=0x2000))            # overlapping fragments ...
frame(ip(echo[16:], ident=9, frag=2))                 # ... frag_overlap
for i in range(200):                                  # a fragment flood: frag_memory
    frame(ip(b'\0' * 64, ident=1000 + i, frag=0x2000))
frame(b'\0' * 20, ethertype=0x88b5)                   # eth_unknown_type
print('sent')
"#;

#[test]
fn malformed_frames_from_linux_are_counted_by_reason_and_pings_keep_working() {
    use capnet_ip::DropReason::*;
    for comp in ALL {
        let run = stack("bad", comp);
        let out = run.ns.run(&["python3", "-c", MALFORMED]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("sent"),
            "{comp:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ping = run.ns.run(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"]);
        assert!(String::from_utf8_lossy(&ping.stdout).contains("3 received"), "{comp:?}: pings after the garbage");
        let (mut s, _) = run.finish();
        let st = s.cores().ip().stats().clone();
        for (reason, at_least) in [
            (IpBadChecksum, 1),
            (IpTruncated, 2),
            (IpBadHeaderLen, 1),
            (IpBadVersion, 1),
            (FragOverlap, 1),
            (FragMemory, 100),
            (EthUnknownType, 1),
        ] {
            assert!(
                st.dropped(reason) >= at_least,
                "{comp:?}: {} = {} (want ≥ {at_least})",
                reason.name(),
                st.dropped(reason)
            );
        }
    }
}

#[test]
fn the_stack_resolves_before_its_first_send_and_again_after_expiry() {
    for comp in ALL {
        let run = stack_cfg("arp", comp, LinkImpairment::NONE, |c| c.arp_expiry = capnet_ip::Duration::from_secs(2));
        // A Linux UDP echo service for exactly two datagrams.
        let mut echo = Command::new("ip")
            .args(["netns", "exec", run.ns.name(), "python3", "-c"])
            .arg("import socket\ns=socket.socket(2,2)\ns.bind(('10.77.0.1',7777))\nfor _ in range(2):\n    d,a=s.recvfrom(65535); s.sendto(d,a)\n")
            .spawn()
            .expect("python echo");
        capnet_testkit::wait_bound(run.ns.name(), true, 7777);
        let requests = |run: &Running| run.on_stack(|c| c.ip().stats().arp_requests);
        let at_start = requests(&run);
        let sock = run.on_stack(|c| c.udp().bind(40000).expect("bind"));
        let exchange = |payload: &'static [u8]| {
            run.on_stack(move |c| {
                c.udp().send_to(sock, Some((Ipv4Address::new(10, 77, 0, 1), 7777)), payload).expect("send")
            });
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(d) = run.on_stack(move |c| c.udp().recv_from(sock).expect("recv")) {
                    assert_eq!((d.src, d.src_port, d.data.as_slice()), (Ipv4Address::new(10, 77, 0, 1), 7777, payload));
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "{comp:?}: no echo from Linux");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        exchange(b"one");
        assert_eq!(requests(&run), at_start + 1, "{comp:?}: one ARP request resolved the first send");
        let neigh = run.ns.run(&["ip", "neigh", "show", "10.77.0.2"]);
        assert!(
            String::from_utf8_lossy(&neigh.stdout).contains("02:ca:fe:00:00:02"),
            "{comp:?}: Linux learned our MAC"
        );
        std::thread::sleep(Duration::from_millis(2500));
        exchange(b"two");
        assert!(requests(&run) >= at_start + 2, "{comp:?}: the entry expired after 2 s and was resolved again");
        let _ = echo.wait();
        let _ = run.finish();
    }
}

#[test]
fn an_af_packet_device_on_a_veth_carries_the_stack_in_both_compositions() {
    for comp in ALL {
        let ns = Netns::new("pkt");
        ns.run_ok(&["ip", "link", "add", "kern0", "type", "veth", "peer", "name", "stack0"]);
        for dev in ["kern0", "stack0"] {
            ns.run_ok(&["sysctl", "-qw", &format!("net.ipv6.conf.{dev}.disable_ipv6=1")]);
            ns.run_ok(&["ip", "link", "set", dev, "up"]);
        }
        ns.run_ok(&["ip", "addr", "add", "10.79.0.1/24", "dev", "kern0"]);
        let dev = Device::open_packet("stack0", Some(&ns.path())).expect("packet socket");
        let cfg = Config::new(
            EthernetAddress([0x02, 0xca, 0xfe, 0, 0, 9]),
            Ipv4Cidr::new(Ipv4Address::new(10, 79, 0, 2), 24),
        );
        let (mut s, driver): (Box<dyn Stack + Send>, Option<Driver>) = match comp {
            Composition::Mono => {
                (Box::new(MonoStack::new(dev, cfg, 1 << 20, LinkImpairment::NONE).expect("stack")), None)
            }
            Composition::TwoGroup => {
                let (s, d) = start_two_groups(dev, cfg, 1 << 20, LinkImpairment::NONE).expect("two groups");
                (Box::new(s), Some(d))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                s.poll(Duration::from_millis(20)).expect("poll");
            }
            s
        });
        let out = ns.run(&["ping", "-c", "3", "-i", "0.2", "-W", "2", "10.79.0.2"]);
        stop.store(true, Ordering::Relaxed);
        let mut s = t.join().expect("stack");
        if let Some(d) = driver {
            d.stop().expect("driver");
        }
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("3 received"),
            "{comp:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let st = s.cores().ip().stats().clone();
        assert!(st.echo_replies >= 3);
        assert_eq!(st.dropped(capnet_ip::DropReason::EthNotForUs), 0, "{comp:?}: our own frames do not come back");
    }
}
