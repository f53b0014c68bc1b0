"""Group-call media: publishing, subscribing and track state, routed to the SFU workers.

The signaling process keeps no media state but a cache of each room's tracks (for `joined`);
everything else happens in the room's worker (``sfu.pool``). ``GroupCall`` is the hub's
``RoomMedia`` and the feature that handles the media messages; with the SFU disabled (or not
started yet) those answer ``sfu_unavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from sfu.channel import (
    AnswerRequest,
    IceRequest,
    JoinRequest,
    MuteRequest,
    PauseRequest,
    PoolEvent,
    RenderRequest,
    RenderSize,
    RoomRequest,
    RoomStatsRequest,
    SubscribeRequest,
    TrackInfo,
    TrackMeta,
    UnpublishRequest,
)
from sfu.pool import SfuError, SfuPool
from sfu.tasks import TaskSet

from ..config import SfuSection
from ..core.feature import Feature
from ..core.hub import Hub
from ..core.metrics import Metric
from ..core.session import Session
from ..wire.errors import ProtocolError
from ..wire.framing import encode
from .messages import ERRORS, MAX_RENDER_SIDE, MESSAGES, TRACK_PATTERN
from .relay import MediaRelay

log = logging.getLogger("rallypoint.media")

SOURCES = ("camera", "microphone", "screen")

#: The SFU workers' counters as /metrics shows them (summed over workers).
SFU_METRICS: dict[str, tuple[str, str]] = {
    "rooms": ("gauge", "Rooms hosted by the SFU workers."),
    "packets_in": ("counter", "RTP packets received from publishers."),
    "packets_out": ("counter", "RTP packets forwarded to subscribers."),
    "retransmitted": ("counter", "Packets resent from the cache on a subscriber's NACK."),
    "nacks_upstream": ("counter", "NACKs sent to publishers."),
    "keyframe_requests": ("counter", "Keyframe requests (PLI) sent to publishers."),
    "keyframes_replayed": (
        "counter",
        "New subscribers started from a cached keyframe (no keyframe request).",
    ),
    "dropped_malformed": ("counter", "Incoming packets that could not be forwarded."),
    "dropped_no_route": ("counter", "Incoming packets with no track to forward them to."),
    "dropped_send": (
        "counter",
        "Packets to subscribers dropped because the socket could not take them (send buffer full).",
    ),
    "subscribe_offers": ("counter", "Subscriber offers made (renegotiations of subscribers)."),
    "render_reports": ("counter", "Render-size reports (`track_render`) applied."),
}
_TRACK_ID = re.compile(TRACK_PATTERN)


def _side(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_RENDER_SIDE


def _no_recording(room: str) -> dict[str, Any] | None:
    return None


def _log_failure(exc: BaseException) -> None:
    if not isinstance(exc, SfuError):  # SfuErrors were answered to the client already
        log.error("media task failed", exc_info=exc)


class GroupCall:
    """Bridges rooms in the hub and rooms in the SFU workers."""

    def __init__(self, hub: Hub, cfg: SfuSection) -> None:
        self.hub = hub
        self.cfg = cfg
        self.pool: SfuPool | None = None
        self.tracks: dict[str, dict[str, TrackInfo]] = {}
        self._tasks = TaskSet(_log_failure)
        # Recording (``signaling.recording``, hooked up in app.py): what a joiner is told of a
        # room's recording, and who hears that a worker ended one (room, recording, reason).
        self.recording_of: Callable[[str], dict[str, Any] | None] = _no_recording
        self.on_recording_ended: list[Callable[[str, str, str], None]] = []
        # Cluster mode (``relay``, set by app.py): a room's media is on one node of the
        # cluster; this node's sessions joined to each room's media (wherever it is).
        self.relay: MediaRelay | None = None
        self.members: dict[str, set[str]] = {}
        # (room, session) whose join of the room's media failed (Redis or the room's node
        # unreachable, or the worker not ready in time): joined again before their next media
        # request.
        self.unjoined: set[tuple[str, str]] = set()
        # (room, session) -> its join of the room's media, until the worker (or the room's
        # node) has answered it. The hub replies `joined` at once, without waiting for it: a
        # media request of that session waits for it first (``_call``), so that it cannot
        # reach the worker before the join (`not_in_room`).
        self.joining: dict[tuple[str, str], asyncio.Task[Any]] = {}

    def feature(self) -> Feature:
        return Feature(
            "groupcall",
            MESSAGES,
            {
                "publish": self.on_publish,
                "subscribe": self.on_subscribe,
                "subscribe_answer": self.on_subscribe_answer,
                "ice": self.on_ice,
                "track_mute": self.on_track_mute,
                "track_pause": self.on_track_pause,
                "track_render": self.on_track_render,
                "unpublish": self.on_unpublish,
            },
        )

    async def start(self) -> None:
        """Start the worker processes (if the SFU is enabled)."""
        cfg = self.cfg
        if not cfg.enabled:
            return
        pool = SfuPool(
            cfg.workers,
            self.on_event,
            cfg.video_codec,
            cfg.log_level,
            bind=cfg.bind_address,
            announce=cfg.public_address,
            port_min=cfg.port_min,
            port_max=cfg.port_max,
        )
        await pool.start()
        self.pool = pool

    async def close(self) -> None:
        await self._tasks.cancel()
        if self.relay is not None:
            await self.relay.close()
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()

    async def metrics(self) -> Iterable[Metric]:
        """The SFU workers' counters (asks each worker)."""
        if self.pool is None:
            return [] if self.relay is None else list(self.relay.metrics())
        totals: dict[str, float] = {}
        for stats in await self.pool.stats():
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
        out = []
        for k, v in totals.items():
            kind, help_ = SFU_METRICS.get(k, ("counter", f"SFU workers' {k}."))
            out.append(Metric(f"sfu_{k}", "gauge" if kind == "gauge" else "counter", help_, v))
        if self.relay is not None:
            out.extend(self.relay.metrics())
        return out

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    # -- RoomMedia (the hub tells) -----------------------------------------------------------

    def _join_request(self, s: Session, room: str) -> JoinRequest:
        grants = self.hub.grants_for(s, room) or frozenset()
        return {
            "op": "join",
            "room": room,
            "participant": s.id,
            "subscribe": "subscribe" in grants,
            "identity": s.identity,
            "name": s.name,
        }

    def joined(self, s: Session, room: str) -> list[dict[str, Any]]:
        """A session joined ``room``: tell its worker; returns the room's current tracks."""
        if self.relay is not None:
            self.members.setdefault(room, set()).add(s.id)
            self._start_join(room, s.id, self._join_relayed(self.relay, s, room, moved=False))
        elif self.pool is not None:
            self._start_join(room, s.id, self._join_local(self.pool, s, room))
        return self.tracks_of(room)

    def _start_join(self, room: str, pid: str, join: Coroutine[Any, Any, None]) -> None:
        """Run ``join`` in the background; the session's media requests wait for it."""
        key = (room, pid)
        task = self._tasks.spawn(join)
        self.joining[key] = task

        def done(t: asyncio.Task[Any]) -> None:
            if self.joining.get(key) is t:
                del self.joining[key]

        task.add_done_callback(done)

    async def _join_local(self, pool: SfuPool, s: Session, room: str) -> None:
        """Join the room's media in this node's worker. If that fails (the worker not ready in
        time, or it died), the session joins again before its next media request."""
        try:
            await pool.request(self._join_request(s, room))
        except SfuError:
            if room in s.rooms:  # (not if it left meanwhile)
                self.unjoined.add((room, s.id))
            raise
        self.unjoined.discard((room, s.id))

    async def _join_relayed(self, relay: MediaRelay, s: Session, room: str, *, moved: bool) -> None:
        """Cluster mode: join the room's media on its node. This node's track cache may not
        know the room's tracks yet (nobody here was in it): the joiner hears of those it was
        not told in `joined`. ``moved``: the session came from another node, where its
        media was: it is told to publish again (`media_failed`) once it has joined here."""
        try:
            result = await relay.request(self._join_request(s, room))
        except SfuError:
            if room in s.rooms:  # (not if it left meanwhile)
                self.unjoined.add((room, s.id))
            raise
        self.unjoined.discard((room, s.id))
        if moved:
            s.send({"type": "media_failed", "room": room, "which": "all"})
        known = self.tracks.setdefault(room, {})
        for t in result.get("tracks", []):
            if t["id"] not in known:
                known[t["id"]] = t
                s.send({"type": "track_published", "room": room, "track": t})

    async def _join_again(self, req: RoomRequest) -> None:
        pid = req.get("participant")
        s = self.hub.sessions.get(pid) if isinstance(pid, str) else None
        if s is None or req["room"] not in s.rooms:
            return
        if self.relay is not None:
            await self._join_relayed(self.relay, s, req["room"], moved=False)
        elif self.pool is not None:
            await self._join_local(self.pool, s, req["room"])

    def resumed(self, s: Session) -> None:
        """A session resumed: an offer sent while its socket was down was lost; send the
        waiting one again (same number)."""
        if self.relay is not None:
            self._resumed_relayed(self.relay, s)
            return
        pool = self.pool
        if pool is None:
            return
        for room in s.rooms:
            if pool.hosts(room):
                self._spawn(pool.request({"op": "subscribe", "room": room, "participant": s.id}))

    def _resumed_relayed(self, relay: MediaRelay, s: Session) -> None:
        """Cluster mode: a session that resumed on this node after another node had it (taken
        over) has no media here: its connections were that node's business (and its
        participant left the room's media there). It joins again and is told to publish
        again (`media_failed`, as when a worker dies) if the room has media."""
        for room in s.rooms:
            members = self.members.setdefault(room, set())
            if s.id in members:
                self._spawn(relay.request({"op": "subscribe", "room": room, "participant": s.id}))
            else:
                members.add(s.id)
                self._start_join(room, s.id, self._join_relayed(relay, s, room, moved=True))

    def tracks_of(self, room: str) -> list[dict[str, Any]]:
        return [dict(t) for t in self.tracks.get(room, {}).values()]

    def left(self, s: Session, room: str) -> None:
        relay = self.relay
        if relay is not None:
            members = self.members.get(room)
            if members is None or s.id not in members:
                return
            members.discard(s.id)
            self.unjoined.discard((room, s.id))
            if not members:
                del self.members[room]
            self._spawn(self._left_relayed(relay, room, s.id))
            return
        self.unjoined.discard((room, s.id))
        pool = self.pool
        if pool is not None and pool.hosts(room):
            self._spawn(pool.request({"op": "leave", "room": room, "participant": s.id}))

    async def _left_relayed(self, relay: MediaRelay, room: str, pid: str) -> None:
        try:
            await relay.request({"op": "leave", "room": room, "participant": pid})
        finally:
            # Nobody here is in it: looked up when next needed, and its track cache, which
            # its node no longer keeps up to date here, is dropped.
            if room not in self.members and relay.forget_room(room):
                self.tracks.pop(room, None)

    # -- worker events -----------------------------------------------------------------------

    def on_event(self, ev: PoolEvent) -> None:
        """An event of this node's workers (its rooms' media)."""
        self._on_event(ev)
        if self.relay is not None:
            self.relay.forward(ev)  # to other nodes' participants and track caches

    def _on_event(self, ev: PoolEvent) -> None:
        hub = self.hub
        bus = hub.bus
        room = ev["room"]
        if ev["ev"] == "subscribe_offer":
            s = hub.sessions.get(ev["participant"])
            if s is not None:
                s.send(
                    {
                        "type": "subscribe_offer",
                        "room": room,
                        "sdp": ev["sdp"],
                        "tracks": ev["tracks"],
                        "offer": ev["offer"],
                    }
                )
        elif ev["ev"] == "track_published" or ev["ev"] == "track_updated":
            self.tracks.setdefault(room, {})[ev["track"]["id"]] = ev["track"]
            bus.publish(
                f"room:{room}", encode({"type": ev["ev"], "room": room, "track": ev["track"]})
            )
        elif ev["ev"] == "track_unpublished":
            self.tracks.get(room, {}).pop(ev["track"], None)
            bus.publish(
                f"room:{room}",
                encode(
                    {
                        "type": "track_unpublished",
                        "room": room,
                        "track": ev["track"],
                        "participant": ev["participant"],
                    }
                ),
            )
        elif ev["ev"] == "active_speaker":
            bus.publish(
                f"room:{room}",
                encode({"type": "active_speaker", "room": room, "speakers": ev["speakers"]}),
            )
        elif ev["ev"] == "track_starved":
            s = hub.sessions.get(ev["participant"])
            if s is not None:
                s.send(
                    {
                        "type": "track_starved",
                        "room": room,
                        "track": ev["track"],
                        "starved": ev["starved"],
                    }
                )
        elif ev["ev"] == "media_failed":
            s = hub.sessions.get(ev["participant"])
            if s is not None:
                s.send({"type": "media_failed", "room": room, "which": ev["which"]})
        elif ev["ev"] == "room_closed":
            self.tracks.pop(room, None)
        elif ev["ev"] == "recording_stopped":
            for ended in self.on_recording_ended:
                ended(room, ev["recording"], ev["reason"])
        elif ev["ev"] == "room_lost":
            self._room_lost(room)

    def relayed(self, ev: PoolEvent) -> None:
        """Cluster mode: an event of the worker hosting ``ev["room"]`` on another node, for
        this node's participants (the room's clients hear track changes and speakers on the
        room's bus topic, from that node: here they only keep the track cache)."""
        name = ev["ev"]
        room = ev["room"]
        if name in ("subscribe_offer", "track_starved", "media_failed"):
            self._on_event(ev)
        elif ev["ev"] == "track_published" or ev["ev"] == "track_updated":
            self.tracks.setdefault(room, {})[ev["track"]["id"]] = ev["track"]
        elif ev["ev"] == "track_unpublished":
            self.tracks.get(room, {}).pop(ev["track"], None)
        elif name == "room_closed":
            self.tracks.pop(room, None)
        elif name == "room_lost":  # the room's node told its clients; this node's join again
            self.tracks.pop(room, None)
            self._rejoin(room)

    def lost_elsewhere(self, room: str) -> None:
        """Cluster mode: the node hosting ``room``'s media died. Its tracks are gone; this
        node's participants in it are told (only here: every node tells its own) and join
        again, where the room is placed now."""
        tracks = self.tracks.pop(room, {})
        for pid in sorted(self.members.get(room, ())):
            s = self.hub.sessions.get(pid)
            if s is None:
                continue
            for tid, t in tracks.items():
                s.send(
                    {
                        "type": "track_unpublished",
                        "room": room,
                        "track": tid,
                        "participant": t["participant"],
                    }
                )
            s.send({"type": "media_failed", "room": room, "which": "all"})
        self._rejoin(room)

    async def unplaced(self, room: str, others: list[str]) -> None:
        """Cluster mode: ``room``'s media was hosted here, but the cluster forgot that (this
        node was taken for dead, or Redis lost the map) and may have placed it elsewhere.
        Everyone leaves it here (this node's participants and ``others``, whose nodes the
        relay tells next), then this node's participants are told as if the room's node had
        died, and join again where the room is placed now."""
        for pid in sorted(self.members.get(room, ())) + others:
            with contextlib.suppress(SfuError):
                await self.local({"op": "leave", "room": room, "participant": pid})
        self.lost_elsewhere(room)

    def _rejoin(self, room: str) -> None:
        for pid in sorted(self.members.get(room, ())):
            s = self.hub.sessions.get(pid)
            if s is not None and room in s.rooms:
                self.joined(s, room)

    def _room_lost(self, room: str) -> None:
        """The room's worker died: its tracks are gone, and everyone still in the room joins
        the restarted worker (and publishes again, told by `media_failed`)."""
        bus = self.hub.bus
        for tid, t in self.tracks.pop(room, {}).items():
            bus.publish(
                f"room:{room}",
                encode(
                    {
                        "type": "track_unpublished",
                        "room": room,
                        "track": tid,
                        "participant": t["participant"],
                    }
                ),
            )
        bus.publish(f"room:{room}", encode({"type": "media_failed", "room": room, "which": "all"}))
        recording = self.recording_of(room)
        if recording is not None:  # what was written stays; the recording ends here
            for ended in self.on_recording_ended:
                ended(room, recording["recording"], "error")
        hub_room = self.hub.rooms.get(room)
        if hub_room is not None:
            for pid in hub_room.participants:
                s = self.hub.sessions.get(pid)
                if s is not None:
                    self.joined(s, room)

    # -- handlers ----------------------------------------------------------------------------

    def _need(self, s: Session, room: str, grant: str) -> None:
        if room not in s.rooms:
            raise ProtocolError("not_in_room", f"join room {room!r} first")
        grants = self.hub.grants_for(s, room) or frozenset()
        if grant not in grants:
            raise ProtocolError("forbidden", f"the token has no {grant} grant in {room!r}")

    def media_node(self, room: str) -> str:
        """Cluster mode: the other node known to host ``room``'s media ("" if none: the
        room is this node's, or not placed yet, or there is one node)."""
        relay = self.relay
        if relay is None:
            return ""
        node = relay.where.get(room, "")
        return "" if node == relay.node_id else node

    def hosting(self) -> bool:
        """Whether this node runs SFU workers (a cluster may place rooms' media here)."""
        return self.pool is not None

    async def local(self, req: RoomRequest) -> dict[str, Any]:
        """Run ``req`` on this node's workers (``SfuError`` if it fails)."""
        pool = self.pool
        if pool is None:
            raise SfuError("sfu_unavailable", "media is disabled on this server")
        return await pool.request(req)

    async def _call(self, req: RoomRequest) -> dict[str, Any]:
        relay = self.relay
        pool = self.pool
        if pool is None and relay is None:
            raise ProtocolError("sfu_unavailable", "media is disabled on this server")
        try:
            pid = req.get("participant")
            if isinstance(pid, str):
                key = (req["room"], pid)
                joining = self.joining.get(key)
                if joining is not None:  # sent after `join`: must not overtake it
                    await asyncio.wait((joining,))  # a failure leaves the key in unjoined
                if key in self.unjoined:
                    await self._join_again(req)
            if relay is not None:
                return await relay.request(req)
            assert pool is not None
            return await pool.request(req)
        except SfuError as e:
            # The worker's codes are this feature's, or not_in_room; anything else is a bug.
            code = e.code if e.code in ERRORS or e.code == "not_in_room" else "internal_error"
            raise ProtocolError(code, e.message) from None

    async def on_publish(self, s: Session, m: dict[str, Any]) -> None:
        room = m["room"]
        self._need(s, room, "publish")
        tracks: list[TrackMeta] = []
        for t in m.get("tracks", []):
            if not isinstance(t.get("mid"), str) or t.get("source") not in SOURCES:
                raise ProtocolError(
                    "bad_field",
                    "each of `tracks` needs a string `mid` and a "
                    "`source` of camera, microphone or screen",
                )
            tracks.append({"mid": t["mid"][:32], "source": t["source"]})
        result = await self._call(
            {"op": "publish", "room": room, "participant": s.id, "sdp": m["sdp"], "tracks": tracks}
        )
        s.reply({"type": "publish_answer", "room": room, "sdp": result["sdp"]}, m)

    async def _relay(self, s: Session, m: dict[str, Any], grant: str, req: RoomRequest) -> None:
        """Check ``grant``, send the worker ``req`` and say ok."""
        self._need(s, m["room"], grant)
        await self._call(req)
        s.ok(m)

    async def on_subscribe(self, s: Session, m: dict[str, Any]) -> None:
        req: SubscribeRequest = {"op": "subscribe", "room": m["room"], "participant": s.id}
        await self._relay(s, m, "subscribe", req)

    async def on_subscribe_answer(self, s: Session, m: dict[str, Any]) -> None:
        req: AnswerRequest = {
            "op": "answer",
            "room": m["room"],
            "participant": s.id,
            "sdp": m["sdp"],
        }
        await self._relay(s, m, "subscribe", req)

    async def on_ice(self, s: Session, m: dict[str, Any]) -> None:
        cand = m.get("candidate")
        if cand is not None and not isinstance(cand.get("candidate", ""), str):
            raise ProtocolError("bad_field", "`candidate.candidate` must be a string")
        req: IceRequest = {
            "op": "ice",
            "room": m["room"],
            "participant": s.id,
            "target": m["target"],
            "candidate": cand,
        }
        await self._relay(s, m, "join", req)

    async def on_track_mute(self, s: Session, m: dict[str, Any]) -> None:
        req: MuteRequest = {
            "op": "mute",
            "room": m["room"],
            "participant": s.id,
            "track": m["track"],
            "muted": m["muted"],
        }
        await self._relay(s, m, "publish", req)

    async def on_track_pause(self, s: Session, m: dict[str, Any]) -> None:
        req: PauseRequest = {
            "op": "pause",
            "room": m["room"],
            "participant": s.id,
            "track": m["track"],
            "paused": m["paused"],
        }
        await self._relay(s, m, "subscribe", req)

    async def on_track_render(self, s: Session, m: dict[str, Any]) -> None:
        sizes: list[RenderSize] = []
        for t in m["tracks"]:
            track, w, h = t.get("track"), t.get("width"), t.get("height")
            if not (isinstance(track, str) and _TRACK_ID.match(track) and _side(w) and _side(h)):
                raise ProtocolError(
                    "bad_field",
                    "each of `tracks` needs a `track` id and integer `width` and `height` "
                    f"from 0 to {MAX_RENDER_SIDE} (0 x 0: not shown)",
                )
            sizes.append({"track": track, "width": w, "height": h})
        req: RenderRequest = {
            "op": "render",
            "room": m["room"],
            "participant": s.id,
            "tracks": sizes,
        }
        await self._relay(s, m, "subscribe", req)

    async def room_stats(self, room: str) -> dict[str, Any]:
        """What the room's subscribers are sent, per track (``sfu.channel.ForwardingStats``)
        and its simulcast layers' sizes; raises ``ProtocolError`` (``not_in_room``) when no
        worker hosts the room."""
        if self.pool is None or not self.pool.hosts(room):
            raise ProtocolError("not_in_room", f"no media in room {room!r}")
        req: RoomStatsRequest = {"op": "room_stats", "room": room}
        return await self._call(req)

    async def on_unpublish(self, s: Session, m: dict[str, Any]) -> None:
        req: UnpublishRequest = {
            "op": "unpublish",
            "room": m["room"],
            "participant": s.id,
            "track": m["track"],
        }
        await self._relay(s, m, "publish", req)
