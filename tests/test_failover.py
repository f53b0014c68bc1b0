"""An SDK client given several server URLs (a cluster's nodes sharing one PostgreSQL store)
connects to the first that answers and, when its node goes, fails over to another by itself.

What is true today (issue 14 in progress): resume tokens live in one node's memory and there is
no bus between nodes, so a client that fails over gets a fresh session (``resumed: false``) and
messages sent on one node are not delivered live to clients on another. The recovery is by
``sync`` from the shared store, which the SDK runs after every reconnect."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from nethelpers import free_port
from processes import Server
from stores import pg_schema

from signaling.sdk import RallypointClient

Start = Callable[..., Awaitable[TestServer]]


@pytest.fixture
def server_store() -> str:
    """Every node of a cluster shares one PostgreSQL store."""
    return "postgres"


def ws_url(server: TestServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


def dead_url() -> str:
    return f"ws://127.0.0.1:{free_port()}/ws"  # nothing listens there


def test_url_is_one_url_or_a_non_empty_list() -> None:
    assert RallypointClient("ws://a/ws").urls == ("ws://a/ws",)
    assert RallypointClient(["ws://a/ws", "ws://b/ws"]).url == "ws://a/ws"
    urls = [f"ws://n{i}/ws" for i in range(8)]
    assert sorted(RallypointClient(urls, shuffle=True).urls) == sorted(urls)
    for bad in ([], [""], "", ["ws://a/ws", None]):
        with pytest.raises(ValueError):
            RallypointClient(bad)  # type: ignore[arg-type]


async def test_connect_raises_when_no_node_answers() -> None:
    phone = RallypointClient([dead_url(), dead_url()], identity="alice")
    try:
        with pytest.raises(OSError):  # aiohttp's ClientConnectorError is an OSError
            await phone.connect()
        assert phone.url == phone.urls[-1]  # each was tried
    finally:
        await phone.close()


async def test_connect_skips_a_dead_node_and_fails_over_when_its_node_stops(
    start_server: Start,
) -> None:
    a, b = await start_server(), await start_server()
    phone = RallypointClient([dead_url(), ws_url(a), ws_url(b)], identity="alice", name="Alice")
    try:
        await phone.connect()
        assert phone.url == ws_url(a)
        await phone.join("lobby")
        await phone.send("room:lobby", "before")
        await a.close()  # GOING_AWAY: the node is shutting down
        ev = await phone.next_event("_reconnected", timeout=20)
        # A is tried first (only it could resume the session), then the dead URL, then B.
        assert (ev["url"], ev["resumed"]) == (ws_url(b), False)
        sent = await phone.send("room:lobby", "after")  # it joined its room again on B
        assert sent["seq"] == 2
    finally:
        await phone.close()


async def test_sigkill_a_node_and_its_client_recovers_every_acknowledged_message_once(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Two server processes share a PostgreSQL schema. Alice's SDK client has both URLs and is
    on node A; Bob is on node B; they write in their direct conversation. Node A is frozen
    with a send of Alice's in flight, then SIGKILLed. Alice's client moves to B by itself (a
    new session: B does not know A's resume token), retries the send under its cid, and
    catches up with ``sync``: Bob's messages, which never reached her live (no bus between
    nodes yet), each exactly once; the store has every acknowledged message once, gap-free."""
    async with pg_schema() as store_url, asyncio.timeout(90):
        config = tmp_path / "cluster.toml"
        config.write_text(f'[store]\nurl = "{store_url}"\n\n[sfu]\nenabled = false\n')
        a = Server(tmp_path / "a", args=["--config", str(config)])
        b = Server(tmp_path / "b", args=["--config", str(config)])
        servers.extend((a, b))
        await asyncio.gather(a.start(), b.start())
        alice = RallypointClient([a.url, b.url], identity="alice", name="Alice", max_backoff_s=1)
        bob = RallypointClient([b.url], identity="bob", name="Bob")
        try:
            await alice.connect()
            await bob.connect()
            assert alice.url == a.url
            dm = "dm:alice|bob"
            acked: dict[str, int] = {}  # cid -> seq
            for i in range(10):
                for who in (alice, bob):
                    cid = f"{who.identity}-{i}"
                    acked[cid] = (await who.send(dm, f"text {cid}", cid=cid))["seq"]

            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGSTOP)  # A reads nothing more
            # Whether or not this frame reaches A's socket before the kill, A never reads it.
            in_flight = asyncio.create_task(alice.send(dm, "in flight", cid="alice-in-flight"))
            a.stop(signal.SIGKILL)

            ev = await alice.next_event("_reconnected", timeout=30)
            assert (ev["url"], ev["resumed"]) == (b.url, False)
            sent = await in_flight  # retried on B under the same cid
            assert sent["duplicate"] is False
            acked["alice-in-flight"] = sent["seq"]
            again = await alice.send(dm, "text alice-9", cid="alice-9")  # an ack lost: retry
            assert (again["seq"], again["duplicate"]) == (acked["alice-9"], True)

            # Alice's catch-up after failing over: each of Bob's messages once.
            from_bob: list[dict[str, Any]] = []
            for _ in range(10):
                from_bob.append(await alice.next_message(dm, where=lambda m: m["from"] == "bob"))
            assert sorted(m["cid"] for m in from_bob) == sorted(c for c in acked if "bob" in c)
            assert all(acked[m["cid"]] == m["seq"] for m in from_bob)
            assert await alice.sync() == 0  # nothing it has not seen

            # The shared store: every acknowledged message exactly once, no gaps.
            stored = await bob.history(dm, after=0, limit=100)
            assert [m["seq"] for m in stored] == list(range(1, len(acked) + 1))
            assert {m["cid"]: m["seq"] for m in stored} == acked
        finally:
            await alice.close()
            await bob.close()
