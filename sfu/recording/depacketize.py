"""RTP payloads to codec frames, as the containers want them. Pure: no I/O, no PyAV.

- VP8 (RFC 7741): each packet's payload descriptor is stripped (section 4.2); a frame is the
  packets of one RTP timestamp; it is a keyframe when the VP8 payload header of its first
  packet has P = 0 (section 4.3).
- H.264 (RFC 6184): single NAL unit packets (section 5.6), STAP-A (5.7.1) and FU-A (5.8) become
  Annex B NAL units (start code + NAL); a keyframe carries an IDR slice (type 5). The last SPS
  and PPS seen are put in front of a keyframe that lacks them, so every keyframe starts a
  decodable stream (and the muxer finds its extradata in the first packet).
- Opus (RFC 7587): the payload is the frame.
"""

from __future__ import annotations

from typing import Final

from ..h264 import NAL_SPS, NAL_STAP_A
from ..vp8 import VP8Error
from ..vp8 import parse as parse_vp8

START_CODE: Final = b"\x00\x00\x00\x01"
NAL_IDR: Final = 5
NAL_PPS: Final = 8
NAL_FU_A: Final = 28


class DepacketizeError(ValueError):
    """A payload that cannot be turned into frame data (cut or of an unsupported kind)."""


def vp8_frame(payloads: list[bytes]) -> tuple[bytes, bool]:
    """The VP8 frame carried by the packets of one timestamp, and whether it is a keyframe."""
    parts: list[bytes] = []
    keyframe = False
    for n, payload in enumerate(payloads):
        try:
            desc = parse_vp8(payload)
        except VP8Error as e:
            raise DepacketizeError(str(e)) from None
        if n == 0:
            if not (desc.start and desc.partition == 0):
                raise DepacketizeError("a VP8 frame must start with partition 0")
            keyframe = desc.keyframe
        parts.append(payload[desc.size :])
    return b"".join(parts), keyframe


class H264Depacketizer:
    """Annex B frames from RFC 6184 packets; remembers the last SPS and PPS."""

    __slots__ = ("pps", "sps")

    def __init__(self) -> None:
        self.sps: bytes | None = None
        self.pps: bytes | None = None

    def frame(self, payloads: list[bytes]) -> tuple[bytes, bool]:
        """The access unit carried by the packets of one timestamp (Annex B), and whether it
        is a keyframe (an IDR slice). Raises ``DepacketizeError`` on a cut or broken packet."""
        nals: list[bytes] = []
        fu: bytearray | None = None
        for payload in payloads:
            if not payload:
                raise DepacketizeError("empty H.264 payload")
            kind = payload[0] & 0x1F
            if 1 <= kind <= 23:
                nals.append(payload)
            elif kind == NAL_STAP_A:
                i = 1
                n = len(payload)
                while i + 2 <= n:
                    size = (payload[i] << 8) | payload[i + 1]
                    i += 2
                    if size == 0 or i + size > n:
                        raise DepacketizeError("STAP-A unit cut")
                    nals.append(payload[i : i + size])
                    i += size
            elif kind == NAL_FU_A:
                if len(payload) < 3:
                    raise DepacketizeError("FU-A packet cut")
                header = payload[1]
                if header & 0x80:  # S: start of a fragmented NAL unit
                    fu = bytearray(((payload[0] & 0xE0) | (header & 0x1F),))
                elif fu is None:
                    raise DepacketizeError("FU-A fragment without its start")
                fu += payload[2:]
                if header & 0x40:  # E: its end
                    nals.append(bytes(fu))
                    fu = None
            else:
                raise DepacketizeError(f"H.264 packet type {kind} is not supported")
        if fu is not None:
            raise DepacketizeError("FU-A without its end")
        keyframe = False
        has_sps = has_pps = False
        for nal in nals:
            kind = nal[0] & 0x1F
            if kind == NAL_SPS:
                self.sps = nal
                has_sps = True
            elif kind == NAL_PPS:
                self.pps = nal
                has_pps = True
            elif kind == NAL_IDR:
                keyframe = True
        if keyframe:
            head = []
            if not has_sps and self.sps is not None:
                head.append(self.sps)
            if not has_pps and self.pps is not None:
                head.append(self.pps)
            nals = head + nals
        return b"".join(START_CODE + nal for nal in nals), keyframe


def opus_samples(packet: bytes) -> int:
    """Samples at 48 kHz in an Opus packet, from its TOC byte (RFC 6716 section 3.1); 960
    (20 ms) for a packet too short to say."""
    if not packet:
        return 960
    toc = packet[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        size = (480, 960, 1920, 2880)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        size = (480, 960)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        size = (120, 240, 480, 960)[config & 3]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code < 3:
        frames = 2
    else:
        if len(packet) < 2:
            return 960
        frames = packet[1] & 0x3F
    return size * frames


def opus_lost(previous: bytes) -> bytes:
    """An Opus packet that stands for one lost frame like ``previous``'s: its TOC byte with
    code 0 and no frame data, which a decoder conceals (RFC 6716 section 3.2.1)."""
    return bytes(((previous[0] if previous else 0xF8) & 0xFC,))
