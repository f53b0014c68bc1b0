"""SFU forwarding cost: Rallypoint vs Janus VideoRoom vs aiortc's MediaRelay, in one run.

One publisher sends a pre-encoded 640x480 VP8 stream (~800 kbps) plus Opus to N subscribers
(N = 1, 4, 16, 32 by default) through each server in turn. All clients are aiortc peers in this
process that do not decode (they count packets, see ``bench/sfu_load.py``); WebRTC runs over
this machine's own non-loopback address because aioice ignores 127.0.0.1. For each N the
benchmark measures the server processes' own CPU (user + system, all threads, from /proc; not
the clients') and every subscriber's received packets, bitrate, frame rate and loss, and fits
the marginal CPU cost per forwarded packet (slope of CPU against forwarded packets over N).

- Rallypoint: ``python -m signaling serve`` with one SFU worker process (``sfu.worker``); its
  CPU is the signaling process's plus the worker's.
- Janus 1.1.2 VideoRoom (``apt-get install janus``), configured as ``bench/sfu_janus.py`` says,
  with ``event_loops`` = number of cores.
- MediaRelay (``bench/sfu_relay.py``): decode once, encode per subscriber. It saturates early,
  so its N stops at 8 and its cost is fitted only where it keeps up (>= 90% of the frames).

Then a room of 10 participants who all publish and subscribe (90 forwarded streams of each
kind), on Rallypoint and on Janus. With ``--room25``, a 25-person simulcast room on Rallypoint
(``bench/sfu_room25.py``), its participants in ``--room25-procs`` (5) load-generator child
processes (``bench/sfu_room25_procs.py``; the load generator's CPU is theirs, summed).

    .venv/bin/python bench/sfu.py [--quick] [--servers rallypoint,janus,mediarelay]
                                  [--ns 1,4,16,32] [--window 15] [--no-record]
    .venv/bin/python bench/sfu.py --server-path DIR [--rounds 3] [--ns 16]

With ``--server-path DIR`` the run compares this checkout's Rallypoint ("rallypoint") with
another one ("base", e.g. the previous commit: ``git worktree add DIR HEAD~1``): both run side
by side, and each round measures every scenario on both, in turns whose order alternates from
round to round (this machine's speed drifts within minutes); the final JSON line has the
per-round ratios and their median (``ab``).

Prints a table and a final JSON line ``{"us_per_packet": {"rallypoint": x, "janus": y,
"mediarelay": z}, "ratio_vs_janus": x/y, "ratio_vs_mediarelay": x/z, "room10_loss": l,
"join_first_frame_ms_median": j, "layer_switch_freeze_ms_max": f, ...}`` (``f``: the longest
pause between decoded frames at a forced simulcast layer switch, ``bench/sfu_switch.py``)
and (full runs only) records the figures in the SFU section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ``python bench/sfu.py`` puts bench/ first on sys.path, where bench/signaling.py would shadow
# the ``signaling`` package: look in the project first and in bench/ (helpers) last.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _BENCH] + [_BENCH]
sys.path.insert(0, str(Path(_BENCH).parent))

import aiohttp  # noqa: E402
import aioice.ice  # noqa: E402
import aiortc  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from procs import free_port, spawn, stop, wait_http  # noqa: E402
from sfu_janus import ROOM as JANUS_ROOM  # noqa: E402
from sfu_janus import Session as JanusSession  # noqa: E402
from sfu_janus import has_jsep, joined  # noqa: E402
from sfu_join import join_first_frame_ms  # noqa: E402
from sfu_load import (  # noqa: E402
    LAG_S,
    Publisher,
    Subscriber,
    Window,
    children,
    count_receiver,
    cpu_seconds,
    enlarge_own_udp_buffers,
    measure,
    peer_connection,
    udp_drops,
    vp8_only,
)
from sfu_room25 import ROOM25_SIZE, SHOWN  # noqa: E402
from sfu_room25_procs import ROOM25_PROCS, Children  # noqa: E402
from sfu_switch import layer_switch_freeze_ms  # noqa: E402

from media.session import SfuSession  # noqa: E402
from media.tracks import attach_keyframe_requests  # noqa: E402
from signaling.sdk.wsclient import Client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SETUP_TIMEOUT_S = 90  # per scenario: connecting every client and the first frames
CONCURRENCY = 8  # clients being set up at once
RELAY_MAX_N = 8
ROOM_SIZE = 10
KEEPS_UP = 0.9  # share of the publisher's frame rate a server must deliver to "keep up"


# -- helpers ---------------------------------------------------------------------------------------


def host_ip() -> str:
    """This machine's own non-loopback IPv4 address (the one aioice gathers)."""
    addrs = aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False)
    if not addrs:
        raise SystemExit("bench/sfu.py needs a non-loopback IPv4 address (aioice ignores lo)")
    return str(addrs[0])


