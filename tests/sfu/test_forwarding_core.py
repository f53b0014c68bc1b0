"""The SFU's pure cores: header rewriting, keyframes, packet cache, speakers, bandwidth."""

from __future__ import annotations

import itertools
import random
import struct

from sfu.bandwidth import BandwidthAllocator
from sfu.forward import Counters, DownTrack, UpTrack
from sfu.munger import LayerMunger
from sfu.packetcache import PacketCache
from sfu.recording.tap import TrackTap
from sfu.rtp import ExtensionLayout, build, h264_keyframe, seq_newer, vp8_keyframe
from sfu.speaker import SpeakerDetector


def parse(data: bytes) -> dict[str, object]:
    b0, b1, seq, ts, ssrc = struct.unpack_from("!BBHII", data)
    out: dict[str, object] = {
        "marker": bool(b1 & 0x80),
        "pt": b1 & 0x7F,
        "seq": seq,
        "ts": ts,
        "ssrc": ssrc,
        "ext": {},
    }
    i = 12
    if b0 & 0x10:
        profile, words = struct.unpack_from("!HH", data, i)
        assert profile == 0xBEDE
        end = i + 4 + words * 4
        j = i + 4
        ext: dict[int, bytes] = {}
        while j < end:
            if data[j] == 0:
                j += 1
                continue
            xid, n = data[j] >> 4, (data[j] & 0x0F) + 1
            ext[xid] = data[j + 1 : j + 1 + n]
            j += 1 + n
        out["ext"] = ext
        i = end
    out["payload"] = data[i:]
    return out


def test_extension_layout_and_build() -> None:
    layout = ExtensionLayout(mid_id=1, mid="3", abs_id=2, level_id=3, audio=True)
    shared = layout.shared(0x123456, 40)
    data = build(111 | 0x80, 65535, 0xFFFFFFFF, 0xDEADBEEF, layout.head, shared, b"opus")
    p = parse(data)
    assert p["marker"] is True and p["pt"] == 111 and p["seq"] == 65535
    assert p["ts"] == 0xFFFFFFFF and p["ssrc"] == 0xDEADBEEF and p["payload"] == b"opus"
    assert p["ext"] == {1: b"3", 2: bytes.fromhex("123456"), 3: bytes([40])}
    bare = ExtensionLayout(None, None, None, None, audio=False)
    data = build(96, 1, 2, 3, bare.head, bare.shared(5, None), b"x")
    assert data[0] == 0x80 and parse(data)["payload"] == b"x"


def test_keyframe_detection() -> None:
    # VP8 descriptor: X=1,S=1,PID=0; I=1 with a 15-bit picture id; then the payload header.
    key = bytes([0x90, 0x80, 0x81, 0x23]) + bytes([0x00]) + b"frame"
    delta = bytes([0x90, 0x80, 0x81, 0x23]) + bytes([0x01]) + b"frame"
    middle = bytes([0x80, 0x80, 0x81, 0x23]) + bytes([0x00]) + b"frame"  # S=0
    assert vp8_keyframe(key) and not vp8_keyframe(delta) and not vp8_keyframe(middle)
    assert not vp8_keyframe(b"") and not vp8_keyframe(bytes([0x90, 0x80]))
    assert h264_keyframe(bytes([0x65, 1, 2]))  # IDR
    assert h264_keyframe(bytes([0x67, 1]))  # SPS
    assert not h264_keyframe(bytes([0x41, 1]))  # non-IDR slice
    assert h264_keyframe(bytes([0x78, 0, 2, 0x67, 0, 0, 2, 0x68, 0]))  # STAP-A with SPS
    assert h264_keyframe(bytes([0x7C, 0x85, 0]))  # FU-A start of IDR
    assert not h264_keyframe(bytes([0x7C, 0x05, 0]))  # FU-A continuation


def test_seq_arithmetic_and_cache() -> None:
    assert seq_newer(1, 65535) and not seq_newer(65535, 1) and not seq_newer(5, 5)
    cache = PacketCache(8)
    for s in range(65530, 65536):
        cache.add(s, s * 10, False, bytes([s & 0xFF]))
    cache.add(0, 0, True, b"z")
    assert cache.get(65535) is not None and cache.get(0) is not None
    cache.add(8, 80, False, b"y")  # same slot as 0: evicts it
    assert cache.get(0) is None and cache.get(8) is not None and cache.get(9) is None


class Sink:
    def __init__(self) -> None:
        self.packets: list[dict[str, object]] = []

    def __call__(self, data: bytes) -> None:
        self.packets.append(parse(data))


