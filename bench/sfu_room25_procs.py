"""The 25-person room's participants in several load-generator processes (``bench/sfu.py
--room25``, ``--room25-procs``).

Each **child** (``python bench/sfu_room25_procs.py --url URL --room ROOM --n 25``) holds some of
the room's participants (``sfu_room25.SimulcastPublisher`` + ``LightSubscriber``, real WebRTC
peers as in one process) and is driven by the **parent** (``Children``, in ``bench/sfu.py``)
over its stdin and stdout, one JSON object a line. A request has an ``id`` and an ``op``; the
child answers each with one line, the same ``id`` and ``ok`` (``false``: ``error`` says why). It
handles one request at a time, the parent sends one at a time.

=========== ======================================== =========================================
op          request                                  answer
=========== ======================================== =========================================
``publish`` ``index``: join and publish participant  ``pid``: its participant id
            ``index`` (this child's)
``settled`` ``pid``, ``index``, ``pids`` (the ids so  ``done``: settled (else ``SETTLE_S`` ran
            far, by index): until participant        out: a slow step is not an error)
            ``index``'s publisher is connected (if
            it is this child's) and every one of its
            subscribers before ``index`` has
            answered an offer with ``pid``'s tracks;
            then its subscribers report their tiles
``show``    ``pids``: every participant's id by      ``lacking``: its subscribers that did not
            index; once its subscribers know every   know every track (``TRACKS_WAIT_S``)
            other's video, each reports its tiles
``status``  -                                        per subscriber: ``flowing`` (its shown
                                                     videos all grew since the last status),
                                                     ``known``, ``connected``; ``gone`` (track
                                                     ids unpublished meanwhile), ``failed``
                                                     (``media_failed`` events), ``calm_s``
                                                     (since its loop last lagged > 0.25 s)
``buffers`` -                                        ``sockets`` given 4 MB receive buffers
``sent``    -                                        ``sent``: packets sent, by publisher index
``counts``  -                                        ``counts``: by subscriber index, per SSRC
                                                     (kind, packets, bytes, frames, highest)
``lag``     -                                        ``max_s``, ``over_0_5_s``: this event loop's
                                                     longest lag and its lags > 0.5 s since the
                                                     last ``lag``
``close``   -                                        (then the child exits)
=========== ======================================== =========================================

A child dies with its parent: end of stdin (the parent exited or was killed) ends it, and so
does ``PR_SET_PDEATHSIG``, and ``--max-s`` bounds its life in any case. The parent bounds every
wait for an answer.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, bench/ is first on sys.path, where bench/signaling.py would shadow the
# ``signaling`` package: the project first, bench/ (helpers) last (as bench/sfu.py does).
SCRIPT = str(Path(__file__).resolve())
_BENCH = str(Path(SCRIPT).parent)
sys.path[:] = [p for p in sys.path if p != _BENCH] + [_BENCH]
sys.path.insert(0, str(Path(_BENCH).parent))

from sfu_load import (  # noqa: E402
    Snapshot,
    Window,
    cpu_seconds,
    enlarge_own_udp_buffers,
    measure_window,
)
from sfu_room25 import (  # noqa: E402
    NONE,
    SETTLE_S,
    SHOWN,
    TILE,
    TRACKS_WAIT_S,
    LightSubscriber,
    SimulcastPublisher,
    join,
    make_layers,
    no_consent,
    report_tiles,
)

from signaling.sdk.wsclient import Client  # noqa: E402

# Five children of five participants: see ``Children`` for why.
ROOM25_PROCS = 5
LAG_TICK_S = 0.05
# Between two participants' publishing, every child's loop is left this long without a lag over
# CALM_LAG_S, and the server's sockets without a datagram dropped (at most CALM_WAIT_S): longer
# than the server's ICE consent interval (4-6 s), so every connection gets at least one consent
# check answered in time between two busy steps (aioice gives up after six in a row unanswered).
CALM_S = 6.0
CALM_LAG_S = 0.25
CALM_WAIT_S = 60.0
CALM_POLL_S = 0.5
MAX_LIFE_S = 3000.0
ANSWER_S = 120.0  # the parent's longest wait for one answer (``show`` waits TRACKS_WAIT_S)


# -- child -----------------------------------------------------------------------------------------


class LagMonitor:
    """How late this event loop wakes up a ``LAG_TICK_S`` sleep: the longest lag, and how many
    lags passed 0.5 s (the time the server's ICE consent checks give an answer)."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self.over = 0
        self.last_lag = time.monotonic()  # when it last lagged more than CALM_LAG_S

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            lag = loop.time() - t - LAG_TICK_S
            self.max_s = max(self.max_s, lag)
            self.over += lag > 0.5
            if lag > CALM_LAG_S:
                self.last_lag = time.monotonic()

    def calm_s(self) -> float:
        """How long this loop has not lagged more than ``CALM_LAG_S``."""
        return time.monotonic() - self.last_lag

    def take(self) -> dict[str, Any]:
        out = {"max_s": round(self.max_s, 3), "over_0_5_s": self.over}
        self.max_s, self.over = 0.0, 0
        return out


class Share:
    """This child's participants of the room (see the module's docstring for its requests)."""

    def __init__(self, url: str, room: str, n: int) -> None:
        self.url = url
        self.room = room
        self.n = n
        self.layers = make_layers()
        self.pubs: dict[int, SimulcastPublisher] = {}
        self.subs: dict[int, LightSubscriber] = {}
        self.clients: list[Client] = []
        self.failed: list[dict[str, Any]] = []  # media_failed events
        self.tasks: list[asyncio.Task[None]] = []
        self.prior: dict[tuple[int, int], int] = {}  # (subscriber, SSRC) -> packets, last status
        self.lag = LagMonitor()
        self.closing = False
        self.reported: dict[int, list[tuple[str, int]]] = {}  # subscriber -> tiles reported

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self.lag.run()))
        self.tasks.append(asyncio.create_task(self._count_early()))

    async def _count_early(self) -> None:
        # from the first offer on: aiortc's own receive path would swamp this process
        while True:
            for s in self.subs.values():
                s.install()
            await asyncio.sleep(0.2)

    async def publish(self, index: int) -> dict[str, Any]:
        client, sub = await join(self.url, self.room, index)
        self.clients.append(client)

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("type") == "media_failed" and not self.closing:
                self.failed.append({"index": index, "which": ev.get("which")})
                print(f"room25: participant {index}: media_failed {ev.get('which')}", flush=True)

        client.listeners.append(on_event)
        self.subs[index] = sub
        # receiver reports and the shown tiles' REMB from the start, as a browser's
        self.tasks.append(asyncio.create_task(sub.feedback()))
        pub = self.pubs[index] = SimulcastPublisher(index, self.layers)
        await pub.publish(client, self.room)
        return {"pid": sub.pid}

    def _settled(self, pid: str, index: int) -> bool:
        pub = self.pubs.get(index)
        if pub is not None and pub.pc.connectionState != "connected":
            return False
        for i, s in self.subs.items():
            if i >= index:
                continue
            pc = s.session.sub
            known = any(t["participant"] == pid for t in s.session.tracks.values())
            if pc is None or not known or pc.signalingState != "stable":
                return False
        return True

    async def settled(self, pid: str, index: int, pids: list[str]) -> dict[str, Any]:
        """Wait for the step to settle (bounded), then report the tiles (``render``)."""
        done = False
        for _ in range(int(SETTLE_S * 10)):  # polled: the state lives in aiortc and the session
            if self._settled(pid, index):
                done = True
                break
            await asyncio.sleep(0.1)
        await self.render(pids)
        return {"done": done}

    async def render(self, pids: list[str]) -> None:
        """Each subscriber reports its tiles (``pids``: the ids of the participants so far, by
        index), if they changed: the videos of the next ``SHOWN`` participants at ``TILE``, the
        others hidden. As the bundled page does on each new track: without it the server would
        forward every video to everyone during the set-up (at the layer each one's budget
        allows), far more than the room's load, and drop datagrams (consent answers among
        them) on its full sockets."""
        tw, th = TILE
        tile = {"width": tw, "height": th}
        for s in self.subs.values():
            ahead = [(s.index + k) % self.n for k in range(1, min(SHOWN, self.n - 1) + 1)]
            s.shown = {pids[j] for j in ahead if j < len(pids)}
            boxes = [
                {"track": tid, **(tile if t["participant"] in s.shown else NONE)}
                for tid, t in s.session.tracks.items()
                if t["kind"] == "video"
            ]
            key = sorted((b["track"], b["width"]) for b in boxes)
            if boxes and self.reported.get(s.index) != key:
                self.reported[s.index] = key
                await report_tiles(s, self.room, boxes)
            s.install()

    def _knows_all(self, s: LightSubscriber) -> bool:
        videos = sum(1 for t in s.session.tracks.values() if t["kind"] == "video")
        return videos >= self.n - 1 and s.session.sub is not None

    async def show(self, pids: list[str]) -> dict[str, Any]:
        """Once every subscriber knows every other's video (at most ``TRACKS_WAIT_S``), its
        tiles (``render``) with everyone in."""
        deadline = time.monotonic() + TRACKS_WAIT_S
        while not all(self._knows_all(s) for s in self.subs.values()):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        lacking = [s.index for s in self.subs.values() if not self._knows_all(s)]
        await self.render(pids)
        return {"lacking": lacking}

    def status(self) -> dict[str, Any]:
        subs = {}
        for i, s in self.subs.items():
            shown = s.video_ssrcs()
            counts = s.sub.counts
            grew = [
                ssrc
                for ssrc in shown
                if ssrc in counts and counts[ssrc].packets > max(30, self.prior.get((i, ssrc), 0))
            ]
            for ssrc in shown:
                if ssrc in counts:
                    self.prior[i, ssrc] = counts[ssrc].packets
            audio = sum(c.packets for c in counts.values() if c.kind == "audio")
            pc = s.session.sub
            subs[i] = {
                "flowing": len(shown) >= min(SHOWN, self.n - 1)
                and len(grew) == len(shown)
                and audio > 5,
                "known": self._knows_all(s),
                "connected": pc is not None and pc.connectionState == "connected",
            }
        gone = {t for s in self.subs.values() for t in s.session.seen.keys() - s.session.tracks}
        pubs = sum(p.pc.connectionState == "connected" for p in self.pubs.values())
        return {
            "subs": subs,
            "gone": sorted(gone),
            "failed": self.failed,
            "pubs_connected": pubs,
            "calm_s": round(self.lag.calm_s(), 2),
        }

    async def sent(self) -> dict[str, Any]:
        return {"sent": {i: await p.sent() for i, p in self.pubs.items()}}

    def counts(self) -> dict[str, Any]:
        return {
            "counts": {
                i: [[c.kind, *c.snapshot()] for c in s.sub.counts.values()]
                for i, s in self.subs.items()
            }
        }

    async def close(self) -> None:
        self.closing = True
        for t in self.tasks:
            t.cancel()
        for s in self.subs.values():
            await s.session.close()
        for pub in self.pubs.values():
            await pub.close()
        for c in self.clients:
            await c.close()


