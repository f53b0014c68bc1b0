"""The pure parts of recording (sfu/recording): depacketizing, reordering, loss, the clock.

Packets are made by aiortc's own packetizers from the project's pre-encoded clips, so the
depacketizer is checked against what publishers really send."""

from __future__ import annotations

import random
from fractions import Fraction

import av
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder

from media.clip import Clip, ClipSpec, load_clip
from sfu.h264 import sps_size as h264_size
from sfu.recording.assembler import FrameAssembler, Packet, unwrap
from sfu.recording.clock import PublisherClock, TrackClock
from sfu.recording.depacketize import H264Depacketizer, opus_lost, opus_samples, vp8_frame
from sfu.rtp import NTP_EPOCH_OFFSET
from sfu.vp8 import frame_size as vp8_size

SEQ0 = 65_500  # sequence numbers wrap after 36 packets
TS0 = (1 << 32) - 9000  # timestamps wrap after 3 frames


@pytest.fixture(scope="module")
def vp8() -> Clip:
    return load_clip(ClipSpec(publisher_id=3, seconds=2.0, codec="vp8"))


@pytest.fixture(scope="module")
def h264() -> Clip:
    return load_clip(ClipSpec(publisher_id=3, seconds=2.0, codec="h264"))


def packetize(clip: Clip, intra_at: int | None = None) -> list[list[bytes]]:
    """Each frame's RTP payloads, as aiortc's packetizer makes them (one frame from the
    all-intra copy at ``intra_at``: a keyframe in the middle, as after a PLI)."""
    enc = Vp8Encoder() if clip.spec.codec == "vp8" else H264Encoder()
    out = []
    for i, p in enumerate(clip.video):
        src = clip.video_intra[i] if i == intra_at else p
        packet = av.Packet(src.data)
        packet.pts = i
        packet.time_base = Fraction(1, 30)
        payloads, _ = enc.pack(packet)
        out.append(payloads)
    return out


def rtp(frames: list[list[bytes]], dt: float = 0.001) -> list[Packet]:
    """RTP packets (seq, ts, marker, payload, arrival) of those frames, wrapping seq and ts."""
    out: list[Packet] = []
    for f, payloads in enumerate(frames):
        for k, payload in enumerate(payloads):
            n = len(out)
            out.append(
                (
                    (SEQ0 + n) & 0xFFFF,
                    (TS0 + 3000 * f) & 0xFFFFFFFF,
                    k == len(payloads) - 1,
                    payload,
                    n * dt,
                )
            )
    return out


# -- depacketizing ---------------------------------------------------------------------------


def test_vp8_frames_come_back_byte_for_byte(vp8: Clip) -> None:
    for i, payloads in enumerate(packetize(vp8)):
        data, key = vp8_frame(payloads)
        assert data == vp8.video[i].data
        assert key == vp8.video[i].keyframe
    assert vp8_size(vp8.video[0].data) == (640, 480)
    assert vp8_size(vp8.video[1].data) is None  # not a keyframe


def test_h264_access_units_come_back_as_annex_b(h264: Clip) -> None:
    d = H264Depacketizer()
    frames = packetize(h264)
    assert any(len(p) > 1 for p in frames)  # some frames are fragmented (FU-A)
    for i, payloads in enumerate(frames):
        data, key = d.frame(payloads)
        # Same NAL units as the encoder's Annex B output (start codes may differ in length).
        want = [n for n in h264.video[i].data.split(b"\x00\x00\x01") if n]
        got = [n for n in data.split(b"\x00\x00\x01") if n]
        assert [n.rstrip(b"\x00") for n in got] == [n.rstrip(b"\x00") for n in want]
        assert key == h264.video[i].keyframe
    assert d.sps is not None and h264_size(d.sps) == (640, 480)


def test_h264_keyframe_without_parameter_sets_gets_them(h264: Clip) -> None:
    d = H264Depacketizer()
    frames = packetize(h264)
    d.frame(frames[0])  # has SPS/PPS
    idr_only = [p for p in frames[0] if p[0] & 0x1F != 24]  # drop the STAP-A with SPS/PPS
    assert idr_only and len(idr_only) < len(frames[0])
    data, key = d.frame(idr_only)
    assert key and data.startswith(b"\x00\x00\x00\x01" + d.sps)  # type: ignore[operator]


def test_both_decode(vp8: Clip, h264: Clip) -> None:
    """Depacketized frames decode (the decoder is the judge of a valid bitstream)."""
    for clip in (vp8, h264):
        ctx = av.CodecContext.create(clip.spec.codec, "r")
        d = H264Depacketizer()
        n = 0
        for payloads in packetize(clip):
            data = vp8_frame(payloads)[0] if clip.spec.codec == "vp8" else d.frame(payloads)[0]
            n += len(ctx.decode(av.Packet(data)))
        n += len(ctx.decode(None))
        assert n == len(clip.video)


# -- the assembler ---------------------------------------------------------------------------


class Requests:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


def test_reordered_packets_across_wraparound_give_every_frame(vp8: Clip) -> None:
    packets = rtp(packetize(vp8))
    rng = random.Random(7)
    shuffled = []
    for i in range(0, len(packets), 8):  # shuffle within windows of 8 packets
        chunk = packets[i : i + 8]
        rng.shuffle(chunk)
        shuffled.extend(chunk)
    shuffled.insert(40, packets[10])  # a duplicate (a late repair of a packet already there)
    req = Requests()
    a = FrameAssembler("vp8", req)
    frames = []
    for i in range(0, len(shuffled), 20):  # batches, as the room's tick hands them over
        for p in shuffled[i : i + 20]:
            a.push(p)
        frames += a.pop(shuffled[min(i + 19, len(shuffled) - 1)][4])
    frames += a.pop(10.0, final=True)
    assert [f.data for f in frames] == [p.data for p in vp8.video]
    assert [f.ts - frames[0].ts for f in frames] == [3000 * i for i in range(len(frames))]
    assert frames[0].ts == TS0 and frames[-1].ts > 1 << 32  # unwrapped
    assert a.stats.lost_packets == 0 and a.stats.duplicates == 1
    assert req.n == 1  # asked for a keyframe once, at the start


