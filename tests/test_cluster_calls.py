"""Calls across the nodes of a cluster (issue 14) with real processes: the fixtures of
``test_cluster`` (nodes on one PostgreSQL schema and one Redis key prefix of the test's own),
callers and callees on different nodes."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from processes import Server
from push_helpers import webhook_server
from test_cluster import cluster, metric, recorded

from signaling.calls.book import CallBook
from signaling.calls.shared import call_from_json, call_to_json
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import ClientError

RING_S = 2.0  # the ring timeout of the tests that let a call ring out
SWEEP_S = 0.25  # signaling.calls.shared.SWEEP_S


async def call_logs(c: RallypointClient, conv: str, *calls: str) -> list[dict[str, Any]]:
    """The call-log messages of ``conv``, once those of ``calls`` reached ``c`` live."""
    waiting = set(calls)
    while waiting:
        m = await c.next_message(conv)
        waiting.discard(m.get("call", {}).get("id"))
    return [m for m in await c.history(conv) if m["kind"] == "call"]


async def test_a_callee_rings_on_two_other_nodes_and_the_first_accept_wins(
    tmp_path: Path, servers: list[Server]
) -> None:
    """alice on node 0 calls bob, whose devices are on nodes 1 and 2: both ring; the one
    that accepts talks to alice (`call_signal` both ways), the other is told "answered
    elsewhere"; the hang-up ends it on both nodes and the call is logged once."""
    async with cluster(tmp_path, servers, n=3) as cl, asyncio.timeout(90):
        alice = await cl.client(0, "alice")
        bob1 = await cl.client(1, "bob")
        bob2 = await cl.client(2, "bob")

        call = await alice.call("bob", video=True)
        assert call.state == "ringing" and call.parties == {"alice": "joined", "bob": "invited"}
        on1 = await bob1.next_call()
        on2 = await bob2.next_call()
        assert on1.id == on2.id == call.id
        assert on1.caller == "alice" and on1.peer_device == alice.session
        await on2.ringing()
        ev = await call.next_event("call_ringing")
        assert (ev["identity"], ev["device"]) == ("bob", bob2.session)

        state = await on1.accept()
        assert state["state"] == "active"
        ev = await call.next_event("call_accepted")
        assert ev["device"] == bob1.session
        elsewhere = await asyncio.wait_for(asyncio.shield(on2.ended), 10)
        assert (elsewhere["type"], elsewhere["device"]) == (
            "call_answered_elsewhere",
            bob1.session,
        )
        with pytest.raises(ClientError) as late:
            await on2.accept()
        assert late.value.code == "already_answered"

        # Signaling between the two nodes, both ways.
        await call.signal("offer", sdp="v=0 offer")
        got = await asyncio.wait_for(on1.signals.get(), 10)
        assert (got["kind"], got["sdp"], got["from"]) == ("offer", "v=0 offer", alice.session)
        await on1.signal("answer", sdp="v=0 answer")
        got = await asyncio.wait_for(call.signals.get(), 10)
        assert (got["kind"], got["sdp"], got["from"]) == ("answer", "v=0 answer", bob1.session)

        await on1.hangup()
        assert await on1.wait_ended() == "completed"
        assert await call.wait_ended() == "completed"
        dm = "dm:alice|bob"
        for c in (alice, bob1, bob2):
            log = await c.next_message(dm)
            assert (log["kind"], log["call"]["id"], log["call"]["outcome"]) == (
                "call",
                call.id,
                "completed",
            )
        assert [m["call"]["id"] for m in await call_logs(bob2, dm)] == [call.id]


