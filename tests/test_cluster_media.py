"""Group-call media across the nodes of a cluster (issue 14) with real processes: the
fixtures of ``test_cluster`` (nodes on one PostgreSQL schema and one Redis key prefix of the
test's own), SFU workers on every node, aiortc clients whose signaling is on different nodes.

Each node's media sockets are in a port range of its own, so a client's ICE candidates show
which node's media it connects to."""

from __future__ import annotations

import asyncio
import secrets
import signal
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from nethelpers import machine_ip
from processes import Server
from test_cluster import REDIS_URL, Cluster, cluster, metric, no_event, until, until_async

from media.clip import ClipSpec, load_clip
from media.session import SfuSession
from media.tracks import EncodedAudioTrack, EncodedVideoTrack, attach_keyframe_requests
from signaling.cluster.mediamap import MediaMap
from signaling.cluster.placement import choose
from signaling.sdk import RallypointClient
from signaling.sdk.wsclient import ClientError

#: Each node's media ports (node i: PORTS[i]), announced with the machine's address.
PORTS = ((43210, 43259), (43260, 43309))
MEDIA_TIMEOUT_S = 1.0  # cluster.media_timeout_s of the nodes here


def node_env(ip: str) -> list[dict[str, str]]:
    return [
        {
            "RALLYPOINT_SFU_PUBLIC_ADDRESS": ip,
            "RALLYPOINT_SFU_PORT_MIN": str(lo),
            "RALLYPOINT_SFU_PORT_MAX": str(hi),
            "RALLYPOINT_CLUSTER_MEDIA_TIMEOUT_S": str(MEDIA_TIMEOUT_S),
        }
        for lo, hi in PORTS
    ]


SFU = 'enabled = true\nworkers = 1\nbind_address = "0.0.0.0"'


def media_cluster(
    tmp_path: Path, servers: list[Server], n: int = 2
) -> AbstractAsyncContextManager[Cluster]:
    """``n`` nodes with SFU workers, each with its own media ports (``PORTS``)."""
    return cluster(tmp_path, servers, n, sfu=SFU, node_env=node_env(machine_ip()))


async def in_call(
    cl: Cluster, first: tuple[int, str], second: tuple[int, str], frames: int = 10, **kw: Any
) -> tuple[RallypointClient, SfuSession, RallypointClient, SfuSession]:
    """Two clients (node, identity) in room "r", joined and publishing in that order (the
    first one's node hosts the room's media), once each decodes ``frames`` of the other."""
    c1 = await cl.client(first[0], first[1], **kw)
    await c1.join("r")
    m1 = await publishing(c1, "r", 1)
    c2 = await cl.client(second[0], second[1])
    await c2.join("r")
    m2 = await publishing(c2, "r", 2)
    await until(lambda: decodes(m1, c2.session, frames) and decodes(m2, c1.session, frames), 60)
    return c1, m1, c2, m2


async def publishing(c: RallypointClient, room: str, n: int) -> SfuSession:
    """``c``'s media in ``room``: publishing clip ``n`` (camera and microphone)."""
    media = SfuSession(c, room)
    clip = await asyncio.to_thread(load_clip, ClipSpec(publisher_id=n, seconds=3.0))
    video = EncodedVideoTrack(clip)
    sent = await media.publish([(video, "camera"), (EncodedAudioTrack(clip), "microphone")])
    attach_keyframe_requests(sent[0].sender, video)
    return media


def decodes(viewer: SfuSession, publisher: str, frames: int) -> bool:
    v = viewer.counter_for(publisher, "video")
    a = viewer.counter_for(publisher, "audio")
    return v is not None and a is not None and v.frames >= frames and a.frames >= frames


def candidate_ports(media: SfuSession, *, subscriber: bool = True) -> set[int]:
    """The ports of the server's ICE candidates on ``media``'s publisher connection (and
    its subscriber connection)."""
    out = set()
    for pc in (media.pub, media.sub) if subscriber else (media.pub,):
        assert pc is not None and pc.remoteDescription is not None
        for line in pc.remoteDescription.sdp.splitlines():
            if line.startswith("a=candidate:"):
                out.add(int(line.split()[5]))
    return out


