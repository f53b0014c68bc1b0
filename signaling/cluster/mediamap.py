"""The room-to-node map of group-call media in Redis (issue 14): a thin adapter; the choice
is ``signaling.cluster.placement.choose``.

Keys (``P`` is ``cluster.key_prefix``):

- ``P:media:<room>``: the node hosting the room's media.
- ``P:mediarooms:<node>``: set of the rooms placed on the node (its load: their number).
- ``P:medianodes``: set of the nodes that run an SFU (candidates while ``P:alive:<node>``
  exists).

A room is placed in one optimistic transaction (``WATCH`` of ``P:media:<room>``): the first
node to ``EXEC`` wins, the others read its choice. A placement that names a node whose
heartbeat is gone counts as none.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from redis.exceptions import WatchError

from .placement import choose
from .redisbus import connect

#: Remove room ``ARGV[2]``'s placement if it is ``ARGV[1]``'s (a node releases only its own).
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('SREM', KEYS[2], ARGV[2])
return 0
"""

#: A dead node's placements (-1: it is alive, or its set is gone already).
_FORGET: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local n = 0
for _, room in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local key = ARGV[2] .. ':media:' .. room
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key); n = n + 1 end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return n
"""

ATTEMPTS: Final = 20  # placements run again after another node's EXEC (never seen near)


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class MediaMap:
    """This node's view of the room-to-node map (module docstring)."""

    def __init__(self, url: str, node_id: str, prefix: str) -> None:
        self.node_id = node_id
        self.prefix = prefix
        self.redis = connect(url)
        self._release = self.redis.register_script(_RELEASE)
        self._forget = self.redis.register_script(_FORGET)
        self._nodes = f"{prefix}:medianodes"

    async def close(self, hosting: bool, rooms: Iterable[str]) -> None:
        """A node stopping cleanly takes itself out (``hosting``: it ran an SFU) and
        unplaces its ``rooms`` (their participants have left by now)."""
        try:
            for room in rooms:
                await self.release(room)
            if hosting:
                await self.redis.srem(self._nodes, self.node_id)
        finally:
            await self.redis.aclose()

    async def place(self, room: str) -> str | None:
        """The node of ``room``'s media: the one placed already if alive, else the one
        ``choose`` picks, written in the same transaction. None: no node runs an SFU."""
        p = self.prefix
        key = f"{p}:media:{room}"
        for _ in range(ATTEMPTS):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    cur = await pipe.get(key)
                    if cur is not None and await pipe.exists(f"{p}:alive:{_text(cur)}"):
                        return _text(cur)
                    loads = await self._loads()
                    node = choose(self.node_id, loads)
                    if node is None:
                        return None
                    pipe.multi()
                    pipe.set(key, node)
                    pipe.sadd(f"{p}:mediarooms:{node}", room)
                    if cur is not None:
                        pipe.srem(f"{p}:mediarooms:{_text(cur)}", room)
                    await pipe.execute()
                    return node
                except WatchError:
                    continue
        raise TimeoutError(f"placing room {room!r} kept conflicting")

    async def _loads(self) -> dict[str, int]:
        """The live SFU nodes and the number of rooms placed on each."""
        p = self.prefix
        r = self.redis
        nodes = sorted(_text(n) for n in await r.smembers(self._nodes))
        if not nodes:
            return {}
        async with r.pipeline(transaction=False) as q:
            for n in nodes:
                q.exists(f"{p}:alive:{n}")
                q.scard(f"{p}:mediarooms:{n}")
            found = await q.execute()
        return {
            n: int(found[2 * i + 1])
            for i, n in enumerate(nodes)
            if found[2 * i] or n == self.node_id
        }

    async def owner(self, room: str) -> str | None:
        cur = await self.redis.get(f"{self.prefix}:media:{room}")
        return None if cur is None else _text(cur)

    async def release(self, room: str) -> None:
        """``room``'s media closed on this node: unplace it (if it is still this node's)."""
        p = self.prefix
        await self._release(
            keys=[f"{p}:media:{room}", f"{p}:mediarooms:{self.node_id}"],
            args=[self.node_id, room],
        )

    async def beat(self, hosting: bool, nodes: Iterable[str]) -> tuple[set[str], bool]:
        """Say this node runs an SFU (if ``hosting``) and return which of ``nodes`` have no
        heartbeat any more, and whether this node had to be added again (the others took it
        for dead and forgot its rooms, or Redis lost its data)."""
        p = self.prefix
        names = sorted(set(nodes))
        async with self.redis.pipeline(transaction=False) as q:
            if hosting:
                q.sadd(self._nodes, self.node_id)
            for n in names:
                q.exists(f"{p}:alive:{n}")
            found = await q.execute()
        alive = found[1:] if hosting else found
        return {n for n, a in zip(names, alive, strict=True) if not a}, bool(hosting and found[0])

    async def reclaim(self, rooms: Iterable[str]) -> set[str]:
        """This node was added again (taken for dead, or Redis lost its data): place its
        ``rooms`` on it again where nobody placed them meanwhile; the rooms placed on
        another node since."""
        p = self.prefix
        names = sorted(rooms)
        async with self.redis.pipeline(transaction=False) as q:
            for room in names:  # SET NX, then who has it now
                q.set(f"{p}:media:{room}", self.node_id, nx=True)
                q.get(f"{p}:media:{room}")
            found = await q.execute()
        mine = self.node_id.encode()
        lost = {room for i, room in enumerate(names) if found[2 * i + 1] != mine}
        kept = sorted(set(names) - lost)
        if kept:
            await self.redis.sadd(f"{p}:mediarooms:{self.node_id}", *kept)
        return lost

    async def forget(self, node: str) -> int:
        """Remove a dead node's placements (its rooms are placed again when next needed)."""
        p = self.prefix
        n = await self._forget(
            keys=[f"{p}:alive:{node}", f"{p}:mediarooms:{node}", self._nodes],
            args=[node, p],
        )
        return int(n)
