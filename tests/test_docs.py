"""The protocol document matches the server: every handled type is documented, every documented
type is handled, and every example validates against the JSON Schema."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import jsonschema
import pytest
from aiohttp.test_utils import TestServer

from signaling.app import ENDPOINT, make_app, protocol
from signaling.config import load_config
from signaling.sdk.wsclient import Client
from signaling.wire.errors import CloseCode
from signaling.wire.schema import json_schema

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()
PROTOCOL = protocol()
CLIENT_MESSAGES = PROTOCOL.client
SERVER_MESSAGES = PROTOCOL.server
ERROR_CODES = PROTOCOL.errors


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", DOC, re.M | re.S)
    assert m, f"docs/PROTOCOL.md has no section '## {title}'"
    return m.group(1)


def _headings(section: str) -> set[str]:
    return set(re.findall(r"^### `([a-z_]+)`\s*$", section, re.M))


def test_client_messages_documented_and_handled(tmp_path: Path) -> None:
    cfg = load_config(
        None, env={}, overrides={"server.data_dir": str(tmp_path), "turn.enabled": False}
    )
    handled = set(make_app(cfg)[ENDPOINT].handlers)
    documented = _headings(_section("Client messages"))
    assert documented == handled, (
        f"undocumented: {handled - documented}, not handled: {documented - handled}"
    )
    assert handled == set(CLIENT_MESSAGES)


def test_server_messages_documented() -> None:
    assert _headings(_section("Server messages")) == set(SERVER_MESSAGES)


def test_error_and_close_codes_documented() -> None:
    errors = _section("Error codes")
    assert set(re.findall(r"^\|\s*`([a-z_]+)`", errors, re.M)) == set(ERROR_CODES)
    closes = _section("Close codes")
    assert {int(c) for c in re.findall(r"^\|\s*`?(\d{4})`?", closes, re.M)} >= {
        int(c) for c in CloseCode
    }


def _examples() -> list[tuple[str, dict[str, object]]]:
    out = []
    for side, title in (("client", "Client messages"), ("server", "Server messages")):
        for block in re.findall(r"```json\n(.*?)```", _section(title), re.S):
            out.append((side, json.loads(block)))
    return out


EXAMPLES = _examples()


def test_every_type_has_an_example() -> None:
    seen = {(side, str(ex["type"])) for side, ex in EXAMPLES}
    want = {("client", t) for t in CLIENT_MESSAGES} | {("server", t) for t in SERVER_MESSAGES}
    assert want <= seen, f"types without examples: {sorted(want - seen)}"


@pytest.mark.parametrize(
    ("side", "example"), EXAMPLES, ids=[f"{s}-{e['type']}-{i}" for i, (s, e) in enumerate(EXAMPLES)]
)
def test_examples_validate(side: str, example: dict[str, object]) -> None:
    schema = json_schema(PROTOCOL)
    kinds = schema["$defs"][side]
    t = str(example["type"])
    assert t in kinds, f"{side} example of unknown type {t}"
    root = {k: v for k, v in schema.items() if k != "anyOf"}
    validator = jsonschema.Draft202012Validator({**root, "$ref": f"#/$defs/{side}/{t}"})
    errors = sorted(validator.iter_errors(example), key=str)
    assert not errors, errors[0].message


async def test_welcome_limits_are_the_documented_ones(
    server: TestServer, clients: Callable[..., Awaitable[Client]]
) -> None:
    """The limits a real `welcome` carries are the schema's Limits, all required, each named
    in the document's Shared objects and in its Limits table."""
    c = await clients(server, name="L")
    sent = set(c.welcome["limits"])
    schema = set(PROTOCOL.definitions["Limits"]["properties"])  # type: ignore[arg-type]
    assert sent == schema, sent ^ schema
    assert set(PROTOCOL.definitions["Limits"]["required"]) == schema  # type: ignore[arg-type]
    para = re.search(r"\*\*Limits\*\*.*?(?=\n\n)", _section("Shared objects"), re.S)
    assert para, "no **Limits** paragraph in Shared objects"
    named = set(re.findall(r"`([a-z_]+)`", para.group(0))) - {"welcome"}
    assert named == schema, named ^ schema
    limits = _section("Limits")
    for key in schema:
        assert f"`{key}`" in limits, key


def test_kicked_by_documents_the_api_value() -> None:
    from signaling.net.http_api import KICKED_BY_API

    section = re.search(r"^### `kicked`(.*?)(?=^### )", _section("Server messages"), re.M | re.S)
    assert section and f'`"{KICKED_BY_API}"`' in section.group(1)


def test_api_document_says_which_401_is_which() -> None:
    spec = json.loads((ROOT / "docs" / "openapi.json").read_text())
    desc = spec["info"]["description"]
    assert "`unauthorized`: the request has no `Authorization` header" in desc
    assert "`bad_credentials`: credentials were given but are wrong" in desc
    assert "every route but this document answers 403" in desc


