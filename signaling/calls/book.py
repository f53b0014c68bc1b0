"""The call state machine: who rings, who answered, when a call ends and how. Pure; no I/O.

A call has one caller (an identity on one device) and one callee (a 1:1 call) or several (a group
call). Every step takes the current time in ms and returns *effects*: messages to send to
sessions, push events for identities without an online device, and call-log entries to store.
The call service (``signaling.calls.service``) carries them out.

Rules (see docs/PROTOCOL.md, "Calls"):

- Every device of a callee rings (``call_incoming``); a device that connects while its identity is
  still being rung rings too, which is how a phone woken by a push gets the call.
- A callee the caller may not reach (unknown, blocking the caller, or a stranger where calls are
  for contacts: ``signaling.core.privacy``) is *unseen*: invited like one that is offline, but
  none of its devices rings, it gets no push, is never busy, cannot act on the call, and its
  call-log entry is withheld from it. The caller sees a callee that never answers.
- A callee already in a call (caller of a live call, or joined to one) is ``busy`` at once.
- The first device of a callee to accept wins; the identity's other devices get
  ``call_answered_elsewhere``. No answer within the ring timeout is ``missed``.
- Every device that was rung or is in the call gets exactly one terminal event:
  ``call_answered_elsewhere`` or ``call_ended``.
- The call ends when nobody can still talk: fewer than two parties joined or still ringing, or
  (before any answer) the caller cancelled or every callee declined, was busy or missed it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ..wire.errors import ProtocolError

INVITED: Final = "invited"
RINGING: Final = "ringing"
JOINED: Final = "joined"
DECLINED: Final = "declined"
BUSY: Final = "busy"
MISSED: Final = "missed"
LEFT: Final = "left"
PENDING: Final = (INVITED, RINGING)

ENDED_MEMORY: Final = 4096  # ended call ids remembered for a clear `call_ended` error


# --- effects ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``msg`` to each session in ``sessions``; ``with_ice`` adds fresh ICE servers."""

    sessions: tuple[str, ...]
    msg: dict[str, Any]
    with_ice: bool = False


@dataclass(frozen=True, slots=True)
class Push:
    """A push event for an identity without an online device."""

    kind: str  # "call_incoming" | "call_cancelled"
    identity: str
    call: str
    caller: str
    caller_name: str
    video: bool
    group: bool
    reason: str = ""  # call_cancelled: answered | declined | missed | cancelled | completed


@dataclass(frozen=True, slots=True)
class Log:
    """A call-log message to store (kind ``call``) in ``conversation``."""

    conversation: str
    members: tuple[str, ...]  # the two identities of a direct conversation, else ()
    call: str
    caller: str
    caller_name: str
    callee: str | None  # per-callee entries (direct conversations)
    outcome: str
    duration_ms: int
    video: bool
    group: bool
    hidden_from: str | None = None  # an unseen callee: the entry is the caller's alone


Effect = Send | Push | Log


# --- state --------------------------------------------------------------------------------------


def dm_conversation(a: str, b: str) -> str:
    """The direct conversation of two identities (sorted, as in the hub)."""
    x, y = sorted((a, b))
    return f"dm:{x}|{y}"


@dataclass(slots=True)
class Party:
    """One identity in a call. ``devices`` are its rung sessions (callees); ``device`` is the
    session it is in the call with (the caller's, or the one that accepted)."""

    identity: str
    status: str
    devices: set[str] = field(default_factory=set)
    device: str | None = None
    pushed: bool = False  # an incoming-call push went out: a cancel push must follow
    unseen: bool = False  # never rung, never told (see the module docstring)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"identity": self.identity, "status": self.status}
        if self.device is not None and self.status == JOINED:
            out["device"] = self.device
        return out