async def test_a_rooms_media_is_on_one_node_and_moves_when_that_node_dies(
    tmp_path: Path, servers: list[Server]
) -> None:
    """alice (node 0) and bob (node 1) in one room: the room's media is placed on node 0
    (alice needed it first), bob's media requests are relayed there and his connections go
    to node 0's media ports; each decodes the other. Node 0 SIGKILLed: bob gets
    `media_failed` (all) on node 1, publishes again, and alice, resuming on node 1, gets
    media again: the room is placed on node 1 now (bob never sees her leave: her session
    waited for its resume)."""
    async with media_cluster(tmp_path, servers) as cl, asyncio.timeout(150):
        alice, a, bob, b = await in_call(cl, (0, "alice"), (1, "bob"), 20, reconnect=False)

        # Both clients' media is on node 0: its ports, its worker, its relay counters.
        node_a, node_b = cl.nodes
        for media in (a, b):
            ports = candidate_ports(media)
            assert ports and all(PORTS[0][0] <= p <= PORTS[0][1] for p in ports), ports
        assert await metric(node_a, "sfu_rooms") == 1
        assert await metric(node_b, "sfu_rooms") == 0
        assert await metric(node_a, "media_rooms_here") == 1
        assert await metric(node_b, "media_relayed_out_total") >= 3  # join, publish, subscribe...
        assert await metric(node_a, "media_relayed_in_total") == await metric(
            node_b, "media_relayed_out_total"
        )
        assert await metric(node_b, "media_relay_timeouts_total") == 0

        # Node 0 dies with the room's media.
        token, sid = alice.welcome["resume"], alice.session
        await a.close()
        assert node_a.proc is not None
        node_a.stop(signal.SIGKILL)
        killed = time.monotonic()
        failed = await bob.next_event("media_failed", timeout=10)
        told_s = time.monotonic() - killed
        assert (failed["room"], failed["which"]) == ("r", "all")
        await b.close()
        b = await publishing(bob, "r", 2)

        # alice resumes on node 1: told to publish again there.
        await alice.close(bye=False)
        again = await cl.client(1, "alice", resume=token)
        assert (again.welcome["resumed"], again.session) == (True, sid)
        failed = await again.next_event("media_failed", timeout=10)
        assert (failed["room"], failed["which"]) == ("r", "all")
        a = await publishing(again, "r", 1)
        await until(lambda: decodes(a, bob.session, 20) and decodes(b, sid, 20), 60)
        # alice waited for her resume in the room (the resume grace): bob never saw her go.
        assert no_event(bob, "participant_left") and no_event(bob, "participant_joined")
        for media in (a, b):
            ports = candidate_ports(media)
            assert ports and all(PORTS[1][0] <= p <= PORTS[1][1] for p in ports), ports
        assert await metric(node_b, "sfu_rooms") == 1
        assert await metric(node_b, "media_rooms_lost_total") == 1
        print(f"media_failed on the surviving node {told_s:.2f} s after the SIGKILL")
        await a.close()
        await b.close()


