"""Calls end to end: simulated phones (SDK clients, some identities on two devices) against the
real server: ringing, accept, answered elsewhere, decline, busy, missed, cancel, group calls,
resume during a call, the call log on every device, and bad input."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from call_helpers import Phone
from stores import BACKENDS

from signaling.app import CALLS
from signaling.core.tokens import create_token
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import ClientError


@pytest.fixture(params=BACKENDS)
def server_store(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both chat store back ends."""
    return str(request.param)


Start = Callable[..., Awaitable[TestServer]]
KEY, SECRET = "test-key", "a-test-secret-of-at-least-32-bytes"


async def call_log(phone: RallypointClient, conversation: str) -> dict[str, Any]:
    """The next call-log message this device receives in ``conversation``."""
    m = await phone.next_message(conversation, where=lambda m: m["kind"] == "call")
    assert m["type"] == "message" and m["cid"].startswith("call-")
    return m


def taken(events: asyncio.Queue[dict[str, Any]]) -> list[str]:
    """The types of the events received and not taken yet (taking them)."""
    out = []
    while not events.empty():
        out.append(events.get_nowait()["type"])
    return out


def assert_idle(server: TestServer) -> None:
    """No call state is left behind."""
    book = server.app[CALLS].book
    assert book.calls == {} and book.by_identity == {}