async def test_simultaneous_accepts_on_two_nodes_one_wins(
    tmp_path: Path, servers: list[Server]
) -> None:
    """bob's two devices, on two nodes, accept the same call at the same moment, 25 times:
    each time exactly one wins, the other gets `already_answered` and `call_answered_elsewhere`
    (never both talking)."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(120):
        alice = await cl.client(0, "alice")
        bob_a = await cl.client(0, "bob")
        bob_b = await cl.client(1, "bob")
        wins = {bob_a.session: 0, bob_b.session: 0}
        for _ in range(25):
            call = await alice.call("bob")
            ring_a = await bob_a.next_call()
            ring_b = await bob_b.next_call()
            results = await asyncio.gather(ring_a.accept(), ring_b.accept(), return_exceptions=True)
            ok = [r for r in results if isinstance(r, dict)]
            refused = [r for r in results if isinstance(r, ClientError)]
            assert len(ok) == 1 and len(refused) == 1, results
            assert refused[0].code == "already_answered"
            winner, loser = (ring_a, ring_b) if isinstance(results[0], dict) else (ring_b, ring_a)
            wins[winner.client.session] += 1
            assert (await asyncio.wait_for(asyncio.shield(loser.ended), 10))[
                "type"
            ] == "call_answered_elsewhere"
            ev = await call.next_event("call_accepted")
            assert ev["device"] == winner.client.session
            await call.hangup()
            assert await winner.wait_ended() == "completed"
            assert await call.wait_ended() == "completed"
        conflicts = [await metric(n, "call_step_conflicts_total") for n in cl.nodes]
        print(f"\nwins per node: {list(wins.values())}, steps run again: {conflicts}")
        assert sum(wins.values()) == 25


async def test_decline_cancel_and_busy_across_nodes(tmp_path: Path, servers: list[Server]) -> None:
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(90):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        carol = await cl.client(1, "carol")

        # Declined on the other node.
        ids = []
        call = await alice.call("bob")
        ids.append(call.id)
        ring = await bob.next_call()
        await ring.decline()
        assert await call.wait_ended() == "declined"
        assert await ring.wait_ended() == "declined"

        # Cancelled by the caller: the callee's device on the other node stops ringing.
        call = await alice.call("bob")
        ids.append(call.id)
        ring = await bob.next_call()
        await call.cancel()
        assert await ring.wait_ended() == "cancelled"
        assert await call.wait_ended() == "cancelled"

        # Busy: bob talks with alice (nodes 0 and 1); carol calls each of them.
        call = await alice.call("bob")
        ids.append(call.id)
        ring = await bob.next_call()
        await ring.accept()
        busy = []
        for callee in ("alice", "bob"):
            other = await carol.call(callee)
            assert await other.wait_ended() == "busy"
            busy.append(other.id)
        # A caller already in a call cannot start another, whichever node it asks.
        with pytest.raises(ClientError) as e:
            await bob.call("carol")
        assert e.value.code == "in_call"
        await call.hangup()
        assert await ring.wait_ended() == "completed"

        # Each call is logged once in the conversation.
        logs = await call_logs(alice, "dm:alice|bob", *ids)
        assert [(m["call"]["id"], m["call"]["outcome"]) for m in logs] == list(
            zip(ids, ["declined", "cancelled", "completed"], strict=True)
        )
        logs = await call_logs(carol, "dm:bob|carol", busy[1])
        assert [(m["call"]["id"], m["call"]["outcome"]) for m in logs] == [(busy[1], "busy")]


async def test_a_new_device_on_another_node_rings_and_a_call_rings_out(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A device of the callee that connects on another node while it is being rung rings
    too; no answer within the ring timeout is `missed` on every device, logged once."""
    extra = f"[calls]\nring_timeout_s = {RING_S}\n"
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(0, "bob")
        call = await alice.call("bob")
        await bob.next_call()
        late = await cl.client(1, "bob")
        ring = await late.next_call()
        assert ring.id == call.id
        started = time.monotonic()
        assert await ring.wait_ended(timeout=RING_S + 5) == "missed"
        took = time.monotonic() - started
        assert await call.wait_ended() == "missed"
        assert took < RING_S + SWEEP_S + 1.0
        logs = await call_logs(late, "dm:alice|bob", call.id)
        assert [(m["call"]["id"], m["call"]["outcome"]) for m in logs] == [(call.id, "missed")]


