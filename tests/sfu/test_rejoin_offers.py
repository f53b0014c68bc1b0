"""A participant that leaves a worker's room while its subscriber offer is being made, and
joins again under the same id (a session that moved to another node of a cluster joins the
room's media from there): only the new participant's offers go out. Before, the departed
one's offer was emitted too, numbered as if it were the newcomer's, and a client that took it
answered an offer nobody on the server side would connect (the flaky
``test_cluster_media.py::test_a_session_that_moves_to_another_node_publishes_again``).

The worker's ``Room`` with real aiortc peer connections; the room's one published track is
an ``UpTrack`` put in place as ``Room.publish`` leaves it (no publisher connection needed to
make a subscriber offer)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiortc import RTCPeerConnection

from sfu.forward import Counters, UpTrack
from sfu.room import Participant, Room


def _room() -> tuple[Room, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    counters = Counters()
    room = Room("r", events.append, counters)
    room.tracks["bob:0"] = UpTrack(
        id="bob:0",
        publisher="bob",
        kind="audio",
        source="microphone",
        codec="opus",
        request_keyframe=lambda: None,
        counters=counters,
    )
    return room, events


def _offers(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["ev"] == "subscribe_offer"]


async def test_a_participant_that_left_before_its_offer_was_made_sends_none() -> None:
    room, events = _room()
    try:
        room.join("alice", True)  # its offer is made by a task that has not run yet
        old = room.participants["alice"]
        await room.leave("alice")
        room.join("alice", True)  # the same id again: a new participant
        new = room.participants["alice"]
        assert new is not old
        async with asyncio.timeout(10):
            while not _offers(events):
                await asyncio.sleep(0.01)
            await room._tasks.wait()
        offers = _offers(events)
        assert len(offers) == 1, [(o["offer"], o["sdp"][:60]) for o in offers]
        assert new.sub is not None and new.sub.localDescription is not None
        assert offers[0]["sdp"] == new.sub.localDescription.sdp
        assert offers[0]["offer"] == new.offers == 1
        assert old.sub is None  # no connection was made for the one that left
    finally:
        await room.close()


async def test_a_participant_that_leaves_while_its_offer_is_made_sends_none() -> None:
    room, events = _room()
    try:
        room.join("alice", True)
        old = room.participants["alice"]
        async with asyncio.timeout(10):
            while old.sub is None:  # its renegotiation is under way (createOffer)
                await asyncio.sleep(0)
        assert not _offers(events)
        await room.leave("alice")
        room.join("alice", True)
        new = room.participants["alice"]
        async with asyncio.timeout(10):
            while not _offers(events):
                await asyncio.sleep(0.01)
            await room._tasks.wait()
        offers = _offers(events)
        assert [o["sdp"] for o in offers] == [new.sub.localDescription.sdp]  # type: ignore[union-attr]
        assert old.sub.connectionState == "closed"  # type: ignore[union-attr]
    finally:
        await room.close()


async def test_no_offer_is_made_on_a_closed_subscriber_connection() -> None:
    """A renegotiation (a track published) that comes after the client closed its subscriber
    connection, before ``_transport_failed`` has replaced it, leaves it to that: no error (an
    ``addTransceiver`` on a closed connection raises), and the participant is not left
    ``negotiating``, which would hold every later offer."""
    room, events = _room()
    try:
        p = Participant("alice", True)
        room.participants["alice"] = p
        p.sub = RTCPeerConnection()  # closed, as the client's close leaves it meanwhile
        await p.sub.close()
        await room._renegotiate(p)
        assert not p.negotiating
        assert not _offers(events)
    finally:
        await room.close()
