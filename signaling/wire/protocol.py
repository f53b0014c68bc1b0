"""The protocol of one server: every feature's messages merged, and client frames validated.

``Protocol`` is built once by the composition root from the features' ``Messages``; it refuses
two features defining the same message type, error code or definition, and a server message
that refers to a definition nobody defines. ``Protocol.parse`` is on the per-frame path: the
checks of every field are built once, here, and a valid value passes a one-line test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson

from .encodings import bad_msgpack, is_plain, unpack
from .errors import WIRE_ERRORS, ProtocolError
from .spec import RE, TOKEN_PATTERN, Field, Messages, MessageSpec, compiled, event, out

PROTOCOL_VERSION: Final = 1

# The `id` of a frame too large to read (`frame_too_large`), found without reading the frame:
# only where its place proves it is the top-level object's `id` (see ``unread_request_id``).
_WS = rb"[ \t\r\n]*"
_ID_VALUE = rb'"([\x21\x23-\x5b\x5d-\x7e]{1,64})"'  # a request id needing no escape
_JSON_HEAD = re.compile(
    rb"\A" + _WS + rb"\{" + _WS + rb'"id"' + _WS + rb":" + _WS + _ID_VALUE + _WS + rb"[,}]"
)
_JSON_TAIL = re.compile(
    rb"[{,]" + _WS + rb'"id"' + _WS + rb":" + _WS + _ID_VALUE + _WS + rb"\}" + _WS + rb"\Z"
)
_PACKED_HEAD = re.compile(
    rb"\A(?:[\x81-\x8f]|\xde..|\xdf....)\xa2id(?:[\xa1-\xbf]|\xd9[\x20-\x40])", re.S
)
_EDGE = 256  # bytes looked at, at each end


def unread_request_id(data: bytes, packed: bool) -> str | None:
    """The request id of a frame too large to be read, if it can be told from the frame's
    first or last ``_EDGE`` bytes alone, so that its `frame_too_large` answers the request.

    JSON: the frame starts with ``{"id": "<id>"`` followed by ``,`` or ``}``, or ends with
    ``,"id": "<id>"}`` (whitespace allowed): in a JSON text, a string right after the opening
    brace, or right before the closing brace of the top-level object, followed (preceded) by a
    colon, is that object's member, whatever the rest holds (a quote inside a string is escaped,
    and neither place has a backslash). Both SDKs put `id` last. MessagePack: the frame starts
    with a map whose first key is ``id`` and its value a string (a packed frame's end says
    nothing about nesting). An id with a quote or a backslash is not looked for."""
    if packed:
        head = _PACKED_HEAD.match(data, 0, _EDGE)
        if head is None:
            return None
        start = head.end()  # the value's bytes; before: a fixstr byte, or str8's and its length
        n = data[start - 1] if data[start - 2] == 0xD9 else data[start - 1] - 0xA0
        rid = data[start : start + n]
        if len(rid) != n or not all(0x21 <= b <= 0x7E for b in rid):
            return None
        return rid.decode("ascii")
    m = _JSON_HEAD.match(data[:_EDGE]) or _JSON_TAIL.search(data[-_EDGE:])
    return None if m is None else m.group(1).decode("ascii")


#: What every server has, whatever its features: the generic replies and the wire errors.
WIRE_MESSAGES: Final = Messages(
    server=(
        event("ok", "A request succeeded and has no other answer.", RE),
        event(
            "error",
            "A request failed or a frame was refused.",
            out("code", "string", "Stable error code."),
            out("message", "string", "Human-readable explanation."),
            out(
                "retry_after_ms",
                "integer",
                "With a retryable refusal (`rate_limited`, `store_full`, `store_unavailable`): "
                "when to retry, in ms.",
                required=False,
            ),
            RE,
        ),
    ),
    errors=WIRE_ERRORS,
)

_JSON_TYPES: Final[dict[str, type]] = {
    "string": str,
    "integer": int,
    "boolean": bool,
    "object": dict,
    "array": list,
}
MAX_INTEGER: Final = 2**53  # JSON numbers are exact up to here in every client


def _is_kind(value: Any, kind: str) -> bool:
    return type(value) is _JSON_TYPES[kind]


def _check_value(f: Field, value: Any, where: str) -> None:
    """Raise the ``bad_field`` error that says what is wrong with ``value``."""
    kind = f.kind
    # bool is an int in Python; JSON keeps them apart.
    if kind == "integer":
        if type(value) is not int:
            raise ProtocolError("bad_field", f"`{where}` must be an integer")
        if f.minimum is not None and value < f.minimum:
            raise ProtocolError("bad_field", f"`{where}` must be >= {f.minimum}")
        if f.maximum is not None and value > f.maximum:
            raise ProtocolError("bad_field", f"`{where}` must be <= {f.maximum}")
        if not -MAX_INTEGER <= value <= MAX_INTEGER:  # as the fast check: both signs
            raise ProtocolError("bad_field", f"`{where}` is too large")
        return
    if not _is_kind(value, kind):
        raise ProtocolError(
            "bad_field", f"`{where}` must be a{'n' if kind[0] in 'aeiou' else ''} {kind}"
        )
    if kind == "string":
        if f.pattern is not None and compiled(f.pattern).match(value) is None:
            raise ProtocolError("bad_field", f"`{where}` has a bad format")
        if f.enum is not None and value not in f.enum:
            raise ProtocolError("bad_field", f"`{where}` must be one of {', '.join(f.enum)}")
        if f.max_length is not None and len(value) > f.max_length:
            raise ProtocolError("bad_field", f"`{where}` is longer than {f.max_length}")
        if f.min_length is not None and len(value) < f.min_length:
            raise ProtocolError("bad_field", f"`{where}` is shorter than {f.min_length}")
    elif kind == "array":
        if f.max_items is not None and len(value) > f.max_items:
            raise ProtocolError("bad_field", f"`{where}` has more than {f.max_items} items")
        if f.min_items is not None and len(value) < f.min_items:
            raise ProtocolError("bad_field", f"`{where}` has fewer than {f.min_items} items")
        item = Field(f.name, f.items or "string", "", pattern=f.item_pattern)
        for v in value:
            _check_value(item, v, f"{where}[]")
    elif kind == "object":
        if f.max_items is not None and len(value) > f.max_items:
            raise ProtocolError("bad_field", f"`{where}` has more than {f.max_items} entries")
        if f.items is None:  # free-form object: the handler checks what it uses
            return
        item = Field(f.name, f.items, "", minimum=0)
        for k, v in value.items():
            if f.key_pattern is not None and compiled(f.key_pattern).match(k) is None:
                raise ProtocolError("bad_field", f"`{where}` has a bad key")
            _check_value(item, v, f"{where}.{k}")


def _fast_check(f: Field) -> Callable[[Any], bool]:
    """A check that says True quickly for a valid value of ``f``; on False the full
    ``_check_value`` decides (and words the error)."""
    kind = f.kind
    if kind == "string":
        check = _fast_string(f)
        shortest = f.min_length
        if shortest is None:  # most fields: no lower bound to check
            return check
        return lambda v: check(v) and len(v) >= shortest
    if kind == "boolean":
        return lambda v: type(v) is bool
    if kind == "integer":
        low = f.minimum if f.minimum is not None else -MAX_INTEGER
        high = min(f.maximum, MAX_INTEGER) if f.maximum is not None else MAX_INTEGER
        return lambda v: type(v) is int and low <= v <= high
    return lambda v: False  # arrays and objects: always the full check


def _fast_string(f: Field) -> Callable[[Any], bool]:
    """``_fast_check`` of a string field, but for its ``min_length``."""
    match = compiled(f.pattern).match if f.pattern is not None else None
    longest = f.max_length if f.max_length is not None else 1 << 62
    enum = f.enum
    if enum is not None:
        return lambda v: (
            type(v) is str
            and v in enum
            and len(v) <= longest
            and (match is None or match(v) is not None)
        )
    if match is None:
        return lambda v: type(v) is str and len(v) <= longest
    return lambda v: type(v) is str and len(v) <= longest and match(v) is not None


def _merge(into: dict[str, Any], items: Iterable[tuple[str, Any]], what: str) -> None:
    for key, value in items:
        if key in into:
            raise ValueError(f"two features define the {what} {key!r}")
        into[key] = value


class Protocol:
    """Every message, error code and schema definition of one server."""

    def __init__(self, parts: Iterable[Messages]) -> None:
        self.client: dict[str, MessageSpec] = {}
        self.server: dict[str, MessageSpec] = {}
        self.errors: dict[str, str] = {}
        self.definitions: dict[str, dict[str, Any]] = {}
        for part in (WIRE_MESSAGES, *parts):
            _merge(self.client, ((s.type, s) for s in part.client), "client message")
            _merge(self.server, ((s.type, s) for s in part.server), "server message")
            _merge(self.errors, part.errors.items(), "error code")
            _merge(self.definitions, part.definitions.items(), "schema definition")
        for spec in self.server.values():
            for f in spec.fields:
                if f.ref is not None and f.ref not in self.definitions and f.ref not in self.server:
                    raise ValueError(f"`{spec.type}.{f.name}` refers to unknown {f.ref!r}")
        self._checks: dict[str, dict[str, Callable[[Any], bool]]] = {
            t: {f.name: _fast_check(f) for f in spec.fields} for t, spec in self.client.items()
        }
        self._request_id = compiled(TOKEN_PATTERN).match

    def parse(self, data: bytes | str) -> dict[str, Any]:
        """Decode and validate one JSON client frame; raise ``ProtocolError`` on any problem
        (with ``re`` set whenever the frame is an object with a readable ``id``).

        Unknown fields are refused rather than ignored: a client cannot set fields the server
        owns (such as ``from``), and typos surface at once.
        """
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProtocolError("bad_json", "the frame is not valid JSON") from None
        if type(msg) is not dict:
            raise ProtocolError("bad_message", "a message must be a JSON object")
        return self._validate(msg, False)

    def parse_msgpack(self, data: bytes) -> dict[str, Any]:
        """``parse`` for a MessagePack client frame (``encodings``): the same checks, the same
        errors, and ``bad_msgpack`` for what JSON could not have said."""
        msg = unpack(data)
        if type(msg) is not dict:
            raise ProtocolError("bad_message", "a message must be a MessagePack map")
        return self._validate(msg, True)

    def _validate(self, msg: dict[Any, Any], packed: bool) -> dict[str, Any]:
        """Check a decoded message against its spec. A value that fails its field's one-line
        test gets the full check; for MessagePack (``packed``) that first checks it is in
        JSON's data model, so the JSON path pays nothing for it and a valid MessagePack value
        of a string, integer or boolean field nothing either."""
        try:
            type_ = msg.get("type")
            if type(type_) is not str:
                if packed and not is_plain(type_):
                    raise bad_msgpack()
                raise ProtocolError("bad_message", "a message needs a string `type`")
            checks = self._checks.get(type_)
            if checks is None:
                raise ProtocolError("unknown_type", f"unknown message type {type_[:40]!r}")
            for key, value in msg.items():
                if key == "type":
                    continue
                check = checks.get(key)
                if check is None:
                    if packed and type(key) is not str:
                        raise bad_msgpack()
                    raise ProtocolError("bad_field", f"`{key[:40]}` is not a field of `{type_}`")
                if not check(value):
                    if packed and not is_plain(value):
                        raise bad_msgpack()
                    _check_value(self.client[type_].by_name[key], value, key)
            for f in self.client[type_].fields:
                if f.required and f.name not in msg:
                    raise ProtocolError("bad_field", f"`{type_}` needs `{f.name}`")
        except ProtocolError as e:
            if packed and e.code != "bad_msgpack" and not is_plain(msg):
                # A value JSON could not have said, in a field that was never checked (an
                # unknown type or field, or one after the refused one): `bad_msgpack`, as
                # documented, not the error its JSON twin would get.
                e = bad_msgpack()
            rid = msg.get("id")
            if type(rid) is str and self._request_id(rid):
                e.re = rid
            raise e from None
        return msg
