"""Groups, the conversation list and unread counts, through real WebSockets and the real store:
members on two devices each, roles, removal cutting access at its `seq`, offline members
reached by push and then by `sync`, muting, and bad input (clear error, nothing stored)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from push_helpers import Receiver, push_barrier, push_server
from stores import BACKENDS

from signaling.app import HUB, STORE
from signaling.chat.groups import GroupChange, GroupState, plan
from signaling.core.tokens import create_token
from signaling.notify.events import mentions
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import Client, ClientError
from signaling.wire.errors import ProtocolError


@pytest.fixture(params=BACKENDS)
def server_store(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both chat store back ends."""
    return str(request.param)


Connect = Callable[..., Awaitable[Client]]
Phone = Callable[..., Awaitable[RallypointClient]]
Start = Callable[..., Awaitable[TestServer]]

KEY, SECRET = "APIkey", "a-long-enough-api-secret-0123456789"


async def refused(c: RallypointClient | Client, msg: dict[str, Any]) -> str:
    with pytest.raises(ClientError) as e:
        await c.request(msg)
    return e.value.code


async def group_events(c: RallypointClient, group: str, n: int) -> list[dict[str, Any]]:
    return [await c.next_message(group) for _ in range(n)]


# -- the rules (pure) --------------------------------------------------------------------------


def change(action: str, actor: str, *ids: str, **kw: Any) -> GroupChange:
    return GroupChange("group:g", action, actor, actor.title(), "c", ids, **kw)


def test_plan_rules() -> None:
    p = plan(None, change("created", "ann", "bob", "ann", "bob", name=" Team "), 10)
    g = p.state
    assert g.members == {"ann": "owner", "bob": "member"} and g.name == "Team"
    assert p.event == {
        "action": "created",
        "by": "ann",
        "name": "Team",
        "identities": ["ann", "bob"],
    }

    def code(state: GroupState | None, c: GroupChange, limit: int = 10) -> str:
        with pytest.raises(ProtocolError) as e:
            plan(state, c, limit)
        return e.value.code

    assert code(g, change("renamed", "bob", name="x")) == "forbidden"
    assert code(g, change("added", "bob", "cy")) == "forbidden"
    assert code(g, change("added", "ann", "bob")) == "bad_field"  # a member already
    assert code(g, change("added", "ann", "c1", "c2"), limit=3) == "group_full"
    assert code(g, change("renamed", "ann", name=" ")) == "bad_field"
    assert code(g, change("renamed", "ann", name="x" * 65)) == "bad_field"
    assert code(g, change("left", "ann")) == "forbidden"  # the owner hands over first
    assert code(g, change("removed", "ann", "ann")) == "bad_field"
    assert code(g, change("removed", "bob", "ann")) == "forbidden"
    assert code(g, change("role", "ann", "ann", role="member")) == "bad_field"
    assert code(g, change("role", "ann", "bob", role="member")) == "bad_field"  # already
    assert code(g, change("deleted", "bob")) == "forbidden"
    assert code(g, change("renamed", "eve", name="x")) == "bad_conversation"
    assert code(g, change("created", "ann", name="x")) == "bad_field"  # the id is taken
    assert code(None, change("added", "ann", "x")) == "bad_conversation"
    assert code(None, change("created", "system:api", name="x")) == "bad_field"  # no owner

    p = plan(g, change("role", "ann", "bob", role="owner"), 10)  # hand over
    assert p.state.members == {"ann": "admin", "bob": "owner"} and p.roles["ann"] == "admin"
    p = plan(p.state, change("left", "ann"), 10)
    assert p.gone == ("ann",) and p.state.members == {"bob": "owner"}
    p = plan(p.state, change("left", "bob"), 10)  # the last one out deletes it
    assert p.state.deleted and p.state.members == {}
    admin = GroupState(
        "group:g", "T", "o", {"o": "owner", "a": "admin", "a2": "admin", "m": "member"}
    )
    assert code(admin, change("removed", "a", "a2")) == "forbidden"  # admins remove members
    assert plan(admin, change("removed", "a", "m"), 10).gone == ("m",)
    api = plan(admin, change("removed", "system:api", "a"), 10)  # the backend acts as owner
    assert api.gone == ("a",) and api.event["by"] == "system:api"


