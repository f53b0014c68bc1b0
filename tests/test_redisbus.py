"""``RedisBus`` with a real Redis: two buses ("nodes") in one process on the shared Redis
(``RALLYPOINT_TEST_REDIS``, default 127.0.0.1:6379; ``tests/run`` starts one), each test under a
prefix of its own; and a fault drill on a private ``redis-server`` (a free port, nothing kept),
killed with SIGKILL and started again on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable

import hiredis
import pytest
import redis.asyncio as aioredis

from signaling.app import make_bus
from signaling.cluster.redisbus import RedisBus, node_id, publish_command
from signaling.config import ConfigError, load_config
from signaling.core.bus import LocalBus

REDIS_URL = os.environ.get("RALLYPOINT_TEST_REDIS", "redis://127.0.0.1:6379/0")
BOUND_S = 10.0  # longer than any reconnect may take


class Inbox:
    """A sink that keeps what it is given."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)


async def until(cond: Callable[[], bool], timeout: float = BOUND_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    prefix = "test-" + secrets.token_hex(6)
    a = RedisBus(REDIS_URL, "node-a", prefix, retry_s=0.1)
    b = RedisBus(REDIS_URL, "node-b", prefix, retry_s=0.1)
    await a.start()
    await b.start()
    try:
        await until(lambda: a.connected and b.connected)
        yield a, b
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("data", [b"", b"{}", b"\x00\r\n$3\r\n" + bytes(range(256)) * 40])
def test_publish_command_packs_as_redis_py_does(data: bytes) -> None:
    """The publisher's own packing (``publish_command``) against redis-py's."""
    conn = aioredis.Connection()
    channel = "rallypoint:room:é"
    assert publish_command(channel.encode(), data) == b"".join(
        conn.pack_command("PUBLISH", channel, data)
    )


async def test_a_frame_reaches_the_other_node_once_and_not_its_own_twice(
    two_nodes: tuple[RedisBus, RedisBus],
) -> None:
    a, b = two_nodes
    on_a, on_b1, on_b2 = Inbox(), Inbox(), Inbox()
    a.subscribe("room:x", "sa", on_a)
    b.subscribe("room:x", "sb1", on_b1)
    b.subscribe("room:x", "sb2", on_b2)
    await until(lambda: a.connected and b.connected)
    frame = b'{"type":"message"}'
    a.publish("room:x", frame)
    assert on_a.frames == [frame]  # at once, and the very same object
    assert on_a.frames[0] is frame
    await until(lambda: len(on_b1.frames) == 1 and len(on_b2.frames) == 1)
    assert on_b1.frames == [frame]
    assert on_b1.frames[0] is on_b2.frames[0]  # stripped once per node, shared by its sinks
    # A round trip the other way: by then a's echo of its own frame has come and gone.
    b.publish("room:x", b"back")
    await until(lambda: on_a.frames[-1:] == [b"back"])
    assert on_a.frames == [frame, b"back"]
    assert on_b1.frames == [frame, b"back"]
    assert (a.received, b.received, a.dropped, b.dropped) == (1, 1, 0, 0)


async def test_exclude_is_local_and_unsubscribe_stops_delivery(
    two_nodes: tuple[RedisBus, RedisBus],
) -> None:
    a, b = two_nodes
    on_a1, on_a2, on_b = Inbox(), Inbox(), Inbox()
    a.subscribe("user:u", "a1", on_a1)
    a.subscribe("user:u", "a2", on_a2)
    b.subscribe("user:u", "b", on_b)
    await until(lambda: a.connected and b.connected)
    a.publish("user:u", b"1", exclude="a1")
    assert (on_a1.frames, on_a2.frames) == ([], [b"1"])
    await until(lambda: on_b.frames == [b"1"])

    b.unsubscribe("user:u", "b")
    assert "user:u" not in b.topics
    await until(lambda: b.connected)  # Redis confirmed the unsubscription
    a.publish("user:u", b"2")
    # A frame b does hear, published after the one it must not: ordered on one connection.
    on_b_other = Inbox()
    b.subscribe("room:other", "b", on_b_other)
    await until(lambda: b.connected)
    a.publish("room:other", b"3")
    await until(lambda: on_b_other.frames == [b"3"])
    assert on_b.frames == [b"1"]
    assert on_a2.frames == [b"1", b"2"]


async def test_many_topics_in_order_per_publisher(two_nodes: tuple[RedisBus, RedisBus]) -> None:
    a, b = two_nodes
    topics = [f"room:r{i}" for i in range(200)]
    inboxes = {t: Inbox() for t in topics}
    for t in topics:
        b.subscribe(t, "s", inboxes[t])
    await until(lambda: b.connected)
    n = 50
    for i in range(n):
        for t in topics:
            a.publish(t, f"{t}:{i}".encode())
    await until(lambda: all(len(box.frames) == n for box in inboxes.values()))
    for t, box in inboxes.items():
        assert box.frames == [f"{t}:{i}".encode() for i in range(n)]
    assert a.published == n * len(topics) and a.dropped == 0
    assert b.received == n * len(topics)
    # Topics nobody on this node listens to any more are unsubscribed in Redis.
    for t in topics:
        b.unsubscribe(t, "s")
    await until(lambda: b.connected)
    probe = aioredis.Redis.from_url(REDIS_URL)
    try:
        counts = await probe.pubsub_numsub(*(f"{b.prefix}:{t}" for t in topics))
    finally:
        await probe.aclose()
    assert all(c == 0 for _, c in counts)


async def test_subscriptions_follow_quick_changes(two_nodes: tuple[RedisBus, RedisBus]) -> None:
    a, b = two_nodes
    topics = [f"room:q{i}" for i in range(20)]
    for i, t in enumerate(topics):
        b.subscribe(t, "s", Inbox())
        if i % 3 == 0:
            await asyncio.sleep(0)  # let a subscription go out before it is taken back
        b.unsubscribe(t, "s")
    keep = Inbox()
    b.subscribe(topics[0], "k", keep)
    await until(lambda: b.connected)
    probe = aioredis.Redis.from_url(REDIS_URL)
    try:
        counts = dict(await probe.pubsub_numsub(*(f"{b.prefix}:{t}" for t in topics)))
    finally:
        await probe.aclose()
    assert counts == {f"{b.prefix}:{t}".encode(): int(t == topics[0]) for t in topics}
    a.publish(topics[0], b"k")
    await until(lambda: keep.frames == [b"k"])


class Broken:
    def deliver(self, frame: bytes) -> None:
        raise RuntimeError("a bug in a sink")


async def test_a_failing_sink_costs_neither_the_others_nor_the_subscription(
    two_nodes: tuple[RedisBus, RedisBus],
) -> None:
    a, b = two_nodes
    ok = Inbox()
    b.subscribe("room:f", "broken", Broken())
    b.subscribe("room:f", "ok", ok)
    await until(lambda: b.connected)
    a.publish("room:f", b"1")
    a.publish("room:f", b"2")
    await until(lambda: ok.frames == [b"1", b"2"])
    assert b.connected and b.reconnects == 0


# -- the fault drill -------------------------------------------------------------------------


class PrivateRedis:
    """A redis-server of this test's own on a free port, keeping nothing on disk."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: install it (tests/apt-packages.txt)")
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [exe, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    async def answers(self) -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        w.close()
        return True


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    r = PrivateRedis()
    r.start()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + BOUND_S
        while not await r.answers():
            assert loop.time() < end, "redis-server did not start"
            await asyncio.sleep(0.02)
        yield r
    finally:
        r.kill()


@contextlib.asynccontextmanager
async def drill_pair(url: str, prefix: str = "drill") -> AsyncIterator[tuple[RedisBus, RedisBus]]:
    """Two started buses ("nodes") on ``url`` that retry fast; closed at the end."""
    a = RedisBus(url, "node-a", prefix, timeout_s=1.0, retry_s=0.1)
    b = RedisBus(url, "node-b", prefix, timeout_s=1.0, retry_s=0.1)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_restart_drops_frames_meanwhile_and_both_nodes_reconnect(
    private_redis: PrivateRedis,
) -> None:
    async with drill_pair(private_redis.url) as (a, b):
        on_a, on_b = Inbox(), Inbox()
        a.subscribe("room:d", "a", on_a)
        b.subscribe("room:d", "b", on_b)
        await until(lambda: a.connected and b.connected)
        a.publish("room:d", b"before")
        await until(lambda: on_b.frames == [b"before"])

        private_redis.kill()
        await until(lambda: not a.connected and not b.connected)
        # Published while Redis is down: delivered locally, dropped for the others, counted,
        # never raised into the caller.
        for i in range(100):
            a.publish("room:d", f"down{i}".encode())
        await until(lambda: a.dropped == 100)  # at once, or when its pipeline fails
        assert len(on_a.frames) == 101  # "before" and the 100

        # A subscriber that arrives while Redis is down is subscribed once it is back.
        on_b_late = Inbox()
        b.subscribe("room:late", "b", on_b_late)

        private_redis.start()
        await until(lambda: a.connected and b.connected)
        assert a.reconnects >= 1 and b.reconnects >= 1
        a.publish("room:d", b"after")
        a.publish("room:late", b"late")
        await until(lambda: on_b.frames[-1:] == [b"after"] and on_b_late.frames == [b"late"])
        assert on_b.frames == [b"before", b"after"]  # nothing of the outage arrives later
        metrics = {m.name: m.value for m in a.metrics()}
        assert metrics["bus_dropped"] == 100 and metrics["bus_unavailable"] == 0


async def test_a_frame_after_a_quiet_restart_reaches_the_other_node(
    private_redis: PrivateRedis,
) -> None:
    """Redis restarts while a node publishes nothing: its publishing connection (which gets
    no replies) is found closed at the next frame, made again, and the frame goes out."""
    async with drill_pair(private_redis.url) as (a, b):
        on_b = Inbox()
        b.subscribe("room:q", "b", on_b)
        await until(lambda: a.connected and b.connected)
        a.publish("room:q", b"before")
        await until(lambda: on_b.frames == [b"before"])
        private_redis.kill()
        await until(lambda: not a.connected and not b.connected)
        private_redis.start()
        await until(lambda: a.connected and b.connected)  # the subscriptions are back
        a.publish("room:q", b"after")
        await until(lambda: on_b.frames == [b"before", b"after"])
        assert a.dropped == 0
        assert a.reconnects == 2  # its subscription, then its publishing connection


async def acl_user(r: PrivateRedis, rules: str) -> str:
    """A user of the private Redis with ``rules`` (on top of everything); its URL."""
    admin = aioredis.Redis.from_url(r.url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "bus", "on", "nopass", "~*", "&*", "+@all", *rules.split()
        )
    finally:
        await admin.aclose()
    return f"redis://bus@127.0.0.1:{r.port}/0"


async def test_without_client_reply_the_publisher_reads_replies(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis user that may not turn replies off (an ACL without ``client|reply``): the
    publisher says so once and reads every reply; frames still go from node to node."""
    url = await acl_user(private_redis, "-client|reply")
    async with drill_pair(url, "acl") as (a, b):
        on_b = Inbox()
        b.subscribe("room:r", "b", on_b)
        await until(lambda: a.connected and b.connected)
        for i in range(600):  # more than one write's worth (512)
            a.publish("room:r", f"m{i}".encode())
        await until(lambda: len(on_b.frames) == 600)
        assert on_b.frames == [f"m{i}".encode() for i in range(600)]
        assert a.published == 600 and a.dropped == 0
        said = [r.getMessage() for r in caplog.records if "CLIENT REPLY OFF" in r.getMessage()]
        assert len(said) == 2  # once per bus (a node has one)
        assert all("no permissions" in m for m in said)


async def test_a_user_who_may_not_publish_is_told_and_nothing_is_sent(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL without ``publish``: the bus does not count itself connected, says why, and
    drops (counts) what is published, delivering it on its own node as always."""
    url = await acl_user(private_redis, "-publish")
    a = RedisBus(url, "node-a", "acl", timeout_s=1.0, retry_s=0.1)
    inbox = Inbox()
    a.subscribe("room:p", "a", inbox)
    await a.start()
    try:
        await until(lambda: any("refuses PUBLISH" in r.getMessage() for r in caplog.records))
        assert not a.connected
        a.publish("room:p", b"x")
        assert inbox.frames == [b"x"] and a.dropped == 1
    finally:
        await a.close()


async def test_a_bus_started_without_redis_connects_when_it_comes() -> None:
    r = PrivateRedis()
    bus = RedisBus(r.url, "node-a", "drill", timeout_s=1.0, retry_s=0.1)
    inbox = Inbox()
    bus.subscribe("room:s", "a", inbox)
    await bus.start()
    try:
        await asyncio.sleep(0.3)  # several failed attempts, none of them raised
        assert not bus.connected
        bus.publish("room:s", b"x")
        assert inbox.frames == [b"x"] and bus.dropped == 1
        r.start()
        await until(lambda: bus.connected)
        assert bus.reconnects == 0  # the first connection is not a reconnect
    finally:
        await bus.close()
        r.kill()


async def test_a_subscription_redis_does_not_confirm_is_not_up_and_is_made_again() -> None:
    """A subscription connection on which Redis confirms no SUBSCRIBE (a server that answers
    every other command, faked at the socket) does not count as up: ``bus_unavailable`` stays
    1 and the bus connects again after its timeout. Once subscriptions are confirmed it is
    up. (Before, it was up as soon as SUBSCRIBE was written: a frame published before Redis
    took it never arrived, as in a cluster test's ring after a restart.)"""
    confirm = False
    subscribing = 0  # connections that sent SUBSCRIBE
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal subscribing
        writers.append(writer)
        parse = hiredis.Reader()
        counted = False
        while data := await reader.read(65536):
            parse.feed(data)
            while (cmd := parse.gets()) is not False:
                name = cmd[0].upper()
                if name == b"SUBSCRIBE":
                    subscribing += not counted
                    counted = True
                    if confirm:
                        for ch in cmd[1:]:
                            writer.write(
                                b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%b\r\n:1\r\n" % (len(ch), ch)
                            )
                elif name == b"PUBLISH":
                    writer.write(b":0\r\n")
                elif name == b"PING":
                    writer.write(b"+PONG\r\n")
                elif name == b"HELLO":  # redis-py then speaks RESP2
                    writer.write(b"-ERR unknown command 'HELLO'\r\n")
                else:
                    writer.write(b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = RedisBus(f"redis://127.0.0.1:{port}/0", "node-a", "fake", timeout_s=0.3, retry_s=0.05)
    bus.subscribe("room:s", "a", Inbox())
    await bus.start()
    try:
        await until(lambda: subscribing >= 2)  # the first was given up on, and made again
        metrics = {m.name: m.value for m in bus.metrics()}
        assert metrics["bus_unavailable"] == 1 and not bus.connected
        confirm = True
        await until(lambda: bus.connected)
        metrics = {m.name: m.value for m in bus.metrics()}
        assert metrics["bus_unavailable"] == 0
    finally:
        await bus.close()
        server.close()
        for w in writers:  # the server's ends of the connections
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        await server.wait_closed()


# -- configuration ---------------------------------------------------------------------------


def test_cluster_mode_needs_both_redis_and_postgresql() -> None:
    """A Redis without a shared store would split chat between nodes: refused, naming the
    key; with both, the app takes the Redis bus, and without Redis the local one."""
    with pytest.raises(ConfigError, match=r"cluster.redis_url needs store.url = postgresql"):
        load_config(env={"RALLYPOINT_CLUSTER_REDIS_URL": REDIS_URL})
    with pytest.raises(ConfigError, match=r"cluster.heartbeat_s"):
        load_config(env={"RALLYPOINT_CLUSTER_HEARTBEAT_S": "0"})
    cfg = load_config(
        env={
            "RALLYPOINT_CLUSTER_REDIS_URL": REDIS_URL,
            "RALLYPOINT_STORE_URL": "postgresql://postgres@127.0.0.1:5432/test",
        }
    )
    assert isinstance(make_bus(cfg), RedisBus)
    assert isinstance(make_bus(load_config(env={})), LocalBus)


def test_node_ids_are_new_on_each_start_unless_configured() -> None:
    a, b = node_id(), node_id()
    assert a != b
    cfg = load_config(env={})
    assert (cfg.cluster.node_id, cfg.cluster.key_prefix) == ("", "rallypoint")
    assert node_id("n1") == "n1"
    # A generated id is one the configuration would take.
    assert load_config(env={"RALLYPOINT_CLUSTER_NODE_ID": a}).cluster.node_id == a


async def test_a_bus_closes_promptly_while_redis_is_down() -> None:
    bus = RedisBus(PrivateRedis().url, "node-a", "drill", timeout_s=1.0, retry_s=0.1)
    bus.subscribe("room:c", "a", Inbox())
    await bus.start()
    await asyncio.sleep(0.2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await bus.close()
    assert loop.time() - t0 < 1.0
    bus.publish("room:c", b"after close")  # local only, counted, no queue left growing
    assert bus.dropped == 1 and not bus._queue