def _die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent is gone already
        os._exit(1)


async def child_main(args: argparse.Namespace, out: int) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    no_consent()
    share = Share(args.url, args.room, args.n)
    share.start()

    def answer(msg: dict[str, Any]) -> None:
        data = (json.dumps(msg) + "\n").encode()
        while data:  # a blocking pipe: the parent reads every answer
            data = data[os.write(out, data) :]

    try:
        async with asyncio.timeout(args.max_s):
            while True:
                line = await reader.readline()
                if not line:
                    return  # the parent is gone
                req = json.loads(line)
                op = req["op"]
                try:
                    if op == "publish":
                        res = await share.publish(req["index"])
                    elif op == "settled":
                        res = await share.settled(req["pid"], req["index"], req["pids"])
                    elif op == "show":
                        res = await share.show(req["pids"])
                    elif op == "status":
                        res = share.status()
                    elif op == "buffers":
                        res = {"sockets": enlarge_own_udp_buffers()}
                    elif op == "sent":
                        res = await share.sent()
                    elif op == "counts":
                        res = share.counts()
                    elif op == "lag":
                        res = share.lag.take()
                    elif op == "close":
                        await asyncio.wait_for(share.close(), 30)
                        answer({"id": req["id"], "ok": True})
                        return
                    else:
                        raise ValueError(f"unknown op {op!r}")
                except Exception as e:  # told to the parent, which decides
                    answer({"id": req["id"], "ok": False, "error": repr(e)})
                else:
                    answer({"id": req["id"], "ok": True, **res})
    finally:
        for t in share.tasks:
            t.cancel()


