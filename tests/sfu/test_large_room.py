"""An SDK client joins a room whose tracks take 60 media sections (issue 15: a 25-person room has
48): its subscriber answer, compacted (``signaling.sdk.sdp``), fits the protocol's 60,000
characters for `sdp` and the 64 KiB frame, and it receives every track. aiortc's answer as it
is (~1,270 characters a section, ~76,000 here) was refused (`bad_field`, or the frame closed
the socket).

Six publishers with ten pre-encoded audio tracks each (cheap to send and forward; their tokens
grant no `subscribe`, so they have no subscriber connections to renegotiate)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from sfu_helpers import PartyFactory, until

from media.clip import ClipSpec, load_clip
from media.session import SfuSession
from media.tracks import EncodedAudioTrack
from signaling.core.tokens import create_token
from signaling.sdk import RallypointClient

PUBLISHERS = 6
TRACKS_EACH = 10
LIMIT = 60_000  # `sdp` in `subscribe_answer` (docs/PROTOCOL.md)


async def test_sdk_client_answers_and_receives_sixty_sections(
    start_server: Callable[..., Awaitable[TestServer]],
    party: PartyFactory,
    phones: Callable[..., Awaitable[RallypointClient]],
) -> None:
    key, secret = "test-key", "a-test-secret-of-at-least-32-bytes"
    server = await start_server(
        sfu__enabled=True, sfu__workers=1, auth__api_key=key, auth__api_secret=secret
    )

    def token(identity: str, *grants: str) -> str:
        return create_token(key, secret, identity, rooms={"call": list(grants)})

    clip = load_clip(ClipSpec(publisher_id=1, seconds=2))
    for i in range(PUBLISHERS):
        p = await party(server, f"pub{i}", publish=False, token=token(f"pub{i}", "join", "publish"))
        await p.media.publish([(EncodedAudioTrack(clip), "microphone") for _ in range(TRACKS_EACH)])

    phone = await phones(server, "viewer", token=token("viewer", "join", "subscribe"))
    await phone.join("call")
    media = SfuSession(phone, "call", decode=True)
    try:
        want = PUBLISHERS * TRACKS_EACH

        def receiving() -> bool:
            return len(media.tracks) == want and all(
                (c := media.counters.get(tid)) is not None and c.frames >= 10
                for tid in media.tracks
            )

        try:
            await until(receiving, 40)
        except TimeoutError:
            raise AssertionError(f"{len(media.tracks)} tracks; errors {media.errors}") from None
        assert media.errors == []
        sub = media.sub
        assert sub is not None and sub.localDescription is not None
        assert len(sub.localDescription.sdp) > LIMIT  # aiortc's answer as it is: refused
    finally:
        await media.close()
