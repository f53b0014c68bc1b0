"""Cluster mode (issue 14) with real processes: two server nodes on one PostgreSQL schema and
one Redis (a key prefix of the test's own), clients on different nodes.

The shared services are the ones at ``RALLYPOINT_TEST_PG`` and ``RALLYPOINT_TEST_REDIS``
(default: 127.0.0.1:5432 database ``test``, 127.0.0.1:6379); each test has its own schema
and key prefix, and removes both."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from processes import Server
from stores import PG_URL, pg_schema

from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import ClientError

REDIS_URL = os.environ.get("RALLYPOINT_TEST_REDIS", "redis://127.0.0.1:6379/0")
HEARTBEAT_S = 0.3  # the nodes' heartbeat here: a dead node is gone for the others within 1.2 s


class Cluster:
    """Nodes sharing a store and a Redis; ``clients`` are closed at the end."""

    def __init__(self, nodes: list[Server], prefix: str) -> None:
        self.nodes = nodes
        self.prefix = prefix
        self.clients: list[RallypointClient] = []

    async def client(self, node: int, identity: str, **kw: Any) -> RallypointClient:
        c = RallypointClient(self.nodes[node].url, identity=identity, name=identity.title(), **kw)
        self.clients.append(c)
        await c.connect()
        return c


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    servers: list[Server],
    n: int = 2,
    extra: str = "",
    redis_url: str = REDIS_URL,
    pg_url: str = PG_URL,
    *,
    sfu: str = "enabled = false",
    node_env: list[dict[str, str]] | None = None,
) -> AsyncIterator[Cluster]:
    """``n`` nodes; ``sfu``: the ``[sfu]`` section's lines; ``node_env``: each node's own
    environment (``RALLYPOINT_<SECTION>_<KEY>`` settings of that node alone)."""
    prefix = "test" + secrets.token_hex(5)
    async with pg_schema(pg_url) as store_url:
        config = tmp_path / "cluster.toml"
        config.write_text(
            f'[store]\nurl = "{store_url}"\n\n'
            f'[cluster]\nredis_url = "{redis_url}"\nkey_prefix = "{prefix}"\n'
            f"heartbeat_s = {HEARTBEAT_S}\n\n"
            f"[sfu]\n{sfu}\n\n{extra}"
        )
        # A node that hangs can be made to show where (SIGABRT: its traceback in its log).
        env = {"PYTHONFAULTHANDLER": "1"}
        nodes = [
            Server(
                tmp_path / f"n{i}",
                {**env, **(node_env[i] if node_env else {})},
                ["--config", str(config)],
            )
            for i in range(n)
        ]
        servers.extend(nodes)
        await asyncio.gather(*(s.start() for s in nodes))
        c = Cluster(nodes, prefix)
        try:
            yield c
        finally:
            try:
                for client in c.clients:
                    await client.close()
                for s in nodes:
                    if s.proc is not None and s.proc.poll() is None:
                        s.stop()  # SIGTERM: a clean stop (TimeoutExpired if it hangs)
            finally:
                if redis_url == REDIS_URL:  # the shared Redis keeps nothing of this test
                    r = aioredis.Redis.from_url(REDIS_URL)
                    keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
                    if keys:
                        await r.delete(*keys)
                    await r.aclose()


async def until(cond: Callable[[], Any], timeout: float = 10.0) -> None:
    """Wait, bounded, for ``cond`` (polled every 20 ms)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def metric(node: Server, name: str) -> float:
    """A value of the node's /metrics (``rallypoint_<name>``)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{node.port}/metrics") as r:
            text = await r.text()
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith(f"rallypoint_{name} ")
    )


def no_event(c: RallypointClient, type_: str) -> bool:
    return all(e["type"] != type_ for e in list(c.events._queue))  # type: ignore[attr-defined]


# -- chat ------------------------------------------------------------------------------------


async def test_chat_reaches_devices_on_the_other_node(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A room's chat, a direct message and a group message sent on node A reach the
    recipient's devices on node B with the same ids and seq; typing and receipts too."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        bob2 = await cl.client(0, "bob")  # bob's second device, on alice's node

        # Room chat.
        await alice.join("lobby")
        await bob.join("lobby")
        sent = await alice.send("room:lobby", "hello room")
        got = await bob.next_message("room:lobby")
        assert (got["mid"], got["seq"], got["text"]) == (sent["mid"], sent["seq"], "hello room")

        # A direct message: both of bob's devices, one on each node.
        dm = "dm:alice|bob"
        sent = await alice.send(dm, "hello bob")
        for device in (bob, bob2):
            got = await device.next_message(dm)
            assert (got["mid"], got["seq"], got["from"]) == (sent["mid"], sent["seq"], "alice")
        back = await bob.send(dm, "hello alice")
        got = await alice.next_message(dm)
        assert (got["mid"], got["seq"]) == (back["mid"], back["seq"]) and back["seq"] == 2

        # Typing and a receipt, from B to A.
        await bob.request({"type": "typing", "conversation": dm, "active": True})
        ev = await alice.next_event("typing")
        assert (ev["conversation"], ev["identity"]) == (dm, "bob")
        await bob.read(dm, 1)
        ev = await alice.next_event("receipt")
        assert (ev["conversation"], ev["identity"], ev["seq"]) == (dm, "bob", 1)

        # A group made on A: bob hears of it on B, and writes to it from B at once.
        group = (await alice.create_group("team", ["bob"]))["conversation"]
        created = await bob.next_message(group)
        assert (created["seq"], created["group"]["action"]) == (1, "created")
        sent = await alice.send(group, "hello team")
        got = await bob.next_message(group)
        assert (got["mid"], got["seq"]) == (sent["mid"], sent["seq"])
        reply = await bob.send(group, "hi from B")
        got = await alice.next_message(group, where=lambda m: m["from"] == "bob")
        assert (got["mid"], got["seq"]) == (reply["mid"], sent["seq"] + 1)


async def test_a_retried_client_id_on_the_other_node_is_stored_once(
    tmp_path: Path, servers: list[Server]
) -> None:
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        on_a = await cl.client(0, "alice")
        on_b = await cl.client(1, "alice")  # the same identity, as after failing over
        bob = await cl.client(1, "bob")
        dm = "dm:alice|bob"
        first = await on_a.send(dm, "once", cid="c-1")
        again = await on_b.send(dm, "once", cid="c-1")
        assert (again["mid"], again["seq"], again["duplicate"]) == (
            first["mid"],
            first["seq"],
            True,
        )
        stored = await bob.history(dm, after=0, limit=10)
        assert [m["cid"] for m in stored] == ["c-1"]


# -- rooms -----------------------------------------------------------------------------------


async def test_a_room_spans_nodes(tmp_path: Path, servers: list[Server]) -> None:
    """Joins, updates, the lock, mute and kick between participants on different nodes."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        carol = await cl.client(1, "carol")

        a = await alice.join("r")
        assert a["self"]["moderator"] is True and a["participants"] == []  # the first joiner
        b = await bob.join("r")
        assert b["self"]["moderator"] is False
        assert [p["identity"] for p in b["participants"]] == ["alice"]
        ev = await alice.next_event("participant_joined")
        assert ev["participant"]["id"] == b["self"]["id"]

        await bob.request({"type": "update", "room": "r", "audio_muted": True})
        ev = await alice.next_event("participant_updated")
        assert (ev["participant"]["id"], ev["participant"]["audio_muted"]) == (
            b["self"]["id"],
            True,
        )
        c = await carol.join("r")  # sees bob's update, stored in Redis
        flags = {p["identity"]: p["audio_muted"] for p in c["participants"]}
        assert flags == {"alice": False, "bob": True}
        await alice.next_event("participant_joined")

        # The lock: told on the other node, and it holds there.
        await alice.request({"type": "lock", "room": "r", "locked": True})
        ev = await bob.next_event("room_updated")
        assert (ev["locked"], ev["by"]) == (True, a["self"]["id"])
        dave = await cl.client(1, "dave")
        with pytest.raises(ClientError) as refused:
            await dave.join("r")
        assert refused.value.code == "room_locked"
        await alice.request({"type": "lock", "room": "r", "locked": False})
        assert (await bob.next_event("room_updated"))["locked"] is False

        # A moderator on A mutes and kicks a participant on B.
        await alice.request(
            {"type": "mute", "room": "r", "participant": b["self"]["id"], "kind": "audio"}
        )
        ev = await bob.next_event("mute_requested")
        assert (ev["room"], ev["kind"], ev["by"]) == ("r", "audio", a["self"]["id"])
        await alice.request({"type": "kick", "room": "r", "participant": b["self"]["id"]})
        ev = await bob.next_event("kicked")
        assert (ev["room"], ev["by"]) == ("r", a["self"]["id"])
        for watcher in (alice, carol):
            ev = await watcher.next_event(
                "participant_left", where=lambda e: e["participant"] == b["self"]["id"]
            )
            assert ev["reason"] == "kicked"
        with pytest.raises(ClientError) as gone:
            await alice.request({"type": "kick", "room": "r", "participant": b["self"]["id"]})
        assert gone.value.code == "no_such_participant"

        # A leave on B is seen on A; the room left on B has alice and nobody else.
        await carol.leave("r")
        ev = await alice.next_event("participant_left")
        assert (ev["participant"], ev["reason"]) == (c["self"]["id"], "left")
        again = await bob.join("r")
        assert [p["identity"] for p in again["participants"]] == ["alice"]