async def test_the_ring_timeout_fires_after_the_callers_node_is_killed(
    tmp_path: Path, servers: list[Server]
) -> None:
    """The caller's node is SIGKILLed while bob's devices on the other node ring: they stop
    ringing with `missed` at the ring deadline (swept by the surviving node), and the missed
    call is logged once."""
    extra = f"[calls]\nring_timeout_s = {RING_S}\n"
    async with cluster(tmp_path, servers, extra=extra) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob1 = await cl.client(1, "bob")
        bob2 = await cl.client(1, "bob")
        call = await alice.call("bob")
        rings = [await bob1.next_call(), await bob2.next_call()]
        invited = time.monotonic()
        node = cl.nodes[0]
        assert node.proc is not None
        node.stop(signal.SIGKILL)
        for ring in rings:
            assert await ring.wait_ended(timeout=RING_S + 5) == "missed"
        took = time.monotonic() - invited
        print(f"\nmissed {took:.2f} s after the invite (ring timeout {RING_S} s)")
        assert took < RING_S + SWEEP_S + 1.0
        assert call.id == rings[0].id
        logs = await call_logs(bob1, "dm:alice|bob", call.id)
        assert [(m["call"]["id"], m["call"]["outcome"]) for m in logs] == [(call.id, "missed")]


async def test_an_offline_callee_is_pushed_once(tmp_path: Path, servers: list[Server]) -> None:
    """carol has no device anywhere: alice's call (node 0) pushes `call.incoming` once and her
    cancel `call.cancelled` once, not once per node."""
    async with (
        webhook_server() as (receiver, extra),
        cluster(tmp_path, servers, extra=extra) as cl,
        asyncio.timeout(60),
    ):
        # carol is known (her device is in the store: on the caller's node, whose
        # directory vouches for her until the write commits), and has gone.
        carol = await cl.client(0, "carol")
        await carol.close()
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        call = await alice.call("carol")
        await call.cancel()
        assert await call.wait_ended() == "cancelled"
        # A direct message to carol from the other node, pushed after the call's.
        await bob.send("dm:bob|carol", "later")
        delivered = await receiver.wait_for(3, timeout=10)
        about = sorted(e["type"] for e in delivered if e.get("call", {}).get("id") == call.id)
        assert about == ["call.cancelled", "call.incoming"]
        assert receiver.bad_signatures == 0


def test_a_call_round_trips_through_its_stored_form() -> None:
    book = CallBook(30_000)
    call, _ = book.invite(
        "c1",
        caller="alice",
        caller_name="Alice",
        session="s-a",
        to=["bob", "carol"],
        video=True,
        room="r",
        devices={"bob": ["s-b1", "s-b2"]},
        reachable={"bob"},
        now=1000,
        conversation=None,
        unseen=frozenset({"carol"}),
    )
    book.accept("c1", "bob", "s-b2", 2000)
    where = {"s-a": "n1", "s-b1": "n2", "s-b2": "n3"}
    again, where2 = call_from_json(call_to_json(call, where))
    assert where2 == where
    assert again == call  # every field, parties included
    assert again.callees["bob"].devices == {"s-b2"} and again.callees["carol"].unseen


