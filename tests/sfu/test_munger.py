"""The simulcast layer switcher: one continuous stream out of several layers."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest

from sfu.munger import LayerMunger
from sfu.vp8 import parse

RATE = 90000
FRAME = 3000  # 30 frames per second
NTP_1970 = 2208988800


def vp8_payload(pid: int, tl0: int, start: bool, key: bool, long_id: bool = True) -> bytes:
    """Descriptor with I, L and T (TID 0), then a VP8 payload header (P bit 0 for a keyframe)."""
    b0 = 0x80 | (0x10 if start else 0)
    pid_bytes = bytes((0x80 | (pid >> 8), pid & 0xFF)) if long_id else bytes((pid & 0x7F,))
    first = 0x10 if key else 0x11
    return bytes((b0, 0xE0)) + pid_bytes + bytes((tl0, 0x00, first, 0x02, 0x00))


@dataclass
class Out:
    layer: int
    wall: float
    seq: int
    ts: int
    payload: bytes


@dataclass
class Layer:
    """One simulcast encoding of a fake publisher: its own seq, timestamp and picture id spaces."""

    index: int
    rng: random.Random
    codec: str = "vp8"
    long_id: bool = True
    seq: int = 0
    ts_base: int = 0
    pid: int = 0
    tl0: int = 0
    key_due: int | None = None  # frame number of a keyframe asked for
    sent: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.rng
        self.seq = r.randrange(1 << 16)
        self.ts_base = r.randrange(1 << 32)
        self.pid = r.randrange(1 << 15 if self.long_id else 1 << 7)
        self.tl0 = r.randrange(256)

    def rtp_ts(self, wall: float) -> int:
        return (self.ts_base + round(wall * RATE)) & 0xFFFFFFFF

    def sender_report(self, wall: float) -> tuple[int, int]:
        return int((NTP_1970 + 1_000_000 + wall) * (1 << 32)), self.rtp_ts(wall)

    def frame(self, wall: float, key: bool) -> list[tuple[int, int, int, bytes]]:
        """The packets of one frame: (layer, seq, ts, payload); layer i has i + 1 packets."""
        ts = self.rtp_ts(wall)
        out = []
        for k in range(self.index + 1):
            if self.codec == "vp8":
                payload = vp8_payload(self.pid, self.tl0, k == 0, key, self.long_id)
            else:  # H.264: an IDR slice or a non-IDR one (single NAL units)
                payload = bytes((0x65 if key else 0x41, self.index, k))
            out.append((self.index, self.seq, ts, payload))
            self.seq = (self.seq + 1) & 0xFFFF
        self.pid = (self.pid + 1) & (0x7FFF if self.long_id else 0x7F)
        self.tl0 = (self.tl0 + 1) & 0xFF
        return out


class Call:
    """A publisher with three layers sending through one subscriber's munger."""

    def __init__(self, seed: int, codec: str = "vp8", long_id: bool = True) -> None:
        rng = random.Random(seed)
        self.layers = [Layer(i, rng, codec, long_id) for i in range(3)]
        self.munger = LayerMunger(codec, 3, rng=rng)
        self.out: list[Out] = []
        self.frame_no = 0
        self.reports = True  # send sender reports

    def run(self, frames: int, pli_delay: int = 4, gop: int = 1000) -> None:
        m = self.munger
        for _ in range(frames):
            n = self.frame_no
            wall = n / 30
            wanted = m.want_keyframe
            for layer in self.layers:
                if layer.index == wanted and layer.key_due is None:
                    layer.key_due = n + pli_delay  # the PLI's round trip
                key = n % gop == 0 or layer.key_due == n
                if layer.key_due == n:
                    layer.key_due = None
                for index, seq, ts, payload in layer.frame(wall, key):
                    res = m.packet(index, seq, ts, payload)
                    if res is not None:
                        self.out.append(Out(index, wall, *res))
                # Each layer reports once a second, at its own phase.
                if self.reports and n % 30 == 10 * layer.index:
                    m.sender_report(layer.index, *layer.sender_report(wall))
            self.frame_no += 1


