"""Simulcast from the Python SDK, and what the SFU makes of it for two subscribers (issue 15).

An aiortc publisher sends two pre-encoded layers of one camera (320x240 and 640x480) through
``SfuSession.publish`` with a ``Simulcast``. One subscriber is on a clean path; the other's
downlink goes through a user-space UDP relay that limits its bandwidth (below what the top
layer takes) and, once the SFU has moved it down, also drops 3 % of the RTP packets. The
limited one settles on the low layer while the clean one keeps the top layer and the publisher
keeps sending it; lifted, the limited one climbs back. At every switch frames keep decoding
(no pause of 1 s, no decoder error, no garbage picture), sequence numbers stay gap-free after
NACK repair and VP8 picture ids go on by one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from aiortc.mediastreams import VideoStreamTrack
from nethelpers import machine_ip
from sfu_helpers import PartyFactory, sfu_metric, until

from media.clip import ClipSpec, load_clip
from media.layerwatch import DecodeErrors, Watched, watch
from media.relay import UdpRelay
from media.tracks import EncodedVideoTrack
from signaling.sdk.simulcast import Simulcast, SimulcastSender


def layer_clips() -> list[EncodedVideoTrack]:
    specs = [
        ClipSpec(publisher_id=5, width=320, height=240, video_bitrate=150_000),
        ClipSpec(publisher_id=5, width=640, height=480, video_bitrate=1_200_000),
    ]
    return [EncodedVideoTrack(load_clip(s)) for s in specs]


async def layer_rates(sim: SimulcastSender, seconds: float) -> list[float]:
    """Each layer's sending rate (bits per second of RTP payload) over ``seconds``."""

    async def sent() -> list[int]:
        out = []
        for sender in sim.senders:
            stats = await sender.getStats()
            out.append(sum(s.bytesSent for s in stats.values() if s.type == "outbound-rtp"))
        return out

    before = await sent()
    await asyncio.sleep(seconds)
    after = await sent()
    return [(b - a) * 8 / seconds for a, b in zip(before, after, strict=True)]


