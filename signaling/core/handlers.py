"""Handlers of the core's client messages: the session (`hello`, `ping`, `bye`), rooms (`join`,
`leave`, `update`, moderation) and presence (`presence`, `watch`)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..wire.errors import CloseCode, ProtocolError
from ..wire.framing import encode
from .feature import Feature
from .hub import Hub, ms
from .messages import MESSAGES
from .rooms import Participant, Room
from .session import Session


class CoreHandlers:
    """The core's handlers, bound to one hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def feature(self) -> Feature:
        return Feature(
            "core",
            MESSAGES,
            {
                "hello": self.on_hello,
                "ping": self.on_ping,
                "bye": self.on_bye,
                "join": self.on_join,
                "leave": self.on_leave,
                "update": self.on_update,
                "kick": self.on_kick,
                "mute": self.on_mute,
                "lock": self.on_lock,
                "presence": self.on_presence,
                "watch": self.on_watch,
            },
        )

    # -- helpers ---------------------------------------------------------------------------------

    def _room_in(self, session: Session, name: str) -> tuple[Room, Participant]:
        room = self.hub.rooms.get(name)
        p = session.rooms.get(name)
        if room is None or p is None:
            raise ProtocolError("not_in_room", f"you are not in room {name!r}")
        return room, p

    def _moderator_in(self, session: Session, name: str) -> Room:
        room, p = self._room_in(session, name)
        if not p.moderator:
            raise ProtocolError("forbidden", f"you are not a moderator of {name!r}")
        return room

    # -- session ---------------------------------------------------------------------------------

    async def on_hello(self, s: Session, m: dict[str, Any]) -> None:
        raise ProtocolError("already_welcomed", "this connection already has a session")

    async def on_ping(self, s: Session, m: dict[str, Any]) -> None:
        out: dict[str, Any] = {"type": "pong", "server_time": ms()}
        if "ts" in m:
            out["ts"] = m["ts"]
        s.reply(out, m)

    async def on_bye(self, s: Session, m: dict[str, Any]) -> None:
        conn = s.conn
        s.ok(m)
        self.hub.end_session(s, "left")
        if conn is not None:
            await conn.close(CloseCode.NORMAL, "bye")

    # -- rooms -----------------------------------------------------------------------------------

    async def on_join(self, s: Session, m: dict[str, Any]) -> None:
        hub = self.hub
        name: str = m["room"]
        grants = hub.grants_for(s, name)
        if grants is None:
            raise ProtocolError("token_wrong_room", f"the token grants nothing in room {name!r}")
        if "join" not in grants:
            raise ProtocolError("forbidden", f"the token has no join grant in room {name!r}")
        conv = f"room:{name}"
        if hub.shared is not None:
            await self._join_shared(s, m, name, grants)
            return
        # Before any state changes: no await after this.
        last_seq = await hub.conversations.last_seq(conv)
        room = hub.rooms.get_or_create(name)
        p = s.rooms.get(name)
        if p is None:
            cfg = hub.cfg
            moderator = "moderate" in grants or (
                cfg.open_mode and cfg.rooms.first_joiner_moderates and not room.participants
            )
            p = Participant(s.id, s.identity, s.name, ms(), moderator)
            room.join(p, time.monotonic())
            s.rooms[name] = p
            tracks = self._entered(s, name, p)
        else:
            tracks = hub.media.tracks_of(name)
        self._reply_joined(s, m, p, room.others(s.id), room.locked, last_seq, tracks)

    async def _join_shared(
        self, s: Session, m: dict[str, Any], name: str, grants: frozenset[str]
    ) -> None:
        """`join` in cluster mode: the room's checks and its participants are the cluster's
        (``SharedState.join``); this node's ``rooms`` keeps its own participants."""
        hub = self.hub
        shared = hub.shared
        assert shared is not None
        conv = f"room:{name}"
        last_seq = await hub.conversations.last_seq(conv)
        p = s.rooms.get(name)
        if p is None:
            cfg = hub.cfg
            new = Participant(s.id, s.identity, s.name, ms(), "moderate" in grants)
            new.node = shared.node_id
            p, locked, others = await shared.join(
                name,
                new,
                first_moderates=cfg.open_mode and cfg.rooms.first_joiner_moderates,
                max_participants=cfg.rooms.max_participants,
            )
            if hub.sessions.get(s.id) is not s:  # ended meanwhile
                shared.leave(name, p.id)
                return
            room = hub.rooms.get_or_create(name)
            room.locked = locked
            room.add(p)
            s.rooms[name] = p
            shared.save_session(s)
            tracks = self._entered(s, name, p)
        else:
            everyone, locked = await shared.room(name)
            others = [o for o in everyone if o.id != s.id]
            tracks = hub.media.tracks_of(name)
        # This node's own participants, whatever Redis answered (while it is unreachable).
        known = {o.id for o in others}
        here = hub.rooms.get(name)
        if here is not None:
            others.extend(o for o in here.others(s.id) if o.id not in known)
        self._reply_joined(s, m, p, others, locked, last_seq, tracks)

    def _entered(self, s: Session, name: str, p: Participant) -> list[dict[str, Any]]:
        """``s`` is in room ``name`` now as ``p``: it hears the room, the room hears of it, and
        the media side is told; the room's tracks."""
        hub = self.hub
        conv = f"room:{name}"
        hub.bus.subscribe(conv, s.id, s)
        hub.bus.publish(
            conv,
            encode({"type": "participant_joined", "room": name, "participant": p.to_wire()}),
            s.id,
        )
        return hub.media.joined(s, name)

    def _reply_joined(
        self,
        s: Session,
        m: dict[str, Any],
        p: Participant,
        others: list[Participant],
        locked: bool,
        last_seq: int,
        tracks: list[dict[str, Any]],
    ) -> None:
        name = m["room"]
        s.reply(
            {
                "type": "joined",
                "room": name,
                "self": p.to_wire(),
                "participants": [o.to_wire() for o in others],
                "locked": locked,
                "conversation": f"room:{name}",
                "last_seq": last_seq,
                "tracks": tracks,
                **_recording(self.hub.media.recording_of(name)),
            },
            m,
        )

    async def _target(self, room: Room, pid: str) -> Participant:
        """A participant of ``room`` on any node (``no_such_participant`` if none)."""
        shared = self.hub.shared
        if shared is None:
            return room.target(pid)
        p = room.participants.get(pid) or await shared.participant(room.name, pid)
        if p is None:
            raise ProtocolError("no_such_participant", f"no participant {pid!r} in {room.name!r}")
        return p

    def _ask_node(self, target: Participant, req: dict[str, Any]) -> None:
        """Ask the node of ``target`` (another node's participant) to kick or mute it."""
        self.hub.bus.publish(f"node:{target.node}", orjson.dumps(req))

    async def on_leave(self, s: Session, m: dict[str, Any]) -> None:
        self._room_in(s, m["room"])
        self.hub.leave(s, m["room"], "left")
        s.ok(m)

    async def on_update(self, s: Session, m: dict[str, Any]) -> None:
        room, p = self._room_in(s, m["room"])
        name = m["name"].strip() if "name" in m else None
        if name == "":  # validate everything before changing anything
            raise ProtocolError("bad_field", "`name` must not be empty")
        if "audio_muted" in m:
            p.audio_muted = m["audio_muted"]
        if "video_muted" in m:
            p.video_muted = m["video_muted"]
        if name is not None:
            p.name = name
        if self.hub.shared is not None:
            self.hub.shared.update(room.name, p)
            self.hub.shared.save_session(s)
        self.hub.bus.publish(
            f"room:{room.name}",
            encode({"type": "participant_updated", "room": room.name, "participant": p.to_wire()}),
            s.id,
        )
        s.ok(m)

    async def on_kick(self, s: Session, m: dict[str, Any]) -> None:
        room = self._moderator_in(s, m["room"])
        target = await self._target(room, m["participant"])
        victim = self.hub.sessions.get(target.id)
        if victim is not None:
            if room.name in victim.rooms:
                self.hub.kick(victim, room.name, s.id)
        elif target.node:
            self._ask_node(
                target, {"op": "kick", "room": room.name, "participant": target.id, "by": s.id}
            )
        s.ok(m)

    async def on_mute(self, s: Session, m: dict[str, Any]) -> None:
        room = self._moderator_in(s, m["room"])
        target = await self._target(room, m["participant"])
        victim = self.hub.sessions.get(target.id)
        if victim is not None:
            victim.send(
                {"type": "mute_requested", "room": room.name, "kind": m["kind"], "by": s.id}
            )
        elif target.node:
            self._ask_node(
                target,
                {
                    "op": "mute",
                    "room": room.name,
                    "participant": target.id,
                    "kind": m["kind"],
                    "by": s.id,
                },
            )
        s.ok(m)

    async def on_lock(self, s: Session, m: dict[str, Any]) -> None:
        room = self._moderator_in(s, m["room"])
        room.locked = m["locked"]
        if self.hub.shared is not None:
            await self.hub.shared.lock(room.name, room.locked)
        self.hub.bus.publish(
            f"room:{room.name}",
            encode({"type": "room_updated", "room": room.name, "locked": room.locked, "by": s.id}),
        )
        s.ok(m)

    # -- presence --------------------------------------------------------------------------------

    async def on_presence(self, s: Session, m: dict[str, Any]) -> None:
        self.hub.set_presence(s, m["status"])
        s.ok(m)

    async def on_watch(self, s: Session, m: dict[str, Any]) -> None:
        """Identities it may not see (``Hub.watchable``), or that do not exist, are answered
        and treated as offline ever after: the same frames at the same time as an identity
        that is offline and never comes online."""
        hub = self.hub
        idents = frozenset(m["identities"])
        allowed = await hub.watchable(s.identity, idents)
        if hub.sessions.get(s.id) is not s:  # ended meanwhile: nothing to follow
            return
        hub.watch(s, idents, allowed)
        s.reply({"type": "presence_state", "presence": await hub.presence_of(s, idents)}, m)


def _recording(r: dict[str, Any] | None) -> dict[str, Any]:
    """``joined.recording``: present while the room is being recorded."""
    return {} if r is None else {"recording": r}
