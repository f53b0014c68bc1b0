"""The SFU channel's messages (``sfu/channel.py``) are the ones docs/SFU.md lists."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from sfu import channel

DOC = (Path(__file__).resolve().parents[2] / "docs" / "SFU.md").read_text()


def _tags(union: object, key: str) -> dict[str, set[str]]:
    """Each message type of ``union``: its ``op``/``ev`` literal and its other fields."""
    out = {}
    for cls in typing.get_args(union):
        hints = typing.get_type_hints(cls)
        (tag,) = typing.get_args(hints[key])
        out[tag] = set(hints) - {key}
    return out


def _table(which: str) -> dict[str, str]:
    """The rows of the requests or the events table of docs/SFU.md's channel section."""
    section = DOC.split("## The channel", 1)[1].split("\n## ", 1)[0]
    requests, events = section.split("\nEvents (", 1)
    part = requests if which == "requests" else events
    rows = re.findall(r"^\| `([a-z_]+)` \| (.*?) \|", part, re.M)
    return {name: fields for name, fields in rows if name not in ("op", "ev")}  # not headers


def test_requests_are_documented_with_their_fields() -> None:
    code = _tags(channel.Request, "op")
    doc = _table("requests")
    assert set(code) == set(doc), set(code) ^ set(doc)
    for op, fields in code.items():
        for f in fields:
            assert f"`{f}`" in doc[op], (op, f)


def test_events_are_documented_with_their_fields() -> None:
    code = {**_tags(channel.WorkerEvent, "ev"), **_tags(channel.PoolEvent, "ev")}
    doc = _table("events")
    assert set(code) == set(doc), set(code) ^ set(doc)
    for ev, fields in code.items():
        for f in fields:
            assert f"`{f}`" in doc[ev], (ev, f)