def test_mentions() -> None:
    members = ("bob", "bobby", "carol", "d@x.org")
    assert mentions("hi @bob.", members) == {"bob"}
    assert mentions("@bobby and @carol, and d@x.org", members) == {"bobby", "carol"}
    assert mentions("mail @d@x.org please", members) == {"d@x.org"}
    assert mentions("no mention of bob", members) == set()


# -- end to end --------------------------------------------------------------------------------


async def test_group_across_two_devices_per_member(server: TestServer, phones: Phone) -> None:
    ann = await phones(server, "ann", device="phone")
    ann2 = await phones(server, "ann", device="laptop")
    bob = await phones(server, "bob", device="phone")
    bob2 = await phones(server, "bob", device="laptop")
    carol = await phones(server, "carol")
    g = await ann.create_group("Team", ["bob", "carol"])
    conv = g["conversation"]
    assert conv.startswith("group:") and g["name"] == "Team" and g["created_by"] == "ann"
    assert g["members"] == [
        {"identity": "ann", "role": "owner"},
        {"identity": "bob", "role": "member"},
        {"identity": "carol", "role": "member"},
    ]
    created = g["message"]
    assert created["kind"] == "system" and created["seq"] == 1 and g["duplicate"] is False
    assert created["group"] == {
        "action": "created",
        "by": "ann",
        "name": "Team",
        "identities": ["ann", "bob", "carol"],
    }
    for dev in (ann, ann2, bob, bob2, carol):  # every device of every member, this one too
        assert (await dev.next_message(conv))["group"]["action"] == "created"

    sent = await bob.send(conv, "hello team")
    for dev in (ann, ann2, bob2, carol):
        m = await dev.next_message(conv)
        assert m["text"] == "hello team" and m["from"] == "bob" and m["seq"] == sent["seq"] == 2

    # A retry of the creation (same cid) creates nothing new.
    again = await ann.request(
        {"type": "group_create", "cid": created["cid"], "name": "Team", "identities": ["bob"]}
    )
    assert again["duplicate"] is True and again["conversation"] == conv
    assert again["message"]["seq"] == 1
    info = await carol.group_info(conv)
    assert info["type"] == "group" and len(info["members"]) == 3 and "message" not in info

    # Roles: members may not change the group; the owner makes an admin, who adds.
    assert (
        await refused(
            carol, {"type": "group_rename", "conversation": conv, "cid": "r", "name": "X"}
        )
        == "forbidden"
    )
    assert (
        await refused(
            carol, {"type": "group_add", "conversation": conv, "cid": "a", "identities": ["dan"]}
        )
        == "forbidden"
    )
    await ann.group_role(conv, "bob", "admin")
    added = await bob.group_add(conv, "dan")
    assert {"identity": "dan", "role": "member"} in added["members"]
    renamed = await bob.group_rename(conv, "Team B")
    assert renamed["name"] == "Team B"
    assert (
        await refused(bob, {"type": "group_delete", "conversation": conv, "cid": "d"})
        == "forbidden"
    )
    assert (
        await refused(ann, {"type": "group_leave", "conversation": conv, "cid": "l"}) == "forbidden"
    )
    await ann.group_role(conv, "bob", "owner")  # hand over; ann stays an admin
    info = await ann.group_info(conv)
    assert {m["identity"]: m["role"] for m in info["members"]} == {
        "ann": "admin",
        "bob": "owner",
        "carol": "member",
        "dan": "member",
    }
    left = await ann.group_leave(conv)
    assert left["message"]["group"] == {"action": "left", "by": "ann", "identities": ["ann"]}
    # Every event reached ann's other device in order, up to and including her leaving.
    seqs = [(await ann2.next_message(conv))["seq"] for _ in range(left["message"]["seq"] - 2)]
    assert seqs == list(range(3, left["message"]["seq"] + 1))
    assert (
        await refused(ann2, {"type": "send", "conversation": conv, "cid": "z", "text": "x"})
        == "bad_conversation"
    )
    deleted = await bob.group_delete(conv)
    assert deleted["members"] == [] and deleted["message"]["group"]["action"] == "deleted"
    assert await carol.next_message(
        conv, where=lambda m: m.get("group", {}).get("action") == "deleted"
    )
    assert (
        await refused(carol, {"type": "send", "conversation": conv, "cid": "y", "text": "x"})
        == "bad_conversation"
    )
    assert await refused(carol, {"type": "group_info", "conversation": conv}) == "bad_conversation"


