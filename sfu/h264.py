"""H.264 (RFC 6184 payloads, ITU-T H.264 bitstreams): the picture size in a sequence parameter
set. Pure; no I/O.

``payload_size`` finds an SPS in an RTP payload (a single NAL unit, or inside a STAP-A, as
browsers and aiortc send it in front of each IDR picture) and reads the picture's width and
height from it (section 7.3.2.1.1: exp-Golomb codes up to ``pic_width_in_mbs_minus1``,
``pic_height_in_map_units_minus1`` and the frame cropping). The SFU learns each simulcast
layer's size from it; the recorder gives its files their size.
"""

from __future__ import annotations

from typing import Final

NAL_SPS: Final = 7
NAL_STAP_A: Final = 24


class SpsError(ValueError):
    """A sequence parameter set that is cut or malformed."""


class _Bits:
    """Reads an RBSP bit by bit (exp-Golomb codes, ITU-T H.264 section 9.1)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def bit(self) -> int:
        byte = self.pos >> 3
        if byte >= len(self.data):
            raise SpsError("SPS cut")
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
                raise SpsError("bad exp-Golomb code in SPS")
        return (1 << zeros) - 1 + self.bits(zeros)

    def se(self) -> int:
        v = self.ue()
        return (v + 1) // 2 if v & 1 else -(v // 2)


def _unescape(nal: bytes) -> bytes:
    """The RBSP of a NAL unit: emulation prevention bytes (00 00 03) removed."""
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def sps_size(sps: bytes) -> tuple[int, int]:
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


def payload_size(payload: bytes) -> tuple[int, int] | None:
    """The picture size in the SPS an RTP payload carries (a single NAL unit or a STAP-A),
    None when it carries none or a broken one."""
    if not payload:
        return None
    kind = payload[0] & 0x1F
    try:
        if kind == NAL_SPS:
            return sps_size(payload)
        if kind == NAL_STAP_A:
            i = 1
            n = len(payload)
            while i + 2 < n:
                size = (payload[i] << 8) | payload[i + 1]
                i += 2
                if size == 0 or i + size > n:
                    return None
                if payload[i] & 0x1F == NAL_SPS:
                    return sps_size(payload[i : i + size])
                i += size
    except SpsError:
        return None
    return None
