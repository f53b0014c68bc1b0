"""Rooms and presence across nodes, kept in Redis (issue 14): the ``SharedState`` of
``signaling.core.shared``.

Keys (``P`` is ``cluster.key_prefix``):

- ``P:room:<room>``: hash, participant id -> the participant (JSON, with its node).
- ``P:rooms``: set of the rooms with participants (an index for listing them; a room found
  empty leaves it when listed).
- ``P:room:<room>:locked``: ``1`` while the room is locked; expires ``rooms.empty_room_grace_s``
  after the room empties, as a node's own room would be forgotten.
- ``P:presence:<identity>``: hash, ``<node> <session>`` -> that device's status.
- ``P:conn:<identity>``: set of ``<node> <session>``, the identity's sessions with a live
  connection (a session waiting for its resume is in the presence hash, not here): whether
  a message's recipient is pushed.
- ``P:nodes``: set of the nodes with entries here; ``P:alive:<node>``: the node's heartbeat
  (written every ``heartbeat_s``, expiring after three); ``P:noderooms:<node>`` and
  ``P:nodedevices:<node>``: sets of the node's participants and sessions, what to remove
  when it dies.
- ``P:gone``: sorted set, ``p <node> <participant> <room>`` and ``d <node> <session>
  <identity>`` of dead nodes -> when they are removed (the resume grace after the node was
  found dead), unless their session resumed on another node meanwhile.
- ``P:callgone``: sorted set, ``<session> <identity> <node>`` of a dead node's devices that
  were in calls -> when they leave them (the resume grace after the node was found dead).

Every change that must be atomic is one Lua script: a join (the lock, the room's size and
"the first joiner moderates" are checked and the participant added in one step, so two
nodes can never both make a first joiner), a presence change (the identity's status across
its devices is computed before and after, and a `presence` event published on the bus's
channel when it changed, in Redis's order), and the removal of a dead node's entries (one
node wins it: ``SREM`` of the dead node from ``P:nodes``).

Frames published by the scripts carry the origin ``*`` (no node has that id), so every node
delivers them, the one that caused them included. The scripts build the names of the keys
they touch beyond ``KEYS`` from the prefix: this needs one Redis, not a Redis Cluster.

Each node owns its own entries: it writes them as its sessions change and all of them again
after it lost Redis (or was taken for dead), from its memory. Writes of this node go through
one queue, in order; a write that finds Redis unavailable is dropped and the node marked for
that re-assertion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Final

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError

from ..core.metrics import Metric
from ..core.rooms import Participant
from ..core.session import Session
from ..core.shared import ResumedSession, SharedState
from ..core.tokens import Claims
from ..wire.errors import ProtocolError
from .redisbus import TIMEOUT_S, UNAVAILABLE, connect, raise_if_cancelled

if TYPE_CHECKING:
    from ..core.hub import Hub

log = logging.getLogger(__name__)

#: The origin of frames the scripts publish: not a node id (``config._NAME`` excludes ``*``).
SCRIPT_ORIGIN: Final = b"\x01*"

_STATUS_LUA = """
local RANK = {offline = 0, away = 1, online = 2, busy = 3}
local function status(key)
  local best, rank = 'offline', 0
  for _, v in ipairs(redis.call('HVALS', key)) do
    local r = RANK[v] or 0
    if r > rank then best, rank = v, r end
  end
  return best
end
-- A WebSocket text frame, as signaling.wire.framing.frame makes (RFC 6455 section 5.2):
-- what the bus hands to sessions. Identities and room names keep these short of 64 KiB.
local function ws(payload)
  local n = #payload
  if n < 126 then return string.char(0x81, n) .. payload end
  return string.char(0x81, 126, math.floor(n / 256), n % 256) .. payload
end
local function presence_frame(identity, st)
  local ident = cjson.encode(identity)
  return ws('{"type":"presence","identity":' .. ident .. ',"status":"' .. st .. '"}')
