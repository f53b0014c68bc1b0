"""Two aiortc peers forced to relay (iceTransportPolicy relay) exchange video through us."""

from __future__ import annotations

import asyncio

from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamTrack
from nethelpers import machine_ip
from turn_helpers import ServerFactory, credentials


def relay_only(port: int, user: str) -> RTCConfiguration:
    username, password = credentials(user)
    server = RTCIceServer(
        urls=f"turn:{machine_ip()}:{port}", username=username, credential=password
    )
    return RTCConfiguration(iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY)


async def test_two_relayed_aiortc_peers_exchange_video(make_server: ServerFactory) -> None:
    server = await make_server()
    port = server.udp_address[1]
    caller = RTCPeerConnection(relay_only(port, "caller"))
    callee = RTCPeerConnection(relay_only(port, "callee"))
    received: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

    @callee.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        if not received.done():
            received.set_result(track)

    source = VideoStreamTrack()
    try:
        caller.addTrack(source)
        await caller.setLocalDescription(await caller.createOffer())
        offer = caller.localDescription
        # Only relay candidates are gathered, all on our server.
        candidates = [line for line in offer.sdp.splitlines() if line.startswith("a=candidate")]
        assert candidates and all("typ relay" in line for line in candidates), offer.sdp
        await callee.setRemoteDescription(offer)
        await callee.setLocalDescription(await callee.createAnswer())
        await caller.setRemoteDescription(callee.localDescription)

        track = await asyncio.wait_for(received, 20)
        frames = []
        for _ in range(5):
            frame = await asyncio.wait_for(track.recv(), 20)
            frames.append(frame)
        assert all(f.width == 640 and f.height == 480 for f in frames)
        assert caller.iceConnectionState == "completed" or caller.iceConnectionState == (
            "connected"
        )
        stats = server.stats
        assert stats["allocations"] >= 2
        # Every packet crosses two relays: caller -> its relay -> callee's relay -> callee.
        assert stats["relayed_to_peer"] >= 10 and stats["relayed_to_client"] >= 10
    finally:
        source.stop()
        await caller.close()
        await callee.close()
