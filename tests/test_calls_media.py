"""P2P media of an accepted 1:1 call: two aiortc peers negotiate through `call_signal` (no STUN,
host candidates on this machine's own address) and the callee decodes the caller's video."""

from __future__ import annotations

import asyncio

from aiohttp.test_utils import TestServer
from call_helpers import Phone

from media.clip import ClipSpec, load_clip
from media.receiver import FrameCounter
from media.tracks import EncodedVideoTrack, attach_keyframe_requests
from signaling.sdk.media import P2PMedia

FRAMES = 15
CALLER_ID = 1  # the caller sends clip 1: every frame's marker carries this publisher id


async def test_p2p_video_flows_between_the_two_devices(server: TestServer, phones: Phone) -> None:
    clip = await asyncio.to_thread(load_clip, ClipSpec(publisher_id=CALLER_ID, seconds=3.0))
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    call = await alice.call("bob", video=True)
    incoming = await bob.next_call()
    await incoming.accept()
    await call.next_event("call_accepted")
    assert call.ice_servers == [] and incoming.ice_servers == []  # TURN is off in tests

    video = EncodedVideoTrack(clip)
    sender = P2PMedia(call, tracks=[video])
    receiver = P2PMedia(incoming)
    try:
        await receiver.start()
        await sender.start()
        (rtp_sender,) = sender.pc.getSenders()
        attach_keyframe_requests(rtp_sender, video)
        await asyncio.gather(sender.connected(), receiver.connected())
        track = await asyncio.wait_for(receiver.remote_tracks.get(), 10)
        assert track.kind == "video"
        counter = FrameCounter(track, publisher_id=CALLER_ID)
        counter.start()
        try:
            await counter.wait_for_frames(FRAMES, 10)
        finally:
            await counter.stop()
        # The callee decoded the caller's picture: each frame's marker shows the caller's id
        # and the clip frame its RTP timestamp stands for (a frame decoded from a lost
        # reference, or someone else's, does not).
        v = counter.video
        assert v.publishers == {CALLER_ID} and v.sizes == {(640, 480): v.frames}
        assert v.intact >= FRAMES and v.corrupt == 0
    finally:
        await sender.close()
        await receiver.close()
    await call.hangup()
    assert await incoming.wait_ended() == "completed"
