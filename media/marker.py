"""A machine-readable frame marker drawn into the luma plane of test video.

Each frame of a test clip carries, in a band of large black/white blocks at the top of the
picture, the clip frame index, the clip length in frames and the publisher id, plus a check
byte. A receiver that decodes the frame reads the marker back; a frame that decoded into
garbage (for example after a lost reference frame) fails the check or shows the wrong
index. The blocks are big (``width // 16`` by 16 pixels) and far apart in value so that
lossy compression at test bitrates never flips a bit.

Pure functions on bytes: no PyAV, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

COLUMNS = 16
ROWS = 3
BLOCK_HEIGHT = 16
MARKER_HEIGHT = ROWS * BLOCK_HEIGHT
BITS = COLUMNS * ROWS  # 48: index (16), frame count (16), publisher (8), check (8)
LUMA_ZERO = 32
LUMA_ONE = 224
_THRESHOLD = (LUMA_ZERO + LUMA_ONE) // 2
_CHECK_SALT = 0x5A


@dataclass(frozen=True, slots=True)
class Marker:
    """What a frame says about itself."""

    index: int
    """Frame index within the clip (0-based)."""
    frame_count: int
    """Number of frames in the clip (the index wraps at this value)."""
    publisher_id: int
    """Publisher id of the clip (0-255)."""


def _check_byte(index: int, frame_count: int, publisher_id: int) -> int:
    return (
        (index >> 8) ^ (index & 0xFF) ^ (frame_count >> 8) ^ (frame_count & 0xFF) ^ publisher_id
    ) ^ _CHECK_SALT


def _to_bits(marker: Marker) -> list[int]:
    if not 0 <= marker.index < 1 << 16 or not 0 < marker.frame_count < 1 << 16:
        raise ValueError("marker index and frame count must fit in 16 bits")
    if not 0 <= marker.publisher_id < 1 << 8:
        raise ValueError("marker publisher id must fit in 8 bits")
    value = (
        marker.index << 32
        | marker.frame_count << 16
        | marker.publisher_id << 8
        | _check_byte(marker.index, marker.frame_count, marker.publisher_id)
    )
    return [(value >> (BITS - 1 - i)) & 1 for i in range(BITS)]


def draw_marker(luma: bytearray, width: int, marker: Marker) -> None:
    """Draw ``marker`` into the top ``MARKER_HEIGHT`` rows of a luma plane with stride ``width``."""
    block_width = width // COLUMNS
    for bit_number, bit in enumerate(_to_bits(marker)):
        row, column = divmod(bit_number, COLUMNS)
        value = bytes([LUMA_ONE if bit else LUMA_ZERO]) * block_width
        x = column * block_width
        for y in range(row * BLOCK_HEIGHT, (row + 1) * BLOCK_HEIGHT):
            start = y * width + x
            luma[start : start + block_width] = value


def read_marker(luma: memoryview | bytes, stride: int, width: int) -> Marker | None:
    """Read a marker from a decoded luma plane; None if absent or corrupt.

    Samples the centre of each block (average of four pixels) so that ringing at block
    edges does not matter.
    """
    block_width = width // COLUMNS
    value = 0
    for bit_number in range(BITS):
        row, column = divmod(bit_number, COLUMNS)
        cx = column * block_width + block_width // 2
        cy = row * BLOCK_HEIGHT + BLOCK_HEIGHT // 2
        base = cy * stride + cx
        total = luma[base] + luma[base - 1] + luma[base - stride] + luma[base - stride - 1]
        value = value << 1 | (1 if total >= 4 * _THRESHOLD else 0)
    index = value >> 32
    frame_count = (value >> 16) & 0xFFFF
    publisher_id = (value >> 8) & 0xFF
    check = value & 0xFF
    if frame_count == 0 or index >= frame_count:
        return None
    if check != _check_byte(index, frame_count, publisher_id):
        return None
    return Marker(index=index, frame_count=frame_count, publisher_id=publisher_id)