def check_continuous(out: list[Out], vp8: bool = True, long_id: bool = True) -> None:
    """Seq +1 per packet; timestamps never go back and follow the wall clock within a frame;
    picture id and TL0PICIDX +1 per frame."""
    assert out
    first = out[0]
    pid_mod = 0x8000 if long_id else 0x80
    for prev, cur in itertools.pairwise(out):
        assert cur.seq == (prev.seq + 1) & 0xFFFF
        step = (cur.ts - prev.ts) & 0xFFFFFFFF
        assert step < 1 << 31, "timestamp went back"
        if vp8:
            a, b = parse(prev.payload), parse(cur.payload)
            assert a.picture_id is not None and b.picture_id is not None
            if b.start:
                assert b.picture_id == (a.picture_id + 1) % pid_mod
                assert b.tl0picidx == ((a.tl0picidx or 0) + 1) & 0xFF
                assert step > 0
            else:
                assert (b.picture_id, b.tl0picidx, step) == (a.picture_id, a.tl0picidx, 0)
    for o in out:
        elapsed = (o.ts - first.ts) & 0xFFFFFFFF
        assert abs(elapsed - (o.wall - first.wall) * RATE) <= FRAME


def layers_of(out: list[Out]) -> list[int]:
    """The layers forwarded, in order, without repeats."""
    seen: list[int] = []
    for o in out:
        if not seen or seen[-1] != o.layer:
            seen.append(o.layer)
    return seen


@pytest.mark.parametrize("seed", range(5))
def test_high_low_high_is_one_continuous_stream(seed: int) -> None:
    call = Call(seed)
    m = call.munger
    m.set_target(2)
    call.run(60)  # starts at the first keyframe, without waiting for sender reports
    assert m.current == 2 and m.want_keyframe is None
    m.set_target(0)
    assert m.want_keyframe == 0
    call.run(2)  # no keyframe of layer 0 yet: layer 2 goes on
    assert m.current == 2 and call.out[-1].layer == 2
    call.run(60)
    assert m.current == 0 and m.want_keyframe is None
    m.set_target(2)
    call.run(60)
    assert m.current == 2
    assert layers_of(call.out) == [2, 0, 2]
    check_continuous(call.out)
    # Each switch happened at a keyframe of the new layer.
    for prev, cur in itertools.pairwise(call.out):
        if cur.layer != prev.layer:
            assert parse(cur.payload).keyframe


def test_switch_waits_for_the_keyframe() -> None:
    call = Call(7)
    m = call.munger
    m.set_target(1)
    call.run(40)
    m.set_target(2)
    call.run(10, pli_delay=1000)  # the publisher ignores the PLI
    assert m.current == 1 and m.want_keyframe == 2
    assert {o.layer for o in call.out} == {1}
    call.layers[2].key_due = None  # the PLI is sent again and answered
    call.run(30, pli_delay=0)
    assert m.current == 2
    check_continuous(call.out)


def test_no_switch_before_the_target_layers_sender_report() -> None:
    call = Call(3)
    m = call.munger
    call.reports = False
    m.set_target(0)
    call.run(10)
    m.set_target(1)
    call.run(20)  # keyframes of layer 1 come, but there is no common clock yet
    assert m.current == 0 and m.want_keyframe == 1
    assert layers_of(call.out) == [0]
    call.reports = True
    call.run(60)
    assert m.current == 1
    assert layers_of(call.out) == [0, 1]
    check_continuous(call.out)


def test_pause_and_resume_on_another_layer() -> None:
    call = Call(11)
    m = call.munger
    m.set_target(1)
    call.run(45)
    m.set_target(None)
    assert m.want_keyframe is None
    before = len(call.out)
    call.run(30)
    assert len(call.out) == before  # nothing while paused
    m.set_target(0)
    call.run(30)
    assert layers_of(call.out) == [1, 0]
    check_continuous(call.out)  # the pause shows as a timestamp gap of its length