async def test_removal_cuts_access_at_its_seq(server: TestServer, phones: Phone) -> None:
    ann = await phones(server, "ann")
    bob = await phones(server, "bob")
    carol = await phones(server, "carol")
    conv = (await ann.create_group("G", ["bob", "carol"]))["conversation"]
    for i in range(3):
        await bob.send(conv, f"before {i}")  # seq 2-4
    # bob keeps sending while ann removes carol: whatever is stored after the removal must
    # not reach carol, whatever the order the requests were sent in.
    sends = [bob.send(conv, f"racing {i}") for i in range(20)]
    removal = ann.group_remove(conv, "carol")
    results = await asyncio.gather(removal, *sends)
    cut = results[0]["message"]["seq"]
    assert results[0]["message"]["group"]["identities"] == ["carol"]
    await bob.send(conv, "after")
    last = (await ann.next_message(conv, where=lambda m: m.get("text") == "after"))["seq"]
    # carol got exactly the events up to and including her removal, live ...
    got = []
    while True:
        m = await carol.next_message(conv)
        got.append(m["seq"])
        if m["seq"] == cut:
            break
    assert got == list(range(1, cut + 1))
    await carol.request({"type": "ping"})  # anything sent to carol before the pong is read
    assert carol._messages.empty()
    # ... and by history and sync, nothing after it.
    h = await carol.request({"type": "history", "conversation": conv, "limit": 200})
    assert [m["seq"] for m in h["messages"]] == list(range(1, cut + 1))
    assert h["last_seq"] == cut and h["more"] is False
    h = await carol.request({"type": "history", "conversation": conv, "after": cut})
    assert h["messages"] == [] and h["last_seq"] == cut
    s = await carol.request({"type": "sync", "since": {conv: 0}})
    assert [m["seq"] for m in s["conversations"][0]["messages"]] == list(range(1, cut + 1))
    assert s["conversations"][0]["last_seq"] == cut
    for msg in (
        {"type": "send", "conversation": conv, "cid": "x", "text": "let me in"},
        {"type": "typing", "conversation": conv, "active": True},
        {"type": "group_info", "conversation": conv},
        {"type": "group_leave", "conversation": conv, "cid": "l"},
    ):
        assert await refused(carol, msg) == "bad_conversation"
    # Her read watermark stops at the removal; her list still shows the group, as it was.
    await carol.read(conv, last)
    items = {i["conversation"]: i for i in await carol.conversations()}
    assert items[conv]["read_seq"] == cut and items[conv]["last_seq"] == cut
    assert "role" not in items[conv] and items[conv]["unread"] == 0
    # Added again, she sees from that event on, not the gap.
    back = (await ann.group_add(conv, "carol"))["message"]["seq"]
    await bob.send(conv, "welcome back")
    h = await carol.request({"type": "history", "conversation": conv, "limit": 200})
    seqs = [m["seq"] for m in h["messages"]]
    assert seqs == [*range(1, cut + 1), back, back + 1] and h["last_seq"] == back + 1
    # Someone who never was a member reads nothing, and the answer is the same as for a group
    # that does not exist.
    eve = await phones(server, "eve")
    for target in (conv, "group:doesnotexist"):
        assert await refused(eve, {"type": "history", "conversation": target}) == "bad_conversation"
        assert (
            await refused(eve, {"type": "read", "conversation": target, "seq": 1})
            == "bad_conversation"
        )


