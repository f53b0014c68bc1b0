"""Interop: two headless Chromium pages in one room through the SFU, each decoding the other's
video. The page speaks the protocol with a few lines of plain JS (docs/PROTOCOL.md, Media),
trickling its ICE candidates to the server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from browser_harness import launch_chromium

SCRIPT = """
let ws, room, n = 0, answered = 0, pub, sub, errors = [];
const pending = {};
function rq(msg) {
  const id = "r" + (++n); msg.id = id; ws.send(JSON.stringify(msg));
  return new Promise((res, rej) => { pending[id] = {res, rej}; });
}
async function onOffer(m) {
  if (!sub) {
    sub = new RTCPeerConnection({bundlePolicy: "max-bundle"});
    sub.onicecandidate = (e) => {
      rq({type: "ice", room, target: "subscriber",
          ...(e.candidate ? {candidate: e.candidate.toJSON()} : {})})
        .catch((err) => errors.push(err));
    };
  }
  if (m.offer <= answered) return;
  answered = m.offer;
  await sub.setRemoteDescription({type: "offer", sdp: m.sdp});
  await sub.setLocalDescription(await sub.createAnswer());
  await rq({type: "subscribe_answer", room, sdp: sub.localDescription.sdp});
}
async function start(url, name, r) {
  room = r;
  ws = new WebSocket(url);
  await new Promise((ok) => { ws.onopen = ok; });
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.re && pending[m.re]) {
      const p = pending[m.re]; delete pending[m.re];
      m.type === "error" ? p.rej(m) : p.res(m);
    } else if (m.type === "subscribe_offer") {
      onOffer(m).catch((err) => errors.push(String(err)));
    }
  };
  await rq({type: "hello", v: 1, name, identity: name});
  await rq({type: "join", room});
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
async function decoded() {
  if (!sub) return {frames: 0, width: 0};
  let frames = 0, width = 0;
  (await sub.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      frames += s.framesDecoded || 0; width = Math.max(width, s.frameWidth || 0);
    }
  });
  return {frames, width};
}
"""


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