def test_a_late_repair_within_the_deadline_fills_the_gap(vp8: Clip) -> None:
    packets = rtp(packetize(vp8), dt=0.01)
    late = packets.pop(30)
    a = FrameAssembler("vp8", Requests(), deadline=0.4)
    for p in packets[:60]:
        a.push(p)
    out = a.pop(packets[59][4])
    assert len(out) < 10  # held back at the gap
    a.push((*late[:4], packets[59][4]))  # the RTX repair arrives 0.3 s later
    for p in packets[60:]:
        a.push(p)
    out += a.pop(100.0, final=True)
    assert [f.data for f in out] == [p.data for p in vp8.video]
    assert a.stats.lost_packets == 0


def test_loss_waits_for_the_next_keyframe_and_asks_for_it(vp8: Clip) -> None:
    frames = packetize(vp8, intra_at=30)
    packets = rtp(frames, dt=0.01)
    first_of_20 = sum(len(f) for f in frames[:20])
    lost_seq = packets[first_of_20 + 1][0]  # inside frame 20 (or the first of frame 21)
    req = Requests()
    a = FrameAssembler("vp8", req, deadline=0.4, keyframe_interval=1.0)
    out = []
    for p in packets:
        if p[0] != lost_seq:
            a.push(p)
        out += a.pop(p[4])
    out += a.pop(100.0, final=True)
    indices = [vp8.video.index(next(c for c in vp8.video if c.data == f.data)) for f in out[:20]]
    assert indices == list(range(20))
    # After the loss: nothing until the keyframe at 30, then every frame.
    assert out[20].keyframe and out[20].data == vp8.video_intra[30].data
    assert [f.data for f in out[21:]] == [p.data for p in vp8.video[31:]]
    assert a.stats.lost_packets == 1
    assert req.n == 2  # at the start, and after the loss (once: the next came within 1 s)
    assert not a.waiting


def test_opus_skips_a_lost_packet_after_the_deadline() -> None:
    packets: list[Packet] = [
        ((65530 + i) & 0xFFFF, (TS0 + 960 * i) & 0xFFFFFFFF, False, bytes([i]), i * 0.02)
        for i in range(50)
    ]
    del packets[10]
    a = FrameAssembler("opus", Requests(), deadline=0.1)
    for p in packets[:20]:
        a.push(p)
    assert len(a.pop(packets[19][4] - 0.15)) == 10  # before the deadline: up to the gap
    out = a.pop(packets[19][4])
    assert [f.data[0] for f in out] == list(range(11, 21))
    assert a.stats.lost_packets == 1


def test_unwrap() -> None:
    assert unwrap(2, 65534, 16) == 65538
    assert unwrap(65534, 65538, 16) == 65534
    assert unwrap(5, (1 << 32) + 10, 32) == (1 << 32) + 5


# -- the clock -------------------------------------------------------------------------------


def ntp(t: float) -> int:
    return int((t + NTP_EPOCH_OFFSET) * (1 << 32))


def test_clock_maps_through_sender_reports_with_the_smallest_offset() -> None:
    pub = PublisherClock()
    video = TrackClock(90000, pub)
    audio = TrackClock(48000, pub)
    video.anchor(1000, 500.0)
    assert video.to_server(1000 + 90000) == pytest.approx(501.0)  # arrival-based before SRs
    assert not video.synced
    # The publisher's clock is 100 s behind the server's; reports arrive 5-40 ms late.
    video.sender_report(ntp(400.0), (1 << 32) - 45000, 500.040)
    audio.sender_report(ntp(400.2), 7000, 500.205)
    video.sender_report(ntp(401.0), 45000, 501.010)
    assert pub.offset == pytest.approx(100.005, abs=1e-6)
    assert video.synced
    # RTP timestamp 45000 + 9000 (wrapped past 2**32 since the first report) is 0.1 s later.
    assert video.to_server((1 << 32) + 54000) == pytest.approx(401.1 + 100.005, abs=1e-6)
    assert audio.to_server(7000 + 4800) == pytest.approx(400.3 + 100.005, abs=1e-6)


def test_opus_durations_and_concealment_packets() -> None:
    clip_audio = load_clip(ClipSpec(publisher_id=3, seconds=2.0)).audio
    assert {opus_samples(p.data) for p in clip_audio} == {960}
    assert opus_samples(bytes((0b01111_000,))) == 960  # hybrid FB 20 ms, one frame
    assert opus_samples(bytes((0b00011_001, 0))) == 2 * 2880  # SILK 60 ms, two frames
    assert opus_samples(bytes((0b11100_011, 3))) == 3 * 120  # CELT 2.5 ms, three frames
    lost = opus_lost(clip_audio[5].data)
    assert len(lost) == 1 and opus_samples(lost) == 960
    # A decoder takes it as a lost frame and conceals it: 20 ms of samples.
    ctx = av.CodecContext.create("opus", "r")
    ctx.decode(av.Packet(clip_audio[0].data))
    (frame,) = ctx.decode(av.Packet(lost))
    assert frame.samples == 960
