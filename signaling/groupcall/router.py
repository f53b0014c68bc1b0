"""Group-call media: publishing, subscribing and track state, routed to the SFU workers.

The signaling process keeps no media state but a cache of each room's tracks (for `joined`);
everything else happens in the room's worker (``sfu.pool``). ``GroupCall`` is the hub's
``RoomMedia`` and the feature that handles the media messages; with the SFU disabled (or not
started yet) those answer ``sfu_unavailable``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from sfu.channel import (
    AnswerRequest,
    IceRequest,
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
        pool, self.pool = self.pool, None
        if pool is not None:
            await pool.close()

    async def metrics(self) -> Iterable[Metric]:
        """The SFU workers' counters (asks each worker)."""
        if self.pool is None:
            return []
        totals: dict[str, float] = {}
        for stats in await self.pool.stats():
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
        out = []
        for k, v in totals.items():
            kind, help_ = SFU_METRICS.get(k, ("counter", f"SFU workers' {k}."))
            out.append(Metric(f"sfu_{k}", "gauge" if kind == "gauge" else "counter", help_, v))
        return out

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    # -- RoomMedia (the hub tells) -----------------------------------------------------------

    def joined(self, s: Session, room: str) -> list[dict[str, Any]]:
        """A session joined ``room``: tell its worker; returns the room's current tracks."""
        if self.pool is not None:
            grants = self.hub.grants_for(s, room) or frozenset()
            self._spawn(
                self.pool.request(
                    {
                        "op": "join",
                        "room": room,
                        "participant": s.id,
                        "subscribe": "subscribe" in grants,
                        "identity": s.identity,
                        "name": s.name,
                    }
                )
            )
        return self.tracks_of(room)

    def resumed(self, s: Session) -> None:
        """A session resumed: an offer sent while its socket was down was lost; send the
        waiting one again (same number)."""
        pool = self.pool
        if pool is None:
            return
        for room in s.rooms:
            if pool.hosts(room):
                self._spawn(pool.request({"op": "subscribe", "room": room, "participant": s.id}))

    def tracks_of(self, room: str) -> list[dict[str, Any]]:
        return [dict(t) for t in self.tracks.get(room, {}).values()]

    def left(self, s: Session, room: str) -> None:
        pool = self.pool
        if pool is not None and pool.hosts(room):
            self._spawn(pool.request({"op": "leave", "room": room, "participant": s.id}))

    # -- worker events -----------------------------------------------------------------------

    def on_event(self, ev: PoolEvent) -> None:
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

    async def _call(self, req: RoomRequest) -> dict[str, Any]:
        pool = self.pool
        if pool is None:
            raise ProtocolError("sfu_unavailable", "media is disabled on this server")
        try:
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
