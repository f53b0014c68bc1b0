"""The MessagePack subprotocol (`rallypoint.msgpack`): negotiation, the same messages as JSON
through real WebSockets, bad input, and Hypothesis round trips for every message type."""

from __future__ import annotations

import ast
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling.app import ENDPOINT, HUB, protocol
from signaling.chat.store import StoredMessage
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import Client
from signaling.wire.encodings import MSGPACK, Transcoder, is_plain, json_payload, pack
from signaling.wire.errors import ProtocolError
from signaling.wire.framing import encode, encode_fresh
from signaling.wire.schema import json_schema
from signaling.wire.spec import Field, MessageSpec

Connect = Callable[..., Awaitable[Client]]
PROTOCOL = protocol()
SCHEMA = json_schema(PROTOCOL)


def ws_url(server: TestServer) -> str:
    return f"ws://127.0.0.1:{server.port}/ws"


@pytest.fixture
async def packed() -> AsyncIterator[Connect]:
    """Like ``clients``, speaking MessagePack: ``await packed(server, identity=...)``."""
    made: list[Client] = []

    async def connect(server: TestServer, **hello: Any) -> Client:
        c = Client(ws_url(server), encoding="msgpack")
        made.append(c)
        await c.connect(**hello)
        return c

    yield connect
    for c in made:
        await c.close()


# -- negotiation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ((), None),
        (("rallypoint.json",), "rallypoint.json"),
        (("rallypoint.msgpack",), "rallypoint.msgpack"),
        (("chat.v9", "rallypoint.msgpack"), "rallypoint.msgpack"),
        (("rallypoint.json", "rallypoint.msgpack"), "rallypoint.json"),  # the client's order
    ],
)
async def test_negotiation(
    server: TestServer, offered: tuple[str, ...], chosen: str | None
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(server), protocols=offered) as ws,
    ):
        assert ws.protocol == chosen
        hello = {"type": "hello", "v": 1, "identity": "neg", "id": "h"}
        if chosen == MSGPACK:
            await ws.send_bytes(msgpack.packb(hello))
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY
            welcome = msgpack.unpackb(msg.data)
        else:
            await ws.send_str(orjson.dumps(hello).decode())
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT
            welcome = orjson.loads(msg.data)
        assert welcome["type"] == "welcome" and welcome["re"] == "h"


async def test_the_sdk_speaks_msgpack(server: TestServer) -> None:
    a = RallypointClient(ws_url(server), identity="alice", encoding="msgpack")
    b = RallypointClient(ws_url(server), identity="bob")
    try:
        await a.connect()
        await b.connect()
        assert a._conn is not None and a._conn.ws is not None
        assert a._conn.ws.protocol == MSGPACK
        await a.join("t")
        await b.join("t")
        await a.send("room:t", "from a phone on a slow link")
        got = await b.next_message()
        assert got["text"] == "from a phone on a slow link" and got["from"] == "alice"
    finally:
        await a.close()
        await b.close()
    with pytest.raises(ValueError):
        RallypointClient("ws://x/ws", encoding="xml")  # type: ignore[arg-type]


# -- the same messages ----------------------------------------------------------------------------


async def test_chat_between_msgpack_and_json(
    server: TestServer, clients: Connect, packed: Connect
) -> None:
    p = await packed(server, identity="pat", name="Pat")
    j = await clients(server, identity="jo", name="Jo")
    for c in (p, j):
        await c.request({"type": "join", "room": "mix"})
    p.drain()
    j.drain()
    sent = await p.send_chat("room:mix", "héllo 👋 from MessagePack")
    at_j = await j.next_event("message")
    await j.send_chat("room:mix", "and back in JSON")
    at_p = await p.next_event("message")
    assert at_j["text"] == "héllo 👋 from MessagePack" and at_j["seq"] == sent["seq"]
    assert at_p["text"] == "and back in JSON" and at_p["from"] == "jo"
    # Both read the same history, value for value.
    hp = await p.request({"type": "history", "conversation": "room:mix"})
    hj = await j.request({"type": "history", "conversation": "room:mix"})
    assert hp["messages"] == hj["messages"] and len(hp["messages"]) == 2
    assert (await p.request({"type": "ping"}))["type"] == "pong"


