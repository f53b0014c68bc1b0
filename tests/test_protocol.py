"""The message codec: parsing, validation errors, framing, and the JSON Schema file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from signaling.app import protocol
from signaling.wire.errors import ProtocolError
from signaling.wire.framing import encode, error_message, frame
from signaling.wire.protocol import _check_value, _fast_check
from signaling.wire.schema import json_schema

PROTOCOL = protocol()
CLIENT_MESSAGES = PROTOCOL.client
ERROR_CODES = PROTOCOL.errors
parse_client_message = PROTOCOL.parse

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "bad_json"),
        (b"\xff\xfe", "bad_json"),
        (b"[1,2]", "bad_message"),
        (b'"hello"', "bad_message"),
        (b"{}", "bad_message"),
        (b'{"type": 5}', "bad_message"),
        (b'{"type": "teleport"}', "unknown_type"),
        (b'{"type": "join"}', "bad_field"),
        (b'{"type": "join", "room": 7}', "bad_field"),
        (b'{"type": "join", "room": "a b"}', "bad_field"),
        (b'{"type": "join", "room": "' + b"x" * 65 + b'"}', "bad_field"),
        (b'{"type": "join", "room": "lobby", "extra": 1}', "bad_field"),
        (
            b'{"type": "send", "conversation": "room:x", "cid": "c", "text": "t", "from": "b"}',
            "bad_field",
        ),
        (b'{"type": "send", "conversation": "chan:x", "cid": "c", "text": "t"}', "bad_field"),
        (b'{"type": "read", "conversation": "room:x", "seq": true}', "bad_field"),
        (b'{"type": "read", "conversation": "room:x", "seq": -1}', "bad_field"),
        (b'{"type": "read", "conversation": "room:x", "seq": 1.5}', "bad_field"),
        (b'{"type": "lock", "room": "x", "locked": 1}', "bad_field"),
        (b'{"type": "presence", "status": "invisible"}', "bad_field"),
        (b'{"type": "watch", "identities": ["ok", "no way"]}', "bad_field"),
        (b'{"type": "sync", "since": {"room:x": "3"}}', "bad_field"),
        (b'{"type": "sync", "since": {"nope": 3}}', "bad_field"),
        (b'{"type": "history", "conversation": "room:x", "limit": 1000}', "bad_field"),
        # Integers are exact in every client from -2^53 to 2^53: beyond, either sign, refused
        # (a `ping.ts` of -2^60 was echoed in `pong` to clients that cannot represent it).
        (b'{"type": "ping", "ts": 9007199254740993}', "bad_field"),
        (b'{"type": "ping", "ts": -9007199254740993}', "bad_field"),
        (b'{"type": "ping", "ts": -1152921504606846976}', "bad_field"),
        (b'{"type": "sync", "since": {"room:x": 9007199254740993}}', "bad_field"),
    ],
)
def test_bad_frames_get_stable_codes(raw: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_client_message(raw)
    assert exc.value.code == code
    assert exc.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "join", "id": "q7"}',
        b'{"type": "teleport", "id": "q7"}',  # a newer client's type: still answer its request
        b'{"type": 5, "id": "q7"}',
        b'{"id": "q7"}',
    ],
)
def test_error_keeps_request_id_when_usable(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_client_message(raw)
    assert error_message(exc.value)["re"] == "q7"


@pytest.mark.parametrize("raw", [b'{"type": "teleport", "id": 7}', b'{"type": "x", "id": "a b"}'])
def test_error_has_no_request_id_when_unreadable(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as exc:
        parse_client_message(raw)
    assert "re" not in error_message(exc.value)


def test_good_messages_parse() -> None:
    m = parse_client_message(
        b'{"type":"send","conversation":"dm:alice|bob","cid":"c-1","text":"hi","id":"1"}'
    )
    assert m["text"] == "hi"
    m = parse_client_message(b'{"type":"sync","since":{"room:lobby":4,"dm:a|b":0}}')
    assert m["since"] == {"room:lobby": 4, "dm:a|b": 0}


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_frame_header_lengths(size: int) -> None:
    payload = b"a" * size
    f = frame(payload)
    assert f[0] == 0x81  # FIN + text
    if size < 126:
        assert f[1] == size and f[2:] == payload
    elif size < 65536:
        assert f[1] == 126 and struct.unpack("!H", f[2:4])[0] == size and f[4:] == payload
    else:
        assert f[1] == 127 and struct.unpack("!Q", f[2:10])[0] == size and f[10:] == payload


def test_encode_round_trips() -> None:
    msg = {"type": "ok", "re": "x", "n": "é"}
    f = encode(msg)
    assert orjson.loads(f[2:]) == msg


def test_schema_file_is_current() -> None:
    """docs/protocol.schema.json is generated from the message tables; regenerate with
    `python -m signaling.app schema > docs/protocol.schema.json`."""
    on_disk = json.loads((DOCS / "protocol.schema.json").read_text())
    assert on_disk == json.loads(orjson.dumps(json_schema(PROTOCOL)))


def test_schema_knows_the_relation_statuses() -> None:
    """The `relation` event's `status` is one of the four PROTOCOL.md names, as the Relation
    object's in `contacts` (the schema took any string)."""
    schema = json_schema(PROTOCOL)
    validator = jsonschema.Draft202012Validator(schema)
    event = {"type": "relation", "identity": "alice", "status": "incoming", "blocked": False}
    assert validator.is_valid(event)
    assert not validator.is_valid({**event, "status": "pending"})
    status = schema["$defs"]["server"]["relation"]["properties"]["status"]
    assert status["enum"] == schema["$defs"]["Relation"]["properties"]["status"]["enum"]


