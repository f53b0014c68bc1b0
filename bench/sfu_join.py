"""Join to first remote frame: the bundled page in headless Chromium, through the SFU.

A real ``rallypoint serve`` (one SFU worker, TURN off) has a room with two publishers already in
it (aiortc peers sending a pre-encoded 640x480 VP8 clip plus Opus, answering PLIs with a
keyframe as a browser does; they do not subscribe). Then the bundled page
(``/room/<room>?name=Viewer&autojoin=1``) is opened ``--runs`` times in headless Chromium (Debian's
``/usr/bin/chromium``, fake camera and microphone; a new browser context each time, so nothing
is cached between runs except what the browser process keeps), and each run measures, from
navigation start (``performance.timeOrigin``), when the first remote video frame was decoded
and shown: ``requestVideoFrameCallback`` on the first remote tile's ``<video>``.

An init script (run before the page's own modules) records the phases on the page's clock:

| phase | when |
|---|---|
| ``dom`` | ``DOMContentLoaded`` (the page's HTML and module scripts are loaded) |
| ``gum`` | ``getUserMedia`` resolved (camera and microphone) |
| ``ws_open`` | the WebSocket is open |
| ``welcome`` | ``welcome`` received (after ``hello``) |
| ``joined`` | ``joined`` received (after ``join``) |
| ``offer`` | the first ``subscribe_offer`` received |
| ``answer`` | ``subscribe_answer`` sent |
| ``ice`` | the subscriber connection's ICE state ``connected`` |
| ``dtls`` | its ``connectionState`` ``connected`` (DTLS done) |
| ``packet`` | the first remote video RTP packet (``getSynchronizationSources()``, every 2 ms) |
| ``frame`` | the first remote video frame on screen (``requestVideoFrameCallback``) |

The JSON line also has ``sub_remote``, ``sub_local`` and ``sub_gathered`` (the subscriber
offer applied, the answer made, ICE gathering complete: the answer waits for it). Medians are
per phase, so they need not be in order; a run's ``packet`` is missing when its first frame
came before the 2 ms poll saw a packet.

    .venv/bin/python bench/sfu_join.py [--runs 5] [--server-path DIR] [--rounds 5]

With ``--server-path DIR`` the run compares this checkout ("rallypoint") with another one
("base", e.g. the previous commit: ``git worktree add DIR HEAD~1``): both servers run side by
side with their own room and publishers, and the runs alternate between them (which one goes
first alternates too; this machine's speed drifts within minutes).

``JOIN_DEBUG=1`` also prints each run's marks, the page's navigation and resource timings, and
its long tasks (main thread busy over 50 ms).

Prints a table of the runs and a final JSON line ``{"join_first_frame_ms_median": m, "runs":
[...], "phases_ms_median": {...}}`` (with ``--server-path``: one such summary per server).
``join_first_frame_ms(runs)`` is what ``bench/sfu.py`` calls for its own final line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ``python bench/sfu_join.py`` puts bench/ first on sys.path, where bench/signaling.py would
# shadow the ``signaling`` package: look in the project first and in bench/ (helpers) last.
_BENCH = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if p != _BENCH] + [_BENCH]
sys.path.insert(0, str(Path(_BENCH).parent))

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from procs import free_port, spawn, stop, wait_http  # noqa: E402
from sfu_load import Publisher  # noqa: E402

from media.tracks import attach_keyframe_requests  # noqa: E402
from signaling.sdk.wsclient import Client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--autoplay-policy=no-user-gesture-required",
)
PHASES = (
    "dom",
    "gum",
    "ws_open",
    "welcome",
    "joined",
    "offer",
    "answer",
    "ice",
    "dtls",
    "packet",
    "frame",
)
# Also in the JSON, not in the table: the subscriber offer applied (setRemoteDescription), the
# answer made (setLocalDescription), ICE gathering complete (the answer waits for it).
DETAIL_PHASES = ("sub_remote", "sub_local", "sub_gathered")
RUN_TIMEOUT_S = 20.0  # per page: the first remote frame or the run fails
HOLD_S = 1.0  # the page stays this long after its first frame (it opens its camera, publishes)
SETTLE_S = 0.5  # after a page closes, before the next opens (the server sees it leave)

# Runs before the page's own scripts: timestamps (performance.now(), i.e. ms since navigation
# start) on window.__join. Wraps getUserMedia, WebSocket and RTCPeerConnection without changing
# what they do.
INIT_SCRIPT = r"""
(() => {
  const marks = (window.__join = {});
  window.__joinDetail = () => {
    const out = {};
    const nav = performance.getEntriesByType("navigation")[0];
    const keys = ["requestStart", "responseStart", "responseEnd", "domInteractive"];
    if (nav) for (const k of keys) out[k] = nav[k];
    const ms = Math.round;
    out.longtasks = (window.__longtasks || []).map((t) => [ms(t.startTime), ms(t.duration)]);
    for (const r of performance.getEntriesByType("resource")) {
      out[r.name.split("/").pop()] = [Math.round(r.startTime), Math.round(r.responseEnd)];
    }
    return out;
  };
  const mark = (name) => { if (!(name in marks)) marks[name] = performance.now(); };
  document.addEventListener("DOMContentLoaded", () => mark("dom"));
  try {
    new PerformanceObserver((l) => (window.__longtasks ||= []).push(...l.getEntries())).observe({
      type: "longtask",
      buffered: true,
    });
  } catch {}
  const md = navigator.mediaDevices;
  if (md && md.getUserMedia) {
    const gum = md.getUserMedia.bind(md);
    md.getUserMedia = async (c) => { const s = await gum(c); mark("gum"); return s; };
  }
  const NativeWS = window.WebSocket;
  window.WebSocket = class extends NativeWS {
    constructor(...args) {
      super(...args);
      this.addEventListener("open", () => mark("ws_open"));
      this.addEventListener("message", (ev) => {
        if (typeof ev.data !== "string") return;
        try {
          const t = JSON.parse(ev.data).type;
          if (t === "welcome" || t === "joined") mark(t);
          else if (t === "subscribe_offer") mark("offer");
        } catch {}
      });
    }
    send(data) {
      if (typeof data === "string") {
        if (data.includes('"subscribe_answer"')) mark("answer");
        else if (data.includes('"type":"join"')) mark("join_sent");
        else if (data.includes('"type":"hello"')) mark("hello_sent");
      }
      return super.send(data);
    }
  };
  const remote = new Set();  // remote video track ids
  const NativePC = window.RTCPeerConnection;
  window.RTCPeerConnection = class extends NativePC {
    async setRemoteDescription(d) {
      const out = await super.setRemoteDescription(d);
      if (d && d.type === "offer") {
        mark("sub_remote");
        this.addEventListener("icegatheringstatechange", () => {
          if (this.iceGatheringState === "complete") mark("sub_gathered");
        });
      }
      return out;
    }
    async setLocalDescription(d) {
      const out = await super.setLocalDescription(d);
      if (this.localDescription?.type === "answer") mark("sub_local");
      return out;
    }
    constructor(...args) {
      super(...args);
      this.addEventListener("track", (ev) => {
        if (ev.track.kind !== "video") return;
        remote.add(ev.track.id);
        const pc = this;
        pc.addEventListener("iceconnectionstatechange", () => {
          if (pc.iceConnectionState === "connected") mark("ice");
        });
        pc.addEventListener("connectionstatechange", () => {
          if (pc.connectionState === "connected") mark("dtls");
        });
        const receiver = ev.receiver;
        const poll = setInterval(() => {
          if (marks.packet !== undefined || marks.frame !== undefined) clearInterval(poll);
          else if (receiver.getSynchronizationSources().length) mark("packet");
        }, 2);
      });
    }
  };
  const watched = new WeakSet();
  function watch(video) {
    if (watched.has(video)) return;
    watched.add(video);
    const onFrame = () => {
      const track = video.srcObject?.getVideoTracks?.()[0];
      if (track && remote.has(track.id)) {
        mark("frame");
        return;
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  }
  new MutationObserver(() => {
    for (const v of document.querySelectorAll("video")) watch(v);
  }).observe(document, { childList: true, subtree: true });
})();
"""


@dataclass
class JoinServer:
    """A ``rallypoint serve`` (this checkout, or ``path``) with a room of two publishers."""

    name: str
    tmp: Path
    path: Path | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    clients: list[Client] = field(default_factory=list)
    pcs: list[RTCPeerConnection] = field(default_factory=list)
    room: str = "join-bench"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        env = {
            **os.environ,
            "RALLYPOINT_TURN_ENABLED": "false",
            "RALLYPOINT_SFU_WORKERS": "1",
            "RALLYPOINT_LIMITS_RATE_PER_S": "1000",
            "RALLYPOINT_LIMITS_BURST": "1000",
        }
        if self.path is not None:  # `python -m` looks in the working directory first
            env["PYTHONPATH"] = str(self.path)
        cmd = [PY, "-m", "signaling", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.tmp / f"{self.name}-data")]
        self.proc = spawn(cmd, self.tmp / f"{self.name}.log", env, self.path or ROOT)
        await wait_http(f"{self.base}/healthz", self.proc)
        for i in range(2):
            await self._publisher(i)

    async def _publisher(self, i: int) -> None:
        """A participant that publishes a camera and a microphone and never subscribes (it
        ignores subscriber offers), so the load generator decodes nothing."""
        c = Client(f"ws://127.0.0.1:{self.port}/ws")
        await c.connect(name=f"Publisher {i + 1}", identity=f"publisher-{i + 1}")
        self.clients.append(c)
        await c.request({"type": "join", "room": self.room})
        pub = Publisher.make(i + 1)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.append(pc)
        trs = [pc.addTransceiver(t, direction="sendonly") for t in (pub.video, pub.audio)]
        attach_keyframe_requests(trs[0].sender, pub.video)
        await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        meta = [
            {"mid": trs[0].mid, "source": "camera"},
            {"mid": trs[1].mid, "source": "microphone"},
        ]
        reply = await c.request(
            {"type": "publish", "room": self.room, "sdp": pc.localDescription.sdp, "tracks": meta},
            timeout=20,
        )
        await pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type="answer"))
        deadline = time.monotonic() + 20
        while pc.connectionState != "connected":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: publisher {i + 1} did not connect")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for pc in self.pcs:
            await pc.close()
        for c in self.clients:
            await c.close()
        if self.proc is not None:
            await asyncio.to_thread(stop, self.proc)


async def one_run(browser: Any, server: JoinServer) -> dict[str, float]:
    """Open the page once; returns the phases (ms since navigation start)."""
    context = await browser.new_context()
    try:
        await context.add_init_script(INIT_SCRIPT)
        page = await context.new_page()
        url = f"{server.base}/room/{server.room}?name=Viewer&autojoin=1"
        await page.goto(url, wait_until="commit")
        await page.wait_for_function(
            "() => window.__join && window.__join.frame !== undefined",
            timeout=RUN_TIMEOUT_S * 1000,
            polling=50,
        )
        await asyncio.sleep(HOLD_S)  # every run leaves the same work behind when it closes
        marks: dict[str, float] = await page.evaluate("() => window.__join")
        if os.environ.get("JOIN_DEBUG"):
            print(marks, await page.evaluate("() => window.__joinDetail()"), flush=True)
        return {k: round(v, 1) for k, v in marks.items()}
    finally:
        await context.close()
        await asyncio.sleep(SETTLE_S)


def summarize(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median time to the first frame, and each phase's median, over ``runs``."""
    phases = {
        p: round(statistics.median([r[p] for r in runs if p in r]), 1)
        for p in PHASES + DETAIL_PHASES
        if any(p in r for r in runs)
    }
    after_load = [r["frame"] - r["dom"] for r in runs if "frame" in r and "dom" in r]
    return {
        "join_first_frame_ms_median": phases.get("frame"),
        # The same without the page load (which is the browser's own start-up, mostly).
        "after_load_ms_median": round(statistics.median(after_load), 1) if after_load else None,
        "runs": [r.get("frame") for r in runs],
        "phases_ms_median": phases,
    }


def table(name: str, runs: list[dict[str, float]]) -> str:
    head = f"{'server':<11}{'run':>4}" + "".join(f"{p:>9}" for p in PHASES)
    lines = [head]
    for i, r in enumerate(runs):
        cells = "".join(f"{r[p]:>9.0f}" if p in r else f"{'-':>9}" for p in PHASES)
        lines.append(f"{name:<11}{i + 1:>4}{cells}")
    med = summarize(runs)["phases_ms_median"]
    cells = "".join(f"{med[p]:>9.0f}" if p in med else f"{'-':>9}" for p in PHASES)
    lines.append(f"{name:<11}{'med':>4}{cells}")
    return "\n".join(lines)


async def measure(
    runs: int, tmp: Path, server_path: Path | None = None, warmup: int = 1
) -> dict[str, list[dict[str, float]]]:
    """Start the server(s) and Chromium; ``warmup`` runs per server first (not counted: the
    browser's first page start-up), then ``runs`` counted runs per server, alternating."""
    from playwright.async_api import async_playwright

    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} missing: apt-get install chromium")
    servers = [JoinServer("rallypoint", tmp)]
    if server_path is not None:
        servers.append(JoinServer("base", tmp, server_path))
    results: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    try:
        for s in servers:
            await s.start()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS), timeout=20_000
            )
            try:
                for s in servers:
                    for _ in range(warmup):
                        await one_run(browser, s)
                for i in range(runs):
                    order = servers if i % 2 == 0 else servers[::-1]
                    for s in order:
                        marks = await one_run(browser, s)
                        results[s.name].append(marks)
                        print(
                            f"{s.name:<11} run {i + 1}: first frame at {marks.get('frame')} ms",
                            flush=True,
                        )
            finally:
                await browser.close()
    finally:
        for s in servers:
            await s.stop()
    return results


