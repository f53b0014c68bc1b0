"""The composition root: the one place that builds every service, merges every feature's
messages and handlers, and owns the aiohttp application's keys, routes and cleanup contexts.

Features (``core``, ``chat``, ``calls``, ``groupcall``, ``relations``) each hand over a
``Feature``: their message specs and error codes, and the handlers of their client messages.
Nothing registers itself by being imported; ``protocol()`` merges the specs, and ``make_app``
checks at start-up that the handled client message types are exactly the documented ones.

``python -m signaling.app schema`` prints the JSON Schema of the protocol
(``docs/protocol.schema.json``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

import orjson
from aiohttp import web

from turn.settings import TurnSettings

from .calls import messages as calls_messages
from .calls.service import CallService
from .calls.shared import SharedCalls
from .chat import messages as chat_messages
from .chat.handlers import Chat
from .chat.postgres import PostgresStore
from .chat.sqlite import SqliteStore
from .cluster.mediamap import MediaMap
from .cluster.redisbus import RedisBus, node_id
from .cluster.state import ClusterState
from .config import Config, ConfigError
from .core import messages as core_messages
from .core.bus import LocalBus
from .core.feature import Feature, Handler
from .core.gc import GcMonitor
from .core.handlers import CoreHandlers
from .core.hub import Hub
from .core.ice import IceServers
from .core.metrics import Metric, MetricSource
from .groupcall import messages as groupcall_messages
from .groupcall.relay import MediaRelay
from .groupcall.router import GroupCall
from .net import http_api
from .net import web as web_page
from .net.endpoint import Endpoint
from .net.listener import AddressBook
from .net.metrics import Metrics
from .notify.events import MessagePushes
from .notify.push import PushQueue
from .recording import messages as recording_messages
from .recording.library import RecordingLibrary, recordings_root
from .recording.service import Recordings
from .relations import messages as relations_messages
from .relations.service import Relations
from .wire.errors import CloseCode
from .wire.protocol import Protocol
from .wire.schema import json_schema

log = logging.getLogger("rallypoint")

HUB: web.AppKey[Hub] = web.AppKey("hub", Hub)
CONFIG: web.AppKey[Config] = web.AppKey("config", Config)
CALLS: web.AppKey[CallService] = web.AppKey("calls", CallService)
ENDPOINT: web.AppKey[Endpoint] = web.AppKey("endpoint", Endpoint)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
PUSH: web.AppKey[PushQueue] = web.AppKey("push", PushQueue)
ADDRESSES: web.AppKey[AddressBook] = web.AppKey("addresses", AddressBook)
RECORDINGS: web.AppKey[RecordingLibrary] = web.AppKey("recordings", RecordingLibrary)
#: The chat store (and device directory and relation store) ``store.url`` selects.
Store = SqliteStore | PostgresStore
STORE: web.AppKey[Store] = web.AppKey("store")

#: The protocol's parts, in the order the document and the schema list them.
MESSAGES = (
    core_messages.MESSAGES,
    chat_messages.MESSAGES,
    calls_messages.MESSAGES,
    groupcall_messages.MESSAGES,
    recording_messages.MESSAGES,
    relations_messages.MESSAGES,
)


def protocol() -> Protocol:
    """Every message, error code and schema definition of the server."""
    return Protocol(MESSAGES)


def handlers_of(proto: Protocol, features: Sequence[Feature]) -> dict[str, Handler]:
    """The features' handlers, checked against the protocol: every documented client message
    is handled, and nothing else is."""
    handlers: dict[str, Handler] = {}
    for f in features:
        for t, h in f.handlers.items():
            if t in handlers:
                raise RuntimeError(f"two features handle {t!r}")
            handlers[t] = h
    missing = set(proto.client) - set(handlers)
    extra = set(handlers) - set(proto.client)
    if missing or extra:
        raise RuntimeError(
            f"client messages without a handler: {sorted(missing)}; "
            f"handlers of undocumented messages: {sorted(extra)}"
        )
    return handlers


def make_store(cfg: Config) -> Store:
    """The chat store ``store.url`` names: PostgreSQL, or a SQLite file (by default
    ``chat.sqlite3`` in the data directory)."""
    if cfg.store.postgres:
        return PostgresStore(cfg.store.url)
    path = Path(cfg.store.url) if cfg.store.url else Path(cfg.server.data_dir) / "chat.sqlite3"
    return SqliteStore(path, cfg.store.synchronous)


def make_bus(cfg: Config) -> LocalBus | RedisBus:
    """The message bus: this process's topics (one node), or Redis pub/sub in cluster mode
    (``cluster.redis_url`` set; the configuration has checked that ``store.url`` is
    PostgreSQL)."""
    cl = cfg.cluster
    if not cl.redis_url:
        return LocalBus()
    return RedisBus(cl.redis_url, node_id(cl.node_id), cl.key_prefix)


def make_app(cfg: Config) -> web.Application:
    """Build the server: signaling, chat store, calls, push, SFU workers and (unless disabled)
    the embedded TURN server. Services start in the app's cleanup contexts and stop in reverse
    order after SIGTERM has closed every socket with GOING_AWAY."""
    app = web.Application(client_max_size=cfg.limits.max_frame_bytes)
    secret = turn_secret(cfg) if cfg.turn.enabled else None

    # Services.
    store = make_store(cfg)
    bus = make_bus(cfg)
    hub = Hub(cfg, store, store, store, IceServers(cfg, secret), bus)
    # One write per connection for each batch of frames: a transaction's results, a bus read.
    store.writes = hub.writes
    if isinstance(bus, RedisBus):
        bus.writes = hub.writes
    shared: ClusterState | None = None
    if isinstance(bus, RedisBus):  # cluster mode: rooms and presence in Redis too
        shared = ClusterState(
            cfg.cluster.redis_url,
            bus.node_id,
            cfg.cluster.key_prefix,
            heartbeat_s=cfg.cluster.heartbeat_s,
            room_grace_s=cfg.rooms.empty_room_grace_s,
            resume_grace_s=cfg.session.resume_grace_s,
        )
        shared.hub = hub
        hub.share(shared)
    chat = Chat(hub, store)
    push = PushQueue(cfg.push, store)
    calls: CallService
    if isinstance(bus, RedisBus):  # cluster mode: every call in Redis, rung on every node
        calls = SharedCalls(
            hub, store, push, cfg.cluster.redis_url, bus.node_id, cfg.cluster.key_prefix
        )
        if shared is not None:
            calls.flushed = shared.flushed
    else:
        calls = CallService(hub, store, push)
    groupcall = GroupCall(hub, cfg.sfu)
    if isinstance(bus, RedisBus):  # cluster mode: a room's media on one node of the cluster
        groupcall.relay = MediaRelay(
            bus,
            MediaMap(cfg.cluster.redis_url, bus.node_id, cfg.cluster.key_prefix),
            bus.node_id,
            local=groupcall.local,
            relayed=groupcall.relayed,
            lost=groupcall.lost_elsewhere,
            unplaced=groupcall.unplaced,
            hosting=groupcall.hosting,
            timeout_s=cfg.cluster.media_timeout_s,
            heartbeat_s=cfg.cluster.heartbeat_s,
        )
    core = CoreHandlers(hub)
    relations = Relations(hub, store)
    gc_monitor = GcMonitor()
    addresses = AddressBook(cfg.server.max_connections_per_address)  # for net.listener.serve
    turn_metrics = TurnMetrics()
    library = RecordingLibrary(recordings_root(cfg.recording, cfg.server.data_dir), cfg.recording)
    recordings = Recordings(
        hub, groupcall, library, max_bytes=cfg.recording.max_bytes, mix=cfg.recording.mix
    )

    # Wiring: who hears about what.
    hub.media = groupcall
    groupcall.recording_of = recordings.recording_of
    groupcall.on_recording_ended.append(recordings.ended)
    hub.on_session_start.append(calls.session_started)
    hub.on_session_resume.append(calls.session_resumed)
    hub.on_session_end.append(calls.session_ended)
    hub.room_grants.append(calls.room_grants)
    calls.group_members = chat.group_members
    if isinstance(bus, RedisBus):
        chat.share_cache()
    elsewhere = None if shared is None else shared.online_elsewhere
    pushes = MessagePushes(hub, push, cfg.push.include_text, chat.muted, elsewhere)
    chat.on_message.append(pushes.on_message)
    chat.on_message.append(relations.message_stored)

    # The protocol and its handlers.
    proto = protocol()
    features = [
        core.feature(),
        chat.feature(),
        calls.feature(),
        groupcall.feature(),
        recordings.feature(),
        relations.feature(),
    ]
    handlers = handlers_of(proto, features)
    inline = frozenset().union(*(f.inline for f in features))
    endpoint = Endpoint(cfg, hub, proto, handlers, inline, gc_monitor)
    sources: list[MetricSource] = [
        endpoint,
        hub,
        store,
        calls,
        push.counters,
        gc_monitor,
        addresses,
        turn_metrics,
        library,
    ]
    if isinstance(bus, RedisBus):
        sources.append(bus)
    if shared is not None:
        sources.append(shared)
    metrics = Metrics(sources, [groupcall.metrics])

    app[CONFIG] = cfg
    app[HUB] = hub
    app[CALLS] = calls
    app[ENDPOINT] = endpoint
    app[METRICS] = metrics
    app[PUSH] = push
    app[ADDRESSES] = addresses
    app[STORE] = store
    app[RECORDINGS] = library

    # Start-up and shutdown, in order; each stops only if it started.
    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await chat.start()
        await hub.load_blocks()
        yield
        await store.close()

    async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
        if not isinstance(bus, RedisBus) or shared is None:
            yield
            return
        log.warning(
            "cluster mode (node %s, heartbeat %.2f s): rooms, chat, presence, resuming, "
            "calls and group-call media are shared; a recording is made by the node it was "
            "asked of (docs/CLUSTER.md, Limits)",
            bus.node_id,
            cfg.cluster.heartbeat_s,
        )
        await bus.start()
        await shared.start()
        if isinstance(calls, SharedCalls):
            await calls.start()
        yield
        await shared.close()
        await bus.close()

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        gc_monitor.install()
        sweeper = asyncio.create_task(_sweep_forever(hub, endpoint, gc_monitor))
        yield
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        gc_monitor.uninstall()

    async def recordings_ctx(app: web.Application) -> AsyncIterator[None]:
        # Before the SFU starts: what a previous run left unfinished is closed first.
        await library.open()
        library.start()
        yield
        await recordings.close()  # a mixing job still running is stopped
        await library.close()

    async def media_ctx(app: web.Application) -> AsyncIterator[None]:
        await groupcall.start()
        if groupcall.relay is not None:
            await groupcall.relay.start()
        yield
        await groupcall.close()

    async def services_ctx(app: web.Application) -> AsyncIterator[None]:
        # Stops before the store closes: call logs and device writes are flushed into it.
        await push.start()
        yield
        await calls.stop()
        await hub.stop()
        await push.stop()

    app.cleanup_ctx.append(store_ctx)
    app.cleanup_ctx.append(cluster_ctx)
    app.cleanup_ctx.append(runtime_ctx)
    app.cleanup_ctx.append(recordings_ctx)
    app.cleanup_ctx.append(media_ctx)
    app.cleanup_ctx.append(services_ctx)
    if cfg.turn.enabled and secret:
        app.cleanup_ctx.append(_turn_ctx(cfg, secret, turn_metrics))

    async def on_shutdown(app: web.Application) -> None:
        await endpoint.close_all(CloseCode.GOING_AWAY, "server shutting down")

    app.on_shutdown.append(on_shutdown)

    # Routes.
    app.router.add_get("/ws", endpoint.handle)
    app.router.add_get("/healthz", healthz)
    if cfg.server.metrics_listen:  # a listener of its own, for Prometheus only
        app.cleanup_ctx.append(_metrics_listener(cfg.server.metrics_listen, metrics))
    else:  # public in open mode (loopback by default); the API credentials in token mode
        app.router.add_get("/metrics", metrics.handler(hub, protected=not cfg.open_mode))
    web_page.setup(app)
    http_api.setup(
        app, http_api.Api(hub, chat, store, store, relations, library, recordings, groupcall)
    )
    return app


async def healthz(request: web.Request) -> web.Response:
    """``{"status": "ok"}``, or ``{"status": "degraded", "reasons": [...]}`` while the server
    runs but refuses something (``store_full``: the chat store's disk is full, chat writes are
    refused; ``store_unavailable``: its PostgreSQL cannot be reached, chat writes are
    refused). Both with 200: a degraded server still serves calls, reads and presence, and a
    load balancer or orchestrator that took it out (or restarted it) for a full disk would
    turn a refused chat write into an outage and fix nothing; alert on the reasons instead
    (and on ``rallypoint_store_disk_full``, ``rallypoint_store_unavailable``). See
    docs/OPERATIONS.md."""
    reasons = []
    store = request.app[STORE]
    if store.disk_full:
        reasons.append("store_full")
    if isinstance(store, PostgresStore) and not store.available:
        reasons.append("store_unavailable")
    if reasons:
        return web.json_response({"status": "degraded", "reasons": reasons})
    return web.json_response({"status": "ok"})


def turn_secret(cfg: Config) -> str:
    """The TURN shared secret: configured, or generated once and kept in the data directory."""
    if cfg.turn.secret:
        return cfg.turn.secret
    path = Path(cfg.server.data_dir) / "turn_secret"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def turn_settings(cfg: Config, secret: str) -> TurnSettings:
    """The embedded TURN server's settings from the ``[turn]`` section (ConfigError if bad).

    The TLS listener (``turns:``) runs when the server has a certificate and key and
    ``turn.tls_port`` is not 0.
    """
    t = cfg.turn
    tls = bool(cfg.server.tls_cert and cfg.server.tls_key and t.tls_port)
    try:
        return TurnSettings(
            listen_host=t.listen_host,
            listen_port=t.port,
            secret=secret,
            realm=t.realm,
            allow_peers=tuple(t.allow_peers),
            relay_port_min=t.relay_port_min,
            relay_port_max=t.relay_port_max,
            relay_host=t.relay_host,
            external_address=t.external_address,
            tcp=t.tcp,
            max_tcp_connections_per_address=t.max_tcp_connections_per_address,
            tcp_first_request_timeout_s=t.tcp_first_request_timeout_s,
            max_allocations=t.max_allocations,
            max_allocations_per_user=t.max_allocations_per_user,
            max_allocations_per_address=t.max_allocations_per_address,
            max_bps_per_allocation=t.max_bps_per_allocation,
            default_lifetime_s=t.default_lifetime_s,
            max_lifetime_s=t.max_lifetime_s,
            tls_cert=cfg.server.tls_cert if tls else "",
            tls_key=cfg.server.tls_key if tls else "",
            tls_port=t.tls_port,
        )
    except ValueError as e:  # TurnSettings names the field: "turn: relay_host must be ..."
        raise ConfigError(str(e)) from None


class TurnMetrics:
    """The embedded TURN server's counters in /metrics (``turn_<name>``; docs/TURN.md)."""

    GAUGES = frozenset({"allocations", "tcp_connections"})

    def __init__(self) -> None:
        self.stats: Callable[[], dict[str, int]] | None = None

    def metrics(self) -> Iterable[Metric]:
        if self.stats is None:
            return
        for name, value in self.stats().items():
            kind: Literal["counter", "gauge"] = "gauge" if name in self.GAUGES else "counter"
            yield Metric(f"turn_{name}", kind, f"TURN server: {name} (see docs/TURN.md).", value)


