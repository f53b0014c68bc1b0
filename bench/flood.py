"""One client flooding chat frames: what it costs everyone else (ping round trips), the server's
CPU, and what becomes of the flooder; this checkout against another (``--server-path``).

The server (``python -P -m signaling serve``, SFU and TURN off) is pinned to core 0; a pinger
(a WebSocket client in this process) and a flooder (a process of its own, raw socket, masked
frames as fast as it can write them, reading and dropping what comes back) run on core 1.
Each round measures the pinger's round trips first without and then with the flood, for
both servers, their order alternating round by round (this machine's speed drifts).

    .venv/bin/python bench/flood.py [--server-path DIR] [--rounds 3] [--seconds 8]

Prints a line per measurement and a final JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _BENCH]
sys.path.insert(0, str(Path(_BENCH).parent))

import aiohttp  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_FRAMES = 2_000_000  # the flooder's bound, whatever happens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_s(pid: int) -> float:
    """utime + stime of a process and its children, seconds."""
    total = 0.0
    for p in [pid, *children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


class Server:
    def __init__(self, name: str, path: str | None, tmp: Path) -> None:
        self.name, self.path, self.tmp = name, path, tmp
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RALLYPOINT_")}
        env.update(RALLYPOINT_TURN_ENABLED="false", RALLYPOINT_SFU_ENABLED="false")
        if self.path:
            env["PYTHONPATH"] = self.path
        cmd = [sys.executable, "-P", "-m", "signaling", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.tmp / self.name)]
        log = open(self.tmp / f"{self.name}.log", "wb")  # the child writes to it
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    tail = (self.tmp / f"{self.name}.log").read_text()[-2000:]
                    raise RuntimeError(f"{self.name} did not start:\n{tail}") from None
                time.sleep(0.05)
        for pid in [self.proc.pid, *children(self.proc.pid)]:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {0})

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def flood_main(port: int, seconds: float) -> None:
    """The flooder process: hello, join, then `send` frames as fast as the socket takes them."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    while b"\r\n\r\n" not in s.recv(4096):
        pass

    def frame(payload: bytes) -> bytes:
        return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload  # zero mask key

    s.sendall(frame(b'{"type":"hello","v":1,"name":"Flood","identity":"flood"}'))
    s.sendall(frame(b'{"type":"join","room":"flood"}'))
    s.setblocking(False)
    batch = b"".join(
        frame(b'{"type":"send","conversation":"room:flood","cid":"c%d","text":"spam"}' % i)
        for i in range(100)
    )
    sent_bytes = 0
    received = 0
    closed_by_server = False
    end = time.monotonic() + seconds
    pending = b""
    while time.monotonic() < end and sent_bytes * 100 // len(batch) < MAX_FRAMES:
        # Wait for the socket (no spinning: the pinger shares this core).
        readable, writable, _ = select.select([s], [s], [], 0.5)
        if readable:
            try:
                data = s.recv(1 << 20)
            except OSError:
                closed_by_server = True
                break
            if not data:
                closed_by_server = True
                break
            received += len(data)
        if writable:
            if not pending:
                pending = batch
            try:
                n = s.send(pending)
            except BlockingIOError:
                n = 0
            except OSError:
                closed_by_server = True
                break
            sent_bytes += n
            pending = pending[n:]
    s.close()
    frames = sent_bytes * 100 // len(batch)
    print(json.dumps({"frames": frames, "received_bytes": received, "closed": closed_by_server}))


async def pings(url: str, seconds: float) -> list[float]:
    rtts: list[float] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_json({"type": "hello", "v": 1, "name": "Pinger", "identity": "pinger"})
        await ws.receive_json()
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            i += 1
            t = time.perf_counter()
            await ws.send_json({"type": "ping", "id": f"p{i}"})
            while (await ws.receive_json()).get("re") != f"p{i}":
                pass
            rtts.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.02)
    return rtts


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))] if v else float("nan")


async def measure(server: Server, seconds: float) -> dict[str, Any]:
    url = f"ws://127.0.0.1:{server.port}/ws"
    quiet = await pings(url, seconds / 2)
    assert server.proc is not None
    cpu0, t0 = cpu_s(server.proc.pid), time.monotonic()
    flooder = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--flood-port",
        str(server.port),
        "--seconds",
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    os.sched_setaffinity(flooder.pid, {1})
    loud = await pings(url, seconds)
    out, _ = await asyncio.wait_for(flooder.communicate(), seconds + 30)
    cpu = (cpu_s(server.proc.pid) - cpu0) / (time.monotonic() - t0)
    fate = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "ping_p50_ms_quiet": round(pct(quiet, 0.5), 2),
        "ping_p99_ms_quiet": round(pct(quiet, 0.99), 2),
        "ping_p50_ms_flood": round(pct(loud, 0.5), 2),
        "ping_p99_ms_flood": round(pct(loud, 0.99), 2),
        "server_cpu_flood": round(cpu, 3),
        "flooder_frames": fate["frames"],
        "flooder_closed": fate["closed"],
    }


async def main_async(a: argparse.Namespace) -> dict[str, Any]:
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        servers = [Server("this", None, Path(tmp))]
        if a.server_path:
            servers.append(Server("base", a.server_path, Path(tmp)))
        results: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
        for rnd in range(a.rounds):
            order = servers if rnd % 2 == 0 else list(reversed(servers))
            for server in order:
                server.start()
                try:
                    r = await measure(server, a.seconds)
                finally:
                    server.stop()
                results[server.name].append(r)
                print(f"round {rnd + 1} {server.name}: {r}", flush=True)
    summary: dict[str, Any] = {"rounds": a.rounds, "seconds": a.seconds, "runs": results}
    for name, rs in results.items():
        summary[name] = {
            k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0] if k != "flooder_closed"
        } | {"flooder_closed": [r["flooder_closed"] for r in rs]}
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server-path", help="the other checkout to compare with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--flood-port", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.server_path:
        a.server_path = str(Path(a.server_path).resolve())
    if a.flood_port:
        flood_main(a.flood_port, a.seconds)
        return 0
    print(json.dumps(asyncio.run(main_async(a))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
