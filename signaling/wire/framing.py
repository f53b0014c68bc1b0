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


# The last frame ``encode_fresh`` made and its message. Held (not weak), so the frame's
# identity cannot be taken by another object while it is here.
_last_fresh: tuple[bytes, dict[str, Any]] = (b"", {})


def encode_fresh(msg: dict[str, Any]) -> bytes:
    """``encode(msg)`` for a message made for this call, which nobody changes afterwards (a
    dict literal, ``to_wire()``): the frame and the message are kept until the next call, so
    a MessagePack connection receiving this frame packs the message instead of parsing the
    frame back (``encodings.Transcoder``). The JSON path pays one tuple for it.

    Only for such messages: one changed after it was encoded would be packed as it is then,
    not as the frame says.
    """
    global _last_fresh
    f = frame(orjson.dumps(msg))
    _last_fresh = (f, msg)
    return f


def last_fresh() -> tuple[bytes, dict[str, Any]]:
    """The last frame ``encode_fresh`` made, with its message."""
    return _last_fresh


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