def _turn_ctx(
    cfg: Config, secret: str, turn_metrics: TurnMetrics
) -> Callable[[web.Application], AsyncIterator[None]]:
    settings = turn_settings(cfg, secret)

    async def turn_ctx(app: web.Application) -> AsyncIterator[None]:
        from turn.server import TurnServer

        server = TurnServer(settings)
        await server.start()
        turn_metrics.stats = lambda: server.stats
        t = cfg.turn
        log.info(
            "TURN server on %s:%d (udp%s%s)",
            t.listen_host,
            t.port,
            ", tcp" if t.tcp else "",
            f", tls {t.tls_port}" if settings.tls else "",
        )
        yield
        turn_metrics.stats = None
        await server.close()

    return turn_ctx


def _metrics_listener(
    listen: str, metrics: Metrics
) -> Callable[[web.Application], AsyncIterator[None]]:
    host, _, port = listen.rpartition(":")

    async def metrics_ctx(app: web.Application) -> AsyncIterator[None]:
        own = web.Application()
        own.router.add_get("/metrics", metrics.handle)
        runner = web.AppRunner(own, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port))
        await site.start()
        log.info("/metrics on http://%s/metrics", listen)
        yield
        await runner.cleanup()

    return metrics_ctx


async def _sweep_forever(hub: Hub, endpoint: Endpoint, gcm: GcMonitor) -> None:
    period = min(5.0, hub.cfg.session.heartbeat_interval_s / 2)
    while True:
        await asyncio.sleep(period)
        now = time.monotonic()
        endpoint.sweep(now)
        hub.sweep(now)
        gcm.maybe_freeze(len(endpoint.connections))
        # Suspended sessions (resume grace period) are live objects too.
        gcm.maybe_reclaim(len(endpoint.connections) + len(hub.sessions))


if __name__ == "__main__":  # pragma: no cover - `python -m signaling.app schema`
    if sys.argv[1:] != ["schema"]:
        sys.exit("usage: python -m signaling.app schema")
    sys.stdout.write(orjson.dumps(json_schema(protocol()), option=orjson.OPT_INDENT_2).decode())
    sys.stdout.write("\n")
