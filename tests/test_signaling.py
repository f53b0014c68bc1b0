"""The running server with real WebSocket clients: rooms, presence, chat, resume."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from stores import BACKENDS

from signaling.app import ENDPOINT, STORE
from signaling.net import endpoint as endpoint_module
from signaling.sdk.wsclient import Client, ClientError

#: The chat tests run on each chat store back end (``tests/stores.py``).
ON_BOTH_STORES = pytest.mark.parametrize("server_store", BACKENDS)

Connect = Callable[..., Awaitable[Client]]


async def joined(clients: Connect, server: TestServer, room: str, *names: str) -> list[Client]:
    out = []
    for n in names:
        c = await clients(server, name=n.title(), identity=n)
        await c.request({"type": "join", "room": room})
        out.append(c)
    for c in out:
        c.drain()
    return out


async def test_welcome_describes_the_session(server: TestServer, clients: Connect) -> None:
    c = await clients(server, name="Alice", identity="alice", device="phone")
    w = c.welcome
    assert w["type"] == "welcome" and w["identity"] == "alice" and w["name"] == "Alice"
    assert w["device"] == "phone" and w["open_mode"] is True and w["resumed"] is False
    assert w["heartbeat_ms"] == 25000 and w["resume_grace_ms"] == 30000
    assert len(w["resume"]) >= 32 and w["epoch"] and w["ice_servers"] == []
    assert w["limits"]["max_frame_bytes"] == 65536
    assert w["ice_transport_policy"] == "all"


async def test_join_and_participant_events(server: TestServer, clients: Connect) -> None:
    a = await clients(server, name="Alice", identity="alice")
    b = await clients(server, name="Bob", identity="bob")
    ja = await a.request({"type": "join", "room": "lobby"})
    assert ja["participants"] == [] and ja["self"]["moderator"] is True  # first joiner
    jb = await b.request({"type": "join", "room": "lobby"})
    assert [p["identity"] for p in jb["participants"]] == ["alice"]
    assert jb["self"]["moderator"] is False and jb["conversation"] == "room:lobby"
    ev = await a.next_event("participant_joined")
    assert ev["participant"]["identity"] == "bob" and ev["room"] == "lobby"

    await b.request({"type": "update", "room": "lobby", "audio_muted": True, "name": "Bobby"})
    ev = await a.next_event("participant_updated")
    assert ev["participant"]["audio_muted"] is True and ev["participant"]["name"] == "Bobby"

    await b.request({"type": "leave", "room": "lobby"})
    ev = await a.next_event("participant_left")
    assert ev["identity"] == "bob" and ev["reason"] == "left"
    with pytest.raises(ClientError) as e:
        await b.request({"type": "leave", "room": "lobby"})
    assert e.value.code == "not_in_room"


async def test_room_limit(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    server = await start_server(rooms__max_participants=2)
    await joined(clients, server, "small", "a", "b")
    c = await clients(server, name="C")
    with pytest.raises(ClientError) as e:
        await c.request({"type": "join", "room": "small"})
    assert e.value.code == "room_full"


async def test_moderation_kick_mute_lock(server: TestServer, clients: Connect) -> None:
    mod, bob, carol = await joined(clients, server, "r", "mod", "bob", "carol")
    bob_id = bob.welcome["session"]
    with pytest.raises(ClientError) as e:
        await bob.request({"type": "lock", "room": "r", "locked": True})
    assert e.value.code == "forbidden"

    await mod.request({"type": "mute", "room": "r", "participant": bob_id, "kind": "audio"})
    ev = await bob.next_event("mute_requested")
    assert ev["kind"] == "audio" and ev["by"] == mod.welcome["session"]

    await mod.request({"type": "lock", "room": "r", "locked": True})
    assert (await carol.next_event("room_updated"))["locked"] is True
    dave = await clients(server, name="Dave")
    with pytest.raises(ClientError) as e:
        await dave.request({"type": "join", "room": "r"})
    assert e.value.code == "room_locked"

    await mod.request({"type": "kick", "room": "r", "participant": bob_id})
    assert (await bob.next_event("kicked"))["room"] == "r"
    ev = await carol.next_event("participant_left")
    assert ev["participant"] == bob_id and ev["reason"] == "kicked"
    with pytest.raises(ClientError) as e:
        await bob.send_chat("room:r", "still here?")
    assert e.value.code == "not_in_room"
    with pytest.raises(ClientError) as e:
        await mod.request({"type": "kick", "room": "r", "participant": "nobody"})
    assert e.value.code == "no_such_participant"


@ON_BOTH_STORES
async def test_chat_in_order_to_three_clients(server: TestServer, clients: Connect) -> None:
    a, b, c = await joined(clients, server, "chat", "alice", "bob", "carol")
    # Everyone sends concurrently; each receiver sees the others' messages in seq order.
    sends = [
        cl.send_chat("room:chat", f"{cl.welcome['identity']}-{i}")
        for i in range(20)
        for cl in (a, b, c)
    ]
    acks = await asyncio.gather(*sends)
    assert sorted(x["seq"] for x in acks) == list(range(1, 61))
    for cl in (a, b, c):
        got = [await cl.next_event("message") for _ in range(40)]
        seqs = [m["seq"] for m in got]
        assert seqs == sorted(seqs)
        assert all(m["from"] != cl.welcome["identity"] for m in got)
        mine = {x["seq"] for x in acks} - set(seqs)
        assert len(mine) == 20  # its own messages came back only as acks


@ON_BOTH_STORES
async def test_history_paging(server: TestServer, clients: Connect) -> None:
    (a,) = await joined(clients, server, "h", "alice")
    for i in range(1, 13):
        await a.send_chat("room:h", f"m{i}")
    latest = await a.request({"type": "history", "conversation": "room:h", "limit": 5})
    assert [m["text"] for m in latest["messages"]] == [f"m{i}" for i in range(8, 13)]
    assert latest["more"] is True and latest["last_seq"] == 12
    older = await a.request({"type": "history", "conversation": "room:h", "before": 8, "limit": 5})
    assert [m["seq"] for m in older["messages"]] == [3, 4, 5, 6, 7]
    fwd = await a.request({"type": "history", "conversation": "room:h", "after": 10})
    assert [m["seq"] for m in fwd["messages"]] == [11, 12] and fwd["more"] is False
    # A late joiner reads the history too.
    (z,) = await joined(clients, server, "h", "zed")
    page = await z.request({"type": "history", "conversation": "room:h"})
    assert len(page["messages"]) == 12
    with pytest.raises(ClientError) as e:
        await z.request({"type": "history", "conversation": "room:h", "before": 3, "after": 1})
    assert e.value.code == "bad_field"


@ON_BOTH_STORES
async def test_direct_messages_reach_every_device(server: TestServer, clients: Connect) -> None:
    alice = await clients(server, name="Alice", identity="alice", device="laptop")
    alice_phone = await clients(server, name="Alice", identity="alice", device="phone")
    bob = await clients(server, name="Bob", identity="bob")
    eve = await clients(server, name="Eve", identity="eve")
    ack = await bob.send_chat("dm:alice|bob", "psst")
    for dev in (alice, alice_phone):
        m = await dev.next_event("message")
        assert m["text"] == "psst" and m["from"] == "bob" and m["seq"] == ack["seq"] == 1
    await alice.send_chat("dm:alice|bob", "hey")
    assert (await alice_phone.next_event("message"))["text"] == "hey"  # own other device
    assert (await bob.next_event("message"))["text"] == "hey"
    # Both messages were sent to everyone they were for before bob read "hey"; the server writes
    # to a connection in order, so once eve has her `pong`, she has read anything sent to her.
    await eve.request({"type": "ping"})
    assert [e for e in eve.drain() if e["type"] == "message"] == []
    for conv in ("dm:alice|bob", "dm:bob|alice", "dm:alice|alice"):
        with pytest.raises(ClientError) as e:
            await eve.send_chat(conv, "let me in")
        assert e.value.code == "bad_conversation"
    with pytest.raises(ClientError) as e:
        await eve.request({"type": "history", "conversation": "dm:alice|bob"})
    assert e.value.code == "bad_conversation"
    convs = await bob.request({"type": "conversations"})
    (item,) = convs["items"]
    assert convs["more"] is False and "cursor" not in convs
    assert {k: item[k] for k in ("conversation", "kind", "last_seq", "read_seq", "unread")} == {
        "conversation": "dm:alice|bob",
        "kind": "dm",
        "last_seq": 2,
        "read_seq": 0,
        "unread": 1,  # alice's "hey"; bob's own "psst" does not count
    }
    assert item["last_message"]["text"] == "hey" and item["muted"] is False


@ON_BOTH_STORES
async def test_read_receipts_and_typing(server: TestServer, clients: Connect) -> None:
    a, b = await joined(clients, server, "rr", "alice", "bob")
    for i in range(3):
        await a.send_chat("room:rr", f"m{i}")
    await b.request({"type": "typing", "conversation": "room:rr", "active": True})
    t = await a.next_event("typing")
    assert t["identity"] == "bob" and t["active"] is True
    await b.request({"type": "read", "conversation": "room:rr", "seq": 2})
    r = await a.next_event("receipt")
    assert r == {"type": "receipt", "conversation": "room:rr", "identity": "bob", "seq": 2}
    await b.request({"type": "read", "conversation": "room:rr", "seq": 1})  # no move, no event
    await b.request({"type": "read", "conversation": "room:rr", "seq": 3})
    assert (await a.next_event("receipt"))["seq"] == 3
    (item,) = (await b.request({"type": "conversations"}))["items"]  # bob read in it
    assert item["conversation"] == "room:rr" and item["kind"] == "room"
    assert (item["last_seq"], item["read_seq"], item["unread"]) == (3, 3, 0)
    assert item["last_message"]["text"] == "m2"


async def test_a_read_in_a_room_gives_ones_devices_in_it_the_unread_count(
    server: TestServer, clients: Connect
) -> None:
    """PROTOCOL.md: the reader's own other devices get the receipt with `unread`, so every
    device shows the same count. A device of alice's that is in the room too got only the
    plain receipt (the one for the room's other participants), with no count."""
    a, a2, b = await joined(clients, server, "rc", "alice", "alice", "bob")
    for i in range(3):
        await b.send_chat("room:rc", f"m{i}")
    await a.request({"type": "read", "conversation": "room:rc", "seq": 1})
    own = await a2.next_event("receipt", where=lambda r: "unread" in r)
    assert own == {
        "type": "receipt",
        "conversation": "room:rc",
        "identity": "alice",
        "seq": 1,
        "unread": 2,
    }
    plain = await b.next_event("receipt")
    assert plain == {"type": "receipt", "conversation": "room:rc", "identity": "alice", "seq": 1}
    await asyncio.sleep(0.1)
    assert [r for r in b.drain() if r["type"] == "receipt"] == []  # bob's is plain, and once


@ON_BOTH_STORES
async def test_edit_and_delete(server: TestServer, clients: Connect) -> None:
    mod, a, b = await joined(clients, server, "ed", "mod", "alice", "bob")
    orig = await a.send_chat("room:ed", "helo")
    await a.request(
        {
            "type": "edit",
            "conversation": "room:ed",
            "cid": "e1",
            "ref": orig["seq"],
            "text": "hello",
        }
    )
    msgs = [await b.next_event("message") for _ in range(2)]
    assert msgs[1]["kind"] == "edit" and msgs[1]["ref"] == orig["seq"]
    assert msgs[1]["text"] == "hello"
    with pytest.raises(ClientError) as e:
        await b.request(
            {"type": "delete", "conversation": "room:ed", "cid": "d0", "ref": orig["seq"]}
        )
    assert e.value.code == "not_author"
    await mod.request(
        {"type": "delete", "conversation": "room:ed", "cid": "d1", "ref": orig["seq"]}
    )
    d = await b.next_event("message")
    assert d["kind"] == "delete" and "text" not in d
    with pytest.raises(ClientError) as e:
        await a.request(
            {
                "type": "edit",
                "conversation": "room:ed",
                "cid": "e2",
                "ref": orig["seq"],
                "text": "again",
            }
        )
    assert e.value.code == "already_deleted"
    hist = await b.request({"type": "history", "conversation": "room:ed"})
    assert [m["kind"] for m in hist["messages"]] == ["text", "edit", "delete"]
    assert "text" not in hist["messages"][0]


@ON_BOTH_STORES
async def test_duplicate_sends_are_stored_once(server: TestServer, clients: Connect) -> None:
    a, b = await joined(clients, server, "dup", "alice", "bob")
    first = await a.send_chat("room:dup", "once", cid="same-cid")
    again = await a.send_chat("room:dup", "once", cid="same-cid")
    assert again["duplicate"] is True and first["duplicate"] is False
    assert {k: again[k] for k in ("cid", "mid", "seq", "ts")} == {
        k: first[k] for k in ("cid", "mid", "seq", "ts")
    }
    await a.send_chat("room:dup", "next")
    got = [await b.next_event("message") for _ in range(2)]
    assert [m["text"] for m in got] == ["once", "next"]  # the retry was not delivered again
    hist = await a.request({"type": "history", "conversation": "room:dup"})
    assert [m["text"] for m in hist["messages"]] == ["once", "next"]


async def test_presence_across_devices_for_watchers(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    server = await start_server(privacy__presence="open")  # anyone may watch (test_privacy.py)
    w = await clients(server, name="Watcher", identity="watcher")
    state = await w.request({"type": "watch", "identities": ["alice"]})
    assert state["presence"] == [{"identity": "alice", "status": "offline"}]
    phone = await clients(server, name="Alice", identity="alice")
    assert (await w.next_event("presence"))["status"] == "online"
    laptop = await clients(server, name="Alice", identity="alice")
    await laptop.request({"type": "presence", "status": "away"})  # phone still online
    await phone.request({"type": "presence", "status": "busy"})
    assert (await w.next_event("presence"))["status"] == "busy"
    await phone.request({"type": "bye"})
    assert (await w.next_event("presence"))["status"] == "away"
    await laptop.request({"type": "bye"})
    assert (await w.next_event("presence"))["status"] == "offline"
    for gone in (phone, laptop):  # `bye` ends the session and closes the socket (normal close)
        assert (await gone.next_event("_closed", timeout=5))["code"] == 1000
        assert gone.close_code == 1000


async def test_resume_after_dropped_socket(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    server = await start_server(privacy__presence="open")
    a, b = await joined(clients, server, "res", "alice", "bob")
    await a.send_chat("room:res", "before")
    await b.next_event("message")
    await b.request({"type": "watch", "identities": ["carol"]})
    token = b.welcome["resume"]
    last_seq = 1
    await b.drop()
    await asyncio.sleep(0.1)
    for i in range(5):  # sent while bob is away
        await a.send_chat("room:res", f"missed-{i}")
    await a.request({"type": "read", "conversation": "room:res", "seq": 6})
    carol = await clients(server, name="Carol", identity="carol")  # comes online meanwhile
    b2 = await clients(server, name="Bob", resume=token)
    assert b2.welcome["resumed"] is True and b2.welcome["session"] == b.welcome["session"]
    assert b2.welcome["rooms"] == ["res"] and b2.welcome["resume"] != token
    presence = await b2.next_event("presence_state")
    assert presence["presence"] == [{"identity": "carol", "status": "online"}]
    state = await b2.next_event("room_state")
    assert sorted(p["identity"] for p in state["participants"]) == ["alice", "bob"]
    synced = await b2.request({"type": "sync", "since": {"room:res": last_seq}, "limit": 3})
    page = synced["conversations"][0]
    assert [m["text"] for m in page["messages"]] == ["missed-0", "missed-1", "missed-2"]
    assert page["more"] is True and synced["epoch"] == b.welcome["epoch"]
    assert page["reads"] == {"alice": 6}  # the receipt sent while bob was away
    synced = await b2.request({"type": "sync", "since": {"room:res": page["messages"][-1]["seq"]}})
    assert [m["text"] for m in synced["conversations"][0]["messages"]] == ["missed-3", "missed-4"]
    assert synced["conversations"][0]["more"] is False
    # Alice saw no leave or join flapping, and bob can chat again at once.
    await b2.send_chat("room:res", "back")
    assert (await a.next_event("message"))["text"] == "back"
    assert [e["type"] for e in a.drain() if e["type"].startswith("participant")] == []
    # The old resume token is spent.
    b3 = await clients(server, name="Bob", identity="bob", resume=token)
    assert b3.welcome["resumed"] is False
    await carol.close()


async def test_session_ends_after_resume_grace(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    server = await start_server(session__resume_grace_s=0.3)
    a, b = await joined(clients, server, "g", "alice", "bob")
    await b.drop()
    ev = await a.next_event("participant_left", timeout=3)
    assert ev["identity"] == "bob" and ev["reason"] == "disconnected"
    b2 = await clients(server, name="Bob", identity="bob", resume=b.welcome["resume"])
    assert b2.welcome["resumed"] is False and b2.welcome["rooms"] == []


async def test_resume_replaces_a_half_open_connection(server: TestServer, clients: Connect) -> None:
    a = await clients(server, name="A", identity="a")
    a2 = await clients(server, name="A", identity="a", resume=a.welcome["resume"])
    assert a2.welcome["resumed"] is True
    ev = await a.next_event("_closed", timeout=5)
    assert ev["code"] == 4004


async def test_heartbeat_timeout(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    server = await start_server(session__heartbeat_interval_s=0.2)
    quiet = await clients(server, name="Q")
    pinging = await clients(server, name="P")
    for _ in range(8):
        await asyncio.sleep(0.1)
        pong = await pinging.request({"type": "ping", "ts": 42})
        assert pong["ts"] == 42
    ev = await quiet.next_event("_closed", timeout=5)
    assert ev["code"] == 4002
    await pinging.request({"type": "ping"})  # still up


async def test_shutdown_closes_with_going_away(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    server = await start_server()
    c = await clients(server, name="C")
    assert len(server.app[ENDPOINT].connections) == 1
    await server.close()
    ev = await c.next_event("_closed", timeout=5)
    assert ev["code"] == 1001


async def test_update_is_all_or_nothing(server: TestServer, clients: Connect) -> None:
    a, b = await joined(clients, server, "u", "alice", "bob")
    with pytest.raises(ClientError) as e:
        await b.request({"type": "update", "room": "u", "video_muted": True, "name": "  "})
    assert e.value.code == "bad_field"
    await b.request({"type": "update", "room": "u", "audio_muted": True})
    ev = await a.next_event("participant_updated")
    assert ev["participant"]["video_muted"] is False  # the refused update changed nothing
    assert ev["participant"]["audio_muted"] is True


@ON_BOTH_STORES
async def test_delete_erases_edited_text_too(server: TestServer, clients: Connect) -> None:
    (a,) = await joined(clients, server, "del", "alice")
    orig = await a.send_chat("room:del", "secret")
    await a.request(
        {
            "type": "edit",
            "conversation": "room:del",
            "cid": "e",
            "ref": orig["seq"],
            "text": "secret, edited",
        }
    )
    await a.request({"type": "delete", "conversation": "room:del", "cid": "d", "ref": orig["seq"]})
    hist = await a.request({"type": "history", "conversation": "room:del"})
    assert [m.get("text") for m in hist["messages"]] == [None, None, None]
    # A retried delete gets its first acknowledgement, not `already_deleted`.
    again = await a.request(
        {"type": "delete", "conversation": "room:del", "cid": "d", "ref": orig["seq"]}
    )
    assert again["duplicate"] is True and again["seq"] == 3


@pytest.mark.parametrize("inline", [True, False], ids=["fastws", "receive"])
@ON_BOTH_STORES
async def test_replies_keep_request_order_behind_chat_writes(
    server: TestServer, clients: Connect, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    """Chat writes complete after the request loop has moved on (and, with ``fastws``, are
    handled inside aiohttp's data_received); replies must still come back in request order,
    and a request sent right after a `send` must see that message."""
    monkeypatch.setattr(endpoint_module, "FAST_WS", inline and endpoint_module.FAST_WS)
    (a,) = await joined(clients, server, "ord", "ann")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"ws://127.0.0.1:{server.port}/ws")
        await ws.send_json({"type": "hello", "v": 1, "name": "Raw", "identity": "raw"})
        assert (await ws.receive_json())["type"] == "welcome"
        await ws.send_json({"type": "join", "room": "ord", "id": "j"})
        while (await ws.receive_json()).get("re") != "j":
            pass
        frames = [
            {"type": "send", "conversation": "room:ord", "cid": "m1", "text": "one", "id": "s1"},
            {"type": "history", "conversation": "room:ord", "id": "h"},
            "{not json",
            {"type": "send", "conversation": "room:ord", "cid": "m2", "text": "two", "id": "s2"},
            {"type": "send", "conversation": "room:away", "cid": "m3", "text": "-", "id": "x"},
            {"type": "send", "conversation": "room:ord", "cid": "m4", "text": "four", "id": "s4"},
            {
                "type": "edit",
                "conversation": "room:ord",
                "cid": "e",
                "ref": 99,
                "text": "x",
                "id": "e1",
            },
            {"type": "ping", "id": "p"},
        ]
        for f in frames:  # back to back, without waiting for replies
            await (ws.send_str(f) if isinstance(f, str) else ws.send_json(f))
        replies = []
        while len(replies) < len(frames):
            msg = await asyncio.wait_for(ws.receive_json(), 10)
            if msg["type"] in ("sent", "history", "error", "pong"):
                replies.append(msg)
        # Only chat writes: with fastws each is taken while the one before is in the store;
        # the refusal (before the store) must still wait for the reply to the send before it.
        burst = [
            {"type": "send", "conversation": "room:ord", "cid": "m5", "text": "five", "id": "s5"},
            {"type": "send", "conversation": "room:away", "cid": "m6", "text": "-", "id": "y"},
            {"type": "send", "conversation": "room:ord", "cid": "m7", "text": "seven", "id": "s7"},
        ]
        for f in burst:
            await ws.send_json(f)
        more = []
        while len(more) < len(burst):
            msg = await asyncio.wait_for(ws.receive_json(), 10)
            if msg["type"] in ("sent", "error"):
                more.append((msg["type"], msg.get("re")))
        await ws.close()
    assert more == [("sent", "s5"), ("error", "y"), ("sent", "s7")]
    assert [(r["type"], r.get("re")) for r in replies] == [
        ("sent", "s1"),
        ("history", "h"),
        ("error", None),
        ("sent", "s2"),
        ("error", "x"),
        ("sent", "s4"),
        ("error", "e1"),
        ("pong", "p"),
    ]
    assert [m["text"] for m in replies[1]["messages"]] == ["one"]
    assert replies[2]["code"] == "bad_json" and replies[6]["code"] == "no_such_message"
    assert replies[4]["code"] == "not_in_room", replies[4]
    got = [(await a.next_event("message"))["text"] for _ in range(5)]
    assert got == ["one", "two", "four", "five", "seven"]


async def test_a_refused_hand_off_leaves_no_pending_write(
    server: TestServer, clients: Connect
) -> None:
    """If the store cannot take a chat write (closed at shutdown), the client hears an error
    and its next request is still answered: nothing waits for a write that never happened."""
    (a,) = await joined(clients, server, "gone", "ann")
    await server.app[STORE].close()
    with pytest.raises(ClientError) as e:
        await a.request({"type": "send", "conversation": "room:gone", "cid": "x", "text": "hi"})
    assert e.value.code == "internal_error"
    assert (await a.request({"type": "ping"}))["type"] == "pong"


BIG = {
    "limits__max_text_chars": 2000,
    "limits__max_outbox_bytes": 64 * 1024,
    "limits__max_reply_bytes": 24 * 1024,
    "limits__rate_per_s": 10_000,
    "limits__burst": 10_000,
}


async def _fill(c: Client, conv: str, n: int, size: int) -> None:
    for i in range(n):
        await c.send_chat(conv, f"{i:04d}" + "x" * (size - 4), cid=f"{conv}-{i}")


@ON_BOTH_STORES
async def test_history_pages_are_cut_by_size_and_nobody_is_cut_off(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    """200 messages of 32 KB were a 6.4 MB `history` reply: even a reader at full speed was then
    closed with 4008 (the answer alone overflowed its outbox). Replies are cut by size now."""
    server = await start_server(**BIG)
    (a,) = await joined(clients, server, "big", "alice")
    await _fill(a, "room:big", 60, 1900)  # 114 KB in all
    seen: list[int] = []
    before: int | None = None
    for _ in range(60):  # bounded: at least one message per page
        req: dict[str, Any] = {"type": "history", "conversation": "room:big", "limit": 200}
        if before is not None:
            req["before"] = before
        page = await a.request(req)
        assert len(orjson.dumps(page)) <= 24 * 1024
        seqs = [m["seq"] for m in page["messages"]]
        assert seqs == sorted(seqs) and seqs
        seen[:0] = seqs
        if not page["more"]:
            break
        before = seqs[0]
    assert seen == list(range(1, 61))  # every message, once, in order
    assert (await a.request({"type": "ping"}))["type"] == "pong"  # still connected


@ON_BOTH_STORES
async def test_sync_over_many_conversations_stays_within_the_reply_budget(
    start_server: Callable[..., Awaitable[TestServer]], clients: Connect
) -> None:
    """One small `sync` over many full conversations made the server build the whole answer
    (500 x 500 messages: ~614 MB) and send it; now every reply stays within its budget and
    says what it left out, and syncing until done gets every message exactly once."""
    server = await start_server(**BIG)
    (a,) = await joined(clients, server, "r0", "alice")
    rooms = [f"r{i}" for i in range(12)]
    for room in rooms:
        await a.request({"type": "join", "room": room})
        await _fill(a, f"room:{room}", 8, 1500)  # 144 KB in all
    b = await clients(server, name="Bob", identity="bob")
    have = {f"room:{r}": 0 for r in rooms}
    got: dict[str, list[int]] = {c: [] for c in have}
    pending = dict(have)
    for _ in range(60):  # bounded
        reply = await b.request({"type": "sync", "since": pending, "limit": 500})
        assert len(orjson.dumps(reply)) <= 24 * 1024
        asked, pending = pending, {}
        for page in reply["conversations"]:
            seqs = [m["seq"] for m in page["messages"]]
            got[page["conversation"]] += seqs
            if page["more"]:
                pending[page["conversation"]] = seqs[-1] if seqs else asked[page["conversation"]]
        if reply.get("more"):
            answered = {p["conversation"] for p in reply["conversations"]}
            assert answered, "the first conversation asked for is always answered"
            pending.update({c: s for c, s in asked.items() if c not in answered})
        if not pending:
            break
    assert got == {c: list(range(1, 9)) for c in have}
    assert (await b.request({"type": "ping"}))["type"] == "pong"