def _video_track() -> tuple[UpTrack, list[str]]:
    asked: list[str] = []
    up = UpTrack("p:0", "p", "video", "camera", "vp8", lambda: asked.append("pli"), Counters())
    return up, asked


KEY = bytes([0x90, 0x80, 0x81, 0x23, 0x00]) + b"k"
DELTA = bytes([0x90, 0x80, 0x81, 0x23, 0x01]) + b"d"


def test_downtrack_starts_at_keyframe_and_stays_gap_free() -> None:
    up, asked = _video_track()
    sink = Sink()
    layout = ExtensionLayout(1, "0", 2, None, audio=False)
    dt = DownTrack(
        "s", "video", 1111, 96, layout, sink, rtx_ssrc=2222, rtx_pt=97, rng=random.Random(1)
    )
    up.downtracks["s"] = dt
    up.forward(100, 9000, False, DELTA, 1, None)  # no keyframe yet: nothing sent
    assert sink.packets == []
    up.forward(101, 12000, True, KEY, 1, None)
    up.forward(102, 15000, True, DELTA, 1, None)
    first, second = sink.packets
    assert second["seq"] == (first["seq"] + 1) & 0xFFFF  # type: ignore[operator]
    assert first["ssrc"] == 1111 and first["pt"] == 96 and first["ext"][1] == b"0"  # type: ignore[index]
    assert (second["ts"] - first["ts"]) & 0xFFFFFFFF == 3000  # type: ignore[operator]
    # Pause drops packets; resuming waits for a keyframe and continues the sequence.
    dt.paused = True
    up.forward(103, 18000, True, DELTA, 1, None)
    dt.paused = False
    dt.waiting = True
    up.forward(104, 21000, True, DELTA, 1, None)
    up.forward(105, 24000, True, KEY, 1, None)
    third = sink.packets[-1]
    assert len(sink.packets) == 3 and third["seq"] == (second["seq"] + 1) & 0xFFFF  # type: ignore[operator]
    assert up.want_keyframe(0.0) and not up.want_keyframe(0.1) and up.want_keyframe(0.6)
    assert asked == ["pli", "pli"]


def test_nack_answered_from_cache_as_rtx_else_upstream() -> None:
    up, _ = _video_track()
    sink = Sink()
    dt = DownTrack(
        "s",
        "video",
        1111,
        96,
        ExtensionLayout(None, None, None, None, False),
        sink,
        rtx_ssrc=2222,
        rtx_pt=97,
        rng=random.Random(2),
    )
    up.downtracks["s"] = dt
    for seq, payload in ((10, KEY), (11, DELTA), (12, DELTA)):
        up.forward(seq, seq * 3000, True, payload, 0, None)
    out11 = sink.packets[1]
    missing = up.retransmit(dt, [out11["seq"], (out11["seq"] + 5) & 0xFFFF], 0, now=10.0)  # type: ignore[operator]
    rtx = sink.packets[-1]
    assert rtx["ssrc"] == 2222 and rtx["pt"] == 97 and rtx["ts"] == out11["ts"]
    assert rtx["payload"] == struct.pack("!H", out11["seq"]) + DELTA  # type: ignore[operator]
    assert missing == [16]  # not in the cache: NACK the publisher for its own seq
    sent = len(sink.packets)
    up.retransmit(dt, [out11["seq"]], 0, now=10.05)  # type: ignore[list-item]
    assert len(sink.packets) == sent  # the same packet is not resent within 100 ms
    up.retransmit(dt, [out11["seq"]], 0, now=10.2)  # type: ignore[list-item]
    assert len(sink.packets) == sent + 1


def test_audio_levels_and_active_speaker() -> None:
    det = SpeakerDetector(threshold_dbov=50, hold_s=0.4)
    for _ in range(10):
        det.add("alice", 20)
        det.add("bob", 90)
    assert det.tick(0.0) is None  # alice is loud but not yet for hold_s
    det.add("alice", 25)
    assert det.tick(0.5) == ["alice"]
    det.add("alice", 30)
    det.add("bob", 10)
    assert det.tick(0.8) is None  # bob just started
    det.add("alice", 30)
    det.add("bob", 10)
    assert det.tick(1.3) == ["bob", "alice"]
    assert det.tick(1.6) == []  # silence


