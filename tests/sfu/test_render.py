"""Only what is on screen (issue 15), with real aiortc peers through the SFU workers: a
subscriber that reports a video track as not shown (`track_render`, 0 x 0) is sent none of its
packets (the worker's per-subscriber counters say so) while the track's audio keeps flowing;
shown again, its video decodes again within a second. Bad reports are refused with stable
codes and change nothing."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from jsonschema import Draft202012Validator
from sfu_helpers import PartyFactory, until

from media.session import SfuSession
from signaling.app import HUB
from signaling.core.tokens import create_token
from signaling.groupcall.router import GroupCall
from signaling.sdk.client import RallypointClient
from signaling.sdk.wsclient import ClientError


async def forwarding(server: TestServer, room: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The room's worker's counters: what each subscriber is sent of each track."""
    gc = cast(GroupCall, server.app[HUB].media)
    stats = await gc.room_stats(room)
    return {(f["participant"], f["track"]): f for f in stats["forwarding"]}


async def test_hidden_video_is_not_forwarded_and_resumes_within_a_second(
    sfu_server: TestServer,
    party: PartyFactory,
    phones: Callable[..., Awaitable[RallypointClient]],
) -> None:
    a = await party(sfu_server, "alice", n=1)
    bob = await phones(sfu_server, "bob")
    await bob.join("call")
    media = SfuSession(bob, "call")
    try:
        await until(
            lambda: (v := media.counter_for(a.id, "video")) is not None and v.frames >= 10, 15
        )
        video = media.counter_for(a.id, "video")
        audio = media.counter_for(a.id, "audio")
        assert video is not None and audio is not None
        vid = next(t for t, i in media.tracks.items() if i["kind"] == "video")
        aid = next(t for t, i in media.tracks.items() if i["kind"] == "audio")
        me = bob.session
        before = await forwarding(sfu_server, "call")
        assert before[(me, vid)]["render"] == [65536, 65536]  # no report yet: any size
        assert not before[(me, vid)]["paused"] and before[(me, vid)]["packets"] > 0

        # Hidden (the audio's entry is accepted and changes nothing).
        await bob.render_sizes("call", {vid: (0, 0), aid: (0, 0)})
        hidden = await forwarding(sfu_server, "call")
        assert hidden[(me, vid)]["paused"] and hidden[(me, vid)]["render"] == [0, 0]
        assert not hidden[(me, aid)]["paused"]
        # Half a second of audio arrives (the barrier), and no video packet meanwhile.
        audio_frames = audio.frames
        await until(lambda: audio.frames >= audio_frames + 25, 5)
        during = await forwarding(sfu_server, "call")
        assert during[(me, vid)]["packets"] == hidden[(me, vid)]["packets"]
        assert during[(me, aid)]["packets"] > hidden[(me, aid)]["packets"]
        frames = video.frames

        # Shown again (any size forwards a single-stream track): frames decode within 1 s.
        loop = asyncio.get_running_loop()
        shown_at = loop.time()
        await bob.render_sizes("call", {vid: (320, 240)})
        await until(lambda: video.frames > frames, 5)
        took = loop.time() - shown_at
        print(f"video decoded again {took:.2f} s after the report")
        assert took < 1.0, took
        await until(lambda: video.frames >= frames + 10, 5)  # and keeps decoding
        after = await forwarding(sfu_server, "call")
        assert not after[(me, vid)]["paused"] and after[(me, vid)]["render"] == [320, 240]
        assert after[(me, vid)]["packets"] > during[(me, vid)]["packets"]
        gc = cast(GroupCall, sfu_server.app[HUB].media)
        metrics = {m.name: m.value for m in await gc.metrics()}
        assert metrics["sfu_render_reports"] == 2  # on /metrics
    finally:
        await media.close()


async def test_a_hidden_track_stays_paused_until_shown_and_unpaused(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    """`track_pause` and a 0 x 0 box are two reasons not to forward: video flows only when
    neither holds."""
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: (v := b.media.counter_for(a.id, "video")) is not None and v.frames >= 5, 15)
    vid = next(t for t, i in b.media.tracks.items() if i["kind"] == "video")
    key = (b.id, vid)
    rq = b.client.request
    await rq({"type": "track_pause", "room": "call", "track": vid, "paused": True})
    await rq({"type": "track_render", "room": "call", "tracks": [_box(vid, 0, 0)]})
    await rq({"type": "track_pause", "room": "call", "track": vid, "paused": False})
    assert (await forwarding(sfu_server, "call"))[key]["paused"]  # still hidden
    await rq({"type": "track_pause", "room": "call", "track": vid, "paused": True})
    await rq({"type": "track_render", "room": "call", "tracks": [_box(vid, 640, 480)]})
    assert (await forwarding(sfu_server, "call"))[key]["paused"]  # still paused
    await rq({"type": "track_pause", "room": "call", "track": vid, "paused": False})
    assert not (await forwarding(sfu_server, "call"))[key]["paused"]
    v = b.media.counter_for(a.id, "video")
    assert v is not None
    frames = v.frames
    await until(lambda: v.frames > frames + 5, 5)