def test_api_document_names_every_error_code() -> None:
    """The API description's list of error codes is the server's (the recording and media
    codes were missing from it)."""
    from signaling.net.http_api import API_ERRORS

    spec = json.loads((ROOT / "docs" / "openapi.json").read_text())
    desc = spec["info"]["description"]
    errors = re.search(r"\*\*Errors\*\*[^\n]*stable `code`: ([^\n]*)", desc)
    assert errors
    assert set(re.findall(r"`([a-z_]+)`", errors.group(1))) == set(API_ERRORS)


def test_operations_guide_lists_every_limit() -> None:
    """docs/OPERATIONS.md names every `[limits]` key and every per-address or timeout key of
    `[server]` (a new limit must be documented for operators)."""
    import dataclasses

    from signaling.config import LimitsSection, ServerSection

    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    keys = [f"limits.{f.name}" for f in dataclasses.fields(LimitsSection)]
    keys += [
        f"server.{f.name}"
        for f in dataclasses.fields(ServerSection)
        if f.name.endswith(("_per_address", "_timeout_s")) or f.name == "allowed_origins"
    ]
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, missing


def _message_section(type_: str) -> str:
    m = re.search(rf"^### `{type_}`(.*?)(?=^### |\Z)", _section("Client messages"), re.M | re.S)
    assert m, type_
    return m.group(1)


MEDIA_REQUESTS: list[dict[str, object]] = [
    {"type": "publish", "sdp": "v=0\r\n"},
    {"type": "subscribe"},
    {"type": "subscribe_answer", "sdp": "v=0\r\n"},
    {"type": "ice", "target": "publisher"},
    {"type": "track_mute", "track": "x:0", "muted": True},
    {"type": "track_pause", "track": "x:0", "paused": True},
    {"type": "track_render", "tracks": [{"track": "x:0", "width": 0, "height": 0}]},
    {"type": "unpublish", "track": "x:0"},
    {"type": "recording_start"},
    {"type": "recording_stop"},
]


@pytest.mark.parametrize("msg", MEDIA_REQUESTS, ids=[str(m["type"]) for m in MEDIA_REQUESTS])
async def test_media_errors_are_the_documented_ones(
    server: TestServer, clients: Callable[..., Awaitable[Client]], msg: dict[str, object]
) -> None:
    """A media request outside the room, and one in it on a server without media, gets an
    error its section of PROTOCOL.md lists (`ice`, `track_*` and `unpublish` listed only
    `bad_sdp` or `no_such_track`)."""
    from signaling.sdk.wsclient import ClientError

    c = await clients(server, name="M", identity="m")
    listed = set(re.findall(r"`([a-z_]+)`", _message_section(str(msg["type"]))))
    got = []
    for joined in (False, True):
        if joined:
            await c.request({"type": "join", "room": "media"})
        with pytest.raises(ClientError) as e:
            await c.request({**msg, "room": "media"})
        got.append(e.value.msg["code"])
    assert got[0] == "not_in_room"
    assert set(got) <= listed, (got, msg["type"])


def _rows(section: str) -> dict[str, tuple[str, str, str]]:
    """The field table of a client message's section: name -> (type, required, meaning)."""
    rows = re.findall(r"^\|\s*`([a-z_]+)`\s*\|([^|]*)\|([^|]*)\|(.*)\|\s*$", section, re.M)
    return {name: (ty.strip(), req.strip(), text.strip()) for name, ty, req, text in rows}


@pytest.mark.parametrize("type_", sorted(CLIENT_MESSAGES))
def test_client_field_tables_are_the_parsers(type_: str) -> None:
    """Each client message's table in PROTOCOL.md has exactly the parser's fields, with their
    JSON types, whether they are required, and every bound the parser enforces (lengths, item
    counts, maxima, enumerated values): a client written from the document sends what the
    server takes (`call_signal.candidate`'s 1,024 characters, `publish.tracks`' 16 and others
    were not written down)."""
    spec = CLIENT_MESSAGES[type_]
    rows = _rows(_message_section(type_))
    assert set(rows) == {f.name for f in spec.fields}
    for f in spec.fields:
        ty, req, text = rows[f.name]
        assert f.kind in ty, (f.name, ty)
        # "yes", "no", or a condition ("token mode", "for `offer`"): the parser's optional
        assert req.startswith("yes") == f.required, (f.name, req)
        for bound in (f.max_length, f.max_items, f.maximum, f.min_length, f.min_items):
            if bound is not None:
                assert str(bound) in text or f"{bound:,}" in text, (f.name, bound, text)
        for value in f.enum or ():
            assert f"`{value}`" in text or f'"{value}"' in text, (f.name, value)
