"""Bad input and overload: each gets a stable error code, nothing rejected is stored, the
server stays up, and no traceback reaches a client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import aiohttp
import jwt
import pytest
import yarl
from aiohttp.test_utils import TestServer

from signaling.app import ENDPOINT, HUB
from signaling.core.tokens import create_token
from signaling.net import endpoint as endpoint_module
from signaling.net.connection import Connection
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import Client, ClientError, FrameTooLargeError

Connect = Callable[..., Awaitable[Client]]
Start = Callable[..., Awaitable[TestServer]]
KEY, SECRET = "test-key", "a-test-secret-of-at-least-32-bytes"


def ws_url(server: TestServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


BAD_FRAMES: list[tuple[str | bytes, str]] = [
    ("{oops", "bad_json"),
    ("[]", "bad_message"),
    ('{"no": "type"}', "bad_message"),
    ('{"type": "fly"}', "unknown_type"),
    ('{"type": "join"}', "bad_field"),
    ('{"type": "join", "room": ["x"]}', "bad_field"),
    (
        '{"type": "send", "conversation": "room:t", "cid": "c", "text": "x", "from": "bob"}',
        "bad_field",
    ),
    ('{"type": "send", "conversation": "room:t", "cid": "c", "text": ""}', "bad_field"),
    ('{"type": "send", "conversation": "room:t", "cid": "has space", "text": "x"}', "bad_field"),
    ('{"type": "send", "conversation": "room:elsewhere", "cid": "c", "text": "x"}', "not_in_room"),
    (
        '{"type": "edit", "conversation": "room:t", "cid": "c2", "ref": 99, "text": "x"}',
        "no_such_message",
    ),
    ('{"type": "hello", "v": 1}', "already_welcomed"),
    ('{"type": "kick", "room": "t", "participant": "zz"}', "forbidden"),
    ('{"type": "update", "room": "nope"}', "not_in_room"),
    ('{"type": "typing", "conversation": "dm:a|b", "active": true}', "bad_conversation"),
    (b'{"type": "ping"}', "bad_message"),  # binary frame
    ("x" * 70_000, "frame_too_large"),
]


async def test_bad_input_table(server: TestServer, clients: Connect) -> None:
    owner = await clients(server, name="Owner", identity="owner")
    await owner.request({"type": "join", "room": "t"})
    c = await clients(server, name="Tester", identity="tester")
    await c.request({"type": "join", "room": "t"})
    c.drain()
    for raw, code in BAD_FRAMES:
        await c.send_raw(raw)
        ev = await c.next_event("error")
        assert ev["code"] == code, (raw[:80], ev)
        assert ev["message"] and "Traceback" not in ev["message"]
    # Still connected and working, and nothing refused was stored.
    await c.request({"type": "ping"})
    hist = await c.request({"type": "history", "conversation": "room:t"})
    assert hist["messages"] == [] and hist["last_seq"] == 0
    assert server.app[HUB].counters.internal_errors == 0


async def test_errors_answer_the_request_id(server: TestServer, clients: Connect) -> None:
    c = await clients(server, name="T")
    await c.send_raw('{"type": "join", "id": "q1"}')
    ev = await c.next_event("error")
    assert ev["re"] == "q1" and ev["code"] == "bad_field"


async def test_actions_before_hello(server: TestServer) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(server)) as ws:
        await ws.send_str('{"type": "join", "room": "x"}')
        msg = await ws.receive_json()
        assert msg["code"] == "hello_required"
        await ws.send_str('{"type": "hello", "v": 2}')
        msg = await ws.receive_json()
        assert msg["code"] == "unsupported_version"
        closing = await ws.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4001


async def test_hello_timeout(start_server: Start) -> None:
    server = await start_server(limits__hello_timeout_s=0.3)
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(server)) as ws:
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 4003


async def test_frame_over_hard_cap_closes_with_1009(start_server: Start, clients: Connect) -> None:
    server = await start_server(limits__hard_frame_bytes=200_000)
    c = await clients(server, name="Big")
    await c.send_raw("y" * 300_000)
    ev = await c.next_event("_closed", timeout=5)
    assert ev["code"] == 1009
    other = await clients(server, name="Fine")  # the server is still up
    await other.request({"type": "ping"})


async def test_sdk_refuses_a_request_over_the_frame_limit_at_once(
    start_server: Start, phones: Callable[..., Awaitable[RallypointClient]]
) -> None:
    """A request the server would not read is refused by the SDK before it is sent, at once
    (not after its timeout), with the limit `welcome` gave; the connection stays usable."""
    server = await start_server(limits__max_frame_bytes=20_000)
    endpoint = server.app[ENDPOINT]
    for encoding in ("json", "msgpack"):
        c = Client(ws_url(server), encoding=encoding)  # type: ignore[arg-type]
        try:
            await c.connect(name="Big", identity=f"big-{encoding}")
            assert c.max_frame_bytes == 20_000
            await c.request({"type": "join", "room": "t"})
            started = time.monotonic()
            with pytest.raises(FrameTooLargeError) as refused:
                msg = {"type": "send", "conversation": "room:t", "cid": "c1", "text": "x" * 25_000}
                await c.request(msg, timeout=10)
            took = time.monotonic() - started
            assert took < 1.0, took
            assert refused.value.code == "frame_too_large" and refused.value.limit == 20_000
            assert refused.value.size > 20_000, refused.value.size
            # Still connected and working.
            sent = await c.request(
                {"type": "send", "conversation": "room:t", "cid": "c2", "text": "ok"}
            )
            assert sent["type"] == "sent"
        finally:
            await c.close()
    assert endpoint.frames_too_large == 0  # nothing too large reached the server

    # RallypointClient: `send` (retried on timeouts and refusals with a time to come back)
    # raises it at once too.
    phone = await phones(server, "phone")
    await phone.join("t")
    started = time.monotonic()
    with pytest.raises(FrameTooLargeError):
        await phone.send("room:t", "y" * 25_000)
    assert time.monotonic() - started < 1.0
    assert (await phone.send("room:t", "fits"))["type"] == "sent"


async def test_frame_too_large_answers_the_request_when_its_id_is_at_an_end(
    start_server: Start, clients: Connect
) -> None:
    """The server does not read a frame over `max_frame_bytes`, but answers its `id` when the
    frame's first or last bytes tell it (the top-level object's first or last member)."""
    server = await start_server(limits__max_frame_bytes=20_000)
    c = await clients(server, name="T")
    big = "x" * 30_000
    frames: list[tuple[str, str | None]] = [
        (f'{{"type": "send", "text": "{big}", "id": "last1"}}', "last1"),  # both SDKs
        (f'{{ "id" : "first1", "type": "send", "text": "{big}"}}', "first1"),
        (f'{{"type": "send", "text": "{big}", "o": {{"id": "inner"}}}}', None),
        # Ends with `\", \"id\": \"quoted"}`: in the text, not a member.
        (json.dumps({"type": "send", "text": big + '", "id": "quoted'}), None),
    ]
    for raw, re_ in frames:
        await c.send_raw(raw)
        ev = await c.next_event("error")
        assert ev["code"] == "frame_too_large" and ev.get("re") == re_, (raw[-40:], ev)
    assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_token_errors(start_server: Start) -> None:
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)
    url = ws_url(server)

    async def hello(**fields: object) -> tuple[str, int | None]:
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
            await ws.send_json({"type": "hello", "v": 1, **fields})
            msg = await ws.receive_json()
            if msg["type"] == "welcome":
                return "welcome", None
            closing = await ws.receive()
            return msg["code"], closing.data

    good = create_token(KEY, SECRET, "alice", rooms={"lobby": ["join", "chat"]})
    assert await hello(token=good) == ("welcome", None)
    assert await hello(name="Anon") == ("token_required", 4001)
    assert await hello(token=create_token(KEY, SECRET, "a", rooms={}, ttl_s=-30)) == (
        "token_expired",
        4001,
    )
    huge = jwt.encode({"iss": KEY, "sub": "a", "exp": 10**401}, SECRET, algorithm="HS256")
    assert await hello(token=huge) == ("token_invalid", 4001)  # was a traceback, no answer
    text = jwt.encode(
        {"iss": KEY, "sub": "a", "exp": str(int(time.time()) + 60)}, SECRET, algorithm="HS256"
    )
    assert await hello(token=text) == ("token_invalid", 4001)
    long_lived = create_token(KEY, SECRET, "a", rooms={"*": ["join"]}, ttl_s=31 * 86400)
    assert await hello(token=long_lived) == ("token_invalid", 4001)  # the default maximum
    forged = create_token(KEY, "forged-secret-also-at-least-32-bytes", "a", rooms={"*": ["join"]})
    assert await hello(token=forged) == ("token_invalid", 4001)
    assert await hello(token=good[:-2] + "xx") == ("token_invalid", 4001)

    c = Client(url)
    await c.connect(token=good)
    try:
        with pytest.raises(ClientError) as e:
            await c.request({"type": "join", "room": "other"})
        assert e.value.code == "token_wrong_room"
        await c.request({"type": "join", "room": "lobby"})
        with pytest.raises(ClientError) as e:
            await c.request({"type": "lock", "room": "lobby", "locked": True})
        assert e.value.code == "forbidden"  # no moderate grant, no first-joiner rule
    finally:
        await c.close()
    ro = Client(url)
    await ro.connect(token=create_token(KEY, SECRET, "reader", rooms={"lobby": ["join"]}))
    try:
        await ro.request({"type": "join", "room": "lobby"})
        with pytest.raises(ClientError) as e:
            await ro.send_chat("room:lobby", "hi")
        assert e.value.code == "forbidden"
    finally:
        await ro.close()


async def test_rate_limit(start_server: Start, clients: Connect) -> None:
    server = await start_server(limits__rate_per_s=5, limits__burst=5)
    c = await clients(server, name="Flood", identity="flood")
    await c.request({"type": "join", "room": "f"})  # uses one token
    for i in range(30):
        await c.send_raw(
            {
                "type": "send",
                "conversation": "room:f",
                "cid": f"c{i}",
                "text": "spam",
                "id": f"s{i}",
            }
        )
    replies = [await c.next_event(where=lambda e: "re" in e) for _ in range(30)]
    acked = [r for r in replies if r["type"] == "sent"]
    limited = [r for r in replies if r["type"] == "error"]
    assert len(acked) == 4 and len(limited) == 26
    assert all(r["code"] == "rate_limited" and r["retry_after_ms"] > 0 for r in limited)
    await asyncio.sleep(limited[-1]["retry_after_ms"] / 1000)
    await c.request({"type": "ping"})  # pings are never limited
    ack = await c.send_chat("room:f", "patient")
    await asyncio.sleep(0.25)  # one more token for the history request
    hist = await c.request({"type": "history", "conversation": "room:f"})
    assert [m["seq"] for m in hist["messages"]] == [1, 2, 3, 4, 5]  # only accepted ones stored
    assert ack["seq"] == 5


async def test_slow_reader_is_cut_off(
    start_server: Start, clients: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Connection, "ABORT_AFTER_S", 0.5)  # abandon's grace before the abort
    server = await start_server(
        limits__max_outbox_bytes=96 * 1024,
        limits__max_reply_bytes=48 * 1024,
        limits__rate_per_s=1000,
        limits__burst=1000,
    )
    # A raw socket that completes the handshake and then never reads.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        hello = b'{"type":"hello","v":1,"name":"Slow","identity":"slow"}'
        join = b'{"type":"join","room":"s"}'
        for payload in (hello, join):
            sock.sendall(struct.pack("!BB", 0x81, 0x80 | len(payload)) + b"\0\0\0\0" + payload)
        hub = server.app[HUB]
        endpoint = server.app[ENDPOINT]
        async with asyncio.timeout(5):  # the server has handled hello and join
            while not any(c.session and "s" in c.session.rooms for c in endpoint.connections):
                await asyncio.sleep(0.01)
        (slow,) = endpoint.connections
        assert slow.session is not None and slow.session.identity == "slow"
        talker = await clients(server, name="Talker", identity="talker")
        await talker.request({"type": "join", "room": "s"})
        text = "z" * 7000
        sent = 0
        for i in range(3000):  # bounded: at most 21 MB offered to a reader that never reads
            await talker.send_chat("room:s", text, cid=f"c{i}")
            sent += 1
            if slow.closing:
                break
        assert slow.closing, "the slow reader was not cut off"
        assert hub.counters.slow_consumers == 1
        # Its outbox stayed bounded: nothing more is queued after the cut-off.
        assert slow.transport.get_write_buffer_size() <= 96 * 1024 + 8 * 1024
        # The talker's messages were all stored and acked; the server is fine.
        hist = await talker.request({"type": "history", "conversation": "room:s", "limit": 1})
        assert hist["last_seq"] == sent
        # The abandoned connection is aborted ABORT_AFTER_S after its close frame (the client
        # does not read it), and the server forgets it.
        async with asyncio.timeout(Connection.ABORT_AFTER_S + 5):
            while slow in endpoint.connections:
                await asyncio.sleep(0.01)
        assert slow.transport.is_closing()
    finally:
        sock.close()


async def test_origin_check(start_server: Start) -> None:
    server = await start_server(server__allowed_origins=["https://app.example"])
    url = ws_url(server)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(url, headers={"Origin": "https://evil.example"})
        assert e.value.status == 403
        ws = await http.ws_connect(url, headers={"Origin": "https://app.example"})
        await ws.close()
        ws = await http.ws_connect(url)  # non-browser clients send no Origin
        await ws.close()
    default = await start_server()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(ws_url(default), headers={"Origin": "https://evil.example"})
        for ok in (f"http://127.0.0.1:{default.port}", "http://localhost:3000", "http://[::1]"):
            ws = await http.ws_connect(ws_url(default), headers={"Origin": ok})
            await ws.close()
        # DNS rebinding: an attacker's name resolved to this server; the browser sends the
        # name as both Origin and Host, so "same host" is no proof of anything.
        rebound = f"evil.example:{default.port}"
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(
                ws_url(default), headers={"Origin": f"http://{rebound}", "Host": rebound}
            )
        assert e.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await http.ws_connect(ws_url(default), headers={"Origin": "null"})


async def test_hello_errors_answer_the_hello_id(start_server: Start) -> None:
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(server)) as ws:
        await ws.send_json({"type": "hello", "v": 1, "id": "h1", "token": "x.y.z"})
        msg = await ws.receive_json()
        assert msg["code"] == "token_invalid" and msg["re"] == "h1"


async def test_token_mode_ignores_hello_name(start_server: Start) -> None:
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)
    c = Client(ws_url(server))
    tok = create_token(KEY, SECRET, "alice", rooms={"r": ["join"]}, name="Alice")
    try:
        w = await c.connect(token=tok, name="The Queen")
        assert w["name"] == "Alice"
    finally:
        await c.close()


async def test_invalid_frames_count_against_the_rate_limit(
    start_server: Start, clients: Connect
) -> None:
    server = await start_server(limits__rate_per_s=2, limits__burst=3)
    c = await clients(server, name="Junk")
    for _ in range(6):
        await c.send_raw("{junk")
    codes = [(await c.next_event("error"))["code"] for _ in range(6)]
    assert codes[:3] == ["bad_json"] * 3 and set(codes[3:]) == {"rate_limited"}


@pytest.mark.parametrize(
    "frame",
    [b'{"type": "ping"}', "x" * 70_000],
    ids=["binary", "oversized"],
)
async def test_refused_frames_of_every_kind_count_against_the_rate_limit(
    start_server: Start, clients: Connect, frame: str | bytes
) -> None:
    """PROTOCOL.md: every frame after `welcome` but a valid `ping` takes a token, binary and
    oversized frames included."""
    server = await start_server(limits__rate_per_s=2, limits__burst=3)
    c = await clients(server, name="Junk")
    for _ in range(5):
        await c.send_raw(frame)
    codes = [(await c.next_event("error"))["code"] for _ in range(5)]
    assert codes[:3] == [codes[0]] * 3 and codes[0] != "rate_limited"
    assert set(codes[3:]) == {"rate_limited"}


async def test_errors_before_welcome_answer_a_readable_id(server: TestServer) -> None:
    """An error carries `re` whenever the frame's `id` can be read, before `welcome` too."""
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url(server)) as ws:
        await ws.send_str('{"type": "join", "room": "x", "id": "j1"}')
        msg = await ws.receive_json()
        assert (msg["code"], msg.get("re")) == ("hello_required", "j1")
        await ws.send_str('{"type": "warp", "id": "w1"}')
        msg = await ws.receive_json()
        assert (msg["code"], msg.get("re")) == ("unknown_type", "w1")
        await ws.send_str('{"type": "hello", "v": 1, "id": "h1", "extra": 1}')
        msg = await ws.receive_json()
        assert (msg["code"], msg.get("re")) == ("bad_field", "h1")
        await ws.send_str("{junk")
        msg = await ws.receive_json()
        assert msg["code"] == "bad_json" and "re" not in msg
        await ws.send_str('{"type": "hello", "v": 1, "name": "N", "id": "h2"}')
        msg = await ws.receive_json()
        assert (msg["type"], msg["re"]) == ("welcome", "h2")


