"""Fixtures for media tests: cached clips and pairs of real aiortc peers on this machine."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from media.clip import Clip, ClipSpec, load_clip


@pytest.fixture(scope="session")
def clip() -> Clip:
    """A 4 s VP8 clip of publisher 1 (encoded once, then read from the cache)."""
    return load_clip(ClipSpec(publisher_id=1, seconds=4.0))


@pytest.fixture
async def peers() -> AsyncIterator[tuple[RTCPeerConnection, RTCPeerConnection]]:
    """Two peer connections without STUN (aioice uses this machine's own address), closed after."""
    a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    b = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    yield a, b
    await a.close()
    await b.close()
