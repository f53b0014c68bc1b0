"""What identifies a test clip (``ClipSpec``) and one encoded frame of it (``EncodedPacket``)."""

from __future__ import annotations

import fractions
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Final, Literal

#: Version of the clip format; part of every cache key (``media.clip`` writes the files).
FORMAT: Final = b"RALLYPOINT-CLIP 2\n"
AUDIO_RATE = 48000
AUDIO_FRAME_SAMPLES = 960  # 20 ms at 48 kHz

VideoCodec = Literal["vp8", "h264"]
AudioPattern = Literal["tone", "beeps"]
BEEP_SAMPLES = 4800  # a beep lasts 100 ms, from each whole second of clip time


@dataclass(frozen=True, slots=True)
class ClipSpec:
    """Everything that determines a clip's bytes (and its cache key)."""

    publisher_id: int = 0
    """Selects the box colour, texture, tone frequency and the id in the frame marker (0-255)."""
    seconds: float = 4.0
    codec: VideoCodec = "vp8"
    width: int = 640
    height: int = 480
    fps: int = 30
    video_bitrate: int = 800_000
    audio: AudioPattern = "tone"
    """``tone``: a steady tone; ``beeps``: the tone for 100 ms from each whole second of clip
    time, silence otherwise (to measure audio/video alignment: a beep starts with frame
    ``k * fps``)."""

    @property
    def frame_count(self) -> int:
        """Video frames in the clip."""
        return round(self.seconds * self.fps)

    @property
    def audio_frame_count(self) -> int:
        """20 ms Opus frames in the clip."""
        return round(self.seconds * AUDIO_RATE / AUDIO_FRAME_SAMPLES)

    @property
    def video_time_base(self) -> fractions.Fraction:
        """Time base of video pts: one tick per frame."""
        return fractions.Fraction(1, self.fps)

    @property
    def audio_time_base(self) -> fractions.Fraction:
        """Time base of audio pts: one tick per sample at 48 kHz."""
        return fractions.Fraction(1, AUDIO_RATE)

    def cache_key(self) -> str:
        """A file-name-safe digest of the format version and every field."""
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(FORMAT + text).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class EncodedPacket:
    """One encoded frame: what ``av.Packet`` carries that RTP packetization needs."""

    data: bytes
    pts: int
    """In the stream's time base (:attr:`ClipSpec.video_time_base` or ``audio_time_base``)."""
    keyframe: bool
