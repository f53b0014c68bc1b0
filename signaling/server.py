"""The aiohttp application: the WebSocket endpoint and a few HTTP routes. A thin edge.

Routes: ``GET /ws`` (the protocol), ``GET /healthz``, ``GET /metrics`` (Prometheus text), the
HTTP API for app backends under ``/api/`` (``signaling.http_api``) and the bundled web page from
``web/``. Call signaling (``signaling.calling``) and the push webhook (``signaling.push``) are
attached to the hub here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web

from sfu.pool import SfuPool

from . import calling, http_api
from .config import Config
from .fastws import FastWebSocket, available
from .hub import HANDLERS, Hub, IceProvider, on_delete, on_edit, on_send
from .media import MediaRouter
from .protocol import CloseCode, ProtocolError, parse_client_message
from .push import PushQueue, message_pushes
from .ratelimit import TokenBucket
from .session import Connection
from .sqlite_store import SqliteStore
from .store import ChatStore

log = logging.getLogger("rallypoint.server")

HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
GC_MONITOR: web.AppKey[GcMonitor] = web.AppKey("gc_monitor")

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


class GcMonitor:
    """Measures garbage-collection pauses and keeps them short.

    A full collection walks every tracked object: ~0.5 s at 10,000 connections. So long-lived
    objects are frozen (``gc.freeze``, which only splices lists and resets generation 0's count):
    after every 200 connections opened or closed, and once a second. The second is for a
    CPython 3.11 quirk: freeing a frozen object counts against generation 0's allocation count,
    so when live objects replace frozen ones (every message a connection handles replaces a few
    of its buffers and state objects; a mass disconnect frees thousands) young objects pile up
    without a collection being due, and the one that finally runs walks them all (35-47 ms
    for ~80,000 after 10,000 connections each sent a message). Short-lived cycles still die in
    the frequent generation-0 collections in between.

    Frozen objects are never collected, so reference cycles among objects frozen while alive
    and dropped later would leak. Measured (1,000 connections opened, used and closed while 150
    stayed, then unfreeze + collect): 29 objects in all under uvloop, which ``serve`` uses; ~5
    per connection under asyncio's own loop (its socket transports sit in a cycle).
    ``maybe_reclaim`` unfreezes and collects them once few connections and sessions are left,
    when a full collection is cheap.
    """

    FREEZE_EVERY_S = 1.0
    RECLAIM_BELOW = 100  # connections plus sessions
    RECLAIM_GROWTH = 100_000  # frozen objects gained since the last reclaim

    def __init__(self) -> None:
        self.max_pause_s = 0.0
        self.pauses_over_50ms = 0
        self.collections = 0
        self.reclaimed = 0
        self._start = 0.0
        self._frozen_at = 0
        self._frozen_base = 0
        self._ticker: asyncio.TimerHandle | None = None

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        d = time.perf_counter() - self._start
        self.collections += 1
        if d > self.max_pause_s:
            self.max_pause_s = d
        if d > 0.05:
            self.pauses_over_50ms += 1

    def install(self) -> None:
        """Start measuring and freezing (the periodic freeze needs a running loop)."""
        gc.callbacks.append(self._callback)
        gc.freeze()
        self._frozen_base = gc.get_freeze_count()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # unit tests without a loop
            return
        self._ticker = loop.call_later(self.FREEZE_EVERY_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        gc.freeze()
        self._ticker = loop.call_later(self.FREEZE_EVERY_S, self._tick, loop)

    def uninstall(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        gc.unfreeze()

    def maybe_freeze(self, connections: int) -> None:
        if abs(connections - self._frozen_at) >= 200:
            gc.freeze()
            self._frozen_at = connections

    def maybe_reclaim(self, live: int) -> None:
        """Collect what froze and then became garbage, while a full collection is cheap
        (``live``: connections and sessions)."""
        if live >= self.RECLAIM_BELOW:
            return
        if gc.get_freeze_count() - self._frozen_base < self.RECLAIM_GROWTH:
            return
        gc.unfreeze()
        self.reclaimed += gc.collect()
        gc.freeze()
        self._frozen_base = gc.get_freeze_count()


def origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    """Browsers send Origin; other clients may not. Empty list: same host only."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return True
    if origin in allowed:
        return True
    if not allowed:
        return urlsplit(origin).netloc.lower() == request.host.lower()
    return False


NOT_TEXT = ProtocolError("bad_message", "frames must be text")
FAST_WS = available()
# Handlers that finish without awaiting: ``_sink`` may run them inside ``data_received``.
_FAST = {"send": on_send, "edit": on_edit, "delete": on_delete}


async def ws_handler(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB]
    cfg = hub.cfg
    if not origin_allowed(request, cfg.server.allowed_origins):
        return web.json_response(
            {"code": "forbidden_origin", "message": "this origin may not connect"}, status=403
        )
    if len(hub.connections) >= cfg.limits.max_sessions:
        return web.json_response(
            {"code": "server_full", "message": "too many connections, retry later"},
            status=503,
            headers={"Retry-After": "5"},
        )
    ws = (FastWebSocket if FAST_WS else web.WebSocketResponse)(
        max_msg_size=cfg.limits.hard_frame_bytes,
        compress=cfg.server.compression,
        decode_text=False,
        timeout=3.0,
    )
    await ws.prepare(request)
    transport = request.transport
    if transport is None:  # pragma: no cover - the client vanished during the handshake
        return ws
    now = time.monotonic()
    conn = Connection(
        ws,
        transport,
        cfg.limits.max_outbox_bytes,
        TokenBucket(cfg.limits.rate_per_s, cfg.limits.burst, now),
        now,
        hub.counters,
    )
    hub.connections.add(conn)
    try:
        if await _hello(hub, conn, request.host):
            # Freeze long-lived objects during connection ramps too, not only every 5 s: a
            # full collection over 10,000 fresh connections pauses ~0.5 s.
            request.app[GC_MONITOR].maybe_freeze(len(hub.connections))
            await _serve(hub, conn)
    except Exception:  # a bug: log it here, never send a traceback to the client
        hub.counters["internal_errors"] += 1
        log.exception("connection handler failed")
    finally:
        hub.detach(conn)
        request.app[GC_MONITOR].maybe_freeze(len(hub.connections))
        if not ws.closed and not conn.closing:
            await conn.close(CloseCode.NORMAL, "")
    return ws


def _oversized(hub: Hub, conn: Connection, data: bytes) -> bool:
    if len(data) > hub.cfg.limits.max_frame_bytes:
        limit = hub.cfg.limits.max_frame_bytes
        hub.refuse(
            conn, ProtocolError("frame_too_large", f"frames are limited to {limit} bytes"), None
        )
        return True
    return False


async def _hello(hub: Hub, conn: Connection, host: str) -> bool:
    """Wait for a good `hello`; returns False if the connection ended instead."""
    ws = conn.ws
    deadline = time.monotonic() + hub.cfg.limits.hello_timeout_s
    while True:
        try:
            msg = await asyncio.wait_for(ws.receive(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            await conn.close(CloseCode.HELLO_TIMEOUT, "no hello in time")
            return False
        if msg.type in _CLOSED:
            return False
        conn.last_recv = time.monotonic()
        if msg.type is not WSMsgType.TEXT:
            hub.refuse(conn, NOT_TEXT, None)
            continue
        if _oversized(hub, conn, msg.data):
            continue
        m: dict[str, Any] | None = None
        try:
            m = parse_client_message(msg.data)
            if m["type"] != "hello":
                raise ProtocolError("hello_required", "send `hello` first")
            hub.welcome(conn, m, host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
            return True
        except ProtocolError as e:
            hub.refuse(conn, e, m.get("id") if m is not None else None)
            if e.close is not None:
                await conn.close(e.close, e.code)
                return False


def _sink(hub: Hub, conn: Connection) -> Callable[[bytes], bool]:
    """Handle chat writes as aiohttp parses them (``fastws``); anything else, anything that
    fails, and anything that would overtake a frame still in hand goes to ``_serve``."""
    max_frame = hub.cfg.limits.max_frame_bytes
    monotonic = time.monotonic

    def take(data: bytes) -> bool:
        session = conn.session
        if conn.busy or session is None or len(data) > max_frame:
            return False
        try:
            m = parse_client_message(data)
        except ProtocolError:
            return False
        handler = _FAST.get(m["type"])
        if handler is None:
            return False
        now = monotonic()
        if conn.bucket.take(now):
            return False
        conn.last_recv = now
        try:
            handler(hub, session, m)
        except ProtocolError as e:
            hub.refuse(conn, e, m.get("id"))
            if e.close is not None:  # no await here: close frame now, abort if unread
                conn.abandon(e.close, e.code)
        except Exception:
            hub.failed(conn, m.get("id"), "handler failed")
        return True

    return take


async def _serve(hub: Hub, conn: Connection) -> None:
    """The per-connection receive loop after `welcome`."""
    ws = conn.ws
    max_frame = hub.cfg.limits.max_frame_bytes
    handlers = HANDLERS
    monotonic = time.monotonic
    if isinstance(ws, FastWebSocket):
        ws.set_sink(_sink(hub, conn))
    while True:
        conn.busy = False
        msg = await ws.receive()
        conn.busy = True
        now = monotonic()
        conn.last_recv = now
        if msg.type is not WSMsgType.TEXT:
            if msg.type in _CLOSED:
                return
            hub.refuse(conn, NOT_TEXT, None)
            continue
        data = msg.data
        if conn.tail is not None:  # replies keep request order: let its chat writes finish
            await conn.drain()
        session = conn.session
        if session is None:  # replaced by a resume on another connection
            return
        if len(data) > max_frame:
            _oversized(hub, conn, data)
            continue
        m: dict[str, Any] | None = None
        try:
            m = parse_client_message(data)
            t = m["type"]
            if t != "ping":
                wait = conn.bucket.take(now)
                if wait:
                    hub.counters["rate_limited"] += 1
                    raise ProtocolError(
                        "rate_limited", "too many messages", retry_after_ms=int(wait * 1000) + 1
                    )
            pending = handlers[t](hub, session, m)
            if pending is not None:
                await pending
        except ProtocolError as e:
            err = e
            if m is None:  # invalid frames count against the rate limit too
                wait = conn.bucket.take(now)
                if wait:
                    hub.counters["rate_limited"] += 1
                    err = ProtocolError(
                        "rate_limited", "too many messages", retry_after_ms=int(wait * 1000) + 1
                    )
            hub.refuse(conn, err, m.get("id") if m is not None else None)
            if err.close is not None:
                await conn.close(err.close, err.code)
                return
        except Exception:
            hub.failed(conn, m.get("id") if m is not None else None, "handler failed")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB]
    gcm = request.app[GC_MONITOR]
    store = hub.store
    values: dict[str, float] = {
        "connections": len(hub.connections),
        "sessions": len(hub.sessions),
        "rooms": len(hub.rooms.rooms),
        "gc_max_pause_seconds": gcm.max_pause_s,
        "gc_pauses_over_50ms_total": gcm.pauses_over_50ms,
        "gc_collections_total": gcm.collections,
        "gc_reclaimed_objects_total": gcm.reclaimed,
        **{f"{k}_total": v for k, v in hub.counters.items()},
    }
    if isinstance(store, SqliteStore):
        values["store_commits_total"] = store.commits
        values["store_writes_total"] = store.batched
        values["store_writer_restarts_total"] = store.restarts
    if hub.media is not None:  # summed over the SFU workers
        for stats in await hub.media.pool.stats():
            for k, v in stats.items():
                name = f"sfu_{k}" if k == "rooms" else f"sfu_{k}_total"
                values[name] = values.get(name, 0) + v
    body = "".join(f"rallypoint_{k} {v}\n" for k, v in values.items())
    return web.Response(text=body, content_type="text/plain")


# The page has no build step and no hashed file names: browsers keep each file but ask again
# (If-Modified-Since, answered 304) on every load, so an upgraded server is seen at once.
_WEB_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


async def index(request: web.Request) -> web.FileResponse:
    """``/`` and ``/room/{room}``: the same page; ``web/app.js`` reads the path."""
    return web.FileResponse(WEB_DIR / "index.html", headers=_WEB_HEADERS)


async def static_file(request: web.Request) -> web.FileResponse:
    """``/static/<file>``: the page's modules, style sheet and images from ``web/``."""
    name = request.match_info["name"]
    path = (WEB_DIR / name).resolve()
    if not path.is_relative_to(WEB_DIR) or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=_WEB_HEADERS)


def make_app(
    cfg: Config,
    *,
    store: ChatStore | None = None,
    ice: IceProvider | None = None,
    extra_cleanup: Sequence[Callable[[web.Application], AsyncIterator[None]]] = (),
) -> web.Application:
    """Build the application. The store opens on start-up and is flushed and closed on cleanup
    (which aiohttp runs after SIGTERM has closed every socket with GOING_AWAY)."""
    app = web.Application(client_max_size=cfg.limits.max_frame_bytes)
    app[CONFIG] = cfg
    st: ChatStore = store or SqliteStore(
        Path(cfg.server.data_dir) / "chat.sqlite3", cfg.store.synchronous
    )
    hub = Hub(cfg, st, ice)
    push = PushQueue(cfg.push, hub.counters, st)
    calls = calling.attach(hub, push)
    message_pushes(hub, push)
    app[HUB] = hub
    app[GC_MONITOR] = GcMonitor()

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await st.open()
        gcm = app[GC_MONITOR]
        gcm.install()
        sweeper = asyncio.create_task(_sweep_forever(hub, gcm))
        pool: SfuPool | None = None
        if cfg.sfu.enabled:
            router: list[MediaRouter] = []
            pool = SfuPool(
                cfg.sfu.workers,
                lambda ev: router[0].on_event(ev),
                cfg.sfu.video_codec,
                cfg.sfu.log_level,
                bind=cfg.sfu.bind_address,
                announce=cfg.sfu.public_address,
                port_min=cfg.sfu.port_min,
                port_max=cfg.sfu.port_max,
            )
            router.append(MediaRouter(hub, pool))
            await pool.start()
            hub.media = router[0]
        yield
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        if pool is not None:
            await hub.media.close()
            hub.media = None
            await pool.close()
        gcm.uninstall()
        await st.close()

    async def on_shutdown(app: web.Application) -> None:
        await asyncio.gather(
            *(c.close(CloseCode.GOING_AWAY, "server shutting down") for c in list(hub.connections)),
            return_exceptions=True,
        )

    async def calls_lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Registered after `lifecycle`, so it stops (and flushes call logs) before the store closes.
        await push.start()
        yield
        await calls.stop()
        await push.stop()

    app.cleanup_ctx.append(lifecycle)
    app.cleanup_ctx.append(calls_lifecycle)
    for ctx in extra_cleanup:
        app.cleanup_ctx.append(ctx)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_get("/room/{room}", index)
    app.router.add_get("/static/{name:.+}", static_file)
    http_api.setup(app, hub)
    return app


async def _sweep_forever(hub: Hub, gcm: GcMonitor) -> None:
    period = min(5.0, hub.cfg.session.heartbeat_interval_s / 2)
    while True:
        await asyncio.sleep(period)
        hub.sweep(time.monotonic())
        gcm.maybe_freeze(len(hub.connections))
        # Suspended sessions (resume grace period) are live objects too.
        gcm.maybe_reclaim(len(hub.connections) + len(hub.sessions))
