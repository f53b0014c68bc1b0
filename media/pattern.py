"""The picture of a test clip: raw YUV 4:2:0 planes, drawn in pure Python (no numpy).

Each frame shows a scrolling grey texture (so the encoder has real work and reaches its
target bitrate), a box moving across the picture in a colour chosen by the publisher id,
the frame index in large seven-segment digits (for humans looking at a recording) and a
:mod:`media.marker` band (for tests).
"""

from __future__ import annotations

import random

from media.marker import MARKER_HEIGHT, Marker, draw_marker

# (U, V) of the moving box per publisher id (mod 8): red, green, blue, yellow, magenta,
# cyan, orange, purple in BT.601 terms.
BOX_COLOURS: tuple[tuple[int, int], ...] = (
    (90, 240),
    (54, 34),
    (240, 110),
    (16, 146),
    (202, 222),
    (166, 16),
    (60, 200),
    (200, 170),
)
BOX_SIZE = 96
CELL = 8  # texture cell size in pixels

# Seven segments: a, b, c, d, e, f, g (clockwise from the top, g in the middle).
_DIGIT_SEGMENTS = (
    "abcdef",
    "bc",
    "abdeg",
    "abcdg",
    "bcfg",
    "acdfg",
    "acdefg",
    "abc",
    "abcdefg",
    "abcdfg",
)
_DIGIT_W, _DIGIT_H, _STROKE = 28, 48, 6


class TestPattern:
    """Draws frame ``index`` of a clip of ``frame_count`` frames for one publisher."""

    __test__ = False  # not a pytest test class

    def __init__(self, width: int, height: int, publisher_id: int, frame_count: int) -> None:
        if width % (2 * CELL) or height % (2 * CELL) or width < 320 or height < 240:
            raise ValueError("width and height must be multiples of 16, at least 320x240")
        self.width = width
        self.height = height
        self.publisher_id = publisher_id
        self.frame_count = frame_count
        rng = random.Random(publisher_id)
        row_cells = width // CELL
        rows: list[bytes] = []
        for _ in range(height // CELL):
            cells = bytes(rng.randrange(60, 190) for _ in range(row_cells))
            row = b"".join(bytes([v]) * CELL for v in cells)
            rows.extend([row] * CELL)
        self._texture = rows
        self._box_u, self._box_v = BOX_COLOURS[publisher_id % len(BOX_COLOURS)]

    def box_position(self, index: int) -> tuple[int, int]:
        """Top-left corner of the moving box in frame ``index`` (even coordinates)."""
        span_x = self.width - BOX_SIZE
        span_y = self.height - MARKER_HEIGHT - BOX_SIZE
        phase = self.publisher_id * 37
        x = _bounce(index * 6 + phase, span_x)
        y = MARKER_HEIGHT + _bounce(index * 4 + phase, span_y)
        return x & ~1, y & ~1

    def frame(self, index: int) -> tuple[bytes, bytes, bytes]:
        """Y, U and V planes (packed, no padding) of frame ``index``."""
        w, h = self.width, self.height
        luma = bytearray(w * h)
        shift = (index * 3) % w
        for y, row in enumerate(self._texture):
            offset = (shift + y // 4) % w
            luma[y * w : (y + 1) * w] = row[offset:] + row[:offset]

        bx, by = self.box_position(index)
        white = b"\xeb" * BOX_SIZE
        for y in range(by, by + BOX_SIZE):
            luma[y * w + bx : y * w + bx + BOX_SIZE] = white
        _draw_number(luma, w, 16, MARKER_HEIGHT + 16, index)
        draw_marker(
            luma,
            w,
            Marker(index=index, frame_count=self.frame_count, publisher_id=self.publisher_id),
        )

        cw, ch = w // 2, h // 2
        u = bytearray(b"\x80" * (cw * ch))
        v = bytearray(b"\x80" * (cw * ch))
        box_u = bytes([self._box_u]) * (BOX_SIZE // 2)
        box_v = bytes([self._box_v]) * (BOX_SIZE // 2)
        for y in range(by // 2, (by + BOX_SIZE) // 2):
            start = y * cw + bx // 2
            u[start : start + BOX_SIZE // 2] = box_u
            v[start : start + BOX_SIZE // 2] = box_v
        return bytes(luma), bytes(u), bytes(v)


def _bounce(position: int, span: int) -> int:
    """Position moving back and forth over [0, span]."""
    position %= 2 * span
    return position if position <= span else 2 * span - position


def _fill(luma: bytearray, stride: int, x: int, y: int, w: int, h: int, value: int) -> None:
    line = bytes([value]) * w
    for row in range(y, y + h):
        luma[row * stride + x : row * stride + x + w] = line


def _draw_number(luma: bytearray, stride: int, x: int, y: int, number: int) -> None:
    """Draw ``number`` (up to five digits) in black seven-segment digits on a white plate."""
    digits = f"{number:05d}"[-5:]
    step = _DIGIT_W + 10
    _fill(luma, stride, x - 6, y - 6, step * len(digits) + 2, _DIGIT_H + 12, 235)
    s, dw, dh = _STROKE, _DIGIT_W, _DIGIT_H
    half = dh // 2
    boxes = {
        "a": (0, 0, dw, s),
        "b": (dw - s, 0, s, half),
        "c": (dw - s, half, s, dh - half),
        "d": (0, dh - s, dw, s),
        "e": (0, half, s, dh - half),
        "f": (0, 0, s, half),
        "g": (0, half - s // 2, dw, s),
    }
    for position, digit in enumerate(digits):
        dx = x + position * step
        for segment in _DIGIT_SEGMENTS[int(digit)]:
            sx, sy, sw, sh = boxes[segment]
            _fill(luma, stride, dx + sx, y + sy, sw, sh, 16)