async def test_every_device_rings_first_answer_wins(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice", device="alice-phone")
    bob_phone = await phones(server, "bob", device="bob-phone")
    bob_tablet = await phones(server, "bob", device="bob-tablet")

    call = await alice.call("bob", video=True)
    assert call.state == "ringing" and call.media == "p2p" and call.room is None
    assert call.parties == {"alice": "joined", "bob": "invited"}
    on_phone = await bob_phone.next_call()
    on_tablet = await bob_tablet.next_call()
    assert on_phone.id == on_tablet.id == call.id
    assert on_phone.caller == "alice" and on_phone.video and on_phone.peer_device == alice.session
    await on_phone.ringing()
    await on_tablet.ringing()
    ringing = await call.next_event()
    assert ringing["type"] == "call_ringing" and ringing["identity"] == "bob"
    assert ringing["device"] == bob_phone.session

    state = await on_tablet.accept()
    assert state["state"] == "active" and state["role"] == "callee"
    assert {"identity": "bob", "status": "joined", "device": bob_tablet.session} in state["parties"]
    # The very next event: the tablet reported ringing before it answered, so a second
    # `call_ringing` (one per callee, not per device) would have come before this one.
    accepted = await call.next_event()
    assert accepted["type"] == "call_accepted" and accepted["device"] == bob_tablet.session
    assert call.peer_device == bob_tablet.session
    elsewhere = await on_phone.ended
    assert elsewhere["type"] == "call_answered_elsewhere"
    assert elsewhere["device"] == bob_tablet.session and on_phone.outcome == "answered_elsewhere"
    # The phone that lost the race cannot answer any more.
    with pytest.raises(ClientError) as e:
        await on_phone.accept()
    assert e.value.code == "already_answered"

    await asyncio.sleep(0.05)
    await call.hangup()
    assert await call.wait_ended() == "completed"
    # `call_ended` came last: nothing else reached the caller since `call_accepted`.
    assert taken(call.events) == ["call_ended"]
    assert await on_tablet.wait_ended() == "completed"
    assert (await on_tablet.ended)["duration_ms"] >= 50
    for phone in (alice, bob_phone, bob_tablet):
        log = await call_log(phone, "dm:alice|bob")
        assert log["call"]["outcome"] == "completed" and log["call"]["id"] == call.id
        assert log["call"]["duration_ms"] >= 50 and log["call"]["video"] is True
        assert log["from"] == "alice" and log["text"].startswith("Video call, 0:0")
    history = await bob_phone.history("dm:alice|bob")
    assert [m["kind"] for m in history] == ["call"]
    assert_idle(server)


async def test_decline_stops_every_device(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice")
    bob_phone = await phones(server, "bob")
    bob_tablet = await phones(server, "bob")
    call = await alice.call("bob")
    incoming = await bob_phone.next_call()
    other = await bob_tablet.next_call()
    await incoming.decline()
    assert (await call.next_event("call_declined"))["identity"] == "bob"
    assert await call.wait_ended() == "declined"
    assert await other.wait_ended() == "declined"
    assert await incoming.wait_ended() == "declined"
    for phone in (alice, bob_phone, bob_tablet):
        log = await call_log(phone, "dm:alice|bob")
        assert log["call"]["outcome"] == "declined" and log["text"] == "Declined call"
    with pytest.raises(ClientError) as e:
        await other.accept()
    assert e.value.code == "call_ended"
    assert_idle(server)


async def test_busy_callee_is_reported_at_once(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    carol = await phones(server, "carol")
    call = await alice.call("bob")
    answered = await bob.next_call()
    await answered.accept()
    await call.next_event("call_accepted")

    for callee in ("bob", "alice"):  # a callee that answered, and a caller, are both in a call
        second = await carol.call(callee)
        assert (await second.next_event("call_busy"))["identity"] == callee
        assert await second.wait_ended() == "busy"
        log = await call_log(carol, f"dm:{min('carol', callee)}|{max('carol', callee)}")
        assert log["call"]["outcome"] == "busy" and log["call"]["callee"] == callee
    # The first call goes on undisturbed.
    assert server.app[CALLS].book.calls[call.id].state == "active"
    with pytest.raises(ClientError) as e:
        await alice.call("carol")
    assert e.value.code == "in_call"
    await call.hangup()
    assert await call.wait_ended() == "completed"
    assert await answered.wait_ended() == "completed"
    # The end of the first call reached both after anything carol's calls sent them: neither
    # the busy callee's devices nor the busy caller's ever rang.
    assert bob.incoming.empty()
    assert alice.incoming.empty()


async def test_no_answer_is_missed(start_server: Start, phones: Phone) -> None:
    server = await start_server(calls__ring_timeout_s=0.4)
    alice = await phones(server, "alice")
    bob_phone = await phones(server, "bob")
    bob_tablet = await phones(server, "bob")
    call = await alice.call("bob")
    incoming = await bob_phone.next_call()
    await bob_tablet.next_call()
    assert (await call.next_event("call_missed", timeout=5))["identity"] == "bob"
    assert await call.wait_ended() == "missed"
    assert await incoming.wait_ended() == "missed"
    for phone in (alice, bob_phone, bob_tablet):
        log = await call_log(phone, "dm:alice|bob")
        assert log["call"]["outcome"] == "missed" and log["text"] == "Missed call"
    with pytest.raises(ClientError) as e:
        await incoming.accept()
    assert e.value.code == "call_ended"
    assert_idle(server)


async def test_caller_cancels(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice")
    bob_phone = await phones(server, "bob")
    bob_tablet = await phones(server, "bob")
    call = await alice.call("bob")
    a, b = await bob_phone.next_call(), await bob_tablet.next_call()
    await call.cancel()
    assert await call.wait_ended() == "cancelled"
    assert await a.wait_ended() == "cancelled" and await b.wait_ended() == "cancelled"
    for phone in (alice, bob_phone, bob_tablet):
        assert (await call_log(phone, "dm:alice|bob"))["call"]["outcome"] == "cancelled"
    with pytest.raises(ClientError) as e:
        await a.accept()
    assert e.value.code == "call_ended"
    assert_idle(server)


async def test_group_call_through_a_room(start_server: Start, phones: Phone) -> None:
    """Token mode: the tokens grant the group's room only; the call's media room is granted
    to the call's parties by the call itself."""
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)

    def token(identity: str) -> str:
        return create_token(KEY, SECRET, identity, rooms={"family": ["join", "chat"]})

    alice = await phones(server, "alice", token=token("alice"))
    bob = await phones(server, "bob", token=token("bob"))
    carol = await phones(server, "carol", token=token("carol"))
    dave = await phones(server, "dave", token=token("dave"))  # in the room, not in the call
    for p in (alice, bob, dave):
        await p.join("family")
    call = await alice.call("bob", "carol", room="family")
    assert call.group and call.media == "sfu" and call.room == f"call-{call.id}"
    for p in (bob, carol):
        incoming = await p.next_call()
        assert incoming.group and incoming.room == call.room
    # Only parties may enter the media room.
    with pytest.raises(ClientError) as e:
        await dave.join(call.room)
    assert e.value.code == "token_wrong_room"
    bob_call = bob.calls[call.id]
    state = await bob_call.accept()
    assert state["room"] == call.room and state["media"] == "sfu"
    joined = await bob_call.join_media_room()
    assert joined["room"] == call.room
    await alice.join(call.room)
    await carol.calls[call.id].decline()
    assert (await call.next_event("call_declined"))["identity"] == "carol"
    # Group P2P signaling needs an explicit target.
    with pytest.raises(ClientError) as e:
        await call.signal("offer", sdp="v=0")
    assert e.value.code == "bad_field"
    await call.hangup()
    assert (await bob_call.next_event("call_left"))["identity"] == "alice"
    assert await bob_call.wait_ended() == "completed"  # alone: the call is over
    for p in (alice, bob, carol, dave):
        log = await call_log(p, "room:family")
        assert log["call"]["outcome"] == "completed" and log["call"]["group"] is True
    assert_idle(server)


async def test_group_call_without_a_room_logs_per_callee(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    carol = await phones(server, "carol")
    call = await alice.call("bob", "carol")
    await (await bob.next_call()).accept()
    await (await carol.next_call()).decline()
    await call.next_event("call_declined")
    await call.hangup()
    assert await call.wait_ended() == "completed"
    bob_log = await call_log(bob, "dm:alice|bob")
    carol_log = await call_log(carol, "dm:alice|carol")
    assert bob_log["call"]["outcome"] == "completed" and carol_log["call"]["outcome"] == "declined"
    assert {
        (await call_log(alice, c))["call"]["outcome"] for c in ("dm:alice|bob", "dm:alice|carol")
    } <= {"completed", "declined"}


async def test_call_survives_a_dropped_socket_and_relays_ice_restart(
    start_server: Start, phones: Phone
) -> None:
    server = await start_server(session__resume_grace_s=5)
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    call = await alice.call("bob")
    incoming = await bob.next_call()
    await incoming.accept()
    await call.next_event("call_accepted")

    await bob.drop()  # the network switches; the SDK resumes by itself
    await bob.next_event("_reconnected")
    state = await incoming.next_event("call_state")
    assert state["state"] == "active" and bob.welcome["resumed"] is True
    await incoming.signal("offer", sdp="v=0\r\n", restart=True)
    sig = await call.signals.get()
    assert sig["kind"] == "offer" and sig["restart"] is True and sig["from"] == bob.session
    await call.signal("answer", sdp="v=0\r\n")
    assert (await incoming.signals.get())["kind"] == "answer"
    await incoming.signal(
        "candidate", candidate="candidate:1 1 udp 1 192.0.2.1 9 typ host", mid="0", mline=0
    )
    cand = await call.signals.get()
    assert cand["candidate"].startswith("candidate:1") and cand["mid"] == "0" and cand["mline"] == 0
    assert call.state == "active"
    await incoming.hangup()
    assert await call.wait_ended() == "completed"


async def test_call_ends_when_a_dropped_device_never_returns(
    start_server: Start, phones: Phone
) -> None:
    server = await start_server(session__resume_grace_s=0.3)
    alice = await phones(server, "alice", reconnect=False)
    bob = await phones(server, "bob")
    await alice.call("bob")
    incoming = await bob.next_call()
    await incoming.accept()
    await alice.drop()
    assert (await incoming.next_event("call_left", timeout=5))["identity"] == "alice"
    assert await incoming.wait_ended() == "completed"
    assert (await call_log(bob, "dm:alice|bob"))["call"]["outcome"] == "completed"
    assert_idle(server)


async def test_a_device_that_connects_while_ringing_rings(
    server: TestServer, phones: Phone
) -> None:
    alice = await phones(server, "alice")
    bob_old = await phones(server, "bob")
    await bob_old.close()  # bob is known, but has no device online
    call = await alice.call("bob")
    assert call.parties["bob"] == "invited"
    bob = await phones(server, "bob")  # e.g. woken by the push
    incoming = await bob.next_call()
    assert incoming.id == call.id and incoming.ice_servers == []
    await incoming.accept()
    assert (await call.next_event("call_accepted"))["device"] == bob.session
    await call.hangup()


async def test_bad_call_input_leaves_state_intact(server: TestServer, phones: Phone) -> None:
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    carol = await phones(server, "carol")

    async def code(client: RallypointClient, msg: dict[str, Any]) -> str:
        with pytest.raises(ClientError) as e:
            await client.request(msg)
        return e.value.code

    # (An identity that does not exist is no bad input: it is called like one that is offline
    # and never answers, so that nobody can probe which identities exist; test_privacy.py.)
    assert await code(alice, {"type": "call_invite", "to": ["alice"]}) == "bad_field"
    assert await code(alice, {"type": "call_invite", "to": []}) == "bad_field"
    assert await code(alice, {"type": "call_invite", "to": ["bad id"]}) == "bad_field"
    assert await code(alice, {"type": "call_invite", "to": ["bob"], "room": "r"}) == "bad_field"
    assert_idle(server)

    call = await alice.call("bob")
    incoming = await bob.next_call()
    assert incoming.id == call.id  # the first call that rang bob: none of the refused ones did
    forged = {"call": "forged-call-id"}
    for t in ("call_accept", "call_decline", "call_ringing", "call_cancel", "call_hangup"):
        assert await code(bob, {"type": t, **forged}) == "no_such_call"
    # A stranger cannot act on, or learn about, someone else's call.
    for t in ("call_accept", "call_decline", "call_hangup"):
        assert await code(carol, {"type": t, "call": call.id}) == "no_such_call"
    assert await code(bob, {"type": "call_cancel", "call": call.id}) == "forbidden"
    assert await code(alice, {"type": "call_accept", "call": call.id}) == "forbidden"
    signal = {"type": "call_signal", "call": call.id, "kind": "offer", "sdp": "v=0"}
    assert await code(alice, signal) == "not_in_call"  # nobody answered yet
    assert await code(alice, {**signal, "sdp": None}) == "bad_field"
    no_sdp = {"type": "call_signal", "call": call.id, "kind": "offer"}
    assert await code(alice, no_sdp) == "bad_field"

    await incoming.accept()
    assert await code(bob, {"type": "call_accept", "call": call.id}) == "already_answered"
    assert await code(bob, {"type": "call_decline", "call": call.id}) == "already_answered"
    assert await code(alice, {"type": "call_cancel", "call": call.id}) == "already_answered"
    assert await code(alice, {**signal, "to": carol.session}) == "not_in_call"
    # The call is still intact: signaling flows and it ends normally.
    await call.signal("offer", sdp="v=0")
    assert (await incoming.signals.get())["sdp"] == "v=0"
    await call.hangup()
    assert await call.wait_ended() == "completed"
    assert await code(bob, {"type": "call_accept", "call": call.id}) == "call_ended"
    assert await code(alice, {"type": "call_hangup", "call": call.id}) == "call_ended"
    assert await code(carol, {"type": "call_hangup", "call": call.id}) == "no_such_call"
    assert_idle(server)
    # And the server still works for everyone.
    again = await carol.call("bob")
    await (await bob.next_call()).accept()
    await again.hangup()
    assert await again.wait_ended() == "completed"


async def test_call_of_a_sent_message_is_not_editable(server: TestServer, phones: Phone) -> None:
    """Call logs are part of the conversation but cannot be edited like text."""
    alice = await phones(server, "alice")
    bob = await phones(server, "bob")
    call = await alice.call("bob")
    await (await bob.next_call()).decline()
    await call.wait_ended()
    log = await call_log(alice, "dm:alice|bob")
    with pytest.raises(ClientError) as e:
        await alice.request(
            {
                "type": "edit",
                "conversation": "dm:alice|bob",
                "cid": "e1",
                "ref": log["seq"],
                "text": "x",
            }
        )
    assert e.value.code == "no_such_message"


async def test_a_call_that_rang_while_the_socket_was_down(
    start_server: Start, phones: Phone
) -> None:
    server = await start_server(session__resume_grace_s=5)
    alice = await phones(server, "alice")
    bob = await phones(server, "bob", reconnect=False)
    token = bob.welcome["resume"]
    await bob.drop()  # suspended: its session still counts as one of bob's devices
    call = await alice.call("bob")
    bob_again = await phones(server, "bob", resume=token)
    incoming = await bob_again.next_call()
    assert bob_again.welcome["resumed"] is True
    assert incoming.id == call.id and incoming.role == "callee" and incoming.state == "ringing"
    await incoming.accept()
    assert (await call.next_event("call_accepted"))["device"] == bob.session
    await call.hangup()
    assert await incoming.wait_ended() == "completed"
