"""Simulcast end to end: Chromium publishes two layers (a 640x360 camera: 160x90 and
640x360) through the SFU; an aiortc subscriber and a Chromium subscriber receive and decode
the top layer; an aiortc subscriber whose REMB says it has little bandwidth moves down a layer
while the others stay high, and climbs back when the limit is lifted. At every switch frames
keep decoding and the subscriber sees no gap in its sequence numbers (aiortc's receive
statistics count none lost)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer
from browser_harness import SFU_CLIENT_JS, launch_chromium, wait_for

from media.layerwatch import Frames
from media.loss import RembLimit
from media.session import SfuSession
from media.y4m import write_y4m
from signaling.sdk.wsclient import Client

SCRIPT = (
    SFU_CLIENT_JS
    + """
async function start(url, name, r, publish) {
  await connect(url, name, r);
  if (publish) {
    const stream = await navigator.mediaDevices.getUserMedia(
      {video: {width: 640, height: 360}, audio: false});
    pub = new RTCPeerConnection({bundlePolicy: "max-bundle"});
    const tr = pub.addTransceiver(stream.getVideoTracks()[0], {direction: "sendonly",
      // Modest rates: on a loaded machine the SFU's estimate of this link may stay low.
      sendEncodings: [{rid: "q", scaleResolutionDownBy: 4, maxBitrate: 100000},
                      {rid: "f", maxBitrate: 500000}]});
    await pub.setLocalDescription(await pub.createOffer());
    const ans = await rq({type: "publish", room, sdp: pub.localDescription.sdp,
                          tracks: [{mid: tr.mid, source: "camera"}]});
    pub.onicecandidate = (e) => {
      if (e.candidate) rq({type: "ice", room, target: "publisher",
                           candidate: e.candidate.toJSON()}).catch((err) => errors.push(err));
    };
    await pub.setRemoteDescription({type: "answer", sdp: ans.sdp});
  }
  await rq({type: "subscribe", room});
}
async function sent() {
  const out = {};
  (await pub.getStats()).forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video") out[s.rid] = s.frameWidth || 0;
  });
  return out;
}
async function why() {
  const out = [];
  (await pub.getStats()).forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video")
      out.push([s.rid, s.frameWidth, s.qualityLimitationReason, s.targetBitrate, s.active]);
    if (s.type === "candidate-pair" && s.nominated)
      out.push(["bwe", s.availableOutgoingBitrate]);
  });
  return out;
}
async function bytesSent() {
  const out = {};
  (await pub.getStats()).forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video") out[s.rid] = s.bytesSent;
  });
  return out;
}
"""
)


@contextlib.asynccontextmanager
async def subscriber(
    server: TestServer, clients: Callable[..., Awaitable[Client]], name: str
) -> AsyncIterator[tuple[SfuSession, Frames]]:
    c = await clients(server, name=name, identity=name)
    await c.request({"type": "join", "room": "sim"})
    frames = Frames()
    tasks: list[asyncio.Task[None]] = []

    def on_track(_tid: str, track: Any) -> None:
        if track.kind == "video":
            tasks.append(asyncio.create_task(frames.consume(track)))

    session = SfuSession(c, "sim", decode=False, on_track=on_track)
    try:
        yield session, frames
    finally:
        await session.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def packets_lost(session: SfuSession) -> int:
    """What the subscriber's receiver statistics count as lost (gaps in sequence numbers)."""
    assert session.sub is not None
    lost = 0
    for tr in session.sub.getTransceivers():
        if tr.kind == "video":
            for stats in tr.receiver._RTCRtpReceiver__remote_streams.values():  # type: ignore[attr-defined]
                lost += stats.packets_lost
    return lost


