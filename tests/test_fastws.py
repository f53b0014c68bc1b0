"""``signaling.net.fastws``: chat frames handled inside aiohttp's data_received, in order, and the
plain ``receive()`` path when aiohttp's internals are not the ones mirrored."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from signaling.app import HUB
from signaling.net import endpoint as endpoint_module
from signaling.net import fastws
from signaling.net.connection import Connection
from signaling.net.endpoint import Endpoint
from signaling.sdk.wsclient import Client
from signaling.wire.protocol import Protocol

Connect = Callable[..., Awaitable[Client]]


def test_available_on_the_mirrored_aiohttp(monkeypatch: pytest.MonkeyPatch) -> None:
    # pyproject pins aiohttp to the version fastws mirrors; a bump must update both.
    assert aiohttp.__version__ == "3.14.5" and fastws.available()
    monkeypatch.setattr(fastws, "KNOWN_POST_START", set())
    assert not fastws.available()


@pytest.mark.parametrize("inline", [True, False], ids=["fastws", "receive"])
async def test_chat_by_either_path(
    server: TestServer, clients: Connect, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    if inline and not fastws.available():
        pytest.fail("this aiohttp has no fast path: update signaling/fastws.py")
    monkeypatch.setattr(endpoint_module, "FAST_WS", inline)
    taken: list[bool] = []
    make_sink = Endpoint._sink

    def counting(self: Endpoint, conn: Connection) -> Callable[[bytes], bool]:
        sink = make_sink(self, conn)

        def take(data: bytes) -> bool:
            ok = sink(data)
            taken.append(ok)
            return ok

        return take

    monkeypatch.setattr(Endpoint, "_sink", counting)
    a = await clients(server, name="A", identity="a")
    b = await clients(server, name="B", identity="b")
    for c in (a, b):
        await c.request({"type": "join", "room": "f"})
    acks = [await a.send_chat("room:f", f"m{i}") for i in range(20)]
    assert [x["seq"] for x in acks] == list(range(1, 21))
    got = [(await b.next_event("message"))["text"] for _ in range(20)]
    assert got == [f"m{i}" for i in range(20)]
    if inline:
        assert taken.count(True) == 20  # every send went inline; joins were passed on
        assert taken.count(False) >= 1
    else:
        assert taken == []
    stats = server.app[HUB].counters
    assert stats.messages_stored == 20 and stats.internal_errors == 0


async def test_a_frame_the_fast_path_passes_on_is_parsed_once(
    server: TestServer, clients: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path parses every text frame to see its type; one it leaves to the receive
    loop (anything but a chat write) goes there with its parsed message, not to be parsed
    again."""
    parsed: list[bytes | str] = []
    parse = Protocol.parse

    def counting(self: Protocol, data: bytes | str) -> dict[str, object]:
        parsed.append(data)
        return parse(self, data)

    monkeypatch.setattr(Protocol, "parse", counting)
    a = await clients(server, name="A", identity="a")
    parsed.clear()
    for i in range(5):
        await a.request({"type": "ping", "ts": i})
    await a.request({"type": "join", "room": "once"})
    await a.send_chat("room:once", "hello")
    assert len(parsed) == 7, parsed