async def test_offline_member_gets_push_then_sync(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver: Receiver
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url)
    ann = await phones(server, "ann")
    for who in ("bob", "carol", "dan"):  # known identities, offline now
        await (await phones(server, who)).close()
    conv = (await ann.create_group("G", ["bob", "carol", "dan"]))["conversation"]
    dan = await phones(server, "dan")
    await dan.mute(conv)
    await dan.close()
    await ann.send(conv, "one")
    await ann.send(conv, "two, @dan")
    # Delivered in any order (the webhook's workers run side by side): by seq.
    first, second = sorted(await receiver.wait_for(2), key=lambda e: e["seq"])
    assert first["type"] == "message.batch" and first["conversation"] == conv
    assert first["id"] == f"message.{first['mid']}.batch0" and first["from"] == "ann"
    assert first["seq"] == 2 and "text" not in first and "identity" not in first
    # One entry per identity (not per device); dan muted the group: none for him ...
    assert first["recipients"] == [
        {"identity": "bob", "unread": 1},
        {"identity": "carol", "unread": 1},
    ]
    # ... except when mentioned.
    assert second["recipients"] == [
        {"identity": "bob", "unread": 2},
        {"identity": "carol", "unread": 2},
        {"identity": "dan", "mention": True, "unread": 2},
    ]
    counters = await push_barrier(server, receiver)
    assert counters["sent"] == 2
    # bob comes back: sync finds the group he was added to while away.
    bob = await phones(server, "bob")
    assert await bob.sync() == 3
    got = [await bob.next_message(conv) for _ in range(3)]
    assert [m["text"] for m in got] == ["Ann created the group 'G'", "one", "two, @dan"]
    assert got[0]["group"]["action"] == "created"


async def test_large_group_is_pushed_in_batches(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url, push__include_text=True)
    ann = await phones(server, "ann")
    members = [f"m{i:03d}" for i in range(230)]  # never connected: all offline
    conv = (await ann.create_group("Big", members))["conversation"]
    await ann.send(conv, "all hands")
    batches = await receiver.wait_for(3)
    by_id = {b["id"]: len(b["recipients"]) for b in batches}  # delivered in any order
    mid = batches[0]["mid"]
    assert by_id == {
        f"message.{mid}.batch0": 100,
        f"message.{mid}.batch1": 100,
        f"message.{mid}.batch2": 30,
    }
    assert sorted(r["identity"] for b in batches for r in b["recipients"]) == members
    assert all(b["text"] == "all hands" for b in batches)


