"""A lean WebSocket load generator for the signaling benchmark (``bench/signaling.py``).

aiohttp's client costs about as much CPU per message as the server does, so this generator talks
RFC 6455 directly on asyncio Protocols (uvloop): the HTTP upgrade is written by hand, client frames
are masked with a zero key (the payload bytes stay as they are, which costs nothing), and incoming
frames are only walked, not decoded: deliveries are counted, ``sent`` acknowledgements are timed by
reading the request id (the send time in ns) at the end of the frame, and one client per room
times deliveries from the send time at the start of the chat text.

It runs in its own process (``LoadGen`` forks it), serving commands from a pipe; every command is
bounded in count and time. Two modes: ``rp`` speaks the Rallypoint protocol (hello, join, send),
``raw`` just opens ``/ws?room=...`` on the raw broadcast server and sends the same payloads.
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from typing import Any

import msgpack

HANDSHAKE, JOINING, READY, FAILED, CLOSED, RESUMING = range(6)
MASK = b"\0\0\0\0"  # a zero masking key leaves the payload unchanged
PING_PAYLOAD = b'{"type":"ping"}'
MSGPACK = b"rallypoint.msgpack"
SEND_TEMPLATE = b'{"type":"send","conversation":"room:%b","cid":"%d","id":"%d","text":"%d %b"}'
IDLE_PING_S = 20.0  # the server closes connections silent for 62.5 s


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A final, masked (zero key) client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + MASK + payload


PING_FRAME = client_frame(PING_PAYLOAD)
PACKED_PING_FRAME = client_frame(msgpack.packb({"type": "ping"}), opcode=2)
CLOSE_FRAME = client_frame(b"\x03\xe8", opcode=8)


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_or(pid: int, default: float) -> float:
    """``proc_cpu_s(pid)``, or ``default`` if the process is gone."""
    try:
        return proc_cpu_s(pid)
    except OSError:
        return default


def core_times() -> dict[str, tuple[float, float]]:
    """Per core: (busy seconds, of which softirq seconds), from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[float, float]] = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"cpu") and line[3:4].isdigit():
                p = line.split()
                v = [int(x) for x in p[1:9]]  # user nice system idle iowait irq softirq steal
                busy = sum(v) - v[3] - v[4]
                out[p[0].decode()] = (busy / tick, v[6] / tick)
    return out


class Stats:
    """Counters and latency samples shared by all clients of the generator."""

    def __init__(self) -> None:
        self.sent = 0
        self.acks = 0
        self.deliveries = 0
        self.errors = 0
        self.lost = 0
        self.closes = 0
        self.error_samples: list[str] = []
        self.ack_lat: list[int] = []  # ns
        self.del_lat: list[int] = []  # ns
        self.acked_ids: list[int] = []  # request ids (send times) acknowledged, when recording
        self.room_events = 0  # participant_left / participant_joined received by non-senders
        self.last_ready = 0.0  # time.monotonic() of the last client that became ready


