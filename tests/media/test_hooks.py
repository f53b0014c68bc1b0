"""The private aiortc hooks fail clearly when missing or used too early."""

from __future__ import annotations

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from media.clip import Clip
from media.loss import inject_loss
from media.tracks import EncodedVideoTrack, attach_keyframe_requests


def test_keyframe_hook_missing_is_a_clear_error(clip: Clip) -> None:
    track = EncodedVideoTrack(clip)
    with pytest.raises(RuntimeError, match="_send_keyframe"):
        attach_keyframe_requests(object(), track)
    track.stop()


async def test_loss_before_negotiation_is_a_clear_error() -> None:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        with pytest.raises(RuntimeError, match="after negotiation"):
            inject_loss(pc, 0.05)
        with pytest.raises(ValueError):
            inject_loss(pc, 1.5)
    finally:
        await pc.close()
