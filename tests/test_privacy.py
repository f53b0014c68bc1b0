"""Contacts and privacy end to end, through real WebSockets and the real store, in token mode
and in open mode: who may watch whom, what a block does to direct messages, typing, calls and
presence, the contact request messages and their events, the HTTP API's relations, bad input,
and above all that nobody can tell an identity that blocks them, one that is not related to
them and one that does not exist apart: the frames they get are compared one by one."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from push_helpers import PUSH_SECRET, Receiver, push_barrier
from stores import BACKENDS, query

from signaling.app import CALLS, HUB, STORE
from signaling.core.privacy import Relation
from signaling.core.tokens import create_token
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import Client, ClientError


@pytest.fixture(params=BACKENDS)
def server_store(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both chat store back ends."""
    return str(request.param)


Start = Callable[..., Awaitable[TestServer]]
KEY, SECRET = "test-key", "a-test-secret-of-at-least-32-bytes"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()}

#: Fields that differ between any two runs of the same exchange (ids, times, devices).
VOLATILE = frozenset(
    {
        "re",
        "ts",
        "server_time",
        "call",
        "id",
        "mid",
        "cid",
        "started_at",
        "expires_at",
        "answered_at",
        "device",
        "from_device",
    }
)


def norm(value: Any, target: str) -> Any:
    """``value`` with its ids and times blanked and ``target``'s name replaced: what is left
    is what a client could tell two answers apart by."""
    if isinstance(value, dict):
        return {
            k: "*" if k in VOLATILE and not isinstance(v, dict | list) else norm(v, target)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [norm(v, target) for v in value]
    if isinstance(value, str):
        return value.replace(target, "<target>")
    return value


class Net:
    """Clients of one server, in token mode (tokens with `dm` and `contacts`) or open mode."""

    def __init__(self, server: TestServer, mode: str) -> None:
        self.server = server
        self.mode = mode
        self.made: list[Client] = []

    async def connect(
        self, identity: str, *, contacts: bool = True, groups: bool = True, **hello: Any
    ) -> Client:
        c = Client(f"ws://127.0.0.1:{self.server.port}/ws")
        self.made.append(c)
        if self.mode == "token":
            hello["token"] = create_token(
                KEY,
                SECRET,
                identity,
                rooms={"*": ["join", "chat"]},
                contacts=contacts,
                groups=groups,
            )
        else:
            hello["identity"] = identity
        await c.connect(name=identity.title(), **hello)
        return c

    async def close(self) -> None:
        for c in self.made:
            await c.close()

    @property
    def store(self) -> Any:
        return self.server.app[STORE]


@pytest.fixture
async def net_factory(start_server: Start) -> AsyncIterator[Callable[..., Awaitable[Net]]]:
    """``await net_factory(mode, **config)``: a server and its clients."""
    nets: list[Net] = []

    async def make(mode: str = "token", **overrides: Any) -> Net:
        if mode == "token":
            overrides.update(auth__api_key=KEY, auth__api_secret=SECRET)
        net = Net(await start_server(**overrides), mode)
        nets.append(net)
        return net

    yield make
    for n in nets:
        await n.close()


MODES = pytest.mark.parametrize("mode", ["token", "open"])


async def frames_until(c: Client, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Every frame ``c`` receives, up to and including the first ``done`` one."""
    out = []
    while True:
        frame = await c.next_event()
        out.append(frame)
        if done(frame):
            return out


async def ask(c: Client, msg: dict[str, Any], rid: str = "q") -> list[dict[str, Any]]:
    """Send ``msg`` with id ``rid``; every frame received up to its answer."""
    await c.send_raw({**msg, "id": rid})
    return await frames_until(c, lambda f: f.get("re") == rid)


async def barrier(c: Client) -> list[dict[str, Any]]:
    """Every frame ``c`` receives before the answer to a `ping` sent now (not the `pong`):
    whatever the server did before answering it has reached ``c`` by then."""
    return (await ask(c, {"type": "ping"}, "barrier"))[:-1]


async def befriend(a: Client, b: Client) -> None:
    """Make the identities of ``a`` and ``b`` contacts, the way users do."""
    await a.request({"type": "contact_request", "identity": b.welcome["identity"]})
    await b.request({"type": "contact_accept", "identity": a.welcome["identity"]})
    for c in (a, b):
        await barrier(c)
        c.drain()


def dm(a: str, b: str) -> str:
    x, y = sorted((a, b))
    return f"dm:{x}|{y}"


# --- nobody can probe ----------------------------------------------------------------------------


@MODES
async def test_watch_looks_the_same_for_blocked_stranger_and_nonexistent(
    net_factory: Callable[..., Awaitable[Net]], mode: str
) -> None:
    net = await net_factory(mode)
    ann = await net.connect("ann")
    blocker = await net.connect("t-blocker")
    await befriend(ann, blocker)  # a contact, and still it may not see: it blocks ann
    await blocker.request({"type": "block", "identity": "ann"})
    stranger = await net.connect("t-stranger")
    targets = {"t-blocker": blocker, "t-stranger": stranger, "t-ghost": None}
    seen = {}
    for name, client in targets.items():
        ann.drain()
        frames = await ask(ann, {"type": "watch", "identities": [name]})
        if client is None:  # the identity that did not exist comes along now
            client = await net.connect(name)
        # It goes busy, then away: ann hears none of it.
        await client.request({"type": "presence", "status": "busy"})
        await client.request({"type": "presence", "status": "away"})
        frames += await barrier(ann)
        seen[name] = norm(frames, name)
    assert seen["t-blocker"] == seen["t-stranger"] == seen["t-ghost"]
    assert seen["t-ghost"] == [
        {"type": "presence_state", "presence": [{"identity": "<target>", "status": "offline"}]}
        | {"re": "*"}
    ]
    # The same exchange with a contact is different: the comparison can tell.
    friend = await net.connect("t-friend")
    await befriend(ann, friend)
    frames = await ask(ann, {"type": "watch", "identities": ["t-friend"]})
    await friend.request({"type": "presence", "status": "busy"})
    frames += await barrier(ann)
    assert [f.get("status") for f in frames] == [None, "busy"]
    assert frames[0]["presence"] == [{"identity": "t-friend", "status": "online"}]


@MODES
async def test_contact_request_looks_the_same_for_blocked_stranger_and_nonexistent(
    net_factory: Callable[..., Awaitable[Net]], mode: str
) -> None:
    net = await net_factory(mode)
    ann = await net.connect("ann")
    ann_tablet = await net.connect("ann")
    blocker = await net.connect("t-blocker")
    await blocker.request({"type": "block", "identity": "ann"})
    stranger = await net.connect("t-stranger")  # exists, never answers
    seen = {}
    for name in ("t-blocker", "t-stranger", "t-ghost"):
        frames = await ask(ann, {"type": "contact_request", "identity": name})
        other_device = await barrier(ann_tablet)
        relations = await ask(ann, {"type": "contacts"})
        entry = [r for r in relations[-1]["relations"] if r["identity"] == name]
        seen[name] = norm([frames, other_device, entry], name)
    assert seen["t-blocker"] == seen["t-stranger"] == seen["t-ghost"]
    assert seen["t-ghost"][1] == [
        {"type": "relation", "identity": "<target>", "status": "outgoing", "blocked": False}
    ]
    # Asking again changes nothing and tells nobody anything.
    for name in ("t-blocker", "t-ghost"):
        assert norm(await ask(ann, {"type": "contact_request", "identity": name}), name) == [
            {"type": "ok", "re": "*"}
        ]
    assert await barrier(ann_tablet) == []
    # The blocker heard nothing; the stranger got the request (ann cannot see that).
    assert await barrier(blocker) == []
    assert await barrier(stranger) == [
        {"type": "relation", "identity": "ann", "status": "incoming", "blocked": False}
    ]
    listed = await blocker.request({"type": "contacts"})
    assert listed["relations"] == [{"identity": "ann", "status": "none", "blocked": True}]


async def test_call_invite_looks_the_same_for_offline_blocked_stranger_and_nonexistent(
    net_factory: Callable[..., Awaitable[Net]],
) -> None:
    """Calls are for contacts here (`call_strangers` off): an offline contact, a contact that
    blocks the caller (online!), a stranger (online) and an identity that does not exist all
    give the caller the same frames: ringing, missed after the ring timeout, a missed-call log."""
    net = await net_factory("token", privacy__call_strangers=False, calls__ring_timeout_s=0.3)
    ann = await net.connect("ann")
    offline = await net.connect("t-offline")
    await befriend(ann, offline)
    await offline.close()
    blocker = await net.connect("t-blocker")
    await befriend(ann, blocker)
    await blocker.request({"type": "block", "identity": "ann"})
    stranger = await net.connect("t-stranger")
    seen = {}
    for name in ("t-offline", "t-blocker", "t-stranger", "t-ghost"):
        ann.drain()
        frames = await ask(ann, {"type": "call_invite", "to": [name]})
        frames += await frames_until(ann, lambda f: f["type"] == "message")
        seen[name] = norm(frames, name)
    assert seen["t-offline"] == seen["t-blocker"] == seen["t-stranger"] == seen["t-ghost"]
    types = [f["type"] for f in seen["t-ghost"]]
    assert types == ["call_state", "call_missed", "call_ended", "message"]
    log = seen["t-ghost"][-1]
    assert log["text"] == "Missed call" and log["conversation"] == "dm:ann|<target>"
    assert log["call"]["outcome"] == "missed" and log["call"]["callee"] == "<target>"
    # Nothing rang, and the log is ann's alone: not in their history, sync or conversations.
    for client, name in ((blocker, "t-blocker"), (stranger, "t-stranger")):
        assert not [f for f in await barrier(client) if f["type"].startswith("call")]
        hist = await client.request({"type": "history", "conversation": dm("ann", name)})
        assert (hist["messages"], hist["last_seq"]) == ([], 0)
        synced = await client.request({"type": "sync", "since": {dm("ann", name): 0}})
        assert synced["conversations"][0]["messages"] == []
        assert (await client.request({"type": "conversations"}))["items"] == []
    # The offline contact that comes back sees its missed call; a newcomer named like the
    # identity that did not exist sees nothing.
    back = await net.connect("t-offline")
    hist = await back.request({"type": "history", "conversation": dm("ann", "t-offline")})
    assert [m["kind"] for m in hist["messages"]] == ["call"]
    ghost = await net.connect("t-ghost")
    assert (await ghost.request({"type": "conversations"}))["items"] == []
    assert net.server.app[CALLS].book.calls == {}


@MODES
async def test_direct_messages_to_strangers_off_look_the_same(
    net_factory: Callable[..., Awaitable[Net]], mode: str
) -> None:
    """`dm_strangers` off: a stranger, a stranger that blocks the sender and an identity that
    does not exist all answer `not_contact`; a contact that blocks the sender answers `sent`
    like a contact that is offline, and never gets the message."""
    net = await net_factory(mode, privacy__dm_strangers=False)
    ann = await net.connect("ann")
    ann_tablet = await net.connect("ann")
    blocker = await net.connect("t-blocker")
    await blocker.request({"type": "block", "identity": "ann"})
    await net.connect("t-stranger")
    refused = {}
    for name in ("t-blocker", "t-stranger", "t-ghost"):
        conv = dm("ann", name)
        frames = await ask(ann, {"type": "send", "conversation": conv, "cid": "c1", "text": "hi"})
        frames += await ask(ann, {"type": "typing", "conversation": conv, "active": True}, "t")
        refused[name] = norm(frames, name)
    assert refused["t-blocker"] == refused["t-stranger"] == refused["t-ghost"]
    assert [f["code"] for f in refused["t-ghost"]] == ["not_contact", "not_contact"]
    assert await barrier(ann_tablet) == []
    # Contacts: one offline, one that blocks ann.
    contact_blocker = await net.connect("t-cblocker")
    await befriend(ann, contact_blocker)
    await contact_blocker.request({"type": "block", "identity": "ann"})
    offline = await net.connect("t-offline")
    await befriend(ann, offline)
    await offline.close()
    ann_tablet.drain()
    sent = {}
    for name in ("t-cblocker", "t-offline"):
        conv = dm("ann", name)
        frames = await ask(ann, {"type": "send", "conversation": conv, "cid": "c1", "text": "hi"})
        frames += await ask(ann, {"type": "typing", "conversation": conv, "active": True}, "t")
        tablet = await barrier(ann_tablet)
        sent[name] = norm([frames, tablet], name)
    assert sent["t-cblocker"] == sent["t-offline"]
    assert [f["type"] for f in sent["t-offline"][0]] == ["sent", "ok"]
    assert [f["type"] for f in sent["t-offline"][1]] == ["message", "typing"]
    assert [f for f in await barrier(contact_blocker) if f["type"] in ("message", "typing")] == []
    # Nothing refused was stored.
    convs = {r[0] for r in await query(net.store, "SELECT DISTINCT conversation FROM messages")}
    assert convs == {dm("ann", "t-cblocker"), dm("ann", "t-offline")}


# --- what a block does --------------------------------------------------------------------------


async def test_a_blocked_senders_messages_are_its_own(
    net_factory: Callable[..., Awaitable[Net]],
) -> None:
    net = await net_factory("token")
    ann = await net.connect("ann")
    ann_tablet = await net.connect("ann")
    bob = await net.connect("bob")
    conv = dm("ann", "bob")
    await ann.send_chat(conv, "before the block")
    await bob.next_event("message")
    await bob.request({"type": "block", "identity": "ann"})
    assert (await ann.request({"type": "contacts"}))["relations"] == []  # ann cannot tell
    ann_tablet.drain()
    sent = await ann.send_chat(conv, "are you there?")
    assert sent["seq"] == 2
    edit = {"type": "edit", "conversation": conv, "cid": "e1", "ref": 2, "text": "hello?"}
    await ann.request(edit)
    await ann.request({"type": "typing", "conversation": conv, "active": True})
    assert [f["type"] for f in await barrier(ann_tablet)] == ["message", "message", "typing"]
    # bob's devices get none of it; his history, sync and conversation list end at seq 1.
    assert [f for f in await barrier(bob) if f["type"] in ("message", "typing")] == []
    hist = await bob.request({"type": "history", "conversation": conv})
    assert [m["seq"] for m in hist["messages"]] == [1] and hist["last_seq"] == 1
    synced = await bob.request({"type": "sync", "since": {conv: 0}})
    assert [m["seq"] for m in synced["conversations"][0]["messages"]] == [1]
    assert synced["conversations"][0]["last_seq"] == 1
    (item,) = (await bob.request({"type": "conversations"}))["items"]
    assert (item["conversation"], item["last_seq"], item["read_seq"], item["unread"]) == (
        conv,
        1,
        0,
        1,
    )
    assert item["last_message"]["text"] == "before the block"
    # ann sees her conversation whole.
    hist = await ann.request({"type": "history", "conversation": conv})
    assert [m["seq"] for m in hist["messages"]] == [1, 2, 3]
    # bob may not write to, call or ask someone he blocks.
    for msg in (
        {"type": "send", "conversation": conv, "cid": "b1", "text": "x"},
        {"type": "typing", "conversation": conv, "active": True},
        {"type": "call_invite", "to": ["ann"]},
        {"type": "contact_request", "identity": "ann"},
    ):
        with pytest.raises(ClientError) as e:
            await bob.request(msg)
        assert e.value.code == "blocked", msg
    # After unblocking, new messages reach him; the withheld ones stay a hole (seq 2, 3).
    await bob.request({"type": "unblock", "identity": "ann"})
    await ann.send_chat(conv, "after")
    got = await bob.next_event("message")
    assert got["seq"] == 4 and got["text"] == "after"
    hist = await bob.request({"type": "history", "conversation": conv, "after": 1})
    assert [m["seq"] for m in hist["messages"]] == [4] and hist["last_seq"] == 4
    # The app's backend sees the log as each member does.
    async with aiohttp.ClientSession(headers=AUTH) as http:
        base = f"http://127.0.0.1:{net.server.port}/api/conversations/{conv.replace('|', '%7C')}"
        for viewer, seqs in (("bob", [1, 4]), ("ann", [1, 2, 3, 4]), (None, [1, 2, 3, 4])):
            params = {"viewer": viewer} if viewer else {}
            async with http.get(base + "/messages", params=params) as r:
                assert [m["seq"] for m in (await r.json())["messages"]] == seqs
        async with http.get(base + "/messages", params={"viewer": "not valid"}) as r:
            assert r.status == 400 and (await r.json())["code"] == "bad_field"


async def test_no_push_for_what_a_blocker_does_not_get(
    net_factory: Callable[..., Awaitable[Net]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    receiver = Receiver()
    hook = web.Application()
    hook.router.add_post("/hook", receiver.handle)
    hook_server = await aiohttp_server(hook, host="127.0.0.1")
    net = await net_factory(
        "token",
        push__webhook_url=f"http://127.0.0.1:{hook_server.port}/hook",
        push__secret=PUSH_SECRET,
        calls__ring_timeout_s=0.3,
    )
    ann = await net.connect("ann")
    for name in ("bob", "carol"):  # both offline; carol blocks ann
        c = await net.connect(name)
        if name == "carol":
            await c.request({"type": "block", "identity": "ann"})
        await c.close()
    for name in ("bob", "carol"):
        await ann.send_chat(dm("ann", name), "hi")
        await ann.request({"type": "call_invite", "to": [name]})
        await ann.next_event("message")  # the missed-call log: the call is over
    await push_barrier(net.server, receiver)
    pushed = {(e["type"], e["identity"]) for e in receiver.delivered}
    assert pushed == {("message.new", "bob"), ("call.incoming", "bob"), ("call.cancelled", "bob")}


async def test_live_watches_follow_relations(net_factory: Callable[..., Awaitable[Net]]) -> None:
    net = await net_factory("token")
    ann = await net.connect("ann")
    cat = await net.connect("cat")
    await befriend(ann, cat)
    state = await ann.request({"type": "watch", "identities": ["cat", "dan", "eve"]})
    assert [p["status"] for p in state["presence"]] == ["online", "offline", "offline"]
    # A block: ann sees cat go offline at once, and hears nothing more.
    await cat.request({"type": "block", "identity": "ann"})
    assert await barrier(ann) == [{"type": "presence", "identity": "cat", "status": "offline"}]
    await cat.request({"type": "presence", "status": "busy"})
    assert await barrier(ann) == []
    await cat.request({"type": "unblock", "identity": "ann"})
    assert await barrier(ann) == [{"type": "presence", "identity": "cat", "status": "busy"}]
    # A contact ended by the other side: offline again.
    await cat.request({"type": "contact_remove", "identity": "ann"})
    frames = await barrier(ann)
    assert {"type": "presence", "identity": "cat", "status": "offline"} in frames
    # A new contact (made by the app's backend here) starts showing without a new `watch`.
    await net.connect("dan")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        url = f"http://127.0.0.1:{net.server.port}/api/identities/ann/contacts/dan"
        async with http.put(url) as r:
            assert r.status == 200
    assert {"type": "presence", "identity": "dan", "status": "online"} in await barrier(ann)
    # A direct conversation: a stranger's message unlocks nothing, an answer does.
    eve = await net.connect("eve")
    await eve.send_chat(dm("ann", "eve"), "hello stranger")
    assert [f for f in await barrier(ann) if f["type"] == "presence"] == []
    await ann.send_chat(dm("ann", "eve"), "hello eve")
    got = await ann.next_event("presence")
    assert got == {"type": "presence", "identity": "eve", "status": "online"}
    # A resumed session gets the statuses as it may see them.
    token = ann.welcome["resume"]
    await ann.drop()
    again = await net.connect("ann", resume=token)
    assert again.welcome["resumed"] is True
    state = await again.next_event("presence_state")
    assert state["presence"] == [
        {"identity": "cat", "status": "offline"},
        {"identity": "dan", "status": "online"},
        {"identity": "eve", "status": "online"},
    ]


async def test_an_unseen_callee_cannot_ring_or_act(
    net_factory: Callable[..., Awaitable[Net]],
) -> None:
    net = await net_factory("token")
    ann = await net.connect("ann")
    bob = await net.connect("bob")
    await bob.request({"type": "block", "identity": "ann"})
    state = await ann.request({"type": "call_invite", "to": ["bob"]})
    assert state["parties"][1] == {"identity": "bob", "status": "invited"}
    bob_tablet = await net.connect("bob")  # a device that connects while it rings: no ring
    for t in ("call_accept", "call_decline", "call_ringing", "call_hangup"):
        with pytest.raises(ClientError) as e:
            await bob_tablet.request({"type": t, "call": state["call"]})
        assert e.value.code == "no_such_call"
    assert [f for f in await barrier(bob_tablet) if f["type"].startswith("call")] == []
    await ann.request({"type": "call_cancel", "call": state["call"]})
    assert (await ann.next_event("message"))["call"]["outcome"] == "cancelled"
    assert [f for f in await barrier(bob) if f["type"] != "welcome"] == []


# --- the messages of contacts and blocks ------------------------------------------------------


@MODES
async def test_requests_answers_and_events(
    net_factory: Callable[..., Awaitable[Net]], mode: str
) -> None:
    net = await net_factory(mode)
    ann = await net.connect("ann")
    ann_tablet = await net.connect("ann")
    bob = await net.connect("bob")

    def rel(identity: str, status: str, blocked: bool = False) -> dict[str, Any]:
        return {"type": "relation", "identity": identity, "status": status, "blocked": blocked}

    await ann.request({"type": "contact_request", "identity": "bob"})
    assert await barrier(ann_tablet) == [rel("bob", "outgoing")]
    assert await barrier(bob) == [rel("ann", "incoming")]
    await bob.request({"type": "contact_accept", "identity": "ann"})
    assert await barrier(ann) == [rel("bob", "contact")]
    assert await barrier(ann_tablet) == [rel("bob", "contact")]
    listed = await ann.request({"type": "contacts"})
    assert listed["relations"] == [{"identity": "bob", "status": "contact", "blocked": False}]
    await ann_tablet.request({"type": "contact_remove", "identity": "bob"})
    assert await barrier(bob) == [rel("ann", "none")]
    assert await barrier(ann) == [rel("bob", "none")]
    # A declined request: the one who asked is not told.
    await bob.request({"type": "contact_request", "identity": "ann"})
    await ann.request({"type": "contact_decline", "identity": "bob"})
    assert await barrier(bob) == []
    assert (await bob.request({"type": "contacts"}))["relations"] == [
        {"identity": "ann", "status": "outgoing", "blocked": False}
    ]
    assert (await ann.request({"type": "contacts"}))["relations"] == []
    # Blocks: the blocker's devices hear it, the blocked do not.
    ann_tablet.drain()
    await ann.request({"type": "block", "identity": "bob"})
    assert await barrier(ann_tablet) == [rel("bob", "none", True)]
    assert await barrier(bob) == []
    await ann.request({"type": "unblock", "identity": "bob"})
    assert await barrier(ann_tablet) == [rel("bob", "none")]
    assert net.server.app[HUB].blocks.blocked("ann", "bob") is False


async def test_users_need_the_contacts_claim(net_factory: Callable[..., Awaitable[Net]]) -> None:
    net = await net_factory("token")
    ann = await net.connect("ann", contacts=False)
    for t in ("contact_request", "contact_accept", "contact_decline", "contact_remove"):
        with pytest.raises(ClientError) as e:
            await ann.request({"type": t, "identity": "bob"})
        assert e.value.code == "forbidden", t
    # Blocking and listing need no claim.
    await ann.request({"type": "block", "identity": "bob"})
    assert (await ann.request({"type": "contacts"}))["relations"] == [
        {"identity": "bob", "status": "none", "blocked": True}
    ]
    assert await net.store.relations_of("bob") == []


BAD_INPUT: list[tuple[dict[str, Any], str]] = [
    ({}, "bad_field"),
    ({"identity": 7}, "bad_field"),
    ({"identity": ""}, "bad_field"),
    ({"identity": "has space"}, "bad_field"),
    ({"identity": "x" * 129}, "bad_field"),
    ({"identity": "bob", "extra": 1}, "bad_field"),
    ({"identity": "ann"}, "bad_field"),  # yourself
]


@MODES
async def test_bad_input_is_refused_and_stores_nothing(
    net_factory: Callable[..., Awaitable[Net]], mode: str
) -> None:
    net = await net_factory(mode, privacy__max_pending_requests=2)
    ann = await net.connect("ann")
    types = ("contact_request", "contact_accept", "contact_decline", "contact_remove")
    for t in (*types, "block", "unblock"):
        for fields, code in BAD_INPUT:
            frames = await ask(ann, {"type": t, **fields})
            assert [f["type"] for f in frames] == ["error"] and frames[0]["code"] == code, (
                t,
                fields,
            )
            assert frames[0]["message"] and frames[0]["re"] == "q"
    frames = await ask(ann, {"type": "contacts", "identity": "bob"})
    assert frames[0]["code"] == "bad_field"
    # Refusals that depend on the state: nothing is written either.
    for t in ("contact_accept", "contact_decline"):
        assert (await ask(ann, {"type": t, "identity": "bob"}))[0]["code"] == "no_such_request"
    for name in ("b1", "b2"):
        await ann.request({"type": "contact_request", "identity": name})
    assert (await ask(ann, {"type": "contact_request", "identity": "b3"}))[0]["code"] == (
        "too_many_requests"
    )
    await ann.request({"type": "block", "identity": "b4"})
    assert (await ask(ann, {"type": "contact_request", "identity": "b4"}))[0]["code"] == "blocked"
    assert await net.store.relations_of("ann") == [
        Relation("b1", "outgoing", False),
        Relation("b2", "outgoing", False),
        Relation("b4", "none", True),
    ]
    counts = [
        (await query(net.store, f"SELECT count(*) FROM {table}"))[0][0]
        for table in ("contacts", "contact_requests", "blocks")
    ]
    assert counts == [0, 2, 1]
    assert net.server.app[HUB].counters.internal_errors == 0


async def test_the_backend_keeps_relations(net_factory: Callable[..., Awaitable[Net]]) -> None:
    net = await net_factory("token")
    ann = await net.connect("ann", contacts=False)
    bob = await net.connect("bob", contacts=False)
    base = f"http://127.0.0.1:{net.server.port}/api/identities"
    async with aiohttp.ClientSession(headers=AUTH) as http:

        async def call(method: str, path: str) -> tuple[int, Any]:
            async with http.request(method, base + path) as r:
                return r.status, await r.json()

        status, body = await call("PUT", "/ann/contacts/bob")
        assert status == 200 and body == {
            "identity": "ann",
            "relation": {"identity": "bob", "status": "contact", "blocked": False},
        }
        for c, other in ((ann, "bob"), (bob, "ann")):
            assert await barrier(c) == [
                {"type": "relation", "identity": other, "status": "contact", "blocked": False}
            ]
        assert (await call("PUT", "/ann/contacts/bob"))[0] == 200  # again: nothing new
        assert await barrier(ann) == []
        status, body = await call("PUT", "/bob/blocks/ann")
        assert body["relation"] == {"identity": "ann", "status": "contact", "blocked": True}
        assert await barrier(ann) == []  # ann is not told
        assert net.server.app[HUB].blocks.blocked("bob", "ann")
        status, body = await call("GET", "/bob/relations")
        assert body == {
            "identity": "bob",
            "relations": [{"identity": "ann", "status": "contact", "blocked": True}],
        }
        await call("DELETE", "/bob/blocks/ann")
        status, body = await call("DELETE", "/bob/contacts/ann")
        assert body["relation"] == {"identity": "ann", "status": "none", "blocked": False}
        assert (await call("GET", "/ann/relations"))[1]["relations"] == []
        assert (await call("GET", "/nobody/relations"))[1]["relations"] == []
        for method, path in (
            ("PUT", "/ann/contacts/ann"),
            ("PUT", "/ann/blocks/ann"),
            ("PUT", "/bad%20id/contacts/bob"),
            ("DELETE", "/ann/contacts/bad%20id"),
            ("GET", "/bad%20id/relations"),
        ):
            status, body = await call(method, path)
            assert (status, body["code"]) == (400, "bad_field"), (method, path)
    assert await net.store.relations_of("ann") == []


async def test_contacts_come_in_pages_within_the_reply_limit(
    net_factory: Callable[..., Awaitable[Net]],
) -> None:
    net = await net_factory(
        "open",
        limits__max_text_chars=100,
        limits__max_reply_bytes=9000,  # the smallest a config allows with these texts
        limits__rate_per_s=1000,
        limits__burst=1000,
    )
    ann = await net.connect("ann")
    names = sorted(f"{i:03d}-" + "x" * 96 for i in range(120))
    for name in names:
        await ann.request({"type": "block", "identity": name})
    got: list[str] = []
    pages = 0
    after: dict[str, Any] = {}
    while True:
        page = await ann.request({"type": "contacts", **after})
        pages += 1
        got += [r["identity"] for r in page["relations"]]
        assert len(orjson.dumps(page)) <= 9000
        if not page["more"]:
            break
        after = {"after": got[-1]}
    assert got == names and pages > 1
    ten = await ann.request({"type": "contacts", "limit": 10, "after": names[0]})
    assert [r["identity"] for r in ten["relations"]] == names[1:11] and ten["more"] is True
    for bad in ({"limit": 0}, {"limit": 501}, {"after": "bad id"}):
        with pytest.raises(ClientError) as e:
            await ann.request({"type": "contacts", **bad})
        assert e.value.code == "bad_field"


# --- groups ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token", "open"])
async def test_a_shared_group_opens_presence_and_leaving_closes_it(
    net_factory: Callable[..., Awaitable[Net]], mode: str
) -> None:
    net = await net_factory(mode)
    ann = await net.connect("ann")
    bob = await net.connect("bob")
    state = await ann.request({"type": "watch", "identities": ["bob"]})
    assert state["presence"] == [{"identity": "bob", "status": "offline"}]  # strangers
    # A group with both in it: ann's watch starts showing bob, without a new `watch`.
    g = await bob.request({"type": "group_create", "cid": "g1", "name": "G", "identities": ["ann"]})
    conv = g["conversation"]
    got = await ann.next_event("presence")
    assert got == {"type": "presence", "identity": "bob", "status": "online"}
    await bob.request({"type": "presence", "status": "busy"})
    assert (await ann.next_event("presence"))["status"] == "busy"
    # ann leaves: bob is a stranger again, offline to her at once and from then on.
    await ann.request({"type": "group_leave", "conversation": conv, "cid": "l1"})
    got = await ann.next_event("presence")  # the watch is checked again in the background
    assert got == {"type": "presence", "identity": "bob", "status": "offline"}
    await bob.request({"type": "presence", "status": "away"})
    assert [f for f in await barrier(ann) if f["type"] == "presence"] == []


async def test_someone_who_blocks_you_is_not_added_to_your_groups(
    net_factory: Callable[..., Awaitable[Net]],
) -> None:
    net = await net_factory("token")
    ann = await net.connect("ann")
    bob = await net.connect("bob")
    cy = await net.connect("cy")
    await bob.request({"type": "block", "identity": "ann"})
    g = await ann.request(
        {"type": "group_create", "cid": "g1", "name": "G", "identities": ["bob", "cy"]}
    )
    assert [m["identity"] for m in g["members"]] == ["ann", "cy"]
    assert g["message"]["group"]["identities"] == ["ann", "cy"]
    conv = g["conversation"]
    add = {"type": "group_add", "conversation": conv, "cid": "a1", "identities": ["bob"]}
    with pytest.raises(ClientError) as e:
        await ann.request(add)
    assert e.value.code == "bad_field"
    # bob heard of none of it; cy, who does not block ann, was added and told.
    assert [f for f in await barrier(bob) if f["type"] == "message"] == []
    assert (await cy.next_event("message"))["group"]["action"] == "created"
    # Anyone else in the group may add bob (he blocks ann, not cy).
    await ann.request(
        {"type": "group_role", "conversation": conv, "cid": "r1", "identity": "cy", "role": "admin"}
    )
    added = await cy.request({**add, "cid": "a2"})
    assert [m["identity"] for m in added["members"]] == ["ann", "bob", "cy"]


async def test_the_sdk_covers_contacts_blocks_and_presence(
    server: TestServer, phones: Callable[..., Awaitable[RallypointClient]]
) -> None:
    """The SDK's helpers, end to end (open mode: every identity may manage its contacts)."""
    ann = await phones(server, "ann")
    bob = await phones(server, "bob")
    assert await ann.watch("bob", "nobody") == {"bob": "offline", "nobody": "offline"}
    await ann.contact_request("bob")
    assert (await bob.next_event("relation"))["status"] == "incoming"
    await bob.contact_accept("ann")
    assert await ann.contacts() == [{"identity": "bob", "status": "contact", "blocked": False}]
    # Contacts see each other: the live watch follows the new relation.
    assert await ann.next_event("presence", where=lambda e: e["identity"] == "bob") == {
        "type": "presence",
        "identity": "bob",
        "status": "online",
    }
    await bob.set_presence("busy")
    assert (await ann.next_event("presence"))["status"] == "busy"
    await bob.block("ann")
    assert (await ann.next_event("presence"))["status"] == "offline"
    # A block keeps the contact (unblocking restores it) and stops everything else.
    assert await bob.contacts() == [{"identity": "ann", "status": "contact", "blocked": True}]
    await bob.unblock("ann")
    await bob.contact_remove("ann")
    await bob.block("ann")
    with pytest.raises(ClientError) as e:
        await bob.contact_request("ann")
    assert e.value.code == "blocked"
    await bob.unblock("ann")
    await ann.contact_request("bob")
    await bob.contact_decline("ann")
    await ann.contact_remove("bob")
    assert await ann.contacts() == [] and await bob.contacts() == []
    assert await ann.watch("bob") == {"bob": "offline"}  # strangers again
