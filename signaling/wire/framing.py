"""Server frames as bytes: a message is serialized and framed once for all its recipients."""

from __future__ import annotations

import struct
from typing import Any

import orjson

from .errors import ProtocolError


def frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in an unmasked, final WebSocket text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def binary_frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in an unmasked, final WebSocket binary frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x82, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x82, 126, n) + payload
    return struct.pack("!BBQ", 0x82, 127, n) + payload


def encode(msg: dict[str, Any]) -> bytes:
    """Serialize a server message into a ready-to-write WebSocket frame."""
    return frame(orjson.dumps(msg))


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked WebSocket close frame (RFC 6455 section 5.5.1)."""
    payload = struct.pack("!H", code) + reason.encode()[:120]
    return bytes((0x88, len(payload))) + payload


def error_message(err: ProtocolError, re_: Any = None) -> dict[str, Any]:
    """The ``error`` message for ``err``, answering request ``re_`` (or ``err.re``) if known."""
    out: dict[str, Any] = {"type": "error", "code": err.code, "message": err.message}
    if err.retry_after_ms is not None:
        out["retry_after_ms"] = err.retry_after_ms
    if re_ is None:
        re_ = err.re
    if re_ is not None:
        out["re"] = re_
    return out