async def test_fan_out_converts_once(server: TestServer, clients: Connect, packed: Connect) -> None:
    """A message delivered to several MessagePack connections is converted once."""
    sender = await clients(server, identity="s")
    readers = [await packed(server, identity=f"r{i}") for i in range(3)]
    for c in (sender, *readers):
        await c.request({"type": "join", "room": "fan"})
    endpoint = server.app[ENDPOINT]
    for c in readers:
        c.drain()
    before = endpoint.transcode.conversions
    await sender.send_chat("room:fan", "to three MessagePack readers")
    for c in readers:
        assert (await c.next_event("message"))["text"] == "to three MessagePack readers"
    assert endpoint.transcode.conversions - before == 1


async def test_fan_out_packs_the_message(
    server: TestServer, clients: Connect, packed: Connect
) -> None:
    """The fan-outs of chat messages, typing and presence pack the message the core encoded
    (``encode_fresh``) instead of parsing its frame back, and MessagePack readers get exactly
    what JSON readers get."""
    sender = await clients(server, identity="s")
    plain = await clients(server, identity="j")
    reader = await packed(server, identity="p")
    for c in (sender, plain, reader):
        await c.request({"type": "join", "room": "fresh"})
    t = server.app[ENDPOINT].transcode
    for c in (plain, reader):
        c.drain()
    before = t.from_messages
    await sender.send_chat("room:fresh", "packed from the dict")
    await sender.request({"type": "typing", "conversation": "room:fresh", "active": True})
    for kind in ("message", "typing"):
        assert await reader.next_event(kind) == await plain.next_event(kind)
    assert t.from_messages - before == 2


# -- bad input ------------------------------------------------------------------------------------