async def test_one_first_joiner_moderates_whatever_the_race(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Two participants on two nodes join empty rooms at the same time: in each room, one of
    them (the one Redis saw first) is the moderator."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        on_a = await cl.client(0, "alice")
        on_b = await cl.client(1, "bob")
        for i in range(20):
            ja, jb = await asyncio.gather(on_a.join(f"race{i}"), on_b.join(f"race{i}"))
            assert [ja["self"]["moderator"], jb["self"]["moderator"]].count(True) == 1
            # The second to join sees the first (and the first nobody, or the second).
            assert len(ja["participants"]) + len(jb["participants"]) == 1


# -- presence --------------------------------------------------------------------------------


async def test_presence_spans_nodes_and_a_dead_nodes_devices_go_offline(
    tmp_path: Path, servers: list[Server]
) -> None:
    """An identity online on any node is online everywhere (its strongest device wins), to
    those the privacy rule lets see it; when its node is SIGKILLed, its devices go offline
    on the other node within the documented bound (4 x heartbeat_s + the resume grace + a
    heartbeat), and its participants leave their rooms."""
    grace = 1.0
    extra = f"[session]\nresume_grace_s = {grace}\n"
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        carol = await cl.client(0, "carol")  # not a contact of bob's: sees him offline
        bob = await cl.client(1, "bob")
        await bob.contact_request("alice")
        await alice.contact_accept("bob")

        assert await alice.watch("bob") == {"bob": "online"}  # online on the other node
        assert await carol.watch("bob") == {"bob": "offline"}
        await bob.set_presence("away")
        ev = await alice.next_event("presence")
        assert (ev["identity"], ev["status"]) == ("bob", "away")
        phone = await cl.client(0, "bob")  # a second device, on alice's node
        ev = await alice.next_event("presence")
        assert (ev["identity"], ev["status"]) == ("bob", "online")
        await phone.set_presence("busy")
        assert (await alice.next_event("presence"))["status"] == "busy"
        await phone.close()  # `bye`: the device on B is what is left
        assert (await alice.next_event("presence"))["status"] == "away"
        assert await alice.watch("bob") == {"bob": "away"}

        await alice.join("r")
        joined = await bob.join("r")
        await alice.next_event("participant_joined")

        node_b = cl.nodes[1]
        assert node_b.proc is not None
        killed = time.monotonic()
        node_b.stop(signal.SIGKILL)
        told: dict[str, dict[str, Any]] = {}
        for _ in range(2):  # in either order
            ev = await alice.next_event(
                timeout=10, where=lambda e: e["type"] in ("presence", "participant_left")
            )
            told[ev["type"]] = ev
        took = time.monotonic() - killed
        assert (told["presence"]["identity"], told["presence"]["status"]) == ("bob", "offline")
        left = told["participant_left"]
        assert (left["participant"], left["reason"]) == (joined["self"]["id"], "disconnected")
        bound = 5 * HEARTBEAT_S + grace
        assert took < bound + 1.0, f"offline after {took:.2f} s (bound {bound:.2f} s)"
        assert await alice.watch("bob") == {"bob": "offline"}
        assert no_event(carol, "presence")  # never told anything about bob
        print(f"\nbob offline on node A {took:.3f} s after node B was SIGKILLed")


async def test_nodes_write_their_entries_again_when_redis_lost_them(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Every key of the cluster is removed (what a Redis restart without persistence does,
    done here without restarting the shared Redis): each node notices on its next heartbeat
    and writes its own participants and statuses again, from memory."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        a = await alice.join("r")
        r = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [k async for k in r.scan_iter(match=f"{cl.prefix}:*", count=1000)]
            assert keys
            await r.delete(*keys)
            room = f"{cl.prefix}:room:r"
            deadline = time.monotonic() + 10
            while not await r.hexists(room, a["self"]["id"]):
                assert time.monotonic() < deadline, "not re-asserted"
                await asyncio.sleep(0.05)
        finally:
            await r.aclose()
        bob = await cl.client(1, "bob")
        b = await bob.join("r")
        assert [p["id"] for p in b["participants"]] == [a["self"]["id"]]
        await bob.contact_request("alice")
        await alice.contact_accept("bob")
        assert await bob.watch("alice") == {"alice": "online"}


# -- resuming on another node ----------------------------------------------------------------


async def test_a_session_resumes_on_another_node(tmp_path: Path, servers: list[Server]) -> None:
    """Alice's connection to node A drops; she resumes with her token on node B: the same
    session, in the same room, watching the same identities; bob (on B) sees no leave or
    join, and node A forgets the session at once instead of waiting for the resume grace."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        bob = await cl.client(1, "bob")
        alice = await cl.client(0, "alice")
        await bob.contact_request("alice")
        await alice.contact_accept("bob")
        await bob.join("r")
        a = await alice.join("r")
        await bob.next_event("participant_joined")
        assert await alice.watch("bob") == {"bob": "online"}
        await alice.set_presence("away")
        token, sid = alice.welcome["resume"], alice.session
        await recorded(cl, token, b'"status":"away"')
        await alice.close(bye=False)  # the socket goes; the session waits on A

        again = await cl.client(1, "alice", resume=token)
        assert (again.welcome["resumed"], again.session) == (True, sid)
        assert again.welcome["rooms"] == ["r"]
        told = {}
        for _ in range(2):  # in either order
            ev = await again.next_event(
                where=lambda e: e["type"] in ("room_state", "presence_state")
            )
            told[ev["type"]] = ev
        state = told["room_state"]["participants"]
        assert sorted(p["identity"] for p in state) == ["alice", "bob"]
        assert told["presence_state"]["presence"] == [{"identity": "bob", "status": "online"}]
        sent = await again.send("room:r", "back, on B")
        got = await bob.next_message("room:r")
        assert (got["mid"], got["from"]) == (sent["mid"], "alice")
        assert await bob.watch("alice") == {"alice": "away"}  # her status came along
        await until_async(lambda: metric(cl.nodes[0], "sessions"), 0.0)
        assert no_event(bob, "participant_left") and no_event(bob, "participant_joined")
        # The token does not resume twice (it was rotated, and the old one taken once).
        late = await cl.client(0, "alice", resume=token)
        assert late.welcome["resumed"] is False
        assert a["self"]["id"] == sid


async def test_a_session_resumes_after_its_node_was_killed(
    tmp_path: Path, servers: list[Server]
) -> None:
    """alice and carol are in a room on node A with bob on node B. A is SIGKILLed and found
    dead; alice resumes on B within the grace: bob sees neither leave nor join for her (as on
    one node, a session waits for its resume). carol never comes back: once the grace has
    passed, bob sees her leave (`disconnected`) and her status goes offline."""
    grace = 2.0
    extra = f"[session]\nresume_grace_s = {grace}\n"
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(60):
        bob = await cl.client(1, "bob")
        alice = await cl.client(0, "alice")
        carol = await cl.client(0, "carol")
        await bob.contact_request("carol")
        await carol.contact_accept("bob")
        assert await bob.watch("carol") == {"carol": "online"}
        await bob.join("r")
        await alice.join("r")
        await carol.join("r")
        token, sid = alice.welcome["resume"], alice.session
        await recorded(cl, token, b'"r"')
        await recorded(cl, carol.welcome["resume"], b'"r"')
        node_a = cl.nodes[0]
        assert node_a.proc is not None
        node_a.stop(signal.SIGKILL)
        killed = time.monotonic()
        r = aioredis.Redis.from_url(REDIS_URL)
        try:  # B has found A dead (A left the node set)
            await until_async(lambda: r.scard(f"{cl.prefix}:nodes"), 1)
        finally:
            await r.aclose()

        again = await cl.client(1, "alice", resume=token)
        assert (again.welcome["resumed"], again.session) == (True, sid)
        sent = await again.send("room:r", "still here")
        assert (await bob.next_message("room:r"))["mid"] == sent["mid"]

        told: dict[str, dict[str, Any]] = {}
        for _ in range(2):  # in either order
            ev = await bob.next_event(
                timeout=grace + 5, where=lambda e: e["type"] in ("presence", "participant_left")
            )
            told[ev["type"]] = ev
        took = time.monotonic() - killed
        left = told["participant_left"]
        assert (left["identity"], left["reason"]) == ("carol", "disconnected")
        ev = told["presence"]
        assert (ev["identity"], ev["status"]) == ("carol", "offline")
        assert took >= grace  # not before she could have resumed
        print(f"\ncarol gone for bob {took:.2f} s after her node was SIGKILLed (grace {grace} s)")
        events = [e["type"] for e in list(bob.events._queue)]  # type: ignore[attr-defined]
        assert "participant_joined" not in events and "participant_left" not in events
        joined = await again.join("r")  # she is in it still (the others: bob alone)
        assert joined["self"]["id"] == sid
        assert [p["identity"] for p in joined["participants"]] == ["bob"]


async def recorded(cl: Cluster, token: str, part: bytes) -> None:
    """Wait, bounded, until the resume record of ``token`` contains ``part``: it is written
    just after a change is answered (a node that dies within that moment, or a resume on
    another node that fast, finds the session as it was before the change)."""
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 10
        while part not in (await r.get(f"{cl.prefix}:resume:{token}") or b""):
            assert time.monotonic() < deadline, f"no {part!r} in the resume record"
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def until_async(read: Callable[[], Any], want: Any, timeout: float = 10.0) -> None:
    """Wait, bounded, until the coroutine ``read()`` returns ``want`` (every 50 ms)."""
    deadline = time.monotonic() + timeout
    while (got := await read()) != want:
        assert time.monotonic() < deadline, f"still {got!r}, not {want!r}"
        await asyncio.sleep(0.05)


# -- Redis unavailable -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def private_redis_cluster(
    tmp_path: Path, servers: list[Server]
) -> AsyncIterator[tuple[Cluster, Any]]:
    """Two nodes on a redis-server of the test's own (``test_redisbus.PrivateRedis``, to be
    killed, stopped or restarted), killed at the end."""
    from test_redisbus import PrivateRedis

    redis = PrivateRedis()
    redis.start()
    try:
        await until_async(redis.answers, True)
        async with cluster(tmp_path, servers, redis_url=redis.url) as cl:
            yield cl, redis
    finally:
        redis.kill()


async def test_without_redis_rooms_answer_at_once_and_come_back_after(
    tmp_path: Path, servers: list[Server]
) -> None:
    """On a private redis-server: while it is down a join is answered at once (by the node
    alone), never after a timeout; once it is back (empty: nothing kept on disk) each node
    writes its own participants and statuses again, and the other node sees them."""
    async with private_redis_cluster(tmp_path, servers) as (cl, redis), asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        await bob.contact_request("alice")
        await alice.contact_accept("bob")
        a = await alice.join("r")

        redis.kill()
        await until_async(lambda: metric(cl.nodes[0], "cluster_unavailable"), 1.0)
        carol = await cl.client(0, "carol")
        started = time.monotonic()
        c = await carol.join("r")
        assert time.monotonic() - started < 1.0  # no Redis timeout in the way
        assert [p["id"] for p in c["participants"]] == [a["self"]["id"]]  # A's own

        redis.start()
        for node in cl.nodes:  # both back (bob's node answers his join through Redis)
            await until_async(lambda n=node: metric(n, "cluster_unavailable"), 0.0)
        await until_async(lambda: metric(cl.nodes[0], "cluster_reasserts_total"), 1.0)
        b = await bob.join("r")
        ids = sorted(p["id"] for p in b["participants"])
        assert ids == sorted([a["self"]["id"], c["self"]["id"]])
        assert await bob.watch("alice") == {"alice": "online"}
