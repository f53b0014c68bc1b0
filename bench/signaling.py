"""Signaling and chat benchmark: the real server against a raw WebSocket broadcast ceiling.

N WebSocket clients in rooms of 10 send ~150-byte chat messages through the real server
(``rallypoint serve``: protocol, open-mode hello, SQLite store, fan-out); every message is
acknowledged (``sent``) after it is committed and delivered to the 9 other members of its room.
In the same run the same load goes to ``bench/raw_broadcast.py`` (aiohttp, no protocol, no
storage) for the ceiling.

Phases, each bounded in time:

1. memory: ``--connections`` idle clients (hello + join), server RSS delta per connection, then
   again after each client sent one message (also for the raw server, as a baseline);
2. latency: ``--load-connections`` clients offer ``--latency-rate`` messages/s; ack p50/p99;
3. throughput: offered rates step up (x1.25, then bisect); the sustainable rate is the highest one
   whose ack and delivery p99 stay <= 50 ms while acks and deliveries keep up (>= 97 %);
4. the raw server under the same search, its steps taking turns with Rallypoint's (both
   servers run side by side, each with its own load generator process, the idle one quiet), so
   both are measured in the same minutes; ``fanout_ratio_vs_raw`` = Rallypoint deliveries/s
   over raw deliveries/s, both at the sustainable rate;
5. encodings (in this process, first): bytes per typical message in JSON and in MessagePack
   (the ``rallypoint.msgpack`` subprotocol), as WebSocket frames (client frames with their mask
   key) and as payloads; and the server's CPU per chat message on each: parse and validate the
   ``send``, encode the ``sent`` ack and the ``message`` for the fan-out (for MessagePack
   connections converted once per fan-out), JSON and MessagePack timed in
   alternating rounds. Targets: chat messages >= 30 % fewer bytes, CPU no worse than JSON
   (judged by 6, end to end; this is the codec alone);
6. encodings end to end (``encodings_load_phase``, after 5): one server, ``--load-connections``
   JSON clients and as many MessagePack clients (``rallypoint.msgpack``) in rooms of their own,
   each set with its own load generator; at each ``--encoding-rates`` (4,000 and 6,000 msgs/s)
   one step of each per round, alternating which goes first, ``--encoding-rounds`` rounds;
   server CPU (with the store writer) per acknowledged chat message, MessagePack over JSON per
   round, and the median. This is the CPU target's figure ("no worse": median <= 1.05).

Each server is pinned to the first core and the load generator (``bench/wsload.py``, raw asyncio
Protocols, not aiohttp's client) to the second. Rallypoint's chat store writes in a process of
its own (``signaling.chat.writer``); by default it is pinned to the second core, with the load
generator, as the operating system would place it on an idle 2-core machine, and
``--store-core server`` keeps it on the server's core (everything of Rallypoint on one core).
The raw server is one process with one thread: a second core would not help it. Server CPU and
memory are those of the server and its child processes (from /proc/<pid>/stat and status); the
busy time of each core (from /proc/stat) is printed too because loopback TCP charges part of the
receiver's work to the sender's core as softirq.

    .venv/bin/python bench/signaling.py            # full run, ~9-12 minutes
    .venv/bin/python bench/signaling.py --quick    # smoke run, < 90 s

Prints progress on stderr, then a table, then one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import stop
from wsload import LoadGen, core_times, proc_cpu_s

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
P99_LIMIT_MS = 50.0
KEEP_UP = 0.97  # acks and deliveries must reach this share of what was offered
TARGETS = {
    "connections": 10_000,
    "kib_per_connection": 40.0,
    "acked_msgs_per_s": 6_000.0,
    "fanout_ratio_vs_raw": 0.60,
    "ack_p99_ms": 10.0,
    "gc_max_pause_ms": 50.0,
}


# e2e_tolerance: the end-to-end ratio counts as "no worse" up to this much above 1: identical
# code reads 0.86-1.16 per round on this machine, so a median of a few rounds cannot tell
# apart differences much below 5 % (the codec difference is ~2-3 % of the server's work).
ENCODING_TARGETS = {"chat_bytes_saved": 0.30, "cpu_ratio_max": 1.0, "e2e_tolerance": 0.05}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Server:
    """A server subprocess pinned to one core, with RSS, CPU and /metrics readers."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], core: int | None, log_path: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.core = core
        self.log_path = log_path
        self.port = int(argv[argv.index("--port") + 1])
        self.store_processes = False  # PostgreSQL's processes count as the server's
        self.cwd: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        core = self.core

        def pin_and_tie() -> None:  # in the child, before exec
            if core is not None:
                os.sched_setaffinity(0, {core})
            try:  # SIGTERM the server if this benchmark dies without cleaning up
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            except (OSError, AttributeError):
                pass

        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=pin_and_tie,
                cwd=self.cwd,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/healthz", timeout=1.0) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"{self.name} server did not start; log tail:\n{tail}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server and its child processes (Rallypoint's store writer), and PostgreSQL's
        processes when it is the store (``--store-url``)."""
        out = [self.pid]
        if self.store_processes:
            out += postgres_pids()
        for pid in out:  # grows while walking: children of children
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    out.extend(int(c) for c in (task / "children").read_text().split())
                except OSError:
                    pass
        return out

    def rss_kib(self) -> int:
        """Resident memory of the server and its child processes."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total

    def place_store_writer(self, core: int | None) -> None:
        """Pin Rallypoint's store writer process (a child of the server) to ``core``."""
        if core is None:
            return
        for pid in self.pids()[1:]:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"signaling.chat.writer" in cmd or b"signaling.store_writer" in cmd:  # or older
                # Every thread: sched_setaffinity(pid) moves only the first, and the writer's
                # checkpoint thread (started before the server listens) stayed unpinned.
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        os.sched_setaffinity(int(tid), {core})

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=5.0) as r:
                for line in r.read().decode().splitlines():
                    if line and not line.startswith("#"):
                        k, _, v = line.partition(" ")
                        out[k] = float(v)
        except OSError as e:
            log(f"cannot read /metrics of {self.name}: {e}")
        return out

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, 20.0)


