"""Interop: two headless Chromium pages in one room through the SFU, each decoding the other's
video. The page speaks the protocol with a few lines of plain JS (docs/PROTOCOL.md, Media),
trickling its ICE candidates to the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from browser_harness import SFU_CLIENT_JS, launch_chromium

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