async def test_unknown_type_after_welcome_answers_the_request(
    server: TestServer, clients: Connect
) -> None:
    """A newer app asking an older server something it does not know can match the error."""
    c = await clients(server, name="New")
    await c.send_raw('{"type": "teleport", "id": "t1", "to": "mars"}')
    ev = await c.next_event("error")
    assert (ev["code"], ev.get("re")) == ("unknown_type", "t1")


async def test_messaging_oneself_is_a_bad_conversation(
    server: TestServer, clients: Connect
) -> None:
    c = await clients(server, name="Solo", identity="solo")
    with pytest.raises(ClientError) as e:
        await c.request({"type": "send", "conversation": "dm:solo|solo", "cid": "c", "text": "hi"})
    assert e.value.code == "bad_conversation"


@pytest.mark.parametrize("path", ["/static/%00", "/static/app%00.js", "/static/%2e%2e%00/x"])
async def test_a_nul_in_a_static_path_is_not_found(
    server: TestServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An encoded NUL answered 500 and logged a traceback per request."""
    async with aiohttp.ClientSession() as http:
        async with http.get(yarl.URL(f"http://127.0.0.1:{server.port}{path}", encoded=True)) as r:
            assert r.status == 404
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("inline", [True, False], ids=["fastws", "receive"])
async def test_a_connection_flooding_far_above_its_rate_is_closed(
    start_server: Start, clients: Connect, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    """A connection that keeps sending after `rate_limited` costs the server a refusal per
    frame (681,750 frames in 10 s took a core): past `limits.flood_close_after` refusals more
    than the rate refills it is closed with 4029, and the others go on being served."""
    monkeypatch.setattr(endpoint_module, "FAST_WS", inline and endpoint_module.FAST_WS)
    server = await start_server(limits__rate_per_s=5, limits__burst=5, limits__flood_close_after=20)
    other = await clients(server, name="Other", identity="other")
    flooder = await clients(server, name="Flood", identity="flood")
    await flooder.request({"type": "join", "room": "f"})
    for i in range(200):  # bounded: far more than burst + flood_close_after
        frame = {
            "type": "send",
            "conversation": "room:f",
            "cid": f"c{i}",
            "text": "x",
            "id": f"{i}",
        }
        try:
            await flooder.send_raw(frame)
        except ConnectionError:
            break
    ev = await flooder.next_event("_closed", timeout=5)
    assert ev["code"] == 4029
    assert server.app[HUB].counters.flooding == 1
    refusals = server.app[HUB].counters.rate_limited
    assert 20 <= refusals <= 40  # the allowance (and what it refilled meanwhile), then the close
    assert (await other.request({"type": "ping"}))["type"] == "pong"
    hist = await other.request({"type": "history", "conversation": "room:f"})
    assert hist["last_seq"] <= 10  # at most what the rate allowed was stored


async def test_websocket_sessions_per_address_are_capped(
    start_server: Start, clients: Connect
) -> None:
    server = await start_server(limits__max_sessions_per_address=3)
    held = [await clients(server, name=f"u{i}") for i in range(3)]
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await http.ws_connect(ws_url(server))
        assert e.value.status == 503
    await held[0].close()
    async with asyncio.timeout(5):  # the slot comes back once the server saw it go
        while len(server.app[ENDPOINT].connections) > 2:
            await asyncio.sleep(0.01)
    again = await clients(server, name="again")
    assert (await again.request({"type": "ping"}))["type"] == "pong"
    assert server.app[ENDPOINT].refused_per_address == 1