async def test_unread_counts_and_mute_across_devices(server: TestServer, phones: Phone) -> None:
    ann = await phones(server, "ann")
    bob = await phones(server, "bob", device="phone")
    bob2 = await phones(server, "bob", device="tablet")
    g = (await ann.create_group("G", ["bob"]))["conversation"]
    for i in range(3):
        await ann.send(g, f"g{i}")
    dm = "dm:ann|bob"
    await ann.send(dm, "d0")
    await bob.send(dm, "mine")  # bob's own messages are never unread for him
    edit = await ann.send(dm, "d1")
    await ann.request(
        {"type": "edit", "conversation": dm, "cid": "e", "ref": edit["seq"], "text": "d1!"}
    )
    items = await bob2.conversations()
    assert [i["conversation"] for i in items] == [dm, g]  # newest first
    by = {i["conversation"]: i for i in items}
    assert (by[g]["kind"], by[g]["name"], by[g]["role"], by[g]["unread"]) == (
        "group",
        "G",
        "member",
        3,
    )
    assert by[dm]["unread"] == 2 and by[dm]["last_message"]["text"] == "d1!"  # as edited
    assert by[dm]["last_seq"] == 4 and by[dm]["read_seq"] == 0 and by[dm]["muted"] is False
    assert by[g]["last_message"]["text"] == "g2"
    # Reading on the phone: the tablet gets the receipt with the count left; ann a plain one.
    await bob.read(g, 3)
    r = await bob2.next_event("receipt")
    assert r == {"type": "receipt", "conversation": g, "identity": "bob", "seq": 3, "unread": 1}
    r = await ann.next_event("receipt")
    assert r == {"type": "receipt", "conversation": g, "identity": "bob", "seq": 3}
    assert {i["conversation"]: i["unread"] for i in await bob2.conversations()}[g] == 1
    # Mute on one device: stored, and the other devices hear it.
    await bob.mute(dm)
    assert await bob2.next_event("conversation_muted") == {
        "type": "conversation_muted",
        "conversation": dm,
        "muted": True,
    }
    assert {i["conversation"]: i["muted"] for i in await bob2.conversations()} == {
        dm: True,
        g: False,
    }
    # Paging: one at a time, with the cursor.
    first = await bob.request({"type": "conversations", "limit": 1})
    assert [i["conversation"] for i in first["items"]] == [dm] and first["more"] is True
    rest = await bob.request({"type": "conversations", "limit": 1, "cursor": first["cursor"]})
    assert [i["conversation"] for i in rest["items"]] == [g] and rest["more"] is False
    assert "cursor" not in rest


async def test_group_state_survives_a_restart(
    tmp_path: Path, start_server: Start, phones: Phone
) -> None:
    server = await start_server()
    ann = await phones(server, "ann")
    conv = (await ann.create_group("G", ["bob", "carol"]))["conversation"]
    await ann.group_remove(conv, "carol")
    await ann.mute(conv)
    await ann.close()
    await server.close()
    server = await start_server()
    bob = await phones(server, "bob")
    carol = await phones(server, "carol")
    info = await bob.group_info(conv)
    assert [m["identity"] for m in info["members"]] == ["ann", "bob"]
    assert (
        await refused(carol, {"type": "send", "conversation": conv, "cid": "x", "text": "x"})
        == "bad_conversation"
    )
    assert server.app[HUB] is not None
    assert server.app[STORE] is not None
    await bob.send(conv, "still here")
    ann = await phones(server, "ann")
    assert {i["conversation"]: i["muted"] for i in await ann.conversations()}[conv] is True


