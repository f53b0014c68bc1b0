"""Media signaling: publishing, subscribing and track state, routed to the SFU workers.

The signaling process keeps no media state but a cache of each room's tracks (for `joined`);
everything else happens in the room's worker (``sfu.pool``). This module adds its messages to the
protocol tables and its handlers to ``hub.HANDLERS`` when it is imported (``signaling.server``
imports it).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from sfu.pool import SfuError, SfuPool
from sfu.tasks import TaskSet

from .hub import HANDLERS, Hub
from .protocol import (
    CLIENT_MESSAGES,
    ERROR_CODES,
    ROOM_PATTERN,
    SCHEMA_DEFINITIONS,
    SERVER_MESSAGES,
    TOKEN_PATTERN,
    Field,
    MessageSpec,
    ProtocolError,
    encode,
)
from .session import Session

log = logging.getLogger("rallypoint.media")

_ROOM = Field("room", "string", "Room name.", required=True, pattern=ROOM_PATTERN)
_ID = Field("id", "string", "Request id; echoed as `re` in the reply.", pattern=TOKEN_PATTERN)
_SDP = Field("sdp", "string", "Session description (SDP).", required=True, max_length=60000)
_TRACK = Field(
    "track",
    "string",
    "Track id (from `tracks` or `track_published`).",
    required=True,
    pattern=r"^[\x21-\x7e]{1,160}$",
)


def _s(name: str, kind: str, doc: str, *, required: bool = True, ref: str | None = None) -> Field:
    return Field(name, kind, doc, required=required, ref=ref)


MEDIA_CLIENT: dict[str, MessageSpec] = {
    s.type: s
    for s in (
        MessageSpec(
            "publish",
            "Offer the tracks this client sends to the room's SFU (also to "
            "add, e.g. a screen share, or stop tracks later); answered with "
            "`publish_answer`.",
            (
                _ROOM,
                _SDP,
                Field(
                    "tracks",
                    "array",
                    "`{mid, source}` for the offer's media "
                    "sections; source is camera, microphone or screen.",
                    items="object",
                    max_items=16,
                ),
                _ID,
            ),
        ),
        MessageSpec(
            "subscribe",
            "Ready to receive: the server (re)sends the current "
            "`subscribe_offer` (one is also sent unasked after `join` and on changes).",
            (_ROOM, _ID),
        ),
        MessageSpec("subscribe_answer", "Answer to a `subscribe_offer`.", (_ROOM, _SDP, _ID)),
        MessageSpec(
            "ice",
            "A trickled ICE candidate for the publisher or subscriber "
            "connection; without `candidate`, end of candidates.",
            (
                _ROOM,
                Field(
                    "target",
                    "string",
                    "Which connection.",
                    required=True,
                    enum=("publisher", "subscriber"),
                ),
                Field(
                    "candidate",
                    "object",
                    "RTCIceCandidateInit: `candidate`, `sdpMid`, `sdpMLineIndex`.",
                ),
                _ID,
            ),
        ),
        MessageSpec(
            "track_mute",
            "Mark one of your published tracks muted or unmuted.",
            (_ROOM, _TRACK, Field("muted", "boolean", "Muted.", required=True), _ID),
        ),
        MessageSpec(
            "track_pause",
            "Stop or resume receiving a track (a hidden tile costs nothing downstream).",
            (_ROOM, _TRACK, Field("paused", "boolean", "Paused.", required=True), _ID),
        ),
        MessageSpec("unpublish", "Stop publishing a track.", (_ROOM, _TRACK, _ID)),
    )
}

MEDIA_SERVER: dict[str, MessageSpec] = {
    s.type: s
    for s in (
        MessageSpec(
            "publish_answer",
            "Answer to `publish`.",
            (
                _s("room", "string", "Room."),
                _s("sdp", "string", "SDP answer."),
                _s("re", "string", "Request id.", required=False),
            ),
        ),
        MessageSpec(
            "subscribe_offer",
            "The SFU offers the room's tracks (again, after each "
            "change); answer with `subscribe_answer`.",
            (
                _s("room", "string", "Room."),
                _s("sdp", "string", "SDP offer."),
                _s(
                    "tracks",
                    "array",
                    "Each offered track with the `mid` of its media section.",
                    ref="Track",
                ),
                _s(
                    "offer",
                    "integer",
                    "Number of this offer on the connection (a resent offer keeps its number: "
                    "answer each number once).",
                ),
            ),
        ),
        MessageSpec(
            "track_published",
            "A participant started publishing a track.",
            (_s("room", "string", "Room."), _s("track", "object", "The track.", ref="Track")),
        ),
        MessageSpec(
            "track_unpublished",
            "A track is gone.",
            (
                _s("room", "string", "Room."),
                _s("track", "string", "Track id."),
                _s("participant", "string", "Its publisher."),
            ),
        ),
        MessageSpec(
            "track_updated",
            "A track's muted state changed.",
            (_s("room", "string", "Room."), _s("track", "object", "The track.", ref="Track")),
        ),
        MessageSpec(
            "track_starved",
            "Your bandwidth is too low for this video track: it is "
            "paused for you (audio goes on) until the estimate recovers.",
            (
                _s("room", "string", "Room."),
                _s("track", "string", "Track id."),
                _s("starved", "boolean", "true: paused for bandwidth."),
            ),
        ),
        MessageSpec(
            "active_speaker",
            "Who is speaking, loudest first (may be empty).",
            (_s("room", "string", "Room."), _s("speakers", "array", "Participant ids.")),
        ),
        MessageSpec(
            "media_failed",
            "Your media connection failed or the SFU restarted; "
            "publish again (a new `subscribe_offer` follows when there is "
            "something to receive).",
            (_s("room", "string", "Room."), _s("which", "string", "publisher | subscriber | all")),
        ),
    )
}

MEDIA_ERRORS = {
    "bad_sdp": "The SDP offer, answer or ICE candidate is malformed or does not fit.",
    "no_usable_codec": "The offer has no codec the room uses (Opus; VP8 or H.264).",
    "no_such_track": "No such track (or it is not yours to change).",
    "sfu_unavailable": "Media is not available (SFU disabled, starting or restarting).",
}

SCHEMA_DEFINITIONS["Track"] = {
    "type": "object",
    "required": ["id", "participant", "kind", "source", "muted", "codec"],
    "properties": {
        "id": {"type": "string"},
        "participant": {"type": "string", "description": "Publisher's participant id."},
        "kind": {"enum": ["audio", "video"]},
        "source": {"enum": ["camera", "microphone", "screen"]},
        "muted": {"type": "boolean"},
        "codec": {"type": "string"},
        "mid": {"type": "string", "description": "In `subscribe_offer`: the media section."},
    },
}
CLIENT_MESSAGES.update(MEDIA_CLIENT)
SERVER_MESSAGES.update(MEDIA_SERVER)
ERROR_CODES.update(MEDIA_ERRORS)


def _log_failure(exc: BaseException) -> None:
    if not isinstance(exc, SfuError):  # SfuErrors were answered to the client already
        log.error("media task failed", exc_info=exc)


class MediaRouter:
    """Bridges rooms in the hub and rooms in the SFU workers."""

    def __init__(self, hub: Hub, pool: SfuPool) -> None:
        self.hub = hub
        self.pool = pool
        self.tracks: dict[str, dict[str, dict[str, Any]]] = {}
        self._tasks = TaskSet(_log_failure)
        hub.on_session_resume.append(self.resumed)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._tasks.spawn(coro)

    async def close(self) -> None:
        await self._tasks.cancel()

    # -- hub hooks -------------------------------------------------------------------------------

    def joined(self, s: Session, room: str) -> list[dict[str, Any]]:
        """A session joined ``room``: tell its worker; returns the room's current tracks."""
        grants = self.hub.grants_for(s, room) or frozenset()
        self._spawn(
            self.pool.request(room, "join", participant=s.id, subscribe="subscribe" in grants)
        )
        return list(self.tracks.get(room, {}).values())

    def resumed(self, s: Session) -> None:
        """A session resumed: an offer sent while its socket was down was lost; send the
        waiting one again (same number)."""
        for room in s.rooms:
            if room in self.pool.room_worker:
                self._spawn(self.pool.request(room, "subscribe", participant=s.id))

    def tracks_of(self, room: str) -> list[dict[str, Any]]:
        return list(self.tracks.get(room, {}).values())

    def left(self, s: Session, room: str) -> None:
        if room in self.pool.room_worker:
            self._spawn(self.pool.request(room, "leave", participant=s.id))

    # -- worker events ---------------------------------------------------------------------------

    def on_event(self, msg: dict[str, Any]) -> None:
        ev = msg["ev"]
        room = msg.get("room", "")
        bus = self.hub.bus
        if ev == "subscribe_offer":
            s = self.hub.sessions.get(msg["participant"])
            if s is not None:
                s.send(
                    {
                        "type": "subscribe_offer",
                        "room": room,
                        "sdp": msg["sdp"],
                        "tracks": msg["tracks"],
                        "offer": msg["offer"],
                    }
                )
        elif ev in ("track_published", "track_updated"):
            self.tracks.setdefault(room, {})[msg["track"]["id"]] = msg["track"]
            bus.publish(f"room:{room}", encode({"type": ev, "room": room, "track": msg["track"]}))
        elif ev == "track_unpublished":
            self.tracks.get(room, {}).pop(msg["track"], None)
            bus.publish(
                f"room:{room}",
                encode(
                    {
                        "type": ev,
                        "room": room,
                        "track": msg["track"],
                        "participant": msg["participant"],
                    }
                ),
            )
        elif ev == "active_speaker":
            bus.publish(
                f"room:{room}", encode({"type": ev, "room": room, "speakers": msg["speakers"]})
            )
        elif ev in ("track_starved", "media_failed"):
            s = self.hub.sessions.get(msg["participant"])
            if s is not None:
                out = {"type": ev, "room": room}
                out.update({k: msg[k] for k in ("track", "starved", "which") if k in msg})
                s.send(out)
        elif ev in ("room_closed", "room_lost"):
            gone = self.tracks.pop(room, {})
            if ev == "room_lost":
                for tid, t in gone.items():
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
                bus.publish(
                    f"room:{room}", encode({"type": "media_failed", "room": room, "which": "all"})
                )
                # Everyone still in the room rejoins the restarted worker.
                hub_room = self.hub.rooms.get(room)
                if hub_room is not None:
                    for pid in hub_room.participants:
                        s = self.hub.sessions.get(pid)
                        if s is not None:
                            self.joined(s, room)


