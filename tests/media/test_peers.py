"""Two real aiortc peers on this machine's address (no SFU): publish a clip, count what decodes."""

from __future__ import annotations

import asyncio

from aiortc import RTCPeerConnection
from media_peers import count_received, negotiate, stop_all

from media.clip import Clip
from media.loss import inject_loss
from media.tracks import add_clip_tracks

Peers = tuple[RTCPeerConnection, RTCPeerConnection]


async def test_publisher_to_receiver_decodes_video_and_audio(peers: Peers, clip: Clip) -> None:
    publisher, receiver = peers
    video, audio = add_clip_tracks(publisher, clip)
    counters = count_received(receiver, publisher_id=1)
    await negotiate(publisher, receiver)
    try:
        await counters["video"].wait_for_frames(30, timeout=10)
        await counters["audio"].wait_for_frames(25, timeout=5)
        v = counters["video"]
        assert v.video.sizes == {(640, 480): v.video.frames}
        assert v.video.publishers == {1}
        assert v.decodable_fraction() == 1.0 and v.video.corrupt == 0
        assert counters["audio"].audio_samples == 960 * counters["audio"].audio_frames
        assert video.frames_sent >= v.frames and audio.frames_sent > 0

        # An explicit PLI from the receiver makes the track splice in an intra frame.
        requests_before, intra_before = video.keyframe_requests, video.intra_frames_sent
        (transceiver,) = [t for t in receiver.getTransceivers() if t.kind == "video"]
        (sender,) = [s for s in publisher.getSenders() if s.kind == "video"]
        await transceiver.receiver._send_rtcp_pli(sender._ssrc)
        async with asyncio.timeout(5):
            while video.intra_frames_sent == intra_before:
                await asyncio.sleep(0.02)
        assert video.keyframe_requests > requests_before
        # ... and the receiver keeps decoding intact frames after the splice.
        await v.wait_for_frames(v.frames + 30, timeout=5)
        assert v.decodable_fraction() == 1.0 and v.video.corrupt == 0
    finally:
        await stop_all(counters)


async def test_five_percent_loss_is_repaired_by_nack_and_rtx(peers: Peers, clip: Clip) -> None:
    publisher, receiver = peers
    video, _ = add_clip_tracks(publisher, clip)
    counters = count_received(receiver, publisher_id=1)
    await negotiate(publisher, receiver)
    loss = inject_loss(publisher, 0.05, seed=7, kinds=("video",))
    try:
        v = counters["video"]
        await v.wait_for_frames(10, timeout=10)
        v.reset_window()
        sent_before = video.frames_sent
        await v.wait_for_frames(v.frames + 150, timeout=15)  # ~5 s of video
        sent = video.frames_sent - sent_before
        print(
            f"loss: {loss.counts}, intact {v.video.intact}/{v.video.expected}, "
            f"corrupt {v.video.corrupt}, sent {sent}, decodable {v.decodable_fraction():.4f}"
        )
        assert loss.counts.media_dropped > 0.03 * loss.counts.media_sent
        assert loss.counts.rtx_sent > 0  # the receiver NACKed and the sender retransmitted
        assert v.video.expected >= 150
        assert v.decodable_fraction() >= 0.99
    finally:
        loss.remove()
        await stop_all(counters)


async def test_unrepaired_loss_shows_in_the_decodable_fraction(peers: Peers, clip: Clip) -> None:
    """Negative control: no retransmission ever arrives, so the measure must drop."""
    publisher, receiver = peers
    add_clip_tracks(publisher, clip)
    counters = count_received(receiver, publisher_id=1)
    await negotiate(publisher, receiver)
    try:
        async with asyncio.timeout(10):
            while "video" not in counters:
                await asyncio.sleep(0.02)
        v = counters["video"]
        await v.wait_for_frames(10, timeout=10)
        loss = inject_loss(publisher, 0.05, seed=7, kinds=("video",), retransmission_fraction=1.0)
        v.reset_window()
        await asyncio.sleep(3)
        print(f"unrepaired: {loss.counts}, intact {v.video.intact}, {v.decodable_fraction():.3f}")
        assert loss.counts.rtx_dropped > 0
        assert v.decodable_fraction() < 0.9
    finally:
        await stop_all(counters)
