"""Close codes, the one exception a refused request raises, and the error codes of the wire
layer itself (every feature adds its own through its ``Messages``)."""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (RFC 6455 section 7.4 plus the 4000-4999 range)."""

    NORMAL = 1000  # the client said bye
    GOING_AWAY = 1001  # the server is shutting down
    PROTOCOL_ERROR = 1002  # a client frame broke RFC 6455 (e.g. it was not masked)
    MESSAGE_TOO_BIG = 1009  # a frame beyond the hard frame cap
    AUTH_FAILED = 4001  # hello rejected: bad, expired or missing token, bad version
    HEARTBEAT_TIMEOUT = 4002  # 2.5 heartbeat intervals without a message (two missed pings)
    HELLO_TIMEOUT = 4003  # no valid hello in time
    REPLACED = 4004  # the session was resumed on another connection
    SLOW_CONSUMER = 4008  # the client stopped reading; its outbox is full
    FLOODING = 4029  # the client kept sending far above its rate limit


#: Errors any frame can get, whatever features the server has.
WIRE_ERRORS: Final[dict[str, str]] = {
    "bad_json": "The frame is not valid UTF-8 JSON.",
    "bad_msgpack": "The binary frame (on a `rallypoint.msgpack` connection) is not one "
    "MessagePack value in JSON's data model: not MessagePack, something after the value, a "
    "bin or ext value, a non-string key, a non-finite float, or nesting too deep.",
    "bad_message": "The frame is not an object (a map) with a string `type`, or is of the "
    "wrong kind for the connection: binary on JSON, text on MessagePack.",
    "unknown_type": "No client message has this `type`.",
    "bad_field": "A field is missing, has the wrong type or value, or is not part of the message.",
    "frame_too_large": "The frame is larger than `welcome.limits.max_frame_bytes` (frames "
    "larger than `welcome.limits.hard_frame_bytes` close the connection with 1009 instead).",
    "rate_limited": "Too many messages; retry after `retry_after_ms`.",
    "internal_error": "The server failed; nothing was stored. Retrying is safe.",
}


class ProtocolError(Exception):
    """A request the server refuses; becomes an ``error`` message (and maybe a close).

    ``code`` is one of the documented error codes (``Protocol.errors``; a test checks every code
    the server raises against them)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        close: CloseCode | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.retry_after_ms = retry_after_ms
        self.re: str | None = None  # the request id, when the frame had a usable one
