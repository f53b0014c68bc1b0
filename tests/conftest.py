"""Shared fixtures: a real server on loopback and real WebSocket clients."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import stores
from aiohttp import web
from aiohttp.test_utils import TestServer
from processes import Server
from push_helpers import Receiver
from stores import BACKENDS, Backend, Store

from signaling.app import make_app
from signaling.config import Config, load_config
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import Client

ServerFactory = Callable[..., Awaitable[TestServer]]


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """Collect garbage after every test, so that a leaked socket or transport (a
    ResourceWarning, an error here) is reported against the test that leaked it rather than
    whichever later test the collector happens to run in."""
    yield
    gc.collect()


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    """A config for tests: data in tmp_path, no TURN; overrides as section.key=value."""
    base = {"server.data_dir": str(tmp_path / "data"), "turn.enabled": False, "sfu.enabled": False}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, env={}, overrides=base)


@pytest.fixture
def server_store() -> str:
    """The chat store back end of the servers a test starts (``tests/stores.py``): SQLite; a
    module runs on both with ``server_store = pytest.fixture(params=BACKENDS)(...)``."""
    return "sqlite"


@pytest.fixture
async def start_server(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]], server_store: str
) -> AsyncIterator[ServerFactory]:
    """Start the real app; keyword args override config (``limits__rate_per_s=5``)."""
    started: list[TestServer] = []
    async with stores.backend(server_store, tmp_path) as b:

        async def start(**overrides: Any) -> TestServer:
            if b.url is not None:
                overrides.setdefault("store__url", b.url)
            cfg = make_config(tmp_path, **overrides)
            srv = await aiohttp_server(make_app(cfg), host="127.0.0.1")
            started.append(srv)
            return srv

        yield start
        for srv in started:  # before the schema goes
            await srv.close()


@pytest.fixture
async def server(start_server: ServerFactory) -> TestServer:
    return await start_server()


def ws_url(server: TestServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    """Factory of connected clients, closed at the end: ``await clients(server, name=...)``."""
    made: list[Client] = []

    async def connect(server: TestServer, **hello: Any) -> Client:
        c = Client(ws_url(server))
        made.append(c)
        await c.connect(**hello)
        return c

    yield connect
    for c in made:
        await c.close()


@pytest.fixture
async def phones() -> AsyncIterator[Callable[..., Awaitable[RallypointClient]]]:
    """Simulated phones (SDK clients, closed at the end):
    ``await phones(server, "alice", device="ipad", token=...)``."""
    made: list[RallypointClient] = []

    async def make(server: TestServer, identity: str, **kw: Any) -> RallypointClient:
        kw.setdefault("name", identity.title())
        c = RallypointClient(ws_url(server), identity=identity, **kw)
        made.append(c)
        await c.connect()
        return c

    yield make
    for c in made:
        await c.close()


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Server processes a test starts (``tests/processes.py``), killed at the end if still
    running: ``servers.append(srv := Server(...)); await srv.start()``."""
    made: list[Server] = []
    yield made
    for s in made:
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


@pytest.fixture
async def receiver_factory(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> Callable[..., Awaitable[tuple[Receiver, str]]]:
    """An app backend's push webhook on loopback: ``receiver, url = await
    receiver_factory(fail_first=1)``."""

    async def make(fail_first: int = 0) -> tuple[Receiver, str]:
        rec = Receiver(fail_first)
        app = web.Application()
        app.router.add_post("/hook", rec.handle)
        srv = await aiohttp_server(app, host="127.0.0.1")
        return rec, f"http://127.0.0.1:{srv.port}/hook"

    return make


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Each chat store back end in turn (``tests/stores.py``)."""
    async with stores.backend(request.param, tmp_path) as b:
        yield b


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    """An open chat store of each back end, closed at the end."""
    s = backend.new()
    await s.open()
    yield s
    await s.close()
