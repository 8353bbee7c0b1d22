"""Hostile peers on the Linux side, for capnet's hardening tests (issue 18).

usage:
  peer_floods.py frags DST SECONDS         first fragments that never complete, from
                                           spoofed on-link sources: 64 at once, then 3/s
  peer_floods.py arp IFACE DST COUNT       COUNT ARP requests for DST, each from
                                           another sender address and MAC
  peer_floods.py syn DST PORT SECONDS      spoofed SYNs from on-link sources that never
                                           answer: 300 at once, then 5/s
Raw sockets: run as root in the test's own namespace.
"""
import os
import random
import socket
import struct
import sys
import time


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ipv4(src, dst, proto, ident, flags_frag, payload):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags_frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def first_fragment(src, dst):
    payload = b"\x08\x00\x00\x00" + os.urandom(1476)  # an ICMP echo's start, never finished
    return ipv4(src, dst, 1, random.randint(0, 65535), 0x2000, payload)


def syn_packet(src, dst, port):
    sport, seq = random.randint(1024, 65535), random.getrandbits(32)
    # SYN with MSS 1460: data offset 6 words.
    tcp = struct.pack("!HHIIBBHHH", sport, port, seq, 0, 6 << 4, 0x02, 64240, 0, 0) + b"\x02\x04\x05\xb4"
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    return ipv4(src, dst, 6, random.randint(0, 65535), 0, tcp)


def flood(dst, make, burst, per_second, seconds):
    """`burst` packets from spoofed on-link sources at once, then `per_second`
    a second for `seconds`; prints how many went out."""
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
    net = dst.rsplit(".", 1)[0]
    sent = 0

    def one():
        nonlocal sent
        s.sendto(make("%s.%d" % (net, random.randint(100, 250))), (dst, 0))
        sent += 1

    for _ in range(burst):
        one()
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(per_second):
            one()
        time.sleep(1)
    print(sent)


def arp(iface, dst, count):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.bind((iface, 0))
    for i in range(count):
        mac = bytes([0x02, 0x77, (i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF, 0x01])
        sender = struct.pack("!I", random.getrandbits(32))
        if i % 2:
            sender = socket.inet_aton(dst)[:3] + bytes([random.randint(3, 254)])  # on the link
        body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac, sender, b"\0" * 6, socket.inet_aton(dst))
        s.send(b"\xff" * 6 + mac + b"\x08\x06" + body)
    print(count)


if __name__ == "__main__":
    if sys.argv[1] == "frags":
        dst = sys.argv[2]
        flood(dst, lambda src: first_fragment(src, dst), 64, 3, float(sys.argv[3]))
    elif sys.argv[1] == "syn":
        dst, port = sys.argv[2], int(sys.argv[3])
        flood(dst, lambda src: syn_packet(src, dst, port), 300, 5, float(sys.argv[4]))
    else:
        arp(sys.argv[2], sys.argv[3], int(sys.argv[4]))
