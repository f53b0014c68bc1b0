"""RTP header building and payload inspection for forwarding. Pure; no I/O, no aiortc.

The SFU never decodes media. It rewrites each packet's header for every subscriber (SSRC,
payload type, sequence number, timestamp, header extensions) and reads just enough of the payload
to find keyframes (RFC 7741 for VP8, RFC 6184 for H.264).
"""

from __future__ import annotations

import struct
import time
from typing import Final

HEADER: Final = struct.Struct("!BBHII")
U16: Final = struct.Struct("!H")
SEQ_MOD: Final = 1 << 16
TS_MOD: Final = 1 << 32
NTP_EPOCH_OFFSET: Final = 2208988800  # seconds from 1900 to 1970

URI_MID: Final = "urn:ietf:params:rtp-hdrext:sdes:mid"
URI_ABS_SEND_TIME: Final = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"
URI_AUDIO_LEVEL: Final = "urn:ietf:params:rtp-hdrext:ssrc-audio-level"


def seq_newer(a: int, b: int) -> bool:
    """Whether sequence number ``a`` comes after ``b`` (RFC 3550 arithmetic, wrapping)."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def abs_send_time_now() -> int:
    """The 24-bit abs-send-time of now: NTP seconds in 6.18 fixed point (its low 64 s).

    Straight from ``time.time()``: aiortc's NTP clock builds a datetime per call, and this runs
    once per forwarded packet."""
    return int((time.time() + NTP_EPOCH_OFFSET) * 262144) & 0x00FFFFFF


_LAYOUT_KEYS: dict[tuple[int | None, int | None, int, bool], int] = {}


class ExtensionLayout:
    """The one-byte-header extension block (RFC 8285 section 4.2) a subscriber's packets carry.

    Every subscriber of a track gets the same shared elements (abs-send-time, audio level) and its
    own MID; the block's length is fixed per subscriber, so its head and padding are built once.
    """

    __slots__ = ("abs_id", "head", "key", "level_id", "pad")

    def __init__(
        self,
        mid_id: int | None,
        mid: str | None,
        abs_id: int | None,
        level_id: int | None,
        audio: bool,
    ) -> None:
        self.abs_id = abs_id
        self.level_id = level_id if audio else None
        mid_elem = b""
        if mid_id and mid:
            raw = mid.encode()
            mid_elem = bytes(((mid_id << 4) | (len(raw) - 1),)) + raw
        shared = (4 if abs_id else 0) + (2 if self.level_id else 0)
        size = len(mid_elem) + shared
        padded = (size + 3) & ~3
        self.pad = b"\0" * (padded - size)
        self.head = (b"\xbe\xde" + U16.pack(padded // 4) + mid_elem) if padded else b""
        # Layouts with the same key produce the same shared bytes for a packet (a small int:
        # compared per subscriber per packet).
        shape = (self.abs_id, self.level_id, len(self.pad), bool(self.head))
        self.key: int = _LAYOUT_KEYS.setdefault(shape, len(_LAYOUT_KEYS))

    def shared(self, abs_time: int, level: int | None) -> bytes:
        """The elements every subscriber shares for one packet (plus this layout's padding)."""
        if not self.head:
            return b""
        out = b""
        if self.abs_id:
            out = bytes(((self.abs_id << 4) | 2,)) + abs_time.to_bytes(3, "big")
        if self.level_id:
            out += bytes(((self.level_id << 4), level if level is not None else 127))
        return out + self.pad


def build(
    pt_byte: int, seq: int, ts: int, ssrc: int, head: bytes, shared: bytes, payload: bytes
) -> bytes:
    """One RTP packet: version 2, the extension bit when ``head`` is set, marker in ``pt_byte``."""
    first = 0x90 if head else 0x80
    return HEADER.pack(first, pt_byte, seq, ts, ssrc) + head + shared + payload


def vp8_keyframe(payload: bytes) -> bool:
    """Whether a VP8 RTP payload starts a keyframe (RFC 7741 sections 4.2 and 4.3)."""
    n = len(payload)
    if n < 2:
        return False
    b0 = payload[0]
    if not (b0 & 0x10) or (b0 & 0x07):  # S bit set and partition index 0
        return False
    i = 1
    if b0 & 0x80:  # X: extension byte
        x = payload[1]
        i = 2
        if x & 0x80:  # I: picture id, 7 or 15 bits
            if i >= n:
                return False
            i += 2 if payload[i] & 0x80 else 1
        if x & 0x40:  # L: TL0PICIDX
            i += 1
        if x & 0x30:  # T or K: TID/KEYIDX byte
            i += 1
    if i >= n:
        return False
    return not (payload[i] & 0x01)  # P bit: 0 means keyframe


def h264_keyframe(payload: bytes) -> bool:
    """Whether an H.264 RTP payload carries an IDR slice or SPS (RFC 6184 section 5)."""
    if not payload:
        return False
    nal = payload[0] & 0x1F
    if nal in (5, 7):
        return True
    if nal == 24:  # STAP-A: 2-byte sizes then NAL units
        i = 1
        while i + 2 < len(payload):
            size = U16.unpack_from(payload, i)[0]
            if payload[i + 2] & 0x1F in (5, 7):
                return True
            i += 2 + size
        return False
    if nal == 28 and len(payload) > 1:  # FU-A: start of a fragmented IDR
        return bool(payload[1] & 0x80) and (payload[1] & 0x1F) in (5, 7)
    return False