async def test_a_call_goes_on_when_a_party_resumes_on_another_node(
    tmp_path: Path, servers: list[Server]
) -> None:
    """bob talks with alice from node 1, drops, and resumes on node 0 (node 1 alive, told to
    forget him): he gets `call_state` after `welcome`, signaling reaches him there, and his
    hang-up there ends the call for alice."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        call = await alice.call("bob")
        ring = await bob.next_call()
        await ring.accept()
        await call.next_event("call_accepted")
        token, sid = bob.welcome["resume"], bob.session
        await recorded(cl, token, b'"identity":"bob"')
        await bob.close(bye=False)

        again = await cl.client(0, "bob", resume=token)
        assert (again.welcome["resumed"], again.session) == (True, sid)
        back = await again.next_call()
        assert (back.id, back.state) == (call.id, "active")
        await call.signal("offer", sdp="v=0 again")
        got = await asyncio.wait_for(back.signals.get(), 10)
        assert (got["sdp"], got["from"]) == ("v=0 again", alice.session)
        await back.hangup()
        assert await call.wait_ended() == "completed"


async def test_a_group_call_spans_nodes(tmp_path: Path, servers: list[Server]) -> None:
    """alice (node 0) calls bob (node 1) and carol (node 0): bob accepts, carol declines;
    alice hears both; bob's hang-up ends the call (fewer than two parties left)."""
    async with cluster(tmp_path, servers) as cl, asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        carol = await cl.client(0, "carol")
        call = await alice.call("bob", "carol")
        assert call.media == "sfu"
        on_bob = await bob.next_call()
        on_carol = await carol.next_call()
        assert on_bob.id == on_carol.id == call.id
        await on_bob.accept()
        ev = await call.next_event("call_accepted")
        assert ev["identity"] == "bob"
        await on_carol.decline()
        ev = await call.next_event("call_declined")
        assert ev["identity"] == "carol"
        assert call.parties == {"alice": "joined", "bob": "joined", "carol": "declined"}
        await on_bob.hangup()
        assert await call.wait_ended() == "completed"


async def test_without_redis_calls_are_refused_at_once_and_work_after(
    tmp_path: Path, servers: list[Server]
) -> None:
    """On a private redis-server: while it is down a call is refused at once with
    `store_unavailable` (retryable); once it is back (empty), calls ring across nodes again."""
    from test_cluster import private_redis_cluster, until_async

    async with private_redis_cluster(tmp_path, servers) as (cl, redis), asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        bob = await cl.client(1, "bob")
        redis.kill()
        started = time.monotonic()
        with pytest.raises(ClientError) as refused:
            await alice.call("bob")
        assert refused.value.code == "store_unavailable"
        assert refused.value.msg["retry_after_ms"] > 0
        assert time.monotonic() - started < 1.0  # no Redis timeout in the way

        redis.start()
        for node in cl.nodes:  # each node wrote its devices again, its bus is back
            await until_async(lambda node=node: metric(node, "cluster_reasserts_total"), 1.0)
            await until_async(lambda node=node: metric(node, "bus_unavailable"), 0.0)
        call = await alice.call("bob")
        try:
            async with asyncio.timeout(10):
                ring = await bob.next_call()
        except TimeoutError:  # seen once in many runs, not understood: say what the nodes saw
            raise AssertionError(await _bus_report(cl.nodes)) from None
        assert ring.id == call.id
        await call.cancel()
        assert await ring.wait_ended() == "cancelled"


async def _bus_report(nodes: list[Server]) -> str:
    """Each node's bus and call counters and the end of its log (for a failure's message)."""
    names = (
        "bus_published_total",
        "bus_received_total",
        "bus_dropped_total",
        "bus_unavailable",
        "bus_reconnects_total",
    )
    out = []
    for node in nodes:
        values = {n: await metric(node, n) for n in names}
        log = node.log.read_text(errors="replace").splitlines()[-15:]
        out.append(f"node :{node.port} {values}\n" + "\n".join(log))
    return "no ring reached bob:\n" + "\n\n".join(out)


async def test_a_node_stops_in_time_while_redis_hangs(
    tmp_path: Path, servers: list[Server]
) -> None:
    """SIGTERM while the cluster's Redis takes no requests (SIGSTOP): every Redis call waits
    for its timeout; the node still stops, within a few timeouts (a SIGKILL ends the
    stopped redis-server at the end)."""
    from test_cluster import private_redis_cluster

    async with private_redis_cluster(tmp_path, servers) as (cl, redis), asyncio.timeout(60):
        alice = await cl.client(0, "alice")
        await alice.close()
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)
        for node in cl.nodes:
            started = time.monotonic()
            await asyncio.to_thread(node.stop)
            took = time.monotonic() - started
            print(f"stopped in {took:.1f} s")
            assert took < 15.0
