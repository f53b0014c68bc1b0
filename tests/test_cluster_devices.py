"""What a cluster decides about an identity's devices on every node (issue 14), with real
processes (the fixtures of ``test_cluster``): pushes go to members with no live connection on
any node, one's own read receipts reach one's devices on other nodes, and a device of a
node that died leaves its calls unless it resumes elsewhere within the grace."""

from __future__ import annotations

import asyncio
import base64
import signal
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from processes import Server
from push_helpers import Receiver, webhook_server
from test_cluster import HEARTBEAT_S, REDIS_URL, Cluster, cluster, metric, recorded

from signaling.core.tokens import create_token
from signaling.sdk import RallypointClient

GRACE_S = 2.0  # session.resume_grace_s of the tests that let a dead node's devices go


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[Receiver, str]]:
    async with webhook_server() as hook:
        yield hook


async def test_only_members_connected_on_no_node_are_pushed(
    tmp_path: Path, servers: list[Server], webhook: tuple[Receiver, str]
) -> None:
    """A group of alice (node 0), bob (node 1) and carol (no device): alice's message is
    pushed to carol alone, although bob has no device on alice's node. bob's connection
    drops (his session waits for its resume): the next message is pushed to bob too, as on
    one node."""
    receiver, extra = webhook
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(60):
        carol = await cl.client(1, "carol")  # known to the store, then gone
        await carol.close()
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        group = (await alice.create_group("Trip", ["bob", "carol"]))["conversation"]
        sent = await alice.send(group, "who is in?")
        while (await bob.next_message(group))["mid"] != sent["mid"]:
            pass  # the group's creation first
        [first] = await receiver.wait_for(1, timeout=10)
        assert (first["type"], first["mid"]) == ("message.batch", sent["mid"])
        assert [r["identity"] for r in first["recipients"]] == ["carol"]

        token = bob.welcome["resume"]
        await recorded(cl, token, b'"identity":"bob"')
        await bob.close(bye=False)
        await until_gone(cl, "bob")
        again = await alice.send(group, "@bob are you there?")
        _, second = await receiver.wait_for(2, timeout=10)
        assert second["mid"] == again["mid"]
        got = [(r["identity"], r.get("mention", False)) for r in second["recipients"]]
        assert got == [("bob", True), ("carol", False)]
        assert receiver.bad_signatures == 0


async def until_gone(cl: Cluster, identity: str) -> None:
    """Wait, bounded, until no node has a live connection of ``identity`` in Redis."""
    r = aioredis.Redis.from_url(REDIS_URL)
    try:
        deadline = time.monotonic() + 10
        while await r.scard(f"{cl.prefix}:conn:{identity}"):
            assert time.monotonic() < deadline, f"{identity} still connected"
            await asyncio.sleep(0.02)
    finally:
        await r.aclose()


async def test_a_read_on_one_node_updates_ones_devices_on_the_other(
    tmp_path: Path, servers: list[Server]
) -> None:
    """alice reads bob's messages on her device of node 0; her device on node 1 gets the
    receipt with the unread count left, so both show the same count; bob gets the plain
    receipt."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        alice0 = await cl.client(0, "alice")
        alice1 = await cl.client(1, "alice")
        bob = await cl.client(0, "bob")
        conv = "dm:alice|bob"
        for text in ("one", "two", "three"):
            await bob.send(conv, text)
        for c in (alice0, alice1):
            for _ in range(3):
                await c.next_message(conv)
        await alice0.read(conv, 2)
        own = await alice1.next_event("receipt")
        assert own == {
            "type": "receipt",
            "conversation": conv,
            "identity": "alice",
            "seq": 2,
            "unread": 1,
        }
        plain = await bob.next_event("receipt")
        assert (plain["identity"], plain["seq"], "unread" in plain) == ("alice", 2, False)


async def test_a_dead_nodes_device_leaves_its_call_unless_it_resumes(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Two calls of alice's and dave's (node 0) with bob and carol (node 1). Node 1 is
    SIGKILLed: carol resumes on node 0 within the grace and her call goes on; bob never
    comes back, and once the grace has passed his call ends for alice (`completed`: fewer
    than two parties left), swept by node 0."""
    extra = f"[session]\nresume_grace_s = {GRACE_S}\n"
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        dave = await cl.client(0, "dave")
        bob = await cl.client(1, "bob")
        carol = await cl.client(1, "carol")
        with_bob = await alice.call("bob")
        with_carol = await dave.call("carol")
        await (await bob.next_call()).accept()
        await (await carol.next_call()).accept()
        await with_bob.next_event("call_accepted")
        await with_carol.next_event("call_accepted")
        token = carol.welcome["resume"]
        await recorded(cl, token, b'"identity":"carol"')

        node = cl.nodes[1]
        assert node.proc is not None
        node.stop(signal.SIGKILL)
        killed = time.monotonic()
        again = await cl.client(0, "carol", resume=token)
        assert again.welcome["resumed"]
        back = await again.next_call()
        assert (back.id, back.state) == (with_carol.id, "active")

        bound = 4 * HEARTBEAT_S + GRACE_S + 0.25 + 2.0  # found dead, grace, sweep, slack
        assert await with_bob.wait_ended(timeout=bound) == "completed"
        took = time.monotonic() - killed
        print(f"\nbob left his call {took:.2f} s after his node was killed")
        assert took >= GRACE_S  # not before he could have resumed
        assert await metric(cl.nodes[0], "call_dead_devices_left_total") == 1
        await back.hangup()  # carol's call went on: it ends only now, by her
        assert await with_carol.wait_ended() == "completed"