def join_first_frame_ms(runs: int = 5) -> float | None:
    """Median join-to-first-frame of this checkout (for ``bench/sfu.py``'s final line);
    None when Chromium or Playwright is missing."""
    if shutil.which(CHROMIUM) is None:
        return None
    try:
        import playwright  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="bench-join-") as tmp:
        results = asyncio.run(measure(runs, Path(tmp)))
    median: float | None = summarize(results["rallypoint"])["join_first_frame_ms_median"]
    return median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="counted runs per server")
    parser.add_argument("--warmup", type=int, default=1, help="uncounted runs first")
    parser.add_argument(
        "--server-path", help="compare with the Rallypoint checkout in this directory (A/B)"
    )
    args = parser.parse_args()
    if not 1 <= args.runs <= 50:
        parser.error("--runs must be 1..50")
    path = Path(args.server_path).resolve() if args.server_path else None
    with tempfile.TemporaryDirectory(prefix="bench-join-") as tmp:
        results = asyncio.run(measure(args.runs, Path(tmp), path, args.warmup))
    print()
    for name, runs in results.items():
        print(table(name, runs))
    summaries = {name: summarize(runs) for name, runs in results.items()}
    if path is None:
        print(json.dumps(summaries["rallypoint"]))
    else:
        a = summaries["rallypoint"]["join_first_frame_ms_median"]
        b = summaries["base"]["join_first_frame_ms_median"]
        out = {**summaries["rallypoint"], "base": summaries["base"]}
        out["ratio_vs_base"] = round(a / b, 3) if a and b else None
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