@dataclass(slots=True)
class Call:
    """One call."""

    id: str
    caller: Party
    caller_name: str
    callees: dict[str, Party]
    video: bool
    media: str  # "p2p" | "sfu"
    room: str | None  # group call: the room whose conversation gets the log
    started_at: int
    expires_at: int
    answered_at: int | None = None
    ended_at: int | None = None
    outcome: str | None = None
    cancelled: bool = False
    conversation: str | None = None  # a call started from a group: its `group:<id>`

    @property
    def group(self) -> bool:
        return len(self.callees) > 1

    @property
    def media_room(self) -> str:
        """The room an SFU call's devices join."""
        return f"call-{self.id}"

    @property
    def state(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "ringing" if self.answered_at is None else "active"

    def parties(self) -> Iterable[Party]:
        yield self.caller
        yield from self.callees.values()

    def party(self, identity: str) -> Party | None:
        if identity == self.caller.identity:
            return self.caller
        return self.callees.get(identity)

    def joined_devices(self, exclude: str | None = None) -> tuple[str, ...]:
        """Sessions in the call (caller and answered callees that have not left)."""
        return tuple(
            p.device
            for p in self.parties()
            if p.status == JOINED and p.device is not None and p.device != exclude
        )

    def pending(self) -> list[Party]:
        return [p for p in self.callees.values() if p.status in PENDING]

    def info(self) -> dict[str, Any]:
        """Fields shared by `call_incoming` and `call_state`."""
        out: dict[str, Any] = {
            "call": self.id,
            "from": self.caller.identity,
            "from_name": self.caller_name,
            "video": self.video,
            "group": self.group,
            "media": self.media,
        }
        if self.media == "sfu":
            out["room"] = self.media_room
        if self.conversation is not None:
            out["conversation"] = self.conversation
        if self.ended_at is None and self.pending():
            out["expires_at"] = self.expires_at
        return out

    def duration_ms(self) -> int:
        if self.answered_at is None:
            return 0
        end = self.ended_at if self.ended_at is not None else self.answered_at
        return max(0, end - self.answered_at)


def _group_outcome(call: Call) -> str:
    """The outcome of the whole call (see the module docstring)."""
    if call.answered_at is not None:
        return "completed"
    if call.cancelled:
        return "cancelled"
    statuses = {p.status for p in call.callees.values()}
    if statuses == {DECLINED}:
        return "declined"
    if statuses == {BUSY}:
        return "busy"
    return "missed"


def _callee_outcome(call: Call, p: Party) -> str:
    """The outcome as one callee lived it (its call-log entry)."""
    if p.status in (JOINED, LEFT):
        return "completed"
    if p.status in (DECLINED, BUSY, MISSED):
        return p.status
    return "cancelled" if call.cancelled else "missed"


# --- the book of calls --------------------------------------------------------------------------


class CallBook:
    """Every live call of this node, indexed by session and identity."""

    def __init__(self, ring_timeout_ms: int, one_to_one_media: str = "p2p") -> None:
        self.ring_timeout_ms = ring_timeout_ms
        self.one_to_one_media = one_to_one_media
        self.calls: dict[str, Call] = {}
        self.by_identity: dict[str, set[str]] = {}
        self.ended: OrderedDict[str, frozenset[str]] = OrderedDict()

    # -- lookups ---------------------------------------------------------------------------------

    def in_call(self, identity: str) -> bool:
        """Whether ``identity`` is talking (or calling) in some live call."""
        for cid in self.by_identity.get(identity, ()):
            p = self.calls[cid].party(identity)
            if p is not None and p.status == JOINED:
                return True
        return False

    def calls_of(self, identity: str) -> list[Call]:
        return [self.calls[c] for c in sorted(self.by_identity.get(identity, ()))]

    def calls_of_session(self, session: str, identity: str) -> list[Call]:
        """Live calls in which ``session`` rings or talks."""
        out = []
        for call in self.calls_of(identity):
            p = call.party(identity)
            if p is not None and (p.device == session or session in p.devices):
                if p.status in (*PENDING, JOINED):
                    out.append(call)
        return out

    def get(self, call_id: str, identity: str) -> tuple[Call, Party]:
        """The call and ``identity``'s party in it; errors for strangers and ended calls."""
        call = self.calls.get(call_id)
        if call is None:
            parties = self.ended.get(call_id)
            if parties is not None and identity in parties:
                raise ProtocolError("call_ended", f"call {call_id} has ended")
            raise ProtocolError("no_such_call", f"no call {call_id!r} involves you")
        p = call.party(identity)
        if p is None or p.unseen:
            raise ProtocolError("no_such_call", f"no call {call_id!r} involves you")
        return call, p

    def state_for(self, call: Call, identity: str) -> dict[str, Any]:
        """The `call_state` message for a device of ``identity``."""
        out: dict[str, Any] = {"type": "call_state", **call.info()}
        out.update(
            state=call.state,
            role="caller" if identity == call.caller.identity else "callee",
            parties=[p.to_wire() for p in call.parties()],
            started_at=call.started_at,
        )
        if call.answered_at is not None:
            out["answered_at"] = call.answered_at
        if call.outcome is not None:
            out["outcome"] = call.outcome
        return out

    def next_deadline(self) -> int | None:
        """When the earliest ringing callee times out (ms), if any."""
        deadlines = [c.expires_at for c in self.calls.values() if c.pending()]
        return min(deadlines) if deadlines else None

    # -- steps -----------------------------------------------------------------------------------

    def invite(
        self,
        call_id: str,
        *,
        caller: str,
        caller_name: str,
        session: str,
        to: Sequence[str],
        video: bool,
        room: str | None,
        devices: Mapping[str, Sequence[str]],
        reachable: set[str],
        now: int,
        conversation: str | None = None,
        unseen: frozenset[str] = frozenset(),
    ) -> tuple[Call, list[Effect]]:
        """Start a call from ``session`` of ``caller`` to ``to``.

        ``devices`` maps each callee to its sessions (all are rung); ``reachable`` holds the
        callees with a live connection (the others get a push); ``unseen`` the callees the
        caller may not reach (invited, never rung). ``conversation``: a call started from a
        group (its members are ``to``), logged there once.
        """
        callees = list(dict.fromkeys(to))
        if not callees:
            raise ProtocolError("bad_field", "`to` needs at least one identity")
        if caller in callees:
            raise ProtocolError("bad_field", "you cannot call yourself")
        if call_id in self.calls or call_id in self.ended:
            raise ProtocolError("internal_error", "call id collision")
        if self.in_call(caller):
            raise ProtocolError("in_call", "you are already in a call; hang up first")
        if room is not None and len(callees) == 1:
            raise ProtocolError("bad_field", "`room` is for group calls (more than one callee)")
        call = Call(
            call_id,
            Party(caller, JOINED, device=session),
            caller_name,
            {c: Party(c, INVITED) for c in callees},
            video,
            "sfu" if len(callees) > 1 else self.one_to_one_media,
            room,
            now,
            now + self.ring_timeout_ms,
            conversation=conversation,
        )
        self.calls[call_id] = call
        self.by_identity.setdefault(caller, set()).add(call_id)
        fx: list[Effect] = []
        incoming = {"type": "call_incoming", **call.info()}
        incoming.update(from_device=session, to=callees)
        for p in call.callees.values():
            self.by_identity.setdefault(p.identity, set()).add(call_id)
            if p.identity in unseen:  # as if offline for good: no device, no push, not busy
                p.unseen = True
                continue
            if self.in_call(p.identity):
                p.status = BUSY
                fx.append(Send((session,), self._about("call_busy", call, p.identity)))
                continue
            p.devices = set(devices.get(p.identity, ()))
            if p.devices:
                fx.append(Send(tuple(sorted(p.devices)), incoming, with_ice=True))
            if p.identity not in reachable:
                p.pushed = True
                fx.append(self._push("call_incoming", call, p.identity))
        fx += self._check_end(call, now)
        return call, fx

    def ringing(self, call_id: str, identity: str, session: str) -> list[Effect]:
        call, p = self.get(call_id, identity)
        self._callee_only(call, p)
        if p.status not in PENDING:
            return []  # late report after an answer elsewhere: nothing to tell
        p.devices.add(session)
        if p.status == RINGING:
            return []
        p.status = RINGING
        msg = self._about("call_ringing", call, identity)
        msg["device"] = session
        return [Send(call.joined_devices(), msg)]

    def accept(self, call_id: str, identity: str, session: str, now: int) -> list[Effect]:
        call, p = self.get(call_id, identity)
        self._callee_only(call, p)
        if p.status == JOINED:
            where = "this device" if p.device == session else "another device"
            raise ProtocolError("already_answered", f"the call was answered on {where}")
        if p.status not in PENDING:
            raise ProtocolError("call_ended", f"the call is over for you ({p.status})")
        if self.in_call(identity):
            raise ProtocolError("in_call", "you are already in a call; hang up first")
        others = tuple(sorted(p.devices - {session}))
        fx: list[Effect] = []
        if others:
            fx.append(
                Send(
                    others, {"type": "call_answered_elsewhere", "call": call.id, "device": session}
                )
            )
        p.status = JOINED
        p.device = session
        p.devices = {session}
        if call.answered_at is None:
            call.answered_at = now
        msg = self._about("call_accepted", call, identity)
        msg["device"] = session
        fx.append(Send(call.joined_devices(exclude=session), msg))
        if p.pushed:
            fx.append(self._push("call_cancelled", call, identity, "answered"))
            p.pushed = False
        return fx

    def decline(self, call_id: str, identity: str, session: str, now: int) -> list[Effect]:
        call, p = self.get(call_id, identity)
        self._callee_only(call, p)
        if p.status == JOINED:
            raise ProtocolError("already_answered", "the call was answered; hang up instead")
        if p.status not in PENDING:
            raise ProtocolError("call_ended", f"the call is over for you ({p.status})")
        p.devices.add(session)
        return self._drop_pending(call, p, DECLINED, now)

    def cancel(self, call_id: str, identity: str, session: str, now: int) -> list[Effect]:
        call, p = self.get(call_id, identity)
        if p is not call.caller:
            raise ProtocolError("forbidden", "only the caller can cancel; decline instead")
        if p.device != session:
            raise ProtocolError("not_in_call", "the call was made from another device")
        if call.answered_at is not None:
            raise ProtocolError("already_answered", "the call was answered; hang up instead")
        call.cancelled = True
        return self._end(call, now)

    def hangup(self, call_id: str, identity: str, session: str, now: int) -> list[Effect]:
        call, p = self.get(call_id, identity)
        if p.status == JOINED and p.device == session:
            if p is call.caller and call.answered_at is None:
                call.cancelled = True
                return self._end(call, now)
            return self._leave(call, p, now)
        if p.status in PENDING and p is not call.caller:
            p.devices.add(session)
            return self._drop_pending(call, p, DECLINED, now)
        raise ProtocolError("not_in_call", "this device is not in the call")

    def signal_target(self, call_id: str, identity: str, session: str, to: str | None) -> str:
        """The session a `call_signal` from ``session`` goes to; both must be in the call."""
        call, p = self.get(call_id, identity)
        if p.status != JOINED or p.device != session:
            raise ProtocolError("not_in_call", "this device is not in the call")
        peers = call.joined_devices(exclude=session)
        if to is None:
            if call.group:
                raise ProtocolError("bad_field", "`to` is required in a group call")
            if not peers:
                raise ProtocolError("not_in_call", "nobody has answered yet")
            return peers[0]
        if to not in peers:
            raise ProtocolError("not_in_call", "the target device is not in the call")
        return to

    def expire(self, now: int) -> list[Effect]:
        """Callees still ringing at their deadline missed the call."""
        fx: list[Effect] = []
        for call in list(self.calls.values()):
            if call.expires_at > now:
                continue
            pending = call.pending()
            for p in pending:
                fx += self._drop_pending(call, p, MISSED, now, check=False)
            if pending:
                fx += self._check_end(call, now)
        return fx

    def session_started(self, identity: str, session: str) -> list[Effect]:
        """A new device of ``identity`` rings in every call still ringing for it."""
        fx: list[Effect] = []
        for call in self.calls_of(identity):
            p = call.callees.get(identity)
            if p is None or p.unseen or p.status not in PENDING or session in p.devices:
                continue
            p.devices.add(session)
            incoming = {"type": "call_incoming", **call.info()}
            incoming.update(from_device=call.caller.device, to=list(call.callees))
            fx.append(Send((session,), incoming, with_ice=True))
        return fx

    def session_ended(self, identity: str, session: str, now: int) -> list[Effect]:
        """A device is gone for good (bye, or the resume grace expired)."""
        fx: list[Effect] = []
        for call in self.calls_of(identity):
            if call.id not in self.calls:
                continue
            p = call.party(identity)
            assert p is not None
            if p.status == JOINED and p.device == session:
                if p is call.caller and call.answered_at is None:
                    call.cancelled = True
                    fx += self._end(call, now)
                else:
                    fx += self._leave(call, p, now)
            else:
                p.devices.discard(session)
        return fx

    # -- internals -------------------------------------------------------------------------------

    @staticmethod
    def _about(type_: str, call: Call, identity: str) -> dict[str, Any]:
        return {"type": type_, "call": call.id, "identity": identity}

    @staticmethod
    def _callee_only(call: Call, p: Party) -> None:
        if p is call.caller:
            raise ProtocolError("forbidden", "the caller cannot do this; cancel or hang up")

    @staticmethod
    def _push(kind: str, call: Call, identity: str, reason: str = "") -> Push:
        return Push(
            kind,
            identity,
            call.id,
            call.caller.identity,
            call.caller_name,
            call.video,
            call.group,
            reason,
        )

    def _drop_pending(
        self, call: Call, p: Party, status: str, now: int, *, check: bool = True
    ) -> list[Effect]:
        """A ringing callee declined or missed the call: tell the call, stop its devices."""
        p.status = status
        fx: list[Effect] = [
            Send(call.joined_devices(), self._about(f"call_{status}", call, p.identity))
        ]
        if p.devices:
            fx.append(
                Send(
                    tuple(sorted(p.devices)),
                    {"type": "call_ended", "call": call.id, "outcome": status, "duration_ms": 0},
                )
            )
        if p.pushed:
            fx.append(self._push("call_cancelled", call, p.identity, status))
            p.pushed = False
        if check:
            fx += self._check_end(call, now)
        return fx

    def _leave(self, call: Call, p: Party, now: int) -> list[Effect]:
        device = p.device
        p.status = LEFT
        fx: list[Effect] = [Send(call.joined_devices(), self._about("call_left", call, p.identity))]
        if device is not None:
            fx.append(
                Send(
                    (device,),
                    {
                        "type": "call_ended",
                        "call": call.id,
                        "outcome": "completed",
                        "duration_ms": max(0, now - (call.answered_at or now)),
                    },
                )
            )
        return fx + self._check_end(call, now)

    def _check_end(self, call: Call, now: int) -> list[Effect]:
        joined = call.joined_devices()
        pending = call.pending()
        if call.answered_at is None:
            if not pending:
                return self._end(call, now)
            return []
        if not joined or len(joined) + len(pending) < 2:
            return self._end(call, now)
        return []

    def _end(self, call: Call, now: int) -> list[Effect]:
        call.ended_at = now
        call.outcome = outcome = _group_outcome(call)
        duration = call.duration_ms()
        fx: list[Effect] = []
        joined = call.joined_devices()
        if joined:
            fx.append(
                Send(
                    joined,
                    {
                        "type": "call_ended",
                        "call": call.id,
                        "outcome": outcome,
                        "duration_ms": duration,
                    },
                )
            )
        for p in call.pending():
            p_outcome = "cancelled" if call.cancelled else MISSED
            if p.devices:
                fx.append(
                    Send(
                        tuple(sorted(p.devices)),
                        {
                            "type": "call_ended",
                            "call": call.id,
                            "outcome": p_outcome,
                            "duration_ms": 0,
                        },
                    )
                )
            if p.pushed:
                fx.append(self._push("call_cancelled", call, p.identity, p_outcome))
                p.pushed = False
        fx += self._logs(call, outcome, duration)
        for p in call.parties():
            ids = self.by_identity.get(p.identity)
            if ids is not None:
                ids.discard(call.id)
                if not ids:
                    del self.by_identity[p.identity]
        del self.calls[call.id]
        self.ended[call.id] = frozenset(p.identity for p in call.parties() if not p.unseen)
        while len(self.ended) > ENDED_MEMORY:
            self.ended.popitem(last=False)
        return fx

    @staticmethod
    def _logs(call: Call, outcome: str, duration: int) -> list[Effect]:
        caller = call.caller.identity
        where = call.conversation or (f"room:{call.room}" if call.room is not None else None)
        if where is not None:  # one entry, where the call was started
            return [
                Log(
                    where,
                    (),
                    call.id,
                    caller,
                    call.caller_name,
                    None,
                    outcome,
                    duration,
                    call.video,
                    call.group,
                )
            ]
        out: list[Effect] = []
        for p in call.callees.values():
            o = _callee_outcome(call, p)
            out.append(
                Log(
                    dm_conversation(caller, p.identity),
                    tuple(sorted((caller, p.identity))),
                    call.id,
                    caller,
                    call.caller_name,
                    p.identity,
                    o,
                    duration if o == "completed" else 0,
                    call.video,
                    call.group,
                    p.identity if p.unseen else None,
                )
            )
        return out
