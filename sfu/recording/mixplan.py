"""The pure part of the mixed file (``sfu.recording.mix``): what goes where and when.

* :func:`plan`: a recording's ``manifest.json`` (already parsed) -> :class:`Plan`: one grid
  cell per participant with their video segments, the audio segments, the timeline's length
  and the cap past which no decoded frame is trusted. Refuses a manifest it cannot use with
  :class:`ManifestError`.
* :func:`grid` and :func:`fit`: cell rectangles, and a picture scaled into a cell keeping its
  aspect ratio.
* :class:`Limiter`: clipping protection for the summed audio.
* :func:`draw_label`: a participant's name in a plain 5x7 pixel font, for a cell without video.

No I/O and no PyAV: numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

import math
import re
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 48_000
"""The mix's audio rate (Opus's own)."""

# A file name in a manifest is a plain name inside the recording directory (the recorder
# writes t<n>-s<n>.<ext>); anything with a path separator or a leading dot is refused, so a
# tampered manifest cannot make the job read outside the directory.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_CONTAINERS = {"webm": "video", "mkv": "video", "ogg": "audio"}

FRAME_SLACK = 2.0
"""Seconds past the recording's end (or a complete segment's declared end) within which a
decoded frame is still placed; later ones (a corrupt timestamp) are dropped."""

Samples = npt.NDArray[np.float32]
Plane = npt.NDArray[np.uint8]


class ManifestError(Exception):
    """The manifest cannot be mixed (missing, malformed, or the recording still running)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One file of one track, placed on the recording's clock."""

    file: str
    kind: str
    """``audio`` or ``video``."""
    source: str
    """``camera``, ``microphone`` or ``screen``."""
    start: float
    """Seconds from the recording's start to the segment's first frame."""
    duration: float
    complete: bool
    cap: float
    """Seconds on the recording's clock past which this segment's frames are dropped."""

    @property
    def end(self) -> float:
        """Declared end on the recording's clock."""
        return self.start + self.duration


@dataclass(frozen=True, slots=True)
class Rect:
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True, slots=True)
class Cell:
    """A person's place in the grid: one participant, or several of one identity one after
    the other (someone who left and came back)."""

    participant: str
    """The cell's first participant id."""
    identity: str
    name: str
    rect: Rect
    video: tuple[Segment, ...]
    """Camera and screen segments, by start."""


@dataclass(frozen=True, slots=True)
class Plan:
    audio_only: bool
    duration: float
    """Seconds: the declared end of the last segment."""
    cells: tuple[Cell, ...]
    audio: tuple[Segment, ...]
    """Every audio segment, by start."""

    @property
    def segments(self) -> tuple[Segment, ...]:
        return tuple(s for c in self.cells for s in c.video) + self.audio


def plan(manifest: Any, width: int = 1280, height: int = 720) -> Plan:
    """What the mix needs from a parsed ``manifest.json``; :class:`ManifestError` if unusable."""
    if not isinstance(manifest, dict) or manifest.get("version") != 1:
        raise ManifestError("manifest.json is not a version 1 recording manifest")
    started = _number(manifest, "started_at", "manifest")
    ended = manifest.get("ended_at")
    if ended is None:
        raise ManifestError("the recording has not ended (ended_at is null)")
    if not _is_number(ended):
        raise ManifestError("manifest: ended_at is not a number")
    audio_only = manifest.get("audio_only") is True
    length = max(0.0, (ended - started) / 1000)

    names: dict[str, tuple[str, str]] = {}
    people = manifest.get("participants")
    if not isinstance(people, list):
        raise ManifestError("manifest: participants is not a list")
    for i, p in enumerate(people):
        where = f"manifest: participants[{i}]"
        pid = _text(p, "participant", where)
        identity = p.get("identity") if isinstance(p.get("identity"), str) else ""
        name = p.get("name") if isinstance(p.get("name"), str) else ""
        names.setdefault(pid, (identity, name or identity or pid))

    tracks = manifest.get("tracks")
    if not isinstance(tracks, list):
        raise ManifestError("manifest: tracks is not a list")
    video: dict[str, list[Segment]] = {}
    audio: list[Segment] = []
    order: list[str] = []
    spans: dict[str, tuple[float, float]] = {}
    for i, t in enumerate(tracks):
        where = f"manifest: tracks[{i}]"
        pid = _text(t, "participant", where)
        kind = _text(t, "kind", where)
        if kind not in ("audio", "video"):
            raise ManifestError(f"{where}.kind is neither audio nor video")
        source = t.get("source") if isinstance(t.get("source"), str) else ""
        segments = t.get("segments")
        if not isinstance(segments, list):
            raise ManifestError(f"{where}.segments is not a list")
        parsed = [
            _segment(s, kind, source, length, f"{where}.segments[{j}]")
            for j, s in enumerate(segments)
        ]
        if not parsed or (kind == "video" and audio_only):
            continue
        if pid not in order:
            order.append(pid)
        first, last = spans.get(pid, (math.inf, 0.0))
        spans[pid] = (
            min([first] + [s.start for s in parsed]),
            max([last] + [s.end for s in parsed]),
        )
        if kind == "video":
            video.setdefault(pid, []).extend(parsed)
        else:
            audio.extend(parsed)

    known = [pid for pid in names if pid in order]
    listed = known + [pid for pid in order if pid not in names]
    cells = _cells(listed, names, spans, video, width, height)
    everything = [s for c in cells for s in c.video] + audio
    duration = max((s.end for s in everything), default=0.0)
    return Plan(
        audio_only=audio_only,
        duration=duration,
        cells=() if audio_only else cells,
        audio=tuple(sorted(audio, key=lambda s: s.start)),
    )


