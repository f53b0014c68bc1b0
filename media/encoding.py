"""Encode a test clip with PyAV (libvpx, libx264, libopus): no ffmpeg binary needed.

Produces, for one :class:`~media.clip.ClipSpec`, the normal video stream (one keyframe at
the start of the clip, so a looping clip restarts cleanly), an all-intra version of the
same frames (every frame a keyframe) that a publisher splices in to answer a keyframe
request, and Opus audio in 20 ms frames.
"""

from __future__ import annotations

import fractions
import math
from collections.abc import Iterator

import av

from media.clipspec import AUDIO_FRAME_SAMPLES, AUDIO_RATE, BEEP_SAMPLES, ClipSpec, EncodedPacket
from media.pattern import TestPattern
from signaling.sdk.simulcast import vp8_context

AUDIO_BITRATE = 64000
INTRA_BITRATE_FACTOR = 4  # keyframes are typically 4-8x an inter frame in WebRTC


def tone_frequency(publisher_id: int) -> float:
    """Frequency of the test tone of a publisher: 330 Hz, 440 Hz, ... (a step per id, mod 8)."""
    return 330.0 + 110.0 * (publisher_id % 8)


def _vp8_context(spec: ClipSpec, *, intra: bool) -> av.VideoCodecContext:
    # aiortc's own settings plus error resilience (signaling.sdk.simulcast.vp8_context).
    bitrate = spec.video_bitrate * (INTRA_BITRATE_FACTOR if intra else 1)
    return vp8_context(spec.width, spec.height, spec.fps, bitrate, gop=1 if intra else 100_000)


def _h264_context(spec: ClipSpec) -> av.VideoCodecContext:
    # Constrained baseline (what aiortc and browsers negotiate with packetization-mode 1),
    # SPS/PPS before every IDR. The intra version uses the very same settings (so the SPS
    # and PPS are identical) and forces every frame to an IDR.
    kbps = spec.video_bitrate // 1000
    cc = av.CodecContext.create("libx264", "w")
    cc.width, cc.height, cc.pix_fmt = spec.width, spec.height, "yuv420p"
    cc.time_base = fractions.Fraction(1, spec.fps)
    cc.framerate = fractions.Fraction(spec.fps)
    cc.bit_rate = spec.video_bitrate
    cc.thread_count = 2
    cc.options = {
        "preset": "veryfast",
        "tune": "zerolatency",
        "profile": "baseline",
        "forced-idr": "1",
        "x264-params": (
            f"repeat-headers=1:keyint=100000:min-keyint=100000:scenecut=0"
            f":vbv-maxrate={kbps}:vbv-bufsize={kbps}"
        ),
    }
    return cc


def encode_video(spec: ClipSpec, *, intra: bool) -> list[EncodedPacket]:
    """Encode every frame of the clip; ``intra=True`` makes every frame a keyframe."""
    if spec.codec == "vp8":
        cc = _vp8_context(spec, intra=intra)
    else:
        cc = _h264_context(spec)
    pattern = TestPattern(spec.width, spec.height, spec.publisher_id, spec.frame_count)
    out: list[EncodedPacket] = []

    def collect(packets: list[av.Packet]) -> None:
        for packet in packets:
            out.append(EncodedPacket(data=bytes(packet), pts=len(out), keyframe=packet.is_keyframe))

    for index in range(spec.frame_count):
        frame = av.VideoFrame(spec.width, spec.height, "yuv420p")
        for plane, data in zip(frame.planes, pattern.frame(index), strict=True):
            plane.update(data)
        frame.pts = index
        frame.time_base = cc.time_base
        if intra or index == 0:
            frame.pict_type = av.video.frame.PictureType.I
        collect(cc.encode(frame))
    collect(cc.encode(None))
    if len(out) != spec.frame_count:
        raise RuntimeError(f"encoder returned {len(out)} packets for {spec.frame_count} frames")
    if not out[0].keyframe or (intra and not all(p.keyframe for p in out)):
        raise RuntimeError("encoder did not produce the keyframes asked for")
    return out


def _tone_frames(spec: ClipSpec) -> Iterator[av.AudioFrame]:
    frequency = tone_frequency(spec.publisher_id)
    total = spec.audio_frame_count * AUDIO_FRAME_SAMPLES
    beeps = spec.audio == "beeps"
    for start in range(0, total, AUDIO_FRAME_SAMPLES):
        samples = bytearray()
        for n in range(start, start + AUDIO_FRAME_SAMPLES):
            if beeps and n % AUDIO_RATE >= BEEP_SAMPLES:
                samples += b"\0\0\0\0"
                continue
            value = int(8000 * math.sin(2 * math.pi * frequency * n / AUDIO_RATE))
            pair = value.to_bytes(2, "little", signed=True)
            samples += pair + pair  # stereo
        frame = av.AudioFrame(format="s16", layout="stereo", samples=AUDIO_FRAME_SAMPLES)
        frame.planes[0].update(bytes(samples))
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = fractions.Fraction(1, AUDIO_RATE)
        yield frame


def encode_audio(spec: ClipSpec) -> list[EncodedPacket]:
    """Encode the clip's tone as Opus, one packet per 20 ms."""
    cc = av.CodecContext.create("libopus", "w")
    cc.format = "s16"
    cc.layout = "stereo"
    cc.sample_rate = AUDIO_RATE
    cc.bit_rate = AUDIO_BITRATE
    cc.time_base = fractions.Fraction(1, AUDIO_RATE)
    cc.options = {"application": "voip", "frame_duration": "20"}
    payloads: list[bytes] = []
    for frame in _tone_frames(spec):
        payloads.extend(bytes(p) for p in cc.encode(frame))
    payloads.extend(bytes(p) for p in cc.encode(None))
    # The encoder's look-ahead can add a packet at the end; keep exactly one per 20 ms.
    payloads = payloads[: spec.audio_frame_count]
    if len(payloads) != spec.audio_frame_count:
        raise RuntimeError("opus encoder returned too few packets")
    return [
        EncodedPacket(data=data, pts=i * AUDIO_FRAME_SAMPLES, keyframe=True)
        for i, data in enumerate(payloads)
    ]
