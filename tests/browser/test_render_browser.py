"""Only what is on screen (issue 15), through the bundled page in Chromium: the page reports
its tiles' sizes (`track_render`) and shows at most `maxVideos` video tiles, and the SFU's
per-subscriber counters (the worker's `room_stats`) show what it forwards.

Alice publishes from the bundled page (its fake 640x480 camera as two simulcast layers,
320x240 and 640x480); Bob is an aiortc peer publishing one video stream and silence; the
viewer is the bundled page with `?maxVideos=1`. Every microphone is silent at first, so no
active speaker reorders the tiles: Alice's (the first to join) shows video and Bob's shows his
name only. Then: Bob's video is not forwarded to the viewer while his audio is; Alice's tile
made tiny gets her low layer; hidden (`display: none`) her video stops; shown again it resumes
and decodes within a second. Last, Bob speaks: his tile shows video and Alice's her name only,
and the SFU follows (his video forwarded and decoded, hers not)."""

from __future__ import annotations

import time
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp.test_utils import TestServer
from browser_harness import launch_chromium, wait_for
from playwright.async_api import Page

from media.clip import ClipSpec, load_clip
from media.session import SfuSession
from media.tracks import EncodedVideoTrack, ToneTrack, attach_keyframe_requests
from signaling.app import HUB
from signaling.groupcall.router import GroupCall
from signaling.sdk.wsclient import Client

Forwarding = dict[tuple[str, str], dict[str, Any]]
#: What Alice sends of each layer (for failure messages).
SENDING = """async () => {
  const out = [];
  (await window.rallypoint.room.publisher.getStats()).forEach((s) => {
    if (s.type === "outbound-rtp" && s.kind === "video")
      out.push([s.rid, s.frameWidth, s.bytesSent, s.qualityLimitationReason, s.targetBitrate]);
    if (s.type === "candidate-pair" && s.nominated) out.push(["bwe", s.availableOutgoingBitrate]);
  });
  return out;
}"""


async def forwarding(server: TestServer, room: str) -> tuple[Forwarding, dict[str, Any]]:
    """The room's worker's counters by (subscriber, track), and its layers' sizes."""
    stats = await cast(GroupCall, server.app[HUB].media).room_stats(room)
    return {(f["participant"], f["track"]): f for f in stats["forwarding"]}, stats["layer_sizes"]


def silent_wav(path: Path) -> Path:
    """Two seconds of silence: the fake microphone (its default beeps would make speakers)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(48000)
        w.writeframes(b"\0\0" * 96000)
    return path


async def decoded_from(page: Page, track_id_prefix: str) -> int:
    """Frames the page decoded of the video whose tile belongs to that participant."""
    return int(
        await page.evaluate(
            """async (pid) => {
              const tile = window.rallypoint.tiles.get(pid);
              const tr = tile && window.rallypoint.room.remote.get(tile.videoTrackId);
              if (!tr) return 0;
              let frames = 0;
              (await tr.transceiver.receiver.getStats()).forEach((s) => {
                if (s.type === "inbound-rtp") frames += s.framesDecoded || 0;
              });
              return frames;
            }""",
            track_id_prefix,
        )
    )


async def _more(page: Page, pid: str, frames: int) -> bool:
    """Whether the page decoded more than ``frames`` of that participant's video."""
    return await decoded_from(page, pid) > frames


