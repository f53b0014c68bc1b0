"""The VP8 RTP payload descriptor (RFC 7741 section 4.2): parsing, and rewriting the picture id
and TL0PICIDX so that a subscriber sees one continuous stream across simulcast layer switches.
Pure; no I/O.

::

     0 1 2 3 4 5 6 7
    +-+-+-+-+-+-+-+-+
    |X|R|N|S|R| PID | (REQUIRED)
    +-+-+-+-+-+-+-+-+
    |I|L|T|K| RSV   | (OPTIONAL, present when X)
    +-+-+-+-+-+-+-+-+
    |M| PictureID   | (OPTIONAL, present when I; 15 bits when M)
    +-+-+-+-+-+-+-+-+
    |   PictureID   |
    +-+-+-+-+-+-+-+-+
    |   TL0PICIDX   | (OPTIONAL, present when L)
    +-+-+-+-+-+-+-+-+
    |TID|Y| KEYIDX  | (OPTIONAL, present when T or K)
    +-+-+-+-+-+-+-+-+

``keyframe_size`` reads a keyframe's picture size from the VP8 payload header that follows the
descriptor (RFC 6386 section 9.1: a 3-byte frame tag, the start code 9d 01 2a, then 14-bit
width and height, little-endian, each with 2 bits of scaling above); the SFU learns each
simulcast layer's size from it.

Rewriting keeps the packet's length: a 7-bit picture id stays 7 bits (the new value is taken
modulo 128), a 15-bit one stays 15 bits, so only the descriptor's bytes change and the payload
after it is copied once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PICTURE_ID_MOD: Final = 1 << 15
TL0PICIDX_MOD: Final = 1 << 8


class VP8Error(ValueError):
    """A payload too short for the descriptor its flags announce."""


@dataclass(slots=True)
class VP8Descriptor:
    """The fields of one packet's payload descriptor, and where the rewritable ones sit.

    Not frozen: a frozen dataclass's ``__init__`` costs twice as much, and one is built per
    forwarded packet."""

    start: bool  # S: first packet of a VP8 partition
    partition: int  # PID (partition index)
    non_reference: bool  # N
    picture_id: int | None  # 7 or 15 bits, None when absent
    long_picture_id: bool  # M: the picture id takes 15 bits (2 bytes)
    tl0picidx: int | None
    tid: int | None  # temporal layer index, None without T
    layer_sync: bool  # Y
    keyidx: int | None  # None without K
    keyframe: bool  # start of partition 0 of a key frame (RFC 7741 section 4.3: P bit 0)
    size: int  # length of the descriptor in bytes
    picture_id_at: int  # offset of the picture id, -1 when absent
    tl0picidx_at: int  # offset of TL0PICIDX, -1 when absent


def parse(payload: bytes) -> VP8Descriptor:
    """Parse the descriptor at the start of a VP8 RTP payload; raise ``VP8Error`` if it is cut."""
    n = len(payload)
    if n < 1:
        raise VP8Error("empty VP8 payload")
    b0 = payload[0]
    start = bool(b0 & 0x10)
    partition = b0 & 0x07
    i = 1
    picture_id: int | None = None
    long_id = False
    tl0: int | None = None
    tid: int | None = None
    sync = False
    keyidx: int | None = None
    pid_at = -1
    tl0_at = -1
    if b0 & 0x80:  # X
        if n < 2:
            raise VP8Error("VP8 descriptor cut in the extension byte")
        x = payload[1]
        i = 2
        if x & 0x80:  # I
            if i >= n:
                raise VP8Error("VP8 descriptor cut in the picture id")
            pid_at = i
            if payload[i] & 0x80:  # M: 15-bit picture id
                if i + 1 >= n:
                    raise VP8Error("VP8 descriptor cut in the picture id")
                picture_id = ((payload[i] & 0x7F) << 8) | payload[i + 1]
                long_id = True
                i += 2
            else:
                picture_id = payload[i]
                i += 1
        if x & 0x40:  # L
            if i >= n:
                raise VP8Error("VP8 descriptor cut in TL0PICIDX")
            tl0_at = i
            tl0 = payload[i]
            i += 1
        if x & 0x30:  # T or K
            if i >= n:
                raise VP8Error("VP8 descriptor cut in TID/KEYIDX")
            b = payload[i]
            if x & 0x20:
                tid = b >> 6
                sync = bool(b & 0x20)
            if x & 0x10:
                keyidx = b & 0x1F
            i += 1
    keyframe = start and partition == 0 and i < n and not (payload[i] & 0x01)
    return VP8Descriptor(  # positional: this runs once per forwarded packet
        start,
        partition,
        bool(b0 & 0x20),
        picture_id,
        long_id,
        tl0,
        tid,
        sync,
        keyidx,
        keyframe,
        i,
        pid_at,
        tl0_at,
    )


def rewrite(
    payload: bytes, desc: VP8Descriptor, picture_id: int | None, tl0picidx: int | None
) -> bytes:
    """A copy of ``payload`` with the picture id and TL0PICIDX replaced (``None``: unchanged).

    A field the packet does not carry is left out, whatever the value given; a 7-bit picture id
    gets the new value modulo 128 (RFC 7741 section 4.2: it wraps at its own width)."""
    size = desc.size
    head = bytearray(payload[:size])
    at = desc.picture_id_at
    if picture_id is not None and at >= 0:
        if desc.long_picture_id:
            pid = picture_id & 0x7FFF
            head[at] = 0x80 | (pid >> 8)
            head[at + 1] = pid & 0xFF
        else:
            head[at] = picture_id & 0x7F
    at = desc.tl0picidx_at
    if tl0picidx is not None and at >= 0:
        head[at] = tl0picidx & 0xFF
    # One copy of the frame data, straight from a view of the original.
    return b"".join((head, memoryview(payload)[size:]))


def frame_size(frame: bytes) -> tuple[int, int] | None:
    """Width and height from the start of a VP8 frame (RFC 6386 section 9.1) if it is a
    keyframe, else None."""
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    return (frame[6] | frame[7] << 8) & 0x3FFF, (frame[8] | frame[9] << 8) & 0x3FFF


def keyframe(payload: bytes) -> VP8Descriptor | None:
    """The descriptor of a payload that starts a keyframe; None for any other (or a cut one)."""
    try:
        desc = parse(payload)
    except VP8Error:
        return None
    return desc if desc.keyframe else None


def keyframe_size(payload: bytes) -> tuple[int, int] | None:
    """Width and height of the keyframe a VP8 RTP payload starts, None for any other packet
    (not a keyframe's first packet, cut, or without the start code)."""
    desc = keyframe(payload)
    if desc is None:
        return None
    return frame_size(payload[desc.size : desc.size + 10])
