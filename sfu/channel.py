"""The local channel between the signaling process and an SFU worker: length-prefixed JSON
frames over a Unix socket pair. Requests carry an ``id`` and get one reply with that ``id``;
events carry ``ev`` and no ``id``."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson

LENGTH = struct.Struct("!I")
MAX_FRAME = 4 * 1024 * 1024


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next frame, or None at end of stream."""
    try:
        head = await reader.readexactly(4)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    (n,) = LENGTH.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"channel frame of {n} bytes")
    try:
        body = await reader.readexactly(n)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    msg: dict[str, Any] = orjson.loads(body)
    return msg


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = orjson.dumps(msg)
    return LENGTH.pack(len(body)) + body