def postgres_pids() -> list[int]:
    """Every PostgreSQL process on this machine (the store's, with ``--store-url``)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if (d / "comm").read_text().strip() in ("postgres", "postmaster"):
                    out.append(int(d.name))
    return out


@contextlib.contextmanager
def store_schema(url: str | None) -> Iterator[str | None]:
    """With a PostgreSQL ``url``: a fresh schema for the run (dropped after), as a URL."""
    if not url or not url.startswith(("postgresql://", "postgres://")):
        yield url
        return
    import asyncpg

    name = f"bench_{os.getpid()}_{int(time.time())}"

    async def sql(q: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(q)
        finally:
            await conn.close()

    asyncio.run(sql(f"CREATE SCHEMA {name}"))
    try:
        yield f"{url}{'&' if '?' in url else '?'}search_path={name}"
    finally:
        asyncio.run(sql(f"DROP SCHEMA {name} CASCADE"))


def rallypoint_server(
    data_dir: Path,
    core: int | None,
    max_conns: int,
    room_size: int,
    server_path: str | None,
    store_url: str | None = None,
) -> Server:
    exe = Path(sys.executable).parent / "rallypoint"
    base = [str(exe)] if exe.exists() and not server_path else [sys.executable, "-m", "signaling"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RALLYPOINT_")}
    if server_path:  # another checkout of the server, e.g. to compare a change
        env["PYTHONPATH"] = str(Path(server_path).resolve())
    env.update(
        RALLYPOINT_TURN_ENABLED="false",
        RALLYPOINT_LIMITS_RATE_PER_S="1000",
        RALLYPOINT_LIMITS_BURST="1000",
        RALLYPOINT_LIMITS_MAX_SESSIONS=str(max(50_000, max_conns * 2)),
        # every client of the benchmark comes from 127.0.0.1
        RALLYPOINT_LIMITS_MAX_SESSIONS_PER_ADDRESS="0",
        RALLYPOINT_SERVER_MAX_CONNECTIONS_PER_ADDRESS="0",
        RALLYPOINT_ROOMS_MAX_PARTICIPANTS=str(max(100, room_size)),
    )
    if store_url:
        env["RALLYPOINT_STORE_URL"] = store_url
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        *base,
        "serve",
        "--host",
        HOST,
        "--port",
        str(free_port()),
        "--data-dir",
        str(data_dir),
    ]
    srv = Server("rallypoint", argv, env, core, data_dir / "server.log")
    srv.store_processes = bool(store_url) and "://" in str(store_url)
    if server_path:  # `python -m` looks in the working directory first
        srv.cwd = env["PYTHONPATH"]
    return srv


def raw_server(work: Path, core: int | None) -> Server:
    script = Path(__file__).resolve().parent / "raw_broadcast.py"
    argv = [sys.executable, str(script), "--host", HOST, "--port", str(free_port())]
    return Server("raw", argv, dict(os.environ), core, work / "raw.log")


# -- phases ---------------------------------------------------------------------------------------


def connect(
    gen: LoadGen,
    srv: Server,
    n: int,
    mode: str,
    prefix: str,
    a: argparse.Namespace,
    encoding: str = "json",
    room_prefix: str = "r",
) -> int:
    r = gen.call(
        "connect",
        a.connect_timeout + 30,
        host=HOST,
        port=srv.port,
        n=n,
        room_size=a.room_size,
        mode=mode,
        prefix=prefix,
        timeout_s=a.connect_timeout,
        message_bytes=a.message_bytes,
        encoding=encoding,
        room_prefix=room_prefix,
    )
    log(
        f"{srv.name}{' (' + encoding + ')' if mode == 'rp' else ''}: "
        f"{r['connected']}/{n} connected in {r['seconds']:.1f} s "
        f"({r['per_s']:.0f}/s, load generator CPU {r['loadgen_cpu_s']:.1f} s)"
        + (f"; errors: {r['errors']}" if r["failed"] else "")
    )
    connected: int = r["connected"]
    return connected


def gc_pause_ms(srv: Server) -> float:
    return srv.metrics().get("rallypoint_gc_max_pause_seconds", math.nan) * 1000


def memory_phase(gen: LoadGen, srv: Server, mode: str, a: argparse.Namespace) -> dict[str, Any]:
    time.sleep(1.0)
    base = srv.rss_kib()
    n = connect(gen, srv, a.connections, mode, "m", a)
    if n == 0:
        raise RuntimeError(f"no connection to the {srv.name} server")
    time.sleep(a.settle)
    idle = srv.rss_kib()
    gc_connect = gc_pause_ms(srv) if mode == "rp" else math.nan
    r = gen.call("send_each", a.connections / a.each_rate + 90, rate=a.each_rate, timeout_s=60.0)
    log(
        f"{srv.name}: one message each: sent {r['sent']}, acked {r['acked']}, "
        f"deliveries {r['deliveries']} in {r['seconds']:.1f} s"
    )
    time.sleep(a.settle)
    after = srv.rss_kib()
    gc_msgs = gc_pause_ms(srv) if mode == "rp" else math.nan
    gen.call("close", 60)
    out = {
        "connections": n,
        "rss_base_mib": base / 1024,
        "rss_idle_mib": idle / 1024,
        "rss_after_msg_mib": after / 1024,
        "kib_per_connection_idle": (idle - base) / n if n else math.nan,
        "kib_per_connection": (after - base) / n if n else math.nan,
        "one_each_sent": r["sent"],
        "one_each_acked": r["acked"],
        "one_each_deliveries": r["deliveries"],
        "gc_max_pause_ms_after_connect": gc_connect,
        "gc_max_pause_ms_after_messages": gc_msgs,
    }
    if mode == "rp":
        log(
            f"{srv.name}: GC max pause {gc_connect:.1f} ms after the connections, "
            f"{gc_msgs:.1f} ms after the messages"
        )
    log(
        f"{srv.name}: RSS {base / 1024:.0f} -> {idle / 1024:.0f} MiB idle -> "
        f"{after / 1024:.0f} MiB after one message each: "
        f"{out['kib_per_connection_idle']:.1f} / {out['kib_per_connection']:.1f} KiB per connection"
    )
    return out


class Noise:
    """Other processes on this (shared) machine distort the figures: wait for them to go quiet
    before a step and repeat a step they disturbed, within a time budget for the whole run."""

    def __init__(self, threshold: float, budget_s: float, pids: list[int]) -> None:
        self.threshold = threshold
        self.left = budget_s
        self.pids = pids
        self.max_seen = 0.0
        self.max_wait_s = 120.0  # per step

    def other_cpu(self, pids: list[int], interval: float) -> float:
        """CPU (in cores) used by processes other than ours over ``interval`` seconds."""

        def ours() -> float:
            total = 0.0
            for p in pids:
                try:
                    total += proc_cpu_s(p)
                except OSError:
                    pass
            return total

        c0, p0, t0 = core_times(), ours(), time.perf_counter()
        time.sleep(interval)
        c1, p1, t1 = core_times(), ours(), time.perf_counter()
        busy = sum(c1[k][0] - c0[k][0] - (c1[k][1] - c0[k][1]) for k in c1)
        return max(0.0, (busy - (p1 - p0)) / (t1 - t0))

    def wait_quiet(self, server_pids: list[int]) -> None:
        if self.left <= 0:
            return
        pids = [*self.pids, *server_pids]
        t0 = time.monotonic()
        told = False
        while self.left > 0 and time.monotonic() - t0 < self.max_wait_s:
            o = self.other_cpu(pids, 0.5)
            if o < self.threshold:
                break
            if not told:
                log(f"other processes use {o:.0%} of a core; waiting for quiet")
                told = True
            self.left -= 0.5
        if told:
            left = max(self.left, 0)
            log(f"waited {time.monotonic() - t0:.0f} s (noise budget left {left:.0f} s)")


def run_step(
    gen: LoadGen,
    srv: Server,
    rate: float,
    duration: float,
    a: argparse.Namespace,
    cores: Any,
    noise: Noise,
) -> dict[str, Any]:
    """One open-loop step; repeated (up to twice) when other processes disturbed it."""
    for attempt in range(3):
        pids = srv.pids()
        noise.wait_quiet(pids)
        r = gen.call(
            "run",
            a.warmup + duration + a.drain + 60,
            rate=rate,
            warmup_s=a.warmup,
            duration_s=duration,
            drain_s=a.drain,
            fanout=a.room_size - 1,
            server_pids=pids,
            server_core=cores[0],
            load_core=cores[1],
        )
        r["noisy"] = r["other_cpu"] >= noise.threshold
        if not r["noisy"] or noise.left <= 0 or attempt == 2:
            break
        log(
            f"{srv.name}: step at {rate:.0f}/s disturbed by other processes "
            f"({r['other_cpu']:.0%} of a core); repeating it"
        )
        noise.left -= duration + a.warmup
    noise.max_seen = max(noise.max_seen, r["other_cpu"])
    return r


def verdict(r: dict[str, Any], rp: bool, fanout: int, lost_before: int) -> tuple[bool, str]:
    """Whether a step is sustainable, and why not."""
    why = []
    offered = r["offered_per_s"]
    if r["sent_per_s"] < KEEP_UP * offered:
        why.append(f"load generator sent only {r['sent_per_s']:.0f}/s")
    if rp and r["acked_per_s"] < KEEP_UP * r["sent_per_s"]:
        why.append(f"acks {r['acked_per_s']:.0f}/s behind")
    if r["deliveries_per_s"] < KEEP_UP * fanout * r["sent_per_s"]:
        why.append(f"deliveries {r['deliveries_per_s']:.0f}/s behind")
    if rp and not r["ack_p99_ms"] <= P99_LIMIT_MS:
        why.append(f"ack p99 {r['ack_p99_ms']:.1f} ms")
    if not r["delivery_p99_ms"] <= P99_LIMIT_MS:
        why.append(f"delivery p99 {r['delivery_p99_ms']:.1f} ms")
    if r["errors"]:
        why.append(f"{r['errors']} errors {r['error_samples']}")
    if r["lost_connections"] > lost_before:
        why.append(f"{r['lost_connections'] - lost_before} connections lost")
    return not why, "; ".join(why)


def describe(r: dict[str, Any], rp: bool) -> str:
    s = (
        f"offered {r['offered_per_s']:7.0f}/s sent {r['sent_per_s']:7.0f}/s "
        f"deliv {r['deliveries_per_s']:8.0f}/s "
    )
    if rp:
        s += (
            f"acked {r['acked_per_s']:7.0f}/s ack p50/p99 "
            f"{r['ack_p50_ms']:5.1f}/{r['ack_p99_ms']:6.1f} ms "
        )
    s += (
        f"deliv p99 {r['delivery_p99_ms']:6.1f} ms | CPU server {r['server_cpu']:.0%} "
        + (f"(children {r['server_child_cpu']:.0%}) " if r.get("server_child_cpu") else "")
        + f"core0 {r.get('server_core_busy', math.nan):.0%} "
        f"(softirq {r.get('server_core_softirq', math.nan):.0%}) "
        f"loadgen {r['loadgen_cpu']:.0%} core1 {r.get('load_core_busy', math.nan):.0%} "
        f"other {r['other_cpu']:.0%}"
    )
    return s


class Search:
    """One server's offered-rate search: up by ``--growth`` until a step fails, then bisect (or
    the ``--rates`` given, in order). ``step()`` runs one step, so two searches can take turns
    (``interleaved``)."""

    def __init__(
        self,
        gen: LoadGen,
        srv: Server,
        rp: bool,
        a: argparse.Namespace,
        cores: Any,
        noise: Noise,
    ) -> None:
        self.gen, self.srv, self.rp, self.a, self.cores, self.noise = gen, srv, rp, a, cores, noise
        self.fixed: list[float] = list(a.rates or [])
        self.steps: list[dict[str, Any]] = []
        self.rate = float(a.start_rate)
        self.good: float | None = None
        self.bad: float | None = None
        self.best: dict[str, Any] | None = None
        self.deadline = time.monotonic() + a.search_budget
        self.lost = 0
        self.i = 0
        self.done = False

    def step(self) -> None:
        a, srv = self.a, self.srv
        if self.i >= (len(self.fixed) or a.max_steps):
            self.done = True
            return
        if self.fixed:
            self.rate = self.fixed[self.i]
        elif time.monotonic() > self.deadline:
            log(f"{srv.name}: search time budget used up")
            self.done = True
            return
        self.i += 1
        rate = self.rate
        r = run_step(self.gen, srv, rate, a.step_seconds, a, self.cores, self.noise)
        ok, why = verdict(r, self.rp, a.room_size - 1, self.lost)
        self.lost = r["lost_connections"]
        r["ok"] = ok
        r["why"] = why
        self.steps.append(r)
        log(
            f"{srv.name}: {'PASS' if ok else 'FAIL'} {describe(r, self.rp)}"
            + (f" -- {why}" if why else "")
        )
        if ok and (self.best is None or r["deliveries_per_s"] > self.best["deliveries_per_s"]):
            self.best = r
        if self.fixed:
            return
        if not ok and r["noisy"]:
            log(f"  (other processes disturbed this step; trying {rate:.0f}/s again)")
            return
        if ok:
            self.good = rate
        else:
            self.bad = rate if self.bad is None else min(self.bad, rate)
        if self.bad is None:
            self.rate = rate * a.growth
            return
        lo = self.good if self.good is not None else 0.0
        if self.bad / max(lo, 1.0) < 1 + a.resolution:
            self.done = True
            return
        nxt = round(((lo + self.bad) / 2 if lo else self.bad / 2) / 50) * 50
        if nxt <= lo or nxt >= self.bad:
            self.done = True
        self.rate = nxt

    def result(self) -> dict[str, Any]:
        steps = self.steps
        saturation = max(steps, key=lambda x: x["deliveries_per_s"]) if steps else None
        return {"steps": steps, "best": self.best, "saturation": saturation}


def interleaved(searches: list[Search]) -> None:
    """Run the searches a step each in turn, so that every server is measured in the same
    minutes (this machine's speed was seen to change by up to 2x within minutes)."""
    while not all(s.done for s in searches):
        for s in searches:
            if not s.done:
                s.step()


def latency_phase(
    gen: LoadGen, srv: Server, a: argparse.Namespace, cores: Any, noise: Noise
) -> dict[str, Any]:
    r = run_step(gen, srv, a.latency_rate, a.latency_seconds, a, cores, noise)
    _, why = verdict(r, True, a.room_size - 1, 0)
    log(f"{srv.name}: latency at {a.latency_rate:.0f}/s: {describe(r, True)}")
    if why:
        log(f"  (would not count as sustainable: {why})")
    return r


def encodings_load_phase(
    gens: dict[str, LoadGen],
    srv: Server,
    a: argparse.Namespace,
    cores: Any,
    noise: Noise,
) -> dict[str, Any]:
    """Server CPU per chat message end to end, JSON clients against MessagePack clients on the
    same server (each encoding with its own load generator and rooms, the idle one quiet): at
    each offered rate, one step of each per round, in alternating order (A B, then B A), so
    both are measured in the same minutes. Server CPU includes the store writer process."""
    rounds: list[dict[str, Any]] = []
    order = ["json", "msgpack"]
    for i in range(a.encoding_rounds):
        for rate in a.encoding_rates:
            row: dict[str, Any] = {"round": i + 1, "offered_per_s": rate}
            for enc in order if i % 2 == 0 else order[::-1]:
                r = run_step(gens[enc], srv, rate, a.step_seconds, a, cores, noise)
                ok, why = verdict(r, True, a.room_size - 1, 0)
                acked = r["acked_per_s"]
                row[enc] = {
                    "us_per_message": round(r["server_cpu"] / acked * 1e6, 2) if acked else None,
                    "us_per_delivery": round(r["server_cpu"] / r["deliveries_per_s"] * 1e6, 3)
                    if r["deliveries_per_s"]
                    else None,
                    "server_cpu": round(r["server_cpu"], 4),
                    "server_child_cpu": round(r["server_child_cpu"], 4),
                    "acked_per_s": round(acked),
                    "deliveries_per_s": round(r["deliveries_per_s"]),
                    "ack_p99_ms": round(r["ack_p99_ms"], 2),
                    "delivery_p99_ms": round(r["delivery_p99_ms"], 2),
                    "loadgen_cpu": round(r["loadgen_cpu"], 3),
                    "other_cpu": round(r["other_cpu"], 3),
                    "ok": ok,
                }
                log(
                    f"encodings e2e round {i + 1} {enc:>7}: {'PASS' if ok else 'FAIL'} "
                    f"{describe(r, True)}" + (f" -- {why}" if why else "")
                )
            j, p = row["json"]["us_per_message"], row["msgpack"]["us_per_message"]
            row["ratio"] = round(p / j, 3) if j and p else None
            log(
                f"encodings e2e round {i + 1} at {rate:.0f}/s: server us per chat message "
                f"JSON {j}, MessagePack {p}, ratio {row['ratio']}"
            )
            rounds.append(row)
    summary: dict[str, Any] = {}
    for rate in a.encoding_rates:
        rows = [r for r in rounds if r["offered_per_s"] == rate and r["ratio"] is not None]
        if not rows:
            continue

        def med(v: list[float]) -> float:
            v = sorted(v)
            k = len(v) // 2
            return v[k] if len(v) % 2 else (v[k - 1] + v[k]) / 2

        summary[str(round(rate))] = {
            "ratios": [r["ratio"] for r in rows],
            "median_ratio": round(med([r["ratio"] for r in rows]), 3),
            "json_us_per_message_median": round(
                med([r["json"]["us_per_message"] for r in rows]), 2
            ),
            "msgpack_us_per_message_median": round(
                med([r["msgpack"]["us_per_message"] for r in rows]), 2
            ),
            "all_ok": all(r["json"]["ok"] and r["msgpack"]["ok"] for r in rows),
        }
    medians = [v["median_ratio"] for v in summary.values()]
    return {
        "rounds": rounds,
        "by_rate": summary,
        "tolerance": ENCODING_TARGETS["e2e_tolerance"],
        "cpu_no_worse_than_json": bool(medians)
        and max(medians) <= 1 + ENCODING_TARGETS["e2e_tolerance"],
    }


def print_encodings_e2e(e: dict[str, Any]) -> None:
    print("encodings end to end: server CPU us per chat message (incl. store writer, 9 deliveries)")
    print(f"  {'rate/s':>7} {'round':>5} {'JSON':>8} {'msgpack':>8} {'ratio':>6}")
    for r in e["rounds"]:
        print(
            f"  {r['offered_per_s']:7.0f} {r['round']:5d} "
            f"{fmt(r['json']['us_per_message'], '.1f'):>8} "
            f"{fmt(r['msgpack']['us_per_message'], '.1f'):>8} {fmt(r['ratio'], '.3f'):>6}"
            + ("" if r["json"]["ok"] and r["msgpack"]["ok"] else "  (a step did not keep up)")
        )
    for rate, v in e["by_rate"].items():
        print(
            f"  at {rate}/s: median ratio {v['median_ratio']} "
            f"(JSON {v['json_us_per_message_median']} us, "
            f"MessagePack {v['msgpack_us_per_message_median']} us)"
        )
    print(
        f"  target CPU no worse than JSON (median ratio <= {1 + e['tolerance']:.2f}): "
        f"{'met' if e['cpu_no_worse_than_json'] else 'NOT met'}\n"
    )


# -- report ---------------------------------------------------------------------------------------


def fmt(v: Any, spec: str = ".0f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def machine() -> dict[str, str]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def report(res: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    mem = res.get("memory_rp", {})
    mem_raw = res.get("memory_raw", {})
    lat = res.get("latency", {})
    tp = res.get("throughput_rp", {})
    tr = res.get("throughput_raw", {})
    best, raw_best = tp.get("best"), tr.get("best")
    sat, raw_sat = tp.get("saturation"), tr.get("saturation")
    ratio = (
        best["deliveries_per_s"] / raw_best["deliveries_per_s"] if best and raw_best else math.nan
    )
    sat_ratio = (
        sat["deliveries_per_s"] / raw_sat["deliveries_per_s"] if sat and raw_sat else math.nan
    )
    gc_ms = res.get("gc_max_pause_ms", math.nan)
    summary: dict[str, Any] = {
        "connections": mem.get("connections", 0),
        "acked_msgs_per_s": round(best["acked_per_s"]) if best else 0,
        "ack_p99_ms": round(lat.get("ack_p99_ms", math.nan), 2),
        "ack_p50_ms": round(lat.get("ack_p50_ms", math.nan), 2),
        "fanout_ratio_vs_raw": round(ratio, 3),
        "kib_per_connection": round(mem.get("kib_per_connection", math.nan), 1),
        "kib_per_connection_idle": round(mem.get("kib_per_connection_idle", math.nan), 1),
        "raw_kib_per_connection": round(mem_raw.get("kib_per_connection", math.nan), 1),
        "deliveries_per_s": round(best["deliveries_per_s"]) if best else 0,
        "raw_deliveries_per_s": round(raw_best["deliveries_per_s"]) if raw_best else 0,
        "saturation_acked_msgs_per_s": round(sat["acked_per_s"]) if sat else 0,
        "saturation_deliveries_per_s": round(sat["deliveries_per_s"]) if sat else 0,
        "raw_saturation_deliveries_per_s": round(raw_sat["deliveries_per_s"]) if raw_sat else 0,
        "saturation_ratio_vs_raw": round(sat_ratio, 3),
        "ack_p99_ms_at_sustainable": round(best["ack_p99_ms"], 2) if best else None,
        "delivery_p99_ms_at_1000": round(lat.get("delivery_p99_ms", math.nan), 2),
        "gc_max_pause_ms": round(gc_ms, 1),
        "gc_pauses_over_50ms": res.get("gc_pauses_over_50ms", 0),
        "gc_max_pause_ms_load_server": round(res.get("gc_max_pause_ms_load_server", math.nan), 1),
        "gc_max_pause_ms_memory_server": round(
            res.get("gc_max_pause_ms_memory_server", math.nan), 1
        ),
        "server_cpu_at_sustainable": round(best["server_cpu"], 3) if best else None,
        "server_children_cpu_at_sustainable": round(best["server_child_cpu"], 3) if best else None,
        "store_writer_core": res["store_core"],
        "store": res["store_url"],
        "server_us_per_delivery": round(best["server_cpu"] / best["deliveries_per_s"] * 1e6, 1)
        if best
        else None,
        "raw_server_us_per_delivery": round(
            raw_best["server_cpu"] / raw_best["deliveries_per_s"] * 1e6, 1
        )
        if raw_best
        else None,
        "loadgen_cpu_max": round(
            max([s["loadgen_cpu"] for s in tp.get("steps", []) + tr.get("steps", [])] or [0.0]),
            3,
        ),
        "other_cpu_max": round(res.get("other_cpu_max", 0.0), 3),
        "gc_max_pause_ms_memory_phase": round(
            mem.get("gc_max_pause_ms_after_messages", math.nan), 1
        ),
        "server_internal_errors": res.get("server_internal_errors", 0),
        "server_slow_consumers": res.get("server_slow_consumers", 0),
        "load_connections": a.load_connections,
        "room_size": a.room_size,
        "runtime_s": round(time.monotonic() - res["t0"], 1),
        # Every Rallypoint rate step, for comparisons across runs (bench/signaling_ab.py).
        "steps": [
            {
                "offered_per_s": round(r["offered_per_s"]),
                "acked_per_s": round(r["acked_per_s"]),
                "deliveries_per_s": round(r["deliveries_per_s"]),
                "ack_p50_ms": round(r["ack_p50_ms"], 2),
                "ack_p99_ms": round(r["ack_p99_ms"], 2),
                "server_cpu": round(r["server_cpu"], 4),
                "server_child_cpu": round(r.get("server_child_cpu", 0.0), 4),
                "other_cpu": round(r["other_cpu"], 3),
                "ok": r["ok"],
            }
            for r in tp.get("steps", [])
        ],
    }
    summary["targets_met"] = {
        "10k_connections_under_40_kib": summary["connections"] >= TARGETS["connections"]
        and summary["kib_per_connection"] < TARGETS["kib_per_connection"],
        "acked_6000_per_s": summary["acked_msgs_per_s"] >= TARGETS["acked_msgs_per_s"],
        "fanout_60pct_of_raw": summary["fanout_ratio_vs_raw"] >= TARGETS["fanout_ratio_vs_raw"],
        "ack_p99_under_10ms_at_1000": summary["ack_p99_ms"] < TARGETS["ack_p99_ms"],
        "no_gc_pause_over_50ms": summary["gc_max_pause_ms"] <= TARGETS["gc_max_pause_ms"]
        and summary["gc_pauses_over_50ms"] == 0,
    }
    summary["machine"] = machine()
    return summary


def print_table(res: dict[str, Any], s: dict[str, Any]) -> None:
    m = s["machine"]
    print(
        f"\nRallypoint signaling benchmark -- {m['cpus']} CPUs ({m['cpu_model']}), "
        f"Python {m['python']}, {m['date']}"
    )
    print(
        f"server pinned to core {res['cores'][0]} (its store writer process to core "
        f"{res['store_core']}), load generator to core {res['cores'][1]}; "
        f"rooms of {s['room_size']}; {res['message_bytes']}-byte send frames\n"
    )
    for key, title in (("throughput_rp", "rallypoint"), ("throughput_raw", "raw broadcast")):
        steps = res.get(key, {}).get("steps", [])
        if not steps:
            continue
        rp = key == "throughput_rp"
        print(f"{title}: offered-rate steps, {s['load_connections']} connections")
        print(
            f"  {'offered/s':>9} {'acked/s':>8} {'deliv/s':>8} {'ack p50':>7} {'ack p99':>7} "
            f"{'dlv p99':>7} {'srv CPU':>7} {'core0':>6} {'loadgen':>7} {'core1':>6} "
            f"{'other':>6}  result"
        )
        for r in steps:
            print(
                f"  {r['offered_per_s']:9.0f} {fmt(r['acked_per_s'] if rp else None):>8} "
                f"{r['deliveries_per_s']:8.0f} {fmt(r['ack_p50_ms'] if rp else None, '.1f'):>7} "
                f"{fmt(r['ack_p99_ms'] if rp else None, '.1f'):>7} "
                f"{r['delivery_p99_ms']:7.1f} {r['server_cpu']:7.0%} "
                f"{r.get('server_core_busy', math.nan):6.0%} {r['loadgen_cpu']:7.0%} "
                f"{r.get('load_core_busy', math.nan):6.0%} {r['other_cpu']:6.0%}  "
                + ("ok" if r["ok"] else f"FAIL: {r['why']}")
                + (" (noisy)" if r.get("noisy") else "")
            )
        print()
    t = s["targets_met"]
    rows = [
        (
            "connections held (hello + join)",
            f"{s['connections']}",
            "10,000",
            t["10k_connections_under_40_kib"],
        ),
        (
            "server KiB per connection (idle / after 1 msg)",
            f"{s['kib_per_connection_idle']} / {s['kib_per_connection']}",
            "< 40",
            t["10k_connections_under_40_kib"],
        ),
        ("raw server KiB per connection (after 1 msg)", f"{s['raw_kib_per_connection']}", "", None),
        (
            "sustainable acked msgs/s (deliveries/s)",
            f"{s['acked_msgs_per_s']} ({s['deliveries_per_s']})",
            ">= 6,000",
            t["acked_6000_per_s"],
        ),
        ("raw sustainable deliveries/s", f"{s['raw_deliveries_per_s']}", "", None),
        (
            "fan-out vs raw (sustainable)",
            f"{s['fanout_ratio_vs_raw']}",
            ">= 0.60",
            t["fanout_60pct_of_raw"],
        ),
        (
            "saturation deliveries/s: rallypoint / raw (ratio)",
            f"{s['saturation_deliveries_per_s']} / {s['raw_saturation_deliveries_per_s']} "
            f"({s['saturation_ratio_vs_raw']})",
            "",
            None,
        ),
        (
            "ack p50 / p99 at 1,000 msgs/s (ms)",
            f"{s['ack_p50_ms']} / {s['ack_p99_ms']}",
            "p99 < 10",
            t["ack_p99_under_10ms_at_1000"],
        ),
        (
            "GC max pause ms (10k server incl. mass close / 1k load), pauses > 50 ms",
            f"{s['gc_max_pause_ms_memory_server']} / {s['gc_max_pause_ms_load_server']}, "
            f"{s['gc_pauses_over_50ms']}",
            "<= 50",
            t["no_gc_pause_over_50ms"],
        ),
        (
            "server CPU us per delivery: rallypoint / raw",
            f"{s['server_us_per_delivery']} / {s['raw_server_us_per_delivery']}",
            "",
            None,
        ),
        ("load generator CPU, max over steps", f"{s['loadgen_cpu_max']:.0%}", "", None),
        ("other processes' CPU, max over steps", f"{s['other_cpu_max']:.0%}", "", None),
    ]
    w = max(len(r[0]) for r in rows)
    print(f"{'figure':<{w}}  {'value':>22}  {'target':>9}  met")
    for name, value, target, met in rows:
        mark = "" if met is None else "yes" if met else "NO"
        print(f"{name:<{w}}  {value:>22}  {target:>9}  {mark}")
    print(f"runtime {s['runtime_s']} s")


# -- encodings ------------------------------------------------------------------------------------


def _client_frame_bytes(payload: bytes) -> int:
    """A client frame's size: header, mask key (RFC 6455 section 5.3) and payload."""
    n = len(payload)
    return n + (2 if n < 126 else 4 if n < 65536 else 10) + 4


def _sdp_offer() -> str:
    """A real offer (aiortc: one audio and one video transceiver), as a client sends one."""
    import asyncio

    from aiortc import RTCPeerConnection

    async def offer() -> str:
        pc = RTCPeerConnection()
        try:
            pc.addTransceiver("audio")
            pc.addTransceiver("video")
            o = await pc.createOffer()
            return str(o.sdp)
        finally:
            await pc.close()

    return asyncio.run(offer())


def typical_messages() -> dict[str, tuple[str, dict[str, Any]]]:
    """Typical messages, by name: (who sends it, the message). Chat texts are 40 characters
    (about the median of chat messages) and cids are the SDK's (a UUID in hex)."""
    cid = "3f22e7bf4ef2440085e378550e602d30"
    text = "Running ten minutes late, start without me"[:40]
    conv = "group:Wm3qkP1vX2bRt9sLc0Hd"
    ts = 1795812967724
    delivered = {
        "type": "message",
        "conversation": conv,
        "seq": 1842,
        "mid": 905113,
        "cid": cid,
        "from": "alice.martin",
        "name": "Alice Martin",
        "kind": "text",
        "ts": ts,
        "text": text,
    }
    page = [
        {
            "conversation": f"group:Wm3qkP1vX2bRt9sLc{i:04d}",
            "kind": "group",
            "last_seq": 1842 + i,
            "read_seq": 1830 + i,
            "unread": 12,
            "muted": i % 7 == 0,
            "updated_at": ts - i * 60_000,
            "name": f"Group {i}",
            "role": "member",
            "last_message": {**delivered, "seq": 1842 + i, "mid": 905113 - i},
        }
        for i in range(50)
    ]
    return {
        "chat send (client)": (
            "client",
            {"type": "send", "conversation": conv, "cid": cid, "text": text, "id": "r1042"},
        ),
        "chat message (delivered)": ("server", delivered),
        "chat ack (sent)": (
            "server",
            {
                "type": "sent",
                "conversation": conv,
                "cid": cid,
                "mid": 905113,
                "seq": 1842,
                "ts": ts,
                "duplicate": False,
                "re": "r1042",
            },
        ),
        "presence": ("server", {"type": "presence", "identity": "alice.martin", "status": "busy"}),
        "SDP offer (call_signal)": (
            "client",
            {
                "type": "call_signal",
                "call": "p2VqR0cLTbC4kW8y",
                "kind": "offer",
                "sdp": _sdp_offer(),
                "id": "r1043",
            },
        ),
        "ICE candidate (ice)": (
            "client",
            {
                "type": "ice",
                "room": "lobby",
                "target": "publisher",
                "candidate": {
                    "candidate": "candidate:1 1 udp 2122260223 192.0.2.10 54321 typ host",
                    "sdpMid": "0",
                    "sdpMLineIndex": 0,
                },
            },
        ),
        "conversation list (50)": (
            "server",
            {"type": "conversations", "items": page, "more": True, "cursor": "c50", "re": "r9"},
        ),
    }


def encoding_phase(a: argparse.Namespace) -> dict[str, Any]:
    """Bytes per typical message and the server's CPU per chat message, JSON and MessagePack."""
    import msgpack
    import orjson

    # This file is `signaling` too: import the server's package, not this script.
    here = Path(__file__).resolve().parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.modules.pop("signaling", None)
    try:
        from signaling.app import protocol
        from signaling.wire.encodings import Transcoder
        from signaling.wire.framing import encode

        try:  # the fan-out's encoding since the Transcoder packs the message it was made from
            from signaling.wire.framing import encode_fresh
        except ImportError:  # older code
            encode_fresh = encode
    finally:
        sys.path[:] = saved

    sizes: dict[str, Any] = {}
    for name, (side, m) in typical_messages().items():
        j, p = orjson.dumps(m), msgpack.packb(m)
        if side == "client":
            jf, pf = _client_frame_bytes(j), _client_frame_bytes(p)
        else:
            jf, pf = len(encode(m)), len(Transcoder()(encode(m)))
        sizes[name] = {
            "side": side,
            "json_bytes": jf,
            "msgpack_bytes": pf,
            "saved": round(1 - pf / jf, 3),
            "json_payload": len(j),
            "msgpack_payload": len(p),
            "payload_saved": round(1 - len(p) / len(j), 3),
        }
        log(
            f"encodings: {name}: JSON {jf} B, MessagePack {pf} B ({1 - pf / jf:.1%} fewer; "
            f"payloads {len(j)} / {len(p)} B)"
        )

    # The server's work per chat message, as the load phases make it: parse and validate the
    # send, encode the ack for the sender, encode the message once for the fan-out. On a
    # MessagePack connection the ack is packed directly; the fan-out's message is the core's
    # JSON frame, converted (once for every MessagePack recipient).
    proto = protocol()
    msgs = typical_messages()
    send, ack, delivered = (
        msgs["chat send (client)"][1],
        msgs["chat ack (sent)"][1],
        msgs["chat message (delivered)"][1],
    )
    send_json, send_packed = orjson.dumps(send), msgpack.packb(send)
    parse, parse_packed = proto.parse, proto.parse_msgpack
    ack_conv, msg_conv = Transcoder(), Transcoder()  # the server has one: no hits across

    def json_path() -> None:
        parse(send_json)
        encode(ack)
        encode_fresh(delivered)

    def packed_path() -> None:
        parse_packed(send_packed)
        ack_conv.pack(ack)  # a reply is packed for its one connection
        msg_conv(encode_fresh(delivered))

    def per_call_ns(fn: Any, n: int) -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - t) / n

    n = 2000 if a.quick else 20_000
    rounds = 6 if a.quick else 30
    per_call_ns(json_path, n)  # warm up both
    per_call_ns(packed_path, n)
    ja: list[float] = []
    pa: list[float] = []
    for i in range(rounds):  # alternating, and in both orders: this machine's speed drifts
        for fn, out in ((json_path, ja), (packed_path, pa))[:: 1 if i % 2 == 0 else -1]:
            out.append(per_call_ns(fn, n))
    ja.sort()
    pa.sort()
    json_us, packed_us = ja[len(ja) // 2] / 1000, pa[len(pa) // 2] / 1000
    ratios = sorted(p / j for j, p in zip(ja, pa, strict=True))
    cpu_ratio = packed_us / json_us
    log(
        f"encodings: server CPU per chat message (parse + validate + ack + fan-out encode): "
        f"JSON {json_us:.2f} us, MessagePack {packed_us:.2f} us (x{cpu_ratio:.2f}; "
        f"median of {rounds} alternating rounds of {n})"
    )
    chat = [v["saved"] for k, v in sizes.items() if k.startswith("chat")]
    return {
        "sizes": sizes,
        "chat_bytes_saved_min": min(chat),
        "cpu_us_per_chat_message_json": round(json_us, 3),
        "cpu_us_per_chat_message_msgpack": round(packed_us, 3),
        "cpu_ratio_msgpack_vs_json": round(cpu_ratio, 3),
        "cpu_ratio_spread": [round(ratios[0], 3), round(ratios[-1], 3)],
        "targets_met": {
            "msgpack_chat_30pct_fewer_bytes": min(chat) >= ENCODING_TARGETS["chat_bytes_saved"],
            # the codec alone; the target is judged end to end (phase 0b), which sets
            # msgpack_cpu_no_worse_than_json
            "codec_cpu_no_worse_than_json": cpu_ratio <= ENCODING_TARGETS["cpu_ratio_max"],
        },
    }


def print_encodings(e: dict[str, Any]) -> None:
    print("encodings: bytes per message (WebSocket frames; client frames with their mask key)")
    print(f"  {'message':<26} {'JSON':>7} {'msgpack':>7} {'fewer':>6}   payloads")
    for name, v in e["sizes"].items():
        print(
            f"  {name:<26} {v['json_bytes']:7d} {v['msgpack_bytes']:7d} {v['saved']:6.1%}   "
            f"{v['json_payload']} / {v['msgpack_payload']} ({v['payload_saved']:.1%})"
        )
    t = e["targets_met"]
    print(
        f"  chat messages: at least {e['chat_bytes_saved_min']:.1%} fewer bytes "
        f"(target >= 30 %: {'met' if t['msgpack_chat_30pct_fewer_bytes'] else 'NOT met'})"
    )
    print(
        f"  server CPU per chat message: JSON {e['cpu_us_per_chat_message_json']} us, "
        f"MessagePack {e['cpu_us_per_chat_message_msgpack']} us "
        f"(x{e['cpu_ratio_msgpack_vs_json']}, rounds {e['cpu_ratio_spread'][0]}-"
        f"{e['cpu_ratio_spread'][1]}; the codec alone: the target is judged end to end)\n"
    )


# -- main -----------------------------------------------------------------------------------------


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The options of the chat load and its rate search (also ``bench/cluster.py``'s); those
    without a default here get one from the caller (``fill_defaults``)."""
    p.add_argument("--load-connections", type=int, help="throughput/latency connections (1000)")
    p.add_argument("--room-size", type=int, default=10)
    p.add_argument("--message-bytes", type=int, default=150, help="size of each send frame's JSON")
    p.add_argument("--duration", type=float, help="measured seconds per rate step (6)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each step (1.5)")
    p.add_argument("--drain", type=float, default=5.0, help="max wait after a step for backlog")
    p.add_argument("--latency-rate", type=float, default=1000.0)
    p.add_argument("--latency-seconds", type=float, help="latency phase length (10)")
    p.add_argument("--start-rate", type=float, help="first offered rate, msgs/s (2500)")
    p.add_argument("--growth", type=float, default=1.25, help="rate factor between steps")
    p.add_argument(
        "--rates",
        type=lambda v: [float(x) for x in v.split(",")],
        help="run exactly these offered rates in order, e.g. 4900,6500,4900 (no search)",
    )
    p.add_argument("--resolution", type=float, default=0.06, help="stop bisecting below this")
    p.add_argument("--max-steps", type=int, help="rate steps per server (12)")
    p.add_argument("--search-budget", type=float, help="seconds per server for the search (180)")
    p.add_argument("--connect-timeout", type=float, help="seconds to open all connections (120)")
    p.add_argument(
        "--noise-threshold",
        type=float,
        default=0.10,
        help="CPU share of a core used by other processes above which a step is repeated",
    )
    p.add_argument(
        "--noise-budget", type=float, help="seconds the run may spend waiting out noise (600)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")


def fill_defaults(a: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Options not given take ``defaults``; ``--quick`` shortens the drain and grows faster."""
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.quick:
        a.drain = min(a.drain, 2.0)
        a.growth = max(a.growth, 2.0)
    a.step_seconds = a.duration


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short smoke run (< 90 s)")
    p.add_argument("--connections", type=int, help="memory phase connections (10000)")
    add_load_options(p)
    p.add_argument("--each-rate", type=float, default=2500.0, help="msgs/s in the memory phase")
    p.add_argument("--settle", type=float, help="seconds to wait before reading RSS (3)")
    p.add_argument(
        "--store-core",
        choices=("load", "server"),
        default="load",
        help="where Rallypoint's store writer process runs: on the load generator's core "
        "(default: the server uses the machine's second core for its writes) or on the "
        "server's core (everything of the server on one core)",
    )
    p.add_argument("--skip-raw", action="store_true", help="no raw baseline (no ratio)")
    p.add_argument("--skip-memory", action="store_true", help="no memory phase")
    p.add_argument("--skip-load", action="store_true", help="no latency and throughput phases")
    p.add_argument("--skip-encodings", action="store_true", help="no JSON/MessagePack figures")
    p.add_argument(
        "--skip-encodings-load",
        action="store_true",
        help="no end-to-end JSON/MessagePack comparison under load",
    )
    p.add_argument(
        "--encoding-rates",
        type=lambda v: [float(x) for x in v.split(",")],
        help="offered rates of the end-to-end encoding comparison (4000,6000)",
    )
    p.add_argument("--encoding-rounds", type=int, help="rounds of that comparison (4)")
    p.add_argument(
        "--store-url",
        help="the server's store.url, e.g. postgresql://postgres@127.0.0.1/test (a schema of "
        "the run's own is made and dropped; PostgreSQL's processes count as the server's)",
    )
    p.add_argument(
        "--server-path",
        help="run `python -m signaling` from this directory instead of the installed server",
    )
    a = p.parse_args(argv)
    q = a.quick
    defaults = {
        "connections": 1000 if q else 10_000,
        "load_connections": 500 if q else 1000,
        "duration": 2.0 if q else 6.0,
        "warmup": 0.5 if q else 1.5,
        "latency_seconds": 3.0 if q else 10.0,
        "start_rate": 2500.0,
        "max_steps": 3 if q else 12,
        "search_budget": 12.0 if q else 180.0,
        "settle": 1.0 if q else 3.0,
        "connect_timeout": 20.0 if q else 120.0,
        "noise_budget": 10.0 if q else 600.0,
        "encoding_rates": [2000.0] if q else [4000.0, 6000.0],
        "encoding_rounds": 2 if q else 4,
    }
    fill_defaults(a, defaults)
    return a


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # run the cleanup in main's finally


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    t0 = time.monotonic()
    nofile = raise_nofile(a.connections + 2000)
    if nofile < a.connections + 200:
        log(f"RLIMIT_NOFILE is {nofile}: lowering --connections to {nofile - 200}")
        a.connections = nofile - 200
    cpus = sorted(os.sched_getaffinity(0))
    cores: tuple[int | None, int | None] = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)
    if cores[1] is not None:
        os.sched_setaffinity(0, {cores[1]})  # this process and the forked load generator
    else:
        log("fewer than 2 CPUs: nothing pinned; the load generator competes with the server")
    work = Path(tempfile.mkdtemp(prefix="rallypoint-bench-"))
    gen = LoadGen(cores[1])
    gens = [gen]
    noise = Noise(a.noise_threshold, a.noise_budget, [os.getpid(), gen.proc.pid or 0])
    res: dict[str, Any] = {"t0": t0, "cores": cores, "message_bytes": a.message_bytes}
    store_core = cores[1] if a.store_core == "load" else None  # None: stays with the server
    res["store_core"] = cores[1] if a.store_core == "load" else cores[0]
    gc_pauses: list[float] = []
    gc_over = 0
    servers: list[Server] = []
    schema = contextlib.ExitStack()
    store_url = schema.enter_context(store_schema(a.store_url))
    res["store_url"] = a.store_url or "sqlite"

    def finish_rp(srv: Server, label: str) -> None:
        nonlocal gc_over
        m = srv.metrics()
        gc_pauses.append(m.get("rallypoint_gc_max_pause_seconds", math.nan) * 1000)
        res[f"gc_max_pause_ms_{label}"] = gc_pauses[-1]
        gc_over += int(m.get("rallypoint_gc_pauses_over_50ms_total", 0))
        for k in ("internal_errors", "slow_consumers", "rate_limited"):
            res[f"server_{k}"] = res.get(f"server_{k}", 0) + int(m.get(f"rallypoint_{k}_total", 0))
        log(
            f"rallypoint /metrics: gc max pause {gc_pauses[-1]:.1f} ms, "
            f"collections {m.get('rallypoint_gc_collections_total', 0):.0f}, "
            f"commits {m.get('rallypoint_store_commits_total', 0):.0f} for "
            f"{m.get('rallypoint_store_writes_total', 0):.0f} writes, "
            f"internal errors {m.get('rallypoint_internal_errors_total', 0):.0f}"
        )
        srv.stop()

    try:
        if not a.skip_encodings:
            log("phase 0: encodings, JSON and MessagePack (in this process)")
            res["encodings"] = encoding_phase(a)
        if not a.skip_encodings_load:
            n = a.load_connections
            log(
                f"phase 0b: encodings end to end, {n} JSON and {n} MessagePack connections, "
                f"{a.encoding_rounds} alternating rounds at {a.encoding_rates} msgs/s"
            )
            srv = rallypoint_server(work / "enc", cores[0], 2 * n, a.room_size, a.server_path)
            servers.append(srv)
            srv.start()
            srv.place_store_writer(store_core)
            gen_packed = LoadGen(cores[1])
            gens.append(gen_packed)
            noise.pids.append(gen_packed.proc.pid or 0)
            if (
                min(
                    connect(gen, srv, n, "rp", "j", a, "json", "r"),
                    connect(gen_packed, srv, n, "rp", "p", a, "msgpack", "p"),
                )
                < n * 0.99
            ):
                raise RuntimeError("too few connections for the encoding comparison")
            e2e = encodings_load_phase({"json": gen, "msgpack": gen_packed}, srv, a, cores, noise)
            res["encodings_e2e"] = e2e
            gen.call("close", 60)
            gen_packed.call("close", 60)
            finish_rp(srv, "encodings_server")
        if not a.skip_memory:
            log(f"phase 1: memory, {a.connections} connections in rooms of {a.room_size}")
            srv = rallypoint_server(
                work / "mem", cores[0], a.connections, a.room_size, a.server_path, store_url
            )
            servers.append(srv)
            srv.start()
            srv.place_store_writer(store_core)
            res["memory_rp"] = memory_phase(gen, srv, "rp", a)
            finish_rp(srv, "memory_server")
            if not a.skip_raw:
                srv = raw_server(work, cores[0])
                servers.append(srv)
                srv.start()
                res["memory_raw"] = memory_phase(gen, srv, "raw", a)
                srv.stop()

        if not a.skip_load:
            log(f"phase 2+3: latency and throughput, {a.load_connections} connections")
            srv = rallypoint_server(
                work / "load", cores[0], a.load_connections, a.room_size, a.server_path, store_url
            )
            servers.append(srv)
            srv.start()
            srv.place_store_writer(store_core)
            if connect(gen, srv, a.load_connections, "rp", "t", a) < a.load_connections * 0.99:
                raise RuntimeError("too few connections for the load phases")
            res["latency"] = latency_phase(gen, srv, a, cores, noise)
            searches = [Search(gen, srv, True, a, cores, noise)]
            if not a.skip_raw:
                log("phase 3+4: throughput of Rallypoint and of the raw ceiling, steps in turn")
                raw = raw_server(work, cores[0])
                servers.append(raw)
                raw.start()
                gen_raw = LoadGen(cores[1])
                gens.append(gen_raw)
                noise.pids.append(gen_raw.proc.pid or 0)
                n = connect(gen_raw, raw, a.load_connections, "raw", "x", a)
                if n < a.load_connections * 0.99:
                    raise RuntimeError("too few connections to the raw server")
                searches.append(Search(gen_raw, raw, False, a, cores, noise))
            interleaved(searches)
            res["throughput_rp"] = searches[0].result()
            if not a.skip_raw:
                res["throughput_raw"] = searches[1].result()
                gen_raw.call("close", 60)
                raw.stop()
            gen.call("close", 60)
            finish_rp(srv, "load_server")
    finally:
        for g in gens:
            g.stop()
        for srv in servers:
            srv.stop()
        schema.close()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    res["other_cpu_max"] = noise.max_seen
    res["gc_max_pause_ms"] = max(gc_pauses) if gc_pauses else math.nan
    res["gc_pauses_over_50ms"] = gc_over
    summary = report(res, a)
    if "encodings" in res:
        summary["encodings"] = res["encodings"]
        print_encodings(res["encodings"])
    if "encodings_e2e" in res:
        enc = summary.setdefault("encodings", {})
        enc["end_to_end"] = res["encodings_e2e"]
        enc.setdefault("targets_met", {})["msgpack_cpu_no_worse_than_json"] = res["encodings_e2e"][
            "cpu_no_worse_than_json"
        ]
        print_encodings_e2e(res["encodings_e2e"])
    print_table(res, summary)
    print(json.dumps(summary, allow_nan=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
