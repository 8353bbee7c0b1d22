"""Many slow TCP clients at once, for capnet's hardening tests (issue 18).

usage: slow_clients.py HOST PORT CONNECTIONS SECONDS INTERVAL_MS

Opens CONNECTIONS connections to HOST:PORT all at once (a burst of connects),
then for SECONDS sends one byte on each every INTERVAL_MS and reads its echo.
Prints one JSON line: connections established, echoes sent and received,
connections that got fewer echoes than they sent, connections that failed
(reset, refused, timed out) and the first error seen.
A correct echo server answers every byte of every connection.
"""
import json
import resource
import selectors
import socket
import sys
import time

host, port, count, seconds, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]) / 1000.0
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count + 64), max(hard, count + 64)))

sel = selectors.DefaultSelector()
conns = {}
failed = 0
first_error = None
for i in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, port))
    conns[s] = {"sent": 0, "got": 0, "up": False, "next": 0.0}
    sel.register(s, selectors.EVENT_WRITE)

def fail(s, why):
    global failed, first_error
    failed += 1
    first_error = first_error or why
    sel.unregister(s)
    s.close()
    del conns[s]

# Connects: give them 20 s to complete.
deadline = time.monotonic() + 20
while time.monotonic() < deadline and not all(c["up"] for c in conns.values()):
    for key, _ in sel.select(0.2):
        s = key.fileobj
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            fail(s, "connect: " + str(err))
        else:
            conns[s]["up"] = True
            sel.modify(s, selectors.EVENT_READ)
established = sum(1 for c in conns.values() if c["up"])
for s in [s for s, c in conns.items() if not c["up"]]:
    fail(s, "connect timed out")

# Slow traffic: a byte every interval on every connection, spread over the interval.
start = time.monotonic()
for k, c in enumerate(conns.values()):
    c["next"] = start + interval * k / max(1, len(conns))
end = start + seconds
while time.monotonic() < end + 10 and conns:
    now = time.monotonic()
    if now < end:
        for s, c in list(conns.items()):
            if c["next"] <= now:
                try:
                    s.send(b"x")
                    c["sent"] += 1
                except OSError as e:
                    fail(s, "send: " + str(e))
                    continue
                c["next"] += interval
    elif all(c["got"] >= c["sent"] for c in conns.values()):
        break
    for key, _ in sel.select(0.01):
        s = key.fileobj
        try:
            d = s.recv(4096)
        except OSError as e:
            fail(s, "recv: " + str(e))
            continue
        if not d:
            fail(s, "closed by the server")
            continue
        conns[s]["got"] += len(d)

sent = sum(c["sent"] for c in conns.values())
got = sum(c["got"] for c in conns.values())
short = sum(1 for c in conns.values() if c["got"] < c["sent"])
print(json.dumps({"established": established, "sent": sent, "received": got, "short": short, "failed": failed,
                  "first_error": first_error}))
