"""The hub: sessions, rooms, presence and who receives what, for one node.

The hub owns the state every feature shares and the operations on it (authenticate and
welcome a connection, suspend and end sessions, leave and kick, presence and watching,
publish to a room's or a conversation's members). Handlers of client messages live with their
feature (``signaling.core.handlers`` for sessions, rooms and presence) and call these methods.
Nothing here knows the network edge: a connection is a ``Link``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

import orjson

from sfu.tasks import TaskSet

from ..config import Config
from ..wire.errors import CloseCode, ProtocolError
from ..wire.framing import encode, encode_fresh, error_message
from ..wire.protocol import PROTOCOL_VERSION
from .bus import LocalBus, MessageBus
from .directory import DeviceDirectory
from .media import NullMedia, RoomMedia
from .metrics import HubCounters, Metric
from .presence import PresenceBook
from .privacy import Blocks, RelationIndex, may_watch
from .rooms import Participant, RoomRegistry
from .session import Link, Session
from .shared import SharedState
from .tokens import Claims, open_claims, verify_token
from .writes import WriteBatch

log = logging.getLogger("rallypoint.hub")

INTERNAL_ERROR = ProtocolError("internal_error", "the server failed to handle this message")

IceProvider = Callable[[Session, str], list[dict[str, Any]]]
#: Extra grants a session has in a room beyond its token's (e.g. a call's media room).
RoomGrants = Callable[[Session, str], frozenset[str] | None]


class ConversationIndex(Protocol):
    """What the hub needs of the chat store: its epoch (sent in `welcome`) and the last
    sequence of a conversation (sent in `joined`)."""

    epoch: str

    async def last_seq(self, conversation: str) -> int: ...


def ms() -> int:
    """Server time, ms since the Unix epoch."""
    return int(time.time() * 1000)


class Hub:
    """All signaling state of this node."""

    def __init__(
        self,
        cfg: Config,
        conversations: ConversationIndex,
        devices: DeviceDirectory,
        relations: RelationIndex,
        ice: IceProvider | None = None,
        bus: MessageBus | None = None,
    ) -> None:
        self.cfg = cfg
        self.conversations = conversations
        self.devices = devices
        self.relations = relations
        # Every block (read per direct message, typing indicator and group add); loaded with
        # ``load_blocks`` once the store is open, kept by ``signaling.relations``.
        self.blocks = Blocks()
        self.ice: IceProvider = ice or (lambda _session, _host: [])
        self.media: RoomMedia = NullMedia()
        # Chosen by ``signaling.app``: this process's topics, or a cluster's.
        self.bus: MessageBus = bus if bus is not None else LocalBus()
        self.sessions: dict[str, Session] = {}
        self.by_resume: dict[str, Session] = {}
        self.rooms = RoomRegistry(cfg.rooms.max_participants, cfg.rooms.empty_room_grace_s)
        self.presence = PresenceBook()
        self.watchers: dict[str, set[Session]] = {}
        # Cluster mode (``share``): rooms and presence of every node, in Redis.
        self.shared: SharedState | None = None
        self.counters = HubCounters()
        # Held while a batch of frames is handed out: one write per connection per batch.
        self.writes = WriteBatch()
        # Features hook session starts, resumes and ends (``signaling.app`` wires them).
        self.on_session_start: list[Callable[[Session], None]] = []
        self.on_session_resume: list[Callable[[Session], None]] = []
        self.on_session_end: list[Callable[[Session, str], None]] = []
        self.room_grants: list[RoomGrants] = []
        # Identities with a device write not committed yet (the directory cannot vouch yet).
        self._touching: dict[str, int] = {}
        self._tasks = TaskSet(self._task_failed)

    def share(self, shared: SharedState) -> None:
        """Cluster mode (``signaling.app``): rooms and presence are kept with the other nodes
        in ``shared``; other nodes' requests for this node's sessions (kick, mute) arrive on
        the bus topic ``node:<node id>``."""
        self.shared = shared
        self.bus.subscribe(f"node:{shared.node_id}", "node", _NodeRequests(self))

    def node_request(self, frame: bytes) -> None:
        """Another node asks something of a session here (``_NodeRequests``)."""
        req = orjson.loads(frame)
        if req["op"] == "forget":
            self.forget(req["session"])
            return
        if req["op"] == "devices":  # a message for an identity's sessions here
            frame = encode(req["message"])
            for x in self.sessions_of(req["identity"]):
                x.deliver(frame)
            return
        victim = self.sessions.get(req["participant"])
        room = req["room"]
        if victim is None or room not in victim.rooms:
            return
        if req["op"] == "kick":
            self.kick(victim, room, req["by"])
        elif req["op"] == "mute":
            victim.send(
                {"type": "mute_requested", "room": room, "kind": req["kind"], "by": req["by"]}
            )

    async def adopt(self, hello: dict[str, Any]) -> None:
        """Cluster mode, before ``welcome``: a `hello` whose resume token this node does not
        know may name a session of another node. Take it over (``SharedState.claim_resume``:
        once, whichever nodes try) so that ``welcome`` resumes it here: its rooms (re-joined
        where its old node's entries were gone already), watches and status; the old node,
        if alive, forgets it without a word to the others (``forget``). A failure here (a bug,
        a record it cannot read) is logged and the `hello` goes on: a new session."""
        try:
            await self._adopt(hello)
        except Exception:
            self.counters.internal_errors += 1
            log.exception("taking over a session from another node failed")

    async def _adopt(self, hello: dict[str, Any]) -> None:
        shared = self.shared
        token = hello.get("resume")
        if shared is None or not isinstance(token, str) or not token or token in self.by_resume:
            return
        r = await shared.claim_resume(token)
        if r is None or r.sid in self.sessions:
            return
        session = Session(r.sid, r.claims, r.device, token)
        session.status = r.status
        self.sessions[session.id] = session
        self.by_resume[token] = session
        self.bus.subscribe(f"user:{session.identity}", session.id, session)
        self.presence.set(session.identity, session.id, r.status)
        shared.presence_set(session.identity, session.id, r.status)
        self._touch(session)
        for hook in self.on_session_start:
            hook(session)
        cfg = self.cfg
        for name, (p, there) in r.rooms.items():
            if not there:  # its old node's entries were removed: join again
                try:
                    p, _, _ = await shared.join(
                        name, p, first_moderates=False, max_participants=cfg.rooms.max_participants
                    )
                except ProtocolError:
                    continue  # locked or full meanwhile: it is in the room no longer
            if self.sessions.get(session.id) is not session:
                return
            self.rooms.get_or_create(name).add(p)
            session.rooms[name] = p
            self.bus.subscribe(f"room:{name}", session.id, session)
            if not there:
                self.bus.publish(
                    f"room:{name}",
                    encode(
                        {"type": "participant_joined", "room": name, "participant": p.to_wire()}
                    ),
                    session.id,
                )
        if r.watching:
            allowed = await self.watchable(session.identity, r.watching)
            if self.sessions.get(session.id) is session:
                self.watch(session, r.watching, allowed)
        # Until ``welcome`` binds it (a failed hello leaves it to the resume grace).
        session.expiry = asyncio.get_running_loop().call_later(
            cfg.session.resume_grace_s, self.end_session, session, "disconnected"
        )
        self.bus.publish(f"node:{r.node}", orjson.dumps({"op": "forget", "session": session.id}))

    def forget(self, sid: str) -> None:
        """Another node resumed session ``sid``: drop it here without telling anyone (its
        participants and status are that node's now); its connection, if any, is closed."""
        session = self.sessions.pop(sid, None)
        if session is None:
            return
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        self.by_resume.pop(session.resume_token, None)
        for name in list(session.rooms):
            session.rooms.pop(name, None)
            room = self.rooms.get(name)
            if room is not None and room.leave(session.id, time.monotonic()) is not None:
                self.media.left(session, name)
            self.bus.unsubscribe(f"room:{name}", session.id)
        self.bus.unsubscribe(f"user:{session.identity}", session.id)
        for ident in session.watching - session.unseen:
            self._unwatch(session, ident)
        self.presence.remove(session.identity, session.id)
        if self.shared is not None:  # a status this node wrote after the move, if any
            self.shared.presence_remove(session.identity, session.id)
            self.shared.connected(session.identity, session.id, False)
        for hook in self.on_session_end:
            hook(session, "moved")
        conn = session.conn
        session.conn = None
        if conn is not None:
            conn.session = None
            conn.abandon(CloseCode.REPLACED, "session resumed on another node")

    async def stop(self) -> None:
        """Finish the device-directory writes in flight (before the store closes)."""
        await self._tasks.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def _task_failed(self, exc: BaseException) -> None:
        self.counters.internal_errors += 1
        log.error("hub background task failed", exc_info=exc)

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "sessions", "gauge", "Sessions, connected or waiting for a resume.", len(self.sessions)
        )
        yield Metric("rooms", "gauge", "Open rooms.", len(self.rooms.rooms))
        yield from self.counters.metrics()

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
            auth = self.cfg.auth
            claims = verify_token(
                token, auth.api_key, auth.api_secret, max_lifetime_s=auth.max_token_lifetime_s
            )
        except ProtocolError as e:
            e.close = CloseCode.AUTH_FAILED
            raise
        return claims  # in token mode the token's name wins over `hello.name`

    def welcome(self, conn: Link, hello: dict[str, Any], host: str) -> Session:
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
            self._touch(session)
            for hook in self.on_session_start:
                hook(session)
            resumed = False
        else:
            resumed = True
            self.counters.resumes += 1
            if session.expiry is not None:
                session.expiry.cancel()
                session.expiry = None
            if session.conn is not None:  # the old socket is half-dead; this one replaces it
                old_conn = session.conn
                old_conn.session = None
                old_conn.abandon(CloseCode.REPLACED, "session resumed on another connection")
            del self.by_resume[session.resume_token]
        old_token = session.resume_token
        session.resume_token = secrets.token_urlsafe(24)
        self.by_resume[session.resume_token] = session
        if self.shared is not None:  # another node can resume it: with the new token only
            self.shared.save_session(session, old_token)
        session.conn = conn
        session.host = host
        conn.session = session
        if self.shared is not None:
            self.shared.connected(session.identity, session.id, True)
        cfg = self.cfg
        msg: dict[str, Any] = {
            "type": "welcome",
            "session": session.id,
            "identity": session.identity,
            "name": session.name,
            "device": session.device,
            "server_time": ms(),
            "heartbeat_ms": int(cfg.session.heartbeat_interval_s * 1000),
            "resume": session.resume_token,
            "resume_grace_ms": int(cfg.session.resume_grace_s * 1000),
            "resumed": resumed,
            "epoch": self.conversations.epoch,
            "open_mode": cfg.open_mode,
            "ice_servers": self.ice(session, host),
            "ice_transport_policy": "relay" if cfg.ice.relay_only else "all",
            "limits": {
                "max_frame_bytes": cfg.limits.max_frame_bytes,
                "hard_frame_bytes": cfg.limits.hard_frame_bytes,
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
        if self.shared is not None:  # other nodes' participants and statuses: from Redis
            if session.rooms or (resumed and session.watching):
                self._spawn(self._send_shared_state(session, resumed))
        elif resumed and session.watching:
            conn.send(
                {
                    "type": "presence_state",
                    "presence": [
                        {"identity": i, "status": self.status_for(session, i)}
                        for i in sorted(session.watching)
                    ],
                }
            )
        for name in session.rooms if self.shared is None else ():
            room = self.rooms.get(name)
            if room is not None:
                conn.send(self._room_state(name, room.locked, room.participants.values()))
        if resumed:
            self._touch(session)
            self.media.resumed(session)
            for resume_hook in self.on_session_resume:
                resume_hook(session)
        return session

    async def _send_shared_state(self, session: Session, resumed: bool) -> None:
        """`presence_state` and `room_state` after a resume, in cluster mode."""
        shared = self.shared
        assert shared is not None
        if resumed and session.watching:
            presence = await self.presence_of(session, session.watching)
            session.send({"type": "presence_state", "presence": presence})
        for name in list(session.rooms):
            participants, locked = await shared.room(name)
            if name in session.rooms:
                session.send(self._room_state(name, locked, participants))

    def _room_state(
        self, name: str, locked: bool, participants: Iterable[Participant]
    ) -> dict[str, Any]:
        """The `room_state` snapshot of room ``name`` (after a resume)."""
        state: dict[str, Any] = {
            "type": "room_state",
            "room": name,
            "locked": locked,
            "participants": [p.to_wire() for p in participants],
        }
        recording = self.media.recording_of(name)
        if recording is not None:
            state["recording"] = recording
        return state

    def detach(self, conn: Link) -> None:
        """The connection ended: suspend its session for the resume grace period."""
        session = conn.session
        if session is None or session.conn is not conn:
            return
        session.conn = None
        conn.session = None
        if self.shared is not None:
            self.shared.connected(session.identity, session.id, False)
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
        if self.shared is not None:
            self.shared.drop_session(session.resume_token)
        self._touch(session)
        for hook in self.on_session_end:
            hook(session, reason)
        for name in list(session.rooms):
            self.leave(session, name, reason)
        self.bus.unsubscribe(f"user:{session.identity}", session.id)
        self.watch(session, frozenset(), frozenset())
        changed = self.presence.remove(session.identity, session.id)
        if self.shared is not None:
            self.shared.presence_remove(session.identity, session.id)
            self.shared.connected(session.identity, session.id, False)
        elif changed is not None:
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
        """Every session of ``identity`` on this node (``SessionDirectory``)."""
        subs = self.bus.local_subscribers(f"user:{identity}")
        return [x for x in subs.values() if isinstance(x, Session)]

    def online(self, identity: str) -> bool:
        """Whether ``identity`` has a live connection here (``SessionDirectory``)."""
        return any(s.conn is not None for s in self.sessions_of(identity))

    def sweep(self, now: float) -> None:
        """Periodic: expire rooms that stayed empty."""
        for name in self.rooms.expire(now):
            log.debug("room %s closed after being empty", name)

    # -- the device directory -----------------------------------------------------------------

    def _touch(self, s: Session) -> None:
        # Until the write commits, the directory cannot vouch for the identity: remember it.
        self._touching[s.identity] = self._touching.get(s.identity, 0) + 1
        self._spawn(self._touch_device(s.identity, s.device, s.name))

    async def _touch_device(self, identity: str, device: str, name: str) -> None:
        try:
            await self.devices.touch_device(identity, device, name, ms())
        finally:
            n = self._touching.pop(identity, 1) - 1
            if n > 0:
                self._touching[identity] = n

    async def unknown_identities(self, identities: list[str]) -> set[str]:
        """The identities never seen here: no session now, no device or API token stored.
        The directory is asked about every one of them, online or not, so the answer takes
        as long whoever they are."""
        # Taken before the read: a write that commits while the read runs is not in the
        # read's snapshot, and is out of ``_touching`` by the time the read returns.
        touching = set(self._touching)
        known = await self.devices.known_identities(sorted(set(identities)))
        return {
            i
            for i in identities
            if i not in known
            and not self.sessions_of(i)
            and i not in touching
            and i not in self._touching
        }

    # -- presence --------------------------------------------------------------------------------

    def set_presence(self, session: Session, status: str) -> None:
        self._set_presence(session, status)

    def _set_presence(self, session: Session, status: str) -> None:
        session.status = status
        changed = self.presence.set(session.identity, session.id, status)
        if self.shared is not None:  # its script tells every node's watchers
            self.shared.presence_set(session.identity, session.id, status)
            if session.resume_token:
                self.shared.save_session(session)
        elif changed is not None:
            self._publish_presence(session.identity, changed)

    def _publish_presence(self, identity: str, status: str) -> None:
        watchers = self.watchers.get(identity)
        if watchers:
            frame = encode_fresh({"type": "presence", "identity": identity, "status": status})
            for s in watchers:
                s.deliver(frame)

    async def load_blocks(self) -> None:
        """Read every block from the store (at start-up, once it is open)."""
        self.blocks.load(await self.relations.all_blocks())

    async def watchable(self, watcher: str, targets: Iterable[str]) -> frozenset[str]:
        """Those of ``targets`` whose presence ``watcher`` may see (``privacy.may_watch``).

        With the ``private`` rule the store is asked about every target but the watcher
        itself, whoever they are (blocked, unknown or not): every refusal takes the same way
        and the same time as an answer about someone offline."""
        targets = set(targets)
        rule = self.cfg.privacy.presence
        others = sorted(targets - {watcher})
        private = rule == "private" and others
        related = await self.relations.related(watcher, others) if private else set()
        blocks = self.blocks
        return frozenset(
            t
            for t in targets
            if may_watch(
                rule, own=t == watcher, blocked=blocks.blocked(t, watcher), related=t in related
            )
        )

    async def presence_of(
        self, session: Session, identities: Iterable[str]
    ) -> list[dict[str, str]]:
        """`presence_state` entries of ``identities`` as ``session`` sees them, sorted: this
        node's statuses, or in cluster mode every node's."""
        idents = sorted(identities)
        if self.shared is None:
            return [{"identity": i, "status": self.status_for(session, i)} for i in idents]
        found = await self.shared.statuses(i for i in idents if i not in session.unseen)
        return [
            {
                "identity": i,
                "status": "offline"
                if i in session.unseen
                else found.get(i) or self.presence.status(i),
            }
            for i in idents
        ]

    def status_for(self, session: Session, identity: str) -> str:
        """``identity``'s presence as ``session`` sees it (offline if it may not see it)."""
        return "offline" if identity in session.unseen else self.presence.status(identity)

    def watch(self, session: Session, identities: frozenset[str], allowed: frozenset[str]) -> None:
        """Follow the presence of ``identities`` (replacing what ``session`` followed); those
        not ``allowed`` stay offline to it."""
        seen = identities & allowed
        before = session.watching - session.unseen
        for ident in before - seen:
            self._unwatch(session, ident)
        for ident in seen - before:
            self._watch(session, ident)
        session.watching = identities
        session.unseen = identities - seen
        if self.shared is not None and self.sessions.get(session.id) is session:
            self.shared.save_session(session)

    def _watch(self, session: Session, ident: str) -> None:
        w = self.watchers.get(ident)
        if w is None:
            w = self.watchers[ident] = set()
            if self.shared is not None:  # this node hears of ident's changes on any node
                self.bus.subscribe(f"presence:{ident}", "watchers", _Watchers(w))
        w.add(session)

    def _unwatch(self, session: Session, ident: str) -> None:
        w = self.watchers.get(ident)
        if w is not None:
            w.discard(session)
            if not w:
                del self.watchers[ident]
                if self.shared is not None:
                    self.bus.unsubscribe(f"presence:{ident}", "watchers")

    def rewatch(self, session: Session, ident: str, allowed: bool, status: str) -> None:
        """A relation changed: ``session``, watching ``ident`` (whose status is ``status``),
        may see it now, or no longer. It hears as if ``ident`` came online or went offline
        (nothing if it is offline)."""
        if ident not in session.watching or (ident not in session.unseen) == allowed:
            return
        if allowed:
            session.unseen -= {ident}
            self._watch(session, ident)
        else:
            session.unseen |= {ident}
            self._unwatch(session, ident)
        if status != "offline":
            seen = status if allowed else "offline"
            session.send({"type": "presence", "identity": ident, "status": seen})

    async def recheck_watches(self, a: str, b: str) -> None:
        """A relation between ``a`` and ``b`` changed: their watches of each other follow."""
        for watcher, target in ((a, b), (b, a)):
            sessions = [s for s in self.sessions_of(watcher) if target in s.watching]
            if not sessions:
                continue
            allowed = target in await self.watchable(watcher, [target])
            status = self.presence.status(target)
            if self.shared is not None:
                status = (await self.shared.statuses([target])).get(target) or status
            for s in sessions:
                if self.sessions.get(s.id) is s:  # still there after the await
                    self.rewatch(s, target, allowed, status)

    def recheck_groups(
        self, joined: Iterable[str], gone: Iterable[str], members: Iterable[str]
    ) -> None:
        """Group membership changed (``joined`` and ``gone``; ``members`` are the members now):
        the watches it may open or close follow, in the background. Only pairs where one
        session watches the other are looked at (sessions' ``unseen`` and ``watching`` sets),
        so a large group costs a set intersection per online member's session."""
        joined, gone, now = frozenset(joined), frozenset(gone), frozenset(members)
        pairs: set[tuple[str, str]] = set()
        for ident, others, attr in (
            *((j, now, "unseen") for j in joined),  # a new member may now see the others
            *((g, now, "watching") for g in gone),  # a former one may no longer
        ):
            for s in self.sessions_of(ident):
                pairs.update((ident, t) for t in getattr(s, attr) & others if t != ident)
        if joined or gone:
            for m in now:
                for s in self.sessions_of(m):
                    pairs.update((m, t) for t in s.unseen & joined if t != m)
                    pairs.update((m, t) for t in s.watching & gone)
        for a, b in pairs:
            self._spawn(self.recheck_watches(a, b))

    def recheck_soon(self, a: str, b: str) -> None:
        """``recheck_watches`` in the background, if either watches the other unseen now (a
        direct conversation may just have become mutual)."""
        if any(b in s.unseen for s in self.sessions_of(a)) or any(
            a in s.unseen for s in self.sessions_of(b)
        ):
            self._spawn(self.recheck_watches(a, b))

    # -- rooms -----------------------------------------------------------------------------------

    def leave(self, session: Session, name: str, reason: str) -> None:
        """Take ``session`` out of room ``name``; the others get `participant_left`."""
        session.rooms.pop(name, None)
        room = self.rooms.get(name)
        if room is None:
            return
        p = room.leave(session.id, time.monotonic())
        self.bus.unsubscribe(f"room:{name}", session.id)
        if p is not None and self.shared is not None:
            self.shared.leave(name, p.id)
            self.shared.save_session(session)
        if p is not None:
            self.media.left(session, name)
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

    def kick(self, victim: Session, room: str, by: str) -> None:
        """Remove ``victim`` from ``room`` on a moderator's (or the HTTP API's) word."""
        victim.send({"type": "kicked", "room": room, "by": by})
        self.leave(victim, room, "kicked")

    # -- conversations ---------------------------------------------------------------------------

    def publish_conversation(
        self,
        conv: str,
        members: tuple[str, ...],
        frame: bytes,
        exclude: str,
        seq: int | None = None,
    ) -> None:
        """Deliver ``frame`` (event ``seq`` of ``conv``) to a conversation: every session in
        the room for room chat, every device of the members otherwise (but the session
        ``exclude``), in ``seq`` order on every node (typing has none)."""
        order = None if seq is None else (conv, seq)
        if members:
            for m in members:
                self.bus.publish(f"user:{m}", frame, exclude, order)
        else:
            self.bus.publish(conv, frame, exclude, order)

    # -- answering requests that failed -----------------------------------------------------------

    def refuse(self, to: Link | Session, err: ProtocolError, rid: Any) -> None:
        """Answer request ``rid`` with ``err``: a stable code and a human message."""
        self.counters.errors_sent += 1
        to.send(error_message(err, rid))

    def failed(self, to: Link | Session, rid: Any, what: str) -> None:
        """A bug while handling request ``rid`` (call from an ``except`` block): log the
        traceback, count it, and answer ``internal_error``; never a traceback to a client."""
        self.counters.internal_errors += 1
        log.exception(what)
        to.send(error_message(INTERNAL_ERROR, rid))


class _Watchers:
    """Cluster mode: the bus sink of ``presence:<identity>``, for this node's sessions that
    may see it (the hub's set, kept by ``watch``)."""

    __slots__ = ("sessions",)

    def __init__(self, sessions: set[Session]) -> None:
        self.sessions = sessions

    def deliver(self, frame: bytes) -> None:
        for s in self.sessions:
            s.deliver(frame)


class _NodeRequests:
    """Cluster mode: the bus sink of ``node:<this node>`` (``Hub.node_request``)."""

    __slots__ = ("hub",)

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def deliver(self, frame: bytes) -> None:
        self.hub.node_request(frame)
