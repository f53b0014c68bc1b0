"""Clips, markers and tracks without a network."""

from __future__ import annotations

import time
from pathlib import Path

import av
import pytest

from media.clip import Clip, ClipSpec, EncodedPacket, load_clip
from media.marker import MARKER_HEIGHT, Marker, draw_marker, read_marker
from media.pattern import TestPattern
from media.tracks import EncodedAudioTrack, EncodedVideoTrack


def decode(codec: str, packets: list[EncodedPacket]) -> list[av.VideoFrame]:
    decoder = av.CodecContext.create(codec, "r")
    frames: list[av.VideoFrame] = []
    for p in packets:
        frames.extend(decoder.decode(av.Packet(p.data)))
    return frames


def marker_of(frame: av.VideoFrame) -> Marker | None:
    plane = frame.planes[0]
    return read_marker(memoryview(plane), plane.line_size, frame.width)


def test_marker_round_trip_and_rejects_corruption() -> None:
    width = 640
    luma = bytearray(width * MARKER_HEIGHT)
    marker = Marker(index=1234, frame_count=3000, publisher_id=7)
    draw_marker(luma, width, marker)
    assert read_marker(luma, width, width) == marker
    luma[width * 8 + 20] = luma[width * 8 + 19] = 255 - luma[width * 8 + 20]
    luma[width * 7 + 20] = luma[width * 7 + 19] = luma[width * 8 + 20]
    assert read_marker(luma, width, width) is None
    assert read_marker(bytes(width * MARKER_HEIGHT), width, width) is None


def test_pattern_differs_per_publisher() -> None:
    a = TestPattern(640, 480, 0, 30).frame(5)
    b = TestPattern(640, 480, 1, 30).frame(5)
    assert a[1] != b[1]  # box colour
    assert len(a[0]) == 640 * 480 and len(a[1]) == 320 * 240


def test_clip_is_cached_and_decodes(tmp_path: Path, clip: Clip) -> None:
    spec = ClipSpec(publisher_id=2, seconds=0.5)
    first = load_clip(spec, tmp_path)
    started = time.perf_counter()
    again = load_clip(spec, tmp_path)
    assert time.perf_counter() - started < 0.5
    assert again == first
    assert len(first.video) == 15 and len(first.audio) == 25
    assert first.video[0].keyframe and not any(p.keyframe for p in first.video[1:])
    assert all(p.keyframe for p in first.video_intra)

    # The session clip: ~800 kbps, and every frame shows its own marker.
    assert 600_000 < clip.video_bitrate < 1_000_000
    frames = decode("vp8", list(clip.video))
    assert [marker_of(f) for f in frames] == [
        Marker(index=i, frame_count=120, publisher_id=1) for i in range(120)
    ]


def test_intra_frame_spliced_into_stream_stays_decodable(clip: Clip) -> None:
    """What a keyframe request does: intra version of frame k, then the normal stream."""
    stream = [*clip.video[:40], clip.video_intra[40], *clip.video[41:]]
    frames = decode("vp8", stream)
    assert [m.index if (m := marker_of(f)) else None for f in frames] == list(range(120))
    # A receiver joining at the spliced keyframe decodes everything after it.
    assert len(decode("vp8", stream[40:])) == 80


def test_h264_clip(tmp_path: Path) -> None:
    h264 = load_clip(ClipSpec(publisher_id=3, seconds=1.0, codec="h264"), tmp_path)
    stream = [*h264.video[:10], h264.video_intra[10], *h264.video[11:]]
    frames = decode("h264", stream)
    assert [m.index if (m := marker_of(f)) else None for f in frames] == list(range(30))
    assert len(decode("h264", stream[10:])) == 20


async def test_tracks_pace_and_loop_with_increasing_pts() -> None:
    short = load_clip(ClipSpec(publisher_id=4, seconds=0.2))  # 6 frames, 10 audio packets
    video, audio = EncodedVideoTrack(short), EncodedAudioTrack(short)
    started = time.monotonic()
    packets = [await video.recv() for _ in range(15)]
    elapsed = time.monotonic() - started
    assert 14 / 30 - 0.05 < elapsed < 14 / 30 + 0.3
    assert [p.pts for p in packets] == list(range(15))
    assert [p.is_keyframe for p in packets].count(True) == 3  # start of each loop
    audio_pts = [(await audio.recv()).pts for _ in range(12)]
    assert audio_pts == [i * 960 for i in range(12)]
    assert video.frames_sent == 15 and audio.frames_sent == 12

    video.request_keyframe()
    video.request_keyframe()
    packet = await video.recv()  # frame index 3 of the clip, normally not a keyframe
    assert packet.is_keyframe and bytes(packet) == short.video_intra[3].data
    assert (video.keyframe_requests, video.intra_frames_sent) == (2, 1)
    assert not (await video.recv()).is_keyframe
    video.stop()
    audio.stop()


@pytest.mark.parametrize("bad", [ClipSpec(width=100), ClipSpec(width=650)])
def test_bad_sizes_are_rejected(bad: ClipSpec, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_clip(bad, tmp_path)
