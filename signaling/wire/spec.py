"""Message specifications: which fields each message type takes, as plain values.

A feature describes its client messages (validated on the way in), its server messages (for the
schema and the document), its error codes and its named schema definitions in one ``Messages``
value and hands it to the composition root (``signaling.app``); nothing here is a shared table
that importing a module changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

ROOM_PATTERN: Final = r"^[A-Za-z0-9_.~-]{1,64}$"
IDENTITY_PATTERN: Final = r"^[A-Za-z0-9_.@+~-]{1,128}$"
_ID_BODY = r"[A-Za-z0-9_.@+~-]{1,128}"
CONVERSATION_PATTERN: Final = (
    rf"^(room:[A-Za-z0-9_.~-]{{1,64}}|dm:{_ID_BODY}\|{_ID_BODY}|group:[A-Za-z0-9_-]{{1,64}})$"
)
GROUP_PATTERN: Final = r"^group:[A-Za-z0-9_-]{1,64}$"
TOKEN_PATTERN: Final = r"^[\x21-\x7e]{1,64}$"  # client ids, device ids, request ids

_COMPILED: dict[str, re.Pattern[str]] = {}


def compiled(p: str) -> re.Pattern[str]:
    """``re.compile(p)``, cached (patterns are few and reused on every frame)."""
    c = _COMPILED.get(p)
    if c is None:
        c = _COMPILED[p] = re.compile(p)
    return c


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: its JSON type and constraints."""

    name: str
    kind: str  # "string" | "integer" | "boolean" | "object" | "array"
    doc: str
    required: bool = False
    pattern: str | None = None
    max_length: int | None = None
    min_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] | None = None
    items: str | None = None  # item kind for arrays / value kind for objects
    max_items: int | None = None
    min_items: int | None = None
    item_pattern: str | None = None
    key_pattern: str | None = None  # objects with `items`: the pattern of their keys
    ref: str | None = None  # for server messages: a named schema definition


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """A message type and its fields."""

    type: str
    doc: str
    fields: tuple[Field, ...] = ()
    by_name: dict[str, Field] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.by_name.update({f.name: f for f in self.fields})


@dataclass(frozen=True, slots=True)
class Messages:
    """What one feature adds to the protocol."""

    client: tuple[MessageSpec, ...] = ()
    server: tuple[MessageSpec, ...] = ()
    errors: Mapping[str, str] = field(default_factory=dict)
    definitions: Mapping[str, dict[str, Any]] = field(default_factory=dict)


REQUEST_ID: Final = Field(
    "id",
    "string",
    "Request id chosen by the client; echoed as `re` in the reply.",
    pattern=TOKEN_PATTERN,
)


def request(type_: str, doc: str, *fields: Field) -> MessageSpec:
    """A client message; it takes an optional request ``id`` besides ``fields``."""
    return MessageSpec(type_, doc, (*fields, REQUEST_ID))


def event(type_: str, doc: str, *fields: Field) -> MessageSpec:
    """A server message."""
    return MessageSpec(type_, doc, fields)


def out(
    name: str,
    kind: str,
    doc: str,
    *,
    required: bool = True,
    ref: str | None = None,
    items: str | None = None,
    enum: tuple[str, ...] | None = None,
) -> Field:
    """A field of a server message (required unless said otherwise)."""
    return Field(name, kind, doc, required=required, ref=ref, items=items, enum=enum)


#: The `re` field of a reply.
RE: Final = out("re", "string", "The `id` of the request this answers.", required=False)
