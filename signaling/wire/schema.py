"""The JSON Schema of a ``Protocol`` (``docs/protocol.schema.json``; ``python -m signaling.app
schema`` prints the one of the whole server)."""

from __future__ import annotations

from typing import Any

from .errors import CloseCode
from .protocol import MAX_INTEGER, PROTOCOL_VERSION, Protocol
from .spec import Field, MessageSpec


def _field_schema(f: Field, protocol: Protocol, client: bool = False) -> dict[str, Any]:
    s: dict[str, Any] = {"description": f.doc}
    if f.ref is not None:
        target = f"#/$defs/server/{f.ref}" if f.ref in protocol.server else f"#/$defs/{f.ref}"
        if f.kind == "array":
            s.update(type="array", items={"$ref": target})
        else:
            s["$ref"] = target
        return s
    s["type"] = f.kind
    if f.pattern:
        s["pattern"] = f.pattern
    if f.max_length is not None:
        s["maxLength"] = f.max_length
    if f.min_length is not None:
        s["minLength"] = f.min_length
    if f.minimum is not None:
        s["minimum"] = f.minimum
    elif client and f.kind == "integer":  # the parser refuses integers beyond +-2^53
        s["minimum"] = -MAX_INTEGER
    if f.maximum is not None:
        s["maximum"] = f.maximum
    elif client and f.kind == "integer":
        s["maximum"] = MAX_INTEGER
    if f.enum is not None:
        s["enum"] = list(f.enum)
    if f.kind == "array" and f.items:
        item: dict[str, Any] = {"type": f.items}
        if f.item_pattern:
            item["pattern"] = f.item_pattern
        s["items"] = item
        if f.max_items is not None:
            s["maxItems"] = f.max_items
        if f.min_items is not None:
            s["minItems"] = f.min_items
    if f.kind == "object" and f.items:
        s["additionalProperties"] = {"type": f.items, "minimum": 0}
        if client and f.items == "integer":
            s["additionalProperties"]["maximum"] = MAX_INTEGER
        if f.key_pattern:
            s["propertyNames"] = {"pattern": f.key_pattern}
        if f.max_items is not None:
            s["maxProperties"] = f.max_items
    return s


def _message_schema(spec: MessageSpec, server: bool, protocol: Protocol) -> dict[str, Any]:
    props: dict[str, Any] = {"type": {"const": spec.type}}
    for f in spec.fields:
        props[f.name] = _field_schema(f, protocol, not server)
    return {
        "description": spec.doc,
        "type": "object",
        "required": ["type", *(f.name for f in spec.fields if f.required)],
        "properties": props,
        "additionalProperties": server,
    }


def json_schema(protocol: Protocol) -> dict[str, Any]:
    """The machine-readable description of ``protocol``."""
    client = {t: _message_schema(s, False, protocol) for t, s in protocol.client.items()}
    server = {t: _message_schema(s, True, protocol) for t, s in protocol.server.items()}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://rallypoint.invalid/protocol.schema.json",
        "title": f"Rallypoint WebSocket protocol v{PROTOCOL_VERSION}",
        "description": "A frame from the client validates against `#/$defs/clientMessage`, a "
        "frame from the server against `#/$defs/serverMessage`. See docs/PROTOCOL.md.",
        "$defs": {
            **protocol.definitions,
            "client": client,
            "server": server,
            "clientMessage": {"oneOf": [{"$ref": f"#/$defs/client/{t}"} for t in client]},
            "serverMessage": {"oneOf": [{"$ref": f"#/$defs/server/{t}"} for t in server]},
            "error_codes": {"enum": list(protocol.errors)},
            "close_codes": {"enum": [int(c) for c in CloseCode]},
        },
        "anyOf": [{"$ref": "#/$defs/clientMessage"}, {"$ref": "#/$defs/serverMessage"}],
    }
