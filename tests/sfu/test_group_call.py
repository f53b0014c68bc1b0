"""A group call from the SDK, with its media through the SFU."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from sfu_helpers import until

from media.clip import ClipSpec, load_clip
from media.session import SfuSession
from media.tracks import EncodedAudioTrack, EncodedVideoTrack, attach_keyframe_requests
from signaling.sdk import RallypointClient


async def test_group_call_media_through_the_sfu(
    start_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    url = f"ws://127.0.0.1:{server.port}/ws"
    phones = [RallypointClient(url, identity=n, name=n.title()) for n in ("ann", "ben", "cat")]
    sessions: list[SfuSession] = []
    try:
        for p in phones:
            await p.connect()
        ann, ben, cat = phones
        call = await ann.call("ben", "cat")
        assert call.group and call.media == "sfu"
        for p in (ben, cat):
            incoming = await p.next_call()
            await incoming.accept()
            await incoming.join_media_room()
        await ann.join(call.room)
        for n, p in enumerate(phones, start=1):
            s = SfuSession(p, call.room)
            sessions.append(s)
            clip = load_clip(ClipSpec(publisher_id=n, seconds=2))
            video = EncodedVideoTrack(clip)
            trs = await s.publish([(video, "camera"), (EncodedAudioTrack(clip), "microphone")])
            attach_keyframe_requests(trs[0].sender, video)

        def everyone_sees_everyone() -> bool:
            return all(
                (c := s.counter_for(o.session, kind)) is not None and c.frames >= 15
                for s, p in zip(sessions, phones, strict=True)
                for o in phones
                if o is not p
                for kind in ("video", "audio")
            )

        try:
            await until(everyone_sees_everyone, 20)
        except TimeoutError:
            for s, p in zip(sessions, phones, strict=True):
                print(
                    p.identity,
                    p.session,
                    s.offers,
                    s.errors,
                    s.tracks.keys(),
                    {k: c.frames for k, c in s.counters.items()},
                )
            raise
        await call.hangup()
    finally:
        for s in sessions:
            await s.close()
        for p in phones:
            await p.close()
