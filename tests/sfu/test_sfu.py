"""Group calls through the SFU with real aiortc clients: forwarding without decoding."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer
from nethelpers import machine_ip
from sfu_helpers import Party, PartyFactory, sfu_metric, until

from media.loss import inject_loss
from media.tracks import ToneTrack
from signaling.app import HUB
from signaling.sdk.wsclient import Client, ClientError


def _decoding(viewer: Party, others: list[Party], frames: int) -> bool:
    for o in others:
        v = viewer.media.counter_for(o.id, "video")
        a = viewer.media.counter_for(o.id, "audio")
        if v is None or a is None or v.frames < frames or a.frames < frames:
            return False
    return True


async def test_three_participants_decode_each_other(
    start_server: Callable[..., Awaitable[TestServer]], party: PartyFactory
) -> None:
    server = await start_server(sfu__enabled=True, sfu__workers=2)
    ps = [await party(server, f"p{i}", n=i + 1) for i in range(3)]
    await until(lambda: all(_decoding(p, [o for o in ps if o is not p], 30) for p in ps), 40)
    for p in ps:
        for n, o in enumerate(ps, start=1):
            if o is p:
                continue
            v = p.media.counter_for(o.id, "video")
            assert v is not None and set(v.video.sizes) == {(640, 480)}
            # The frames carry their publisher's id: nobody got someone else's stream.
            assert v.video.publishers == {n} and v.video.intact >= 30
    # The track list and owners are announced to everyone.
    info = ps[0].media.tracks
    assert {(t["participant"], t["kind"], t["source"]) for t in info.values()} == {
        (o.id, k, s) for o in ps[1:] for k, s in (("video", "camera"), ("audio", "microphone"))
    }


async def test_late_joiner_decodes_video_within_one_second(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", n=2)
    await until(lambda: _decoding(a, [b], 10) and _decoding(b, [a], 10), 15)
    loop = asyncio.get_running_loop()
    started = loop.time()
    late = await party(sfu_server, "late", publish=False)
    await until(
        lambda: all(
            late.media.counter_for(x.id, "video") is not None
            and late.media.counter_for(x.id, "video").frames > 0  # type: ignore[union-attr]
            for x in (a, b)
        ),
        5,
    )
    for x in (a, b):
        counter = late.media.counter_for(x.id, "video")
        assert counter is not None and counter.first_frame_at is not None
        assert counter.first_frame_at - started < 1.0, counter.first_frame_at - started
    assert a.video is not None and a.video.keyframe_requests >= 1  # the SFU asked for one


async def test_leaving_removes_tracks(sfu_server: TestServer, party: PartyFactory) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", n=2)
    await until(lambda: _decoding(a, [b], 5), 15)
    b_tracks = {t for t, info in a.media.tracks.items() if info["participant"] == b.id}
    await b.client.request({"type": "leave", "room": "call"})
    gone = set()
    async with asyncio.timeout(5):
        while gone != b_tracks:
            ev = await a.client.next_event("track_unpublished")
            assert ev["participant"] == b.id
            gone.add(ev["track"])
    v = a.media.counter_for(b.id, "video")
    assert v is not None
    await asyncio.sleep(0.5)
    frames = v.frames
    await asyncio.sleep(1.0)
    assert v.frames - frames <= 1  # nothing more arrives from bob


async def test_mute_and_pause(sfu_server: TestServer, party: PartyFactory) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 10), 15)
    video_id = next(t for t, i in b.media.tracks.items() if i["kind"] == "video")
    audio_id = next(t for t, i in b.media.tracks.items() if i["kind"] == "audio")

    await a.client.request({"type": "track_mute", "room": "call", "track": audio_id, "muted": True})
    ev = await b.client.next_event("track_updated")
    assert ev["track"]["id"] == audio_id and ev["track"]["muted"] is True
    with pytest.raises(ClientError) as e:  # only the publisher mutes its track
        await b.client.request(
            {"type": "track_mute", "room": "call", "track": audio_id, "muted": False}
        )
    assert e.value.code == "no_such_track"

    v = b.media.counter_for(a.id, "video")
    assert v is not None
    await b.client.request(
        {"type": "track_pause", "room": "call", "track": video_id, "paused": True}
    )
    await asyncio.sleep(0.3)
    frames = v.frames
    await asyncio.sleep(1.0)
    assert v.frames - frames <= 1  # paused: nothing arrives
    await b.client.request(
        {"type": "track_pause", "room": "call", "track": video_id, "paused": False}
    )
    await until(lambda: v.frames >= frames + 10, 3)  # resumes at a keyframe


async def test_loss_is_repaired(sfu_server: TestServer, party: PartyFactory) -> None:
    a = await party(sfu_server, "alice", n=1, seconds=4.0)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 10), 15)
    assert a.media.pub is not None
    loss = inject_loss(a.media.pub, 0.05, seed=7, kinds=("video",))
    v = b.media.counter_for(a.id, "video")
    assert v is not None
    v.reset_window()
    await asyncio.sleep(6.0)
    loss.remove()
    assert loss.counts.dropped > 20, loss.counts  # loss really happened
    fraction = v.decodable_fraction()
    assert fraction >= 0.99, (fraction, v.video)


async def test_bad_offers_get_clear_errors(
    sfu_server: TestServer, party: PartyFactory, clients: Callable[..., Awaitable[Client]]
) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 5), 15)
    c = await clients(sfu_server, name="Mallory", identity="mallory")
    with pytest.raises(ClientError) as e:
        await c.request({"type": "publish", "room": "call", "sdp": "v=0\r\n"})
    assert e.value.code == "not_in_room"
    await c.request({"type": "join", "room": "call"})
    for sdp, code in (
        ("garbage", "bad_sdp"),
        ("v=0\r\n", "bad_sdp"),
        (_h264_only_offer(), "no_usable_codec"),
    ):
        with pytest.raises(ClientError) as e:
            await c.request({"type": "publish", "room": "call", "sdp": sdp})
        assert e.value.code == code, (sdp[:30], e.value.msg)
    with pytest.raises(ClientError) as e:
        await c.request({"type": "subscribe_answer", "room": "call", "sdp": "nonsense"})
    assert e.value.code == "bad_sdp"
    with pytest.raises(ClientError) as e:
        await c.request(
            {"type": "track_pause", "room": "call", "track": "forged:0", "paused": True}
        )
    assert e.value.code == "no_such_track"
    # The call went on for the others.
    v = b.media.counter_for(a.id, "video")
    assert v is not None
    frames = v.frames
    await until(lambda: v.frames > frames + 10, 3)


def _h264_only_offer() -> str:
    return (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n"
        "a=msid-semantic:WMS *\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=rtcp:9 IN IP4 0.0.0.0\r\n"
        "a=mid:0\r\na=sendonly\r\na=rtcp-mux\r\na=rtpmap:102 H264/90000\r\n"
        "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032\r\n"
        "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\na=setup:actpass\r\n"
    )


async def test_active_speaker(sfu_server: TestServer, party: PartyFactory) -> None:
    quiet = await party(sfu_server, "quiet", publish=False)
    loud = await party(sfu_server, "loud", publish=False)
    await loud.media.publish([(ToneTrack(), "microphone")])
    async with asyncio.timeout(10):
        while True:
            ev = await quiet.client.next_event("active_speaker")
            if ev["speakers"]:
                break
    assert ev["speakers"] == [loud.id] and ev["room"] == "call"


async def test_dead_transport_is_cleaned_up(sfu_server: TestServer, party: PartyFactory) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 5), 15)
    assert a.media.pub is not None
    await a.media.pub.close()  # the publisher's connection dies; its socket session stays
    gone = set()
    async with asyncio.timeout(30):
        while len(gone) < 2:
            ev = await b.client.next_event("track_unpublished", timeout=30)
            gone.add(ev["track"])
    ev = await a.client.next_event("media_failed", timeout=5)
    assert ev["which"] == "publisher", ev


async def test_subscriber_connection_replaced_after_media_failed(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    """The server drops a subscriber connection that failed or was closed (`media_failed`,
    `subscriber`) and offers a new one; the session answers it on a new peer connection and
    media flows again (on the old one aiortc cannot connect the new ICE session)."""
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 5), 15)
    old = b.media.sub
    assert old is not None
    first = b.media.counter_for(a.id, "video")
    await old.close()  # bob's subscriber connection dies; his socket session stays
    ev = await b.client.next_event("media_failed", timeout=10)
    assert ev["which"] == "subscriber", ev

    def again() -> bool:
        video = b.media.counter_for(a.id, "video")
        return b.media.sub is not old and video is not first and _decoding(b, [a], 5)

    await until(again, 20)


async def test_port_range_and_announced_address(
    start_server: Callable[..., Awaitable[TestServer]], party: PartyFactory
) -> None:
    """A cloud VM binds every interface, announces its public address and keeps media in a
    port range (here the 'public' address is this machine's own)."""
    ip = machine_ip()
    server = await start_server(
        sfu__enabled=True,
        sfu__workers=1,
        sfu__bind_address="0.0.0.0",
        sfu__public_address=ip,
        sfu__port_min=42000,
        sfu__port_max=42049,
    )
    a = await party(server, "alice", n=1)
    b = await party(server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 5), 15)
    for pc in (a.media.pub, b.media.sub):
        assert pc is not None and pc.remoteDescription is not None
        hosts = [
            line.split()[4:6]
            for line in pc.remoteDescription.sdp.splitlines()
            if line.startswith("a=candidate:")
        ]
        assert hosts, pc.remoteDescription.sdp
        for host, port in hosts:
            assert host == ip and 42000 <= int(port) <= 42049