def _cells(
    listed: list[str],
    names: dict[str, tuple[str, str]],
    spans: dict[str, tuple[float, float]],
    video: dict[str, list[Segment]],
    width: int,
    height: int,
) -> tuple[Cell, ...]:
    """One cell per person, in ``listed`` order (the manifest's participants, as they
    appeared): a participant who left and came back (a new participant id, the same identity,
    no overlap in time) keeps the cell they had; one identity twice at once (two devices)
    gets a cell each."""
    lanes: list[_Lane] = []
    for pid in sorted(listed, key=lambda p: spans[p][0]):
        identity, name = names.get(pid, ("", pid))
        start, end = spans[pid]
        lane = next(
            (ln for ln in lanes if identity and ln.identity == identity and ln.end <= start), None
        )
        if lane is None:
            lanes.append(_Lane(pid, identity, name, end, list(video.get(pid, []))))
        else:
            lane.end = max(lane.end, end)
            lane.video.extend(video.get(pid, []))
    lanes.sort(key=lambda ln: listed.index(ln.participant))
    rects = grid(len(lanes), width, height)
    return tuple(
        Cell(
            participant=lane.participant,
            identity=lane.identity,
            name=lane.name,
            rect=rect,
            video=tuple(sorted(lane.video, key=lambda s: s.start)),
        )
        for lane, rect in zip(lanes, rects, strict=True)
    )


@dataclass(slots=True)
class _Lane:
    """A cell being planned: its first participant id and where its media ends so far."""

    participant: str
    identity: str
    name: str
    end: float
    video: list[Segment]


def _segment(s: Any, kind: str, source: str, length: float, where: str) -> Segment:
    file = _text(s, "file", where)
    if not _FILE_NAME.fullmatch(file) or ".." in file:
        raise ManifestError(f"{where}.file is not a plain file name")
    container = _text(s, "container", where)
    if _CONTAINERS.get(container) != kind:
        raise ManifestError(f"{where}.container {container!r} does not hold {kind}")
    start = _number(s, "start", where)
    duration = _number(s, "duration", where)
    if start < 0 or duration < 0 or start > length + FRAME_SLACK:
        raise ManifestError(f"{where}: start or duration out of range")
    complete = s.get("complete") is True
    # A complete segment's declared end is trusted (plus slack); one that ended abnormally
    # may hold more than the manifest knew of, up to the recording's end.
    end = start + duration if complete else max(length, start + duration)
    return Segment(file, kind, source, start, duration, complete, end + FRAME_SLACK)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _number(d: Any, key: str, where: str) -> float:
    v: Any = d.get(key) if isinstance(d, dict) else None
    if not _is_number(v):
        raise ManifestError(f"{where}.{key} is not a number")
    return float(v)


def _text(d: Any, key: str, where: str) -> str:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, str) or not v:
        raise ManifestError(f"{where}.{key} is not a string")
    return v


