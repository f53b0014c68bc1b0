"""``MessageBus`` between nodes on Redis pub/sub (issue 14, the first piece of the cluster).

A ``RedisBus`` keeps a ``LocalBus`` for this node's sinks (so ``topics`` still answers for local
introspection) and carries every topic over Redis on the channel ``<prefix>:<topic>``:

- ``publish`` delivers to this node's sinks at once (the same bytes object to each, as
  ``LocalBus`` does) and queues the frame for Redis behind a small header, the origin's node id,
  so the origin skips its own echo. The queue is bounded and sent by one task, many ``PUBLISH``
  per write, on a connection of its own that takes no replies (``CLIENT REPLY OFF``);
  ``publish`` never awaits and never raises for Redis. Each ``PUBLISH`` is packed by
  ``publish_command`` as it is queued (redis-py's packing took ~8 times as long).
- A node subscribes to a topic's channel when the topic gets its first local subscriber and
  unsubscribes when the last one leaves; a frame from another node is stripped of its header
  once and handed, as one bytes object, to every local sink of its topic. The subscription
  connection is read with a ``hiredis.Reader`` of the bus's own (redis-py makes the
  connection: address, TLS, authentication).
- **At most once between nodes.** While Redis cannot be reached (or the queue is full), frames
  are still delivered on their own node but dropped for the others and counted
  (``bus_dropped``); frames other nodes published while this node's subscription was down are
  lost uncounted (pub/sub keeps nothing). Clients recover what they missed through ``seq``
  gaps and ``sync`` (``docs/CLUSTER.md``). Both connections reconnect by themselves every
  ``retry_s``; the subscription is re-made for every topic with local subscribers.
- ``exclude`` names a session of this node (the sender's); other nodes do not see it.

Nothing is logged per frame: a lost connection once, each failed attempt at debug level, the
return once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..core.bus import NOBODY, LocalBus, MessageBus, Sink
from ..core.metrics import Metric
from ..core.order import Sequencer, decode_order, encode_order
from ..core.writes import WriteBatch

log = logging.getLogger(__name__)

TIMEOUT_S: Final = 2.0  # a connection attempt or a pipeline that takes longer has failed
RETRY_S: Final = 0.5  # between attempts to reconnect
MAX_QUEUED: Final = 10_000  # frames waiting for Redis; more are dropped (counted)
MAX_PIPELINE: Final = 512  # PUBLISH commands per write
REPLY_OFF: Final = ("CLIENT", "REPLY", "OFF")
REPLY_ON: Final = ("CLIENT", "REPLY", "ON")
READ_SIZE: Final = 65536  # bytes per read of the subscription connection

#: What a dead or unreachable Redis looks like.
UNAVAILABLE: Final = (OSError, TimeoutError, RedisConnectionError, RedisTimeoutError)


def raise_if_cancelled() -> None:
    """redis-py's own timeouts can turn a cancellation that meets them into a
    ``TimeoutError`` (which is also what an outage raises): a task being cancelled stops."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def connect(url: str, timeout_s: float = TIMEOUT_S) -> aioredis.Redis:
    """A Redis client as the cluster's parts use it: bounded connects and commands, and no
    retries of redis-py's own (the callers' retries are counted; redis-py's would hide an
    outage for seconds)."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_keepalive=True,
        retry=Retry(NoBackoff(), 0),
    )


def publish_command(channel: bytes, data: bytes) -> bytes:
    """``PUBLISH channel data`` in RESP: an array of three bulk strings."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        len(channel),
        channel,
        len(data),
        data,
    )


class PublishRefused(RedisError):
    """Redis answers but will not take this client's ``PUBLISH`` (its ACL)."""


async def _reply(conn: Connection) -> ResponseError | None:
    """Read one reply: the refusal it is, or None."""
    try:
        await conn.read_response()
    except ResponseError as e:
        return e
    return None


def check_redis_internals(conn: Connection) -> None:
    """The one internal of redis-py this module uses: a connection's ``_reader``, the
    ``asyncio.StreamReader`` the subscriber reads with its own ``hiredis.Reader``. Checked at
    start, on a connection not yet made (redis-py sets it to None until it connects)."""
    if not hasattr(conn, "_reader"):
        raise RuntimeError(
            f"redis-py {getattr(aioredis, '__version__', '?')} has no Connection._reader: "
            "signaling/cluster/redisbus.py does not support this version"
        )


