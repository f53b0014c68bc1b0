"""A session's media requests never reach the SFU worker before its join of the room's media.

The hub answers `join` at once and joins the room's media in the background; the protocol
applies a connection's frames in order, so a `publish` (or `subscribe`) sent right behind
`join`, without waiting for its reply, must find the participant known to the worker. Before
the fix the request overtook the join in the signaling process (each went its own way to the
worker) and got `not_in_room: join the room before sending media`, on a freshly started server
(the worker not ready yet) as well as on a ready one. And a join that never reached the worker
(it was not ready within the pool's wait) is made again before the session's next media
request, instead of every later request failing with `not_in_room`."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection
from sfu_helpers import until

from signaling.app import HUB
from signaling.groupcall.router import GroupCall
from signaling.sdk.wsclient import Client, ClientError

Clients = Callable[..., Awaitable[Client]]


async def _offer() -> tuple[RTCPeerConnection, dict[str, Any]]:
    """An aiortc publisher offer (one audio section) and its `publish` request body."""
    pc = RTCPeerConnection()
    tr = pc.addTransceiver("audio", direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    return pc, {"sdp": sdp, "tracks": [{"mid": tr.mid, "source": "microphone"}]}


def _group_call(server: TestServer) -> GroupCall:
    return cast(GroupCall, server.app[HUB].media)


async def test_media_requests_sent_right_behind_join_find_the_participant_joined(
    start_server: Callable[..., Awaitable[TestServer]], clients: Clients
) -> None:
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    pool = _group_call(server).pool
    assert pool is not None
    readiness = []
    for n in range(4):  # the first round while the worker is (most likely) still starting
        readiness.append(pool.workers[0].ready.is_set())
        c = await clients(server, name=f"p{n}", identity=f"p{n}")
        pc, publish = await _offer()
        room = f"r{n}"
        try:
            joined, answer, ok = await asyncio.gather(
                c.request({"type": "join", "room": room}, timeout=30),
                c.request({"type": "publish", "room": room, **publish}, timeout=30),
                c.request({"type": "subscribe", "room": room}, timeout=30),
            )
        finally:
            await pc.close()
        assert joined["type"] == "joined" and answer["type"] == "publish_answer", (n, answer)
        assert ok["type"] == "ok"
    print(f"worker ready at each round: {readiness}")


async def test_a_join_the_worker_never_got_is_made_again_before_the_next_request(
    start_server: Callable[..., Awaitable[TestServer]], clients: Clients
) -> None:
    """The worker is stopped (SIGSTOP) before it is ready, and the pool waits 1 s for it:
    the join fails. Resumed, the worker gets the participant's `publish`, which must find it
    joined."""
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    gc = _group_call(server)
    pool = gc.pool
    assert pool is not None and pool.workers[0].proc is not None
    worker = pool.workers[0]
    pid = worker.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        pool.timeout_s = 1.0
        c = await clients(server, name="late", identity="late")
        await c.request({"type": "join", "room": "r"})
        # A request behind the join gets `sfu_unavailable` once the pool gave up on it: by
        # then it gave up on the join too (it waited since before).
        with pytest.raises(ClientError) as refused:
            await c.request({"type": "subscribe", "room": "r"})
        assert refused.value.code == "sfu_unavailable"
        assert not worker.ready.is_set(), "the worker was ready before it was stopped"
    finally:
        os.kill(pid, signal.SIGCONT)
    pool.timeout_s = 15.0
    pc, publish = await _offer()
    try:
        answer = await c.request({"type": "publish", "room": "r", **publish}, timeout=30)
    finally:
        await pc.close()
    assert answer["type"] == "publish_answer"
    assert not gc.unjoined


async def test_a_join_right_after_the_last_leave_keeps_the_room_on_its_worker(
    start_server: Callable[..., Awaitable[TestServer]], clients: Clients
) -> None:
    """Two workers. Alice is alone in room `r` (worker 0, which hosts room `y` too; worker 1
    hosts nothing). She leaves and Bob joins while worker 0 is stopped: it then closes the
    room (`room_closed`) and opens it again for Bob's join. The pool must keep `r` on worker
    0, where Bob is: his `publish` went to worker 1 (fewer rooms) and got `not_in_room`."""
    server = await start_server(sfu__enabled=True, sfu__workers=2)
    pool = _group_call(server).pool
    assert pool is not None
    for w in pool.workers:
        await asyncio.wait_for(w.ready.wait(), 30)
    alice = await clients(server, name="alice", identity="alice")
    await alice.request({"type": "join", "room": "r"})  # worker 0 (the first of the least busy)
    carol = await clients(server, name="carol", identity="carol")
    await carol.request({"type": "join", "room": "x"})  # worker 1
    dave = await clients(server, name="dave", identity="dave")
    await dave.request({"type": "join", "room": "y"})  # worker 0 (a tie: the first)
    await carol.request({"type": "leave", "room": "x"})  # worker 1 hosts nothing

    def placed() -> dict[str, int]:
        return {room: pool.workers.index(w) for room, w in pool.room_worker.items()}

    await until(lambda: placed() == {"r": 0, "y": 0}, 10)
    w0 = pool.workers[0]
    assert w0.proc is not None
    bob = await clients(server, name="bob", identity="bob")
    pc, publish = await _offer()
    os.kill(w0.proc.pid, signal.SIGSTOP)
    try:
        await alice.request({"type": "leave", "room": "r"})
        await bob.request({"type": "join", "room": "r"})
    finally:
        os.kill(w0.proc.pid, signal.SIGCONT)
    try:
        answer = await bob.request({"type": "publish", "room": "r", **publish}, timeout=30)
    finally:
        await pc.close()
    assert answer["type"] == "publish_answer"
    assert placed()["r"] == 0
