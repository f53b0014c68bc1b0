"""What the bus between nodes costs: ``RedisBus.publish`` against ``LocalBus.publish``, and
how many frames per second one node carries to another through Redis.

Two buses ("nodes") in this process on ``--url`` under a prefix of their own. Each round:

- ``call``: the publishing call alone, one local sink, ``--frames`` frames (the fan-out hot path
  pays this per publish; the Redis round trips happen later, in the publisher task);
- ``through``: node A publishes ``--frames`` frames to a topic node B subscribes to; the time
  until B's sink has them all (one process runs both ends, so this is the pair's throughput,
  not one node's).

Rounds alternate between the buses (``local`` has no ``through``). Prints a table and one JSON
line (the last line of stdout).

    .venv/bin/python bench/redisbus.py --url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
from pathlib import Path

# ``python bench/redisbus.py`` puts bench/ first on sys.path, where bench/signaling.py would
# shadow the ``signaling`` package.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _BENCH]
sys.path.insert(0, str(Path(_BENCH).parent))

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


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=200, help="bytes per frame")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    prefix = "bench-" + secrets.token_hex(4)
    a = RedisBus(args.url, "bench-a", prefix, max_queued=args.frames + 1)
    b = RedisBus(args.url, "bench-b", prefix)
    await a.start()
    await b.start()
    frame = b"x" * args.size
    local_ns: list[float] = []
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
        assert a.dropped == 0, a.dropped
    finally:
        await a.close()
        await b.close()
    med = statistics.median
    print(f"{'bus':8} {'publish call (ns)':>18} {'A to B (frames/s)':>18}")
    print(f"{'local':8} {med(local_ns):18.0f} {'-':>18}")
    print(f"{'redis':8} {med(redis_ns):18.0f} {med(through):18.0f}")
    print(
        json.dumps(
            {
                "frames": args.frames,
                "size": args.size,
                "rounds": args.rounds,
                "local_call_ns": local_ns,
                "redis_call_ns": redis_ns,
                "through_fps": through,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
