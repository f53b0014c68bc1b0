"""Helpers for tests with two real aiortc peers."""

from __future__ import annotations

from aiortc import RTCPeerConnection
from aiortc.mediastreams import MediaStreamTrack

from media.receiver import FrameCounter


async def negotiate(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    """Offer/answer with complete ICE gathering (aiortc does not trickle)."""
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


def count_received(pc: RTCPeerConnection, publisher_id: int) -> dict[str, FrameCounter]:
    """Start a FrameCounter for each track ``pc`` receives, keyed by kind."""
    counters: dict[str, FrameCounter] = {}

    @pc.on("track")
    def on_track(track: MediaStreamTrack) -> None:
        counter = FrameCounter(track, publisher_id=publisher_id)
        counter.start()
        counters[track.kind] = counter

    return counters


async def stop_all(counters: dict[str, FrameCounter]) -> None:
    """Stop every counter (re-raising any error of their tasks)."""
    for counter in counters.values():
        await counter.stop()