class Client(asyncio.Protocol):
    """One WebSocket connection."""

    __slots__ = (
        "gen",
        "hs",
        "idx",
        "last_send",
        "observer",
        "port",
        "ready",
        "rest",
        "resume",
        "room",
        "room_s",
        "sender",
        "state",
        "transport",
    )

    def __init__(
        self,
        gen: LoadGenWorker,
        idx: int,
        room: bytes,
        observer: bool,
        port: int = 0,
        sender: bool = True,
        resume: bytes = b"",
    ) -> None:
        self.gen = gen
        self.idx = idx
        self.room = room
        self.room_s = room.decode()
        self.observer = observer
        self.port = port
        self.sender = sender  # ``run`` sends from senders only
        self.resume = resume  # the session's resume token (from welcome); hello resumes with it
        self.state = HANDSHAKE
        self.hs = b""
        self.rest = b""
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.last_send = time.monotonic()

    # -- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        g = self.gen
        path = b"/ws?room=" + self.room if g.mode == "raw" else b"/ws"
        offer = b"Sec-WebSocket-Protocol: %b\r\n" % MSGPACK if g.packed else b""
        self.transport.write(
            b"GET %b HTTP/1.1\r\nHost: %b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%b\r\n"
            % (path, g.hostport, offer)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == READY:
            self.gen.stats.lost += 1
        self._fail("connection lost" if exc is None else f"connection lost: {exc!r}")
        self.state = CLOSED

    def _fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_result(False)
            s = self.gen.stats
            if len(s.error_samples) < 5:
                s.error_samples.append(why[:300])
        if self.state != CLOSED:
            self.state = FAILED

    def _handshake(self, data: bytes) -> bytes | None:
        buf = self.hs + data
        k = buf.find(b"\r\n\r\n")
        if k < 0:
            if len(buf) > 16384:
                self._fail("handshake response too long")
                assert self.transport is not None
                self.transport.abort()
                return None
            self.hs = buf
            return None
        self.hs = b""
        if not buf.startswith(b"HTTP/1.1 101"):
            self._fail("upgrade refused: " + buf[:k].decode("latin-1").replace("\r\n", " | "))
            assert self.transport is not None
            self.transport.abort()
            return None
        assert self.transport is not None
        g = self.gen
        if g.mode == "rp" and self.resume:  # resume the session (its rooms come with it)
            self.transport.write(
                client_frame(b'{"type":"hello","v":1,"resume":"%b","id":"r"}' % self.resume)
            )
            self.state = RESUMING
        elif g.mode == "rp":
            name = b"%b%d" % (g.prefix, self.idx)
            if g.packed:
                if MSGPACK not in buf[:k]:
                    self._fail("the server did not choose rallypoint.msgpack")
                    self.transport.abort()
                    return None
                nm = name.decode()
                self.transport.write(
                    client_frame(
                        msgpack.packb({"type": "hello", "v": 1, "name": nm, "identity": nm}), 2
                    )
                    + client_frame(
                        msgpack.packb({"type": "join", "room": self.room.decode(), "id": "j"}), 2
                    )
                )
            else:
                self.transport.write(
                    client_frame(
                        b'{"type":"hello","v":1,"name":"%b","identity":"%b"}' % (name, name)
                    )
                    + client_frame(b'{"type":"join","room":"%b","id":"j"}' % self.room)
                )
            self.state = JOINING
        else:
            self.state = READY
            self.ready.set_result(True)
        return buf[k + 4 :]

    # -- receive: the hot path -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.state != READY and self.state != JOINING and self.state != RESUMING:
            if self.state != HANDSHAKE:
                return
            d = self._handshake(data)
            if not d:
                return
            data = d
        if self.rest:
            data = self.rest + data
            self.rest = b""
        g = self.gen
        stats = g.stats
        raw = g.mode == "raw"
        packed = g.packed
        unpackb = msgpack.unpackb
        observer = self.observer
        n = len(data)
        i = 0
        deliveries = 0
        now = 0
        while i + 2 <= n:
            ln = data[i + 1]  # servers never mask
            if ln < 126:
                h = 2
            elif ln == 126:
                if i + 4 > n:
                    break
                ln = (data[i + 2] << 8) | data[i + 3]
                h = 4
            else:
                if i + 10 > n:
                    break
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                h = 10
            end = i + h + ln
            if end > n:
                break
            op = data[i] & 0x0F
            if op == 1 or op == 2:
                if packed:  # a map (fixmap or map 16), "type" first: \x8N \xa4type \xa7m...
                    t = i + h + (7 if data[i + h] < 0x90 else 9)
                else:  # {"type":"m...
                    t = i + h + 9
                c = data[t] if t < end else 0  # the first letter of the type
                if raw or c == 109:  # a chat message (raw: everything is one)
                    deliveries += 1
                    if observer:
                        if packed:
                            text = unpackb(data[i + h : end])["text"]
                            if now == 0:
                                now = time.perf_counter_ns()
                            stats.del_lat.append(now - int(text[: text.index(" ")]))
                        else:
                            p = data.find(b'"text":"', i + h, end)
                            if p > 0:
                                q = data.find(b" ", p + 8, end)
                                if now == 0:
                                    now = time.perf_counter_ns()
                                stats.del_lat.append(now - int(data[p + 8 : q]))
                elif c == 115:  # sent: ... ,"re":"<send time ns>"}
                    if packed:
                        sent_ns = int(unpackb(data[i + h : end])["re"])
                    else:
                        q = end - 2
                        p = data.rfind(b'"', i + h, q)
                        sent_ns = int(data[p + 1 : q])
                    if now == 0:
                        now = time.perf_counter_ns()
                    stats.ack_lat.append(now - sent_ns)
                    stats.acks += 1
                    if g.record_acks:
                        stats.acked_ids.append(sent_ns)
                elif c == 101:  # error
                    stats.errors += 1
                    if len(stats.error_samples) < 5:
                        body = data[i + h : end]
                        stats.error_samples.append(
                            (repr(unpackb(body)) if packed else body.decode("utf-8", "replace"))[
                                :300
                            ]
                        )
                    if self.state == JOINING:
                        self._fail("join failed")
                elif c == 106 and self.state == JOINING and data.startswith(b"joined", t):
                    self._ready()
                elif c == 119 and not packed:  # welcome: keep the resume token
                    p = data.find(b'"resume":"', t, end)
                    if p > 0:
                        self.resume = data[p + 10 : data.find(b'"', p + 10, end)]
                    if self.state == RESUMING:
                        if data.find(b'"resumed":true', t, end) > 0:
                            self._ready()
                        else:
                            self._fail("not resumed")
                elif (
                    c == 112
                    and not self.sender
                    and (
                        data.startswith(b"participant_left", t)
                        or data.startswith(b"participant_joined", t)
                    )
                ):
                    stats.room_events += 1  # seen by a member that stays (an observer)
            elif op == 8:  # close
                stats.closes += 1
                code = (data[i + h] << 8) | data[i + h + 1] if ln >= 2 else 1005
                if len(stats.error_samples) < 5:
                    stats.error_samples.append(f"server closed with {code}")
            i = end
        if i < n:
            self.rest = data[i:]
        if deliveries:
            stats.deliveries += deliveries

    def _ready(self) -> None:
        self.state = READY
        self.ready.set_result(True)
        self.gen.stats.last_ready = time.monotonic()

    # -- send ------------------------------------------------------------------------------------

    def send_chat(self) -> None:
        g = self.gen
        t = time.perf_counter_ns()
        g.cid += 1
        if g.packed:  # the same message as SEND_TEMPLATE's
            payload = g.packer.pack(
                {
                    "type": "send",
                    "conversation": "room:" + self.room_s,
                    "cid": str(g.cid),
                    "id": str(t),
                    "text": f"{t} {g.pad_s}",
                }
            )
            head = 0x82
        else:
            payload = SEND_TEMPLATE % (self.room, g.cid, t, t, g.pad)
            head = 0x81
        n = len(payload)
        assert self.transport is not None
        if n < 126:
            self.transport.write(bytes((head, 0x80 | n)) + MASK + payload)
        else:
            self.transport.write(bytes((head, 0xFE)) + n.to_bytes(2, "big") + MASK + payload)
        g.stats.sent += 1
        self.last_send = time.monotonic()


class LoadGenWorker:
    """The generator's state inside its process."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.stats = Stats()
        self.mode = "rp"
        self.packed = False  # rp over MessagePack (rallypoint.msgpack)
        self.packer = msgpack.Packer()
        self.pad_s = ""
        self.prefix = b"u"
        self.hostport = b""
        self.cid = 0
        self.pad = b""
        self.record_acks = False  # keep every acknowledged request id (``failover``)
        self._pinger: asyncio.Task[None] | None = None

    def ready_clients(self) -> list[Client]:
        return [c for c in self.clients if c.state == READY]

    def _set_pad(self, message_bytes: int) -> None:
        t = time.perf_counter_ns()
        sample = SEND_TEMPLATE % (b"r999", 10**6, t, t, b"")
        self.pad = b"x" * max(1, message_bytes - len(sample))
        self.pad_s = self.pad.decode()

    async def connect(
        self,
        host: str,
        port: int,
        n: int,
        room_size: int,
        mode: str,
        prefix: str,
        concurrency: int = 64,
        timeout_s: float = 120.0,
        message_bytes: int = 150,
        encoding: str = "json",
        room_prefix: str = "r",
        other_port: int | None = None,
        sends: bool = True,
        append: bool = False,
    ) -> dict[str, Any]:
        """Open ``n`` connections (rooms of ``room_size`` in order, named ``room_prefix`` and
        a number); rp clients hello and join, in JSON or (``encoding="msgpack"``) MessagePack.

        With ``other_port`` (another node of a cluster) the first member of each room connects
        to ``port`` and is the room's only sender, the others connect to ``other_port``.
        ``sends=False``: these clients never send (``run``). ``append``: keep the clients
        already open (and the counters) and add these.
        """
        if not append:
            await self.close()
            self.stats = Stats()
        self.mode = mode
        self.packed = mode == "rp" and encoding == "msgpack"
        self.prefix = prefix.encode()
        self.hostport = f"{host}:{port}".encode()
        self._set_pad(message_bytes)
        sem = asyncio.Semaphore(concurrency)
        deadline = time.monotonic() + timeout_s

        async def one(i: int) -> None:
            room = b"%b%d" % (room_prefix.encode(), i // room_size)
            first = i % room_size == 0
            to = port if other_port is None or first else other_port
            sender = sends and (other_port is None or first)
            c = Client(self, i, room, i % room_size == room_size - 1, to, sender)
            self.clients.append(c)
            await self._open(c, host, sem, deadline)

        start = len(self.clients)
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        await asyncio.gather(*(one(i) for i in range(n)))
        secs = time.perf_counter() - t0
        ok = sum(c.state == READY for c in self.clients[start:])
        if self._pinger is None and mode == "rp":
            self._pinger = asyncio.create_task(self._ping_idle())
        gc.collect()
        gc.freeze()
        return {
            "connected": ok,
            "failed": n - ok,
            "seconds": secs,
            "per_s": ok / secs if secs > 0 else 0.0,
            "loadgen_cpu_s": time.process_time() - cpu0,
            "errors": self.stats.error_samples,
        }

    async def _open(self, c: Client, host: str, sem: asyncio.Semaphore, deadline: float) -> None:
        """Connect ``c`` and wait (bounded) until it joined or resumed."""
        loop = asyncio.get_running_loop()
        async with sem:
            left = deadline - time.monotonic()
            if left <= 0:
                c._fail("connect phase timed out")
                return
            try:
                await asyncio.wait_for(loop.create_connection(lambda: c, host, c.port), left)
                await asyncio.wait_for(asyncio.shield(c.ready), deadline - time.monotonic())
            except (OSError, TimeoutError) as e:
                c._fail(f"connect failed: {e!r}")
                if c.transport is not None:
                    c.transport.abort()

    async def _ping_idle(self) -> None:
        """Keep idle rp connections alive (the server drops them after 62.5 s of silence)."""
        while True:
            await asyncio.sleep(IDLE_PING_S / 2)
            limit = time.monotonic() - IDLE_PING_S
            for k, c in enumerate(self.clients):
                if c.state == READY and c.last_send < limit:
                    assert c.transport is not None
                    c.transport.write(PACKED_PING_FRAME if self.packed else PING_FRAME)
                    c.last_send = time.monotonic()
                    if k % 500 == 499:
                        await asyncio.sleep(0.001)

    async def send_each(self, rate: float, timeout_s: float = 60.0) -> dict[str, Any]:
        """Every ready client sends one chat message, paced at ``rate`` per second in total."""
        clients = self.ready_clients()
        s = self.stats
        acks0, del0 = s.acks, s.deliveries
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        sent = 0
        while sent < len(clients) and time.perf_counter() < deadline:
            due = min(len(clients), int((time.perf_counter() - t0) * rate) + 1)
            while sent < due:
                clients[sent].send_chat()
                sent += 1
            await asyncio.sleep(0.001)
        if self.mode == "rp":
            while s.acks - acks0 < sent and time.perf_counter() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        s.ack_lat.clear()
        s.del_lat.clear()
        return {
            "sent": sent,
            "acked": s.acks - acks0,
            "deliveries": s.deliveries - del0,
            "seconds": time.perf_counter() - t0,
            "errors": s.error_samples,
        }

    async def run(
        self,
        rate: float,
        warmup_s: float,
        duration_s: float,
        drain_s: float,
        fanout: int,
        server_pids: tuple[int, ...] | list[int] = (),
        server_core: int | None = None,
        load_core: int | None = None,
    ) -> dict[str, Any]:
        """Open loop: offer ``rate`` messages/s (round robin over shuffled clients) for
        ``warmup_s + duration_s``; measure the last ``duration_s``; then wait up to ``drain_s``
        for outstanding acknowledgements and deliveries."""
        clients = [c for c in self.ready_clients() if c.sender]
        if not clients:
            return {"error": "no connected clients"}
        random.Random(1).shuffle(clients)
        s = self.stats
        nclients = len(clients)
        t0 = time.perf_counter()
        t_window = t0 + warmup_s
        t_end = t_window + duration_s
        sent = 0
        k = 0
        window = False
        w: dict[str, Any] = {}
        perf = time.perf_counter
        sleep = asyncio.sleep
        max_burst = max(1, int(rate * 0.02))
        behind = 0
        while True:
            now = perf()
            if not window and now >= t_window:
                window = True
                s.ack_lat = []
                s.del_lat = []
                w = {
                    "t": now,
                    "sent": s.sent,
                    "acks": s.acks,
                    "deliveries": s.deliveries,
                    "errors": s.errors,
                    "cpu": time.process_time(),
                    "server_cpu": [cpu_or(p, 0.0) for p in server_pids],
                    "cores": core_times(),
                }
            if now >= t_end:
                break
            due = int((now - t0) * rate) - sent
            if due > max_burst:  # the generator fell behind; catch up gradually
                behind += 1
                due = max_burst
            for _ in range(due):
                clients[k].send_chat()
                k += 1
                if k == nclients:
                    k = 0
            sent += due
            await sleep(0.001)
        t1 = perf()
        elapsed = t1 - w["t"]
        cpu = time.process_time() - w["cpu"]
        # the server and its child processes (Rallypoint's store writer, SFU workers)
        cpus = [cpu_or(p, c0) - c0 for p, c0 in zip(server_pids, w["server_cpu"], strict=True)]
        server_cpu = sum(cpus)
        cores1 = core_times()
        ack_lat, del_lat = s.ack_lat, s.del_lat
        s.ack_lat, s.del_lat = [], []
        res: dict[str, Any] = {
            "offered_per_s": rate,
            "seconds": elapsed,
            "sent_per_s": (s.sent - w["sent"]) / elapsed,
            "acked_per_s": (s.acks - w["acks"]) / elapsed,
            "deliveries_per_s": (s.deliveries - w["deliveries"]) / elapsed,
            "errors": s.errors - w["errors"],
            "lost_connections": s.lost,
            "loadgen_cpu": cpu / elapsed,
            "server_cpu": server_cpu / elapsed,
            "server_child_cpu": sum(cpus[1:]) / elapsed,
            "loadgen_behind_ticks": behind,
        }
        for name, core in (("server_core", server_core), ("load_core", load_core)):
            if core is not None:
                key = f"cpu{core}"
                b0, si0 = w["cores"][key]
                b1, si1 = cores1[key]
                res[f"{name}_busy"] = (b1 - b0) / elapsed
                res[f"{name}_softirq"] = (si1 - si0) / elapsed
        busy = sum(b - w["cores"][k][0] for k, (b, _) in cores1.items())
        softirq = sum(si - w["cores"][k][1] for k, (_, si) in cores1.items())
        # CPU used by other processes on this machine (noise), beyond the server, the generator
        # and softirq work
        res["other_cpu"] = max(0.0, (busy - softirq - server_cpu - cpu) / elapsed)
        for label, lat in (("ack", ack_lat), ("delivery", del_lat)):
            lat.sort()
            res[f"{label}_samples"] = len(lat)
            for q, qn in ((0.5, "p50"), (0.99, "p99"), (1.0, "max")):
                res[f"{label}_{qn}_ms"] = percentile(lat, q) / 1e6
        # drain: let the server finish what it was given before the next step
        deadline = perf() + drain_s
        while perf() < deadline:
            if self.mode == "rp":
                done = s.acks >= s.sent and s.deliveries >= s.acks * fanout * 0.999
            else:
                done = s.deliveries >= s.sent * fanout * 0.999
            if done:
                break
            await sleep(0.02)
        res["drain_s"] = perf() - t1
        res["unacked_after_drain"] = max(0, s.sent - s.acks) if self.mode == "rp" else 0
        res["error_samples"] = s.error_samples[:3]
        return res

    async def _pace(self, clients: list[Client], rate: float, seconds: float) -> int:
        """Send from ``clients`` (round robin) at ``rate`` msgs/s for ``seconds``; the count."""
        t0 = time.perf_counter()
        due_total = 0
        sent = 0
        k = 0
        while clients and (now := time.perf_counter()) < t0 + seconds:
            due = min(int((now - t0) * rate) - due_total, max(1, int(rate * 0.02)))
            for _ in range(max(0, due)):
                c = clients[k % len(clients)]
                k += 1
                if c.state == READY:  # a client whose connection dropped skips its turn
                    c.send_chat()
                    sent += 1
            due_total += max(0, due)
            await asyncio.sleep(0.001)
        return sent

    async def failover(
        self,
        rate: float,
        before_s: float,
        after_s: float,
        kill_pid: int,
        to_port: int,
        timeout_s: float = 60.0,
        concurrency: int = 64,
    ) -> dict[str, Any]:
        """The senders send at ``rate`` for ``before_s``; then this process SIGKILLs
        ``kill_pid`` (their node) and each of its clients opens a new connection to
        ``to_port`` (another node) with its resume token, as soon as it saw its connection
        drop; once all resumed (or ``timeout_s`` passed) they send for ``after_s`` more.
        Returns every acknowledged request id (the send time at the start of each text), the
        time from the kill to the last client resumed, and the participant_left/joined events
        the clients that do not send (observers) received meanwhile."""
        s = self.stats
        self.record_acks = True
        s.acked_ids = []
        movers = [c for c in self.ready_clients() if c.sender]
        await self._pace(movers, rate, before_s)
        events0, sent0, acks0 = s.room_events, s.sent, s.acks
        t_kill = time.monotonic()
        os.kill(kill_pid, signal.SIGKILL)
        sem = asyncio.Semaphore(concurrency)
        deadline = t_kill + timeout_s
        host = self.hostport.decode().rpartition(":")[0]
        resumed_at: list[float] = []

        async def move(old: Client) -> None:
            while old.state == READY and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)  # until its connection drops
            c = Client(self, old.idx, old.room, old.observer, to_port, True, old.resume)
            self.clients[self.clients.index(old)] = c
            await self._open(c, host, sem, deadline)
            if c.state == READY:
                resumed_at.append(time.monotonic() - t_kill)

        unacked_at_kill = s.sent - s.acks
        await asyncio.gather(*(move(c) for c in movers))
        resumed_at.sort()
        moved = [c for c in self.clients if c.sender and c.state == READY]
        sent_after = await self._pace(moved, rate, after_s)
        end = time.monotonic() + 10.0
        while s.acks < s.sent - unacked_at_kill and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        self.record_acks = False
        return {
            "clients": len(movers),
            "resumed": len(resumed_at),
            "failover_s": resumed_at[-1] if resumed_at else float("nan"),
            "resume_p50_s": percentile([int(x * 1e9) for x in resumed_at], 0.5) / 1e9,
            "sent_before": sent0,
            "acked_before": acks0,
            "unacked_at_kill": unacked_at_kill,
            "sent_after": sent_after,
            "sent": s.sent,
            "acked": s.acks,
            "acked_ids": s.acked_ids,
            "room_events": s.room_events - events0,
            "errors": s.error_samples,
        }

    async def close(self) -> dict[str, Any]:
        if self._pinger is not None:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
            self._pinger = None
        n = 0
        for c in self.clients:
            if c.transport is not None and not c.transport.is_closing():
                c.state = CLOSED
                c.transport.abort()
                n += 1
        self.clients = []
        await asyncio.sleep(0.2)
        gc.unfreeze()
        gc.collect()
        return {"closed": n}


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        try:
            queue.put_nowait(conn.recv())
        except (EOFError, OSError):
            queue.put_nowait({"cmd": "exit"})
            loop.remove_reader(conn.fileno())

    loop.add_reader(conn.fileno(), readable)
    worker = LoadGenWorker()
    while True:
        cmd = await queue.get()
        name = cmd.pop("cmd")
        try:
            if name == "exit":
                await worker.close()
                result: Any = {"ok": True}
            else:
                result = await getattr(worker, name)(**cmd)
        except Exception as e:  # report to the parent instead of dying silently
            result = {"error": repr(e)}
        try:
            conn.send(result)
        except (BrokenPipeError, OSError):
            return
        if name == "exit":
            return


def _worker_main(conn: multiprocessing.connection.Connection, core: int | None) -> None:
    # forked: not the parent's SIGTERM handler (its cleanup is the parent's, not ours)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if core is not None:
        os.sched_setaffinity(0, {core})
    gc.disable()  # collected between phases; a pause here would show up as latency
    try:
        import uvloop

        uvloop.run(_serve(conn))
    except ImportError:  # pragma: no cover
        asyncio.run(_serve(conn))


class LoadGen:
    """Parent-side handle: a forked worker process driven over a pipe."""

    def __init__(self, core: int | None) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, core), daemon=True)
        self.proc.start()
        child.close()

    def call(self, cmd: str, wait_s: float, **kwargs: Any) -> dict[str, Any]:
        self._conn.send({"cmd": cmd, **kwargs})
        if not self._conn.poll(wait_s):
            self.kill()
            raise TimeoutError(f"load generator did not answer {cmd!r} within {wait_s:.0f} s")
        result: dict[str, Any] = self._conn.recv()
        if "error" in result and len(result) == 1:
            raise RuntimeError(f"load generator failed in {cmd!r}: {result['error']}")
        return result

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("exit", 10.0)
            except (TimeoutError, OSError, EOFError):
                pass
        self.proc.join(5.0)
        self.kill()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5.0)