async def test_page_reports_tile_sizes_and_limits_videos(
    start_server: Callable[..., Awaitable[TestServer]],
    clients: Callable[..., Awaitable[Client]],
    tmp_path: Path,
) -> None:
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    origin = f"http://127.0.0.1:{server.port}"
    wav = silent_wav(tmp_path / "silence.wav")
    async with launch_chromium(extra_args=[f"--use-file-for-fake-audio-capture={wav}"]) as browser:
        pages: list[Page] = []

        async def open_page(query: str) -> Page:
            page = await (await browser.new_context()).new_page()
            page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: print(f"page error: {e}"))
            await page.goto(f"{origin}/room/screen?{query}&autojoin=1")
            pages.append(page)
            return page

        alice = await open_page("name=Alice")
        await wait_for(
            lambda: alice.evaluate("Boolean(window.rallypoint.room?.local.get('camera'))"),
            30,
            "Alice to publish",
        )

        bob = await clients(server, name="Bob", identity="bob")
        await bob.request({"type": "join", "room": "screen"})
        bob_media = SfuSession(bob, "screen")
        clip = load_clip(ClipSpec(publisher_id=2, seconds=3.0))
        bob_video = EncodedVideoTrack(clip)
        bob_voice = ToneTrack(amplitude=0.0)  # silent until he speaks
        trs = await bob_media.publish([(bob_video, "camera"), (bob_voice, "microphone")])
        attach_keyframe_requests(trs[0].sender, bob_video)
        bob_id = str(bob.welcome["session"])
        try:
            viewer = await open_page("name=Viewer&maxVideos=1")
            await wait_for(
                lambda: viewer.evaluate("Boolean(window.rallypoint.room?.self)"), 20, "joining"
            )
            viewer_id = await viewer.evaluate("window.rallypoint.room.self.id")
            alice_id = await viewer.evaluate(
                "[...window.rallypoint.room.participants.values()]"
                ".find((p) => p.name === 'Alice').id"
            )

            def track(f: Forwarding, pid: str, kind: str) -> str:
                return next(
                    t
                    for (sub, t), v in f.items()
                    if sub == viewer_id and t.startswith(f"{pid}:") and v["kind"] == kind
                )

            async def viewer_has_all() -> bool:
                f, _ = await forwarding(server, "screen")
                kinds = {(t.split(":")[0], v["kind"]) for (s, t), v in f.items() if s == viewer_id}
                return kinds >= {(alice_id, "video"), (bob_id, "audio"), (bob_id, "video")}

            await wait_for(viewer_has_all, 30, "the viewer to receive both publishers")
            f, _ = await forwarding(server, "screen")
            a_video, b_video = track(f, alice_id, "video"), track(f, bob_id, "video")
            b_audio = track(f, bob_id, "audio")

            # maxVideos=1: Bob's tile shows his name only and his video is not forwarded.
            tiles = await viewer.evaluate(
                "Object.fromEntries([...window.rallypoint.tiles.values()]"
                ".map((t) => [t.participant, t.nameOnly]))"
            )
            assert tiles[alice_id] is False and tiles[bob_id] is True, tiles

            async def bob_video_hidden() -> bool:
                f, _ = await forwarding(server, "screen")
                v = f[(viewer_id, b_video)]
                return bool(v["paused"]) and v["render"] == [0, 0]

            await wait_for(bob_video_hidden, 10, "Bob's video reported as not shown")
            f0, _ = await forwarding(server, "screen")

            async def bob_audio_flows() -> bool:
                f, _ = await forwarding(server, "screen")
                return bool(
                    f[(viewer_id, b_audio)]["packets"] >= f0[(viewer_id, b_audio)]["packets"] + 25
                )

            async def others_flow() -> bool:
                f, _ = await forwarding(server, "screen")
                return await bob_audio_flows() and bool(
                    f[(viewer_id, a_video)]["packets"] > f0[(viewer_id, a_video)]["packets"]
                )

            await wait_for(others_flow, 15, "Bob's audio and Alice's video to reach the viewer")
            f1, _ = await forwarding(server, "screen")
            assert f1[(viewer_id, b_video)]["packets"] == f0[(viewer_id, b_video)]["packets"]

            # Alice's tile is large: her top layer (once her layers' sizes are known).
            box = await viewer.evaluate(
                f"(() => {{ const v = window.rallypoint.tiles.get({alice_id!r}).video, r = "
                "devicePixelRatio; return [v.clientWidth * r, v.clientHeight * r]; })()"
            )
            assert box[0] > 320, box

            seen: list[object] = []

            async def alice_on(layer: int) -> bool:
                f, sizes = await forwarding(server, "screen")
                v = f[(viewer_id, a_video)]
                seen[:] = [v, sizes, await alice.evaluate(SENDING)]
                return sizes.get(a_video) == [[320, 240], [640, 480]] and v["layer"] == layer

            # The publisher's own estimate must allow the top layer; on this loaded machine it
            # dips at times and stops that layer for a while (docs/SFU.md, Simulcast).
            await wait_for(lambda: alice_on(1), 60, "the viewer on Alice's 640x480 layer", seen)
            f, _ = await forwarding(server, "screen")
            assert f[(viewer_id, a_video)]["render"] == [round(box[0]), round(box[1])]

            # Made tiny: the 320x240 layer fills it.
            await viewer.evaluate(
                f"window.rallypoint.tiles.get({alice_id!r}).el.style.width = '120px'"
            )
            await wait_for(lambda: alice_on(0), 20, "the viewer on Alice's 320x240 layer", seen)

            # Hidden: nothing of her video is forwarded; audio goes on.
            await viewer.evaluate(
                f"window.rallypoint.tiles.get({alice_id!r}).el.style.display = 'none'"
            )

            async def alice_hidden() -> bool:
                f, _ = await forwarding(server, "screen")
                return bool(f[(viewer_id, a_video)]["paused"])

            await wait_for(alice_hidden, 10, "Alice's video reported as not shown")
            h0, _ = await forwarding(server, "screen")
            f0 = h0

            await wait_for(bob_audio_flows, 10, "audio to keep flowing")
            h1, _ = await forwarding(server, "screen")
            assert h1[(viewer_id, a_video)]["packets"] == h0[(viewer_id, a_video)]["packets"]
            assert h1[(viewer_id, a_video)]["layer"] is None
            assert h1[(viewer_id, b_audio)]["packets"] > h0[(viewer_id, b_audio)]["packets"]

            # Shown again: her video decodes again within a second.
            frames = await decoded_from(viewer, alice_id)
            shown_at = time.monotonic()
            await viewer.evaluate(
                f"window.rallypoint.tiles.get({alice_id!r}).el.style.display = ''"
            )

            await wait_for(
                lambda: _more(viewer, alice_id, frames),
                10,
                "Alice's video to decode again",
                step=0.05,
            )
            took = time.monotonic() - shown_at
            print(f"video resumed {took:.2f} s after the tile was shown again")
            assert took < 1.0, took
            f, _ = await forwarding(server, "screen")
            assert not f[(viewer_id, a_video)]["paused"]
            assert f[(viewer_id, a_video)]["packets"] > h1[(viewer_id, a_video)]["packets"]

            # Bob speaks: the most recent speaker's tile shows video, Alice's her name only.
            bob_voice.amplitude = 0.5

            async def swapped() -> bool:
                f, _ = await forwarding(server, "screen")
                return not f[(viewer_id, b_video)]["paused"] and bool(
                    f[(viewer_id, a_video)]["paused"]
                )

            await wait_for(swapped, 15, "Bob's video shown and Alice's hidden")
            tiles = await viewer.evaluate(
                "Object.fromEntries([...window.rallypoint.tiles.values()]"
                ".map((t) => [t.participant, t.nameOnly]))"
            )
            assert tiles[alice_id] is True and tiles[bob_id] is False, tiles
            frames = await decoded_from(viewer, bob_id)
            await wait_for(
                lambda: _more(viewer, bob_id, frames + 5),
                10,
                "Bob's video to decode on the viewer's page",
            )
        finally:
            await bob_media.close()
            for page in pages:
                await page.context.close()