def main() -> int:
    _die_with_parent()
    p = argparse.ArgumentParser(description="one load-generator process of the 25-person room")
    p.add_argument("--url", required=True)
    p.add_argument("--room", required=True)
    p.add_argument("--n", type=int, required=True, help="participants in the whole room")
    p.add_argument("--max-s", type=float, default=MAX_LIFE_S, help="exit after this long")
    args = p.parse_args()
    # stdout carries the answers alone: everything printed goes to stderr (the parent's)
    out = os.dup(1)
    os.dup2(2, 1)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(child_main(args, out))
    else:
        uvloop.run(child_main(args, out))
    # aiortc leaves tasks (and maybe threads) behind: leave at once
    sys.stderr.flush()
    os._exit(0)


# -- parent ----------------------------------------------------------------------------------------


class Child:
    """One child process and its requests (one at a time)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.next_id = 0
        self.lock = asyncio.Lock()
        self.waiting = False

    async def ask(self, op: str, timeout: float = ANSWER_S, **body: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self.lock:
            self.next_id += 1
            req = {"id": self.next_id, "op": op, **body}
            self.waiting = True  # until its answer is read (not if given up)
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            async with asyncio.timeout(timeout):
                await self.proc.stdin.drain()
                line = await self.proc.stdout.readline()
            self.waiting = False
        if not line:
            raise RuntimeError(f"room25 child {self.proc.pid} exited ({op})")
        res: dict[str, Any] = json.loads(line)
        if res.get("id") != req["id"] or not res.get("ok"):
            raise RuntimeError(f"room25 child {self.proc.pid}: {op} failed: {res}")
        return res


class Children:
    """The load-generator processes of one 25-person room: participant ``i`` lives in child
    ``i % procs`` (so consecutive publishers, and the renegotiations each one brings, are
    spread over every process)."""

    def __init__(self, url: str, room: str, n: int, procs: int) -> None:
        self.url = url
        self.room = room
        self.n = n
        self.procs = max(1, min(procs, n))
        self.children: list[Child] = []

    def of(self, index: int) -> Child:
        return self.children[index % self.procs]

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children]

    async def start(self) -> None:
        for _ in range(self.procs):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                SCRIPT,
                "--url",
                self.url,
                "--room",
                self.room,
                "--n",
                str(self.n),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
            )
            self.children.append(Child(proc))

    async def all(self, op: str, timeout: float = ANSWER_S, **body: Any) -> list[dict[str, Any]]:
        """``op`` to every child at once; their answers in order."""
        return list(await asyncio.gather(*(c.ask(op, timeout, **body) for c in self.children)))

    async def set_up(
        self, server_drops: Callable[[], int], server_cpu: Callable[[], float]
    ) -> list[str]:
        """Each participant joins and publishes in turn, then everyone shows its tiles; the
        participants' ids by index. ``server_drops``: datagrams the server's sockets dropped
        so far; ``server_cpu``: its CPU seconds so far (both printed at each step)."""
        pids: list[str] = []
        drops, dropping = server_drops(), time.monotonic()
        for i in range(self.n):
            cpu0, wall0 = server_cpu(), time.monotonic()
            # one at a time, joining just before publishing, as the room of 10: each publish
            # renegotiates everyone's subscriber connection. Each step waits (bounded) for the
            # publisher's connection and for everyone's answer, then (CALM_S) for every
            # child's loop to be calm and the server's sockets to have dropped nothing.
            t0 = time.monotonic()
            pids.append((await self.of(i).ask("publish", index=i))["pid"])
            t1 = time.monotonic()
            done = await self.all("settled", pid=pids[i], index=i, pids=pids)
            t2 = time.monotonic()
            while True:
                st = await self.status()
                now = time.monotonic()
                if server_drops() != drops:  # the server is behind: its sockets overflow
                    drops, dropping = server_drops(), now
                loops, sockets = min(r["calm_s"] for r in st), now - dropping
                if min(loops, sockets) >= CALM_S or now - t2 > CALM_WAIT_S:
                    break
                await asyncio.sleep(CALM_POLL_S)
            subs = [s for r in st for s in r["subs"].values()]
            print(
                f"room25: participant {i} publishes ({t1 - t0:.1f} s, settled "
                f"{'' if all(d['done'] for d in done) else 'NOT '}in {t2 - t1:.1f} s, then "
                f"{time.monotonic() - t2:.1f} s until loops calm {loops:.1f} s and server "
                f"sockets {sockets:.1f} s); publishers connected "
                f"{sum(r['pubs_connected'] for r in st)} of {i + 1}, subscribers "
                f"{sum(s['connected'] for s in subs)} of {len(subs)}, media_failed "
                f"{sum(len(r['failed']) for r in st)}, server UDP drops {drops}, server CPU "
                f"{(server_cpu() - cpu0) / (time.monotonic() - wall0):.0%}",
                flush=True,
            )
        shown = await self.all("show", timeout=TRACKS_WAIT_S + ANSWER_S, pids=pids)
        lacking = [i for r in shown for i in r["lacking"]]
        if lacking:
            print(f"room25: {len(lacking)} subscribers still lack tracks: {lacking}", flush=True)
        print("room25: everyone shows its videos", flush=True)
        return pids

    async def status(self) -> list[dict[str, Any]]:
        return await self.all("status")

    async def close(self) -> None:
        """Ask every idle child to close (bounded), end the others (a request of theirs was
        given up: interrupted, or timed out), then kill whatever is left."""
        idle = [c for c in self.children if not c.waiting]
        for c in self.children:
            if c.waiting:
                c.proc.terminate()
        try:
            await asyncio.gather(*(c.ask("close", 40) for c in idle))
        except (RuntimeError, TimeoutError) as e:
            print(f"room25: closing the children: {e!r}", flush=True)
        for c in self.children:
            try:
                await asyncio.wait_for(c.proc.wait(), 10)
            except TimeoutError:
                c.proc.kill()
                await c.proc.wait()

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    async def _sent(self) -> list[int]:
        by_index = {int(i): v for r in await self.all("sent") for i, v in r["sent"].items()}
        return [by_index[i] for i in range(self.n)]

    async def _counts(self) -> tuple[list[list[Snapshot]], list[list[str]]]:
        by_index = {int(i): v for r in await self.all("counts") for i, v in r["counts"].items()}
        rows = [by_index[i] for i in range(self.n)]
        snaps = [[(x[1], x[2], x[3], x[4]) for x in r] for r in rows]
        return snaps, [[x[0] for x in r] for r in rows]

    async def measure(self, seconds: float, pids: dict[str, list[int]]) -> Window:
        """``sfu_load.measure`` with the publishers and subscribers in the children: the load
        generator's CPU and UDP drops are the children's (summed); no expected counts (the
        SFU chooses each subscriber's layers: loss is counted by sequence numbers)."""
        return await measure_window(
            seconds, pids, self.pids(), self._sent, self._counts, lambda _: [0] * self.n
        )


if __name__ == "__main__":
    sys.exit(main())
