"""Calls across the nodes of a cluster (issue 14): ``SharedCalls``, the ``CallService`` of
cluster mode, with each call's state in Redis.

One node keeps its calls in a ``CallBook`` in memory (``signaling.calls.service``). In a
cluster a call's devices are on several nodes, so each call lives in Redis, and every step
of it is the same pure ``CallBook`` step, run by whichever node got the request on a book
holding just that call, inside an optimistic transaction (``WATCH`` of the call's key and
of the talking keys of the identities the step asks about, ``MULTI``/``EXEC`` of the new
state): when two nodes change one call at once, one ``EXEC`` wins and the other runs its
step again on what the winner wrote. So the first accept wins whatever the races; the
others get ``already_answered`` and their identity's other devices ``call_answered_elsewhere``
once. The effects of a step (messages to devices, pushes, call-log messages) are carried
out by the node whose transaction won, once: messages to sessions of other nodes go over
the bus (topic ``callnode:<node>``).

Keys (``P`` is ``cluster.key_prefix``):

- ``P:call:<id>``: the call (JSON: the ``Call`` and ``where``, session -> its node); once it
  has ended, the identities it involved (for a clear ``call_ended`` error), for an hour.
- ``P:calls:<identity>``: the live calls of an identity (a new device rings in them; an
  ended session leaves them).
- ``P:talking:<identity>``: ``<call> <node>`` while the identity is in a call on a device of
  ``<node>`` (busy); ignored when that node's heartbeat is gone.
- ``P:callring``: sorted set, call id -> its ring deadline (ms), while a callee rings. Every
  node sweeps it every ``SWEEP_S``; the expiry is a step like the others (it fires once), so
  ``missed`` comes even when the caller's node died meanwhile.

The devices a call rings are the identity's sessions in the session directory
(``P:presence:<identity>``, ``<node> <session>``) and this node's own.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import orjson
from redis.exceptions import WatchError

from ..cluster.redisbus import UNAVAILABLE, connect, raise_if_cancelled
from ..core.hub import Hub
from ..core.metrics import Metric
from ..core.session import Session
from ..notify.events import PushSink
from ..wire.errors import ProtocolError
from ..wire.framing import encode
from .book import JOINED, Call, CallBook, Effect, Log, Party, Send
from .service import CALL_ROOM_GRANTS, CallService, check_signal, signal_message

if TYPE_CHECKING:
    from ..chat.store import ChatStore

log = logging.getLogger("rallypoint.calls")

SWEEP_S: Final = 0.25  # how often each node looks for ring deadlines that passed
ENDED_TTL_MS: Final = 3_600_000  # an ended call answers `call_ended` for an hour
LIVE_TTL_MS: Final = 86_400_000  # a call nobody ends (every node of it died) goes after a day
ATTEMPTS: Final = 20  # optimistic transactions retried on a conflict (bounded)


async def _nothing() -> None:
    pass


def _ms() -> int:
    return int(time.time() * 1000)


# --- the call as JSON (pure) ------------------------------------------------------------------


def _party_json(p: Party) -> dict[str, Any]:
    return {
        "identity": p.identity,
        "status": p.status,
        "devices": sorted(p.devices),
        "device": p.device,
        "pushed": p.pushed,
        "unseen": p.unseen,
    }


def _party(d: dict[str, Any]) -> Party:
    return Party(
        d["identity"], d["status"], set(d["devices"]), d["device"], d["pushed"], d["unseen"]
    )


def call_to_json(call: Call, where: dict[str, str]) -> bytes:
    """The stored form of a live call and where its sessions are (session -> node)."""
    return orjson.dumps(
        {
            "id": call.id,
            "caller": _party_json(call.caller),
            "caller_name": call.caller_name,
            "callees": [_party_json(p) for p in call.callees.values()],
            "video": call.video,
            "media": call.media,
            "room": call.room,
            "started_at": call.started_at,
            "expires_at": call.expires_at,
            "answered_at": call.answered_at,
            "cancelled": call.cancelled,
            "conversation": call.conversation,
            "where": where,
        }
    )


def call_from_json(raw: bytes | str) -> tuple[Call, dict[str, str]]:
    """``call_to_json``'s inverse."""
    d = orjson.loads(raw)
    callees = [_party(x) for x in d["callees"]]
    call = Call(
        d["id"],
        _party(d["caller"]),
        d["caller_name"],
        {p.identity: p for p in callees},
        d["video"],
        d["media"],
        d["room"],
        d["started_at"],
        d["expires_at"],
        d["answered_at"],
        cancelled=d["cancelled"],
        conversation=d["conversation"],
    )
    return call, d["where"]


