"""``signaling.net.fastws``: chat frames handled inside aiohttp's data_received, in order, and the
plain ``receive()`` path when aiohttp's internals are not the ones mirrored."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
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


async def _raw_ws(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket opened by hand, so that frames can be sent as we like; welcomed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await reader.readuntil(b"\r\n\r\n")
    writer.write(_frame(b'{"type":"hello","v":1,"name":"Raw","identity":"raw"}'))
    return reader, writer


def _frame(payload: bytes, *, masked: bool = True) -> bytes:
    """A final text frame, masked with a zero key (which leaves the payload as it is)."""
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((0x81, bit | n))
    else:
        head = bytes((0x81, bit | 126)) + n.to_bytes(2, "big")
    return head + (b"\0\0\0\0" if masked else b"") + payload


async def _close_code(reader: asyncio.StreamReader, texts: list[bytes]) -> int:
    """Read server frames until the close frame (text ones into ``texts``); its status code."""
    async with asyncio.timeout(5):
        while True:
            first, second = await reader.readexactly(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await reader.readexactly(8), "big")
            body = await reader.readexactly(n)
            if first & 0x0F == 0x8:
                return int.from_bytes(body[:2], "big")
            texts.append(body)


async def _answers_until_close(reader: asyncio.StreamReader) -> tuple[int, list[object]]:
    texts: list[bytes] = []
    code = await _close_code(reader, texts)
    return code, [orjson.loads(t).get("re") for t in texts]


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
async def test_an_unmasked_client_frame_closes_with_1002(server: TestServer, split: bool) -> None:
    """RFC 6455 section 5.1: the server must close the connection upon an unmasked frame;
    masked frames (short, 16-bit length, cut anywhere by the reads) go through."""
    reader, writer = await _raw_ws(server.port)
    long_ping = b'{"type":"ping","id":"long","ts":1' + b" " * 200 + b"}"
    frames = _frame(b'{"type":"ping","id":"a"}') + _frame(long_ping)
    frames += _frame(b'{"type":"ping","id":"last"}')
    if split:
        for i in range(len(frames)):
            writer.write(frames[i : i + 1])
            await writer.drain()
    else:
        writer.write(frames)
    texts: list[bytes] = []
    async with asyncio.timeout(5):  # the masked pings are answered, in order
        while len(texts) < 4:
            _, second = await reader.readexactly(2)
            n = second & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            texts.append(await reader.readexactly(n))
    assert [orjson.loads(t).get("re") for t in texts] == [None, "a", "long", "last"]
    writer.write(_frame(b'{"type":"ping","id":"unmasked"}', masked=False))
    code, answered = await _answers_until_close(reader)
    assert code == 1002 and "unmasked" not in answered
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # and the connection is closed
    writer.close()


async def test_frames_after_an_unmasked_one_in_the_same_read_are_not_handled(
    server: TestServer,
) -> None:
    reader, writer = await _raw_ws(server.port)
    writer.write(
        _frame(b'{"type":"ping","id":"before"}')
        + _frame(b'{"type":"ping","id":"unmasked"}', masked=False)
        + _frame(b'{"type":"ping","id":"after"}')
    )
    code, answered = await _answers_until_close(reader)
    assert code == 1002 and "unmasked" not in answered and "after" not in answered
    writer.close()