def test_bandwidth_loses_video_before_audio() -> None:
    alloc = BandwidthAllocator(min_video_bps=120_000, resume_bps=200_000)
    assert alloc.report("a", 900_000) is None
    assert alloc.report("b", 500_000) is None
    assert alloc.target() == 500_000
    assert alloc.report("b", 50_000) is True  # b loses video; a's video is not dragged down
    assert alloc.target() == 900_000
    assert alloc.report("b", 150_000) is None  # hysteresis
    assert alloc.report("b", 250_000) is False
    assert alloc.target() == 250_000
    alloc.remove("b")
    assert alloc.target() == 900_000


def test_cache_knows_its_newest_packet_across_wraparound() -> None:
    cache = PacketCache(8)
    assert cache.newest == -1
    for s in (65534, 65535, 0, 1):
        cache.add(s, s, False, b"x")
    cache.add(65535, 65535, False, b"x")  # late (a retransmission): not the newest
    assert cache.newest == 1


MIDDLE = bytes([0x80, 0x80, 0x81, 0x23, 0x00]) + b"k2"  # the keyframe's second packet (S=0)


def _subscriber(sink: Sink) -> DownTrack:
    layout = ExtensionLayout(1, "0", 2, None, audio=False)
    return DownTrack("s", "video", 1111, 96, layout, sink, rng=random.Random(2))


def test_new_subscriber_starts_from_a_recent_cached_keyframe() -> None:
    up, asked = _video_track()
    up.forward(65533, 0, True, DELTA, 1, None)
    up.forward(65534, 3000, False, KEY, 1, None)  # a keyframe of two packets
    up.forward(65535, 3000, True, MIDDLE, 1, None)
    up.forward(0, 6000, True, DELTA, 1, None)
    sink = Sink()
    dt = _subscriber(sink)
    assert up.replay_keyframe(dt, 5)
    assert not dt.waiting and asked == [] and up.counters.keyframes_replayed == 1
    assert [p["payload"] for p in sink.packets] == [KEY, MIDDLE, DELTA]
    assert [p["marker"] for p in sink.packets] == [False, True, True]
    seqs = [p["seq"] for p in sink.packets]
    assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(3)]
    # Live forwarding continues the same sequence and timestamps.
    up.downtracks["s"] = dt
    up.forward(1, 9000, True, DELTA, 1, None)
    last = sink.packets[-1]
    assert last["seq"] == (seqs[0] + 3) & 0xFFFF
    assert (last["ts"] - sink.packets[0]["ts"]) & 0xFFFFFFFF == 6000  # type: ignore[operator]
    assert up.replay_keyframe(dt, 5) is False  # not waiting any more


def test_old_or_incomplete_cached_keyframe_is_not_replayed() -> None:
    up, _ = _video_track()
    up.forward(10, 0, True, KEY, 1, None)
    for i in range(1, 5):  # 133 ms of frames after the keyframe: too old
        up.forward(10 + i, i * 3000, True, DELTA, 1, None)
    sink = Sink()
    dt = _subscriber(sink)
    assert not up.replay_keyframe(dt, 5) and dt.waiting and sink.packets == []
    up.forward(20, 20000, True, KEY, 1, None)
    up.forward(22, 23000, True, DELTA, 1, None)  # 21 is missing: what follows cannot be decoded
    assert not up.replay_keyframe(dt, 5) and dt.waiting and sink.packets == []
    up.forward(21, 20000, True, DELTA, 1, None)  # it came late: now the run is complete
    assert up.replay_keyframe(dt, 5) and len(sink.packets) == 3
    empty, _ = _video_track()
    assert not empty.replay_keyframe(_subscriber(Sink()), 5)


def _vp8(pid: int, key: bool) -> bytes:
    """A VP8 packet starting a frame: descriptor with a 15-bit picture id, then the header."""
    return bytes((0x90, 0x80, 0x80 | (pid >> 8), pid & 0xFF, 0x10 if key else 0x11)) + b"x"


