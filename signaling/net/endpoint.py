"""The WebSocket endpoint (``GET /ws``): the hello handshake and each connection's receive
loop. A thin edge: frames are validated by the ``Protocol`` and handed to the handlers the
features registered with ``signaling.app``.

A connection speaks JSON (text frames) unless the client offered the ``rallypoint.msgpack``
subprotocol (``wire.encodings``): then binary MessagePack frames, the same messages, parsed by
``Protocol.parse_msgpack``; a frame of the other kind is refused (``bad_message``).

The hot path (a chat frame): ``fastws`` offers each data frame to ``_sink`` inside aiohttp's
``data_received``; a frame of an inline type (``send``, ``edit``, ``delete``) is parsed and its
handler runs there, handing the write to the store without a task switch. Anything else goes to
``_serve`` (the connection's task), which waits for the connection's chat writes in flight
before it handles the frame, so replies keep request order.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from ..config import Config
from ..core.feature import Handler
from ..core.gc import GcMonitor
from ..core.hub import Hub
from ..core.metrics import Metric
from ..core.ratelimit import TokenBucket
from ..wire.encodings import MSGPACK, SUBPROTOCOLS, Transcoder
from ..wire.errors import CloseCode, ProtocolError
from ..wire.protocol import Protocol, unread_request_id
from .connection import Connection, PackedConnection
from .fastws import FastWebSocket, available

log = logging.getLogger("rallypoint.server")

_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)
NOT_TEXT = ProtocolError("bad_message", "frames must be text (JSON) on this connection")
NOT_BINARY = ProtocolError("bad_message", "frames must be binary (MessagePack) on this connection")
# Not sent: the connection is closed with 4029 instead (``Endpoint._rate_limited``).
FLOODING = ProtocolError("rate_limited", "far above the rate limit")
FAST_WS = available()


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    """Whether a page from ``Origin`` may open ``/ws`` (browsers send it; other clients may not).

    The configured origins, exactly; with none configured, pages served from a loopback address
    (``localhost``, 127.0.0.0/8, ::1) or from this server's own address written as an IP (the
    origin's host is the request's host and is an IP literal). Comparing the origin with the
    request's own host name is not enough: DNS rebinding points an attacker's name at this
    server, and the browser then sends that name as both Origin and Host.
    """
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    if allowed:
        return False
    try:
        parts = urlsplit(origin)
        host = parts.hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: only if configured
    return ip.is_loopback or parts.netloc.lower() == request.host.lower()


class Endpoint:
    """Every WebSocket connection of the server."""

    def __init__(
        self,
        cfg: Config,
        hub: Hub,
        protocol: Protocol,
        handlers: Mapping[str, Handler],
        inline: frozenset[str],
        gc_monitor: GcMonitor,
    ) -> None:
        self.cfg = cfg
        self.hub = hub
        self.protocol = protocol
        self.handlers = dict(handlers)
        self.inline = {t: handlers[t] for t in inline}
        self.gc = gc_monitor
        self.connections: set[Connection] = set()
        self.per_address: dict[str, int] = {}  # open WebSocket connections per client address
        self.refused_per_address = 0
        self.refused_full = 0
        self.hello_timeouts = 0
        self.frames_too_large = 0
        self.transcode = Transcoder()  # shared by every MessagePack connection

    def _encoding(
        self, conn: Connection
    ) -> tuple[WSMsgType, Callable[[bytes], dict[str, Any]], ProtocolError]:
        """The frames ``conn`` takes: their type, their parser, and the wrong type's error."""
        if isinstance(conn, PackedConnection):
            return WSMsgType.BINARY, self.protocol.parse_msgpack, NOT_BINARY
        return WSMsgType.TEXT, self.protocol.parse, NOT_TEXT

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /ws``."""
        hub = self.hub
        cfg = self.cfg
        if not origin_allowed(request, cfg.server.allowed_origins):
            return web.json_response(
                {"code": "forbidden_origin", "message": "this origin may not connect"}, status=403
            )
        if len(self.connections) >= cfg.limits.max_sessions:
            self.refused_full += 1
            return web.json_response(
                {"code": "server_full", "message": "too many connections, retry later"},
                status=503,
                headers={"Retry-After": "5"},
            )
        address = request.remote or ""
        per_address = cfg.limits.max_sessions_per_address
        if per_address and self.per_address.get(address, 0) >= per_address:
            self.refused_per_address += 1
            return web.json_response(
                {
                    "code": "too_many_from_address",
                    "message": "too many connections from this address, retry later",
                },
                status=503,
                headers={"Retry-After": "5"},
            )
        ws = (FastWebSocket if FAST_WS else web.WebSocketResponse)(
            max_msg_size=cfg.limits.hard_frame_bytes,
            compress=cfg.server.compression,
            decode_text=False,
            timeout=3.0,
            protocols=SUBPROTOCOLS,
        )
        await ws.prepare(request)
        transport = request.transport
        if transport is None:  # pragma: no cover - the client vanished during the handshake
            return ws
        now = time.monotonic()
        bucket = TokenBucket(cfg.limits.rate_per_s, cfg.limits.burst, now)
        limit = cfg.limits.max_outbox_bytes
        conn = (
            PackedConnection(
                ws, transport, limit, bucket, now, hub.counters, self.transcode, hub.writes
            )
            if ws.ws_protocol == MSGPACK
            else Connection(ws, transport, limit, bucket, now, hub.counters, hub.writes)
        )
        self.connections.add(conn)
        self.per_address[address] = self.per_address.get(address, 0) + 1
        try:
            if await self._hello(conn, request.host):
                # Freeze long-lived objects during connection ramps too, not only every 5 s: a
                # full collection over 10,000 fresh connections pauses ~0.5 s.
                self.gc.maybe_freeze(len(self.connections))
                await self._serve(conn)
        except Exception:  # a bug: log it here, never send a traceback to the client
            hub.counters.internal_errors += 1
            log.exception("connection handler failed")
        finally:
            self.connections.discard(conn)
            left = self.per_address.pop(address, 1) - 1
            if left > 0:
                self.per_address[address] = left
            hub.detach(conn)
            self.gc.maybe_freeze(len(self.connections))
            if not ws.closed and not conn.closing:
                await conn.close(CloseCode.NORMAL, "")
        return ws

    def metrics(self) -> Iterable[Metric]:
        yield Metric("connections", "gauge", "Open WebSocket connections.", len(self.connections))
        yield Metric(
            "sessions_refused_per_address",
            "counter",
            "WebSocket connections refused: their address had limits.max_sessions_per_address.",
            self.refused_per_address,
        )
        yield Metric(
            "sessions_refused_full",
            "counter",
            "WebSocket connections refused: the server had limits.max_sessions.",
            self.refused_full,
        )
        yield Metric(
            "hello_timeouts",
            "counter",
            "Connections closed with 4003: no hello within limits.hello_timeout_s.",
            self.hello_timeouts,
        )
        yield Metric(
            "frames_too_large",
            "counter",
            "Frames refused for limits.max_frame_bytes (frame_too_large).",
            self.frames_too_large,
        )

    def sweep(self, now: float) -> None:
        """Periodic: close connections that stopped sending (no ping in 2.5 intervals)."""
        deadline = now - 2.5 * self.cfg.session.heartbeat_interval_s
        for conn in list(self.connections):
            if conn.last_recv < deadline and not conn.closing:
                self.hub.counters.heartbeat_timeouts += 1
                conn.abandon(CloseCode.HEARTBEAT_TIMEOUT, "no heartbeat")

    async def close_all(self, code: CloseCode, reason: str) -> None:
        await asyncio.gather(
            *(c.close(code, reason) for c in list(self.connections)), return_exceptions=True
        )

    def _oversized(self, conn: Connection, data: bytes) -> ProtocolError | None:
        limit = self.cfg.limits.max_frame_bytes
        if len(data) > limit:
            self.frames_too_large += 1
            err = ProtocolError("frame_too_large", f"frames are limited to {limit} bytes")
            # Its `id`, if the frame's first or last bytes tell it (the frame is not read).
            err.re = unread_request_id(data, isinstance(conn, PackedConnection))
            return err
        return None

    def _refuse_frame(
        self, conn: Connection, err: ProtocolError, now: float, rid: str | None
    ) -> ProtocolError:
        """Refuse a frame after `welcome` that could not be handled; it counts against the
        rate limit like any other (past the limit the answer is ``rate_limited``)."""
        wait = conn.bucket.take(now)
        if wait:
            return self._rate_limited(conn, wait, now, rid)
        self.hub.refuse(conn, err, rid)
        return err

    def _rate_limited(
        self, conn: Connection, wait: float, now: float, rid: str | None
    ) -> ProtocolError:
        """Refuse a frame for the rate: ``rate_limited``, or, when the connection has gone on
        far beyond its rate (``limits.flood_close_after`` refusals more than the rate refills),
        close it with 4029 and answer nothing more. No await: the fast path calls this too."""
        hub = self.hub
        if conn.closing:
            return FLOODING
        hub.counters.rate_limited += 1
        flood = conn.flood
        if flood is None:
            limits = self.cfg.limits
            flood = conn.flood = TokenBucket(limits.rate_per_s, limits.flood_close_after, now)
        if flood.take(now):
            hub.counters.flooding += 1
            conn.abandon(CloseCode.FLOODING, "far above the rate limit")
            # Read nothing more (close() stops reading at once, then sends what is queued, the
            # close frame last): a flooder's backlog would otherwise be parsed, and dropped,
            # until the abort, at everyone else's cost.
            conn.transport.close()
            return FLOODING
        err = ProtocolError(
            "rate_limited", "too many messages", retry_after_ms=int(wait * 1000) + 1
        )
        hub.refuse(conn, err, rid)
        return err

    async def _hello(self, conn: Connection, host: str) -> bool:
        """Wait for a good `hello`; returns False if the connection ended instead."""
        hub = self.hub
        ws = conn.ws
        deadline = time.monotonic() + self.cfg.limits.hello_timeout_s
        kind, parse, wrong_kind = self._encoding(conn)
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                self.hello_timeouts += 1
                await conn.close(CloseCode.HELLO_TIMEOUT, "no hello in time")
                return False
            if msg.type in _CLOSED:
                return False
            conn.last_recv = time.monotonic()
            if msg.type is not kind:
                hub.refuse(conn, wrong_kind, None)
                continue
            too_large = self._oversized(conn, msg.data)
            if too_large is not None:
                hub.refuse(conn, too_large, None)
                continue
            m: dict[str, Any] | None = None
            try:
                m = parse(msg.data)
                if m["type"] != "hello":
                    raise ProtocolError("hello_required", "send `hello` first")
                if hub.shared is not None and "resume" in m:  # a session of another node?
                    await hub.adopt(m)
                hub.welcome(conn, m, host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
                return True
            except ProtocolError as e:
                hub.refuse(conn, e, m.get("id") if m is not None else None)
                if e.close is not None:
                    await conn.close(e.close, e.code)
                    return False

    def _sink(self, conn: Connection) -> Callable[[bytes], bool]:
        """Handle inline (chat write) frames as aiohttp parses them (``fastws``); anything else,
        anything that fails, and anything that would overtake a frame still in hand goes to
        ``_serve`` (a frame parsed here goes with its message, so it is not parsed twice)."""
        hub = self.hub
        max_frame = self.cfg.limits.max_frame_bytes
        parse = self._encoding(conn)[1]
        inline = self.inline
        monotonic = time.monotonic

        def take(data: bytes) -> bool:
            if conn.closing:  # closed for flooding (or going): the rest is not read
                return True
            session = conn.session
            if conn.busy or session is None or len(data) > max_frame:
                return False
            try:
                m = parse(data)
            except ProtocolError:
                return False
            t = m["type"]
            now = monotonic()
            conn.last_recv = now
            if t != "ping":
                wait = conn.bucket.take(now)
                if wait:  # refused here, cheaply: no task switch, no second look
                    self._rate_limited(conn, wait, now, m.get("id"))
                    return True
            handler = inline.get(t)
            if handler is None:  # to the receive loop, parsed and its token taken
                conn.parsed = (data, m)
                return False
            try:
                handler(session, m)
            except ProtocolError as e:
                hub.refuse(conn, e, m.get("id"))
                if e.close is not None:  # no await here: close frame now, abort if unread
                    conn.abandon(e.close, e.code)
            except Exception:
                hub.failed(conn, m.get("id"), "handler failed")
            return True

        return take

    async def _serve(self, conn: Connection) -> None:
        """The per-connection receive loop after `welcome`."""
        hub = self.hub
        ws = conn.ws
        max_frame = self.cfg.limits.max_frame_bytes
        handlers = self.handlers
        kind, parse, wrong_kind = self._encoding(conn)
        monotonic = time.monotonic
        if isinstance(ws, FastWebSocket):
            ws.set_sink(self._sink(conn), kind)
        while True:
            conn.busy = False
            msg = await ws.receive()
            conn.busy = True
            now = monotonic()
            conn.last_recv = now
            if msg.type is not kind:
                if msg.type in _CLOSED:
                    return
                if self._refuse_frame(conn, wrong_kind, now, None) is FLOODING:
                    return
                continue
            data = msg.data
            if conn.tail is not None:  # replies keep request order: let its chat writes finish
                await conn.drain()
            session = conn.session
            if session is None:  # replaced by a resume on another connection
                return
            if len(data) > max_frame:
                too_large = self._oversized(conn, data)
                assert too_large is not None
                if self._refuse_frame(conn, too_large, now, too_large.re) is FLOODING:
                    return
                continue
            m: dict[str, Any] | None = None
            try:
                parsed = conn.parsed
                if parsed is not None and parsed[0] is data:  # the fast path took its token
                    conn.parsed = None
                    m = parsed[1]
                    t = m["type"]
                else:
                    m = parse(data)
                    t = m["type"]
                    if t != "ping":
                        wait = conn.bucket.take(now)
                        if wait:
                            if self._rate_limited(conn, wait, now, m.get("id")) is FLOODING:
                                return
                            continue
                pending = handlers[t](session, m)
                if pending is not None:
                    await pending
            except ProtocolError as e:
                if m is None:  # invalid frames count against the rate limit too
                    err = self._refuse_frame(conn, e, now, e.re)
                    if err is FLOODING:
                        return
                else:
                    err = e
                    hub.refuse(conn, err, m.get("id"))
                if err.close is not None:
                    await conn.close(err.close, err.code)
                    return
            except Exception:
                hub.failed(conn, m.get("id") if m is not None else None, "handler failed")
