"""The signaling hub: sessions, rooms, presence and chat routing for one node.

Handlers take a session and a validated message (``protocol.parse_client_message``), change
state, reply to the session and publish events on the bus. A reply answers a request's ``id``
with ``re``; events never carry ``re``. Between a store write completing and the fan-out there is
no ``await``, so every recipient sees a conversation's messages in sequence order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .bus import LocalBus
from .config import Config
from .presence import PresenceBook
from .protocol import PROTOCOL_VERSION, CloseCode, ProtocolError, encode, error_message
from .rooms import Participant, Room, RoomRegistry
from .session import Connection, Session
from .store import AppendResult, ChatStore, NewMessage, StoredMessage
from .tokens import Claims, open_claims, verify_token

log = logging.getLogger("rallypoint.hub")

INTERNAL_ERROR = ProtocolError("internal_error", "the server failed to handle this message")

# A handler either finishes before it returns (None) or returns what to await.
Handler = Callable[["Hub", Session, dict[str, Any]], Awaitable[None] | None]
IceProvider = Callable[[Session, str], list[dict[str, Any]]]


def _ms() -> int:
    return int(time.time() * 1000)


def dm_conversation(a: str, b: str) -> str:
    """The direct conversation id of two identities (sorted, so both sides agree)."""
    x, y = sorted((a, b))
    return f"dm:{x}|{y}"


class Hub:
    """All signaling state of this node."""

    def __init__(self, cfg: Config, store: ChatStore, ice: IceProvider | None = None) -> None:
        self.cfg = cfg
        self.store = store
        # Read on every chat message.
        self.max_text_chars = cfg.limits.max_text_chars
        self.edit_window_ms = cfg.chat.edit_window_s * 1000
        self.bus = LocalBus()
        self.ice = ice or (lambda _session, _host: [])
        self.sessions: dict[str, Session] = {}
        self.by_resume: dict[str, Session] = {}
        self.connections: set[Connection] = set()
        self.rooms = RoomRegistry(cfg.rooms.max_participants, cfg.rooms.empty_room_grace_s)
        self.presence = PresenceBook()
        self.watchers: dict[str, set[Session]] = {}
        # Feature modules (calls, media) hook session starts and ends here.
        self.on_session_start: list[Callable[[Session], None]] = []
        self.on_session_end: list[Callable[[Session, str], None]] = []
        # Media (signaling.media.MediaRouter) when the SFU is enabled.
        self.media: Any = None
        # Called after `welcome` (and the snapshots) went out on a resumed session.
        self.on_session_resume: list[Callable[[Session], None]] = []
        # Called after a chat message was stored and published (not for duplicates).
        self.on_message: list[Callable[[StoredMessage, tuple[str, ...]], None]] = []
        # Extra room grants beyond the token's (e.g. a call's media room for its parties).
        self.room_grants: list[Callable[[Session, str], frozenset[str] | None]] = []
        self.counters: dict[str, int] = {
            "messages_stored": 0,
            "errors_sent": 0,
            "rate_limited": 0,
            "slow_consumers": 0,
            "heartbeat_timeouts": 0,
            "resumes": 0,
            "internal_errors": 0,
        }

    # -- sessions --------------------------------------------------------------------------------

    def authenticate(self, hello: dict[str, Any]) -> Claims:
        """Claims for a `hello`, or ``ProtocolError`` (closing with 4001)."""
        token = hello.get("token")
        if self.cfg.open_mode:
            identity = hello.get("identity") or f"guest-{secrets.token_hex(4)}"
            name = (hello.get("name") or "").strip() or identity
            return open_claims(identity, name)
        if not token:
            raise ProtocolError(
                "token_required", "this server requires a token", close=CloseCode.AUTH_FAILED
            )
        try:
            claims = verify_token(token, self.cfg.auth.api_key, self.cfg.auth.api_secret)
        except ProtocolError as e:
            e.close = CloseCode.AUTH_FAILED
            raise
        return claims  # in token mode the token's name wins over `hello.name`

    def welcome(self, conn: Connection, hello: dict[str, Any], host: str) -> Session:
        """Bind ``conn`` to a new or resumed session and send `welcome` (and room snapshots).

        A valid resume token is enough to resume (a token, if also given, must name the same
        identity); an unknown or expired resume token is not an error: the client gets a new
        session (``resumed: false``) and must join its rooms again.
        """
        if hello["v"] != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported_version",
                f"this server speaks protocol version {PROTOCOL_VERSION}",
                close=CloseCode.AUTH_FAILED,
            )
        session = self.by_resume.get(hello.get("resume", ""))
        if session is not None and (hello.get("token") or "identity" in hello):
            claims = self.authenticate(hello)
            if claims.identity != session.identity:
                session = None
            else:
                session.claims = claims  # a fresh token refreshes the grants
        if session is None:
            claims = self.authenticate(hello)
            session = Session(
                secrets.token_urlsafe(9),
                claims,
                hello.get("device") or secrets.token_urlsafe(9),
                "",
            )
            self.sessions[session.id] = session
            self.bus.subscribe(f"user:{session.identity}", session.id, session)
            self._set_presence(session, "online")
            for hook in self.on_session_start:
                hook(session)
            resumed = False
        else:
            resumed = True
            self.counters["resumes"] += 1
            if session.expiry is not None:
                session.expiry.cancel()
                session.expiry = None
            if session.conn is not None:  # the old socket is half-dead; this one replaces it
                old_conn = session.conn
                old_conn.session = None
                old_conn.abandon(CloseCode.REPLACED, "session resumed on another connection")
            del self.by_resume[session.resume_token]
        session.resume_token = secrets.token_urlsafe(24)
        self.by_resume[session.resume_token] = session
        session.conn = conn
        session.host = host
        conn.session = session
        cfg = self.cfg
        msg: dict[str, Any] = {
            "type": "welcome",
            "session": session.id,
            "identity": session.identity,
            "name": session.name,
            "device": session.device,
            "server_time": _ms(),
            "heartbeat_ms": int(cfg.session.heartbeat_interval_s * 1000),
            "resume": session.resume_token,
            "resume_grace_ms": int(cfg.session.resume_grace_s * 1000),
            "resumed": resumed,
            "epoch": self.store.epoch,
            "open_mode": cfg.open_mode,
            "ice_servers": self.ice(session, host),
            "ice_transport_policy": "relay" if cfg.ice.relay_only else "all",
            "limits": {
                "max_frame_bytes": cfg.limits.max_frame_bytes,
                "max_text_chars": cfg.limits.max_text_chars,
                "rate_per_s": cfg.limits.rate_per_s,
                "burst": cfg.limits.burst,
                "edit_window_s": cfg.chat.edit_window_s,
            },
            "rooms": sorted(session.rooms),
        }
        if "id" in hello:
            msg["re"] = hello["id"]
        conn.send(msg)
        if resumed and session.watching:
            conn.send(
                {
                    "type": "presence_state",
                    "presence": [
                        {"identity": i, "status": self.presence.status(i)}
                        for i in sorted(session.watching)
                    ],
                }
            )
        for name in session.rooms:
            room = self.rooms.get(name)
            if room is not None:
                conn.send(
                    {
                        "type": "room_state",
                        "room": name,
                        "locked": room.locked,
                        "participants": [p.to_wire() for p in room.participants.values()],
                    }
                )
        if resumed:
            for resume_hook in self.on_session_resume:
                resume_hook(session)
        return session

    def detach(self, conn: Connection) -> None:
        """The connection ended: suspend its session for the resume grace period."""
        self.connections.discard(conn)
        session = conn.session
        if session is None or session.conn is not conn:
            return
        session.conn = None
        conn.session = None
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(
            self.cfg.session.resume_grace_s, self.end_session, session, "disconnected"
        )

    def end_session(self, session: Session, reason: str) -> None:
        """Forget a session: leave its rooms, update presence, drop its resume token."""
        if self.sessions.pop(session.id, None) is None:
            return
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        self.by_resume.pop(session.resume_token, None)
        for hook in self.on_session_end:
            hook(session, reason)
        now = time.monotonic()
        for name in list(session.rooms):
            self._leave(session, name, reason, now)
        self.bus.unsubscribe(f"user:{session.identity}", session.id)
        self._watch(session, frozenset())
        changed = self.presence.remove(session.identity, session.id)
        if changed is not None:
            self._publish_presence(session.identity, changed)
        conn = session.conn
        session.conn = None
        if conn is not None:
            conn.session = None

    def grants_for(self, session: Session, room: str) -> frozenset[str] | None:
        """The session's grants in ``room``: its token's, or those of a feature (calls)."""
        grants = session.claims.grants_for(room)
        if grants is None:
            for provider in self.room_grants:
                grants = provider(session, room)
                if grants is not None:
                    break
        return grants

    def sessions_of(self, identity: str) -> list[Session]:
        subs = self.bus.topics.get(f"user:{identity}", {})
        return [x for x in subs.values() if isinstance(x, Session)]

    def sweep(self, now: float) -> None:
        """Periodic: close silent connections and expire empty rooms."""
        deadline = now - 2.5 * self.cfg.session.heartbeat_interval_s
        for conn in list(self.connections):
            if conn.last_recv < deadline and not conn.closing:
                self.counters["heartbeat_timeouts"] += 1
                conn.abandon(CloseCode.HEARTBEAT_TIMEOUT, "no heartbeat")
        for name in self.rooms.expire(now):
            log.debug("room %s closed after being empty", name)

    # -- presence --------------------------------------------------------------------------------

    def _set_presence(self, session: Session, status: str) -> None:
        session.status = status
        changed = self.presence.set(session.identity, session.id, status)
        if changed is not None:
            self._publish_presence(session.identity, changed)

    def _publish_presence(self, identity: str, status: str) -> None:
        watchers = self.watchers.get(identity)
        if watchers:
            frame = encode({"type": "presence", "identity": identity, "status": status})
            for s in watchers:
                s.deliver(frame)

    def _watch(self, session: Session, identities: frozenset[str]) -> None:
        for ident in session.watching - identities:
            w = self.watchers.get(ident)
            if w is not None:
                w.discard(session)
                if not w:
                    del self.watchers[ident]
        for ident in identities - session.watching:
            self.watchers.setdefault(ident, set()).add(session)
        session.watching = identities

    # -- rooms -----------------------------------------------------------------------------------

    def _room_in(self, session: Session, name: str) -> tuple[Room, Participant]:
        room = self.rooms.get(name)
        p = session.rooms.get(name)
        if room is None or p is None:
            raise ProtocolError("not_in_room", f"you are not in room {name!r}")
        return room, p

    def _moderator_in(self, session: Session, name: str) -> Room:
        room, p = self._room_in(session, name)
        if not p.moderator:
            raise ProtocolError("forbidden", f"you are not a moderator of {name!r}")
        return room

    def _leave(self, session: Session, name: str, reason: str, now: float) -> None:
        session.rooms.pop(name, None)
        room = self.rooms.get(name)
        if room is None:
            return
        p = room.leave(session.id, now)
        self.bus.unsubscribe(f"room:{name}", session.id)
        if p is not None and self.media is not None:
            self.media.left(session, name)
        if p is not None:
            self.bus.publish(
                f"room:{name}",
                encode(
                    {
                        "type": "participant_left",
                        "room": name,
                        "participant": p.id,
                        "identity": p.identity,
                        "reason": reason,
                    }
                ),
            )

    # -- answering requests that failed -----------------------------------------------------------

    def refuse(self, to: Connection | Session, err: ProtocolError, rid: Any) -> None:
        """Answer request ``rid`` with ``err``: a stable code and a human message."""
        self.counters["errors_sent"] += 1
        to.send(error_message(err, rid))

    def failed(self, to: Connection | Session, rid: Any, what: str) -> None:
        """A bug while handling request ``rid`` (call from an ``except`` block): log the
        traceback, count it, and answer ``internal_error``; never a traceback to a client."""
        self.counters["internal_errors"] += 1
        log.exception(what)
        to.send(error_message(INTERNAL_ERROR, rid))

    # -- conversations ---------------------------------------------------------------------------

    def _conversation(
        self, session: Session, conv: str, *, joined: bool
    ) -> tuple[str, tuple[str, ...], bool]:
        """Check access to ``conv``; returns (topic or '', dm members, is moderator).

        Room chat needs the room in the token (``join`` grant), and ``joined`` actions (send,
        typing) need the session to be in the room with the ``chat`` grant. A direct conversation
        needs the identity to be one of its two members.
        """
        kind, _, rest = conv.partition(":")
        claims = session.claims
        if kind == "room":
            grants = self.grants_for(session, rest)
            if grants is None:
                raise ProtocolError("token_wrong_room", f"the token grants nothing in {rest!r}")
            p = session.rooms.get(rest)
            if joined:
                if p is None:
                    raise ProtocolError("not_in_room", f"join room {rest!r} to chat there")
                if "chat" not in grants:
                    raise ProtocolError("forbidden", f"the token has no chat grant in {rest!r}")
            elif "join" not in grants:
                raise ProtocolError("forbidden", f"the token has no join grant in {rest!r}")
            mod = "moderate" in grants or (p is not None and p.moderator)
            return conv, (), mod
        a, _, b = rest.partition("|")
        if a >= b or session.identity not in (a, b):
            raise ProtocolError(
                "bad_conversation",
                f"{conv!r} is not a direct conversation of yours (ids are dm:<a>|<b> with a < b)",
            )
        if not claims.dm:
            raise ProtocolError("forbidden", "the token does not allow direct messages")
        return "", (a, b), False

    def _publish_conv(
        self, conv: str, members: tuple[str, ...], frame: bytes, exclude: str
    ) -> None:
        if members:
            for m in members:
                self.bus.publish(f"user:{m}", frame, exclude)
        else:
            self.bus.publish(conv, frame, exclude)


# -- handlers ------------------------------------------------------------------------------------


def _reply(session: Session, msg: dict[str, Any], req: dict[str, Any]) -> None:
    if "id" in req:
        msg["re"] = req["id"]
    session.send(msg)


def _ok(session: Session, req: dict[str, Any]) -> None:
    if "id" in req:
        session.send({"type": "ok", "re": req["id"]})


async def on_hello(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    raise ProtocolError("already_welcomed", "this connection already has a session")


async def on_ping(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    out: dict[str, Any] = {"type": "pong", "server_time": _ms()}
    if "ts" in m:
        out["ts"] = m["ts"]
    _reply(s, out, m)


async def on_bye(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    conn = s.conn
    _ok(s, m)
    hub.end_session(s, "left")
    if conn is not None:
        await conn.close(CloseCode.NORMAL, "bye")


async def on_join(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    name: str = m["room"]
    grants = hub.grants_for(s, name)
    if grants is None:
        raise ProtocolError("token_wrong_room", f"the token grants nothing in room {name!r}")
    if "join" not in grants:
        raise ProtocolError("forbidden", f"the token has no join grant in room {name!r}")
    conv = f"room:{name}"
    last_seq = await hub.store.last_seq(conv)  # before any state changes: no await after this
    room = hub.rooms.get_or_create(name)
    p = s.rooms.get(name)
    if p is None:
        moderator = "moderate" in grants or (
            hub.cfg.open_mode and hub.cfg.rooms.first_joiner_moderates and not room.participants
        )
        p = Participant(s.id, s.identity, s.name, _ms(), moderator)
        room.join(p, time.monotonic())
        s.rooms[name] = p
        hub.bus.subscribe(conv, s.id, s)
        hub.bus.publish(
            conv,
            encode({"type": "participant_joined", "room": name, "participant": p.to_wire()}),
            s.id,
        )
        tracks = hub.media.joined(s, name) if hub.media is not None else []
    else:
        tracks = hub.media.tracks_of(name) if hub.media is not None else []
    _reply(
        s,
        {
            "type": "joined",
            "room": name,
            "self": p.to_wire(),
            "participants": [o.to_wire() for o in room.others(s.id)],
            "locked": room.locked,
            "conversation": conv,
            "last_seq": last_seq,
            "tracks": tracks,
        },
        m,
    )


async def on_leave(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    hub._room_in(s, m["room"])
    hub._leave(s, m["room"], "left", time.monotonic())
    _ok(s, m)


async def on_update(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    room, p = hub._room_in(s, m["room"])
    name = m["name"].strip() if "name" in m else None
    if name == "":  # validate everything before changing anything
        raise ProtocolError("bad_field", "`name` must not be empty")
    if "audio_muted" in m:
        p.audio_muted = m["audio_muted"]
    if "video_muted" in m:
        p.video_muted = m["video_muted"]
    if name is not None:
        p.name = name
    hub.bus.publish(
        f"room:{room.name}",
        encode({"type": "participant_updated", "room": room.name, "participant": p.to_wire()}),
        s.id,
    )
    _ok(s, m)


async def on_kick(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    room = hub._moderator_in(s, m["room"])
    target = room.target(m["participant"])
    victim = hub.sessions.get(target.id)
    if victim is not None:
        victim.send({"type": "kicked", "room": room.name, "by": s.id})
        hub._leave(victim, room.name, "kicked", time.monotonic())
    _ok(s, m)


async def on_mute(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    room = hub._moderator_in(s, m["room"])
    target = room.target(m["participant"])
    victim = hub.sessions.get(target.id)
    if victim is not None:
        victim.send({"type": "mute_requested", "room": room.name, "kind": m["kind"], "by": s.id})
    _ok(s, m)


async def on_lock(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    room = hub._moderator_in(s, m["room"])
    room.locked = m["locked"]
    hub.bus.publish(
        f"room:{room.name}",
        encode({"type": "room_updated", "room": room.name, "locked": room.locked, "by": s.id}),
    )
    _ok(s, m)


async def on_presence(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    hub._set_presence(s, m["status"])
    _ok(s, m)


async def on_watch(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    idents = frozenset(m["identities"])
    hub._watch(s, idents)
    _reply(
        s,
        {
            "type": "presence_state",
            "presence": [{"identity": i, "status": hub.presence.status(i)} for i in sorted(idents)],
        },
        m,
    )


def _append(hub: Hub, s: Session, m: dict[str, Any], kind: str) -> None:
    """Check a send, edit or delete and hand it to the store; the acknowledgement and the
    fan-out happen in ``done`` when the write is committed. Later chat writes of the same
    connection go on meanwhile (the store answers in order, and replies to them that cannot
    wait for the store, such as errors, wait in ``after``); other requests wait
    (``Connection.drain``) until no write of the connection is pending."""
    conv: str = m["conversation"]
    topic, members, moderator = hub._conversation(s, conv, joined=True)
    text: str | None = m.get("text")
    if text is not None and not 0 < len(text) <= hub.max_text_chars:
        raise ProtocolError("bad_field", f"`text` must have 1-{hub.max_text_chars} characters")
    conn = s.conn
    assert conn is not None, "handlers run on a live connection"
    after: list[bytes] = []  # replies to this connection's later requests (``Connection.send``)

    def done(result: AppendResult) -> None:
        try:
            if isinstance(result, ProtocolError):
                hub.refuse(s, result, m.get("id"))
            else:
                stored, dup = result
                _reply(s, stored.ack(dup), m)
                if not dup:
                    hub.counters["messages_stored"] += 1
                    hub._publish_conv(topic, members, encode(stored.to_wire()), s.id)
                    for hook in hub.on_message:
                        hook(stored, members)
        except Exception:
            hub.failed(s, m.get("id"), "chat completion failed")
        conn.settle(after)

    hub.store.append_nowait(
        NewMessage(
            conv,
            m["cid"],
            s.identity,
            s.name,
            kind,
            text,
            m.get("ref"),
            members,
            moderator,
            hub.edit_window_ms,
        ),
        done,
    )
    conn.tail = after  # after the hand-off (which may refuse): ``done`` runs on a later turn


def on_send(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    _append(hub, s, m, "text")


def on_edit(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    _append(hub, s, m, "edit")


def on_delete(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    _append(hub, s, m, "delete")


async def on_read(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    conv: str = m["conversation"]
    topic, members, _ = hub._conversation(s, conv, joined=False)
    seq = await hub.store.mark_read(conv, s.identity, m["seq"])
    if seq is not None:
        frame = encode(
            {"type": "receipt", "conversation": conv, "identity": s.identity, "seq": seq}
        )
        if members:
            hub._publish_conv(topic, members, frame, s.id)
        else:
            hub.bus.publish(conv, frame, s.id)
            for other in hub.sessions_of(s.identity):  # own devices not in the room
                if other is not s and conv[5:] not in other.rooms:
                    other.deliver(frame)
    _ok(s, m)


async def on_typing(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    conv: str = m["conversation"]
    topic, members, _ = hub._conversation(s, conv, joined=True)
    hub._publish_conv(
        topic,
        members,
        encode(
            {
                "type": "typing",
                "conversation": conv,
                "identity": s.identity,
                "name": s.name,
                "active": m["active"],
            }
        ),
        s.id,
    )
    _ok(s, m)


async def on_history(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    conv: str = m["conversation"]
    hub._conversation(s, conv, joined=False)
    if "before" in m and "after" in m:
        raise ProtocolError("bad_field", "give `before` or `after`, not both")
    page = await hub.store.page(
        conv,
        before=m.get("before"),
        after=m.get("after"),
        limit=m.get("limit", hub.cfg.chat.history_page_default),
    )
    _reply(
        s,
        {
            "type": "history",
            "conversation": conv,
            "messages": [x.to_wire() for x in page.messages],
            "more": page.more,
            "last_seq": page.last_seq,
        },
        m,
    )


async def on_sync(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    since: dict[str, int] = m["since"]
    for conv in since:
        hub._conversation(s, conv, joined=False)
    limit = m.get("limit", 100)
    pages = []
    for conv, seq in since.items():
        page = await hub.store.page(conv, before=None, after=seq, limit=limit)
        pages.append(
            {
                "conversation": conv,
                "messages": [x.to_wire() for x in page.messages],
                "more": page.more,
                "last_seq": page.last_seq,
                "reads": await hub.store.read_marks(conv),
            }
        )
    _reply(s, {"type": "synced", "conversations": pages, "epoch": hub.store.epoch}, m)


async def on_conversations(hub: Hub, s: Session, m: dict[str, Any]) -> None:
    items = [
        {"conversation": c, "last_seq": last, "read_seq": read}
        for c, last, read in await hub.store.conversations_of(s.identity)
    ]
    for name in sorted(s.rooms):
        conv = f"room:{name}"
        items.append(
            {
                "conversation": conv,
                "last_seq": await hub.store.last_seq(conv),
                "read_seq": await hub.store.read_seq(conv, s.identity),
            }
        )
    _reply(s, {"type": "conversations", "items": items}, m)


HANDLERS: dict[str, Handler] = {
    "hello": on_hello,
    "ping": on_ping,
    "bye": on_bye,
    "join": on_join,
    "leave": on_leave,
    "update": on_update,
    "kick": on_kick,
    "mute": on_mute,
    "lock": on_lock,
    "presence": on_presence,
    "watch": on_watch,
    "send": on_send,
    "edit": on_edit,
    "delete": on_delete,
    "read": on_read,
    "typing": on_typing,
    "history": on_history,
    "sync": on_sync,
    "conversations": on_conversations,
}