def grid(n: int, width: int, height: int) -> list[Rect]:
    """``n`` cells (even coordinates and sizes) filling ``width`` x ``height``, row by row.

    Columns are ``ceil(sqrt(n))`` (2x2 up to 4 participants, 3x3 up to 9); a last row that
    is not full is centred.
    """
    if n <= 0:
        return []
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    cw, ch = (width // cols) & ~1, (height // rows) & ~1
    top = ((height - rows * ch) // 2) & ~1
    rects: list[Rect] = []
    for i in range(n):
        row, col = divmod(i, cols)
        in_row = min(cols, n - row * cols)
        left = ((width - in_row * cw) // 2) & ~1
        rects.append(Rect(left + col * cw, top + row * ch, cw, ch))
    return rects


def fit(width: int, height: int, cell_w: int, cell_h: int) -> tuple[int, int]:
    """The largest even size with ``width:height``'s aspect ratio inside ``cell_w`` x ``cell_h``."""
    scale = min(cell_w / max(1, width), cell_h / max(1, height))
    w = min(cell_w, max(2, round(width * scale) & ~1))
    h = min(cell_h, max(2, round(height * scale) & ~1))
    return w, h


class Limiter:
    """Clipping protection for a sum of voices: a gain that drops at once to keep each 160
    sample chunk's peak under :attr:`CEILING` and recovers (time constant ~70 ms), ramped
    linearly within a chunk (no steps, so no clicks); a hard clip behind it catches what a
    ramp lets through. Stateful across calls, so blocks of any size join up."""

    CEILING = 0.98
    CHUNK = 160
    RELEASE = 0.05
    """Fraction of the way back to unity gain per chunk (3.3 ms)."""

    def __init__(self) -> None:
        self.gain = 1.0

    def process(self, block: Samples) -> Samples:
        """``block`` (mono float32) limited, in place; returns it."""
        for start in range(0, len(block), self.CHUNK):
            chunk = block[start : start + self.CHUNK]
            peak = float(np.max(np.abs(chunk))) if len(chunk) else 0.0
            target = min(1.0, self.CEILING / peak) if peak > 0 else 1.0
            recovered = self.gain + (1.0 - self.gain) * self.RELEASE
            new = min(target, recovered)
            if new != 1.0 or self.gain != 1.0:
                chunk *= np.linspace(self.gain, new, len(chunk), dtype=np.float32)
            self.gain = new
        np.clip(block, -1.0, 1.0, out=block)
        return block


# A 5x7 pixel font: rows of five bits per glyph, for names on cells without video.
_GLYPHS = {
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110",
    "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
    "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}
_FONT = {
    c: np.array([[bit == "1" for bit in row] for row in rows.split()], dtype=bool)
    for c, rows in _GLYPHS.items()
}

# (Y, U, V) backgrounds for cells without video, picked by identity: muted colours under
# white text.
_BACKGROUNDS = (
    (70, 150, 110),
    (60, 110, 150),
    (75, 100, 120),
    (65, 140, 140),
    (80, 120, 100),
    (55, 160, 125),
)


def label_text(name: str) -> str:
    """``name`` in the font's characters: accents dropped, upper case, others as spaces."""
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().upper()
    return " ".join("".join(c if c in _FONT else " " for c in plain).split())


def draw_label(y: Plane, u: Plane, v: Plane, key: str, name: str) -> None:
    """Fill a cell's planes (``y`` full size, ``u``/``v`` half size) with a background picked
    by ``key`` and ``name`` centred in white, as large as fits (at most 1/5 of the height)."""
    yc, uc, vc = _BACKGROUNDS[zlib.crc32(key.encode()) % len(_BACKGROUNDS)]
    y[:] = yc
    u[:] = uc
    v[:] = vc
    text = label_text(name)
    h, w = y.shape
    if not text:
        return
    per_char = 6  # five columns and a space
    scale = min(h // 5 // 7, w * 9 // 10 // (per_char * len(text)))
    if scale < 1:
        text = text[: max(1, w * 9 // 10 // per_char)]
        scale = 1
    text_w = (per_char * len(text) - 1) * scale
    x0, y0 = (w - text_w) // 2, (h - 7 * scale) // 2
    for i, c in enumerate(text):
        glyph = np.kron(_FONT[c], np.ones((scale, scale), dtype=bool))
        gx = x0 + i * per_char * scale
        region = y[y0 : y0 + 7 * scale, gx : gx + 5 * scale]
        region[glyph[: region.shape[0], : region.shape[1]]] = 235
