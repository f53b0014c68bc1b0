"""Group-call media across the nodes of a cluster (issue 14): ``MediaRelay``.

A room's media lives in one SFU worker of one node (``signaling.cluster.mediamap``: placed by
load when the room first needs media). On every other node the router hands the media
requests of its participants to this relay, which sends them to the room's node over the bus
(topic ``medianode:<node>``, with a request id) and waits for the reply, at most
``timeout_s`` (then ``media_unavailable``). The room's node runs them on its own pool as if
they were its own participants' and sends back, to the participant's node, the worker events
meant for that participant (``subscribe_offer``, ``track_starved``, ``media_failed``) and the
room's track changes (for the node's track cache; the clients get those on the room's bus
topic, from the room's node only, so once).

Every ``heartbeat_s`` the relay looks whether the nodes it relies on are alive: the nodes
hosting rooms its participants are in, and the nodes of the other nodes' participants in
rooms hosted here. A room whose node died is placed again when next needed, and this node's
participants in it are told (``lost``: ``media_failed`` with ``which: "all"``) and join again;
a dead node's participants leave the rooms hosted here.

With one node there is no relay: the router talks to its pool directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

import orjson

from sfu.channel import PoolEvent, RoomRequest
from sfu.pool import SfuError
from sfu.tasks import TaskSet

from ..cluster.mediamap import MediaMap
from ..cluster.placement import MOVED, event_frame, reply_frame, request_frame, unplaced_frame
from ..cluster.redisbus import UNAVAILABLE, raise_if_cancelled
from ..core.bus import MessageBus
from ..core.metrics import Metric

log = logging.getLogger("rallypoint.media.relay")

#: Worker events for one participant: sent to its node.
PARTICIPANT_EVENTS = frozenset({"subscribe_offer", "track_starved", "media_failed"})
#: Room events the other nodes' track caches follow (their clients hear them on the bus).
ROOM_EVENTS = frozenset(
    {"track_published", "track_updated", "track_unpublished", "room_closed", "room_lost"}
)


def _log_failure(exc: BaseException) -> None:
    if not isinstance(exc, SfuError):
        log.error("media relay task failed", exc_info=exc)


class _Inbox:
    """The bus sink of ``medianode:<this node>``."""

    __slots__ = ("relay",)

    def __init__(self, relay: MediaRelay) -> None:
        self.relay = relay

    def deliver(self, frame: bytes) -> None:
        self.relay.delivered(frame)


class MediaRelay:
    """Routes media requests to the room's node, and that node's events back (module
    docstring). ``local`` runs a request on this node's pool; ``relayed`` handles an event
    the room's node sent for this node's participants; ``lost`` is told of a room whose node
    died; ``unplaced`` ends the media here of a room this node hosted when the cluster
    forgot that (with the other nodes' participants in it); ``hosting`` says whether this
    node runs an SFU."""

    def __init__(
        self,
        bus: MessageBus,
        placement: MediaMap,
        node_id: str,
        *,
        local: Callable[[RoomRequest], Awaitable[dict[str, Any]]],
        relayed: Callable[[PoolEvent], None],
        lost: Callable[[str], None],
        unplaced: Callable[[str, list[str]], Awaitable[None]],
        hosting: Callable[[], bool],
        timeout_s: float,
        heartbeat_s: float,
    ) -> None:
        self.bus = bus
        self.placement = placement
        self.node_id = node_id
        self.local = local
        self.relayed = relayed
        self.lost = lost
        self.unplaced = unplaced
        self.hosting = hosting
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.where: dict[str, str] = {}  # room -> the node of its media (as placed)
        self.here: set[str] = set()  # rooms placed on this node (checked in Redis)
        self.remote: dict[str, dict[str, str]] = {}  # room here -> other nodes' participants
        self._pending: dict[int, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        # Redis look-ups under way, by room: requests of a room that come meanwhile wait for
        # the same answer, and go on in the order they came (a join before its publish).
        self._lookups: dict[str, asyncio.Future[str | None]] = {}
        self._ids = itertools.count(1)
        self._tasks = TaskSet(_log_failure)
        self._watcher: asyncio.Task[None] | None = None
        self._no_media_until = 0.0  # loop time: no node ran media when last asked
        # Counters.
        self.requests_out = 0  # requests sent to another node
        self.requests_in = 0  # requests of other nodes served here
        self.timeouts = 0
        self.rooms_lost = 0  # rooms whose node died, seen by this node
        self.stale = 0  # events of a room's former node, dropped
        bus.subscribe(f"medianode:{node_id}", "media", _Inbox(self))

    async def start(self) -> None:
        """Say this node hosts media (if it does) before it serves, and watch the nodes."""
        try:
            await self.placement.beat(self.hosting(), ())
        except UNAVAILABLE:
            pass  # the watch says it again each beat
        self._watcher = asyncio.create_task(self._watch_forever(), name="media-relay-watch")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            # Bounded, as ``ClusterState.close``: a cancellation redis-py took for a timeout.
            await asyncio.wait([self._watcher], timeout=self.timeout_s)
        await self._tasks.cancel()
        self.bus.unsubscribe(f"medianode:{self.node_id}", "media")
        try:
            await self.placement.close(self.hosting(), sorted(self.here))
        except UNAVAILABLE:
            pass

    # -- requests ----------------------------------------------------------------------------

    async def request(self, req: RoomRequest) -> dict[str, Any]:
        """Run ``req`` on the room's node: here, or relayed. Raises ``SfuError``."""
        room = req["room"]
        for _ in range(2):  # once more after `moved`
            node = self.where.get(room)
            if node is None:
                node = await self._once(f"place {room}", lambda: self._place(room))
                assert node is not None
            if node == self.node_id:
                return await self.local(req)
            try:
                return await self._ask(node, req)
            except SfuError as e:
                if e.code != MOVED:
                    raise
                if self.where.get(room) == node:
                    del self.where[room]  # placed elsewhere meanwhile: look again
        raise SfuError("media_unavailable", "the room's media is moving between nodes: retry")

    async def _once(self, key: str, look: Callable[[], Awaitable[str | None]]) -> str | None:
        """``look()``, or the answer of the same look-up already under way."""
        fut = self._lookups.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._lookups[key] = fut
        try:
            answer = await look()
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._lookups[key]
        fut.set_result(answer)
        return answer

    async def _place(self, room: str) -> str:
        now = asyncio.get_running_loop().time()
        if now < self._no_media_until:  # a cluster without media: no Redis per join
            raise SfuError("sfu_unavailable", "no node of the cluster runs media")
        try:
            node = await self.placement.place(room)
        except (*UNAVAILABLE, TimeoutError):
            raise SfuError(
                "media_unavailable", "the cluster's Redis cannot be reached: retry"
            ) from None
        if node is None:
            self._no_media_until = now + self.heartbeat_s  # asked again after a heartbeat
            raise SfuError("sfu_unavailable", "no node of the cluster runs media")
        self.where[room] = node
        if node == self.node_id:
            self.here.add(room)
        return node

    async def _ask(self, node: str, req: RoomRequest) -> dict[str, Any]:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (node, fut)
        self.requests_out += 1
        self.bus.publish(f"medianode:{node}", request_frame(rid, self.node_id, req))
        try:
            reply = await asyncio.wait_for(fut, self.timeout_s)
        except TimeoutError:
            self.timeouts += 1
            raise SfuError(
                "media_unavailable",
                f"the node hosting the room's media did not answer in {self.timeout_s:g} s",
            ) from None
        finally:
            self._pending.pop(rid, None)
        if not reply["ok"]:
            raise SfuError(reply["code"], reply["message"])
        return cast(dict[str, Any], reply["result"])

    def delivered(self, frame: bytes) -> None:
        """A frame on ``medianode:<this node>``: a request, a reply or an event."""
        msg = orjson.loads(frame)
        kind = msg["k"]
        if kind == "rep":
            pending = self._pending.get(msg["id"])
            if pending is not None and not pending[1].done():
                pending[1].set_result(msg)
        elif kind == "req":
            self._tasks.spawn(self._serve(msg["id"], msg["from"], msg["req"]))
        elif kind == "unplaced":
            room = msg["room"]
            if self.where.get(room) == msg["from"]:  # as if that node had died, for this room
                del self.where[room]
                self.rooms_lost += 1
                self.lost(room)
        elif kind == "ev":
            ev = cast(PoolEvent, msg["ev"])
            room = ev["room"]
            if self.where.get(room) != msg["from"]:
                # From a node the room was placed on before (one taken for dead, whose
                # worker went on): an offer or a failure of media this node left behind.
                self.stale += 1
                return
            if ev["ev"] == "room_closed" or ev["ev"] == "room_lost":  # look it up again
                del self.where[room]
            self.relayed(ev)

    async def _serve(self, rid: int, origin: str, req: RoomRequest) -> None:
        """Another node's request for a room placed here."""
        self.requests_in += 1
        room = req["room"]
        out = f"medianode:{origin}"
        try:
            if room not in self.here:
                try:
                    owner = await self._once(f"owner {room}", lambda: self.placement.owner(room))
                except UNAVAILABLE:
                    owner = None
                if owner != self.node_id:
                    self.bus.publish(out, reply_frame(rid, None, MOVED, "placed elsewhere"))
                    return
                self.here.add(room)
                self.where[room] = self.node_id
            if req["op"] == "join":
                self.remote.setdefault(room, {})[req["participant"]] = origin
            elif req["op"] == "leave":
                parts = self.remote.get(room)
                if parts is not None:
                    parts.pop(req["participant"], None)
            result = await self.local(req)
        except SfuError as e:
            self.bus.publish(out, reply_frame(rid, None, e.code, e.message))
        except Exception:
            log.exception("a relayed media request failed")
            self.bus.publish(out, reply_frame(rid, None, "internal_error", "media request failed"))
        else:
            self.bus.publish(out, reply_frame(rid, result))

    # -- events of rooms hosted here ---------------------------------------------------------

    def forward(self, ev: PoolEvent) -> None:
        """A worker event of a room hosted here, for the other nodes that need it: one for a
        participant of another node goes to that node; the room's track changes go to every
        node with participants in the room (their track caches)."""
        name = ev["ev"]
        room = ev["room"]
        parts = self.remote.get(room)
        if name in PARTICIPANT_EVENTS:
            node = parts.get(cast(str, ev.get("participant")), "") if parts else ""
            if node:
                self.bus.publish(f"medianode:{node}", event_frame(ev, self.node_id))
        elif name in ROOM_EVENTS:
            if parts:
                frame = event_frame(ev, self.node_id)
                for node in set(parts.values()):
                    self.bus.publish(f"medianode:{node}", frame)
            if name == "room_closed":
                self.remote.pop(room, None)
                self.here.discard(room)
                if self.where.get(room) == self.node_id:
                    del self.where[room]
                self._tasks.spawn(self._release(room))

    async def _release(self, room: str) -> None:
        try:
            await self.placement.release(room)
        except UNAVAILABLE:
            pass  # the room stays placed here: joins come back here, which is right too

    def forget_room(self, room: str) -> bool:
        """This node has nobody left in ``room``: forget where its media is (unless it is
        here); whether it is elsewhere (so that node's events stop coming here)."""
        if room in self.here:
            return False
        self.where.pop(room, None)
        return True

    # -- dead nodes --------------------------------------------------------------------------

    def _relied_on(self) -> Iterable[str]:
        yield from self.where.values()
        for parts in self.remote.values():
            yield from parts.values()

    async def _watch_forever(self) -> None:
        while True:
            raise_if_cancelled()  # a cancellation redis-py swallowed still ends the loop
            await asyncio.sleep(self.heartbeat_s)
            try:
                nodes = set(self._relied_on()) - {self.node_id}
                dead, added = await self.placement.beat(self.hosting(), nodes)
                if added and self.here:
                    self._forgotten(await self.placement.reclaim(self.here))
                for node in sorted(dead):
                    await self.placement.forget(node)
                    self._dead(node)
            except UNAVAILABLE:
                raise_if_cancelled()  # else: looked at again next beat
            except Exception:
                log.exception("watching the media nodes failed")

    def _forgotten(self, rooms: set[str]) -> None:
        """The other nodes took this node for dead (it stalled for 3 heartbeats) or Redis
        lost the map, and ``rooms`` hosted here were placed on other nodes meanwhile (the
        others are placed here again). Their media here ends, as if the worker had died:
        everyone leaves it, is told, and joins again where the room is placed now (one node
        per room again)."""
        if not rooms:
            log.warning("this node's media rooms were forgotten by the cluster: placed again")
            return
        log.warning("%d media rooms of this node were placed elsewhere: ending them", len(rooms))
        for room in sorted(rooms):
            self.here.discard(room)
            if self.where.get(room) == self.node_id:
                del self.where[room]
            self._tasks.spawn(self._unplace(room, self.remote.pop(room, {})))

    async def _unplace(self, room: str, parts: dict[str, str]) -> None:
        await self.unplaced(room, sorted(parts))  # the leaves; this node's are told
        frame = unplaced_frame(room, self.node_id)
        for node in set(parts.values()):  # theirs are told there (unless they moved already)
            self.bus.publish(f"medianode:{node}", frame)

    def _dead(self, node: str) -> None:
        log.warning("media node %s is gone: its rooms are placed again", node)
        gone = {"ok": False, "code": "media_unavailable", "message": "the media node died"}
        for at, fut in self._pending.values():
            if at == node and not fut.done():  # failed now rather than at their timeout
                fut.set_result(gone)
        for room, at in list(self.where.items()):
            if at == node:
                del self.where[room]
                self.rooms_lost += 1
                self.lost(room)
        for room, parts in self.remote.items():
            for pid, at in list(parts.items()):
                if at == node:
                    del parts[pid]
                    self._tasks.spawn(self._leave(room, pid))

    async def _leave(self, room: str, pid: str) -> None:
        await self.local({"op": "leave", "room": room, "participant": pid})

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "media_relayed_out",
            "counter",
            "Media requests this node sent to the node hosting their room.",
            self.requests_out,
        )
        yield Metric(
            "media_relayed_in",
            "counter",
            "Media requests of other nodes' participants served here.",
            self.requests_in,
        )
        yield Metric(
            "media_relay_timeouts",
            "counter",
            "Relayed media requests the room's node did not answer in time.",
            self.timeouts,
        )
        yield Metric(
            "media_rooms_lost",
            "counter",
            "Rooms whose media node died, as seen by this node's participants.",
            self.rooms_lost,
        )
        yield Metric(
            "media_stale_events",
            "counter",
            "Events from a node a room was placed on before (taken for dead), dropped.",
            self.stale,
        )
        yield Metric(
            "media_rooms_here",
            "gauge",
            "Rooms of the cluster whose media is placed on this node.",
            len(self.here),
        )