def node_id(configured: str = "") -> str:
    """``cluster.node_id``, or when empty the host name and a random suffix: new on each
    start (a restarted node must not take frames meant for the one it replaced as its own
    echo), and still telling an operator which machine it is."""
    if configured:
        return configured
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return f"{host[:48] or 'node'}-{secrets.token_hex(4)}"


class RedisBus:
    """A ``MessageBus`` over Redis pub/sub (see the module docstring). ``start`` and ``close``
    own its two tasks: the publisher and the subscriber."""

    def __init__(
        self,
        url: str,
        node_id: str,
        prefix: str = "rallypoint",
        *,
        timeout_s: float = TIMEOUT_S,
        retry_s: float = RETRY_S,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        nid = node_id.encode()
        if not 0 < len(nid) < 256:
            raise ValueError("node_id must be 1-255 bytes")
        self.node_id = node_id
        self.prefix = prefix
        self.local = LocalBus()
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_queued = max_queued
        # A length-prefixed id: no node's header is a prefix of another's.
        self._header = bytes((len(nid),)) + nid
        self._channel_of = prefix + ":"
        self._skip = len(prefix) + 1  # a channel's length before its topic
        self._redis = connect(url, timeout_s)
        # Publishing.
        self._queue: deque[bytes] = deque()  # packed PUBLISH commands
        self._wake = asyncio.Event()
        self._publishing = False  # the publish connection is up
        self._pub: Connection | None = None  # the publisher's own connection
        self._replies = False  # it reads replies (Redis refused CLIENT REPLY OFF)
        self._said_replies = False
        # Subscribing: what Redis has on the current connection, against ``local.topics``.
        self._subscribed: set[str] = set()
        self._confirmed: set[str] = set()  # what Redis said it has subscribed
        self._confirming = asyncio.Event()  # set at each confirmation
        self._changed = asyncio.Event()
        self._listening = False  # the subscription connection is up and current
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        # Counters.
        self.dropped = 0  # frames not sent to other nodes
        self.published = 0  # frames sent to Redis
        self.received = 0  # frames from other nodes delivered here
        self.reconnects = 0  # connections made again after losing one (both kinds)
        #: A conversation's events in seq order, whichever nodes published them.
        self.order = Sequencer(self._deliver, self._call_later)
        self._order_of: tuple[str, int] | None = None  # the last ``order`` published
        self._order_prefix = b""  # and its header + prefix
        # Held while a read's frames are handed on (``signaling.app``: the hub's, so that
        # each connection gets one write for all of them).
        self.writes = WriteBatch()

    @property
    def topics(self) -> dict[str, dict[str, Sink]]:
        """This node's topics and their local sinks."""
        return self.local.topics

    @property
    def connected(self) -> bool:
        """Both connections are up and Redis has confirmed a subscription to every local
        topic (and no other)."""
        own = f"node:{self.node_id}"  # subscribed always, with or without a local sink
        return (
            self._publishing
            and self._listening
            and self._confirmed | {own} == self.local.topics.keys() | {own}
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the publisher and the subscriber. Redis need not be up: they keep trying."""
        check_redis_internals(self._redis.connection_pool.make_connection())
        self._closing = False
        self._tasks = [
            asyncio.create_task(self._publish_forever(), name="redisbus-publish"),
            asyncio.create_task(self._subscribe_forever(), name="redisbus-subscribe"),
        ]

    async def close(self) -> None:
        """Stop both tasks and close the connections; frames still queued are dropped."""
        self._closing = True
        self._publishing = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.dropped += len(self._queue)
        self._queue.clear()
        if self._pub is not None:
            await self._pub.disconnect(nowait=True)
            self._pub = None
        await self._redis.aclose()

    # -- the MessageBus --------------------------------------------------------------------------

    def subscribe(self, topic: str, key: str, sink: Sink) -> None:
        first = topic not in self.local.topics
        self.local.subscribe(topic, key, sink)
        if first:
            self._changed.set()

    def unsubscribe(self, topic: str, key: str) -> None:
        self.local.unsubscribe(topic, key)
        if topic not in self.local.topics:
            self.order.drop(topic)
            self._changed.set()

    def local_subscribers(self, topic: str) -> Mapping[str, Sink]:
        return self.local.topics.get(topic, NOBODY)

    def publish(
        self,
        topic: str,
        frame: bytes,
        exclude: str | None = None,
        order: tuple[str, int] | None = None,
    ) -> None:
        subs = self.local.topics.get(topic)
        if order is None:
            if subs is not None:
                for key, sink in subs.items():
                    if key != exclude:
                        sink.deliver(frame)
            data = self._header + frame
        else:
            if subs is not None:
                self.order.offer(topic, order[0], order[1], frame, exclude)
            if order is not self._order_of:  # one message goes to many topics: encoded once
                self._order_of, self._order_prefix = order, self._header + encode_order(*order)
            data = self._order_prefix + frame
        if not self._publishing or len(self._queue) >= self.max_queued:
            self.dropped += 1
            return
        self._queue.append(publish_command((self._channel_of + topic).encode(), data))
        self._wake.set()

    def _deliver(self, topic: str, frame: bytes, exclude: str | None) -> None:
        """The ``Sequencer``'s way to this node's sinks of ``topic``."""
        subs = self.local.topics.get(topic)
        if subs is None:
            return
        for key, sink in subs.items():
            if key != exclude:
                try:
                    sink.deliver(frame)
                except Exception:  # a sink's bug must cost neither the others nor the node
                    log.exception("a sink of %s failed", topic)

    @staticmethod
    def _call_later(delay: float, cb: Callable[..., None], *args: Any) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, cb, *args)

    # -- publishing ------------------------------------------------------------------------------

    async def _publish_forever(self) -> None:
        conn = await self._connect_publisher(lost=False)
        while True:
            await self._wake.wait()
            self._wake.clear()
            queue = self._queue
            while queue:
                n = min(len(queue), MAX_PIPELINE)
                popleft = queue.popleft
                packed = b"".join([popleft() for _ in range(n)])
                try:
                    conn = await self._current(conn)
                    await conn.send_packed_command(packed, False)
                    if self._replies:  # Redis would not turn them off: read them
                        refused = 0
                        for _ in range(n):
                            refused += await _reply(conn) is not None
                        self.dropped += refused
                        n -= refused
                except Exception as e:  # an outage, or anything else: never end the task
                    raise_if_cancelled()
                    self._publishing = False
                    self.dropped += n + len(queue)
                    queue.clear()
                    if isinstance(e, UNAVAILABLE):
                        log.error("the bus's Redis connection failed (%s); reconnecting", e)
                    else:
                        log.exception("the bus's publisher failed; reconnecting")
                    await conn.disconnect(nowait=True)
                    conn = await self._connect_publisher(lost=True)
                    break
                self.published += n

    async def _current(self, conn: Connection) -> Connection:
        """``conn``, or a new connection if Redis has closed it (it sends nothing on this
        connection, so anything to read is its end): frames are not written into a
        connection that has gone, e.g. after Redis restarted while no frame was sent."""
        try:
            if await conn.can_read():
                await conn.read_response()  # not expected; raises if a refusal
            return conn
        except UNAVAILABLE:
            raise_if_cancelled()
        await conn.disconnect(nowait=True)
        conn = await self._open_publisher()  # one attempt: raises if Redis is still away
        self.reconnects += 1
        log.warning("the bus's Redis had closed the publishing connection; connected again")
        return conn

    async def _open_publisher(self) -> Connection:
        """A connection of the publisher's own that gets no replies (``CLIENT REPLY OFF``:
        ``PUBLISH`` fails only with the connection, which a write or ``_current`` then finds,
        so reading 512 replies per write would buy nothing). A probe first: whether this
        client may publish (``PublishRefused`` if not) and turn replies off (if not, say an
        ACL without ``client|reply``, the publisher reads every reply instead)."""
        conn: Connection = self._redis.connection_pool.make_connection()
        self._pub = conn
        try:
            await conn.connect()
            probe: list[tuple[str, ...]] = [
                ("PUBLISH", self._channel_of + "probe", ""),
                REPLY_OFF,
                REPLY_ON,
            ]
            await conn.send_packed_command(conn.pack_commands(probe), False)
            refused = await _reply(conn)  # PUBLISH's
            off = await _reply(conn)  # OFF's refusal, or (OFF said nothing) ON's OK
            if off is not None:
                await _reply(conn)  # ON's OK
            if refused is not None:
                raise PublishRefused(f"Redis refuses PUBLISH: {refused}")
            self._replies = off is not None
            if off is None:
                await conn.send_packed_command(conn.pack_command(*REPLY_OFF), False)
            elif not self._said_replies:
                self._said_replies = True
                log.warning("Redis refuses CLIENT REPLY OFF (%s): the bus reads its replies", off)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn

    async def _connect_publisher(self, *, lost: bool) -> Connection:
        """Connect until Redis answers (and lets this client publish); then take frames
        again."""
        said = lost  # the loss was logged
        while True:
            try:
                conn = await self._open_publisher()
            except (*UNAVAILABLE, PublishRefused) as e:
                raise_if_cancelled()
                if not said:
                    log.error("the bus cannot publish on Redis (%s); retrying", e)
                    said = True
                else:
                    log.debug("the bus still cannot publish on Redis: %s", e)
                await asyncio.sleep(self.retry_s)
                continue
            if lost:
                self.reconnects += 1
                log.warning("the bus's Redis connection is back: frames go to other nodes again")
            self._publishing = True
            return conn

    # -- subscribing -----------------------------------------------------------------------------

    async def _subscribe_forever(self) -> None:
        lost = False
        while True:
            conn: Connection = self._redis.connection_pool.make_connection()
            try:
                await self._listen(conn, lost)
            except UNAVAILABLE as e:
                raise_if_cancelled()
                if self._listening:
                    log.error("the bus's Redis subscription failed (%s); reconnecting", e)
                    lost = True
                else:
                    log.debug("the bus's Redis is still unavailable: %s", e)
            except Exception as e:  # not an outage: say what it was, and start over
                log.exception("the bus's Redis subscription failed: %r", e)
                lost = True
            finally:
                self._listening = False
                self._subscribed = set()
                self._confirmed = set()
                await conn.disconnect(nowait=True)
            await asyncio.sleep(self.retry_s)

    async def _listen(self, conn: Connection, lost: bool) -> None:
        """Subscribe on ``conn`` and read it until it fails. redis-py connects (address,
        TLS, authentication, database); the frames are then read from its stream with a
        ``hiredis.Reader`` of our own, about 1 us each instead of redis-py's pub/sub
        machinery's 10-17 (``bench/redisbus.py``)."""
        await conn.connect()
        stream: asyncio.StreamReader | None = conn._reader  # checked in ``start``
        if stream is None:
            raise RedisConnectionError("the subscription connection has no stream")
        # The node's own channel keeps the connection subscribed, so reads block (and
        # carries other nodes' requests for this node's sessions: ``Hub.share``).
        own = f"node:{self.node_id}"
        await conn.send_packed_command(
            conn.pack_command("SUBSCRIBE", self._channel_of + own), False
        )
        self._changed.set()
        await self._sync(conn)
        read = asyncio.create_task(self._read(stream))
        tasks = [read]
        try:
            # Up once Redis has confirmed what was asked now: a frame published before Redis
            # took a SUBSCRIBE would not reach this node, and a connection on which nothing
            # is confirmed in time is not one (``bus_unavailable`` stays 1 meanwhile).
            await self._confirmed_all(self._subscribed | {own}, read)
            self._listening = True
            if lost:
                self.reconnects += 1
                log.warning("the bus's Redis subscription is back")
            # Subscription changes are sent while the reader waits: whichever of the two
            # meets the failed connection first ends both.
            tasks.append(asyncio.create_task(self._sync_forever(conn)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()  # raises what ended it

    async def _confirmed_all(self, topics: set[str], read: asyncio.Task[None]) -> None:
        """Return once Redis has confirmed a subscription to each of ``topics`` (read by
        ``read``); raise if the connection fails first or ``timeout_s`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while not topics <= self._confirmed:
            self._confirming.clear()
            waiter = asyncio.ensure_future(self._confirming.wait())
            try:
                done, _ = await asyncio.wait(
                    (read, waiter),
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                waiter.cancel()
            if read in done:
                read.result()  # raises what ended it
                raise RedisConnectionError("the subscription connection ended")
            if not done:
                raise RedisTimeoutError("Redis did not confirm the bus's subscriptions in time")

    async def _sync_forever(self, conn: Connection) -> None:
        while True:
            await self._changed.wait()
            await self._sync(conn)

    async def _sync(self, conn: Connection) -> None:
        """Subscribe and unsubscribe until Redis has exactly the local topics (Redis
        confirms each, on the stream ``_read`` reads)."""
        while self._changed.is_set():
            self._changed.clear()
            wanted = self.local.topics.keys()
            add = [t for t in wanted if t not in self._subscribed]
            drop = [t for t in self._subscribed if t not in wanted]
            # Recorded before the await: a change meanwhile is measured against it.
            if add:
                self._subscribed.update(add)
                channels = [self._channel_of + t for t in add]
                await conn.send_packed_command(conn.pack_command("SUBSCRIBE", *channels), False)
            if drop:
                self._subscribed.difference_update(drop)
                channels = [self._channel_of + t for t in drop]
                await conn.send_packed_command(conn.pack_command("UNSUBSCRIBE", *channels), False)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        reader = hiredis.Reader()
        feed, gets, read = reader.feed, reader.gets, stream.read
        header = self._header
        skip = self._skip
        topics = self.local.topics
        offer = self.order.offer
        while True:
            chunk = await read(READ_SIZE)
            if not chunk:
                raise RedisConnectionError("Redis closed the subscription connection")
            feed(chunk)
            with self.writes:  # every frame of this read: one write per connection
                self._hand_on(gets, header, skip, topics, offer)

    def _hand_on(
        self,
        gets: Callable[[], Any],
        header: bytes,
        skip: int,
        topics: dict[str, dict[str, Sink]],
        offer: Callable[[str, str, int, bytes, str | None], None],
    ) -> None:
        """Hand every complete message the reader has to this node's sinks."""
        while (msg := gets()) is not False:
            if not isinstance(msg, list) or len(msg) != 3:  # an error, or not pub/sub
                raise RedisConnectionError(f"unexpected on the subscription: {msg!r}")
            kind, channel, data = msg
            if kind != b"message":
                if kind == b"subscribe":
                    self._confirmed.add(channel.decode()[skip:])
                    self._confirming.set()
                elif kind == b"unsubscribe":
                    self._confirmed.discard(channel.decode()[skip:])
                continue
            if data.startswith(header):
                continue  # our own, delivered when it was published
            topic = channel.decode()[skip:]
            subs = topics.get(topic)
            if not subs:
                continue  # unsubscribed meanwhile
            frame = data[data[0] + 1 :]
            self.received += 1
            if frame[0] == 0:  # a conversation's event: in seq order
                ordered = decode_order(frame)
                assert ordered is not None
                offer(topic, ordered[0], ordered[1], ordered[2], None)
                continue
            for sink in subs.values():
                try:
                    sink.deliver(frame)
                except Exception:  # a sink's bug must cost neither the others nor the node
                    log.exception("a sink of %s failed", topic)

    # -- metrics ---------------------------------------------------------------------------------

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "bus_published", "counter", "Frames this node sent to other nodes.", self.published
        )
        yield Metric(
            "bus_received", "counter", "Frames from other nodes delivered here.", self.received
        )
        yield Metric(
            "bus_dropped",
            "counter",
            "Frames not sent to other nodes: Redis unavailable or the queue full.",
            self.dropped,
        )
        yield Metric(
            "bus_unavailable",
            "gauge",
            "1 while either bus connection to Redis is down (the subscription's is up once "
            "Redis has confirmed its subscriptions).",
            float(not (self._publishing and self._listening)),
        )
        yield Metric(
            "bus_reconnects",
            "counter",
            "Times a bus connection to Redis was made again after it was lost.",
            self.reconnects,
        )
        yield Metric(
            "bus_held",
            "counter",
            "Conversation events that arrived before an earlier one and waited for it.",
            self.order.held,
        )
        yield Metric(
            "bus_gaps",
            "counter",
            "Held conversation events delivered after waiting in vain for an earlier one.",
            self.order.flushed,
        )


if TYPE_CHECKING:

    def _is_a_message_bus(bus: RedisBus) -> MessageBus:
        return bus  # mypy checks that RedisBus has the protocol's methods
