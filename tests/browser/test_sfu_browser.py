"""Interop: two headless Chromium pages in one room through the SFU, each decoding the other's
video and taking the SFU's sender reports for its audio and video (remote-outbound-rtp). The
page speaks the protocol with a few lines of plain JS (docs/PROTOCOL.md, Media), trickling its
ICE candidates to the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestServer
from browser_harness import SFU_CLIENT_JS, launch_chromium, wait_for

SCRIPT = (
    SFU_CLIENT_JS
    + """
async function start(url, name, r) {
  await connect(url, name, r);
  const stream = await navigator.mediaDevices.getUserMedia(
    {video: {width: 640, height: 480}, audio: true});
  pub = new RTCPeerConnection({bundlePolicy: "max-bundle"});
  const trs = stream.getTracks().map((t) => pub.addTransceiver(t, {direction: "sendonly"}));
  await pub.setLocalDescription(await pub.createOffer());
  const tracks = trs.map((tr) => ({mid: tr.mid,
    source: tr.sender.track.kind === "video" ? "camera" : "microphone"}));
  const ans = await rq({type: "publish", room, sdp: pub.localDescription.sdp, tracks});
  pub.onicecandidate = (e) => {
    if (e.candidate) rq({type: "ice", room, target: "publisher", candidate: e.candidate.toJSON()})
      .catch((err) => errors.push(err));
  };
  await pub.setRemoteDescription({type: "answer", sdp: ans.sdp});
  await rq({type: "subscribe", room});
}
// What the subscriber connection knows from the SFU's sender reports: one remote-outbound-rtp
// per stream whose SR arrived, with the SR's NTP time (remoteTimestamp) and packet count.
async function remoteOutbound() {
  const out = [];
  (await sub.getStats()).forEach((s) => {
    if (s.type === "remote-outbound-rtp")
      out.push({kind: s.kind, packets: s.packetsSent, at: s.remoteTimestamp});
  });
  return out;
}
"""
)


async def test_two_chromium_pages_through_the_sfu(
    start_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    origin = f"http://127.0.0.1:{server.port}"
    url = f"ws://127.0.0.1:{server.port}/ws"
    async with launch_chromium() as browser:
        pages = []
        for _ in range(2):
            # Served by our own server: same origin for the WebSocket, and a secure context
            # (loopback) for getUserMedia.
            page = await (await browser.new_context()).new_page()
            page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
            await page.goto(f"{origin}/")
            await page.add_script_tag(content=SCRIPT)
            pages.append(page)
        for page, name in zip(pages, ("amy", "bo"), strict=True):
            await page.evaluate("([u, n, r]) => start(u, n, r)", [url, name, "interop"])
        first = [await p.evaluate("decoded()") for p in pages]
        async with asyncio.timeout(30):
            while True:
                await asyncio.sleep(0.5)
                now = [await p.evaluate("decoded()") for p in pages]
                if all(
                    b["frames"] >= a["frames"] + 30 and b["frames"] > 30
                    for a, b in zip(first, now, strict=True)
                ):
                    break
        for p in pages:
            stats = await p.evaluate("decoded()")
            assert stats["width"] > 0
            assert await p.evaluate("errors.length") == 0
        # Sender reports with the publisher's mapping (an SR with counts: after the first
        # packets) for both of the other page's streams; one per second, in compound packets.
        seen: list[dict[str, Any]] = []

        async def reported() -> bool:
            for p in pages:
                seen[:] = await p.evaluate("remoteOutbound()")
                if sorted(s["kind"] for s in seen if s["packets"] > 0) != ["audio", "video"]:
                    return False
            return True

        await wait_for(reported, 10, "remote-outbound-rtp for audio and video", seen)
