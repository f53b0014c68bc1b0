"""A client connection: one WebSocket and its outbox (the core's ``Link``).

Outbox: frames are written straight into the connection's transport buffer, which is the
per-connection outbox. Nobody awaits a slow client: once the buffer holds more than
``max_outbox_bytes`` the connection is closed with 4008 and stops accepting frames, so the
server's memory stays bounded. While a ``WriteBatch`` is held (the store settling a
transaction's results, the bus handing on a read's frames), a connection keeps its frames and
writes them in one go when the batch ends (``signaling.core.writes``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..core.metrics import HubCounters
from ..core.ratelimit import TokenBucket
from ..core.session import Session
from ..core.writes import WriteBatch
from ..wire.encodings import Transcoder
from ..wire.errors import CloseCode
from ..wire.framing import close_frame, encode


class Connection:
    """One WebSocket connection and its outbox."""

    # ``abandon``: seconds after the close frame until the transport is aborted if the client
    # still does not read.
    ABORT_AFTER_S = 2.0

    __slots__ = (
        "batch",
        "bucket",
        "busy",
        "closing",
        "counters",
        "drained",
        "flood",
        "kept",
        "last_recv",
        "limit",
        "parsed",
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
        counters: HubCounters,
        batch: WriteBatch | None = None,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.limit = limit
        self.bucket = bucket
        # Frames refused for the rate this connection may still send before it is closed
        # (refills at the rate; ``Endpoint._rate_limited``).
        self.flood: TokenBucket | None = None
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
        # A frame the fast path parsed but left to the receive loop, with its message (so the
        # loop does not parse it again); at most one is in the queue at a time.
        self.parsed: tuple[bytes, dict[str, Any]] | None = None
        # The hub's ``WriteBatch`` and, while it is held, the frames written meanwhile.
        self.batch = batch if batch is not None else WriteBatch()
        self.kept: list[bytes] | None = None

    def write(self, frame: bytes) -> None:
        """Queue a complete frame (kept until the end of a batch being held); cut the
        connection off if its outbox is full."""
        if self.closing:
            return
        if self.batch.depth:
            kept = self.kept
            if kept is None:
                self.kept = [frame]
                self.batch.hold(self)
            else:
                kept.append(frame)
            return
        self._put(frame)

    def flush(self) -> None:
        """Write the frames kept during a batch, as one write."""
        kept = self.kept
        if kept is None:
            return
        self.kept = None
        if not self.closing:
            self._put(kept[0] if len(kept) == 1 else b"".join(kept))

    def _put(self, frame: bytes) -> None:
        t = self.transport
        try:
            t.write(frame)
        except RuntimeError:
            # uvloop refuses writes to a transport the client has closed (asyncio's drops
            # them): the receive loop sees the close and ends the session; nothing to send.
            self.closing = True
            return
        if t.get_write_buffer_size() > self.limit:
            self.counters.slow_consumers += 1
            self.abandon(CloseCode.SLOW_CONSUMER, "outbox full: the client is not reading")

    def write_message(self, msg: dict[str, Any]) -> None:
        """Encode ``msg`` for this connection and write it."""
        self.write(encode(msg))

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
        self.flush()  # what was written before the close goes before it
        if self.closing:  # that write found the outbox full: closed already
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
        self.flush()
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


class PackedConnection(Connection):
    """A connection that chose MessagePack (``rallypoint.msgpack``): the core's JSON text
    frames are converted to binary frames on the way into its outbox (once per message for
    every such connection, by the shared ``Transcoder``), its own replies packed directly."""

    __slots__ = ("transcode",)

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        limit: int,
        bucket: TokenBucket,
        now: float,
        counters: HubCounters,
        transcode: Transcoder,
        batch: WriteBatch | None = None,
    ) -> None:
        super().__init__(ws, transport, limit, bucket, now, counters, batch)
        self.transcode = transcode

    def write(self, frame: bytes) -> None:
        # Once per delivery: the fan-out's frame was converted for the first recipient, so
        # look at the transcoder's last frame here, and call the base directly (``super()``
        # costs an object per call): 190 ns against a JSON connection's 112, not 432.
        if frame[0] == 0x81:  # a text frame: JSON from the core
            t = self.transcode
            frame = t.last_packed if frame is t.last_json else t(frame)
        _write(self, frame)

    def write_message(self, msg: dict[str, Any]) -> None:
        _write(self, self.transcode.pack(msg))

    def send(self, msg: dict[str, Any]) -> None:
        tail = self.tail
        if tail is not None:
            tail.append(self.transcode.pack(msg))
        else:
            _write(self, self.transcode.pack(msg))


_write = Connection.write
