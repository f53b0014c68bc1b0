"""A publisher leaves while a subscriber's renegotiation is pending (issue 15, the 25-person
room's `no_such_track`): with real aiortc peers through an SFU worker, neither the offer sent
again on `subscribe` nor the subscriber's track list (``media.session.SfuSession.tracks``) still
names the departed publisher's tracks once it has settled, and pausing every listed track
works."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription
from sfu_helpers import PartyFactory, until

from signaling.sdk.wsclient import Client


async def _pause_all(client: Client, tracks: list[str]) -> None:
    """`track_pause` on each track (raises ``ClientError``, e.g. `no_such_track`)."""
    for tid in tracks:
        await client.request({"type": "track_pause", "room": "call", "track": tid, "paused": True})


async def test_offer_sent_again_after_a_publisher_left_does_not_name_its_tracks(
    sfu_server: TestServer, party: PartyFactory, clients: Callable[..., Awaitable[Client]]
) -> None:
    """The subscriber answers by hand (its own aiortc peer connection), so its offer is held
    outstanding exactly while the publisher leaves."""
    sub = await clients(sfu_server, name="sub", identity="sub")
    await sub.request({"type": "join", "room": "call"})
    pc = RTCPeerConnection()

    async def answer(offer: dict[str, Any]) -> None:
        await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        sdp = pc.localDescription.sdp
        await sub.request({"type": "subscribe_answer", "room": "call", "sdp": sdp})

    try:
        alice = await party(sfu_server, "alice", n=1)
        first = await sub.next_event("subscribe_offer")
        await answer(first)
        bob = await party(sfu_server, "bob", n=2)
        waiting = await sub.next_event("subscribe_offer")  # alice's and bob's: not answered yet
        assert {t["participant"] for t in waiting["tracks"]} == {alice.id, bob.id}

        await alice.client.request({"type": "leave", "room": "call"})
        gone = {t["id"] for t in waiting["tracks"] if t["participant"] == alice.id}
        while gone:  # the worker has unpublished them
            gone.discard((await sub.next_event("track_unpublished"))["track"])

        # `subscribe` (a client setting its media up late, or after a resume) gets the waiting
        # offer again: same number and SDP, but alice's tracks are no longer named.
        await sub.request({"type": "subscribe", "room": "call"})
        again = await sub.next_event("subscribe_offer")
        assert again["offer"] == waiting["offer"] and again["sdp"] == waiting["sdp"]
        assert {t["participant"] for t in again["tracks"]} == {bob.id}

        # Answered, each listed track can be paused, and the pending change follows:
        # alice's sections go inactive.
        await answer(again)
        await _pause_all(sub, [t["id"] for t in again["tracks"]])
        settled = await sub.next_event("subscribe_offer")
        assert settled["offer"] == waiting["offer"] + 1
        assert {t["participant"] for t in settled["tracks"]} == {bob.id}
        await answer(settled)
        await _pause_all(sub, [t["id"] for t in settled["tracks"]])
    finally:
        await pc.close()


async def test_subscriber_forgets_the_tracks_of_a_publisher_who_left(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    """``SfuSession`` answering by itself: a publisher joins and another leaves at once (the
    subscriber's renegotiation for the first is in flight when the second leaves)."""
    viewer = await party(sfu_server, "viewer", publish=False, decode=False)
    alice = await party(sfu_server, "alice", n=1, decode=False)
    await until(lambda: len(viewer.media.tracks) == 2, 15)
    alice_mids = {t["mid"] for t in viewer.media.tracks.values()}
    await party(sfu_server, "bob", n=2, decode=False)
    await alice.client.request({"type": "leave", "room": "call"})

    def settled() -> bool:
        """The offer answered last has bob's two sections and alice's inactive."""
        pc = viewer.media.sub
        if pc is None or pc.signalingState != "stable" or pc.remoteDescription is None:
            return False
        sections = SessionDescription.parse(pc.remoteDescription.sdp).media
        sending = {m.rtp.muxId for m in sections if m.direction == "sendonly"}
        return len(sending) == 2 and not sending & alice_mids

    await until(settled, 15)
    listed = viewer.media.tracks
    assert all(t["participant"] != alice.id for t in listed.values()), listed
    assert len(listed) == 2
    await _pause_all(viewer.client, list(listed))