async def bounded(jobs: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``jobs`` with at most ``CONCURRENCY`` at once, in order of results."""
    sem = asyncio.Semaphore(CONCURRENCY)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with sem:
            return await job()

    return await asyncio.gather(*(one(j) for j in jobs))


async def wait_flowing(subscribers: list[Subscriber], videos: int) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while not all(s.ready(videos) for s in subscribers):
        if time.monotonic() > deadline:
            late = [
                (s.name, sum(c.packets > 30 for c in s.counts.values() if c.kind == "video"))
                for s in subscribers
                if not s.ready(videos)
            ]
            raise RuntimeError(
                f"{len(late)} subscribers lack media ((name, live videos of {videos})): {late[:5]}"
            )
        await asyncio.sleep(0.2)


@dataclass
class Scenario:
    publishers: list[Publisher]
    subscribers: list[Subscriber]
    sources: list[list[int]]  # per subscriber: indexes of the publishers it receives
    videos: int  # video tracks each subscriber receives
    close: Callable[[], Awaitable[None]]


# -- servers ---------------------------------------------------------------------------------------


class ServerProcess:
    """A server under test that runs as one child process (``start`` sets ``proc``)."""

    name = "server"
    proc: subprocess.Popen[bytes] | None = None

    def pids(self) -> dict[str, list[int]]:
        assert self.proc is not None
        return {self.name: [self.proc.pid]}

    async def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class Rallypoint(ServerProcess):
    name = "rallypoint"

    def __init__(self, tmp: Path, path: Path | None = None, name: str = "rallypoint") -> None:
        self.name = name
        self.path = path  # another checkout to run (``--server-path``), else this one
        self.tmp = tmp
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.proc: subprocess.Popen[bytes] | None = None
        self.rooms = 0
        self.room25_complete: int | None = None
        self.room25_tracks_gone: int | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "RALLYPOINT_TURN_ENABLED": "false",
            "RALLYPOINT_SFU_WORKERS": "1",
            "RALLYPOINT_LIMITS_RATE_PER_S": "1000",
            "RALLYPOINT_LIMITS_BURST": "1000",
            "RALLYPOINT_ROOMS_MAX_PARTICIPANTS": "100",
        }
        if self.path is not None:  # `python -m` looks in the working directory first
            env["PYTHONPATH"] = str(self.path)
        cmd = [PY, "-m", "signaling", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.tmp / f"{self.name}-data")]
        self.proc = spawn(cmd, self.tmp / f"{self.name}.log", env, cwd=self.path or ROOT)
        await wait_http(f"http://127.0.0.1:{self.port}/healthz", self.proc)
        deadline = time.monotonic() + 20
        while not self.workers():
            if time.monotonic() > deadline:
                raise RuntimeError("no SFU worker process appeared")
            await asyncio.sleep(0.2)

    def workers(self) -> list[int]:
        assert self.proc is not None
        out = []
        for pid in children(self.proc.pid):
            try:
                if b"sfu.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    out.append(pid)
            except OSError:
                continue
        return out

    def pids(self) -> dict[str, list[int]]:
        assert self.proc is not None
        return {"signaling": [self.proc.pid], "sfu worker": self.workers()}

    async def _participant(
        self, room: str, name: str, publisher: Publisher | None
    ) -> tuple[Client, SfuSession, Subscriber]:
        c = Client(self.url)
        await c.connect(name=name, identity=name)
        sub = Subscriber(name)
        s = SfuSession(c, room, decode=False)

        def on_track(tid: str, track: Any) -> None:
            assert s.sub is not None
            for t in s.sub.getTransceivers():
                if t.receiver.track is track:
                    count_receiver(t.receiver, sub.track(tid, track.kind))

        s.on_track = on_track
        await c.request({"type": "join", "room": room})
        if publisher is not None:
            trs = await s.publish([(publisher.video, "camera"), (publisher.audio, "microphone")])
            attach_keyframe_requests(trs[0].sender, publisher.video)
            publisher.senders = [tr.sender for tr in trs]
        return c, s, sub

    async def broadcast(self, n: int) -> Scenario:
        self.rooms += 1
        room = f"bench-{self.rooms}"
        pub = Publisher.make(1)
        parts = [await self._participant(room, "publisher", pub)]
        parts += await bounded(
            [
                lambda i=i: self._participant(room, f"subscriber-{i}", None)  # type: ignore[misc]
                for i in range(n)
            ]
        )

        async def close() -> None:
            for c, s, _ in parts:
                await s.close()
                await c.close()

        return Scenario([pub], [p[2] for p in parts[1:]], [[0]] * n, 1, close)

    async def room(self, k: int, record: bool = False) -> Scenario:
        """``k`` participants who all publish and subscribe; ``record``: the first (the room's
        moderator: it joined first) records the room, every track, once media flows."""
        self.rooms += 1
        room = f"bench-{self.rooms}"
        pubs = [Publisher.make(i + 1) for i in range(k)]
        parts = []
        for i, pub in enumerate(pubs):  # one at a time: each publish renegotiates the others
            parts.append(await self._participant(room, f"participant-{i}", pub))
        if record:
            await parts[0][0].request({"type": "recording_start", "room": room})

        async def close() -> None:
            for c, s, _ in parts:
                await s.close()
                await c.close()

        sources = [[j for j in range(k) if j != i] for i in range(k)]
        return Scenario(pubs, [p[2] for p in parts], sources, k - 1, close)

    async def room25(self, args: argparse.Namespace) -> Run:
        """The 25-participant simulcast room (``bench/sfu_room25.py``), its participants in
        ``--room25-procs`` load-generator processes (``bench/sfu_room25_procs.py``), measured
        once."""
        self.rooms += 1
        room = f"bench-{self.rooms}"
        started = time.monotonic()
        n = args.room25_size
        kids = Children(self.url, room, n, args.room25_procs)
        extra: dict[str, Any] = {"room25_loadgen_procs": kids.procs}
        try:  # started inside: an interrupted start-up ends the children it began
            await kids.start()
            server = [p for ps in self.pids().values() for p in ps]
            await asyncio.wait_for(
                kids.set_up(lambda: udp_drops(server), lambda: sum(cpu_seconds(p) for p in server)),
                1800,  # 25 steps of at most ~SETTLE_S + CALM_WAIT_S
            )
            extra["room25_loadgen_lag_setup"] = lag_summary(await kids.all("lag"))
            deadline = time.monotonic() + SETUP_TIMEOUT_S
            shown = min(SHOWN, n - 1)
            while True:  # every subscriber's shown videos flowing, every track known
                st = await kids.status()
                subs = {int(i): s for r in st for i, s in r["subs"].items()}
                late = sorted(i for i, s in subs.items() if not (s["flowing"] and s["known"]))
                if not late or time.monotonic() > deadline:
                    break
                print(f"room25: waiting for the videos of {len(late)} subscribers", flush=True)
                await asyncio.sleep(1.0)
            # measured as they are: how many get all their videos is part of the result
            self.room25_complete = n - len(late)
            print(f"room25: {self.room25_complete} of {n} subscribers get their {shown} videos")
            # Tracks the room lost during the set-up (a publisher's connection failed, and the
            # server unpublished its tracks): the room is then lighter than 25 publishers.
            gone = {t for r in st for t in r["gone"]}
            self.room25_tracks_gone = len(gone)
            failed = [f for r in st for f in r["failed"]]
            extra["room25_media_failed"] = len(failed)
            if gone:
                print(
                    f"room25: {len(gone)} of {2 * (n - 1) + 2} tracks were unpublished during "
                    f"the set-up (media_failed: {failed}): this room carries less than the "
                    "target's load",
                    flush=True,
                )
            await kids.all("buffers")
            setup_s = time.monotonic() - started
            extra["room25_setup_s"] = round(setup_s)
            # the subscribers' REMBs move them to their tiles' layer (2 s below, then a switch)
            await asyncio.sleep(max(args.warmup, 8.0))
            await kids.all("lag")  # from here: the window's
            w = await kids.measure(args.window, self.pids())
            extra["room25_loadgen_lag_window"] = lag_summary(await kids.all("lag"))
        finally:
            await kids.close()
            await asyncio.sleep(LAG_S)
        extra["room25_loadgen_cpu_pct"] = round(w.load_cpu / w.seconds * 100, 1)
        run = Run(self.name, "room25", n, w, self.room25_complete, self.room25_tracks_gone, extra)
        print_run(run, setup_s)
        print(f"room25: load generators {extra}", flush=True)
        return run


def lag_summary(lags: list[dict[str, Any]]) -> dict[str, Any]:
    """The children's event-loop lags (``sfu_room25_procs.LagMonitor``): the longest, and
    how many passed 0.5 s (the answer time of the server's ICE consent checks)."""
    return {
        "max_s": max(x["max_s"] for x in lags),
        "over_0_5_s": sum(x["over_0_5_s"] for x in lags),
    }


class Janus(ServerProcess):
    name = "janus"

    def __init__(self, tmp: Path, ip: str) -> None:
        self.folder = tmp / "janus"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/janus"
        self.ip = ip
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        import sfu_janus

        sfu_janus.write_config(self.folder, self.port, self.ip, os.cpu_count() or 1)
        self.proc = sfu_janus.start(self.folder)
        await sfu_janus.wait_ready(self.base, self.proc)

    async def _publish(
        self, session: JanusSession, pub: Publisher, pcs: list[RTCPeerConnection]
    ) -> int:
        handle = await session.attach()
        body = {"request": "join", "ptype": "publisher", "room": JANUS_ROOM}
        await session.message(handle, {**body, "display": f"p{pub.index}"})
        feed: int = (await session.event(handle, joined))["plugindata"]["data"]["id"]
        pc = peer_connection()
        pcs.append(pc)
        video = pc.addTransceiver(pub.video, direction="sendonly")
        video.setCodecPreferences(vp8_only("video"))
        audio = pc.addTransceiver(pub.audio, direction="sendonly")
        audio.setCodecPreferences(vp8_only("audio"))
        attach_keyframe_requests(video.sender, pub.video)
        pub.senders = [video.sender, audio.sender]
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        jsep = {"type": "offer", "sdp": pc.localDescription.sdp, "trickle": False}
        await session.message(handle, {"request": "publish"}, jsep)
        answer = (await session.event(handle, has_jsep))["jsep"]
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        # The feed can be subscribed to once its PeerConnection is up.
        await session.event(handle, lambda ev: ev.get("janus") == "webrtcup")
        return feed

    async def _subscribe(
        self, session: JanusSession, name: str, feeds: list[int], pcs: list[RTCPeerConnection]
    ) -> Subscriber:
        handle = await session.attach()
        streams = [{"feed": f} for f in feeds]
        body = {"request": "join", "ptype": "subscriber", "room": JANUS_ROOM, "streams": streams}
        await session.message(handle, body)
        offer = (await session.event(handle, has_jsep))["jsep"]
        pc = peer_connection()
        pcs.append(pc)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        sub = Subscriber(name)
        for t in pc.getTransceivers():
            if t.kind in ("audio", "video"):
                count_receiver(t.receiver, sub.track(str(t.mid), t.kind))
        await pc.setLocalDescription(await pc.createAnswer())
        assert pc.localDescription is not None
        jsep = {"type": "answer", "sdp": pc.localDescription.sdp, "trickle": False}
        await session.message(handle, {"request": "start"}, jsep)
        return sub

    async def _scenario(self, k: int, n: int) -> Scenario:
        """``k`` publishers; with ``n`` > 0, ``n`` subscribers of publisher 0, else a room where
        every publisher subscribes to all the others."""
        session = JanusSession(self.base)
        await session.create()
        pcs: list[RTCPeerConnection] = []
        pubs = [Publisher.make(i + 1) for i in range(k)]
        feeds = [await self._publish(session, p, pcs) for p in pubs]
        if n:
            sources = [[0]] * n
        else:
            sources = [[j for j in range(k) if j != i] for i in range(k)]
        subs = await bounded(
            [
                lambda i=i, src=src: self._subscribe(  # type: ignore[misc]
                    session, f"subscriber-{i}", [feeds[j] for j in src], pcs
                )
                for i, src in enumerate(sources)
            ]
        )

        async def close() -> None:
            await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
            await session.destroy()

        return Scenario(pubs, subs, sources, len(sources[0]), close)

    async def broadcast(self, n: int) -> Scenario:
        return await self._scenario(1, n)

    async def room(self, k: int) -> Scenario:
        return await self._scenario(k, 0)


class MediaRelayServer(ServerProcess):
    name = "mediarelay"

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        cmd = [PY, str(Path(__file__).with_name("sfu_relay.py")), "--port", str(self.port)]
        self.proc = spawn(cmd, self.tmp / "mediarelay.log", dict(os.environ), ROOT)
        await wait_http(f"{self.base}/ready", self.proc)

    async def _exchange(
        self, http: aiohttp.ClientSession, path: str, pc: RTCPeerConnection
    ) -> None:
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        offer = {"sdp": pc.localDescription.sdp, "type": "offer"}
        async with http.post(self.base + path, json=offer) as r:
            answer = await r.json()
        await pc.setRemoteDescription(RTCSessionDescription(**answer))

    async def broadcast(self, n: int) -> Scenario:
        http = aiohttp.ClientSession()
        pcs: list[RTCPeerConnection] = []
        pub = Publisher.make(1)
        pc = peer_connection()
        pcs.append(pc)
        video = pc.addTransceiver(pub.video, direction="sendonly")
        video.setCodecPreferences(vp8_only("video"))
        audio = pc.addTransceiver(pub.audio, direction="sendonly")
        audio.setCodecPreferences(vp8_only("audio"))
        attach_keyframe_requests(video.sender, pub.video)
        pub.senders = [video.sender, audio.sender]
        await self._exchange(http, "/publish", pc)

        async def subscriber(i: int) -> Subscriber:
            pc = peer_connection()
            pcs.append(pc)
            sub = Subscriber(f"subscriber-{i}")
            for kind in ("video", "audio"):
                t = pc.addTransceiver(kind, direction="recvonly")
                t.setCodecPreferences(vp8_only(kind))
                count_receiver(t.receiver, sub.track(kind, kind))
            await self._exchange(http, "/subscribe", pc)
            return sub

        subs = await bounded([lambda i=i: subscriber(i) for i in range(n)])  # type: ignore[misc]

        async def close() -> None:
            await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
            async with http.post(self.base + "/reset") as r:
                await r.read()
            await http.close()

        return Scenario([pub], subs, [[0]] * n, 1, close)


Server = Rallypoint | Janus | MediaRelayServer


# -- runs ------------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    scenario: str  # "N=4" or "room10"
    n: int  # subscribers (broadcast) or participants (room)
    window: Window
    complete: int | None = None  # room25: subscribers that got all their videos
    tracks_gone: int | None = None  # room25: tracks unpublished during the set-up
    extra: dict[str, Any] = field(default_factory=dict)  # room25: the load generators' figures

    @property
    def cpu_pct(self) -> float:
        return self.window.server_cpu_total / self.window.seconds * 100

    @property
    def us_per_packet(self) -> float:
        fwd = self.window.forwarded
        return self.window.server_cpu_total / fwd * 1e6 if fwd else float("nan")

    @property
    def pps(self) -> float:
        return self.window.forwarded / self.window.seconds

    def keeps_up(self, fps: float) -> bool:
        return self.window.fps() >= KEEPS_UP * fps

    @property
    def by_seq(self) -> bool:
        """Loss from sequence gaps: MediaRelay sends packets of its own encoder, and in the
        simulcast room a subscriber's layer (and so the packets it should get) is the SFU's
        choice."""
        return self.server == "mediarelay" or self.scenario == "room25"

    def loss(self) -> float:
        return self.window.seq_loss() if self.by_seq else self.window.loss()

    def worst_loss(self) -> float:
        return self.window.worst_seq_loss() if self.by_seq else self.window.worst_loss()

    def row(self) -> dict[str, Any]:
        w = self.window
        loss, worst = self.loss(), self.worst_loss()
        return {
            "server": self.server,
            "scenario": self.scenario,
            "server_cpu_pct": {k: round(v / w.seconds * 100, 1) for k, v in w.server_cpu.items()},
            "us_per_packet": round(self.us_per_packet, 1),
            "forwarded_pps": round(self.pps),
            "video_kbps": round(w.video_kbps()),
            "fps": round(w.fps(), 1),
            "loss": round(loss, 4),
            "worst_loss": round(worst, 4),
            "seq_loss": round(w.seq_loss(), 4),
            "loadgen_cpu_pct": round(w.load_cpu / w.seconds * 100, 1),
            "udp_drops": {"server": w.server_drops, "load_generator": w.load_drops},
            "other_processes_cpu_pct": round(w.other_cpu / w.seconds * 100),
        }


def slope_us(runs: list[Run]) -> float | None:
    """Least-squares slope of server CPU (s/s) against forwarded packets/s, in us per packet."""
    if len(runs) < 2:
        return None
    xs = [r.pps for r in runs]
    ys = [r.window.server_cpu_total / r.window.seconds for r in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 1e6


async def run_one(
    server: Server, scenario: str, n: int, make: Awaitable[Scenario], args: argparse.Namespace
) -> Run:
    started = time.monotonic()
    sc = await asyncio.wait_for(make, SETUP_TIMEOUT_S)
    try:
        await wait_flowing(sc.subscribers, sc.videos)
        enlarge_own_udp_buffers()
        setup_s = time.monotonic() - started
        await asyncio.sleep(args.warmup)
        w = await measure(args.window, server.pids(), sc.publishers, sc.subscribers, sc.sources)
    finally:
        await asyncio.wait_for(sc.close(), 30)
        await asyncio.sleep(1)  # let the server tear the connections down
    run = Run(server.name, scenario, n, w)
    print_run(run, setup_s)
    return run


def print_run(run: Run, setup_s: float) -> None:
    r = run.row()
    print(
        f"{run.server:>10} {run.scenario:>7}: cpu {run.cpu_pct:5.1f}% {r['server_cpu_pct']}, "
        f"{r['us_per_packet']:6.1f} us/pkt, {r['forwarded_pps']:5d} pkt/s, "
        f"{r['video_kbps']} kbps {r['fps']} fps per video, loss {r['loss']:.2%} "
        f"(worst {r['worst_loss']:.2%}, seq {r['seq_loss']:.2%}), "
        f"load-gen {r['loadgen_cpu_pct']}%, udp drops {r['udp_drops']}, "
        f"other processes {r['other_processes_cpu_pct']}%, setup {setup_s:.1f} s",
        flush=True,
    )


async def bench(args: argparse.Namespace, tmp: Path) -> list[Run]:
    runs: list[Run] = []
    if not args.only_recording:
        runs += await bench_servers(args, tmp)
    if args.recording_rounds > 0 and "rallypoint" in args.servers:
        runs += await bench_recording(args, tmp)
    return runs


async def bench_servers(args: argparse.Namespace, tmp: Path) -> list[Run]:
    ip = host_ip()
    servers: list[Server] = []
    for name in args.servers:
        if name == "rallypoint":
            servers.append(Rallypoint(tmp))
        elif name == "janus":
            servers.append(Janus(tmp, ip))
        elif name == "mediarelay":
            servers.append(MediaRelayServer(tmp))
    runs: list[Run] = []
    for server in servers:
        try:  # started inside: an interrupted start-up stops what it began
            await server.start()
            ns = args.ns
            if isinstance(server, MediaRelayServer):
                ns = [n for n in ns if n <= RELAY_MAX_N] + ([] if args.quick else [2, 8])
                ns = sorted(set(ns))
            for n in ns:
                runs.append(await run_one(server, f"N={n}", n, server.broadcast(n), args))
            if args.room and not isinstance(server, MediaRelayServer):
                runs.append(
                    await run_one(server, "room10", ROOM_SIZE, server.room(ROOM_SIZE), args)
                )
            if args.room25 and isinstance(server, Rallypoint):
                runs.append(await server.room25(args))
        finally:
            await server.stop()
    return runs


async def bench_ab(args: argparse.Namespace, tmp: Path) -> list[Run]:
    """This checkout against ``--server-path``, both running, scenarios in alternating turns.

    A scenario whose set-up fails (a request unanswered, media not flowing in time) is reported
    and counted in ``FAILURES``; that server is restarted and the scenario tried once more."""
    a = Rallypoint(tmp)
    b = Rallypoint(tmp, args.server_path, "base")
    runs: list[Run] = []

    async def measured(server: Rallypoint, scenario: str, n: int) -> None:
        for attempt in (1, 2):
            make = server.room(n) if scenario == "room10" else server.broadcast(n)
            try:
                runs.append(await run_one(server, scenario, n, make, args))
                return
            except (TimeoutError, RuntimeError) as e:
                FAILURES.append({"server": server.name, "scenario": scenario, "error": repr(e)})
                print(f"{server.name} {scenario}: set-up failed ({e!r}); restarting it", flush=True)
                await server.stop()
                await server.start()
                if attempt == 2:
                    raise

    try:  # started inside: an interrupted start-up stops what it began
        await a.start()
        try:
            await b.start()
            for rnd in range(args.rounds):
                order = [a, b] if rnd % 2 == 0 else [b, a]
                print(f"round {rnd + 1}/{args.rounds}: {', '.join(s.name for s in order)}")
                for n in args.ns:
                    for server in order:
                        await measured(server, f"N={n}", n)
                if args.room:
                    for server in order:
                        await measured(server, "room10", ROOM_SIZE)
        finally:
            await b.stop()
    finally:
        await a.stop()
    return runs


async def bench_recording(args: argparse.Namespace, tmp: Path) -> list[Run]:
    """The 10-person room with and without recording on one server, in turns whose order
    alternates from round to round (this machine's speed drifts within minutes)."""
    server = Rallypoint(tmp)
    runs: list[Run] = []
    try:  # started inside: an interrupted start-up stops what it began
        await server.start()
        for rnd in range(args.recording_rounds):
            order = (False, True) if rnd % 2 == 0 else (True, False)
            print(f"recording round {rnd + 1}/{args.recording_rounds}", flush=True)
            for rec in order:
                scenario = "room10rec" if rec else "room10"
                runs.append(
                    await run_one(server, scenario, ROOM_SIZE, server.room(ROOM_SIZE, rec), args)
                )
    finally:
        await server.stop()
    for r in runs:  # kept apart from the other servers' room10 rows
        r.server = "rallypoint-rec"
    return runs


def summarize_recording(runs: list[Run]) -> dict[str, Any]:
    """Per round: the extra server CPU of the recorded room as a share of the unrecorded one's,
    and CPU per forwarded packet with and without; medians over rounds."""
    plain = [r for r in runs if r.server == "rallypoint-rec" and r.scenario == "room10"]
    rec = [r for r in runs if r.server == "rallypoint-rec" and r.scenario == "room10rec"]
    if not plain or not rec:
        return {}
    overheads = [(b.cpu_pct - a.cpu_pct) / a.cpu_pct for a, b in zip(plain, rec, strict=False)]
    return {
        "recording_cpu_overhead": round(statistics.median(overheads), 3),
        "recording_cpu_overheads": [round(x, 3) for x in overheads],
        "room10_us_per_packet_unrecorded": round(
            statistics.median(r.us_per_packet for r in plain), 1
        ),
        "room10_us_per_packet_recorded": round(statistics.median(r.us_per_packet for r in rec), 1),
        "room10_cpu_pct_unrecorded": round(statistics.median(r.cpu_pct for r in plain), 1),
        "room10_cpu_pct_recorded": round(statistics.median(r.cpu_pct for r in rec), 1),
        "room10_loss_recorded": round(max(r.window.loss() for r in rec), 4),
    }


FAILURES: list[dict[str, str]] = []


def summarize_ab(runs: list[Run]) -> dict[str, Any]:
    """Per scenario: us per forwarded packet of each side in each round, the per-round ratios
    (this checkout / base) and their median."""
    out: dict[str, Any] = {}
    for scenario in dict.fromkeys(r.scenario for r in runs):
        mine = [r for r in runs if r.scenario == scenario and r.server == "rallypoint"]
        base = [r for r in runs if r.scenario == scenario and r.server == "base"]
        ratios = [m.us_per_packet / b.us_per_packet for m, b in zip(mine, base, strict=True)]
        out[scenario] = {
            "us_per_packet": [round(r.us_per_packet, 1) for r in mine],
            "us_per_packet_base": [round(r.us_per_packet, 1) for r in base],
            "loss": [round(r.window.loss(), 4) for r in mine],
            "loss_base": [round(r.window.loss(), 4) for r in base],
            "ratios": [round(x, 3) for x in ratios],
            "ratio_median": round(statistics.median(ratios), 3),
        }
    return out


# -- report ----------------------------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, Any]:
    fps = 30.0
    out: dict[str, Any] = {"us_per_packet": {}, "us_per_packet_mean": {}, "kept_up_to": {}}
    for name in ("rallypoint", "janus", "mediarelay"):
        mine = [r for r in runs if r.server == name and r.scenario.startswith("N=")]
        good = [r for r in mine if r.keeps_up(fps)]
        if not good:
            continue
        slope = slope_us(good)
        out["us_per_packet"][name] = round(
            slope if slope is not None else good[-1].us_per_packet, 1
        )
        out["us_per_packet_mean"][name] = {r.scenario: round(r.us_per_packet, 1) for r in mine}
        out["kept_up_to"][name] = max(r.n for r in good)
    us = out["us_per_packet"]
    if "rallypoint" in us and "janus" in us:
        out["ratio_vs_janus"] = round(us["rallypoint"] / us["janus"], 2)
    if "rallypoint" in us and "mediarelay" in us:
        out["ratio_vs_mediarelay"] = round(us["rallypoint"] / us["mediarelay"], 3)
    out.update(summarize_recording(runs))
    room10: dict[str, Run] = {}
    for r in runs:
        if r.scenario == "room10" and r.server != "rallypoint-rec":
            key = "room10_loss" if r.server == "rallypoint" else f"room10_loss_{r.server}"
            out[key] = round(r.window.loss(), 4)
            out[f"room10_cpu_pct_{r.server}"] = round(r.cpu_pct, 1)
            out[f"room10_us_per_packet_{r.server}"] = round(r.us_per_packet, 1)
            room10[r.server] = r
        if r.scenario == "room25":
            out["room25_subscribers_complete"] = r.complete
            out["room25_tracks_gone"] = r.tracks_gone
            out["room25_loss"] = round(r.worst_loss(), 4)  # the worst subscriber's
            out["room25_loss_mean"] = round(r.loss(), 4)
            out["room25_server_cpu_pct"] = round(r.cpu_pct, 1)
            out["room25_forwarded_pps"] = round(r.pps)
            out["room25_us_per_packet"] = round(r.us_per_packet, 1)
            out["room25_video_kbps"] = round(r.window.video_kbps())
            out["room25_fps"] = round(r.window.fps(), 1)
            out.update(r.extra)
    if "rallypoint" in room10 and "janus" in room10:
        ratio = room10["rallypoint"].us_per_packet / room10["janus"].us_per_packet
        out["room10_ratio_vs_janus"] = round(ratio, 2)
    out["runs"] = [r.row() for r in runs]
    return out


def table(runs: list[Run]) -> str:
    lines = [
        "| server | load | server CPU (% of a core) | us / forwarded packet | forwarded packets/s "
        "| video kbps, fps per subscriber | loss (worst subscriber) | UDP drops server/clients "
        "| load generator CPU | other processes CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        w = r.window
        parts = " + ".join(f"{v / w.seconds * 100:.1f}" for v in w.server_cpu.values())
        cpu = f"{r.cpu_pct:.1f}" + (f" ({parts})" if len(w.server_cpu) > 1 else "")
        load = f"{r.n} x {r.n - 1}" if r.scenario.startswith("room10") else f"1 -> {r.n}"
        if r.scenario == "room25":
            load = f"{r.n} x ({SHOWN} videos + {r.n - 1} audio), simulcast"
        if r.scenario == "room10rec":
            load += ", recorded"
        loss = f"{r.loss():.2%} ({r.worst_loss():.2%})"
        if r.server == "mediarelay":
            loss = f"{w.seq_loss():.2%} (seq gaps; re-encoded)"
        lines.append(
            f"| {r.server} | {load} | {cpu} | {r.us_per_packet:.1f} | {r.pps:.0f} "
            f"| {w.video_kbps():.0f}, {w.fps():.1f} | {loss} | {w.server_drops}/{w.load_drops} "
            f"| {w.load_cpu / w.seconds * 100:.0f}% | {w.other_cpu / w.seconds * 100:.0f}% |"
        )
    return "\n".join(lines)


def model_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def record(section: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    heading = "## SFU (`bench/sfu.py`)"
    start = text.find(heading)
    if start < 0:
        path.write_text(text.rstrip() + "\n\n" + section.rstrip() + "\n")
        return
    end = text.find("\n## ", start + len(heading))
    end = len(text) if end < 0 else end + 1
    rest = text[end:]
    path.write_text(text[:start] + section.rstrip() + "\n" + ("\n" + rest if rest else ""))


def section(runs: list[Run], summary: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    import sfu_janus

    us = summary["us_per_packet"]
    machine = f"{os.cpu_count()} vCPU, {model_name()}, Linux {platform.release()}"
    versions = (
        f"Python {platform.python_version()}, aiortc {aiortc.__version__}, "
        f"aioice {aioice.__version__}, {sfu_janus.version()}"
    )
    slopes = ", ".join(f"{k} **{v}**" for k, v in us.items())
    others = [r.window.other_cpu / r.window.seconds * 100 for r in runs]
    shared = ""
    if others and max(others) > 20:
        shared = (
            f"\n**Shared machine:** other processes used {min(others):.0f}-{max(others):.0f}% "
            f"(of {os.cpu_count() or 1}00%) during the windows. Loss, frame rates and UDP drops "
            "in such windows reflect CPU starvation of the load generator and the servers as "
            "much as the servers themselves.\n"
        )
    return f"""## SFU (`bench/sfu.py`)

One publisher (pre-encoded 640x480 VP8 at ~800 kbps plus Opus, ~{summary.get("pub_pps", 0):.0f}
packets/s) to N subscribers, then a room of {ROOM_SIZE} who all publish and subscribe. All clients
are aiortc peers in the benchmark process that count packets without decoding; WebRTC runs
over the machine's own address. Server CPU is user + system time of the server processes
(from /proc; Rallypoint: signaling process + its one SFU worker), not the clients'. Windows of
{args.window:.0f} s after {args.warmup:.0f} s of warm-up; servers measured one after another in one
run ({wall / 60:.1f} min).
Machine: {machine}; {versions}. Measured {time.strftime("%Y-%m-%d")}.

{table(runs)}

Marginal CPU per forwarded packet (slope of server CPU against forwarded packets/s over the
N where the server keeps up): {slopes} us.
Ratio Rallypoint / Janus: **{summary.get("ratio_vs_janus")}x**; Rallypoint / MediaRelay:
**{summary.get("ratio_vs_mediarelay")}x**. 10-participant room loss on Rallypoint:
**{summary.get("room10_loss", 0):.2%}**. Loss within +-1% is the window edges' error (send and
receive counts are read 0.25 s apart).
Recording every track of the 10-person room (rows "recorded", measured in alternating turns
with the same room unrecorded, {args.recording_rounds} rounds): extra server CPU
**{summary.get("recording_cpu_overhead", float("nan")):.1%}** of the unrecorded room's (per round:
{summary.get("recording_cpu_overheads")}); per forwarded packet
{summary.get("room10_us_per_packet_unrecorded")} us unrecorded,
{summary.get("room10_us_per_packet_recorded")} us recorded.
{shared}
Janus: `event_loops` = {os.cpu_count()}, VideoRoom and HTTP transport only, ICE on the
machine's address, no STUN, IPv6 off, room bitrate cap 10 Mbps, no periodic keyframe requests.
MediaRelay (`bench/sfu_relay.py`) decodes once and encodes per subscriber (encoder started at
800 kbps); it is run only up to N = {RELAY_MAX_N} and its loss is read from sequence-number gaps,
as its packets are its own.
Reproduce: `.venv/bin/python bench/sfu.py` (`--quick` for N = 1, 4 in under two minutes).
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1, 4 and short windows")
    parser.add_argument("--servers", default="rallypoint,janus,mediarelay")
    parser.add_argument("--ns", default=None, help="subscriber counts (default 1,4,16,32)")
    parser.add_argument("--window", type=float, default=None, help="seconds measured per N")
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--no-room", dest="room", action="store_false")
    parser.add_argument(
        "--room25", action="store_true", help="also the 25-participant simulcast room (Rallypoint)"
    )
    parser.add_argument("--room25-size", type=int, default=ROOM25_SIZE, help=argparse.SUPPRESS)
    parser.add_argument(
        "--room25-procs",
        type=int,
        default=ROOM25_PROCS,
        help=f"load-generator processes of the 25-person room (default {ROOM25_PROCS})",
    )
    parser.add_argument(
        "--no-broadcast", action="store_true", help="skip the 1 -> N runs (rooms only)"
    )
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--recording-rounds",
        type=int,
        default=None,
        help="rounds of the 10-person room recorded vs not (default 2, --quick 1; 0: none)",
    )
    parser.add_argument(
        "--only-recording", action="store_true", help="measure only the recording overhead"
    )
    parser.add_argument(
        "--server-path", help="compare with the Rallypoint checkout in this directory (A/B)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds (with --server-path)")
    parser.add_argument("--keep", action="store_true", help="keep the servers' logs and data")
    args = parser.parse_args()
    if args.server_path:
        args.server_path = Path(args.server_path).resolve()
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - {"rallypoint", "janus", "mediarelay"}
    if unknown:
        parser.error(f"unknown servers: {sorted(unknown)}")
    args.ns = [int(x) for x in (args.ns or ("1,4" if args.quick else "1,4,16,32")).split(",")]
    if args.no_broadcast:
        args.ns = []
    if any(n < 1 or n > 64 for n in args.ns):
        parser.error("N must be 1..64")
    args.window = min(max(args.window or (4.0 if args.quick else 15.0), 1.0), 120.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    if "janus" in args.servers and not shutil.which("janus"):
        print("bench/sfu.py: janus is missing; installing it with apt-get", file=sys.stderr)
        done = subprocess.run(["apt-get", "install", "-y", "janus"], capture_output=True)
        if done.returncode or not shutil.which("janus"):
            print("bench/sfu.py needs Janus: apt-get install janus", file=sys.stderr)
            return 2
    if args.recording_rounds is None:
        args.recording_rounds = 1 if args.quick else 2
    started = time.monotonic()
    run_bench = bench_ab if args.server_path else bench
    with tempfile.TemporaryDirectory(prefix="bench-sfu-") as tmp_dir:
        tmp = tempfile.mkdtemp(prefix="bench-sfu-") if args.keep else tmp_dir
        if args.keep:
            print(f"logs and data in {tmp}", flush=True)
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            runs = asyncio.run(run_bench(args, Path(tmp)))
        else:
            runs = uvloop.run(run_bench(args, Path(tmp)))
    wall = time.monotonic() - started
    if args.server_path:
        print()
        print(table(runs))
        ab = {
            "ab": summarize_ab(runs),
            "rounds": args.rounds,
            "setup_failures": FAILURES,
            "wall_s": round(wall),
        }
        print(json.dumps(ab))
        return 0
    summary = summarize(runs)
    pub = [r.window for r in runs if r.scenario.startswith("N=")]
    summary["pub_pps"] = round(sum(w.sent[0] / w.seconds for w in pub) / len(pub)) if pub else 0
    summary["wall_s"] = round(wall)
    if "rallypoint" in args.servers and args.ns:  # bench/sfu_join.py: the page in Chromium
        summary["join_first_frame_ms_median"] = join_first_frame_ms(3 if args.quick else 5)
        # bench/sfu_switch.py: the longest pause between decoded frames at a forced switch
        summary["layer_switch_freeze_ms_max"] = layer_switch_freeze_ms(1 if args.quick else 2)
    print()
    print(table(runs))
    if not args.quick and not args.no_record and {"rallypoint", "janus"} <= set(args.servers):
        record(section(runs, summary, args, wall))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
