"""P2P media of an accepted 1:1 call: two aiortc peers negotiate through `call_signal` (no STUN,
host candidates on this machine's own address) and the callee decodes the caller's video."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestServer
from aiortc.mediastreams import VideoStreamTrack
from call_helpers import Phone

from signaling.sdk.media import P2PMedia

FRAMES = 15


async def test_p2p_video_flows_between_the_two_devices(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    call = await alice.call("bob", video=True)
    incoming = await bob.next_call()
    await incoming.accept()
    await call.next_event("call_accepted")
    assert call.ice_servers == [] and incoming.ice_servers == []  # TURN is off in tests

    sender = P2PMedia(call, tracks=[VideoStreamTrack()])
    receiver = P2PMedia(incoming)
    try:
        await receiver.start()
        await sender.start()
        await asyncio.gather(sender.connected(), receiver.connected())
        track = await asyncio.wait_for(receiver.remote_tracks.get(), 10)
        assert track.kind == "video"
        decoded = 0
        for _ in range(FRAMES):
            frame = await asyncio.wait_for(track.recv(), 10)
            assert frame.width == 640 and frame.height == 480
            decoded += 1
        assert decoded == FRAMES
    finally:
        await sender.close()
        await receiver.close()
    await call.hangup()
    assert await incoming.wait_ended() == "completed"
