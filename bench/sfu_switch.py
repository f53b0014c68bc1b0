"""Freeze at a simulcast layer switch: the longest pause between decoded frames at a switch.

A real ``rallypoint serve`` (one SFU worker, TURN off) and, in this process, an SDK publisher
sending two pre-encoded VP8 layers of one camera (320x240 ~0.3 Mbps and 640x480 ~1.2 Mbps,
``signaling.sdk.simulcast``) and two aiortc subscribers that decode: the *switching* one is
forced down and up ``--toggles`` times, the *steady* one is not and is the baseline measured in
the same run (this machine's load makes every decoder pause now and then). Each switch is
forced by capping the switching subscriber's REMB below the top layer's rate (the SFU then moves
it down; ``media.loss.RembLimit``) and lifting the cap (it climbs back); with ``--via relay`` the
cap is a bandwidth limit in a user-space UDP relay on its downlink instead (``media.relay``),
which also measures what the congestion before the SFU reacts costs an aiortc receiver.

A switch's pause is the time between the last frame decoded at the old size and the first at the
new one. Prints each switch and a final JSON line ``{"layer_switch_freeze_ms_max": m,
"switch_pauses_ms": [...], "switching_longest_gap_ms": g, "steady_longest_gap_ms": b,
"gap_ratio": g / b, ...}``; ``layer_switch_freeze_ms(toggles)`` is what ``bench/sfu.py`` calls
for its own final line.

    .venv/bin/python bench/sfu_switch.py [--toggles 2] [--via remb|relay]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _BENCH] + [_BENCH]
sys.path.insert(0, str(Path(_BENCH).parent))

from procs import free_port, spawn, stop, wait_http  # noqa: E402

from media.clip import ClipSpec, load_clip  # noqa: E402
from media.layerwatch import DecodeErrors, Watched, watch  # noqa: E402
from media.loss import RembLimit  # noqa: E402
from media.relay import UdpRelay  # noqa: E402
from media.session import SfuSession  # noqa: E402
from media.tracks import EncodedVideoTrack  # noqa: E402
from signaling.sdk.simulcast import Simulcast  # noqa: E402
from signaling.sdk.wsclient import Client  # noqa: E402
from turn.server import machine_address  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LAYERS = (
    ClipSpec(publisher_id=7, width=320, height=240, video_bitrate=150_000),
    ClipSpec(publisher_id=7, width=640, height=480, video_bitrate=1_200_000),
)


async def until(pred: Any, timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not pred():  # noqa: ASYNC110 - decoded frames are counted in another task
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise RuntimeError(f"timed out waiting for {what}") from None


async def _party(port: int, name: str, **session: Any) -> tuple[Client, SfuSession]:
    c = Client(f"ws://127.0.0.1:{port}/ws")
    await c.connect(name=name, identity=name)
    await c.request({"type": "join", "room": "switch-bench"})
    return c, SfuSession(c, "switch-bench", **session)


async def measure(toggles: int, via: str, tmp: Path) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "RALLYPOINT_TURN_ENABLED": "false",
        "RALLYPOINT_SFU_WORKERS": "1",
        "RALLYPOINT_LIMITS_RATE_PER_S": "1000",
        "RALLYPOINT_LIMITS_BURST": "1000",
    }
    cmd = [PY, "-m", "signaling", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn([*cmd, "--data-dir", str(tmp / "data")], tmp / "server.log", env, ROOT)
    sessions: list[SfuSession] = []
    clients: list[Client] = []
    relay = UdpRelay(machine_address(), seed=15) if via == "relay" else None
    switching, steady = Watched(), Watched()
    try:
        await wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        if relay is not None:
            relay.max_delay = 1.5
            await relay.start()
        layers = [EncodedVideoTrack(load_clip(spec)) for spec in LAYERS]
        c, cam = await _party(port, "cam")
        clients.append(c)
        sessions.append(cam)
        await cam.publish([(Simulcast(layers, ["h", "f"]), "camera")])
        c, sw = await _party(
            port, "switching", decode=False, relay=relay, on_track=watch(switching, lambda: sw.sub)
        )
        clients.append(c)
        sessions.append(sw)
        c, st = await _party(port, "steady", decode=False, on_track=watch(steady, lambda: st.sub))
        clients.append(c)
        sessions.append(st)
        await until(lambda: switching.frames.width == steady.frames.width == 640, 60, "640x480")
        await asyncio.sleep(6)  # past the SFU's grace after a switch up
        top = sum(len(p.data) for p in layers[1].clip.video) * 8 / layers[1].clip.spec.seconds
        assert sw.sub is not None
        remb = RembLimit(sw.sub, None) if relay is None else None
        first = len(switching.frames.switches)
        switching.frames.mark()
        steady.frames.mark()
        started = time.monotonic()
        with DecodeErrors() as errors:
            for i in range(toggles):
                if remb is not None:
                    remb.bps = int(top * 0.5)
                elif relay is not None:
                    relay.rate_bps = int(top * 0.6)
                await until(lambda: 0 < switching.frames.width < 640, 60, f"switch {i + 1} down")
                await asyncio.sleep(3)
                if remb is not None:
                    remb.bps = None
                elif relay is not None:
                    relay.rate_bps = None
                await until(lambda: switching.frames.width == 640, 90, f"switch {i + 1} up")
                await asyncio.sleep(6)  # past the grace after the switch up
        switches = switching.frames.switches[first:]
        pauses = [round(s.pause * 1000, 1) for s in switches]
        for s in switches:
            print(f"  {s.old} -> {s.new}: {s.pause * 1000:.1f} ms without a frame", flush=True)
        gap = switching.frames.longest_gap * 1000
        base = steady.frames.longest_gap * 1000
        return {
            "layer_switch_freeze_ms_max": max(pauses, default=None),
            "switch_pauses_ms": pauses,
            "switching_longest_gap_ms": round(gap, 1),
            "steady_longest_gap_ms": round(base, 1),
            "gap_ratio": round(gap / base, 2) if base else None,
            "decode_errors": errors.count,
            "via": via,
            "seconds": round(time.monotonic() - started),
        }
    finally:
        for s in sessions:
            await s.close()
        for c in clients:
            await c.close()
        if relay is not None:
            relay.close()
        for w in (switching, steady):
            for t in w.tasks:
                t.cancel()
        stop(proc)


def layer_switch_freeze_ms(toggles: int = 2) -> float | None:
    """The longest pause at a forced layer switch (for ``bench/sfu.py``'s final line)."""
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        result = asyncio.run(measure(toggles, "remb", Path(tmp)))
    value: float | None = result["layer_switch_freeze_ms_max"]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toggles", type=int, default=2, help="down-and-up cycles")
    parser.add_argument("--via", choices=("remb", "relay"), default="remb")
    args = parser.parse_args()
    if not 1 <= args.toggles <= 20:
        parser.error("--toggles must be 1..20")
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as tmp:
        result = asyncio.run(measure(args.toggles, args.via, Path(tmp)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
