"""The protocol document matches the server: every handled type is documented, every documented
type is handled, and every example validates against the JSON Schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

import signaling.server  # noqa: F401  (registers every feature's handlers: calls, media)
from signaling.hub import HANDLERS
from signaling.protocol import CLIENT_MESSAGES, ERROR_CODES, SERVER_MESSAGES, CloseCode, json_schema

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "PROTOCOL.md").read_text()


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", DOC, re.M | re.S)
    assert m, f"docs/PROTOCOL.md has no section '## {title}'"
    return m.group(1)


def _headings(section: str) -> set[str]:
    return set(re.findall(r"^### `([a-z_]+)`\s*$", section, re.M))


def test_client_messages_documented_and_handled() -> None:
    documented = _headings(_section("Client messages"))
    assert documented == set(HANDLERS), (
        f"undocumented: {set(HANDLERS) - documented}, not handled: {documented - set(HANDLERS)}"
    )
    assert set(HANDLERS) == set(CLIENT_MESSAGES)


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
    schema = json_schema()
    kinds = schema["$defs"][side]
    t = str(example["type"])
    assert t in kinds, f"{side} example of unknown type {t}"
    root = {k: v for k, v in schema.items() if k != "anyOf"}
    validator = jsonschema.Draft202012Validator({**root, "$ref": f"#/$defs/{side}/{t}"})
    errors = sorted(validator.iter_errors(example), key=str)
    assert not errors, errors[0].message
