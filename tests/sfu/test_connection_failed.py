"""A room's peer connection that fails or is closed is logged, naming the participant, the
connection and why (issue 15: in the 25-person room, publishers' connections failed when ICE
consent expired, and only aioice said so, at info level). A real aiortc client against a
``sfu.room.Room`` in this process, so the log is captured here."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aioice.ice
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from sfu_helpers import until

from sfu.channel import WorkerEvent
from sfu.forward import Counters
from sfu.room import Room
from sfu.rtc import NeverTrack

Published = tuple[Room, list[WorkerEvent], RTCPeerConnection]


@asynccontextmanager
async def publishing() -> AsyncIterator[Published]:
    """Alice (identity "alice") publishes audio to a room; her connection is up."""
    events: list[WorkerEvent] = []
    room = Room("call", events.append, Counters())
    room.join("p1", subscribe=False, identity="alice", name="Alice")
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        client.addTransceiver(NeverTrack("audio"), direction="sendonly")
        await client.setLocalDescription(await client.createOffer())
        mid = client.getTransceivers()[0].mid
        sdp = await room.publish(
            "p1", client.localDescription.sdp, [{"mid": mid, "source": "microphone"}]
        )
        await client.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
        pub = room.participants["p1"].pub
        assert pub is not None
        await until(lambda: pub.connectionState == "connected", 20)
        yield room, events, client
    finally:
        await client.close()
        await room.close()


@pytest.fixture
async def published() -> AsyncIterator[Published]:
    async with publishing() as p:
        yield p


@pytest.fixture
async def published_fast_consent(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Published]:
    """``published``, ICE consent (RFC 7675) checked every 0.1 s instead of ~5 s (aioice's
    checks: one try of 0.5 s each; six unanswered in a row and the connection closes)."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.1)
    async with publishing() as p:
        yield p


def _failed(events: list[WorkerEvent]) -> list[dict[str, Any]]:
    return [dict(e) for e in events if e["ev"] == "media_failed"]


async def test_consent_expiry_is_logged_at_warning(
    published_fast_consent: Published,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, events, client = published_fast_consent
    # The client stops answering the room's consent checks (its ICE connection ignores STUN
    # requests), as the 25-person room's overloaded load generator did in time.
    ice = client.getTransceivers()[0].sender.transport.transport._connection
    caplog.set_level(logging.INFO, logger="rallypoint.sfu.room")
    monkeypatch.setattr(ice, "request_received", lambda *args: None)
    await until(lambda: bool(_failed(events)), 10)
    assert _failed(events) == [
        {"ev": "media_failed", "room": "call", "participant": "p1", "which": "publisher"}
    ]
    said = [r for r in caplog.records if r.name == "rallypoint.sfu.room"]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (
            logging.WARNING,
            "room call: participant p1 (alice): publisher connection failed: "
            "ICE consent expired (6 checks in a row unanswered in time: the client is gone "
            "or unreachable, or this worker is too busy to read the answers)",
        )
    ]


async def test_client_closing_its_connection_is_logged_at_info(
    published: Published,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, events, client = published
    caplog.set_level(logging.INFO, logger="rallypoint.sfu.room")
    await client.close()  # DTLS close_notify: the room's connection closes
    await until(lambda: bool(_failed(events)), 10)
    said = [r for r in caplog.records if r.name == "rallypoint.sfu.room"]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (
            logging.INFO,
            "room call: participant p1 (alice): publisher connection closed: "
            "closed by the client (DTLS close_notify)",
        )
    ]
