"""Picture sizes from RTP payloads (the SFU learns each simulcast layer's size from them): VP8
keyframe headers (RFC 6386 section 9.1) and H.264 sequence parameter sets. The packets come
from real encoders (libvpx and libx264 through PyAV) packetized by aiortc, so the parsers are
checked against what publishers send, at sizes that need the SPS's cropping."""

from __future__ import annotations

from fractions import Fraction

import av
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder

from sfu.forward import Counters, UpTrack
from sfu.h264 import payload_size
from sfu.vp8 import frame_size, keyframe_size


def _encoded(codec: str, width: int, height: int, frames: int = 3) -> list[av.Packet]:
    """``frames`` frames of a gradient at ``width`` x ``height``, the first a keyframe."""
    ctx = av.CodecContext.create("libvpx" if codec == "vp8" else "libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
    ctx.time_base = Fraction(1, 30)
    ctx.options = {"g": "100"} if codec == "vp8" else {"g": "100", "preset": "ultrafast"}
    out: list[av.Packet] = []
    for i in range(frames):
        frame = av.VideoFrame(width, height, "yuv420p")
        ramp = bytes((x + 7 * i) & 0xFF for x in range(256))  # moves a little each frame
        for plane in frame.planes:
            n = plane.buffer_size
            plane.update(ramp * (n // 256) + ramp[: n % 256])
        frame.pts = i
        out.extend(ctx.encode(frame))
    out.extend(ctx.encode(None))
    return out


def _payloads(codec: str, packet: av.Packet) -> list[bytes]:
    enc = Vp8Encoder() if codec == "vp8" else H264Encoder()
    packet.time_base = Fraction(1, 30)
    payloads, _ = enc.pack(packet)
    return payloads


@pytest.mark.parametrize("size", [(640, 480), (320, 180), (1280, 720), (90, 58)])
def test_vp8_keyframe_size_from_real_packets(size: tuple[int, int]) -> None:
    packets = _encoded("vp8", *size)
    assert packets[0].is_keyframe and not packets[1].is_keyframe
    key = _payloads("vp8", packets[0])
    assert keyframe_size(key[0]) == size
    assert all(keyframe_size(p) is None for p in key[1:])  # not a frame's first packet
    assert all(keyframe_size(p) is None for p in _payloads("vp8", packets[1]))  # delta frame
    assert frame_size(bytes(packets[0])) == size


def test_vp8_keyframe_size_of_broken_payloads() -> None:
    header = b"\x10\x02\x00\x9d\x01\x2a\x80\x02\xe0\x01"  # 640 x 480, P bit 0
    assert keyframe_size(b"\x10" + header) == (640, 480)
    assert keyframe_size(b"\x10" + header[:-1]) is None  # cut
    assert keyframe_size(b"\x10" + header[:3] + b"\x00\x00\x00" + header[6:]) is None  # no code
    assert keyframe_size(b"\x90\x80") is None  # descriptor cut in the picture id
    assert keyframe_size(b"\x00" + header) is None  # not the start of a partition
    assert keyframe_size(b"") is None
    # The 2 scaling bits above each 14-bit side are not part of the size.
    assert keyframe_size(b"\x10" + header[:6] + b"\x80\xc2\xe0\x41") == (640, 480)


@pytest.mark.parametrize("size", [(640, 480), (320, 180), (1280, 720), (90, 58)])
def test_h264_sps_size_from_real_packets(size: tuple[int, int]) -> None:
    packets = _encoded("h264", *size)
    key = _payloads("h264", packets[0])
    sizes = [payload_size(p) for p in key]
    assert size in sizes  # the SPS (a STAP-A with the PPS, as aiortc sends it)
    assert {s for s in sizes if s is not None} == {size}
    assert all(payload_size(p) is None for p in _payloads("h264", packets[1]))


def test_h264_sps_alone_and_broken() -> None:
    packets = _encoded("h264", 320, 180)
    sps = next(
        n for n in bytes(packets[0]).split(b"\x00\x00\x01") if n and n[0] & 0x1F == 7
    ).rstrip(b"\x00")
    assert payload_size(sps) == (320, 180)  # a single NAL unit packet
    assert payload_size(sps[:4]) is None  # cut
    stap = b"\x18" + len(sps).to_bytes(2, "big") + sps
    assert payload_size(stap) == (320, 180)
    assert payload_size(b"\x18" + (len(sps) + 5).to_bytes(2, "big") + sps) is None  # cut unit
    assert payload_size(b"") is None
    assert payload_size(b"\x65\x88") is None  # an IDR slice, no SPS


@pytest.mark.parametrize("codec", ["vp8", "h264"])
def test_up_track_learns_each_layers_size(codec: str) -> None:
    up = UpTrack("p:1", "p", "video", "camera", codec, lambda: None, Counters(), layers=2)
    assert up.layer_sizes == [(0, 0), (0, 0)]
    for layer, size in ((0, (320, 180)), (1, (640, 360))):
        packets = _encoded(codec, *size, frames=2)
        for n, packet in enumerate(packets):
            for seq, payload in enumerate(_payloads(codec, packet)):
                up.forward_layer(layer, 100 * n + seq, 3000 * n, False, payload, 0)
    assert up.layer_sizes == [(320, 180), (640, 360)]
    # A later keyframe of another size (the encoder adapted) replaces it.
    for seq, payload in enumerate(_payloads(codec, _encoded(codec, 480, 270, frames=1)[0])):
        up.forward_layer(1, 500 + seq, 9000, False, payload, 0)
    assert up.layer_sizes == [(320, 180), (480, 270)]
