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

from ..vp8 import VP8Error
from ..vp8 import parse as parse_vp8

START_CODE: Final = b"\x00\x00\x00\x01"
NAL_IDR: Final = 5
NAL_SPS: Final = 7
NAL_PPS: Final = 8
NAL_STAP_A: Final = 24
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


def vp8_size(frame: bytes) -> tuple[int, int] | None:
    """Width and height from a VP8 keyframe's header (RFC 6386 section 9.1), None otherwise."""
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    return (frame[6] | frame[7] << 8) & 0x3FFF, (frame[8] | frame[9] << 8) & 0x3FFF


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


class _Bits:
    """Reads an RBSP bit by bit (exp-Golomb codes, ITU-T H.264 section 9.1)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def bit(self) -> int:
        byte = self.pos >> 3
        if byte >= len(self.data):
            raise DepacketizeError("SPS cut")
        b = (self.data[byte] >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return b

    def bits(self, n: int) -> int:
        v = 0
        for _ in range(n):
            v = v << 1 | self.bit()
        return v

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise DepacketizeError("bad exp-Golomb code in SPS")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        v = self.ue()
        return (v + 1) // 2 if v & 1 else -(v // 2)


def _unescape(nal: bytes) -> bytes:
    """The RBSP of a NAL unit: emulation prevention bytes (00 00 03) removed."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def h264_size(sps: bytes) -> tuple[int, int]:
    """Width and height from an SPS NAL unit (ITU-T H.264 section 7.3.2.1.1)."""
    r = _Bits(_unescape(sps[1:]))
    profile = r.bits(8)
    r.bits(16)  # constraint flags, level
    r.ue()  # seq_parameter_set_id
    chroma_format = 1
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        chroma_format = r.ue()
        if chroma_format == 3:
            r.bit()  # separate_colour_plane_flag
        r.ue()  # bit_depth_luma_minus8
        r.ue()  # bit_depth_chroma_minus8
        r.bit()  # qpprime_y_zero_transform_bypass_flag
        if r.bit():  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma_format != 3 else 12):
                if r.bit():
                    last = nxt = 8
                    for _ in range(16 if i < 6 else 64):
                        if nxt:
                            nxt = (last + r.se()) % 256
                        last = nxt or last
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.bit()
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.bit()  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = r.bit()
    if not frame_mbs_only:
        r.bit()  # mb_adaptive_frame_field_flag
    r.bit()  # direct_8x8_inference_flag
    width = width_mbs * 16
    height = height_units * 16 * (2 - frame_mbs_only)
    if r.bit():  # frame_cropping_flag
        left, right, top, bottom = r.ue(), r.ue(), r.ue(), r.ue()
        cx = 2 if chroma_format in (1, 2) else 1
        cy = (2 if chroma_format == 1 else 1) * (2 - frame_mbs_only)
        width -= (left + right) * cx
        height -= (top + bottom) * cy
    return width, height


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