def test_simulcast_downtracks_get_one_layer_each_gap_free() -> None:
    asked: list[int] = []
    up = UpTrack("p:1", "p", "video", "camera", "vp8", lambda: None, Counters(), layers=2)
    up.request_layer_keyframe = asked.append
    assert up.cache is None  # the simulcast path keeps what it sent per subscriber instead
    low, high = Sink(), Sink()
    layout = ExtensionLayout(None, None, None, None, False)
    for name, sink in (("low", low), ("high", high)):
        dt = DownTrack(name, "video", 7, 96, layout, sink, rtx_ssrc=8, rtx_pt=97)
        up.make_simulcast(dt)
        up.downtracks[name] = dt
    lo, hi = up.downtracks["low"].munger, up.downtracks["high"].munger
    assert lo is not None and hi is not None
    lo.set_target(0)
    hi.set_target(1)
    # Sender reports of both layers (same wall clock, different RTP bases).
    ntp = 3_900_000_000 << 32
    up.layer_sender_report(0, ntp, 1000)
    up.layer_sender_report(1, ntp, 500_000)
    for n in range(4):  # layer 0 seq 10.., layer 1 seq 900..; keyframes first
        up.forward_layer(0, 10 + n, 1000 + 3000 * n, True, _vp8(100 + n, n == 0), 0)
        up.forward_layer(1, 900 + n, 500_000 + 3000 * n, True, _vp8(7000 + n, n == 0), 0)
    assert len(low.packets) == len(high.packets) == 4
    assert {p["payload"][5:] for p in high.packets} == {b"x"}  # type: ignore[index]
    # The high subscriber switches down: the next layer-0 keyframe, seq and ts continuous.
    hi.set_target(0)
    assert hi.want_keyframe == 0
    up.forward_layer(0, 14, 13000, True, _vp8(104, False), 0)  # not a keyframe: keeps layer 1
    up.forward_layer(1, 904, 512_000, True, _vp8(7004, False), 0)
    up.forward_layer(0, 15, 16000, True, _vp8(105, True), 0)
    up.forward_layer(1, 905, 515_000, True, _vp8(7005, False), 0)  # dropped now
    seqs = [p["seq"] for p in high.packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    assert len(seqs) == 6
    ts = [p["ts"] for p in high.packets]
    assert (ts[-1] - ts[-2]) & 0xFFFFFFFF == 3000  # 1/30 s after the last layer-1 frame
    # A NACK is answered with what was sent (as RTX), whatever layer it came from.
    dt = up.downtracks["high"]
    up.retransmit_sent(dt, [seqs[2]], 0, now=1.0)
    rtx = high.packets[-1]
    assert rtx["ssrc"] == 8 and rtx["payload"][:2] == struct.pack("!H", seqs[2])  # type: ignore[index]
    assert up.want_layer_keyframe(1, 0.0) and not up.want_layer_keyframe(1, 0.2)
    assert asked == [1]
    # Both on layer 0 now; the descriptor is parsed once for both, and only the switched
    # subscriber's picture ids are rewritten (they go on from its layer-1 ones).
    for n in (16, 17):
        up.forward_layer(0, n, 1000 + 3000 * (n - 10), True, _vp8(100 + n - 10, False), 0)
    pids = [struct.unpack_from("!H", p["payload"], 2)[0] & 0x7FFF for p in high.packets[-2:]]  # type: ignore[arg-type]
    assert pids == [7006, 7007]  # 7004 the last of layer 1, 7005 the switch's keyframe
    low_pids = [struct.unpack_from("!H", p["payload"], 2)[0] & 0x7FFF for p in low.packets[-2:]]  # type: ignore[arg-type]
    assert low_pids == [106, 107]
    assert all(p["payload"][5:] == b"x" for p in high.packets[-2:] + low.packets[-2:])  # type: ignore[index]
    # A cut descriptor (X set, no extension byte) goes to nobody.
    out = up.counters.packets_out
    up.forward_layer(0, 18, 25000, True, b"\x90", 0)
    assert up.counters.packets_out == out and len(low.packets) == 8


def test_recording_tap_gets_the_highest_layer_continuous() -> None:
    up = UpTrack("p:1", "p", "video", "camera", "vp8", lambda: None, Counters(), layers=2)
    up.tap = TrackTap(1)
    up.tap_munger = LayerMunger("vp8", 2)
    up.tap_munger.set_target(1)
    ntp = 3_900_000_000 << 32
    up.layer_sender_report(0, ntp, 0)
    up.layer_sender_report(1, ntp, 40_000)
    for n in range(3):
        up.forward_layer(0, 50 + n, 3000 * n, True, _vp8(10 + n, n == 0), 0)
        up.forward_layer(1, 700 + n, 40_000 + 3000 * n, True, _vp8(300 + n, n == 0), 0)
    packets = up.tap.packets
    assert len(packets) == 3  # the top layer only
    seqs = [p[0] for p in packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    assert [p[3][5:] for p in packets] == [b"x"] * 3
    # The report in the tap is the top layer's, in the tap's own timestamps.
    up.layer_sender_report(1, ntp + (1 << 32), 130_000)
    assert up.tap.reports[-1][1] == (packets[0][1] + 90_000) & 0xFFFFFFFF