async def test_metrics_count_forwarded_packets(sfu_server: TestServer, party: PartyFactory) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 10), 15)
    assert await sfu_metric(sfu_server, "rooms") == 1
    assert await sfu_metric(sfu_server, "packets_out_total") >= 20  # 10+ frames each kind
    assert await sfu_metric(sfu_server, "packets_in_total") > 0


async def test_offer_lost_while_disconnected_is_sent_again_on_resume(
    sfu_server: TestServer, party: PartyFactory, clients: Callable[..., Awaitable[Client]]
) -> None:
    b = await party(sfu_server, "bob", publish=False)
    token = b.client.welcome["resume"]
    await b.media.close()
    await b.client.drop()  # bob's socket dies; his session waits for a resume
    hub = sfu_server.app[HUB]
    await until(lambda: hub.sessions[b.id].conn is None, 5)
    a = await party(sfu_server, "alice", n=1)  # the offer to bob is sent while he is away
    # /metrics asks the worker over the channel its events come by, so once the offer is
    # counted there, the server has had it (and dropped it: bob has no connection).
    async with asyncio.timeout(10):
        while await sfu_metric(sfu_server, "subscribe_offers_total") < 1:
            await asyncio.sleep(0.05)
    back = await clients(sfu_server, name="bob", resume=token)
    assert back.welcome["resumed"] is True
    offer = await back.next_event("subscribe_offer", timeout=10)
    assert {t["participant"] for t in offer["tracks"]} == {a.id}


async def test_h264_room(
    start_server: Callable[..., Awaitable[TestServer]], party: PartyFactory
) -> None:
    """A room can use H.264 (constrained baseline) instead of VP8."""
    server = await start_server(sfu__enabled=True, sfu__workers=1, sfu__video_codec="h264")
    a = await party(server, "alice", n=1, codec="h264")
    b = await party(server, "bob", publish=False)
    await until(lambda: _decoding(b, [a], 15), 20)
    assert {t["codec"] for t in b.media.tracks.values() if t["kind"] == "video"} == {"h264"}
    v = b.media.counter_for(a.id, "video")
    assert v is not None and v.video.publishers == {1} and set(v.video.sizes) == {(640, 480)}