async def test_groups_claim_and_bad_input_store_nothing(
    start_server: Start, clients: Connect
) -> None:
    server = await start_server(
        auth__api_key=KEY, auth__api_secret=SECRET, chat__max_group_members=3
    )

    def token(identity: str, **kw: Any) -> str:
        return create_token(KEY, SECRET, identity, rooms={}, **kw)

    plain = await clients(server, token=token("pat"))
    ann = await clients(server, token=token("ann", groups=True))
    msg = {"type": "group_create", "cid": "c1", "name": "G", "identities": []}
    assert await refused(plain, msg) == "forbidden"  # no `groups` claim
    bad: list[tuple[dict[str, Any], str]] = [
        ({**msg, "name": ""}, "bad_field"),
        ({**msg, "name": "x" * 65}, "bad_field"),
        ({**msg, "identities": ["a", "b", "c"]}, "group_full"),
        ({**msg, "identities": ["not valid!"]}, "bad_field"),
        ({**msg, "identities": "bob"}, "bad_field"),
        ({k: v for k, v in msg.items() if k != "cid"}, "bad_field"),
    ]
    for m, code in bad:
        assert await refused(ann, m) == code, m
    store = server.app[STORE]
    items = (await ann.request({"type": "conversations"}))["items"]
    assert items == []  # nothing of it was stored
    g = await ann.request({**msg, "identities": ["bob"]})
    conv = g["conversation"]
    assert await store.last_seq(conv) == 1
    bad = [
        (
            {"type": "group_add", "conversation": conv, "cid": "a", "identities": ["bob"]},
            "bad_field",
        ),
        (
            {"type": "group_add", "conversation": conv, "cid": "a", "identities": ["c", "d"]},
            "group_full",
        ),
        (
            {"type": "group_add", "conversation": "group:nope", "cid": "a", "identities": ["c"]},
            "bad_conversation",
        ),
        (
            {"type": "group_add", "conversation": "dm:a|b", "cid": "a", "identities": ["c"]},
            "bad_field",
        ),
        (
            {"type": "group_remove", "conversation": conv, "cid": "r", "identities": ["zed"]},
            "bad_field",
        ),
        (
            {"type": "group_remove", "conversation": conv, "cid": "r", "identities": ["ann"]},
            "bad_field",
        ),
        (
            {
                "type": "group_role",
                "conversation": conv,
                "cid": "o",
                "identity": "bob",
                "role": "king",
            },
            "bad_field",
        ),
        (
            {
                "type": "group_role",
                "conversation": conv,
                "cid": "o",
                "identity": "zed",
                "role": "admin",
            },
            "bad_field",
        ),
        ({"type": "group_rename", "conversation": conv, "cid": "n", "name": "   "}, "bad_field"),
        ({"type": "group_leave", "conversation": conv, "cid": "l"}, "forbidden"),
        ({"type": "group_info", "conversation": "group:nope"}, "bad_conversation"),
        (
            {"type": "conversation_mute", "conversation": "group:nope", "muted": True},
            "bad_conversation",
        ),
        ({"type": "conversation_mute", "conversation": conv, "muted": "yes"}, "bad_field"),
        ({"type": "conversations", "cursor": "!!!"}, "bad_field"),
        (
            {"type": "conversations", "cursor": base64.urlsafe_b64encode(b'{"a":1}').decode()},
            "bad_field",
        ),
        ({"type": "conversations", "limit": 0}, "bad_field"),
    ]
    for m, code in bad:
        assert await refused(ann, m) == code, m
    assert await store.last_seq(conv) == 1  # no event was stored for any of them
    assert (await ann.request({"type": "group_info", "conversation": conv}))["members"] == [
        {"identity": "ann", "role": "owner"},
        {"identity": "bob", "role": "member"},
    ]
    await ann.request({"type": "ping"})  # the connection stayed up through all of it