def _map(*pairs: bytes) -> bytes:
    """A raw MessagePack map of ``pairs`` (key and value bytes, alternating)."""
    assert len(pairs) % 2 == 0 and len(pairs) < 32
    return bytes((0x80 | len(pairs) // 2,)) + b"".join(pairs)


def _s(text: str) -> bytes:
    return msgpack.packb(text)


PING = msgpack.packb({"type": "ping"})
ICE = {"type": "ice", "room": "t", "target": "publisher", "candidate": {}}
BAD_PACKED: list[tuple[str, bytes | str, str]] = [
    ("text frame", '{"type": "ping"}', "bad_message"),
    ("garbage", b"\xc1\xc1\xc1", "bad_msgpack"),
    ("empty", b"", "bad_msgpack"),
    ("truncated", PING[:-2], "bad_msgpack"),
    ("trailing bytes", PING + b"\x00", "bad_msgpack"),
    ("two values", PING + PING, "bad_msgpack"),
    ("not a map", msgpack.packb(["ping"]), "bad_message"),
    ("a string", msgpack.packb("ping"), "bad_message"),
    ("integer key", _map(_s("type"), _s("ping"), b"\x01", b"\x02"), "bad_msgpack"),
    ("bin key", _map(_s("type"), _s("ping"), b"\xc4\x01k", b"\x02"), "bad_msgpack"),
    ("empty bin key", _map(_s("type"), _s("ping"), b"\xc4\x00", b"\x02"), "bad_msgpack"),
    ("bin type", _map(_s("type"), b"\xc4\x04ping"), "bad_msgpack"),
    ("empty bin type", _map(_s("type"), b"\xc4\x00"), "bad_msgpack"),
    ("bin value", msgpack.packb({"type": "join", "room": b"t"}), "bad_msgpack"),
    ("empty bin value", msgpack.packb({"type": "join", "room": b""}), "bad_msgpack"),
    ("ext value", msgpack.packb({"type": "join", "room": msgpack.ExtType(1, b"t")}), "bad_msgpack"),
    ("empty ext", _map(_s("type"), _s("join"), _s("room"), b"\xc7\x00\x01"), "bad_msgpack"),
    ("timestamp", msgpack.packb({"type": "join", "room": msgpack.Timestamp(1)}), "bad_msgpack"),
    (
        "NaN",
        msgpack.packb({"type": "read", "conversation": "room:t", "seq": math.nan}),
        "bad_msgpack",
    ),
    ("nested bin", msgpack.packb({**ICE, "candidate": {"c": [b""]}}), "bad_msgpack"),
    (
        "nested int key",
        msgpack.packb({**ICE, "candidate": {1: "x"}}, strict_types=False),
        "bad_msgpack",
    ),
    ("nested infinity", msgpack.packb({**ICE, "candidate": {"c": math.inf}}), "bad_msgpack"),
    (
        "nested 2,000 deep",
        msgpack.packb(ICE)[:-1] + b"\x81\xa1c" * 2000 + b"\xc0",
        "bad_msgpack",
    ),
    (
        "array of 2^32-1",
        _map(_s("type"), _s("watch"), _s("identities"), b"\xdd\xff\xff\xff\xff"),
        "bad_msgpack",
    ),
    ("string of 2^32-1", _map(_s("type"), b"\xdb\xff\xff\xff\xffping"), "bad_msgpack"),
    ("map of 2^32-1", b"\xdf\xff\xff\xff\xff", "bad_msgpack"),
    (
        "float seq",
        msgpack.packb({"type": "read", "conversation": "room:t", "seq": 1.5}),
        "bad_field",
    ),
    (
        "bool seq",
        msgpack.packb({"type": "read", "conversation": "room:t", "seq": True}),
        "bad_field",
    ),
    (
        "seq over 2^53",
        msgpack.packb({"type": "read", "conversation": "room:t", "seq": 2**64 - 1}),
        "bad_field",
    ),
    ("unknown type", msgpack.packb({"type": "fly"}), "unknown_type"),
    # A value outside JSON's data model is `bad_msgpack` wherever it is, also in a field the
    # validator never checks: an unknown field, one after a refused field, an unknown type.
    ("NaN in an unknown field", msgpack.packb({"type": "ping", "x": math.nan}), "bad_msgpack"),
    ("empty bin in an unknown field", msgpack.packb({"type": "ping", "x": b""}), "bad_msgpack"),
    (
        "NaN after an unknown field",
        msgpack.packb({"type": "watch", "zz": 1, "identities": [math.nan]}),
        "bad_msgpack",
    ),
    ("NaN with an unknown type", msgpack.packb({"type": "fly", "x": math.nan}), "bad_msgpack"),
    ("NaN without a type", msgpack.packb({"x": math.inf}), "bad_msgpack"),
    (
        "server field",
        msgpack.packb(
            {"type": "send", "conversation": "room:t", "cid": "c", "text": "x", "from": "b"}
        ),
        "bad_field",
    ),
    (
        "oversized",
        msgpack.packb({"type": "send", "conversation": "room:t", "cid": "c", "text": "x" * 70_000}),
        "frame_too_large",
    ),
]


async def test_frame_too_large_answers_a_map_whose_first_key_is_id(
    start_server: Callable[..., Awaitable[TestServer]], packed: Connect
) -> None:
    """A packed frame over `max_frame_bytes` is not read; its `frame_too_large` answers its
    `id` when that is the map's first key (a packed frame's end says nothing of nesting)."""
    server = await start_server(limits__max_frame_bytes=20_000)
    c = await packed(server, identity="big")
    text = "x" * 30_000
    for raw, re_ in (
        (msgpack.packb({"id": "p1", "type": "send", "text": text}), "p1"),
        (msgpack.packb({"type": "send", "text": text, "id": "p2"}), None),
    ):
        await c.send_raw(raw)
        ev = await c.next_event("error")
        assert ev["code"] == "frame_too_large" and ev.get("re") == re_, ev
    assert (await c.request({"type": "ping"}))["type"] == "pong"


async def test_bad_msgpack_input(server: TestServer, clients: Connect, packed: Connect) -> None:
    owner = await clients(server, identity="owner")
    await owner.request({"type": "join", "room": "t"})
    c = await packed(server, identity="tester")
    await c.request({"type": "join", "room": "t"})
    c.drain()
    for name, raw, code in BAD_PACKED:
        await c.send_raw(raw)
        ev = await c.next_event("error")
        assert ev["code"] == code, (name, ev)
        assert ev["message"] and "Traceback" not in ev["message"], name
    # Still connected and working, and nothing refused was stored.
    assert (await c.request({"type": "ping"}))["type"] == "pong"
    hist = await c.request({"type": "history", "conversation": "room:t"})
    assert hist["messages"] == [] and hist["last_seq"] == 0
    assert server.app[HUB].counters.internal_errors == 0


async def test_errors_answer_the_request_id_in_msgpack(server: TestServer, packed: Connect) -> None:
    c = await packed(server, identity="ids")
    # A map that decodes carries its id back; bin data of any length refuses the frame while
    # it is decoded, so that one is answered without `re` (like a frame that is not JSON).
    await c.send_raw(msgpack.packb({"type": "join", "room": b"", "id": "q1"}))
    ev = await c.next_event("error")
    assert ev["code"] == "bad_msgpack" and ev["re"] == "q1"
    await c.send_raw(msgpack.packb({"type": "join", "room": b"x", "id": "q1"}))
    ev = await c.next_event("error")
    assert ev["code"] == "bad_msgpack" and "re" not in ev
    await c.send_raw(msgpack.packb({"type": "teleport", "id": "q2"}))
    ev = await c.next_event("error")
    assert ev["code"] == "unknown_type" and ev["re"] == "q2"
    await c.send_raw(msgpack.packb({"type": "ping", "id": "q3", "x": math.nan}))
    ev = await c.next_event("error")
    assert ev["code"] == "bad_msgpack" and ev["re"] == "q3"


async def test_binary_hello_on_json_is_refused(server: TestServer) -> None:
    """Before `welcome` too: a frame of the other kind is refused and the connection waits."""
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(ws_url(server), protocols=(MSGPACK,)) as ws,
    ):
        await ws.send_str('{"type": "hello", "v": 1, "identity": "x"}')
        err = msgpack.unpackb((await ws.receive()).data)
        assert err["code"] == "bad_message"
        await ws.send_bytes(b"\x92")  # truncated
        assert msgpack.unpackb((await ws.receive()).data)["code"] == "bad_msgpack"
        await ws.send_bytes(msgpack.packb({"type": "hello", "v": 1, "identity": "x", "id": "h"}))
        assert msgpack.unpackb((await ws.receive()).data)["type"] == "welcome"


# -- Hypothesis: every message type ---------------------------------------------------------------

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | INT64
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


def _pattern(p: str, max_length: int | None = None) -> st.SearchStrategy[str]:
    s = st.from_regex(p, fullmatch=True)
    return s if max_length is None else s.filter(lambda v: len(v) <= max_length)


def _field(f: Field) -> st.SearchStrategy[Any]:
    """Valid values of a client message's field."""
    if f.enum is not None:
        return st.sampled_from(f.enum)
    if f.kind == "string":
        if f.pattern is not None:
            return _pattern(f.pattern, f.max_length)
        return st.text(min_size=1, max_size=min(f.max_length or 40, 40))
    if f.kind == "integer":
        low = f.minimum if f.minimum is not None else -(2**53)
        return st.integers(low, f.maximum if f.maximum is not None else 2**53)
    if f.kind == "boolean":
        return st.booleans()
    if f.kind == "array":
        item = (
            _pattern(f.item_pattern)
            if f.item_pattern
            else JSON_VALUES.filter(lambda v: isinstance(v, dict))
            if f.items == "object"
            else st.text(max_size=10)
        )
        return st.lists(item, max_size=min(f.max_items or 3, 3))
    assert f.kind == "object", f
    if f.items is None:
        return st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3)
    keys = _pattern(f.key_pattern) if f.key_pattern else st.text(max_size=8)
    return st.dictionaries(keys, st.integers(0, 2**53), max_size=3)