async def test_a_relayed_request_to_a_silent_node_fails_in_time(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A room placed on a node that is alive in Redis but answers nothing: a media request
    relayed there gets `media_unavailable` after `cluster.media_timeout_s`, never a hang.
    Once that node's heartbeat is gone, the room's participants get `media_failed` and their
    media works on a node that answers."""
    async with media_cluster(tmp_path, servers, 1) as cl, asyncio.timeout(90):
        r = aioredis.Redis.from_url(REDIS_URL)
        try:
            p = cl.prefix
            # A node that says it is alive and hosts room "g", but has no process.
            await r.set(f"{p}:alive:ghost", b"1", px=60_000)
            await r.sadd(f"{p}:medianodes", "ghost")
            await r.set(f"{p}:media:g", "ghost")
            await r.sadd(f"{p}:mediarooms:ghost", "g")

            alice = await cl.client(0, "alice")
            await alice.join("g")
            started = time.monotonic()
            try:
                await alice.request({"type": "subscribe", "room": "g"}, timeout=MEDIA_TIMEOUT_S + 5)
            except ClientError as e:
                assert e.code == "media_unavailable", e
            else:
                raise AssertionError("a request to a silent node succeeded")
            assert time.monotonic() - started >= MEDIA_TIMEOUT_S * 0.9
            assert await metric(cl.nodes[0], "media_relay_timeouts_total") >= 1

            # The ghost's heartbeat ends: the room is placed again, here.
            await r.delete(f"{p}:alive:ghost")
            failed = await alice.next_event("media_failed", timeout=10)
            assert (failed["room"], failed["which"]) == ("g", "all")
            media = await publishing(alice, "g", 1)
            assert await r.get(f"{p}:media:g") not in (None, b"ghost")
            bob = await cl.client(0, "bob")
            await bob.join("g")
            viewer = SfuSession(bob, "g")
            await until(lambda: decodes(viewer, alice.session, 10), 40)
            assert await r.sismember(f"{p}:medianodes", "ghost") == 0
            await media.close()
            await viewer.close()
        finally:
            await r.aclose()


def test_the_least_loaded_node_wins_and_a_tie_stays_with_the_asker() -> None:
    assert choose("a", {}) is None
    assert choose("a", {"a": 3, "b": 1, "c": 2}) == "b"
    assert choose("a", {"a": 1, "b": 1, "c": 0, "d": 0}) == "c"  # no asker among the least
    assert choose("b", {"a": 0, "b": 0}) == "b"
    assert choose("z", {"a": 0, "b": 0}) == "a"  # the asker runs no SFU: the smallest name


@pytest.fixture
def redis_prefix() -> str:
    return "test" + secrets.token_hex(5)


async def test_nodes_placing_one_room_at_once_agree(redis_prefix: str) -> None:
    """Three nodes place the same rooms at the same moment on the real Redis: one
    placement per room, which every node reads; the rooms spread by load; a dead node's
    rooms are placed again."""
    r = aioredis.Redis.from_url(REDIS_URL)
    maps = [MediaMap(REDIS_URL, n, redis_prefix) for n in ("n1", "n2", "n3")]
    try:
        for m in maps:
            await r.set(f"{redis_prefix}:alive:{m.node_id}", b"1", px=60_000)
        for m in maps:
            assert await m.beat(True, ["n1", "n2", "n3", "gone"]) == ({"gone"}, True)
        assert await maps[0].beat(True, []) == (set(), False)  # in the set already
        for room in ("r1", "r2", "r3", "r4", "r5", "r6"):
            placed = await asyncio.gather(*(m.place(room) for m in maps))
            assert len(set(placed)) == 1, placed
        loads = [await r.scard(f"{redis_prefix}:mediarooms:{n}") for n in ("n1", "n2", "n3")]
        assert loads == [2, 2, 2]
        # n1 dies: its rooms go to live nodes; its set and candidacy are gone.
        mine = {x.decode() for x in await r.smembers(f"{redis_prefix}:mediarooms:n1")}
        assert await maps[1].forget("n1") == -1  # alive: nothing is removed
        await r.delete(f"{redis_prefix}:alive:n1")
        assert await maps[1].forget("n1") == 2
        assert await maps[2].forget("n1") == 0  # the second finds nothing left
        for room in sorted(mine):
            assert await maps[2].owner(room) is None
            assert await maps[2].place(room) in ("n2", "n3")
        assert await r.sismember(f"{redis_prefix}:medianodes", "n1") == 0
        assert await maps[0].beat(True, []) == (set(), True)  # n1 learns it was forgotten
        # It takes back what nobody placed meanwhile, and hears what went elsewhere.
        assert await maps[0].reclaim([*mine, "quiet"]) == mine
        assert await maps[1].owner("quiet") == "n1"
        assert await r.smembers(f"{redis_prefix}:mediarooms:n1") == {b"quiet"}
        # A node releases only its own placement.
        room = sorted(mine)[0]
        owner = await maps[1].owner(room)
        other = maps[2] if owner == "n2" else maps[1]
        await other.release(room)
        assert await maps[1].owner(room) == owner
    finally:
        for m in maps:
            await m.close(False, ())
        keys = [k async for k in r.scan_iter(match=f"{redis_prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def test_a_node_taken_for_dead_ends_its_media_rooms(
    tmp_path: Path, servers: list[Server]
) -> None:
    """The room's node stalls (SIGSTOP) for longer than 3 heartbeats: the other node takes
    it for dead and places the room again for its participant. When the stalled node runs
    again it finds the cluster forgot its rooms, ends the room's media there and tells its
    own participant, who joins the room's new node: one node per room again."""
    async with media_cluster(tmp_path, servers) as cl, asyncio.timeout(150):
        alice, a, bob, b = await in_call(cl, (0, "alice"), (1, "bob"))
        node_a, node_b = cl.nodes
        assert node_a.proc is not None

        node_a.proc.send_signal(signal.SIGSTOP)
        try:
            failed = await bob.next_event("media_failed", timeout=10)
            assert (failed["room"], failed["which"]) == ("r", "all")
            await b.close()
            b = await publishing(bob, "r", 2)  # the room is on node 1 now
        finally:
            node_a.proc.send_signal(signal.SIGCONT)
        failed = await alice.next_event("media_failed", timeout=15)
        assert (failed["room"], failed["which"]) == ("r", "all")
        await a.close()
        a = await publishing(alice, "r", 1)
        await until(lambda: decodes(a, bob.session, 10) and decodes(b, alice.session, 10), 60)
        for media in (a, b):
            ports = candidate_ports(media)
            assert ports and all(PORTS[1][0] <= p <= PORTS[1][1] for p in ports), ports
        await until_async(lambda: metric(node_a, "sfu_rooms"), 0)
        assert await metric(node_b, "sfu_rooms") == 1
        assert no_event(bob, "media_failed")  # bob, moved already, was not told again
        # nor offered (stale) media of the room's former node, which it would have answered
        assert not any("bad_sdp" in e["error"] for e in b.errors), b.errors
        await a.close()
        await b.close()


async def test_a_session_that_moves_to_another_node_publishes_again(
    tmp_path: Path, servers: list[Server]
) -> None:
    """alice's connection to node 0 (the room's media node) drops and she resumes on node
    1 while node 0 lives: she is told `media_failed` once her participant has joined the
    room's media from node 1, publishes again, and bob (on node 0) decodes her new media;
    the room stays on node 0."""
    async with media_cluster(tmp_path, servers) as cl, asyncio.timeout(120):
        bob, b, alice, a = await in_call(cl, (0, "bob"), (0, "alice"))
        token, sid = alice.welcome["resume"], alice.session
        await a.close()
        await alice.close(bye=False)

        again = await cl.client(1, "alice", resume=token)
        assert (again.welcome["resumed"], again.session) == (True, sid)
        failed = await again.next_event("media_failed", timeout=10)
        assert (failed["room"], failed["which"]) == ("r", "all")
        a = await publishing(again, "r", 3)
        await until(lambda: decodes(a, bob.session, 10), 60)
        # bob gets her new tracks (new ids) and decodes clip 3.
        await until(
            lambda: any(
                t["participant"] == sid
                and t["kind"] == "video"
                and tid in b.counters
                and 3 in b.counters[tid].video.publishers
                and b.counters[tid].frames >= 10
                for tid, t in b.tracks.items()
            ),
            60,
        )
        for media in (a, b):
            ports = candidate_ports(media)
            assert ports and all(PORTS[0][0] <= p <= PORTS[0][1] for p in ports), ports
        assert await metric(cl.nodes[0], "sfu_rooms") == 1
        assert await metric(cl.nodes[1], "sfu_rooms") == 0
        assert no_event(bob, "media_failed")
        await a.close()
        await b.close()


async def test_rooms_spread_by_load_and_a_recording_is_asked_of_the_media_node(
    tmp_path: Path, servers: list[Server]
) -> None:
    """Node 1 hosts a room already: the next room, first needed on node 1 too, goes to node
    0 (fewer rooms). Its moderator on node 1 cannot record it there: the recording would be
    made on node 0 (refused with `recording_unavailable`, naming node 0)."""
    async with media_cluster(tmp_path, servers) as cl, asyncio.timeout(90):
        node_a, node_b = cl.nodes
        carol = await cl.client(1, "carol")
        await carol.join("other")
        await until_async(lambda: metric(node_b, "media_rooms_here"), 1)
        bob = await cl.client(1, "bob")
        joined = await bob.join("r")
        assert joined["self"]["moderator"] is True
        await until_async(lambda: metric(node_a, "media_rooms_here"), 1)
        assert await metric(node_b, "media_rooms_here") == 1
        try:
            await bob.start_recording("r")
        except ClientError as e:
            assert e.code == "recording_unavailable", e
            assert "node" in str(e), e
        else:
            raise AssertionError("a recording was started away from the room's media")
        media = await publishing(bob, "r", 1)  # bob's media goes to node 0
        ports = candidate_ports(media, subscriber=False)
        assert ports and all(PORTS[0][0] <= p <= PORTS[0][1] for p in ports), ports
        await media.close()


async def test_without_redis_placed_rooms_keep_their_media(
    tmp_path: Path, servers: list[Server]
) -> None:
    """On a private redis-server: while it is down, a room placed already keeps working (a
    new participant gets its media), and a room not placed yet answers `media_unavailable`
    at once. Once Redis is back (empty: nothing kept on disk) the node places its room on
    itself again (nobody else did meanwhile: no `media_failed`), and the participant whose
    join failed during the outage is joined again by its next media request."""
    from test_redisbus import PrivateRedis

    redis = PrivateRedis()
    redis.start()
    try:
        await until_async(redis.answers, True)
        async with (
            cluster(
                tmp_path,
                servers,
                1,
                redis_url=redis.url,
                sfu=SFU,
                node_env=node_env(machine_ip()),
            ) as cl,
            asyncio.timeout(120),
        ):
            node = cl.nodes[0]
            alice = await cl.client(0, "alice")
            await alice.join("r")
            a = await publishing(alice, "r", 1)

            redis.kill()
            await until_async(lambda: metric(node, "cluster_unavailable"), 1.0)
            bob = await cl.client(0, "bob")
            await bob.join("r")
            viewer = SfuSession(bob, "r")
            await until(lambda: decodes(viewer, alice.session, 10), 60)
            carol = await cl.client(0, "carol")
            await carol.join("new")
            try:
                await carol.request({"type": "subscribe", "room": "new"}, timeout=5)
            except ClientError as e:
                assert e.code == "media_unavailable", e
            else:
                raise AssertionError("a room was placed without Redis")

            redis.start()
            await until_async(lambda: metric(node, "cluster_unavailable"), 0.0)
            r = aioredis.Redis.from_url(redis.url)
            try:
                await until_async(lambda: r.exists(f"{cl.prefix}:media:r"), 1)
            finally:
                await r.aclose()
            assert no_event(alice, "media_failed") and no_event(bob, "media_failed")
            media = await publishing(carol, "new", 3)  # joined again, then published
            assert media.pub is not None and media.pub.remoteDescription is not None
            await until(lambda: decodes(viewer, alice.session, 50), 60)  # "r" went on
            await media.close()
            await viewer.close()
            await a.close()
    finally:
        redis.kill()