async def test_the_http_api_sees_and_kicks_the_participants_of_every_node(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A room with alice on node 0 and bob on node 1: either node's API lists the room with
    both, and a kick through node 0 removes bob from node 1 (bob gets `kicked` by `api`,
    alice `participant_left`); once the room is empty it is listed no more."""
    key, secret = "cluster-key", "a-cluster-secret-of-at-least-32-bytes"
    extra = f'[auth]\napi_key = "{key}"\napi_secret = "{secret}"\n'
    grants = {"r": ["join", "chat"]}
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}
    async with (
        cluster(tmp_path, servers, extra=extra) as cl,
        aiohttp.ClientSession(headers=auth) as http,
        asyncio.timeout(60),
    ):
        alice = await cl.client(0, "alice", token=create_token(key, secret, "alice", rooms=grants))
        bob = await cl.client(1, "bob", token=create_token(key, secret, "bob", rooms=grants))
        await alice.join("r")
        await bob.join("r")
        await alice.next_event("participant_joined")
        bases = [f"http://127.0.0.1:{n.port}/api" for n in cl.nodes]

        for base in bases:
            async with http.get(f"{base}/rooms") as r:
                assert r.status == 200
                assert (await r.json())["rooms"] == [
                    {"name": "r", "participants": 2, "locked": False}
                ]
            async with http.get(f"{base}/rooms/r/participants") as r:
                found = {p["identity"] for p in (await r.json())["participants"]}
                assert found == {"alice", "bob"}
        async with http.post(f"{bases[0]}/rooms/r/kick", json={"identity": "bob"}) as r:
            assert r.status == 200
            assert (await r.json())["kicked"] == [bob.session]
        kicked = await bob.next_event("kicked")
        assert (kicked["room"], kicked["by"]) == ("r", "api")
        left = await alice.next_event("participant_left")
        assert (left["participant"], left["reason"]) == (bob.session, "kicked")

        await alice.leave("r")
        for base in bases:
            deadline = time.monotonic() + 10
            while True:  # the leave is written just after it is answered
                async with http.get(f"{base}/rooms") as r:
                    if (await r.json())["rooms"] == []:
                        break
                assert time.monotonic() < deadline, "the empty room is still listed"
                await asyncio.sleep(0.05)
            async with http.get(f"{base}/rooms/r/participants") as r:
                assert (r.status, (await r.json())["code"]) == (404, "no_such_room")


async def test_a_conversations_events_arrive_in_seq_order_from_two_nodes(
    tmp_path: Path, servers: list[Server]
) -> None:
    """alice on node 0 and bob on node 1 send 150 messages each at once into one room:
    every device (carol on node 0, dave on node 1) gets all 300 events in `seq` order, 1 to
    300 without a gap, although the two nodes publish them on their own Redis connections
    (the nodes put them back in order: `bus_held` counts those that came early)."""
    n = 150
    extra = "[limits]\nrate_per_s = 1000.0\nburst = 1000\n"  # a burst, not a flood
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(90):
        senders = [await cl.client(0, "alice"), await cl.client(1, "bob")]
        readers = [await cl.client(0, "carol"), await cl.client(1, "dave")]
        seen: list[list[int]] = [[], []]
        done = [asyncio.Event(), asyncio.Event()]
        for c, got, all_in in zip(readers, seen, done, strict=True):
            c.listeners.append(partial(collect, got, all_in, 2 * n))
        for c in (*senders, *readers):
            await c.join("r")

        async def burst(c: RallypointClient) -> None:
            for i in range(0, n, 3):  # a few at a time: the two nodes' commits interleave
                await asyncio.gather(*(c.send("room:r", f"{j}") for j in range(i, i + 3)))

        await asyncio.gather(*(burst(c) for c in senders))
        for e in done:
            await asyncio.wait_for(e.wait(), 30)
        for got in seen:
            assert got == list(range(1, 2 * n + 1))
        held = [await metric(node, "bus_held_total") for node in cl.nodes]
        print(f"\nevents that came early and waited, per node: {held}")


def collect(got: list[int], all_in: asyncio.Event, n: int, ev: dict[str, Any]) -> None:
    """A client listener: the seq of each `room:r` message event, as they arrive."""
    if ev["type"] == "message" and ev["conversation"] == "room:r":
        got.append(ev["seq"])
        if len(got) == n:
            all_in.set()