async def test_simulcast_layers_per_subscriber(
    start_server: Callable[..., Awaitable[TestServer]],
    clients: Callable[..., Awaitable[Client]],
    tmp_path: Path,
) -> None:
    y4m = write_y4m(tmp_path / "cam.y4m", publisher_id=3, seconds=1.0, width=640, height=368)
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    origin = f"http://127.0.0.1:{server.port}"
    url = f"ws://127.0.0.1:{server.port}/ws"
    async with (
        launch_chromium(video_file=y4m) as browser,
        subscriber(server, clients, "clean") as (clean, clean_frames),
        subscriber(server, clients, "slow") as (slow, slow_frames),
    ):
        pages = []
        for _ in range(2):
            page = await (await browser.new_context()).new_page()
            page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
            await page.goto(f"{origin}/")
            await page.add_script_tag(content=SCRIPT)
            pages.append(page)
        publisher, viewer = pages
        await publisher.evaluate("([u, r]) => start(u, 'cam', r, true)", [url, "sim"])
        await viewer.evaluate("([u, r]) => start(u, 'viewer', r, false)", [url, "sim"])

        async def publisher_sends_both() -> bool:
            sent = await publisher.evaluate("sent()")
            return len(sent) == 2 and all(w > 0 for w in sent.values())

        await wait_for(publisher_sends_both, 40, "the publisher to send both layers")
        sent = await publisher.evaluate("sent()")
        assert sent == {"q": 160, "f": 640}, sent

        async def all_high() -> bool:
            view = await viewer.evaluate("decoded()")
            return clean_frames.width == slow_frames.width == view["width"] == 640

        await wait_for(all_high, 40, "every subscriber on the 640x360 layer")
        # From here on, no pause of a second in either aiortc subscriber's video.
        clean_frames.longest_gap = slow_frames.longest_gap = 0.0
        assert slow.sub is not None
        # The limit: well below what the top layer takes, above what the low one does (the
        # layers' rates depend on the publisher's content and on this machine's load).
        before = await publisher.evaluate("bytesSent()")
        await asyncio.sleep(2)
        after = await publisher.evaluate("bytesSent()")
        rates = {rid: (after[rid] - before[rid]) * 8 // 2 for rid in after}
        assert rates["f"] > 1.4 * rates["q"], rates
        limit = RembLimit(slow.sub, int(max(rates["f"] * 0.5, rates["q"] * 1.2)))
        # The publisher's rates move with this machine's load (its encoder gives up quality
        # when starved of CPU): the limit follows them, each second, so that it stays well
        # below what the top layer takes and above what the low one does.
        last = {"at": time.monotonic(), "sent": after}

        async def slow_low() -> bool:
            now = time.monotonic()
            if now - last["at"] >= 1.0:
                sent = await publisher.evaluate("bytesSent()")
                span = now - last["at"]
                f_bps = (sent["f"] - last["sent"]["f"]) * 8 / span
                q_bps = (sent["q"] - last["sent"]["q"]) * 8 / span
                limit.bps = int(max(f_bps * 0.5, q_bps * 1.2))
                last.update(at=now, sent=sent)
            return 0 < slow_frames.width < 640 and clean_frames.width == 640

        await wait_for(slow_low, 40, "the limited subscriber to move down")
        low_width = slow_frames.width
        assert limit.rewritten > 0

        # The others stay high, and the publisher keeps sending its top layer. The browser
        # viewer's own estimate may dip for a moment on a loaded machine (once in a full run
        # here it showed 160 at this point): the limit on another subscriber must not keep it
        # low, so it is back on the top layer within seconds.
        async def viewer_high() -> bool:
            return bool((await viewer.evaluate("decoded()"))["width"] == 640)

        await wait_for(viewer_high, 10, "the browser viewer on the 640x360 layer")
        assert (await publisher.evaluate("sent()"))["f"] == 640
        count = slow_frames.count
        await wait_for(
            lambda: asyncio.sleep(0, slow_frames.count > count + 15),
            10,
            "the limited subscriber to keep decoding",
        )
        limit.bps = None

        async def slow_high() -> bool:
            return slow_frames.width == 640

        await wait_for(slow_high, 60, "the limited subscriber to climb back")
        print(
            f"slow subscriber switches {slow_frames.switches} (low {low_width}), longest gap "
            f"{slow_frames.longest_gap:.2f} s; clean {clean_frames.switches}"
        )
        # Switching never stalls the video longer than 1 s, nor longer than the subscriber
        # that did not switch saw anyway (on a loaded machine the publisher itself may stall).
        assert slow_frames.longest_gap < max(1.0, clean_frames.longest_gap + 0.3)
        assert clean_frames.longest_gap < 2.0
        assert packets_lost(slow) == 0
        assert packets_lost(clean) == 0
        for page in pages:
            assert await page.evaluate("errors.length") == 0
