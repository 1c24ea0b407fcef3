#!/usr/bin/env python3
"""Checks kv.c's protocol natively, without the wasm host: builds kv.c with
the system C compiler, hands it a listening socket as fd 3 (where
upstare-host puts its first --tcplisten listener) and talks to it.

usage: [KV_VERSION=N] guest-examples/kv-server/native-check.py [KV_BINARY]

KV_VERSION (default 1) is the version to build (-DKV_VERSION=N) or that
KV_BINARY was built as; every version must pass the checks of version 1, and
each is checked for its own STATS.
"""
import atexit, os, select, shutil, socket, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = int(os.environ.get("KV_VERSION", "1"))
if len(sys.argv) > 1:
    BIN = sys.argv[1]
else:
    tmp = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, tmp, True)
    BIN = os.path.join(tmp, "kv")
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-O2", "-g", "-Wall", "-Wextra", f"-DKV_VERSION={VERSION}", "-I", os.path.join(HERE, "..", "include"),
                    os.path.join(HERE, "kv.c"), "-o", BIN], check=True)

def start(args=()):
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(128)
    port = ls.getsockname()[1]
    fd = ls.fileno()
    # the shell moves the listener to fd 3; SIGPIPE stays ignored (as Python
    # set it) because the server must survive clients that vanish mid-reply
    redirect = f'3<&{fd} {fd}<&-' if fd != 3 else ""
    p = subprocess.Popen(["sh", "-c", f'exec "$0" "$@" {redirect}', BIN, *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(fd,),
                         restore_signals=False)
    ls.close()
    line = p.stdout.readline().decode()
    assert line == "kv: listening on fd 3\n", line
    return p, port

def conn(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    return s

def recv_lines(s, n):
    buf = b""
    while buf.count(b"\n") < n:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    return buf.decode().splitlines()

def talk(s, data, n):
    s.sendall(data.encode())
    return recv_lines(s, n)

p, port = start()
s = conn(port)
assert talk(s, "SET a hello world\n", 1) == ["OK"]
assert talk(s, "GET a\n", 1) == ["VALUE hello world"]
assert talk(s, "GET b\r\n", 1) == ["NOT_FOUND"]
assert talk(s, "COUNT\n", 1) == ["COUNT 1"]
assert talk(s, "set  b  two  spaces \r\n", 1) == ["OK"]
assert talk(s, "GET b\n", 1) == ["VALUE  two  spaces "]
assert talk(s, "SET e \n", 1) == ["OK"]
assert talk(s, "GET e\n", 1) == ["VALUE "]
assert talk(s, "FOO\n", 1) == ["ERROR unknown command"]
assert talk(s, "\n\r\nGET\n", 1) == ["ERROR usage: GET <key>"]
assert talk(s, "SET k\n", 1) == ["ERROR usage: SET <key> <value>"]
assert talk(s, "GET a b\n", 1) == ["ERROR usage: GET <key>"]
assert talk(s, "DEL a\nDEL a\nCOUNT\n", 3) == ["DELETED", "NOT_FOUND", "COUNT 2"]
# commands split across sends
s.sendall(b"SE"); time.sleep(0.05); s.sendall(b"T x 1"); time.sleep(0.05); s.sendall(b"2\nGE")
time.sleep(0.05); s.sendall(b"T x\n")
assert recv_lines(s, 2) == ["OK", "VALUE 12"]
# pipelining: thousands of commands in few reads
cmds = "".join(f"SET k{i} v{i}\n" for i in range(5000)) + "".join(f"GET k{i}\n" for i in range(5000))
s.sendall(cmds.encode())
lines = recv_lines(s, 10000)
assert lines[:5000] == ["OK"] * 5000 and lines[5000:] == [f"VALUE v{i}" for i in range(5000)]
assert talk(s, "COUNT\n", 1) == ["COUNT 5003"]
assert talk(s, "QUIT\nGET a\n", 1) == ["BYE"]
assert s.recv(10) == b""
s.close()

# many connections at once, then half leave politely and half with a reset
socks = [conn(port) for _ in range(300)]
for i, c in enumerate(socks):
    c.sendall(f"SET conn{i} {i}\n".encode())
for i, c in enumerate(socks):
    assert recv_lines(c, 1) == ["OK"]
for i, c in enumerate(socks):
    c.sendall(f"GET conn{(i+1)%300}\n".encode())
for i, c in enumerate(socks):
    assert recv_lines(c, 1) == [f"VALUE {(i+1)%300}"]
for c in socks[::2]:
    c.close()
for c in socks[1::2]:
    # abrupt reset
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.sendall(b"GET conn1\n")
    c.close()

# big values to a reader that falls behind: partial writes, POLLOUT
s = conn(port)
big = "x" * 100000
assert talk(s, f"SET big {big}\n", 1) == ["OK"]
s.sendall(b"GET big\n" * 300)
time.sleep(0.5)
buf = b""
while buf.count(b"\n") < 300:
    d = s.recv(1 << 20)
    assert d
    buf += d
assert buf == (f"VALUE {big}\n" * 300).encode()
# a client that half-closes still gets its replies, even to an unterminated last line
s2 = conn(port)
s2.sendall(b"SET h 1\nGET h")
s2.shutdown(socket.SHUT_WR)
data = b""
while True:
    d = s2.recv(100)
    if not d: break
    data += d
assert data == b"OK\nVALUE 1\n", data
# a line that never ends
s3 = conn(port)
try:
    s3.sendall(b"y" * (1100 * 1024))
except OSError:
    pass
got = b""
try:
    while True:
        d = s3.recv(100)
        if not d: break
        got += d
except ConnectionResetError:
    pass
assert got == b"ERROR line too long\n", got
assert talk(s, "COUNT\n", 1) == ["COUNT 5305"]
s.sendall(b"SHUTDOWN\n")
assert recv_lines(s, 1) == ["BYE"]
rc = p.wait(5)
out = p.stdout.read().decode(); err = p.stderr.read().decode()
assert rc == 0 and out == "kv: shutdown\n", (rc, out, err)
assert err == "", err
print("protocol, pipelining, partial lines and writes, 300 connections: ok")

# at --max-conns, further clients wait in the backlog
p, port = start(["--max-conns", "2"])
a, b = conn(port), conn(port)
assert talk(a, "COUNT\n", 1) == ["COUNT 0"]
assert talk(b, "COUNT\n", 1) == ["COUNT 0"]
c = conn(port)
c.sendall(b"COUNT\n")
r, _, _ = select.select([c], [], [], 0.5)
assert not r, "third served early"
a.close()
assert recv_lines(c, 1) == ["COUNT 0"]
c.sendall(b"SHUTDOWN\n"); assert recv_lines(c, 1) == ["BYE"]
assert p.wait(5) == 0
print("--max-conns: ok")

# STATS: unknown to version 1; counts in 2 and 3 (blank lines are not
# requests; wake-ups are at least one per request read); in 4 the last command
p, port = start()
s = conn(port)
if VERSION == 1:
    assert talk(s, "STATS\n", 1) == ["ERROR unknown command"]
else:
    first = talk(s, "STATS\n", 1)[0].split()
    assert talk(s, "\nSET a 1\n", 1) == ["OK"]
    assert talk(s, "STATS x\n", 1) == ["ERROR usage: STATS"]
    second = talk(s, "stats\n", 1)[0].split()
    f, g = dict(w.split("=") for w in first[1:]), dict(w.split("=") for w in second[1:])
    assert first[0] == second[0] == "STATS", (first, second)
    assert int(f["wakeups"]) >= 1 and int(g["wakeups"]) >= int(f["wakeups"]) + 3, (f, g)
    assert f["keys"] == "0" and g["keys"] == "1", (f, g)
    if VERSION == 4:
        assert list(f) == ["last", "keys", "wakeups"] and f["last"] == g["last"] == "STATS", (f, g)
    else:
        assert f["requests"] == "1" and g["requests"] == "4", (f, g)
        names = ["requests", "keys", "wakeups"] + (["bytes_in"] if VERSION == 3 else [])
        assert list(f) == names and list(g) == names, (f, g)
        if VERSION == 3:
            assert f["bytes_in"] == "6" and g["bytes_in"] == str(6 + 9 + 8 + 6), (f, g)
s.sendall(b"SHUTDOWN\n")
assert recv_lines(s, 1) == ["BYE"]
assert p.wait(5) == 0
print(f"STATS of version {VERSION}: ok")

# no listener, bad arguments
p = subprocess.run([BIN], capture_output=True)
assert p.returncode == 1 and b"no preopened TCP listener" in p.stderr, p
p = subprocess.run([BIN, "--bogus"], capture_output=True)
assert p.returncode == 2 and p.stderr.startswith(b"usage:"), p
print("no listener, bad arguments: ok")