@cache
def client_messages(spec: MessageSpec) -> st.SearchStrategy[tuple[dict[str, Any], bool]]:
    """Valid messages of ``spec`` (with True), and some broken ones (with False): a field with
    an arbitrary value, a field too many, a required field left out."""
    required = {f.name: _field(f) for f in spec.fields if f.required}
    optional = {f.name: _field(f) for f in spec.fields if not f.required}
    valid = st.fixed_dictionaries({"type": st.just(spec.type), **required}, optional=optional)
    names = [f.name for f in spec.fields] + ["type", "from", "zz"]

    def broken(m: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.one_of(
            st.builds(lambda k, v: {**m, k: v}, st.sampled_from(names), JSON_VALUES),
            st.sampled_from(list(m)).map(lambda k: {x: v for x, v in m.items() if x != k}),
        )

    return st.one_of(
        valid.map(lambda m: (m, True)), valid.flatmap(broken).map(lambda m: (m, False))
    )


def _outcome(parse: Callable[[bytes], dict[str, Any]], data: bytes) -> tuple[Any, ...]:
    try:
        return ("ok", parse(data))
    except ProtocolError as e:
        return ("error", e.code, e.message, e.re)


@pytest.mark.parametrize("type_", sorted(PROTOCOL.client))
def test_client_messages_round_trip(type_: str) -> None:
    strategy = client_messages(PROTOCOL.client[type_])

    @settings(max_examples=25, deadline=None, derandomize=True, database=None)
    @given(strategy)
    def check(example: tuple[dict[str, Any], bool]) -> None:
        m, valid = example
        packed = msgpack.packb(m)
        assert msgpack.unpackb(packed) == m == orjson.loads(orjson.dumps(m))
        as_json = _outcome(PROTOCOL.parse, orjson.dumps(m))
        assert _outcome(PROTOCOL.parse_msgpack, packed) == as_json
        if valid:
            assert as_json == ("ok", m)

    check()


def _resolve(ref: str) -> dict[str, Any]:
    node: Any = SCHEMA
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


_KEYWORDS = {
    "description", "type", "properties", "required", "additionalProperties", "const", "$ref",
    "items", "pattern", "enum", "minimum", "maximum", "maxLength", "maxItems",
    "propertyNames", "maxProperties",
}  # fmt: skip


def from_schema(s: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values of the part of JSON Schema that ``json_schema`` writes (and no more: a keyword
    this does not know fails the test, so the round trips keep up with the schema)."""
    assert set(s) <= _KEYWORDS, set(s) - _KEYWORDS
    if "$ref" in s:
        return st.deferred(lambda: from_schema(_resolve(s["$ref"])))
    if "const" in s:
        return st.just(s["const"])
    if "enum" in s:
        return st.sampled_from(s["enum"])
    kind = s.get("type")
    if kind == "string":
        if "pattern" in s:
            return _pattern(s["pattern"], s.get("maxLength"))
        return st.text(max_size=min(s.get("maxLength", 30), 30))
    if kind == "integer":
        return st.integers(s.get("minimum", -(2**53)), s.get("maximum", 2**53))
    if kind == "boolean":
        return st.booleans()
    if kind == "number":
        return st.floats(allow_nan=False, allow_infinity=False)
    if kind == "array":
        items = from_schema(s["items"]) if "items" in s else JSON_VALUES
        return st.lists(items, max_size=min(s.get("maxItems", 2), 2))
    if kind == "object" and "properties" in s:
        props = s["properties"]
        req = set(s.get("required", ()))
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in props.items() if k in req},
            optional={k: from_schema(v) for k, v in props.items() if k not in req},
        )
    if kind == "object":
        values = s.get("additionalProperties")
        keys = _pattern(s["propertyNames"]["pattern"]) if "propertyNames" in s else st.text()
        return st.dictionaries(
            keys, from_schema(values) if isinstance(values, dict) else JSON_VALUES, max_size=2
        )
    assert kind is None, s
    return JSON_VALUES


@pytest.mark.parametrize("type_", sorted(PROTOCOL.server))
def test_server_messages_round_trip(type_: str) -> None:
    """What a JSON client reads is what a MessagePack client reads, through the fan-out's
    conversion and through a direct reply."""
    strategy = from_schema(SCHEMA["$defs"]["server"][type_])

    @settings(max_examples=15, deadline=None, derandomize=True, database=None)
    @given(strategy)
    def check(m: dict[str, Any]) -> None:
        frame = encode(m)
        as_json = orjson.loads(json_payload(frame))
        assert as_json == m
        converted = Transcoder()(frame)
        assert converted[0] == 0x82 and msgpack.unpackb(_payload(converted)) == as_json
        fresh = Transcoder()
        assert fresh(encode_fresh(m)) == converted and fresh.from_messages == 1  # same bytes
        assert msgpack.unpackb(_payload(pack(m))) == as_json
        assert is_plain(as_json)

    check()


def _payload(frame: bytes) -> bytes:
    n = frame[1]
    if n < 126:
        return frame[2:]
    if n == 126:
        assert struct.unpack("!H", frame[2:4])[0] == len(frame) - 4
        return frame[4:]
    return frame[10:]


def test_long_frames_convert() -> None:
    """Frames with 16- and 64-bit lengths (RFC 6455 section 5.2) convert too."""
    t = Transcoder()
    for n in (10, 200, 70_000):
        m = {"type": "history", "messages": [], "text": "x" * n}
        assert msgpack.unpackb(_payload(t(encode(m)))) == m


def test_fresh_frames_pack_only_the_last() -> None:
    """Only the last ``encode_fresh`` frame is packed from its message; any other frame (an
    earlier one, one from ``encode``, an equal copy from a bus) is parsed back, the same
    bytes either way."""
    a, b = {"type": "typing", "active": True}, {"type": "typing", "active": False}
    t = Transcoder()
    fa = encode_fresh(a)
    fb = encode_fresh(b)
    out = [t(f) for f in (fa, fb, encode(a), bytes(bytearray(fb)))]
    assert [msgpack.unpackb(_payload(x)) for x in out] == [a, b, a, b]
    assert t.conversions == 4 and t.from_messages == 1


def _fresh_arguments() -> list[tuple[str, int, ast.expr]]:
    import signaling

    root = Path(signaling.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "encode_fresh"
            ):
                assert len(node.args) == 1 and not node.keywords, f"{path}:{node.lineno}"
                found.append((str(path.relative_to(root)), node.lineno, node.args[0]))
    return found


def test_encode_fresh_gets_messages_nobody_else_holds() -> None:
    """``encode_fresh``'s message must not change after it is encoded (the converter packs it
    as it is then). Every call passes a dict display or a ``to_wire()`` call, so no other
    reference to the message exists; and ``to_wire`` makes a new dict each time."""
    calls = _fresh_arguments()
    assert len(calls) >= 3  # chat messages (2 sites), typing, presence
    for where, line, arg in calls:
        fresh = isinstance(arg, ast.Dict) or (
            isinstance(arg, ast.Call)
            and isinstance(arg.func, ast.Attribute)
            and arg.func.attr == "to_wire"
            and not arg.args
        )
        assert fresh, f"signaling/{where}:{line}: encode_fresh of {ast.unparse(arg)}"
    m = StoredMessage("room:a", 1, 1, "c", "alice", "Alice", "text", "hi", None, 1, meta="{}")
    a, b = m.to_wire(), m.to_wire()
    assert a is not b and a == b and a["group"] is not b["group"]