class OneCall(CallBook):
    """A ``CallBook`` holding one call loaded from Redis (pure). ``talking`` are identities in
    another call somewhere in the cluster: they are busy (``CallBook.in_call``)."""

    def __init__(self, ring_timeout_ms: int, media: str, talking: set[str]) -> None:
        super().__init__(ring_timeout_ms, media)
        self.talking = talking

    def in_call(self, identity: str) -> bool:
        return identity in self.talking or super().in_call(identity)


Step = Callable[[OneCall, dict[str, str]], list[Effect]]


class _NodeCalls:
    """The bus sink of ``callnode:<this node>``: call messages for this node's sessions."""

    __slots__ = ("service",)

    def __init__(self, service: SharedCalls) -> None:
        self.service = service

    def deliver(self, frame: bytes) -> None:
        self.service.delivered(frame)


class SharedCalls(CallService):
    """``CallService`` with every call in Redis (module docstring); ``start`` and ``stop``
    own the ring-deadline sweep."""

    def __init__(
        self,
        hub: Hub,
        store: ChatStore,
        push: PushSink | None,
        redis_url: str,
        node_id: str,
        prefix: str,
    ) -> None:
        super().__init__(hub, store, push)
        #: Returns once this node's directory writes queued so far are in Redis
        #: (``ClusterState.flushed``; wired by ``signaling.app``).
        self.flushed: Callable[[], Awaitable[None]] = _nothing
        self.node_id = node_id
        self.prefix = prefix
        self.redis = connect(redis_url)
        self._ring = f"{prefix}:callring"
        self._gone = f"{prefix}:callgone"  # a dead node's devices in calls (ClusterState)
        self._sweeper: asyncio.Task[None] | None = None
        #: SFU calls this node took part in: call id -> its parties (``room_grants``).
        self._media_calls: dict[str, frozenset[str]] = {}
        #: Parties of calls this node ended, for their call-log messages (``_parties_of_log``).
        self._ended_parties: dict[str, frozenset[str]] = {}
        self.sweeps_fired = 0
        self.dead_left = 0  # devices of dead nodes this node took out of their calls
        self.conflicts = 0  # steps run again because another node changed the call first
        hub.bus.subscribe(f"callnode:{node_id}", "calls", _NodeCalls(self))

    def metrics(self) -> Iterable[Metric]:
        yield from super().metrics()
        yield Metric(
            "call_deadlines_fired",
            "counter",
            "Ring deadlines this node's sweep expired (calls of any node).",
            self.sweeps_fired,
        )
        yield Metric(
            "call_dead_devices_left",
            "counter",
            "Devices of dead nodes this node took out of their calls (not resumed in time).",
            self.dead_left,
        )
        yield Metric(
            "call_step_conflicts",
            "counter",
            "Call steps run again because another node changed the call at the same time.",
            self.conflicts,
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="call-sweeper")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        await super().stop()
        await self.redis.aclose()

    def _arm(self) -> None:
        """No local ring timer: the sweep of ``P:callring`` (every node's) replaces it."""

    # -- the transaction ---------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    async def _transact(
        self,
        call_id: str,
        watch: Iterable[str],
        step: Step,
        directory: dict[str, dict[str, str]] | None = None,
    ) -> tuple[OneCall, list[Effect], dict[str, str]]:
        """Run ``step`` on call ``call_id`` as one atomic change of Redis (module docstring);
        ``watch``: identities whose being busy elsewhere the step asks about; ``directory``:
        identities whose devices (session -> node) the step needs, filled in here (watched: a
        device that appears meanwhile makes the step run again, with it). Raises the step's
        ``ProtocolError``; ``store_unavailable`` while Redis cannot be reached."""
        key = self._key("call", call_id)
        idents = list(dict.fromkeys(watch))
        tkeys = [self._key("talking", i) for i in idents]
        found = list(directory or ())
        dkeys = [self._key("presence", i) for i in found]
        try:
            for _ in range(ATTEMPTS):
                async with self.redis.pipeline(transaction=True) as pipe:
                    await pipe.watch(key, *tkeys, *dkeys)
                    raw = await pipe.get(key)
                    if directory is not None:
                        for i, dkey in zip(found, dkeys, strict=True):
                            devices = directory[i] = {}
                            fields: list[Any] = await pipe.hkeys(dkey)
                            for f in fields:
                                node, sid = f.decode().split(" ", 1)
                                devices[sid] = node
                            for x in self.hub.sessions_of(i):
                                devices[x.id] = self.node_id
                    talking = await self._talking(pipe, call_id, idents, tkeys)
                    book = OneCall(self.book.ring_timeout_ms, self.book.one_to_one_media, talking)
                    where: dict[str, str] = {}
                    before: dict[str, str] = {}
                    if raw is not None:
                        rec = orjson.loads(raw)
                        if "ended" in rec:
                            book.ended[call_id] = frozenset(rec["ended"])
                        else:
                            call, where = call_from_json(raw)
                            book.calls[call_id] = call
                            for p in call.parties():
                                book.by_identity.setdefault(p.identity, set()).add(call_id)
                                before[p.identity] = p.status
                    fx = step(book, where)
                    pipe.multi()
                    self._write(pipe, book, call_id, where, before)
                    try:
                        await pipe.execute()
                    except WatchError:
                        self.conflicts += 1
                        continue
                    return book, fx, where
        except UNAVAILABLE as e:
            log.warning("call state: the cluster's Redis is unavailable (%s)", e)
            raise ProtocolError(
                "store_unavailable",
                "calls cannot be changed now (the cluster's Redis is unavailable); retry",
                retry_after_ms=1000,
            ) from e
        raise ProtocolError("internal_error", "the call changed too often; retry")

    async def _talking(
        self, pipe: Any, call_id: str, idents: list[str], tkeys: list[str]
    ) -> set[str]:
        """Of ``idents``, those in another call on a live node."""
        if not tkeys:
            return set()
        values = await pipe.mget(tkeys)
        busy: dict[str, str] = {}
        for ident, v in zip(idents, values, strict=True):
            if v is not None:
                other, node = v.decode().split(" ", 1)
                if other != call_id:
                    busy[ident] = node
        if not busy:
            return set()
        alive = await pipe.mget([self._key("alive", n) for n in busy.values()])
        return {i for i, a in zip(busy, alive, strict=True) if a is not None}

    def _write(
        self, pipe: Any, book: OneCall, call_id: str, where: dict[str, str], before: dict[str, str]
    ) -> None:
        """Queue the call's new state (in ``MULTI``)."""
        key = self._key("call", call_id)
        call = book.calls.get(call_id)
        if call is not None:
            pipe.set(key, call_to_json(call, where), px=LIVE_TTL_MS)
            if call.pending():
                pipe.zadd(self._ring, {call_id: call.expires_at})
            else:
                pipe.zrem(self._ring, call_id)
            for p in call.parties():
                was = before.get(p.identity)
                if was is None:
                    pipe.sadd(self._key("calls", p.identity), call_id)
                if p.status == JOINED and p.device is not None:
                    if was != JOINED:
                        node = where.get(p.device, self.node_id)
                        pipe.set(self._key("talking", p.identity), f"{call_id} {node}")
                elif was == JOINED:
                    pipe.delete(self._key("talking", p.identity))
            if call.media == "sfu":
                self._media_calls[call_id] = frozenset(p.identity for p in call.parties())
            return
        parties = book.ended.get(call_id)
        if parties is None:
            return  # unknown (or gone with its TTL)
        pipe.set(key, orjson.dumps({"ended": sorted(parties)}), px=ENDED_TTL_MS)
        pipe.zrem(self._ring, call_id)
        for ident, was in before.items():
            pipe.srem(self._key("calls", ident), call_id)
            if was == JOINED:
                pipe.delete(self._key("talking", ident))
        self._media_calls.pop(call_id, None)
        self._ended_parties[call_id] = parties
        while len(self._ended_parties) > 1024:
            del self._ended_parties[next(iter(self._ended_parties))]

    # -- effects -------------------------------------------------------------------------------

    def route(self, effects: Iterable[Effect], where: dict[str, str]) -> None:
        """Carry out a step's effects: messages to sessions of this node directly, to other
        nodes' over the bus; pushes and call-log messages here (once)."""
        local: list[Effect] = []
        for fx in effects:
            if not isinstance(fx, Send):
                local.append(fx)
                continue
            mine: list[str] = []
            remote: dict[str, list[str]] = {}
            for sid in fx.sessions:
                node = where.get(sid, self.node_id)
                if node == self.node_id:
                    mine.append(sid)
                else:
                    remote.setdefault(node, []).append(sid)
            if mine:
                local.append(Send(tuple(mine), fx.msg, fx.with_ice))
            for node, sids in remote.items():
                self.hub.bus.publish(
                    f"callnode:{node}",
                    orjson.dumps({"to": sids, "msg": fx.msg, "ice": fx.with_ice}),
                )
        self.apply(local)

    def delivered(self, frame: bytes) -> None:
        """Another node's call message for sessions here."""
        d = orjson.loads(frame)
        self.apply([Send(tuple(d["to"]), d["msg"], d["ice"])])

    def _deliver_log(self, entry: Log, identities: set[str], frame: bytes, seq: int) -> None:
        """Every node's devices of ``identities`` (a room's log: the room, on every node)."""
        bus = self.hub.bus
        order = (entry.conversation, seq)
        if not entry.members and entry.conversation.startswith("room:"):
            bus.publish(entry.conversation, frame, None, order)
            return
        for ident in identities:
            bus.publish(f"user:{ident}", frame, None, order)

    def _parties_of_log(self, entry: Log) -> frozenset[str]:
        return self._ended_parties.get(entry.call, frozenset())

    def room_grants(self, s: Session, room: str) -> frozenset[str] | None:
        if not room.startswith("call-"):
            return None
        parties = self._media_calls.get(room[5:])
        if parties is None or s.identity not in parties:
            return None
        return CALL_ROOM_GRANTS

    # -- the ring deadlines --------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        while True:
            # A cancellation redis-py swallowed (seen: the sweeper slept on, cancelling, and
            # the node's shutdown waited for it) still ends the loop.
            raise_if_cancelled()
            await asyncio.sleep(SWEEP_S)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except (*UNAVAILABLE, ProtocolError):
                # redis-py turns a cancellation that meets its timeout into TimeoutError
                # (and ``_transact`` that into a ProtocolError): stopping must stop the loop.
                raise_if_cancelled()  # else: Redis is away, the deadlines wait in it
            except Exception:
                self.hub.counters.internal_errors += 1
                log.exception("the call sweep failed")

    async def sweep(self) -> None:
        """Expire every call whose ring deadline passed (whichever node set it)."""
        now = _ms()
        due: list[Any] = await self.redis.zrangebyscore(self._ring, "-inf", now, start=0, num=256)
        for raw in due:
            call_id = raw.decode()
            book, fx, where = await self._transact(call_id, (), lambda b, w: b.expire(now))
            if call_id not in book.calls and call_id not in book.ended:
                await self.redis.zrem(self._ring, call_id)  # a call gone with its TTL
            if fx:
                self.sweeps_fired += 1
            self.route(fx, where)
        gone: list[Any] = await self.redis.zrangebyscore(self._gone, "-inf", now, start=0, num=256)
        for raw in gone:
            sid, identity, node = raw.decode().split(" ")
            await self._leave_calls(sid, identity, node, now)
            await self.redis.zrem(self._gone, raw)

    async def _leave_calls(self, sid: str, identity: str, node: str, now: int) -> None:
        """Session ``sid`` of dead ``node`` leaves its calls, unless it resumed elsewhere."""

        def step(b: OneCall, w: dict[str, str]) -> list[Effect]:
            if w.get(sid) != node:
                return []  # resumed on another node meanwhile (or never rung)
            return b.session_ended(identity, sid, now)

        for call_id in await self._calls_of(identity):
            _, fx, where = await self._transact(call_id, (), step)
            if fx:
                self.dead_left += 1
            self.route(fx, where)

    # -- session hooks ---------------------------------------------------------------------------

    async def _calls_of(self, identity: str) -> list[str]:
        members: set[Any] = await self.redis.smembers(self._key("calls", identity))
        return sorted(m.decode() for m in members)

    def session_started(self, s: Session) -> None:
        self._spawn(self._ring_device_everywhere(s))

    async def _ring_device_everywhere(self, s: Session) -> None:
        try:
            # After the device is in the directory: an invite that read the directory
            # without it has written its call by then (its transaction watched the entry).
            await self.flushed()
            for call_id in await self._calls_of(s.identity):

                def step(b: OneCall, w: dict[str, str]) -> list[Effect]:
                    fx = b.session_started(s.identity, s.id)
                    if fx:
                        w[s.id] = self.node_id
                    return fx

                _, fx, where = await self._transact(call_id, (), step)
                self.route(fx, where)
        except (ProtocolError, *UNAVAILABLE) as e:
            log.warning("a new device of %s was not rung in its calls: %s", s.identity, e)

    def session_resumed(self, s: Session) -> None:
        self._spawn(self._resumed(s))

    async def _resumed(self, s: Session) -> None:
        try:
            for call_id in await self._calls_of(s.identity):

                def step(b: OneCall, w: dict[str, str]) -> list[Effect]:
                    if s.id in w:
                        w[s.id] = self.node_id  # it may have resumed on another node
                    return []

                book, _, _ = await self._transact(call_id, (), step)
                call = book.calls.get(call_id)
                if call is not None and call in book.calls_of_session(s.id, s.identity):
                    s.send(self._with_ice(s, book.state_for(call, s.identity)))
        except (ProtocolError, *UNAVAILABLE) as e:
            log.warning("a resumed session of %s was not told its calls: %s", s.identity, e)

    def session_ended(self, s: Session, reason: str) -> None:
        if reason == "moved":
            return  # resumed on another node: in its calls still, from there
        self._spawn(self._ended(s))

    async def _ended(self, s: Session) -> None:
        try:
            for call_id in await self._calls_of(s.identity):

                def step(b: OneCall, w: dict[str, str]) -> list[Effect]:
                    if w.get(s.id) not in (None, self.node_id):
                        return []  # resumed on another node meanwhile
                    return b.session_ended(s.identity, s.id, _ms())

                _, fx, where = await self._transact(call_id, (), step)
                self.route(fx, where)
        except (ProtocolError, *UNAVAILABLE) as e:
            # Its calls go on without it; a ringing call still rings out at its deadline.
            log.warning("an ended session of %s did not leave its calls: %s", s.identity, e)

    # -- requests --------------------------------------------------------------------------------

    async def _unknown(self, identities: list[str]) -> set[str]:
        """As on one node, but an identity with a device on some node is known even before
        that device's write reached the store (it may have just connected elsewhere)."""
        unknown = sorted(await super()._unknown(identities))
        if not unknown:
            return set()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in unknown:
                    pipe.exists(self._key("presence", i))
                present = await pipe.execute()
        except UNAVAILABLE:
            return set(unknown)
        return {i for i, n in zip(unknown, present, strict=True) if not n}

    async def _start(
        self,
        s: Session,
        m: dict[str, Any],
        to: list[str],
        room: str | None,
        group: str | None,
        unseen: frozenset[str],
    ) -> None:
        call_id = secrets.token_urlsafe(12)
        made: list[Call] = []
        devices: dict[str, dict[str, str]] = {i: {} for i in to}

        def step(b: OneCall, w: dict[str, str]) -> list[Effect]:
            # A callee with a device anywhere is reachable (no push); a device of this node
            # without a connection (in its resume grace) is not.
            reachable = {
                i
                for i in to
                if any(node != self.node_id for node in devices[i].values())
                or any(x.conn is not None for x in self.hub.sessions_of(i))
            }
            w[s.id] = self.node_id
            for d in devices.values():
                w.update(d)
            call, fx = b.invite(
                call_id,
                caller=s.identity,
                caller_name=s.name,
                session=s.id,
                to=to,
                video=m.get("video", False),
                room=room,
                devices={i: sorted(d) for i, d in devices.items()},
                reachable=reachable,
                now=_ms(),
                conversation=group,
                unseen=unseen,
            )
            made[:] = [call]
            return fx

        _, fx, where = await self._transact(call_id, [s.identity, *to], step, devices)
        self.calls_started += 1
        self.reply_state(s, made[0], m)
        self.route(fx, where)

    async def on_call_ringing(self, s: Session, m: dict[str, Any]) -> None:
        _, fx, where = await self._transact(
            m["call"], (), self._as(s, lambda b: b.ringing(m["call"], s.identity, s.id))
        )
        s.ok(m)
        self.route(fx, where)

    async def on_call_accept(self, s: Session, m: dict[str, Any]) -> None:
        book, fx, where = await self._transact(
            m["call"],
            [s.identity],
            self._as(s, lambda b: b.accept(m["call"], s.identity, s.id, _ms())),
        )
        self.reply_state(s, book.calls[m["call"]], m)
        self.route(fx, where)

    async def on_call_decline(self, s: Session, m: dict[str, Any]) -> None:
        _, fx, where = await self._transact(
            m["call"], (), self._as(s, lambda b: b.decline(m["call"], s.identity, s.id, _ms()))
        )
        s.ok(m)
        self.route(fx, where)

    async def on_call_cancel(self, s: Session, m: dict[str, Any]) -> None:
        _, fx, where = await self._transact(
            m["call"], (), self._as(s, lambda b: b.cancel(m["call"], s.identity, s.id, _ms()))
        )
        s.ok(m)
        self.route(fx, where)

    async def on_call_hangup(self, s: Session, m: dict[str, Any]) -> None:
        _, fx, where = await self._transact(
            m["call"], (), self._as(s, lambda b: b.hangup(m["call"], s.identity, s.id, _ms()))
        )
        s.ok(m)
        self.route(fx, where)

    def _as(self, s: Session, act: Callable[[OneCall], list[Effect]]) -> Step:
        """A step taken by session ``s`` of this node (which the call then knows is here)."""

        def step(b: OneCall, w: dict[str, str]) -> list[Effect]:
            fx = act(b)
            w[s.id] = self.node_id
            return fx

        return step

    async def on_call_signal(self, s: Session, m: dict[str, Any]) -> None:
        check_signal(m)
        try:
            raw = await self.redis.get(self._key("call", m["call"]))
        except UNAVAILABLE as e:
            raise ProtocolError(
                "store_unavailable",
                "calls cannot be changed now (the cluster's Redis is unavailable); retry",
                retry_after_ms=1000,
            ) from e
        book = OneCall(self.book.ring_timeout_ms, self.book.one_to_one_media, set())
        where: dict[str, str] = {}
        if raw is not None:
            rec = orjson.loads(raw)
            if "ended" in rec:
                book.ended[m["call"]] = frozenset(rec["ended"])
            else:
                call, where = call_from_json(raw)
                book.calls[call.id] = call
        target = book.signal_target(m["call"], s.identity, s.id, m.get("to"))
        out = signal_message(s, m)
        node = where.get(target, self.node_id)
        if node == self.node_id:
            peer = self.hub.sessions.get(target)
            if peer is None:
                raise ProtocolError("not_in_call", "the target device is gone")
            peer.deliver(encode(out))
        else:
            self.hub.bus.publish(
                f"callnode:{node}", orjson.dumps({"to": [target], "msg": out, "ice": False})
            )
        s.ok(m)
