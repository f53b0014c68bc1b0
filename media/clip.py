"""Pre-encoded test clips, encoded once and cached on disk.

A clip is the encoded form of :class:`media.pattern.TestPattern` (video) and a tone
(audio) for one publisher id: the normal video stream, an all-intra copy of it (every
frame a keyframe, to answer keyframe requests at any frame) and Opus audio. Encoding a
4 s clip takes about a second; the result is written to a cache directory keyed by every
parameter, so a test session (or several concurrent ones) encodes each clip at most once.

Cache file format (private, versioned by ``FORMAT``): a magic line, then for each of the
three streams a big-endian ``uint32`` packet count followed by the packets, each as
``int64 pts, uint8 keyframe, uint32 length, bytes``.
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from media.clipspec import (
    AUDIO_FRAME_SAMPLES,
    AUDIO_RATE,
    FORMAT,
    ClipSpec,
    EncodedPacket,
    VideoCodec,
)
from media.encoding import encode_audio, encode_video

__all__ = [
    "AUDIO_FRAME_SAMPLES",
    "AUDIO_RATE",
    "Clip",
    "ClipSpec",
    "EncodedPacket",
    "VideoCodec",
    "load_clip",
]

_COUNT = struct.Struct(">I")
_RECORD = struct.Struct(">qBI")
CACHE_ENV = "RALLYPOINT_MEDIA_CACHE"


@dataclass(frozen=True, slots=True)
class Clip:
    """A pre-encoded clip: ``video[i]`` and ``video_intra[i]`` show the same picture."""

    spec: ClipSpec
    video: tuple[EncodedPacket, ...]
    video_intra: tuple[EncodedPacket, ...]
    audio: tuple[EncodedPacket, ...]

    @property
    def video_bitrate(self) -> float:
        """Measured bitrate of the normal video stream in bits per second."""
        return sum(len(p.data) for p in self.video) * 8 / self.spec.seconds


def default_cache_dir() -> Path:
    """``$RALLYPOINT_MEDIA_CACHE``, else ``rallypoint-media`` in the XDG cache directory."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rallypoint-media"


def load_clip(spec: ClipSpec, cache_dir: Path | None = None) -> Clip:
    """Return the clip for ``spec``, from the cache if present, else encode and store it.

    Blocking (CPU-bound for about a second per 4 s of clip when not cached): call it from
    a fixture or through ``asyncio.to_thread``.
    """
    directory = cache_dir if cache_dir is not None else default_cache_dir()
    path = directory / f"{spec.cache_key()}.clip"
    try:
        with path.open("rb") as f:
            return _read(f, spec)
    except (FileNotFoundError, ValueError):
        pass
    clip = encode_clip(spec)
    directory.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, clip)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return clip


def encode_clip(spec: ClipSpec) -> Clip:
    """Encode ``spec`` without touching the cache."""
    return Clip(
        spec=spec,
        video=tuple(encode_video(spec, intra=False)),
        video_intra=tuple(encode_video(spec, intra=True)),
        audio=tuple(encode_audio(spec)),
    )


def _write(f: BinaryIO, clip: Clip) -> None:
    f.write(FORMAT)
    for stream in (clip.video, clip.video_intra, clip.audio):
        f.write(_COUNT.pack(len(stream)))
        for p in stream:
            f.write(_RECORD.pack(p.pts, int(p.keyframe), len(p.data)))
            f.write(p.data)


def _read(f: BinaryIO, spec: ClipSpec) -> Clip:
    data = f.read()
    if not data.startswith(FORMAT):
        raise ValueError("not a clip cache file")
    offset = len(FORMAT)
    streams: list[tuple[EncodedPacket, ...]] = []
    try:
        for _ in range(3):
            (count,) = _COUNT.unpack_from(data, offset)
            offset += _COUNT.size
            packets = []
            for _ in range(count):
                pts, keyframe, length = _RECORD.unpack_from(data, offset)
                offset += _RECORD.size
                if offset + length > len(data):
                    raise ValueError("truncated clip cache file")
                packets.append(EncodedPacket(data[offset : offset + length], pts, bool(keyframe)))
                offset += length
            streams.append(tuple(packets))
    except struct.error as exc:
        raise ValueError("truncated clip cache file") from exc
    video, intra, audio = streams
    if len(video) != spec.frame_count or len(intra) != spec.frame_count:
        raise ValueError("clip cache file does not match its spec")
    return Clip(spec=spec, video=video, video_intra=intra, audio=audio)
