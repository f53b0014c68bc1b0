"""Media for a 1:1 P2P call with aiortc: offer/answer and candidates over ``call_signal``.

Convention (docs/PROTOCOL.md, "Calls"): in a P2P call the caller sends the offer once the callee
has accepted; the callee answers. Either side may later send a new offer (``restart: true`` after
a network change, for stacks that support ICE restarts; aiortc does not). aiortc gathers every
candidate before the offer or answer is final, so it sends its candidates inside the SDP; it
still adds candidates that a browser trickles with ``kind: "candidate"``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from .client import Call


def rtc_configuration(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    """An aiortc configuration from the ``ice_servers`` the server hands out.

    An empty list means no STUN/TURN at all (host candidates only); aiortc would otherwise reach
    for a public STUN server.
    """
    return RTCConfiguration(
        iceServers=[
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in ice_servers
        ]
    )


class P2PMedia:
    """One side of a 1:1 call's peer connection, negotiated through the server."""

    def __init__(
        self,
        call: Call,
        *,
        tracks: list[MediaStreamTrack] | None = None,
        ice_servers: list[dict[str, Any]] | None = None,
    ) -> None:
        self.call = call
        self.tracks = list(tracks or [])
        self.pc = RTCPeerConnection(
            rtc_configuration(call.ice_servers if ice_servers is None else ice_servers)
        )
        self.remote_tracks: asyncio.Queue[MediaStreamTrack] = asyncio.Queue()
        self.pc.on("track", self.remote_tracks.put_nowait)
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Begin negotiating: the caller offers, the callee waits for the offer (and adds its
        tracks to the transceivers the offer creates)."""
        if self.call.role == "caller":
            for t in self.tracks:
                self.pc.addTrack(t)
            if not self.tracks:
                self.pc.addTransceiver("video", direction="recvonly")
                self.pc.addTransceiver("audio", direction="recvonly")
            await self.pc.setLocalDescription(await self.pc.createOffer())
            await self.call.signal("offer", sdp=self.pc.localDescription.sdp)
        self._pump = asyncio.create_task(self._signals())

    async def _signals(self) -> None:
        while True:
            sig = await self.call.signals.get()
            kind = sig["kind"]
            if kind == "offer":
                await self.pc.setRemoteDescription(RTCSessionDescription(sig["sdp"], "offer"))
                senders = {s.track for s in self.pc.getSenders() if s.track is not None}
                for t in self.tracks:
                    if t not in senders:
                        self.pc.addTrack(t)
                await self.pc.setLocalDescription(await self.pc.createAnswer())
                await self.call.signal("answer", to=sig["from"], sdp=self.pc.localDescription.sdp)
            elif kind == "answer":
                await self.pc.setRemoteDescription(RTCSessionDescription(sig["sdp"], "answer"))
            elif kind == "candidate":
                cand = candidate_from_sdp(sig["candidate"].removeprefix("candidate:"))
                cand.sdpMid = sig.get("mid")
                cand.sdpMLineIndex = sig.get("mline")
                await self.pc.addIceCandidate(cand)

    async def connected(self, timeout: float = 20.0) -> None:
        """Wait until the peer connection is up."""

        async def wait() -> None:
            while self.pc.connectionState != "connected":
                if self.pc.connectionState in ("failed", "closed"):
                    raise ConnectionError(f"peer connection {self.pc.connectionState}")
                await asyncio.sleep(0.05)

        await asyncio.wait_for(wait(), timeout)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.pc.close()