def test_schema_validates_what_the_parser_accepts() -> None:
    schema = json_schema(PROTOCOL)
    validator = jsonschema.Draft202012Validator(schema)
    good = {"type": "send", "conversation": "room:a", "cid": "c1", "text": "hi", "id": "r"}
    parse_client_message(orjson.dumps(good))
    assert validator.is_valid(good)
    bad = {**good, "from": "mallory"}
    assert not validator.is_valid(bad)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "ping", "ts": 9007199254740993}',
        b'{"type": "ping", "ts": -9007199254740993}',
        b'{"type": "read", "conversation": "room:x", "seq": 9007199254740993}',
        b'{"type": "sync", "since": {"room:x": 9007199254740993}}',
    ],
)
def test_schema_refuses_the_integers_the_parser_refuses(raw: bytes) -> None:
    """The schema describes what the server accepts: integers beyond +-2^53 are refused by
    both (the schema had no bound on them)."""
    with pytest.raises(ProtocolError):
        parse_client_message(raw)
    validator = jsonschema.Draft202012Validator(json_schema(PROTOCOL))
    assert not validator.is_valid(orjson.loads(raw))
    edge = raw.replace(b"9007199254740993", b"9007199254740992")
    parse_client_message(edge)
    assert validator.is_valid(orjson.loads(edge))


@pytest.mark.parametrize(
    ("raw", "edge"),
    [
        (
            b'{"type": "send", "conversation": "room:x", "cid": "c1", "text": ""}',
            b'{"type": "send", "conversation": "room:x", "cid": "c1", "text": " "}',
        ),
        (
            b'{"type": "edit", "conversation": "room:x", "cid": "c2", "ref": 1, "text": ""}',
            b'{"type": "edit", "conversation": "room:x", "cid": "c2", "ref": 1, "text": "a"}',
        ),
        (b'{"type": "call_invite", "to": []}', b'{"type": "call_invite", "to": ["bob"]}'),
    ],
)
def test_schema_and_parser_refuse_empty_text_and_callees(raw: bytes, edge: bytes) -> None:
    """An empty message text and an empty list of callees: refused by the parser (`bad_field`,
    before any handler) and by the schema (it took both)."""
    with pytest.raises(ProtocolError) as refused:
        parse_client_message(raw)
    assert refused.value.code == "bad_field"
    validator = jsonschema.Draft202012Validator(json_schema(PROTOCOL))
    assert not validator.is_valid(orjson.loads(raw))
    parse_client_message(edge)
    assert validator.is_valid(orjson.loads(edge))


def test_every_error_code_has_a_meaning() -> None:
    assert all(ERROR_CODES.values())
    assert set(CLIENT_MESSAGES) >= {"hello", "join", "send", "sync", "read", "typing"}


_SAMPLES: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**53,
    2**53 + 1,
    1.5,
    "",
    "a",
    "lobby",
    "a b",
    "room:x",
    "dm:a|b",
    "x" * 65,
    "x" * 5000,
    "online",
    "invisible",
    "\x00",
    [],
    ["a"],
    {},
    {"room:x": 1},
]


@given(st.one_of(st.sampled_from(_SAMPLES), st.text(max_size=80), st.integers()))
def test_fast_field_checks_never_pass_what_the_full_check_refuses(value: object) -> None:
    # parse_client_message trusts a True from the fast check; the full check words errors.
    for spec in CLIENT_MESSAGES.values():
        for f in spec.fields:
            if _fast_check(f)(value):
                _check_value(f, value, f.name)  # must not raise
