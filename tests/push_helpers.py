"""A push webhook receiver for tests (the app's backend): records deliveries, checks the
signatures as docs/PUSH.md says, and a barrier that waits for every queued push."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from signaling.app import PUSH
from signaling.notify.push import WORKERS

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


async def push_server(start_server: Start, url: str, **extra: Any) -> TestServer:
    return await start_server(
        push__webhook_url=url,
        push__secret=PUSH_SECRET,
        push__retry_base_s=0.05,
        push__retry_max_s=0.2,
        **extra,
    )


@contextlib.asynccontextmanager
async def webhook_server() -> AsyncIterator[tuple[Receiver, str]]:
    """A ``Receiver`` served on loopback, and the ``[push]`` configuration (TOML) that points
    a server process at it (retrying fast)."""
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/push", receiver.handle)
    hook = TestServer(app, host="127.0.0.1")
    await hook.start_server()
    extra = (
        f'[push]\nwebhook_url = "http://127.0.0.1:{hook.port}/push"\n'
        f'secret = "{PUSH_SECRET}"\nretry_base_s = 0.05\nretry_max_s = 0.2\n'
    )
    try:
        yield receiver, extra
    finally:
        await hook.close()
