"""The PostgreSQL store when PostgreSQL goes away: a private instance (initdb into a temporary
directory, on a free port; never the shared one) is stopped with ``pg_ctl stop -m immediate``
while messages are being sent, then started again. Every send meanwhile is acknowledged (it
was committed) or refused with ``store_unavailable`` within a bounded time, never left
hanging; afterwards the same client ids retried are stored once, without gaps."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestServer
from stores import PrivatePostgres, pg_schema

from signaling.chat.postgres import PostgresStore
from signaling.chat.store import AppendResult, NewMessage, StoredMessage
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import Client, ClientError
from signaling.wire.errors import ProtocolError

Start = Callable[..., Awaitable[TestServer]]
Connect = Callable[..., Awaitable[Client]]
Phone = Callable[..., Awaitable[RallypointClient]]

API_SPEC = json.loads(
    (Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text()
)

#: Longer than any send may stay unanswered: the store's statement timeout, and then some.
ANSWER_BOUND_S = 8.0


@pytest.fixture
async def private_pg() -> AsyncIterator[PrivatePostgres]:
    pg = PrivatePostgres()
    await asyncio.to_thread(pg.init)
    await asyncio.to_thread(pg.start)
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.remove)


def msg(cid: str) -> NewMessage:
    return NewMessage("room:drill", cid, "alice", "Alice", "text", f"text {cid}")


async def until(cond: Callable[[], bool], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_a_restart_refuses_sends_meanwhile_and_retries_are_stored_once(
    private_pg: PrivatePostgres,
) -> None:
    store = PostgresStore(private_pg.url, timeout_s=2.0, retry_after_s=0.2)
    await store.open()
    loop = asyncio.get_running_loop()
    acked: dict[str, StoredMessage] = {}
    refused: list[str] = []
    answered_in: list[float] = []
    n = 0

    def send() -> None:
        nonlocal n
        n += 1
        cid = f"c{n}"
        t0 = loop.time()
        try:

            def done(r: AppendResult) -> None:
                answered_in.append(loop.time() - t0)
                if isinstance(r, ProtocolError):
                    assert (r.code, r.retry_after_ms) == ("store_unavailable", 200), r
                    refused.append(cid)
                else:
                    assert not r[1]
                    acked[cid] = r[0]

            store.append_nowait(msg(cid), done)
        except ProtocolError as e:  # refused at once while the store is unavailable
            assert (e.code, e.retry_after_ms) == ("store_unavailable", 200), e
            answered_in.append(0.0)
            refused.append(cid)

    try:
        for _ in range(50):
            send()
        await until(lambda: len(acked) == 50, 10)
        # Stop PostgreSQL while sends keep coming (20 per 10 ms).
        stopping = asyncio.ensure_future(asyncio.to_thread(private_pg.stop))
        while not stopping.done() or len(refused) < 20:
            for _ in range(20):
                send()
            await asyncio.sleep(0.01)
        await stopping
        assert store.available is False
        with pytest.raises(ProtocolError) as e:  # reads say so too
            await store.last_seq("room:drill")
        assert e.value.code == "store_unavailable"
        await until(lambda: len(acked) + len(refused) == n, ANSWER_BOUND_S)  # none hangs
        assert max(answered_in) < ANSWER_BOUND_S
        await asyncio.to_thread(private_pg.start)
        await until(lambda: store.available, 10)
        # The client retries everything not acknowledged, with the same cids, and (as a
        # client that never heard back would) a few that were.
        retries = [*refused, *list(acked)[-5:]]
        results = await asyncio.gather(*(store.append(msg(cid)) for cid in retries))
    finally:
        await store.close()
    stored = {m.cid: m for m, _ in results}
    for cid, m in acked.items():  # an acknowledged message stays as it was acknowledged
        if cid in stored:
            assert stored[cid] == m
    conn = await asyncpg.connect(private_pg.url)
    try:
        rows = await conn.fetch("SELECT cid, seq FROM messages WHERE conversation='room:drill'")
        last = await conn.fetchval("SELECT last_seq FROM conversations WHERE id='room:drill'")
    finally:
        await conn.close()
    print(f"drill: {n} sends, {len(refused)} refused, slowest answer {max(answered_in):.3f} s")
    assert len(rows) == n  # each cid once: nothing lost, nothing twice
    assert sorted(r["seq"] for r in rows) == list(range(1, n + 1)) and last == n  # no gaps
    assert {r["cid"] for r in rows} == {f"c{i}" for i in range(1, n + 1)}


async def test_clients_get_store_unavailable_and_their_retry_is_stored_once(
    private_pg: PrivatePostgres, start_server: Start, clients: Connect
) -> None:
    server: TestServer = await start_server(store__url=private_pg.url)
    alice = await clients(server, name="Alice")
    await alice.request({"type": "join", "room": "r"})
    send = {"type": "send", "conversation": "room:r", "cid": "x1", "text": "hi"}
    first = await alice.request({**send, "cid": "x0"})
    await asyncio.to_thread(private_pg.stop)
    with pytest.raises(ClientError) as e:
        await asyncio.wait_for(alice.request(send), ANSWER_BOUND_S)
    assert e.value.code == "store_unavailable"
    await asyncio.to_thread(private_pg.start)
    for _ in range(100):  # until the server's writer is back
        try:
            sent = await alice.request(send)
            break
        except ClientError as err:
            assert err.code == "store_unavailable"
            await asyncio.sleep(0.1)
    again = await alice.request(send)
    assert (sent["seq"], sent["duplicate"]) == (first["seq"] + 1, False)
    assert (again["seq"], again["duplicate"]) == (sent["seq"], True)


async def test_the_sdk_retries_a_send_the_store_refused_until_postgresql_is_back(
    private_pg: PrivatePostgres, start_server: Start, phones: Phone
) -> None:
    server = await start_server(store__url=private_pg.url)
    alice = await phones(server, "alice")
    await alice.join("r")
    await alice.send("room:r", "before")
    await asyncio.to_thread(private_pg.stop)
    probe = {"type": "send", "conversation": "room:r", "cid": "probe", "text": "p"}
    with pytest.raises(ClientError) as e:  # the store refuses now (as test above)
        await asyncio.wait_for(alice.request(probe), ANSWER_BOUND_S)
    assert (e.value.code, e.value.msg["retry_after_ms"]) == ("store_unavailable", 1000)
    # Sent while PostgreSQL is down (refused), retried by the SDK after retry_after_ms.
    sending = asyncio.create_task(alice.send("room:r", "during", cid="during"))
    await asyncio.to_thread(private_pg.start)
    sent = await asyncio.wait_for(sending, 30)
    assert (sent["seq"], sent["duplicate"]) == (2, False)
    stored = await alice.history("room:r")
    assert [(m["seq"], m["cid"]) for m in stored][1:] == [(2, "during")]


async def test_a_store_that_cannot_reach_postgresql_does_not_open() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    store = PostgresStore(f"postgresql://postgres:sekrit@127.0.0.1:{port}/x", timeout_s=2.0)
    with pytest.raises(RuntimeError, match="cannot be reached") as e:
        await store.open()
    assert "sekrit" not in str(e.value)
    await store.close()


async def test_a_failing_statement_fails_its_batch_and_burns_no_sequence() -> None:
    async with pg_schema() as url:
        store = PostgresStore(url)
        await store.open()
        try:
            await store.append(msg("a"))
            await store.append(msg("b"))  # the conversation is known: the one-statement path
            conn = await asyncpg.connect(url)
            try:
                await conn.execute(
                    "CREATE TABLE fail_once (n INTEGER); INSERT INTO fail_once VALUES (1); "
                    "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                    "IF (SELECT n FROM fail_once) = 1 THEN RAISE EXCEPTION 'disk on fire'; END IF; "
                    "RETURN NEW; END $$; "
                    "CREATE TRIGGER boom BEFORE INSERT ON messages "
                    "FOR EACH ROW EXECUTE FUNCTION boom()"
                )
                edit = NewMessage("room:drill", "d", "alice", "A", "edit", "x", 1)
                edit.edit_window_ms = 60_000
                for m in (msg("c"), edit):  # one statement, then a transaction
                    with pytest.raises(ProtocolError) as e:
                        await store.append(m)
                    assert e.value.code == "internal_error"
                await conn.execute("UPDATE fail_once SET n = 0")
            finally:
                await conn.close()
            m, _ = await store.append(msg("c"))
            assert m.seq == 3 and store.available
        finally:
            await store.close()


async def test_the_http_api_answers_every_route_that_reads_the_store_as_documented(
    private_pg: PrivatePostgres, start_server: Start
) -> None:
    """While PostgreSQL is down, the API's routes that read or write the chat store answer
    503 `store_unavailable` with `Retry-After`, and docs/openapi.json lists that 503 for each
    (the history, devices and relations reads did not)."""
    key, secret = "test-key", "a-test-secret-of-at-least-32-bytes"
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}
    server = await start_server(
        store__url=private_pg.url, auth__api_key=key, auth__api_secret=secret
    )
    base = f"http://127.0.0.1:{server.port}"
    routes = [
        ("GET", "/api/conversations/{conversation}/messages", "room%3Ar", None),
        ("POST", "/api/conversations/{conversation}/messages", "room%3Ar", {"text": "x"}),
        ("GET", "/api/identities/{identity}/devices", "bob", None),
        ("GET", "/api/identities/{identity}/relations", "bob", None),
        ("PUT", "/api/identities/{identity}/contacts/{other}", "bob", None),
        ("POST", "/api/tokens", "", {"identity": "bob"}),
    ]
    async with aiohttp.ClientSession() as http:
        await asyncio.to_thread(private_pg.stop)
        for method, path, arg, body in routes:
            url = path.replace("{conversation}", arg).replace("{identity}", arg)
            url = url.replace("{other}", "carol")
            async with http.request(method, base + url, json=body, headers=auth) as r:
                got = (r.status, (await r.json())["code"], "Retry-After" in r.headers)
            assert got == (503, "store_unavailable", True), (method, path)
            assert "503" in API_SPEC["paths"][path][method.lower()]["responses"], (method, path)