end
"""

# KEYS: presence hash, node's devices set. ARGV: field, status ('' = removed), identity,
# channel, devices-set member, origin header.
_PRESENCE = (
    _STATUS_LUA
    + """
local before = status(KEYS[1])
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[5])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[5])
end
local after = status(KEYS[1])
if after ~= before then
  redis.call('PUBLISH', ARGV[4], ARGV[6] .. presence_frame(ARGV[3], after))
end
return after
"""
)

# KEYS: room hash, lock key, node's rooms set, the rooms index. ARGV: pid, participant JSON,
# the same as moderator, moderate grant ('1'/'0'), first joiner moderates ('1'/'0'), max
# participants, node's rooms-set member, room name.
_JOIN = """
local existing = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1
local locked = redis.call('EXISTS', KEYS[2]) == 1
local mod = ARGV[4] == '1'
if not existing then
  local n = redis.call('HLEN', KEYS[1])
  if ARGV[5] == '1' and n == 0 then mod = true end
  if locked and not mod then return {'room_locked'} end
  if n >= tonumber(ARGV[6]) then return {'room_full'} end
end
redis.call('HSET', KEYS[1], ARGV[1], mod and ARGV[3] or ARGV[2])
redis.call('PERSIST', KEYS[2])
redis.call('SADD', KEYS[3], ARGV[7])
redis.call('SADD', KEYS[4], ARGV[8])
local out = {'ok', mod and '1' or '0', locked and '1' or '0'}
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do out[#out + 1] = v end
return out
"""

# Every room with participants: KEYS: the rooms index. ARGV: prefix. Returns {room, count,
# locked (0/1), ...}; rooms found empty leave the index (in the same step: a join adds back).
_ROOMS = """
local out = {}
for _, room in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. ':room:' .. room
  local n = redis.call('HLEN', key)
  if n == 0 then
    redis.call('SREM', KEYS[1], room)
  else
    out[#out + 1] = room
    out[#out + 1] = n
    out[#out + 1] = redis.call('EXISTS', key .. ':locked')
  end
end
return out
"""

# Whether participant ARGV[1] of room hash KEYS[1] is this node's (ARGV[4]); another node
# has it when its session resumed there.
_MINE = """
local function mine()
  local pj = redis.call('HGET', KEYS[1], ARGV[1])
  return pj and cjson.decode(pj)['node'] == ARGV[4]
end
"""

# KEYS: room hash, lock key, node's rooms set. ARGV: pid, rooms-set member, grace ms, node.
_LEAVE = (
    _MINE
    + """
redis.call('SREM', KEYS[3], ARGV[2])
if not mine() then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return 1
"""
)

# KEYS: room hash. ARGV: pid, participant JSON, (unused), node.
_UPDATE = (
    _MINE
    + """
if mine() then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""
)

# Take a session that resumes here from the node that had it. KEYS: the resume record, the
# record's set of this node. ARGV: this node, prefix, token. The record (JSON), taken once
# (DEL), and its participants and its device's status moved to this node if they are still
# there (its old node did not end it, nobody removed them): returns {record, status or '',
# room, 1 or 0 (moved), ...}; nil if there is no record, or it is this node's.
_CLAIM = """
local rec = redis.call('GET', KEYS[1])
if not rec then return nil end
local r = cjson.decode(rec)
local old, new, P = r['node'], ARGV[1], ARGV[2]
if old == new then return nil end
redis.call('DEL', KEYS[1])
redis.call('SREM', P .. ':noderesume:' .. old, ARGV[3])
local sid, ident = r['sid'], r['identity']
local pkey = P .. ':presence:' .. ident
local st = redis.call('HGET', pkey, old .. ' ' .. sid)
if st then
  redis.call('HDEL', pkey, old .. ' ' .. sid)
  redis.call('HSET', pkey, new .. ' ' .. sid, st)
  redis.call('SREM', P .. ':nodedevices:' .. old, sid .. ' ' .. ident)
  redis.call('SADD', P .. ':nodedevices:' .. new, sid .. ' ' .. ident)
end
redis.call('SREM', P .. ':conn:' .. ident, old .. ' ' .. sid)
local out = {rec, st or ''}
for room, _ in pairs(r['rooms']) do
  local key = P .. ':room:' .. room
  local pj = redis.call('HGET', key, sid)
  local moved = 0
  if pj then
    local p = cjson.decode(pj)
    if p['node'] == old then
      p['node'] = new
      redis.call('HSET', key, sid, cjson.encode(p))
      redis.call('SREM', P .. ':noderooms:' .. old, sid .. ' ' .. room)
      redis.call('SADD', P .. ':noderooms:' .. new, sid .. ' ' .. room)
      moved = 1
    end
  end
  out[#out + 1] = room
  out[#out + 1] = tostring(moved)
end
return out
"""

# KEYS: nodes set, the node's heartbeat, its rooms set, its devices set. ARGV: node id,
# prefix, resume grace ms, the deadline (ms since the epoch): when the
# node's participants and devices that have not resumed on another node by then are removed
# (``_EXPIRE``) and its devices that were in calls leave them (``P:callgone``, swept by
# ``signaling.calls.shared``). Nothing is removed now: as on one node, a session whose
# connection is gone waits for its resume for the grace, and nobody sees it leave until then.
# Returns how many entries it deferred (-1: alive, or another node reaped it first).
_REAP = """
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return -1 end
local P, node, at, n = ARGV[2], ARGV[1], ARGV[4], 0
local gone = P .. ':gone'
for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  redis.call('ZADD', gone, at, 'p ' .. node .. ' ' .. m)  -- m: '<pid> <room>'
  n = n + 1
end
redis.call('DEL', KEYS[3])
for _, m in ipairs(redis.call('SMEMBERS', KEYS[4])) do
  local sp = string.find(m, ' ', 1, true)
  local sid, ident = string.sub(m, 1, sp - 1), string.sub(m, sp + 1)
  redis.call('ZADD', gone, at, 'd ' .. node .. ' ' .. m)  -- m: '<session> <identity>'
  n = n + 1
  redis.call('SREM', P .. ':conn:' .. ident, node .. ' ' .. sid)  -- no live connection
  if redis.call('EXISTS', P .. ':calls:' .. ident) == 1 then
    -- in a call: it leaves it unless it resumes elsewhere in time (SharedCalls' sweep)
    redis.call('ZADD', P .. ':callgone', at, sid .. ' ' .. ident .. ' ' .. node)
  end
end
redis.call('DEL', KEYS[4])
-- Its sessions may resume on another node for the resume grace from now.
local rset = P .. ':noderesume:' .. node
for _, token in ipairs(redis.call('SMEMBERS', rset)) do
  redis.call('PEXPIRE', P .. ':resume:' .. token, ARGV[3])
end
redis.call('DEL', rset)
return n
"""

# Remove the entries of dead nodes whose grace has passed, unless their session resumed on
# another node (the entry is that node's now) or their node came back (a stall: it re-asserts
# them). KEYS: P:gone. ARGV: prefix, now (ms since the epoch), origin header, room grace ms.
# Returns how many it removed.
_EXPIRE = (
    _STATUS_LUA
    + """
local P, H, n = ARGV[1], ARGV[3], 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, 512)) do
  redis.call('ZREM', KEYS[1], m)
  local s1 = string.find(m, ' ', 3, true)
  local s2 = string.find(m, ' ', s1 + 1, true)
  local kind, node = string.sub(m, 1, 1), string.sub(m, 3, s1 - 1)
  local a, b = string.sub(m, s1 + 1, s2 - 1), string.sub(m, s2 + 1)
  if redis.call('EXISTS', P .. ':alive:' .. node) == 0 then
    if kind == 'p' then
      local key = P .. ':room:' .. b
      local pj = redis.call('HGET', key, a)
      if pj and cjson.decode(pj)['node'] == node then
        redis.call('HDEL', key, a)
        n = n + 1
        local ident = cjson.decode(pj)['identity']
        redis.call('PUBLISH', P .. ':room:' .. b, H .. ws(cjson.encode({type = 'participant_left',
          room = b, participant = a, identity = ident, reason = 'disconnected'})))
        if redis.call('HLEN', key) == 0 then redis.call('PEXPIRE', key .. ':locked', ARGV[4]) end
      end
    else
      local key = P .. ':presence:' .. b
      local before = status(key)
      if redis.call('HDEL', key, node .. ' ' .. a) == 1 then
        n = n + 1
        local after = status(key)
        if after ~= before then
          redis.call('PUBLISH', key, H .. presence_frame(b, after))
        end
      end
    end
  end
end
return n
"""
)


def _unavailable() -> RedisConnectionError:
    return RedisConnectionError("the cluster's Redis is unavailable")


def _participant(raw: bytes | str) -> Participant:
    return Participant(**orjson.loads(raw))


class ClusterState:
    """``SharedState`` on Redis (module docstring). ``start`` and ``close`` own its two
    tasks: the writer (this node's changes, in order) and the heartbeat (which also removes
    dead nodes' entries and re-asserts this node's after an outage)."""

    def __init__(
        self,
        url: str,
        node_id: str,
        prefix: str,
        *,
        heartbeat_s: float,
        room_grace_s: float,
        resume_grace_s: float,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.node_id = node_id
        self.prefix = prefix
        self.heartbeat_s = heartbeat_s
        self.dead_after_ms = int(heartbeat_s * 3000)
        self.grace_ms = max(1, int(room_grace_s * 1000))
        self.hub: Hub | None = None  # whose sessions this node re-asserts (``signaling.app``)
        self._redis = connect(url, timeout_s)
        r = self._redis
        self._presence = r.register_script(_PRESENCE)
        self._join = r.register_script(_JOIN)
        self._leave = r.register_script(_LEAVE)
        self._update = r.register_script(_UPDATE)
        self._reap = r.register_script(_REAP)
        self._claim = r.register_script(_CLAIM)
        self._expire = r.register_script(_EXPIRE)
        self._gone = f"{prefix}:gone"
        self._rooms = r.register_script(_ROOMS)
        self._rooms_index = f"{prefix}:rooms"
        self.resume_grace_ms = max(1, int(resume_grace_s * 1000))
        self._origin = SCRIPT_ORIGIN.decode()
        self._nodes = f"{prefix}:nodes"
        self._alive = f"{prefix}:alive:{node_id}"
        self._rooms_of_node = f"{prefix}:noderooms:{node_id}"
        self._devices_of_node = f"{prefix}:nodedevices:{node_id}"
        self._resume_of_node = f"{prefix}:noderesume:{node_id}"
        self._ops: deque[tuple[Callable[[], Awaitable[Any]], asyncio.Future[Any] | None]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Task[None]] = set()  # lookups answered by a callback
        self._first_beat = asyncio.Event()
        self._dirty = False  # a write was lost: re-assert everything once Redis answers
        self._closing = False
        self.timeout_s = timeout_s
        self.available = False
        # Counters.
        self.lost_writes = 0
        self.reaped = 0  # entries of dead nodes this node removed
        self.reasserts = 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the writer and the heartbeat (Redis need not be up: they keep trying)."""
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="cluster-writer"),
            asyncio.create_task(self._beat_forever(), name="cluster-heartbeat"),
        ]
        # The first beat before the node serves (bounded): writes of its first sessions
        # would otherwise be dropped until then (and a device miss a call ringing meanwhile).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_beat.wait(), self.timeout_s)

    async def close(self) -> None:
        """Stop; a node that stops cleanly removes its own entries at once (its sessions
        have ended by now) rather than leaving them to expire."""
        self._closing = True
        self._wake.set()
        for t in self._tasks:
            t.cancel()
        # Bounded: a cancellation that meets one of redis-py's timeouts can be taken for
        # that timeout; the writer then sees ``_closing`` and returns by itself.
        _, stuck = await asyncio.wait(self._tasks, timeout=self.timeout_s)
        if stuck:
            log.warning("cluster state tasks did not stop: %s", [t.get_name() for t in stuck])
        self._tasks = []
        for t in list(self._pending):
            t.cancel()
        try:
            await self._redis.delete(self._alive)
            await self._reap_node(self.node_id)
        except UNAVAILABLE:
            pass
        await self._redis.aclose()

    # -- the writer: this node's changes, in order ------------------------------------------------

    def _queue(
        self, op: Callable[[], Awaitable[Any]], fut: asyncio.Future[Any] | None = None
    ) -> None:
        self._ops.append((op, fut))
        self._wake.set()

    async def _call(self, op: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``op`` in the writer's order and return its result; while Redis is known to
        be unavailable, raise at once (``UNAVAILABLE``) rather than wait for a timeout."""
        if not self.available:
            raise _unavailable()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue(op, fut)
        return await fut

    async def flushed(self) -> None:
        """Return once every write of this node queued so far is in Redis (or lost: it
        raises ``UNAVAILABLE`` while Redis is known to be away)."""

        async def nothing() -> None:
            pass

        await self._call(nothing)

    async def _write_forever(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._ops and not self._closing:
                op, fut = self._ops.popleft()
                if not self.available:  # fail fast; the heartbeat re-asserts once it is back
                    self.lost_writes += 1
                    self._dirty = True
                    if fut is not None and not fut.done():
                        fut.set_exception(
                            RedisConnectionError("the cluster's Redis is unavailable")
                        )
                    continue
                try:
                    result = await op()
                except UNAVAILABLE as e:
                    raise_if_cancelled()
                    self._lost(e)
                    if fut is not None and not fut.done():
                        fut.set_exception(e)
                except Exception as e:
                    if fut is not None and not fut.done():
                        fut.set_exception(e)  # the caller's to handle
                    else:
                        self.lost_writes += 1
                        log.exception("a cluster state write failed")
                else:
                    if fut is not None and not fut.done():
                        fut.set_result(result)

    def _lost(self, e: BaseException) -> None:
        self.lost_writes += 1
        self._dirty = True
        if self.available:
            self.available = False
            log.error("the cluster's Redis cannot be reached (%s); re-asserting later", e)

    # -- rooms -----------------------------------------------------------------------------------

    def _room_key(self, room: str) -> str:
        return f"{self.prefix}:room:{room}"

    async def join(
        self, room: str, p: Participant, *, first_moderates: bool, max_participants: int
    ) -> tuple[Participant, bool, list[Participant]]:
        key = self._room_key(room)
        grant = "1" if p.moderator else "0"  # the token's moderate grant
        p.moderator = False
        plain = orjson.dumps(p)
        p.moderator = True
        as_moderator = orjson.dumps(p)
        p.moderator = grant == "1"
        try:
            out = await self._call(
                lambda: self._join(
                    keys=[key, f"{key}:locked", self._rooms_of_node, self._rooms_index],
                    args=[
                        p.id,
                        plain,
                        as_moderator,
                        grant,
                        "1" if first_moderates else "0",
                        max_participants,
                        f"{p.id} {room}",
                        room,
                    ],
                )
            )
        except UNAVAILABLE as e:  # one node's view until Redis is back (then re-asserted)
            self._lost(e)
            return p, False, []
        if out[0] == b"room_locked":
            raise ProtocolError("room_locked", f"room {room!r} is locked")
        if out[0] == b"room_full":
            raise ProtocolError(
                "room_full", f"room {room!r} is full ({max_participants} participants)"
            )
        p.moderator = out[1] == b"1"
        others = [x for x in map(_participant, out[3:]) if x.id != p.id]
        return p, out[2] == b"1", others

    def leave(self, room: str, pid: str) -> None:
        key = self._room_key(room)
        self._queue(
            lambda: self._leave(
                keys=[key, f"{key}:locked", self._rooms_of_node],
                args=[pid, f"{pid} {room}", self.grace_ms, self.node_id],
            )
        )

    def update(self, room: str, p: Participant) -> None:
        data = orjson.dumps(p)
        self._queue(
            lambda: self._update(keys=[self._room_key(room)], args=[p.id, data, "", self.node_id])
        )

    async def lock(self, room: str, locked: bool) -> None:
        key = f"{self._room_key(room)}:locked"

        async def op() -> None:
            if locked:
                await self._redis.set(key, b"1")
            else:
                await self._redis.delete(key)

        try:
            await self._call(op)
        except UNAVAILABLE as e:
            self._lost(e)

    async def room(self, room: str) -> tuple[list[Participant], bool]:
        if not self.available:
            return [], False
        key = self._room_key(room)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hvals(key)
                pipe.exists(f"{key}:locked")
                values, locked = await pipe.execute()
        except UNAVAILABLE as e:
            self._lost(e)
            return [], False
        return [_participant(v) for v in values], bool(locked)

    async def rooms(self) -> list[tuple[str, int, bool]] | None:
        if not self.available:
            return None
        try:
            out = await self._rooms(keys=[self._rooms_index], args=[self.prefix])
        except UNAVAILABLE as e:
            raise_if_cancelled()
            self._lost(e)
            return None
        return [(out[i].decode(), int(out[i + 1]), bool(out[i + 2])) for i in range(0, len(out), 3)]

    async def participant(self, room: str, pid: str) -> Participant | None:
        if not self.available:
            return None
        try:
            raw = await self._redis.hget(self._room_key(room), pid)
        except UNAVAILABLE as e:
            self._lost(e)
            return None
        return None if raw is None else _participant(raw)

    # -- sessions: resuming on another node ---------------------------------------------------

    def save_session(self, session: Session, drop_token: str = "") -> None:
        """Keep ``session``'s resume record (``P:resume:<token>``) up to date: what another
        node needs to resume it. Written in the background, as the session is then (one write
        per change of its token, rooms, watches or status)."""
        hub = self.hub

        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                if drop_token:
                    pipe.delete(f"{self.prefix}:resume:{drop_token}")
                    pipe.srem(self._resume_of_node, drop_token)
                if hub is not None and hub.sessions.get(session.id) is session:
                    token = session.resume_token
                    pipe.set(f"{self.prefix}:resume:{token}", self._record(session))
                    pipe.sadd(self._resume_of_node, token)
                await pipe.execute()

        self._queue(op)

    def drop_session(self, token: str) -> None:
        """The session ended: nobody may resume it."""

        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(f"{self.prefix}:resume:{token}")
                pipe.srem(self._resume_of_node, token)
                await pipe.execute()

        self._queue(op)

    def _record(self, s: Session) -> bytes:
        c = s.claims
        return orjson.dumps(
            {
                "sid": s.id,
                "identity": s.identity,
                "name": s.name,
                "device": s.device,
                "node": self.node_id,
                "status": s.status,
                "watching": sorted(s.watching),
                "rooms": {room: p for room, p in s.rooms.items()},
                "claims": {
                    "name": c.name,
                    "rooms": {r: sorted(g) for r, g in c.rooms.items()},
                    "dm": c.dm,
                    "expires_at": c.expires_at,
                    "groups": c.groups,
                    "contacts": c.contacts,
                },
            }
        )

    async def claim_resume(self, token: str) -> ResumedSession | None:
        """Take the session of resume ``token`` from the node that had it (once: a second
        claim finds nothing), with its participants and status if they are still in Redis;
        None if no node has such a session (unknown, ended, or its grace is over)."""
        try:
            out = await self._call(
                lambda: self._claim(
                    keys=[f"{self.prefix}:resume:{token}", self._resume_of_node],
                    args=[self.node_id, self.prefix, token],
                )
            )
        except UNAVAILABLE as e:
            self._lost(e)
            return None
        if out is None:
            return None
        r = orjson.loads(out[0])
        c = r["claims"]
        claims = Claims(
            r["identity"],
            c["name"],
            {room: frozenset(g) for room, g in c["rooms"].items()},
            c["dm"],
            c["expires_at"],
            c["groups"],
            c["contacts"],
        )
        moved = {out[i].decode(): out[i + 1] == b"1" for i in range(2, len(out), 2)}
        rooms = {}
        for room, p in r["rooms"].items():
            p["node"] = self.node_id
            rooms[room] = (Participant(**p), moved.get(room, False))
        return ResumedSession(
            r["sid"],
            claims,
            r["device"],
            r["node"],
            out[1].decode() or r["status"],
            frozenset(r["watching"]),
            rooms,
        )

    # -- presence --------------------------------------------------------------------------------

    def _presence_op(self, identity: str, session: str, status: str) -> Awaitable[Any]:
        key = f"{self.prefix}:presence:{identity}"
        return self._presence(
            keys=[key, self._devices_of_node],
            args=[
                f"{self.node_id} {session}",
                status,
                identity,
                key,
                f"{session} {identity}",
                SCRIPT_ORIGIN,
            ],
        )

    def presence_set(self, identity: str, session: str, status: str) -> None:
        self._queue(lambda: self._presence_op(identity, session, status))

    def presence_remove(self, identity: str, session: str) -> None:
        self._queue(lambda: self._presence_op(identity, session, ""))

    def connected(self, identity: str, session: str, live: bool) -> None:
        key = f"{self.prefix}:conn:{identity}"
        member = f"{self.node_id} {session}"
        if live:
            self._queue(lambda: self._redis.sadd(key, member))
        else:
            self._queue(lambda: self._redis.srem(key, member))

    def online_elsewhere(
        self, identities: list[str], then: Callable[[frozenset[str]], None]
    ) -> None:
        self._spawn(self._online_elsewhere(identities, then))

    async def _online_elsewhere(
        self, identities: list[str], then: Callable[[frozenset[str]], None]
    ) -> None:
        online: frozenset[str] = frozenset()
        if self.available:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for i in identities:
                        pipe.smembers(f"{self.prefix}:conn:{i}")
                    found = await pipe.execute()
            except UNAVAILABLE as e:
                raise_if_cancelled()
                self._lost(e)  # unknown: a push too many rather than one missed
            else:
                mine = f"{self.node_id} ".encode()
                online = frozenset(
                    i
                    for i, members in zip(identities, found, strict=True)
                    if any(not m.startswith(mine) for m in members)
                )
        then(online)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a cluster lookup failed", exc_info=task.exception())

    async def nodes_of(self, identity: str) -> set[str]:
        if not self.available:
            return set()
        try:
            fields: list[Any] = await self._redis.hkeys(f"{self.prefix}:presence:{identity}")
        except UNAVAILABLE as e:
            raise_if_cancelled()
            self._lost(e)
            return set()
        nodes = {f.split(b" ", 1)[0].decode() for f in fields}
        nodes.discard(self.node_id)
        return nodes

    async def statuses(self, identities: Iterable[str]) -> dict[str, str]:
        idents = list(identities)
        if not idents or not self.available:
            return {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for i in idents:
                    pipe.hvals(f"{self.prefix}:presence:{i}")
                found = await pipe.execute()
        except UNAVAILABLE as e:
            self._lost(e)
            return {}
        out = {}
        for i, values in zip(idents, found, strict=True):
            best = max((RANK.get(v.decode(), 0) for v in values), default=0)
            out[i] = STATUSES[best]
        return out

    # -- heartbeat, dead nodes, re-assertion ----------------------------------------------------

    async def _beat_forever(self) -> None:
        first = True
        while not self._closing:
            raise_if_cancelled()  # a cancellation redis-py swallowed still ends the loop
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(self._alive, b"1", px=self.dead_after_ms)
                    pipe.sadd(self._nodes, self.node_id)
                    pipe.smembers(self._nodes)
                    _, added, nodes = await pipe.execute()
                if not self.available:
                    if not first:
                        log.warning("the cluster's Redis is back")
                    self.available = True
                if (added and not first) or self._dirty:
                    # Redis lost what this node had there (a restart), or the others took
                    # it for dead (it stalled for longer than 3 heartbeats): write it again.
                    self._dirty = False
                    await self._call(self._reassert)
                first = False
                self._first_beat.set()
                for node in nodes:
                    name = node.decode()
                    if name != self.node_id:
                        await self._reap_node(name)
                removed = await self._expire(
                    keys=[self._gone],
                    args=[self.prefix, int(time.time() * 1000), SCRIPT_ORIGIN, self.grace_ms],
                )
                self.reaped += removed
            except UNAVAILABLE as e:
                raise_if_cancelled()
                self._lost(e)
            except Exception:  # not an outage: say what it was, and beat again
                log.exception("the cluster heartbeat failed")
            await asyncio.sleep(self.heartbeat_s)

    async def _reap_node(self, node: str) -> None:
        p = self.prefix
        n = await self._reap(
            keys=[
                self._nodes,
                f"{p}:alive:{node}",
                f"{p}:noderooms:{node}",
                f"{p}:nodedevices:{node}",
            ],
            args=[node, p, self.resume_grace_ms, int(time.time() * 1000) + self.resume_grace_ms],
        )
        if n >= 0 and node != self.node_id:
            log.warning(
                "node %s is gone (no heartbeat): its %d entries go in %.1f s unless resumed",
                node,
                n,
                self.resume_grace_ms / 1000,
            )

    async def _reassert(self) -> None:
        """Write every entry of this node again, from memory (the sessions and rooms)."""
        hub = self.hub
        if hub is None:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(self._nodes, self.node_id)
            for s in list(hub.sessions.values()):
                for room, part in s.rooms.items():
                    pipe.hset(self._room_key(room), part.id, orjson.dumps(part))
                    pipe.sadd(self._rooms_index, room)
                    pipe.sadd(self._rooms_of_node, f"{part.id} {room}")
                pipe.set(f"{self.prefix}:resume:{s.resume_token}", self._record(s))
                pipe.sadd(self._resume_of_node, s.resume_token)
                if s.conn is not None:
                    pipe.sadd(f"{self.prefix}:conn:{s.identity}", f"{self.node_id} {s.id}")
                key = f"{self.prefix}:presence:{s.identity}"
                await self._presence(
                    keys=[key, self._devices_of_node],
                    args=[
                        f"{self.node_id} {s.id}",
                        s.status,
                        s.identity,
                        key,
                        f"{s.id} {s.identity}",
                        SCRIPT_ORIGIN,
                    ],
                    client=pipe,
                )
            await pipe.execute()
        # Counted once written: a client of the metric (and the tests) may rely on the entries
        # being there when it moves.
        self.reasserts += 1
        log.warning("re-asserted this node's sessions and participants in the cluster's Redis")

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "cluster_unavailable",
            "gauge",
            "1 while the cluster's Redis (rooms, presence) cannot be reached.",
            float(not self.available),
        )
        yield Metric(
            "cluster_lost_writes",
            "counter",
            "Room or presence writes Redis did not take (re-asserted once it is back).",
            self.lost_writes,
        )
        yield Metric(
            "cluster_reaped",
            "counter",
            "Entries of dead nodes this node removed.",
            self.reaped,
        )
        yield Metric(
            "cluster_reasserts",
            "counter",
            "Times this node wrote all its entries again after losing Redis.",
            self.reasserts,
        )


RANK: Final = {"offline": 0, "away": 1, "online": 2, "busy": 3}
STATUSES: Final = ("offline", "away", "online", "busy")


if TYPE_CHECKING:

    def _is_shared_state(s: ClusterState) -> SharedState:
        return s  # mypy checks that ClusterState has the protocol's methods