def _box(track: str, width: Any, height: Any) -> dict[str, Any]:
    return {"track": track, "width": width, "height": height}


async def test_bad_render_reports_are_refused_and_change_nothing(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    a = await party(sfu_server, "alice", n=1)
    b = await party(sfu_server, "bob", publish=False)
    await until(lambda: (v := b.media.counter_for(a.id, "video")) is not None and v.frames >= 5, 15)
    vid = next(t for t, i in b.media.tracks.items() if i["kind"] == "video")
    bad: list[tuple[Any, str]] = [
        ([_box(vid, -1, 10)], "bad_field"),
        ([_box(vid, 16385, 10)], "bad_field"),
        ([_box(vid, 1.5, 10)], "bad_field"),
        ([_box(vid, True, 10)], "bad_field"),
        ([_box(vid, "640", 480)], "bad_field"),
        ([{"track": vid, "width": 640}], "bad_field"),
        ([{"width": 640, "height": 480}], "bad_field"),
        ([_box("", 1, 1)], "bad_field"),
        (["not an object"], "bad_field"),
        ([_box(vid, 0, 0)] * 65, "bad_field"),
        ("not a list", "bad_field"),
        # A track this subscriber does not receive: nothing of the message is applied.
        ([_box(vid, 0, 0), _box("forged:0", 0, 0)], "no_such_track"),
    ]
    for tracks, code in bad:
        with pytest.raises(ClientError) as e:
            await b.client.request({"type": "track_render", "room": "call", "tracks": tracks})
        assert e.value.code == code, (tracks, e.value.msg)
    with pytest.raises(ClientError) as e:
        await b.client.request({"type": "track_render", "room": "nowhere", "tracks": []})
    assert e.value.code == "not_in_room"
    f = (await forwarding(sfu_server, "call"))[(b.id, vid)]
    assert not f["paused"] and f["render"] == [65536, 65536]
    # The call went on.
    v = b.media.counter_for(a.id, "video")
    assert v is not None
    frames = v.frames
    await until(lambda: v.frames > frames + 10, 3)


async def test_room_media_over_the_http_api(
    start_server: Callable[..., Awaitable[TestServer]], party: PartyFactory
) -> None:
    """The counters above are the HTTP API's `GET /api/rooms/{room}/media` (token mode), as
    docs/openapi.json describes them."""
    key, secret = "test-key", "a-test-secret-of-at-least-32-bytes"
    server = await start_server(
        sfu__enabled=True, sfu__workers=1, auth__api_key=key, auth__api_secret=secret
    )
    grants = ["join", "publish", "subscribe"]

    def token(identity: str) -> str:
        return create_token(key, secret, identity, rooms={"call": grants})

    a = await party(server, "alice", n=1, token=token("alice"))
    b = await party(server, "bob", publish=False, token=token("bob"))
    await until(lambda: (v := b.media.counter_for(a.id, "video")) is not None and v.frames >= 5, 15)
    vid = next(t for t, i in b.media.tracks.items() if i["kind"] == "video")
    auth = {"Authorization": "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()}
    spec = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
    base = f"http://127.0.0.1:{server.port}/api/rooms"
    async with aiohttp.ClientSession(headers=auth) as http:

        async def media(room: str) -> tuple[int, Any]:
            async with http.get(f"{base}/{room}/media") as r:
                return r.status, await r.json()

        await b.client.request(
            {"type": "track_render", "room": "call", "tracks": [_box(vid, 0, 0)]}
        )
        status, body = await media("call")
        assert status == 200 and body["room"] == "call"
        Draft202012Validator(
            {"$ref": "#/components/schemas/RoomMedia", "components": spec["components"]}
        ).validate(body)
        mine = {f["track"]: f for f in body["forwarding"] if f["participant"] == b.id}
        assert mine[vid]["paused"] and mine[vid]["render"] == [0, 0] and mine[vid]["packets"] > 0
        assert {f["kind"] for f in mine.values()} == {"audio", "video"}
        assert body["layer_sizes"] == {}  # aiortc publishes no simulcast
        assert await media("elsewhere") == (
            404,
            {"code": "no_such_room", "message": "no media in room 'elsewhere'"},
        )
