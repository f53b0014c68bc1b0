"""The naive baseline of ``bench/sfu.py``: an aiortc server relaying with ``MediaRelay``.

Run as ``python bench/sfu_relay.py --port P``. ``POST /publish`` and ``POST /subscribe`` take an
offer (``{"sdp", "type"}``) and return the answer; a subscriber gets ``MediaRelay`` proxies of
the publisher's tracks, so the publisher's stream is decoded once and encoded again for every
subscriber (what most Python "SFUs" do). ``POST /reset`` closes every connection.

The VP8 encoder starts at 800 kbps instead of aiortc's 500 kbps default, to match the published
stream (the benchmark's subscribers send no REMB that would move it).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import aiortc.codecs.vpx
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaRelay

aiortc.codecs.vpx.DEFAULT_BITRATE = 800_000


class RelayServer:
    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.tracks: dict[str, Any] = {}
        self.pcs: set[RTCPeerConnection] = set()

    def _pc(self) -> RTCPeerConnection:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pcs.add(pc)
        return pc

    async def publish(self, request: web.Request) -> web.Response:
        offer = await request.json()
        pc = self._pc()

        @pc.on("track")
        def on_track(track: Any) -> None:
            self.tracks[track.kind] = track

        await pc.setRemoteDescription(RTCSessionDescription(**offer))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer"})

    async def subscribe(self, request: web.Request) -> web.Response:
        offer = await request.json()
        pc = self._pc()
        await pc.setRemoteDescription(RTCSessionDescription(**offer))
        for kind in ("video", "audio"):
            track = self.tracks.get(kind)
            if track is not None:
                pc.addTrack(self.relay.subscribe(track))
        await pc.setLocalDescription(await pc.createAnswer())
        return web.json_response({"sdp": pc.localDescription.sdp, "type": "answer"})

    async def ready(self, request: web.Request) -> web.Response:
        return web.json_response({"publisher": len(self.tracks) == 2})

    async def reset(self, request: web.Request) -> web.Response:
        pcs, self.pcs = self.pcs, set()
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
        self.tracks.clear()
        self.relay = MediaRelay()
        return web.json_response({})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = RelayServer()
    app = web.Application()
    app.router.add_post("/publish", server.publish)
    app.router.add_post("/subscribe", server.subscribe)
    app.router.add_post("/reset", server.reset)
    app.router.add_get("/ready", server.ready)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