def test_pause_and_resume_on_the_same_layer() -> None:
    call = Call(12)
    m = call.munger
    call.reports = False  # not needed when the layer stays the same
    m.set_target(2)
    call.run(20)
    m.set_target(None)
    call.run(20)
    m.set_target(2)
    call.run(20)
    assert m.current == 2
    check_continuous(call.out)


def test_late_packets_from_before_the_switch_are_dropped() -> None:
    call = Call(5)
    m = call.munger
    m.set_target(0)
    call.run(40)
    m.set_target(1)
    layer1 = call.layers[1]
    old = layer1.frame(40 / 30, False)  # a layer-1 frame from before the switch, held back
    call.run(1)
    key = layer1.frame(41 / 30, True)
    for index, seq, ts, payload in key:
        assert m.packet(index, seq, ts, payload) is not None
    assert m.current == 1
    for index, seq, ts, payload in old:
        assert m.packet(index, seq, ts, payload) is None
    # A reordered packet after the switch point gets its place in the new numbering.
    a, b = layer1.frame(42 / 30, False)
    out_b = m.packet(*b)
    out_a = m.packet(*a)
    assert out_a is not None and out_b is not None
    assert out_b[0] == (out_a[0] + 1) & 0xFFFF
    # Other layers are dropped.
    for index, seq, ts, payload in call.layers[0].frame(42 / 30, True):
        assert m.packet(index, seq, ts, payload) is None


def test_timestamp_nudged_when_the_new_keyframe_has_the_same_capture_time() -> None:
    call = Call(9)
    m = call.munger
    m.set_target(0)
    call.run(40)
    m.set_target(2)
    wall = 40 / 30
    sent = [m.packet(*p) for p in call.layers[0].frame(wall, False)]
    first_new = m.packet(*call.layers[2].frame(wall, True)[0])
    assert sent[-1] is not None and first_new is not None
    assert first_new[1] == (sent[-1][1] + 1) & 0xFFFFFFFF
    assert first_new[0] == (sent[-1][0] + 1) & 0xFFFF


def test_seven_bit_picture_ids_wrap_across_switches() -> None:
    call = Call(13, long_id=False)
    m = call.munger
    m.set_target(0)
    call.run(150)  # > 128 frames: the 7-bit id wraps
    m.set_target(1)
    call.run(150)
    assert layers_of(call.out) == [0, 1]
    check_continuous(call.out, long_id=False)


def test_h264_seq_and_timestamps_only() -> None:
    call = Call(21, codec="h264")
    m = call.munger
    m.set_target(2)
    call.run(40)
    m.set_target(0)
    call.run(40)
    m.set_target(1)
    call.run(40)
    assert layers_of(call.out) == [2, 0, 1]
    check_continuous(call.out, vp8=False)
    # Payloads are passed through untouched.
    assert all(o.payload[1] == o.layer for o in call.out)


def test_sequence_numbers_wrap_without_dropping() -> None:
    m = LayerMunger("h264", 1, rng=random.Random(1))
    m.set_target(0)
    seq, n = 65000, 0
    last = None
    for i in range(70_000):
        res = m.packet(0, (seq + i) & 0xFFFF, i * 10, b"\x65" if i == 0 else b"\x41")
        assert res is not None
        if last is not None:
            assert res[0] == (last + 1) & 0xFFFF
        last = res[0]
        n += 1
    assert n == 70_000


def test_sender_report_translated_for_the_forwarded_layer_only() -> None:
    m = LayerMunger("vp8", 2, rng=random.Random(2))
    m.set_target(0)
    res = m.packet(0, 100, 5000, vp8_payload(1, 1, True, True))
    assert res is not None
    assert m.sender_report(0, 1 << 40, 5000 + 90) == (res[1] + 90) & 0xFFFFFFFF
    assert m.sender_report(1, 1 << 40, 77) is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        LayerMunger("opus", 2)
    m = LayerMunger("vp8", 2)
    with pytest.raises(ValueError):
        m.set_target(2)
    m.set_target(0)
    assert m.packet(0, 1, 1, b"") is None  # malformed VP8: dropped
