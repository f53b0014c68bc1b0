"""The push webhook against a real HTTP receiver: incoming-call and cancel events for offline
callees, message events for offline recipients, HMAC signatures, retries after a failure, no
duplicates, and the bounded queue."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from call_helpers import Phone

from signaling.app import PUSH
from signaling.config import PushSection
from signaling.notify.push import WORKERS, PushQueue, verify

Start = Callable[..., Awaitable[TestServer]]
PUSH_SECRET = "push-secret-0123456789"
BARRIER = "test.barrier"  # the type of push_barrier's sentinel events


def check_signature(header: str, body: bytes) -> bool:
    """The receiver's check, written from docs/PUSH.md (not with the server's code)."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    if abs(time.time() - int(parts["t"])) > 300:
        return False
    mac = hmac.new(PUSH_SECRET.encode(), parts["t"].encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), parts["v1"])


class Receiver:
    """An app backend's webhook endpoint: records deliveries, can fail the first requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts: list[str] = []  # event ids, every attempt
        self.delivered: list[dict[str, Any]] = []  # accepted events (2xx)
        self.bad_signatures = 0
        self.arrived = asyncio.Event()
        self.held: set[str] = set()  # sentinel events of push_barrier being held
        self.all_held = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = orjson.loads(body)
        self.attempts.append(event["id"])
        assert request.headers["X-Rallypoint-Event-Id"] == event["id"]
        if not check_signature(request.headers["X-Rallypoint-Signature"], body):
            self.bad_signatures += 1
            return web.Response(status=401)
        if event["type"] == BARRIER:
            self.held.add(event["id"])
            if len(self.held) == WORKERS:
                self.all_held.set()
            await asyncio.wait_for(self.release.wait(), 5)
            return web.Response(status=204)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=500)
        self.delivered.append(event)
        self.arrived.set()
        return web.Response(status=204)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.delivered) < n:
            assert time.monotonic() < deadline, f"only {len(self.delivered)} of {n} pushes"
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pass
        return self.delivered[:n]


async def push_barrier(server: TestServer, receiver: Receiver) -> dict[str, int]:
    """Wait until every push the server queued so far is delivered (or given up on); returns
    the server's counters at that point.

    One sentinel event per push worker goes into the queue behind everything else, and the
    receiver holds each one until it holds them all. The queue hands events out in order and
    a worker takes its next event only when done with the last (retries included), so once
    every worker holds a sentinel, every event queued before them is finished. Once per
    receiver.
    """
    push = server.app[PUSH]
    counters = push.counters
    sent = counters.sent
    for n in range(WORKERS):
        assert push.submit({"id": f"barrier.{sent}.{n}", "type": BARRIER})
    await asyncio.wait_for(receiver.all_held.wait(), 5)
    at_barrier = {name: getattr(counters, name) for name in counters.__slots__}
    receiver.release.set()  # the sentinels are delivered and counted: leave nothing in flight
    async with asyncio.timeout(5):
        while counters.sent < at_barrier["sent"] + WORKERS:
            await asyncio.sleep(0.01)
    return at_barrier


@pytest.fixture
async def receiver_factory(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[..., Awaitable[tuple[Receiver, str]]]:
    async def make(fail_first: int = 0) -> tuple[Receiver, str]:
        rec = Receiver(fail_first)
        app = web.Application()
        app.router.add_post("/hook", rec.handle)
        srv = await aiohttp_server(app, host="127.0.0.1")
        return rec, f"http://127.0.0.1:{srv.port}/hook"

    return make


async def push_server(start_server: Start, url: str, **extra: Any) -> TestServer:
    return await start_server(
        push__webhook_url=url,
        push__secret=PUSH_SECRET,
        push__retry_base_s=0.05,
        push__retry_max_s=0.2,
        **extra,
    )


async def test_call_push_and_cancel_after_a_failed_attempt(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory(fail_first=1)
    server = await push_server(start_server, url)
    alice = await phones(server, "alice")
    await (await phones(server, "bob")).close()  # bob is known but offline
    call = await alice.call("bob", video=True)
    (incoming,) = await receiver.wait_for(1)
    assert incoming["type"] == "call.incoming" and incoming["identity"] == "bob"
    assert incoming["call"] == {"id": call.id, "from": "alice", "video": True, "group": False}
    assert receiver.attempts.count(incoming["id"]) == 2  # 500 once, then delivered
    bob = await phones(server, "bob")  # the push woke bob's phone
    await (await bob.next_call()).accept()
    _, cancel = await receiver.wait_for(2)
    assert cancel["type"] == "call.cancelled" and cancel["reason"] == "answered"
    assert cancel["call"]["id"] == call.id and cancel["id"] != incoming["id"]
    await call.hangup()
    await call.wait_ended()
    # The call log is stored (and its message hooks have run) when it reaches a device.
    await alice.next_message("dm:alice|bob", where=lambda m: m["kind"] == "call")
    counters = await push_barrier(server, receiver)
    # Nothing else arrived: no duplicates, no third event.
    assert [e["type"] for e in receiver.delivered] == ["call.incoming", "call.cancelled"]
    assert len({e["id"] for e in receiver.delivered}) == 2 and receiver.bad_signatures == 0
    assert counters["sent"] == 2 and counters["retries"] == 1
    assert counters["failed"] == 0


async def test_cancelled_and_missed_calls_send_cancel_events(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url, calls__ring_timeout_s=0.3)
    alice = await phones(server, "alice")
    for who in ("bob", "carol"):
        await (await phones(server, who)).close()
    first = await alice.call("bob")
    await receiver.wait_for(1)
    await first.cancel()
    second = await alice.call("carol")
    assert await second.wait_ended(timeout=5) == "missed"
    events = await receiver.wait_for(4)
    got = [(e["type"], e["identity"], e.get("reason")) for e in events]
    assert got == [
        ("call.incoming", "bob", None),
        ("call.cancelled", "bob", "cancelled"),
        ("call.incoming", "carol", None),
        ("call.cancelled", "carol", "missed"),
    ]


async def test_direct_messages_push_ids_and_counts_only(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url)
    alice = await phones(server, "alice")
    carol = await phones(server, "carol")  # online: no push for her
    await (await phones(server, "bob")).close()
    s1 = await alice.send("dm:alice|bob", "secret words")
    await alice.send("dm:alice|bob", "more", cid="fixed-cid")
    await alice.send("dm:alice|bob", "more", cid="fixed-cid")  # a retry: stored once
    await alice.send("dm:alice|carol", "hi carol")
    await carol.next_message("dm:alice|carol")
    first, second = await receiver.wait_for(2)
    assert first == {
        "id": f"message.{s1['mid']}.bob",
        "type": "message.new",
        "ts": s1["ts"],
        "identity": "bob",
        "conversation": "dm:alice|bob",
        "seq": 1,
        "mid": s1["mid"],
        "from": "alice",
        "unread": 1,
    }
    assert second["seq"] == 2 and second["unread"] == 2 and "text" not in second
    # No push for the retry (stored once) nor for carol (online).
    counters = await push_barrier(server, receiver)
    assert len(receiver.delivered) == 2 and counters["sent"] == 2


async def test_message_text_only_when_enabled(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url, push__include_text=True)
    alice = await phones(server, "alice")
    await (await phones(server, "bob")).close()
    await alice.send("dm:alice|bob", "hello bob")
    (event,) = await receiver.wait_for(1)
    assert event["text"] == "hello bob"


async def test_queue_is_bounded_and_deduplicates() -> None:
    q = PushQueue(PushSection(webhook_url="http://127.0.0.1:9/", secret=PUSH_SECRET, queue_size=2))
    assert q.submit({"id": "a"}) and q.submit({"id": "b"})
    assert not q.submit({"id": "a"})  # same event id: once only
    assert not q.submit({"id": "c"})  # queue full: dropped and counted
    assert q.counters.duplicates == 1 and q.counters.dropped == 1
    body = b'{"id":"x"}'
    header = (
        f"t={int(time.time())},v1="
        + hmac.new(
            PUSH_SECRET.encode(), f"{int(time.time())}.".encode() + body, hashlib.sha256
        ).hexdigest()
    )
    assert verify(PUSH_SECRET, header, body, now=time.time())
    assert not verify(PUSH_SECRET, header, body + b" ", now=time.time())
    assert not verify(PUSH_SECRET, header, body, now=time.time() + 3600)