async def test_http_api_manages_groups(start_server: Start, phones: Phone) -> None:
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)
    base = f"http://127.0.0.1:{server.port}/api"
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()}
    tok = create_token(KEY, SECRET, "bob", rooms={})
    bob = RallypointClient(f"ws://127.0.0.1:{server.port}/ws", token=tok)
    await bob.connect()
    try:
        async with aiohttp.ClientSession(headers=auth) as http:
            r = await http.post(
                f"{base}/groups",
                json={"name": "Ops", "owner": "ann", "members": ["bob"], "cid": "k1"},
            )
            assert r.status == 201
            g = await r.json()
            conv = g["conversation"]
            assert g["created_by"] == "system:api" and g["seq"] == 1 and g["duplicate"] is False
            assert g["members"] == [
                {"identity": "ann", "role": "owner"},
                {"identity": "bob", "role": "member"},
            ]
            created = await bob.next_message(conv)
            assert created["from"] == "system:api" and created["group"]["by"] == "system:api"
            r = await http.post(f"{base}/groups", json={"name": "Ops", "owner": "ann", "cid": "k1"})
            assert r.status == 200 and (await r.json())["duplicate"] is True
            r = await http.post(f"{base}/groups/{conv}/members", json={"identities": ["carol"]})
            assert r.status == 200 and len((await r.json())["members"]) == 3
            r = await http.patch(f"{base}/groups/{conv}/members/carol", json={"role": "admin"})
            assert {"identity": "carol", "role": "admin"} in (await r.json())["members"]
            r = await http.patch(f"{base}/groups/{conv}", json={"name": "Ops 2"})
            assert (await r.json())["name"] == "Ops 2"
            r = await http.post(
                f"{base}/conversations/{conv}/messages", json={"text": "from the backend"}
            )
            assert r.status == 201
            r = await http.delete(f"{base}/groups/{conv}/members/bob")
            assert [m["identity"] for m in (await r.json())["members"]] == ["ann", "carol"]
            events = [await bob.next_message(conv) for _ in range(5)]
            assert [e["group"]["action"] if "group" in e else e["text"] for e in events] == [
                "added",
                "role",
                "renamed",
                "from the backend",
                "removed",
            ]
            r = await http.get(f"{base}/groups/{conv}")
            assert (await r.json())["name"] == "Ops 2"
            r = await http.get(f"{base}/conversations/{conv}/messages")
            assert [m["seq"] for m in (await r.json())["messages"]] == [1, 2, 3, 4, 5, 6]
            for method, path, body, status, code in [
                ("post", "/groups", {"name": "X"}, 400, "bad_field"),
                ("post", "/groups", {"name": "X", "owner": "bad id!"}, 400, "bad_field"),
                ("post", "/groups", {"name": "", "owner": "ann"}, 400, "bad_field"),
                (
                    "post",
                    "/groups",
                    {"name": "X", "owner": "ann", "members": "bob"},
                    400,
                    "bad_field",
                ),
                ("get", "/groups/group:nope", None, 404, "no_such_group"),
                ("post", "/groups/group:nope/members", {"identities": ["x"]}, 404, "no_such_group"),
                ("delete", f"/groups/{conv}/members/ann", None, 403, "forbidden"),
                ("delete", f"/groups/{conv}/members/zed", None, 400, "bad_field"),
                ("patch", f"/groups/{conv}/members/carol", {"role": "boss"}, 400, "bad_field"),
                ("post", "/conversations/group:nope/messages", {"text": "x"}, 404, "no_such_group"),
            ]:
                r = await getattr(http, method)(f"{base}{path}", json=body)
                assert (r.status, (await r.json())["code"]) == (status, code), (method, path)
            r = await http.get(f"{base}/conversations/{conv}/messages")
            assert len((await r.json())["messages"]) == 6  # none of those stored anything
            r = await http.delete(f"{base}/groups/{conv}")
            assert r.status == 200 and (await r.json())["members"] == []
            r = await http.get(f"{base}/groups/{conv}")
            assert r.status == 404
    finally:
        await bob.close()


async def test_unread_count_ignores_edits_deletes_and_own(
    server: TestServer, phones: Phone
) -> None:
    ann = await phones(server, "ann")
    bob = await phones(server, "bob")
    dm = "dm:ann|bob"
    a = await ann.send(dm, "one")
    await ann.send(dm, "two")
    await ann.request({"type": "delete", "conversation": dm, "cid": "d", "ref": a["seq"]})
    await bob.send(dm, "mine")
    (item,) = await bob.conversations()
    assert item["unread"] == 1 and item["last_message"]["text"] == "mine"
    assert orjson.dumps(item)  # plain JSON


