"""Recording through the protocol and the HTTP API: who may start and stop, who is told, what
ends a recording, and the files and manifest that come out (real server, real SFU worker, real
aiortc publishers; files decoded with PyAV)."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from aiohttp.test_utils import TestServer
from sfu_helpers import Party, PartyFactory, until

from media.clip import ClipSpec, load_clip
from media.tracks import EncodedAudioTrack, EncodedVideoTrack, attach_keyframe_requests
from signaling.app import HUB
from signaling.core.tokens import create_token
from signaling.sdk.wsclient import Client, ClientError

KEY = "recording-test-key"
SECRET = "recording-test-secret-at-least-32-bytes-long"
Start = Callable[..., Awaitable[TestServer]]


def _frames(p: Party, of: Party) -> int:
    c = p.media.counter_for(of.id, "video")
    return 0 if c is None else c.frames


async def _media_flows(viewer: Party, of: Party, more: int, timeout: float = 20) -> None:
    """Wait until ``viewer`` has decoded ``more`` further video frames of ``of``."""
    start = _frames(viewer, of)
    await until(lambda: _frames(viewer, of) >= start + more, timeout)


def _manifest(root: Path, rec_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / rec_id / "manifest.json").read_text())
    return doc


def _decoded(path: Path) -> tuple[int, int]:
    """(video frames, audio frames) decoded from a file."""
    video = audio = 0
    with av.open(str(path)) as c:
        for frame in c.decode(*c.streams):
            if isinstance(frame, av.VideoFrame):
                video += 1
            else:
                audio += 1
    return video, audio


async def test_moderator_records_and_everyone_is_told(
    start_server: Start,
    party: PartyFactory,
    clients: Callable[..., Awaitable[Client]],
    tmp_path: Path,
) -> None:
    root = tmp_path / "recordings"
    server = await start_server(sfu__enabled=True, sfu__workers=1, recording__path=str(root))
    a = await party(server, "alice", n=1)  # first in the room: its moderator (open mode)
    b = await party(server, "bob", n=2)
    await _media_flows(b, a, 15)

    with pytest.raises(ClientError) as refused:
        await b.client.request({"type": "recording_start", "room": "call"})
    assert refused.value.code == "forbidden"
    with pytest.raises(ClientError) as refused:
        await a.client.request({"type": "recording_stop", "room": "call"})
    assert refused.value.code == "not_recording"

    await a.client.request({"type": "recording_start", "room": "call"})
    started = [await p.client.next_event("recording") for p in (a, b)]
    assert started[0] == started[1]
    ev = started[0]
    assert ev["active"] is True and ev["audio_only"] is False and "identities" not in ev
    assert ev["by"] == {"identity": "alice", "name": "alice"}
    rec_id = ev["recording"]
    with pytest.raises(ClientError) as refused:
        await a.client.request({"type": "recording_start", "room": "call"})
    assert refused.value.code == "already_recording"

    # Someone who joins now is told in its `joined`.
    carol = await clients(server, name="carol", identity="carol")
    joined = await carol.request({"type": "join", "room": "call"})
    assert joined["recording"] == {k: v for k, v in ev.items() if k not in ("type", "room")}

    await _media_flows(b, a, 45)  # about 1.5 s of video recorded
    await a.client.request({"type": "recording_stop", "room": "call"})
    for p in (b.client, carol):
        ended = await p.next_event("recording")
        assert ended["active"] is False and ended["recording"] == rec_id
        assert ended["reason"] == "stopped"
        assert ended["stopped_by"] == {"identity": "alice", "name": "alice"}

    # The files are complete when the stop is answered.
    m = _manifest(root, rec_id)
    assert m["id"] == rec_id and m["room"] == "call" and m["stop_reason"] == "stopped"
    assert m["ended_at"] >= m["started_at"]
    got = {(t["participant"], t["kind"]) for t in m["tracks"]}
    assert got == {(p.id, k) for p in (a, b) for k in ("audio", "video")}
    for t in m["tracks"]:
        for seg in t["segments"]:
            assert seg["complete"] is True
            video, audio = _decoded(root / rec_id / seg["file"])
            if t["kind"] == "video":
                assert video >= 30 and audio == 0, (t, seg)
            else:
                assert audio >= 50 and video == 0, (t, seg)
    # The call went on.
    await _media_flows(b, a, 10)
    await _media_flows(a, b, 10)


async def test_a_resumed_session_learns_of_the_recording_it_missed(
    start_server: Start,
    party: PartyFactory,
    clients: Callable[..., Awaitable[Client]],
    tmp_path: Path,
) -> None:
    server = await start_server(
        sfu__enabled=True, sfu__workers=1, recording__path=str(tmp_path / "recordings")
    )
    a = await party(server, "alice", n=1)
    bob = await clients(server, name="bob", identity="bob")
    await bob.request({"type": "join", "room": "call"})
    token = bob.welcome["resume"]
    await bob.drop()  # bob's socket dies; the recording's start is dropped for him
    hub = server.app[HUB]
    await until(lambda: hub.sessions[bob.welcome["session"]].conn is None, 5)
    await a.client.request({"type": "recording_start", "room": "call"})
    ev = await a.client.next_event("recording")
    back = await clients(server, name="bob", resume=token)
    assert back.welcome["resumed"] is True
    state = await back.next_event("room_state")
    assert state["recording"] == {k: v for k, v in ev.items() if k not in ("type", "room")}


async def test_recording_survives_a_publisher_reconnecting(
    start_server: Start, party: PartyFactory, tmp_path: Path
) -> None:
    root = tmp_path / "recordings"
    server = await start_server(sfu__enabled=True, sfu__workers=1, recording__path=str(root))
    a = await party(server, "alice", n=1)
    b = await party(server, "bob", n=2)
    await _media_flows(a, b, 15)
    await a.client.request({"type": "recording_start", "room": "call"})
    rec_id = (await b.client.next_event("recording"))["recording"]

    def bob_video_segments() -> list[dict[str, Any]]:
        m = _manifest(root, rec_id)
        return [
            seg
            for t in m["tracks"]
            if t["participant"] == b.id and t["kind"] == "video"
            for seg in t["segments"]
        ]

    await until(lambda: len(bob_video_segments()) == 1, 10)
    # Bob's publisher connection dies; he publishes again on a new one.
    assert b.media.pub is not None
    pub, b.media.pub = b.media.pub, None
    await pub.close()
    assert (await b.client.next_event("media_failed"))["which"] == "publisher"
    clip = load_clip(ClipSpec(publisher_id=2, seconds=3.0))
    video = EncodedVideoTrack(clip)
    trs = await b.media.publish([(video, "camera"), (EncodedAudioTrack(clip), "microphone")])
    attach_keyframe_requests(trs[0].sender, video)
    await until(lambda: len(bob_video_segments()) == 2, 15)

    def bob_frames() -> int:
        return sum(
            c.frames
            for tid, c in a.media.counters.items()
            if a.media.tracks.get(tid, {}).get("participant") == b.id
            and a.media.tracks[tid]["kind"] == "video"
        )

    start = bob_frames()
    await until(lambda: bob_frames() >= start + 30, 15)
    await a.client.request({"type": "recording_stop", "room": "call"})
    segments = bob_video_segments()
    assert len(segments) == 2 and all(s["complete"] for s in segments)
    assert segments[1]["start"] > segments[0]["start"]
    for seg in segments:  # every frame written decodes
        assert _decoded(root / rec_id / seg["file"])[0] == seg["frames"] > 0
    assert segments[1]["frames"] >= 20


async def test_backend_records_audio_of_the_consenting_only(
    start_server: Start, party: PartyFactory, tmp_path: Path
) -> None:
    root = tmp_path / "recordings"
    server = await start_server(
        sfu__enabled=True, sfu__workers=1, recording__path=str(root), **_token_mode()
    )
    base = f"http://127.0.0.1:{server.port}/api/rooms"
    auth = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()}
    async with aiohttp.ClientSession() as http:
        await _backend_records(http, base, auth, root, server, party)


async def _backend_records(
    http: aiohttp.ClientSession,
    base: str,
    auth: dict[str, str],
    root: Path,
    server: TestServer,
    party: PartyFactory,
) -> None:

    async with http.post(f"{base}/nobody/recording", json={}, headers=auth) as r:
        assert (r.status, (await r.json())["code"]) == (404, "no_such_room")
    async with http.post(f"{base}/call/recording", json={}) as r:
        assert r.status == 401  # nothing without the API credentials

    a = await party(server, "alice", n=1, token=_token("alice"))
    b = await party(server, "bob", n=2, token=_token("bob"))
    await _media_flows(b, a, 15)
    async with http.post(
        f"{base}/call/recording",
        json={"audio_only": True, "identities": ["bob"]},
        headers=auth,
    ) as r:
        assert r.status == 201, await r.text()
        body = await r.json()
    assert body["active"] is True and body["by"] == {"api": True}
    assert body["audio_only"] is True and body["identities"] == ["bob"]
    ev = await a.client.next_event("recording")
    assert ev["recording"] == body["recording"] and ev["identities"] == ["bob"]
    async with http.get(f"{base}/call/recording", headers=auth) as r:
        assert r.status == 200 and (await r.json())["recording"] == body["recording"]
    async with http.post(f"{base}/call/recording", json={}, headers=auth) as r:
        assert (r.status, (await r.json())["code"]) == (409, "already_recording")

    await _media_flows(a, b, 30)
    # Everyone leaves: the recording ends with the room.
    for p in (a, b):
        await p.media.close()
        await p.client.request({"type": "leave", "room": "call"})
    rec_id = body["recording"]
    await until(lambda: _manifest(root, rec_id)["ended_at"] is not None, 10)
    m = _manifest(root, rec_id)
    assert m["stop_reason"] == "room_closed" and m["audio_only"] is True
    assert [(t["participant"], t["kind"]) for t in m["tracks"]] == [(b.id, "audio")]
    seg = m["tracks"][0]["segments"][0]
    assert _decoded(root / rec_id / seg["file"])[1] >= 25
    async with http.delete(f"{base}/call/recording", headers=auth) as r:
        assert (r.status, (await r.json())["code"]) == (409, "not_recording")


async def test_size_limit_ends_the_recording_and_the_call_goes_on(
    start_server: Start, party: PartyFactory, tmp_path: Path
) -> None:
    root = tmp_path / "recordings"
    server = await start_server(
        sfu__enabled=True,
        sfu__workers=1,
        recording__path=str(root),
        recording__max_bytes=200_000,
    )
    a = await party(server, "alice", n=1, seconds=8.0)
    b = await party(server, "bob", n=2, seconds=8.0)
    await _media_flows(b, a, 15)
    await a.client.request({"type": "recording_start", "room": "call"})
    rec_id = (await b.client.next_event("recording"))["recording"]
    ended = await b.client.next_event("recording", timeout=30)
    assert ended["active"] is False and ended["reason"] == "size_limit"
    assert ended["recording"] == rec_id
    m = _manifest(root, rec_id)
    assert m["stop_reason"] == "size_limit"
    total = sum(s["bytes"] for t in m["tracks"] for s in t["segments"])
    assert 0 < total <= 200_000 + 65_536  # the limit, give or take one batch
    for t in m["tracks"]:
        for seg in t["segments"]:
            _decoded(root / rec_id / seg["file"])  # what was written stays playable
    await _media_flows(b, a, 15)  # forwarding was never touched
    # A new recording may start after the last.
    await a.client.request({"type": "recording_start", "room": "call"})
    assert (await b.client.next_event("recording"))["active"] is True


async def test_mixed_file_after_the_call(
    start_server: Start, party: PartyFactory, tmp_path: Path
) -> None:
    root = tmp_path / "recordings"
    server = await start_server(
        sfu__enabled=True, sfu__workers=1, recording__path=str(root), recording__mix=True
    )
    a = await party(server, "alice", n=1)
    b = await party(server, "bob", n=2)
    await _media_flows(b, a, 15)
    await a.client.request({"type": "recording_start", "room": "call"})
    rec_id = (await b.client.next_event("recording"))["recording"]
    await _media_flows(b, a, 45)
    await a.client.request({"type": "recording_stop", "room": "call"})

    def mixed() -> Any:
        return _manifest(root, rec_id).get("mixed")

    await until(lambda: (mixed() or {}).get("status") in ("done", "failed"), 90, step=0.25)
    assert mixed()["status"] == "done", mixed()
    path = root / rec_id / mixed()["file"]
    video, audio = _decoded(path)
    assert video >= 15 and audio >= 25
    # Both participants are in the picture: two cells side by side, each with its camera
    # (a cell without video is black, luma 0-16).
    with av.open(str(path)) as c:
        pictures = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
    middle = pictures[len(pictures) // 2]
    half = middle.shape[1] // 2
    assert middle[:, :half].mean() > 30 and middle[:, half:].mean() > 30


def _token_mode() -> dict[str, Any]:
    return {"auth__api_key": KEY, "auth__api_secret": SECRET}


def _token(identity: str) -> str:
    return create_token(
        KEY, SECRET, identity, rooms={"call": ["join", "publish", "subscribe", "chat"]}
    )