# -- handlers --------------------------------------------------------------------------------


def _router(hub: Hub) -> MediaRouter:
    media = getattr(hub, "media", None)
    if media is None:
        raise ProtocolError("sfu_unavailable", "media is disabled on this server")
    assert isinstance(media, MediaRouter)
    return media


def _need(hub: Hub, s: Session, room: str, grant: str) -> None:
    if room not in s.rooms:
        raise ProtocolError("not_in_room", f"join room {room!r} first")
    grants = hub.grants_for(s, room) or frozenset()
    if grant not in grants:
        raise ProtocolError("forbidden", f"the token has no {grant} grant in {room!r}")


async def _call(hub: Hub, room: str, op: str, **fields: Any) -> dict[str, Any]:
    try:
        return await _router(hub).pool.request(room, op, **fields)
    except SfuError as e:
        raise ProtocolError(
            e.code if e.code in ERROR_CODES else "internal_error", e.message
        ) from None


def _reply(s: Session, msg: dict[str, Any], req: dict[str, Any]) -> None:
    if "id" in req:
        msg["re"] = req["id"]
    s.send(msg)


async def on_publish(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    room = m["room"]
    _need(hub, s, room, "publish")
    tracks = []
    for t in m.get("tracks", []):
        if not isinstance(t.get("mid"), str) or t.get("source") not in (
            "camera",
            "microphone",
            "screen",
        ):
            raise ProtocolError(
                "bad_field",
                "each of `tracks` needs a string `mid` and a "
                "`source` of camera, microphone or screen",
            )
        tracks.append({"mid": t["mid"][:32], "source": t["source"]})
    result = await _call(hub, room, "publish", participant=s.id, sdp=m["sdp"], tracks=tracks)
    _reply(s, {"type": "publish_answer", "room": room, "sdp": result["sdp"]}, m)


def _relay(
    grant: str, op: str, *fields: str
) -> Callable[[Hub, Session, dict[str, Any]], Awaitable[None]]:
    """A handler that checks ``grant``, passes ``fields`` to the worker's ``op`` and says ok."""

    async def handle(hub: Hub, s: Session, m: dict[str, Any]) -> None:
        _need(hub, s, m["room"], grant)
        await _call(hub, m["room"], op, participant=s.id, **{f: m.get(f) for f in fields})
        if "id" in m:
            s.send({"type": "ok", "re": m["id"]})

    return handle


on_subscribe = _relay("subscribe", "subscribe")
on_subscribe_answer = _relay("subscribe", "answer", "sdp")
on_track_mute = _relay("publish", "mute", "track", "muted")
on_track_pause = _relay("subscribe", "pause", "track", "paused")
on_unpublish = _relay("publish", "unpublish", "track")
_ice = _relay("join", "ice", "target", "candidate")


async def on_ice(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    cand = m.get("candidate")
    if cand is not None and not isinstance(cand.get("candidate", ""), str):
        raise ProtocolError("bad_field", "`candidate.candidate` must be a string")
    await _ice(hub, s, m)


HANDLERS.update(
    {
        "publish": on_publish,
        "subscribe": on_subscribe,
        "subscribe_answer": on_subscribe_answer,
        "ice": on_ice,
        "track_mute": on_track_mute,
        "track_pause": on_track_pause,
        "unpublish": on_unpublish,
    }
)