async def test_calling_a_group_rings_members_and_pushes_the_rest(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url, calls__max_group_callees=3)
    ann = await phones(server, "ann")
    bob = await phones(server, "bob", device="phone")
    bob2 = await phones(server, "bob", device="tablet")
    dan = await phones(server, "dan")
    conv = (await ann.create_group("G", ["bob", "carol", "dan"]))["conversation"]
    call = await ann.call(group=conv, video=True)
    assert call.group and call.media == "sfu" and call.conversation == conv
    for dev in (bob, bob2, dan):  # every device of every online member rings
        incoming = await dev.next_call()
        assert incoming.id == call.id and incoming.conversation == conv
    (push,) = await receiver.wait_for(1)  # carol never connected: pushed
    assert (push["type"], push["identity"], push["call"]["group"]) == (
        "call.incoming",
        "carol",
        True,
    )
    await bob.calls[call.id].accept()
    assert (await bob2.calls[call.id].next_event("call_answered_elsewhere"))["call"] == call.id
    await dan.calls[call.id].decline()
    await call.hangup()
    assert await call.wait_ended() == "completed"
    await bob.calls[call.id].hangup()  # carol's phone still rang: the call ends now
    cancelled = (await receiver.wait_for(2))[1]  # and her push is taken back
    assert (cancelled["type"], cancelled["identity"]) == ("call.cancelled", "carol")
    # One log entry, in the group, for every member (carol gets it when she syncs).
    for dev in (ann, bob, dan):
        log = await dev.next_message(conv, where=lambda m: m["kind"] == "call")
        assert log["call"]["outcome"] == "completed" and log["call"]["group"] is True
        assert "callee" not in log["call"]
    carol = await phones(server, "carol")
    await carol.sync()
    got = [await carol.next_message(conv) for _ in range(2)]
    assert [m["kind"] for m in got] == ["system", "call"]
    # Who may call a group, and how big it may be.
    eve = await phones(server, "eve")
    assert await refused(eve, {"type": "call_invite", "group": conv}) == "bad_conversation"
    assert await refused(ann, {"type": "call_invite", "group": conv, "to": ["bob"]}) == "bad_field"
    assert await refused(ann, {"type": "call_invite", "video": True}) == "bad_field"
    await ann.group_add(conv, "fay")  # four others now: more than calls.max_group_callees
    assert await refused(ann, {"type": "call_invite", "group": conv}) == "bad_field"


async def test_group_chat_moderation_and_typing(server: TestServer, phones: Phone) -> None:
    ann = await phones(server, "ann")
    bob = await phones(server, "bob")
    cy = await phones(server, "cy")
    conv = (await ann.create_group("G", ["bob", "cy"]))["conversation"]
    await ann.group_role(conv, "bob", "admin")
    cys = await cy.send(conv, "spam")
    anns = await ann.send(conv, "hello")
    # A member may not delete another's message; an admin may (any time, as a moderator).
    delete = {"type": "delete", "conversation": conv, "cid": "d1", "ref": anns["seq"]}
    assert await refused(cy, delete) == "not_author"
    await bob.request({**delete, "ref": cys["seq"]})
    got = await cy.next_message(conv, where=lambda m: m["kind"] == "delete")
    assert got["ref"] == cys["seq"] and got["from"] == "bob"
    await cy.request({"type": "typing", "conversation": conv, "active": True})
    for dev in (ann, bob):
        t = await dev.next_event("typing")
        assert (t["conversation"], t["identity"], t["active"]) == (conv, "cy", True)


async def test_a_former_member_learns_nothing_after_it_left(
    server: TestServer, phones: Phone
) -> None:
    """Not the group's later name or members: not from the conversation list, not from a
    retry of its own old change (which is still answered as a duplicate)."""
    ann = await phones(server, "ann")
    dave = await phones(server, "dave")
    conv = (await ann.create_group("G", ["dave"]))["conversation"]
    left = await dave.group_leave(conv, cid="bye")
    assert left["name"] == "G" and left["duplicate"] is False
    await ann.group_rename(conv, "Secret plan")
    await ann.group_add(conv, "erin")
    items = {i["conversation"]: i for i in await dave.conversations()}
    assert items[conv]["name"] == "G" and "role" not in items[conv]
    again = await dave.group_leave(conv, cid="bye")
    assert again["duplicate"] is True and again["message"] == left["message"]
    assert again["name"] == "G" and again["members"] == []
    # A member sees the group as it is.
    items = {i["conversation"]: i for i in await ann.conversations()}
    assert items[conv]["name"] == "Secret plan"
