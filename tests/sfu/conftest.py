"""Fixtures for SFU tests: a server with SFU workers and participants publishing test clips."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from sfu_helpers import Party, PartyFactory

from media.clip import ClipSpec, load_clip
from media.session import SfuSession
from media.tracks import EncodedAudioTrack, EncodedVideoTrack, attach_keyframe_requests
from signaling.sdk.wsclient import Client


@pytest.fixture
async def sfu_server(start_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    return await start_server(sfu__enabled=True, sfu__workers=1)


@pytest.fixture
async def party(clients: Callable[..., Awaitable[Client]]) -> AsyncIterator[PartyFactory]:
    """``await party(server, "name", publish=True, n=1)``: joined, publishing clip ``n``."""
    made: list[Party] = []

    async def make(
        server: TestServer,
        name: str,
        *,
        room: str = "call",
        publish: bool = True,
        n: int = 1,
        seconds: float = 3.0,
        codec: str = "vp8",
        token: str | None = None,
        **session: Any,
    ) -> Party:
        if token is None:
            c = await clients(server, name=name, identity=name)
        else:
            c = await clients(server, name=name, token=token)
        await c.request({"type": "join", "room": room})
        p = Party(c, SfuSession(c, room, **session))
        made.append(p)
        if publish:
            clip = load_clip(ClipSpec(publisher_id=n, seconds=seconds, codec=codec))
            p.video = EncodedVideoTrack(clip)
            p.transceivers = await p.media.publish(
                [(p.video, "camera"), (EncodedAudioTrack(clip), "microphone")]
            )
            attach_keyframe_requests(p.transceivers[0].sender, p.video)
        return p

    yield make
    for p in made:
        await p.media.close()
