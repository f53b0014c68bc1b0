"""The one codec of the store writer's socket (``signaling.chat.sqlite`` <-> ``.writer``).

Both ends import these functions, so the request and result formats are defined once:

- a request is one JSON array per line: an op letter, then the fields of its value in the order
  of the dataclass (``NewMessage`` for an append, ``MarkRead``, ``TouchDevice``,
  ``RegisterIdentity``, ``ChangeRelation``);
- a transaction's answer is one line: a JSON array with a result per request, in request order;
  a result is ``[1, value]``, or ``[0, code, message]`` for a refusal (a ``ProtocolError``) or a
  failure, with a fourth element, ``retry_after_ms``, when there is one; an append's value is
  the stored row (the fields of ``StoredMessage`` in order) and the duplicate flag; a relation
  change's is the pair before and after (``Pair.to_list``, twice);
- the writer's first line is ``["ready", epoch]`` or ``["fail", reason]``;
- between answers, ``["full", 1]``: the writer hit a full disk (one line per ENOSPC), and
  ``["full", 0]``: space is back.

``tests/test_store.py`` round-trips every value through it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ..core.privacy import Pair
from ..wire.errors import ProtocolError
from .groups import ChangeGroup, GroupState
from .store import GroupResult, NewMessage, StoredMessage

#: The columns of a stored message, in ``StoredMessage`` order (SELECTs list them so).
ROW_FIELDS: Final = tuple(f.name for f in dataclasses.fields(StoredMessage))
COLUMNS: Final = ", ".join(ROW_FIELDS)


@dataclass(slots=True)
class MarkRead:
    conversation: str
    identity: str
    seq: int


@dataclass(slots=True)
class TouchDevice:
    identity: str
    device: str
    name: str
    now_ms: int


@dataclass(slots=True)
class RegisterIdentity:
    identity: str
    now_ms: int


@dataclass(slots=True)
class SetMute:
    identity: str
    conversation: str
    muted: bool


@dataclass(slots=True)
class ChangeRelation:
    """``actor`` does ``action`` toward ``other`` (``signaling.core.privacy.plan``)."""

    action: str
    actor: str
    other: str
    now_ms: int
    max_pending: int  # contact requests ``actor`` may have waiting


WriterRequest = (
    NewMessage | MarkRead | TouchDevice | RegisterIdentity | ChangeGroup | SetMute | ChangeRelation
)
Result = list[Any]  # [1, value] | [0, code, message]

_OPS: Final[dict[type, str]] = {
    NewMessage: "a",
    MarkRead: "r",
    TouchDevice: "d",
    RegisterIdentity: "i",
    ChangeGroup: "g",
    SetMute: "m",
    ChangeRelation: "c",
}
_TYPES: Final = {op: t for t, op in _OPS.items()}


def append_request(m: NewMessage) -> bytes:
    """An append as a request line (the chat hot path: fields spelled out, no reflection)."""
    return (
        orjson.dumps(
            (
                "a",
                m.conversation,
                m.cid,
                m.sender,
                m.name,
                m.kind,
                m.text,
                m.ref,
                m.members,
                m.moderator,
                m.edit_window_ms,
                m.meta,
                m.hidden_from,
                m.contact_required,
            )
        )
        + b"\n"
    )


def encode_request(req: WriterRequest) -> bytes:
    if type(req) is NewMessage:
        return append_request(req)
    values = (getattr(req, f.name) for f in dataclasses.fields(req))
    return orjson.dumps((_OPS[type(req)], *values)) + b"\n"


def decode_request(line: bytes) -> WriterRequest:
    op, *args = orjson.loads(line)
    if op == "a":
        args[7] = tuple(args[7])  # members: JSON has no tuples
    req: WriterRequest = _TYPES[op](*args)
    return req


def ok(value: Any) -> Result:
    return [1, value]


def refused(err: ProtocolError) -> Result:
    return failed(err.code, err.message, err.retry_after_ms)


def failed(code: str, message: str, retry_after_ms: int | None = None) -> Result:
    if retry_after_ms is None:
        return [0, code, message]
    return [0, code, message, retry_after_ms]


def row(
    conversation: str,
    seq: int,
    mid: int,
    cid: str,
    sender: str,
    name: str,
    kind: str,
    text: str | None,
    ref: int | None,
    ts: int,
    meta: str | None,
    duplicate: bool,
    hidden_from: str | None = None,
) -> list[Any]:
    """An append's value: the stored message's fields in ``StoredMessage`` order, then the
    duplicate flag (the writer's per-message path: no object, no reflection)."""
    return [
        conversation,
        seq,
        mid,
        cid,
        sender,
        name,
        kind,
        text,
        ref,
        ts,
        meta,
        hidden_from,
        duplicate,
    ]


def encode_row(m: StoredMessage, duplicate: bool) -> list[Any]:
    return row(
        m.conversation,
        m.seq,
        m.mid,
        m.cid,
        m.sender,
        m.name,
        m.kind,
        m.text,
        m.ref,
        m.ts,
        m.meta,
        duplicate,
        m.hidden_from,
    )


def decode_row(value: list[Any]) -> tuple[StoredMessage, bool]:
    return StoredMessage(*value[:-1]), value[-1]


def group_value(
    row: list[Any], duplicate: bool, state: GroupState, gone: tuple[str, ...]
) -> list[Any]:
    """A group change's value: the event's row (``row``, duplicate flag last), the group as it
    is now, and who left it with this change."""
    members = [[i, r] for i, r in state.members.items()]
    return [
        [*row[:-1], duplicate],
        [state.conversation, state.name, state.created_by, members, state.deleted],
        list(gone),
    ]


def decode_group_value(value: list[Any]) -> GroupResult:
    stored, duplicate = decode_row(value[0])
    conv, name, created_by, members, deleted = value[1]
    state = GroupState(conv, name, created_by, {i: r for i, r in members}, deleted)
    return GroupResult(stored, duplicate, state, tuple(value[2]))


def relation_value(before: Pair, after: Pair) -> list[Any]:
    """A relation change's value: the pair before and after it."""
    return [before.to_list(), after.to_list()]


def decode_relation_value(value: list[Any]) -> tuple[Pair, Pair]:
    return Pair.from_list(value[0]), Pair.from_list(value[1])


def encode_results(results: list[Result]) -> bytes:
    return orjson.dumps(results) + b"\n"


def decode_results(line: bytes) -> list[Result]:
    results: list[Result] = orjson.loads(line)
    return results


def decode_result(r: Result, row: bool) -> Any:
    """A result's value (an append's as ``(StoredMessage, duplicate)``), or the refusal as a
    ``ProtocolError`` (returned, not raised)."""
    if not r[0]:
        return ProtocolError(r[1], r[2], retry_after_ms=r[3] if len(r) > 3 else None)
    return decode_row(r[1]) if row else r[1]


def ready_line(epoch: str) -> bytes:
    return orjson.dumps(["ready", epoch]) + b"\n"


def fail_line(reason: str) -> bytes:
    return orjson.dumps(["fail", reason]) + b"\n"


def full_line(full: bool) -> bytes:
    return b'["full", 1]\n' if full else b'["full", 0]\n'