async def test_sdk_simulcast_limited_and_clean_subscribers(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    layers = layer_clips()
    relay = UdpRelay(machine_ip(), seed=15)
    # A bottleneck with a deep buffer (as home links have): too much traffic first waits,
    # so the receiver's delay-based estimate (REMB) falls before the queue overflows.
    relay.max_delay = 3.0
    await relay.start()
    slow_w, clean_w = Watched(), Watched()
    try:
        with DecodeErrors() as errors:
            cam = await party(sfu_server, "cam", publish=False)
            trs = await cam.media.publish([(Simulcast(layers, ["h", "f"]), "camera")])
            sim = cam.media.simulcast[trs[0].mid or ""]
            clean = await party(
                sfu_server,
                "clean",
                publish=False,
                decode=False,
                on_track=watch(clean_w, lambda: clean.media.sub),
            )
            slow = await party(
                sfu_server,
                "slow",
                publish=False,
                decode=False,
                relay=relay,
                on_track=watch(slow_w, lambda: slow.media.sub),
            )
            assert sim.accepted, "the server took the offer as one stream"
            # Both start on the low layer and climb to the top one.
            await until(lambda: clean_w.frames.width == slow_w.frames.width == 640, 40)
            rates = await layer_rates(sim, 2.0)
            assert rates[1] > 2 * rates[0] > 0, rates
            await asyncio.sleep(3)  # past the SFU's grace after a switch up (REMB_GRACE_S)
            # The limit: well below the top layer, well above the low one. Then 3 % loss
            # besides, once the SFU has moved the subscriber down and the buffer has drained:
            # while it is full a lost packet's repair comes later than the aiortc receiver
            # still asks for it (its NACK window is 128 packets), and aiortc's jitter buffer
            # then stalls until 512 packets overflow it (up to ~10 s; docs/SFU.md): the
            # receiver's limit, not the switch's.
            relay.rate_bps = int(rates[1] * 0.6)
            limited_at = time.monotonic()
            slow_w.frames.mark()
            await until(lambda: 0 < slow_w.frames.width < 640, 30)
            down_s = time.monotonic() - limited_at
            congested_gap, congested_lag = slow_w.frames.longest_gap, slow_w.frames.lag
            await until(lambda: relay.queued_s < 0.05, 15)
            relay.loss = 0.03
            # Settled: the limited one stays low for 4 s, the clean one high, and the
            # publisher goes on sending its top layer.
            settled_at = slow_w.frames.count
            slow_w.frames.mark()
            clean_w.frames.mark()
            during = await layer_rates(sim, 4.0)
            assert set(slow_w.frames.widths_since) == {320}, slow_w.frames.widths_since
            assert set(clean_w.frames.widths_since) == {640}
            assert during[1] > rates[1] / 2, during
            assert slow_w.frames.longest_gap < 1.0  # 3 % loss, repaired: no freeze
            assert relay.counts.lost > 0
            # Lifted: the limited one climbs back.
            relay.rate_bps, relay.loss = None, 0.0
            lifted_at = time.monotonic()
            await until(lambda: slow_w.frames.width == 640, 45)
            up_s = time.monotonic() - lifted_at
            count = slow_w.frames.count
            await until(lambda: slow_w.frames.count > count + 30, 10)
            print(
                f"layers {[round(r) for r in rates]} bps, limit {int(rates[1] * 0.6)} bps: "
                f"down after {down_s:.1f} s (longest pause before {congested_gap:.2f} s, "
                f"{congested_lag:.2f} s behind), back up {up_s:.1f} s after the lift; relay "
                f"{relay.counts}; slow switches {slow_w.frames.switches}, clean switches "
                f"{clean_w.frames.switches}; longest gaps {slow_w.frames.longest_gap:.3f} s "
                f"(slow, since settling), {clean_w.frames.longest_gap:.3f} s (clean); decoder "
                f"errors at {errors.at}"
            )

        # At every switch frames kept decoding: no pause of 1 s, no decoder error.
        for w in (slow_w, clean_w):
            assert w.frames.switches, "no switch seen"
            assert max(s.pause for s in w.frames.switches) < 1.0, w.frames.switches
        assert [(s.old, s.new) for s in slow_w.frames.switches][-2:] == [(640, 320), (320, 640)]
        assert clean_w.frames.longest_gap < 1.0
        assert errors.count == 0
        # No garbage: every 640x480 frame shows its marker (the limited one's since it
        # settled). The 320x240 clip's pictures after a keyframe spliced in on request drift
        # off the marker for a few frames: a property of the pre-encoded clip, seen decoding
        # it alone.
        assert [n for n, width in clean_w.frames.unreadable_at if width == 640] == []
        assert [
            n for n, width in slow_w.frames.unreadable_at if width == 640 and n > settled_at
        ] == []
        # Sequence numbers: gap-free for the clean one. The limited one's receiver NACKs
        # what the relay dropped and the SFU resends it: what is still missing at the end is
        # no more than what the relay dropped (an unrepaired loss), never a gap the SFU made.
        assert clean_w.packets is not None and slow_w.packets is not None
        assert clean_w.packets.check() == (0, [])
        # Every layer packet was bound to its layer by its RID (none unrouted or malformed).
        assert await sfu_metric(sfu_server, "dropped_no_route_total") == 0
        assert await sfu_metric(sfu_server, "dropped_malformed_total") == 0
        missing, breaks = slow_w.packets.check()
        assert breaks == []
        dropped = relay.counts.lost + relay.counts.queue_dropped
        print(f"slow: {missing} missing after repair, {dropped} dropped by the relay")
        assert missing <= dropped
    finally:
        relay.close()
        for w in (slow_w, clean_w):
            for t in w.tasks:
                t.cancel()


async def test_sdk_simulcast_from_raw_track_beside_single_stream(
    start_server: Callable[..., Awaitable[TestServer]], party: PartyFactory
) -> None:
    """``publish(..., simulcast=True)``: a raw 640x480 track goes out as two layers, each
    scaled and encoded on its own; a publisher without simulcast in the same room still
    reaches the subscriber, whose video then climbs to the top layer."""
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    cam = await party(server, "cam", publish=False)
    trs = await cam.media.publish([(VideoStreamTrack(), "camera")], simulcast=True)
    sim = cam.media.simulcast[trs[0].mid or ""]
    assert sim.simulcast.rids == ["h", "f"]
    plain = await party(server, "plain", n=2)
    viewer = await party(server, "viewer", publish=False)
    await until(lambda: sim.accepted and len(sim.senders) == 2, 10)
    counter = None

    def plain_counter() -> bool:
        nonlocal counter
        counter = viewer.media.counter_for(plain.id, "video")
        return counter is not None and counter.frames > 10

    await until(plain_counter, 30)

    def cam_sizes() -> set[tuple[int, int]]:
        c = viewer.media.counter_for(cam.id, "video")
        return set() if c is None else set(c.video.sizes)

    await until(lambda: (640, 480) in cam_sizes(), 40)
    assert cam_sizes() <= {(320, 240), (640, 480)}
    rates = await layer_rates(sim, 1.0)
    assert all(r > 0 for r in rates), rates
    assert await sfu_metric(server, "dropped_no_route_total") == 0


async def test_sdk_simulcast_in_an_h264_room(
    start_server: Callable[..., Awaitable[TestServer]], party: PartyFactory
) -> None:
    """Simulcast of pre-encoded H.264 layers in a room whose codec is H.264: the subscriber
    starts on the low layer and is switched to the top one at its IDR, sequence numbers
    gap-free, no decoder error."""
    server = await start_server(sfu__enabled=True, sfu__workers=1, sfu__video_codec="h264")
    specs = [
        ClipSpec(publisher_id=6, width=320, height=240, video_bitrate=150_000, codec="h264"),
        ClipSpec(publisher_id=6, width=640, height=480, video_bitrate=800_000, codec="h264"),
    ]
    layers = [EncodedVideoTrack(load_clip(s)) for s in specs]
    viewer_w = Watched()
    try:
        with DecodeErrors() as errors:
            cam = await party(server, "cam", publish=False)
            trs = await cam.media.publish([(Simulcast(layers), "camera")])
            assert cam.media.simulcast[trs[0].mid or ""].simulcast.rids == ["h", "f"]
            viewer = await party(
                server,
                "viewer",
                publish=False,
                decode=False,
                on_track=watch(viewer_w, lambda: viewer.media.sub),
            )
            await until(lambda: viewer_w.frames.width == 640, 40)
            count = viewer_w.frames.count
            await until(lambda: viewer_w.frames.count > count + 15, 10)
        print(f"switches {viewer_w.frames.switches}; decoder errors at {errors.at}")
        assert [(s.old, s.new) for s in viewer_w.frames.switches] == [(320, 640)]
        assert viewer_w.frames.switches[0].pause < 1.0
        assert errors.count == 0
        assert viewer_w.packets is not None
        assert viewer_w.packets.check()[0] == 0  # (picture ids are VP8's)
        assert await sfu_metric(server, "dropped_no_route_total") == 0
    finally:
        for t in viewer_w.tasks:
            t.cancel()
