"""The VP8 payload descriptor (RFC 7741 section 4.2): parsing and in-place id rewriting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfu.rtp import vp8_keyframe
from sfu.vp8 import VP8Error, parse, rewrite


def descriptor(
    *,
    start: bool = True,
    partition: int = 0,
    non_ref: bool = False,
    picture_id: int | None = None,
    long_id: bool = True,
    tl0: int | None = None,
    tid: int | None = None,
    sync: bool = False,
    keyidx: int | None = None,
    key: bool = False,
    data: bytes = b"\x10\x02\x00\x9d\x01\x2a",
) -> bytes:
    """A hand-built descriptor followed by a VP8 payload header (P bit from ``key``)."""
    ext = picture_id is not None or tl0 is not None or tid is not None or keyidx is not None
    b0 = (0x80 if ext else 0) | (0x20 if non_ref else 0) | (0x10 if start else 0) | partition
    out = bytearray((b0,))
    if ext:
        x = (
            (0x80 if picture_id is not None else 0)
            | (0x40 if tl0 is not None else 0)
            | (0x20 if tid is not None else 0)
            | (0x10 if keyidx is not None else 0)
        )
        out.append(x)
        if picture_id is not None:
            if long_id:
                out += bytes((0x80 | (picture_id >> 8), picture_id & 0xFF))
            else:
                out.append(picture_id)
        if tl0 is not None:
            out.append(tl0)
        if tid is not None or keyidx is not None:
            out.append(((tid or 0) << 6) | (0x20 if sync else 0) | (keyidx or 0))
    first = data[0] & ~0x01 if key else data[0] | 0x01
    return bytes(out) + bytes((first,)) + data[1:]


def test_minimal_descriptor() -> None:
    d = parse(b"\x10\x00\x00")
    assert d.size == 1 and d.start and d.partition == 0
    assert d.picture_id is None and d.tl0picidx is None and d.tid is None and d.keyidx is None
    assert d.keyframe  # P bit 0
    assert not parse(b"\x10\x01\x00").keyframe
    assert not parse(b"\x00\x00\x00").keyframe  # not the start of a partition
    assert not parse(b"\x11\x00\x00").keyframe  # partition 1


def test_full_descriptor_15_bit() -> None:
    raw = descriptor(picture_id=0x1234, tl0=200, tid=2, sync=True, keyidx=17, key=True)
    d = parse(raw)
    assert (d.picture_id, d.long_picture_id, d.tl0picidx) == (0x1234, True, 200)
    assert (d.tid, d.layer_sync, d.keyidx) == (2, True, 17)
    assert d.size == 6 and d.picture_id_at == 2 and d.tl0picidx_at == 4
    assert d.keyframe and vp8_keyframe(raw)


def test_seven_bit_picture_id_and_k_without_t() -> None:
    d = parse(descriptor(picture_id=0x55, long_id=False, keyidx=3, non_ref=True))
    assert (d.picture_id, d.long_picture_id, d.size) == (0x55, False, 4)
    assert d.tid is None and d.keyidx == 3 and d.non_reference
    assert d.tl0picidx is None and d.tl0picidx_at == -1


@pytest.mark.parametrize(
    "raw",
    [b"", b"\x90", b"\x90\x80", b"\x90\x80\x80", b"\x90\x40", b"\x90\x20", b"\x90\xc0\x81\x00"],
)
def test_cut_descriptors_raise(raw: bytes) -> None:
    with pytest.raises(VP8Error):
        parse(raw)


def test_rewrite_15_bit_wraps() -> None:
    raw = descriptor(picture_id=5, tl0=7, tid=0, key=True)
    d = parse(raw)
    out = rewrite(raw, d, 0x8000 + 3, 0x100 + 9)  # wraps at 2^15 and 2^8
    e = parse(out)
    assert (e.picture_id, e.tl0picidx, e.long_picture_id) == (3, 9, True)
    assert len(out) == len(raw) and out[d.size :] == raw[d.size :]
    assert (e.tid, e.keyframe) == (0, True)


def test_rewrite_7_bit_keeps_its_width() -> None:
    raw = descriptor(picture_id=100, long_id=False, tl0=1)
    d = parse(raw)
    out = rewrite(raw, d, 300, None)
    e = parse(out)
    assert (e.picture_id, e.long_picture_id, e.tl0picidx) == (300 & 0x7F, False, 1)
    assert len(out) == len(raw)


def test_rewrite_absent_fields_untouched() -> None:
    raw = descriptor(tid=1)
    d = parse(raw)
    assert rewrite(raw, d, 1234, 56) == raw


@given(
    start=st.booleans(),
    partition=st.integers(0, 7),
    non_ref=st.booleans(),
    picture_id=st.none() | st.integers(0, 0x7FFF),
    long_id=st.booleans(),
    tl0=st.none() | st.integers(0, 255),
    tid=st.none() | st.integers(0, 3),
    sync=st.booleans(),
    keyidx=st.none() | st.integers(0, 31),
    key=st.booleans(),
    data=st.binary(min_size=1, max_size=40),
    new_pid=st.integers(0, 1 << 20),
    new_tl0=st.integers(0, 1 << 12),
)
def test_round_trip(
    start: bool,
    partition: int,
    non_ref: bool,
    picture_id: int | None,
    long_id: bool,
    tl0: int | None,
    tid: int | None,
    sync: bool,
    keyidx: int | None,
    key: bool,
    data: bytes,
    new_pid: int,
    new_tl0: int,
) -> None:
    if picture_id is not None and not long_id:
        picture_id &= 0x7F
    raw = descriptor(
        start=start,
        partition=partition,
        non_ref=non_ref,
        picture_id=picture_id,
        long_id=long_id,
        tl0=tl0,
        tid=tid,
        sync=sync if tid is not None else False,
        keyidx=keyidx,
        key=key,
        data=data,
    )
    d = parse(raw)
    assert d.picture_id == picture_id and d.tl0picidx == tl0
    assert d.tid == tid and d.keyidx == keyidx and d.partition == partition
    assert d.keyframe == (start and partition == 0 and key) == vp8_keyframe(raw)
    out = rewrite(raw, d, new_pid, new_tl0)
    e = parse(out)
    assert len(out) == len(raw) and out[d.size :] == raw[d.size :]
    if picture_id is not None:
        assert e.picture_id == new_pid & (0x7FFF if long_id else 0x7F)
        assert e.long_picture_id == long_id
    if tl0 is not None:
        assert e.tl0picidx == new_tl0 & 0xFF
    # Everything else survives.
    assert (e.start, e.partition, e.non_reference, e.tid, e.keyidx, e.keyframe) == (
        d.start,
        d.partition,
        d.non_reference,
        d.tid,
        d.keyidx,
        d.keyframe,
    )
    # Rewriting back restores the original bytes.
    assert rewrite(out, e, picture_id, tl0) == raw
