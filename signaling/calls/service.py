"""Call signaling: the thin edge around the pure state machine in ``signaling.calls.book``.

``CallService`` carries out the state machine's effects (messages to devices, pushes,
call-log messages in the conversation), runs the ring timer, and handles the ``call_*``
messages. ``signaling.app`` wires its session hooks and its room grants into the hub. See
docs/PROTOCOL.md, "Calls".
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Final

import orjson

from sfu.tasks import TaskSet

from ..chat.store import ChatStore, NewMessage
from ..core.feature import Feature
from ..core.hub import Hub
from ..core.metrics import Metric
from ..core.privacy import callee_unreachable
from ..core.session import Session
from ..notify.events import PushSink, call_event
from ..wire.errors import ProtocolError
from ..wire.framing import encode
from .book import Call, CallBook, Effect, Log, Push, Send
from .messages import MESSAGES

log = logging.getLogger("rallypoint.calls")

#: Grants a call's parties get in its media room (SFU calls), beyond their tokens.
CALL_ROOM_GRANTS: Final = frozenset({"join", "publish", "subscribe", "chat"})


def _ms() -> int:
    return int(time.time() * 1000)


def _log_text(entry: Log) -> str:
    """The human-readable text of a call-log message (apps localize from the `call` field)."""
    what = "Video call" if entry.video else "Call"
    if entry.outcome == "completed":
        s = entry.duration_ms // 1000
        return f"{what}, {s // 60}:{s % 60:02d}"
    return {
        "missed": f"Missed {what.lower()}",
        "declined": f"Declined {what.lower()}",
        "busy": f"{what}: busy",
        "cancelled": f"Cancelled {what.lower()}",
    }[entry.outcome]


class CallService:
    """Calls of one hub: the state machine plus timers, store writes and pushes."""

    def __init__(self, hub: Hub, store: ChatStore, push: PushSink | None = None) -> None:
        cfg = hub.cfg.calls
        self.hub = hub
        self.store = store
        self.push = push
        self.book = CallBook(int(cfg.ring_timeout_s * 1000), cfg.one_to_one_media)
        self._timer: asyncio.TimerHandle | None = None
        self._tasks = TaskSet(self._task_failed)
        self._stopped = False
        self.calls_started = 0
        self.call_logs_stored = 0
        self.max_group_callees = cfg.max_group_callees
        #: A group's current members, or None if there is no such group (wired to chat).
        self.group_members: Callable[[str], tuple[str, ...] | None] = lambda conv: None

    def feature(self) -> Feature:
        return Feature(
            "calls",
            MESSAGES,
            {
                "call_invite": self.on_call_invite,
                "call_ringing": self.on_call_ringing,
                "call_accept": self.on_call_accept,
                "call_decline": self.on_call_decline,
                "call_cancel": self.on_call_cancel,
                "call_hangup": self.on_call_hangup,
                "call_signal": self.on_call_signal,
            },
        )

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "calls_started", "counter", "Calls started (`call_invite`).", self.calls_started
        )
        yield Metric(
            "call_logs_stored", "counter", "Call-log messages stored.", self.call_logs_stored
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Cancel the ring timer and finish pending store writes (before the store closes)."""
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._tasks.wait()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.spawn(coro)

    def _task_failed(self, exc: BaseException) -> None:
        self.hub.counters.internal_errors += 1
        log.error("call background task failed", exc_info=exc)

    # -- effects ---------------------------------------------------------------------------------

    def apply(self, effects: Iterable[Effect]) -> None:
        """Carry out what the state machine decided, then re-arm the ring timer."""
        hub = self.hub
        for fx in effects:
            if isinstance(fx, Send):
                frame: bytes | None = None
                for sid in fx.sessions:
                    s = hub.sessions.get(sid)
                    if s is None:
                        continue
                    if fx.with_ice:
                        s.send(self._with_ice(s, fx.msg))
                    else:
                        if frame is None:
                            frame = encode(fx.msg)
                        s.deliver(frame)
            elif isinstance(fx, Push):
                if self.push is not None:
                    self.push.submit(
                        call_event(
                            fx.kind,
                            identity=fx.identity,
                            call=fx.call,
                            caller=fx.caller,
                            video=fx.video,
                            group=fx.group,
                            reason=fx.reason,
                        )
                    )
            elif isinstance(fx, Log):
                self._spawn(self._store_log(fx))
        self._arm()

    def _with_ice(self, s: Session, msg: dict[str, Any]) -> dict[str, Any]:
        out = dict(msg)
        out["ice_servers"] = self.hub.ice(s, s.host)
        return out

    async def _store_log(self, entry: Log) -> None:
        hub = self.hub
        meta: dict[str, Any] = {
            "id": entry.call,
            "outcome": entry.outcome,
            "duration_ms": entry.duration_ms,
            "caller": entry.caller,
            "video": entry.video,
            "group": entry.group,
        }
        if entry.callee is not None:
            meta["callee"] = entry.callee
        stored, dup = await self.store.append(
            NewMessage(
                entry.conversation,
                f"call-{entry.call}",
                entry.caller,
                entry.caller_name,
                "call",
                _log_text(entry),
                None,
                entry.members,
                meta=orjson.dumps(meta).decode(),
                hidden_from=entry.hidden_from,
            )
        )
        if dup:
            return
        self.call_logs_stored += 1
        hub.counters.messages_stored += 1
        # Every device of every party sees the log, and so does everyone in a group's room, or
        # every member of the group the call was started from; an unseen callee's entry only
        # the caller.
        identities = set(entry.members) or {entry.caller, *self._parties_of_log(entry)}
        if entry.conversation[0] == "g":
            identities.update(self.group_members(entry.conversation) or ())
        if entry.hidden_from is not None:
            identities.discard(entry.hidden_from)
        self._deliver_log(entry, identities, encode(stored.to_wire()), stored.seq)

    def _deliver_log(self, entry: Log, identities: set[str], frame: bytes, seq: int) -> None:
        """Hand a stored call-log message to every device of ``identities`` here (and, for
        a room's log, everyone in the room)."""
        hub = self.hub
        targets: dict[str, Session] = {}
        for ident in identities:
            for s in hub.sessions_of(ident):
                targets[s.id] = s
        if not entry.members:
            for key, sink in hub.bus.local_subscribers(entry.conversation).items():
                if isinstance(sink, Session):
                    targets[key] = sink
        for s in targets.values():
            s.deliver(frame)

    def _parties_of_log(self, entry: Log) -> frozenset[str]:
        return self.book.ended.get(entry.call, frozenset())

    def _arm(self) -> None:
        if self._stopped:
            return
        deadline = self.book.next_deadline()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(0.0, (deadline - _ms()) / 1000) + 0.005
            self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self.apply(self.book.expire(_ms()))

    # -- session hooks (wired by signaling.app) ------------------------------------------

    def session_started(self, s: Session) -> None:
        # The hub calls this before `welcome` goes out: ring the new device right after it.
        asyncio.get_running_loop().call_soon(self._ring_new_device, s.id)

    def _ring_new_device(self, sid: str) -> None:
        s = self.hub.sessions.get(sid)
        if s is not None:
            self.apply(self.book.session_started(s.identity, s.id))

    def session_resumed(self, s: Session) -> None:
        for call in self.book.calls_of_session(s.id, s.identity):
            s.send(self._with_ice(s, self.book.state_for(call, s.identity)))

    def session_ended(self, s: Session, reason: str) -> None:
        self.apply(self.book.session_ended(s.identity, s.id, _ms()))

    def room_grants(self, s: Session, room: str) -> frozenset[str] | None:
        if not room.startswith("call-"):
            return None
        call = self.book.calls.get(room[5:])
        if call is None or call.media != "sfu" or call.party(s.identity) is None:
            return None
        return CALL_ROOM_GRANTS

    # -- requests --------------------------------------------------------------------------------

    def reply_state(self, s: Session, call: Call, req: dict[str, Any]) -> None:
        msg = self._with_ice(s, self.book.state_for(call, s.identity))
        if "id" in req:
            msg["re"] = req["id"]
        s.send(msg)

    # -- handlers ----------------------------------------------------------------------------

    def _group_callees(self, s: Session, m: dict[str, Any]) -> list[str]:
        """The members a call started from a group rings: every other member."""
        if "to" in m or "room" in m:
            raise ProtocolError("bad_field", "give `group` alone, without `to` or `room`")
        conv: str = m["group"]
        members = self.group_members(conv)
        if members is None or s.identity not in members:
            raise ProtocolError("bad_conversation", f"{conv!r} is not a group of yours")
        # Members the caller blocks are not called (calling them directly is refused).
        blocks = self.hub.blocks
        to = [i for i in members if i != s.identity and not blocks.blocked(s.identity, i)]
        if not to:
            raise ProtocolError("bad_field", "nobody in this group to call")
        if len(to) > self.max_group_callees:
            raise ProtocolError(
                "bad_field",
                f"a call from a group rings at most {self.max_group_callees} members: "
                "start it in a room, or call some of them",
            )
        return to

    async def on_call_invite(self, s: Session, m: dict[str, Any]) -> None:
        group: str | None = m.get("group")
        room: str | None = m.get("room")
        if group is not None:
            # Membership is the permission; members who never connected are pushed like
            # any offline member.
            to = self._group_callees(s, m)
        elif "to" not in m:
            raise ProtocolError("bad_field", "give `to` (identities) or `group`")
        else:
            to = list(dict.fromkeys(m["to"]))
            if room is None:
                if not s.claims.dm:
                    raise ProtocolError("forbidden", "the token does not allow direct calls")
            else:
                grants = self.hub.grants_for(s, room)
                if grants is None:
                    raise ProtocolError(
                        "token_wrong_room", f"the token grants nothing in room {room!r}"
                    )
                if "join" not in grants:
                    raise ProtocolError(
                        "forbidden", f"the token has no join grant in room {room!r}"
                    )
        if group is None:
            unseen = await self._unseen(s.identity, to)
        else:
            unseen = self._unseen_members(s, to)
        await self._start(s, m, to, room, group, unseen)

    async def _start(
        self,
        s: Session,
        m: dict[str, Any],
        to: list[str],
        room: str | None,
        group: str | None,
        unseen: frozenset[str],
    ) -> None:
        """Start the checked call (one node: no await, the step and its effects are one
        atomic change)."""
        devices = {i: [x.id for x in self.hub.sessions_of(i)] for i in to}
        reachable = {i for i in to if any(x.conn is not None for x in self.hub.sessions_of(i))}
        call, fx = self.book.invite(
            secrets.token_urlsafe(12),
            caller=s.identity,
            caller_name=s.name,
            session=s.id,
            to=to,
            video=m.get("video", False),
            room=room,
            devices=devices,
            reachable=reachable,
            now=_ms(),
            conversation=group,
            unseen=unseen,
        )
        self.calls_started += 1
        self.reply_state(s, call, m)
        self.apply(fx)

    def _unseen_members(self, s: Session, to: list[str]) -> frozenset[str]:
        """A call from a group: the members who block the caller are invited but never rung
        (as ``_unseen``); members who never connected are rung like any offline member (they
        are members: nothing is probed)."""
        blocked = self.hub.blocks.blocked
        return frozenset(i for i in to if blocked(i, s.identity))

    async def _unseen(self, caller: str, to: list[str]) -> frozenset[str]:
        """The callees ``caller`` may not reach (``privacy.callee_unreachable``); ``blocked``
        if it blocks one. The directory (and, where calls are for contacts, the contact list)
        is asked about every callee, so every call is answered after the same steps."""
        hub = self.hub
        blocks = hub.blocks
        mine = [i for i in to if blocks.blocked(caller, i)]
        if mine:
            raise ProtocolError("blocked", f"you block {mine[0]!r}: unblock it to call it")
        strangers_ok = hub.cfg.privacy.call_strangers
        unknown = await self._unknown(to)
        contacts = set() if strangers_ok else await hub.relations.contacts_among(caller, to)
        return frozenset(
            i
            for i in to
            if callee_unreachable(
                unknown=i in unknown,
                blocked=blocks.blocked(i, caller),
                contact=i in contacts,
                call_strangers=strangers_ok,
            )
        )

    async def _unknown(self, identities: list[str]) -> set[str]:
        """Of ``identities``, those that never connected (the device directory)."""
        return await self.hub.unknown_identities(identities)

    async def on_call_ringing(self, s: Session, m: dict[str, Any]) -> None:
        self.apply(self.book.ringing(m["call"], s.identity, s.id))
        s.ok(m)

    async def on_call_accept(self, s: Session, m: dict[str, Any]) -> None:
        fx = self.book.accept(m["call"], s.identity, s.id, _ms())
        call = self.book.calls[m["call"]]
        self.reply_state(s, call, m)
        self.apply(fx)

    async def on_call_decline(self, s: Session, m: dict[str, Any]) -> None:
        fx = self.book.decline(m["call"], s.identity, s.id, _ms())
        s.ok(m)
        self.apply(fx)

    async def on_call_cancel(self, s: Session, m: dict[str, Any]) -> None:
        fx = self.book.cancel(m["call"], s.identity, s.id, _ms())
        s.ok(m)
        self.apply(fx)

    async def on_call_hangup(self, s: Session, m: dict[str, Any]) -> None:
        fx = self.book.hangup(m["call"], s.identity, s.id, _ms())
        s.ok(m)
        self.apply(fx)

    async def on_call_signal(self, s: Session, m: dict[str, Any]) -> None:
        check_signal(m)
        target = self.book.signal_target(m["call"], s.identity, s.id, m.get("to"))
        peer = self.hub.sessions.get(target)
        if peer is None:  # pragma: no cover - sessions leave calls when they end
            raise ProtocolError("not_in_call", "the target device is gone")
        peer.send(signal_message(s, m))
        s.ok(m)


def check_signal(m: dict[str, Any]) -> None:
    """A `call_signal` carries what its kind needs."""
    kind = m["kind"]
    if kind in ("offer", "answer") and "sdp" not in m:
        raise ProtocolError("bad_field", f"a `{kind}` needs `sdp`")
    if kind == "candidate" and "candidate" not in m:
        raise ProtocolError("bad_field", "a `candidate` needs `candidate`")


def signal_message(s: Session, m: dict[str, Any]) -> dict[str, Any]:
    """What the peer device receives of ``s``'s `call_signal` ``m``."""
    out: dict[str, Any] = {
        "type": "call_signal",
        "call": m["call"],
        "from": s.id,
        "identity": s.identity,
        "kind": m["kind"],
    }
    for key in ("sdp", "candidate", "mid", "mline", "restart"):
        if key in m:
            out[key] = m[key]
    return out
