"""RFC 5961 against capnet, from a raw socket on the Linux side.

Opens a TCP connection to capnet's echo server, learns capnet's sequence
numbers by sniffing the TAP, then forges: an in-window RST (not at RCV.NXT),
an in-window SYN, and finally an RST exactly at RCV.NXT. The first two must each
draw a challenge ACK and leave the connection working; the last must reset it.
Prints one line per check; exits non-zero on the first failure.
"""
import socket
import struct
import sys
import time

TAP, LINUX, CAPNET, PORT = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
FIN, SYN, RST, PSH, ACK = 1, 2, 4, 8, 16


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def forge(sport, seq, ack, flags):
    """A bare TCP header from us to capnet, checksummed over the pseudo-header."""
    hdr = struct.pack("!HHIIBBHHH", sport, PORT, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = socket.inet_aton(LINUX) + socket.inet_aton(CAPNET) + struct.pack("!BBH", 0, 6, len(hdr))
    c = checksum(pseudo + hdr)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:]


sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
sniff.bind((TAP, 0))
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)


def from_capnet(sport, timeout):
    """Segments capnet sends on our connection: (seq, ack, flags, payload length)."""
    end = time.time() + timeout
    while time.time() < end:
        sniff.settimeout(max(0.01, end - time.time()))
        try:
            frame = sniff.recv(65535)
        except socket.timeout:
            return
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        if ip[9] != 6 or socket.inet_ntoa(ip[12:16]) != CAPNET:
            continue
        tcp = ip[ihl:]
        src, dst, seq, ack, off, flags = struct.unpack("!HHIIBB", tcp[:14])
        if (src, dst) != (PORT, sport):
            continue
        total = struct.unpack("!H", ip[2:4])[0]
        yield seq, ack, flags, total - ihl - (off >> 4) * 4


def drain():
    sniff.settimeout(0.05)
    try:
        while True:
            sniff.recv(65535)
    except socket.timeout:
        pass


def echo(conn, sport, data):
    """Sends `data`, reads the echo, returns capnet's RCV.NXT (its last ACK)."""
    drain()
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        got += conn.recv(100)
    assert got == data, (got, data)
    acks = [ack for _, ack, flags, n in from_capnet(sport, 0.3) if flags & ACK]
    assert acks, "saw no segment from capnet"
    return max(acks)


def expect_challenge(sport, rcv_nxt, what):
    ok = any(flags == ACK and ack == rcv_nxt and n == 0 for _, ack, flags, n in from_capnet(sport, 1.0))
    print(f"{what}: challenge ACK {'seen' if ok else 'MISSING'}")
    if not ok:
        sys.exit(1)


conn = socket.create_connection((CAPNET, PORT), timeout=5)
sport = conn.getsockname()[1]
rcv_nxt = echo(conn, sport, b"hello")

raw.sendto(forge(sport, rcv_nxt + 1000, 0, RST), (CAPNET, 0))
expect_challenge(sport, rcv_nxt, "in-window RST")
rcv_nxt = echo(conn, sport, b"still here")
print("connection survives the RST")

raw.sendto(forge(sport, rcv_nxt + 500, 0, SYN), (CAPNET, 0))
expect_challenge(sport, rcv_nxt, "in-window SYN")
rcv_nxt = echo(conn, sport, b"and the SYN")
print("connection survives the SYN")

raw.sendto(forge(sport, rcv_nxt, 0, RST), (CAPNET, 0))
time.sleep(0.3)
try:
    conn.sendall(b"gone?")
    data = conn.recv(100)
    print(f"exact RST: connection still answered {data!r}")
    sys.exit(1)
except (ConnectionResetError, BrokenPipeError):
    print("exact RST: connection reset")
