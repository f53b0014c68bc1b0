"""Sessions and connections.

A ``Connection`` is one WebSocket. A ``Session`` is one authenticated device; it outlives its
connection by the resume grace period so a client that reconnects keeps its rooms.

Outbox: frames are written straight into the connection's transport buffer, which is the
per-connection outbox. Nobody awaits a slow client: once the buffer holds more than
``max_outbox_bytes`` the connection is closed with 4008 and stops accepting frames, so the
server's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import struct
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .protocol import CloseCode, encode
from .ratelimit import TokenBucket

if TYPE_CHECKING:
    from .rooms import Participant
    from .tokens import Claims


def close_frame(code: int, reason: str) -> bytes:
    """An unmasked WebSocket close frame (RFC 6455 section 5.5.1)."""
    payload = struct.pack("!H", code) + reason.encode()[:120]
    return bytes((0x88, len(payload))) + payload


class Connection:
    """One WebSocket connection and its outbox."""

    # ``abandon``: seconds after the close frame until the transport is aborted if the client
    # still does not read.
    ABORT_AFTER_S = 2.0

    __slots__ = (
        "bucket",
        "busy",
        "closing",
        "counters",
        "drained",
        "last_recv",
        "limit",
        "session",
        "tail",
        "transport",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        limit: int,
        bucket: TokenBucket,
        now: float,
        counters: dict[str, int],
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.limit = limit
        self.bucket = bucket
        self.last_recv = now
        self.session: Session | None = None
        self.closing = False
        self.counters = counters
        self.busy = False  # the receive loop is handling a frame (later frames wait their turn)
        # While chat writes of this connection are in the store: the replies to requests made
        # after the latest of them, sent once it is done (the store finishes writes in order,
        # so None means none is pending); and the future that wakes the receive loop then.
        self.tail: list[bytes] | None = None
        self.drained: asyncio.Future[None] | None = None

    def write(self, frame: bytes) -> None:
        """Queue a complete frame; cut the connection off if its outbox is full."""
        if self.closing:
            return
        t = self.transport
        t.write(frame)
        if t.get_write_buffer_size() > self.limit:
            self.counters["slow_consumers"] += 1
            self.abandon(CloseCode.SLOW_CONSUMER, "outbox full: the client is not reading")

    def send(self, msg: dict[str, Any]) -> None:
        """Send a reply, after the replies to this connection's chat writes in flight."""
        tail = self.tail
        if tail is not None:
            tail.append(encode(msg))
        else:
            self.write(encode(msg))

    def settle(self, after: list[bytes]) -> None:
        """A chat write is done and answered: send the replies that waited for it (``after``,
        the list ``tail`` was when it went to the store); if it was the latest, none is
        pending now."""
        if self.tail is after:
            self.tail = None
            d = self.drained
            if d is not None:
                self.drained = None
                if not d.done():
                    d.set_result(None)
        for f in after:
            self.write(f)

    async def drain(self) -> None:
        """Wait until no chat write of this connection is pending."""
        while self.tail is not None:
            if self.drained is None:
                self.drained = asyncio.get_running_loop().create_future()
            await self.drained

    def abandon(self, code: int, reason: str) -> None:
        """Close without waiting on the client: a close frame behind whatever is queued, then
        abort shortly after if the client still does not read."""
        if self.closing:
            return
        self.closing = True
        t = self.transport
        if t.is_closing():
            return
        t.write(close_frame(code, reason))
        asyncio.get_running_loop().call_later(self.ABORT_AFTER_S, t.abort)

    async def close(self, code: int, reason: str) -> None:
        """Close politely (close handshake), falling back to ``abandon``."""
        if self.closing:
            return
        if self.transport.get_write_buffer_size() > self.limit // 2:
            self.abandon(code, reason)
            return
        self.closing = True
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), 3.0)
        except (TimeoutError, ConnectionError, RuntimeError):
            self.transport.abort()


class Session:
    """One authenticated device, with or without a live connection."""

    __slots__ = (
        "claims",
        "conn",
        "device",
        "expiry",
        "host",
        "id",
        "identity",
        "name",
        "resume_token",
        "rooms",
        "status",
        "watching",
    )

    def __init__(self, sid: str, claims: Claims, device: str, resume_token: str) -> None:
        self.id = sid
        self.claims = claims
        self.identity = claims.identity
        self.name = claims.name
        self.device = device
        self.resume_token = resume_token
        self.conn: Connection | None = None
        self.rooms: dict[str, Participant] = {}
        self.status = "online"
        self.watching: frozenset[str] = frozenset()
        self.expiry: asyncio.TimerHandle | None = None
        self.host = ""  # host the client connected to (for TURN URLs handed out later)

    def deliver(self, frame: bytes) -> None:
        """Bus sink: write to the live connection; frames for a suspended session are dropped
        (a resumed client gets room snapshots and catches up on chat with `sync`)."""
        c = self.conn
        if c is not None:
            c.write(frame)

    def send(self, msg: dict[str, Any]) -> None:
        c = self.conn
        if c is not None:
            c.write(encode(msg))
