"""What the bus between nodes costs: ``RedisBus.publish`` against ``LocalBus.publish``, and
how many frames per second one node carries to another through Redis.

Two buses ("nodes") in this process on ``--url`` under a prefix of their own. Each round:

- ``call``: the publishing call alone, one local sink, ``--frames`` frames (the fan-out hot path
  pays this per publish; the Redis round trips happen later, in the publisher task);
- ``through``: node A publishes ``--frames`` frames to a topic node B subscribes to; the time
  until B's sink has them all (one process runs both ends, so this is the pair's throughput,
  not one node's).

- ``publisher``: the CPU time of this process per frame while node A publishes ``--frames``
  frames (yielding every 200 so that the publisher task writes them) until all are written:
  the ``publish`` call and the publisher's share, which a node pays per frame it sends to
  other nodes; measured in a fresh process, and with ``--server-path`` in turns with another
  checkout of the server (a process with that checkout first on its path), for an A/B.
- ``subscriber``: likewise, the CPU time of a fresh process per frame its bus receives from
  another node (``redis-benchmark`` publishing ``--frames`` frames, 64 per round trip) and
  hands to a local sink.

Rounds alternate between the buses (``local`` has no ``through``). Prints a table and one JSON
line (the last line of stdout).

    .venv/bin/python bench/redisbus.py --url redis://127.0.0.1:6379/0
    .venv/bin/python bench/redisbus.py --server-path ../previous-checkout
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

# ``python bench/redisbus.py`` puts bench/ first on sys.path, where bench/signaling.py would
# shadow the ``signaling`` package.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _BENCH]
# ``--server-path``'s subprocess imports the other checkout's server instead.
sys.path.insert(0, os.environ.get("RALLYPOINT_BENCH_SERVER") or str(Path(_BENCH).parent))

from signaling.cluster.redisbus import RedisBus  # noqa: E402
from signaling.core.bus import LocalBus  # noqa: E402


class Count:
    def __init__(self) -> None:
        self.n = 0

    def deliver(self, frame: bytes) -> None:
        self.n += 1


def call_ns(bus: LocalBus | RedisBus, frame: bytes, n: int) -> float:
    sink = Count()
    bus.subscribe("room:call", "s", sink)
    publish = bus.publish
    t0 = time.perf_counter_ns()
    for _ in range(n):
        publish("room:call", frame)
    dt = time.perf_counter_ns() - t0
    bus.unsubscribe("room:call", "s")
    assert sink.n == n
    return dt / n


async def drained(bus: RedisBus) -> None:
    while bus._queue:  # noqa: ASYNC110 (a benchmark polls: no hook in the hot path)
        await asyncio.sleep(0.001)


async def publisher_us(url: str, prefix: str, frame: bytes, n: int) -> float:
    """CPU microseconds of this process per frame published and written to Redis."""
    bus = RedisBus(url, "bench-p", prefix, max_queued=n + 1)
    await bus.start()
    try:
        while not bus.connected:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        publish = bus.publish
        t0 = time.process_time()
        for i in range(n):
            publish("room:pub", frame)
            if i % 200 == 199:
                await asyncio.sleep(0)
        while bus.published + bus.dropped < n:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        dt = time.process_time() - t0
        assert bus.dropped == 0, bus.dropped
    finally:
        await bus.close()
    return dt / n * 1e6


async def subscriber_us(url: str, prefix: str, size: int, n: int) -> float:
    """CPU microseconds of this process per frame received from Redis and delivered."""
    bus = RedisBus(url, "bench-s", prefix)
    sink = Count()
    bus.subscribe("room:sub", "s", sink)
    await bus.start()
    try:
        while not bus.connected:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        u = urlsplit(url)
        # Another node's frame: its header (a length-prefixed node id), then the frame.
        data = "\x05other" + "x" * size
        argv = ["redis-benchmark", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379)]
        argv += ["-n", str(n), "-P", "64", "-c", "1", "PUBLISH", f"{prefix}:room:sub", data]
        t0 = time.process_time()
        proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL)
        while sink.n < n:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        dt = time.process_time() - t0
        await proc.wait()
    finally:
        await bus.close()
    return dt / n * 1e6


def measured_in(path: str, url: str, frames: int, size: int) -> dict[str, float]:
    """``publisher_us`` and ``subscriber_us`` measured with the server of the checkout at
    ``path``, in a fresh process (both sides of an A/B are measured so, in turns)."""
    env = {**os.environ, "RALLYPOINT_BENCH_SERVER": str(Path(path).resolve())}
    argv = [sys.executable, str(Path(__file__).resolve()), "--only-publisher"]
    argv += ["--url", url, "--frames", str(frames), "--size", str(size)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True, text=True, timeout=300)
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=200, help="bytes per frame")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server-path", help="another checkout: its publisher, in turns (A/B)")
    ap.add_argument("--only-publisher", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    prefix = "bench-" + secrets.token_hex(4)
    frame = b"x" * args.size
    if args.only_publisher:  # one measurement, for another checkout's A/B (``--server-path``)
        pub = await publisher_us(args.url, prefix, frame, args.frames)
        sub = await subscriber_us(args.url, prefix, args.size, args.frames)
        print(json.dumps({"publisher_us": pub, "subscriber_us": sub}))
        return
    a = RedisBus(args.url, "bench-a", prefix, max_queued=args.frames + 1)
    b = RedisBus(args.url, "bench-b", prefix)
    await a.start()
    await b.start()
    local_ns: list[float] = []
    this: list[dict[str, float]] = []
    other: list[dict[str, float]] = []
    redis_ns: list[float] = []
    through: list[float] = []
    try:
        sink = Count()
        b.subscribe("room:through", "s", sink)
        while not (a.connected and b.connected):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        for _ in range(args.rounds):
            local_ns.append(call_ns(LocalBus(), frame, args.frames))
            redis_ns.append(call_ns(a, frame, args.frames))
            await drained(a)
            await asyncio.sleep(0.2)  # a's own echoes come back and are skipped
            start, t0 = sink.n, time.perf_counter()
            for _ in range(args.frames):
                a.publish("room:through", frame)
            while sink.n - start < args.frames:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            through.append(args.frames / (time.perf_counter() - t0))
            this.append(measured_in(str(Path(_BENCH).parent), args.url, args.frames, args.size))
            if args.server_path:
                other.append(measured_in(args.server_path, args.url, args.frames, args.size))
        assert a.dropped == 0, a.dropped
    finally:
        await a.close()
        await b.close()
    med = statistics.median
    print(f"{'bus':8} {'publish call (ns)':>18} {'A to B (frames/s)':>18}")
    print(f"{'local':8} {med(local_ns):18.0f} {'-':>18}")
    print(f"{'redis':8} {med(redis_ns):18.0f} {med(through):18.0f}")
    for key in ("publisher_us", "subscriber_us"):
        mine = [r[key] for r in this]
        print(f"{key}: {med(mine):.2f} us of CPU per frame (rounds: {fmt(mine)})")
        if other:
            theirs = [r[key] for r in other]
            print(f"  --server-path: {med(theirs):.2f} us ({fmt(theirs)})")
            print(f"  ratio this / other: {med(mine) / med(theirs):.3f}")
    print(
        json.dumps(
            {
                "this": this,
                "other": other,
                "frames": args.frames,
                "size": args.size,
                "rounds": args.rounds,
                "local_call_ns": local_ns,
                "redis_call_ns": redis_ns,
                "through_fps": through,
            }
        )
    )


def fmt(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


if __name__ == "__main__":
    asyncio.run(main())
