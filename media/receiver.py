"""Consume a received track and count what decodes, for assertions in tests.

:class:`FrameCounter` reads decoded frames from an aiortc ``RemoteStreamTrack`` in a task
it owns. For video it also reads the :mod:`media.marker` band of each frame, which makes
"decodable" an honest measure:

* A frame counts as *intact* only if its marker reads back, belongs to the expected
  publisher and shows the clip frame index that its RTP timestamp implies. A frame the
  decoder produced from a missing reference (garbage, or a stale picture) fails this.
* The *expected* number of frames in the measurement window is derived from RTP
  timestamps (the publisher's pts step one frame period per frame, looping included):
  ``(last_ts - first_ts) / period + 1`` between the first and last intact frame of the
  window. A frame the receiver never decodes is a gap and counts against the fraction.

* A stream that stalls must not look perfect: frames that are overdue, i.e. would have
  arrived more than ``max_delay`` seconds after the last intact frame at the frame rate,
  count as expected too.

``decodable_fraction = intact / (expected + overdue)``. The publisher track's
``frames_sent`` is a further cross-check (decoded frames lag it by the path latency).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError

from media.marker import read_marker

RTP_VIDEO_CLOCK = 90000


@dataclass
class VideoCounts:
    """Video frames seen by a :class:`FrameCounter`."""

    frames: int = 0
    """Decoded frames."""
    intact: int = 0
    """Decoded frames whose marker matches (see module docstring), in the current window."""
    corrupt: int = 0
    """Decoded frames whose marker is unreadable or wrong, in the current window."""
    sizes: dict[tuple[int, int], int] = field(default_factory=dict)
    """(width, height) -> number of frames of that size."""
    publishers: set[int] = field(default_factory=set)
    """Publisher ids read from frame markers."""
    first_ts: int | None = None
    """RTP timestamp (relative to the first received) of the window's first intact frame."""
    last_ts: int | None = None
    """RTP timestamp of the window's last intact frame."""
    ts_per_frame: int = RTP_VIDEO_CLOCK // 30
    last_intact_at: float | None = None
    """Event loop time at which the window's last intact frame was decoded."""

    @property
    def expected(self) -> int:
        """Frames the publisher sent between the first and last intact frame of the window."""
        if self.first_ts is None or self.last_ts is None:
            return 0
        return (self.last_ts - self.first_ts) // self.ts_per_frame + 1


class FrameCounter:
    """Counts decoded frames of one received track (audio or video).

    Use ``start()`` once the track exists (``pc.on("track")``), ``await stop()`` at the end.
    ``publisher_id``, if given, is the id every video frame's marker must show.
    ``fps`` is the publisher's frame rate (RTP timestamps step 90000/fps per frame).
    """

    def __init__(self, track: Any, *, publisher_id: int | None = None, fps: int = 30) -> None:
        self.track = track
        self.kind: str = track.kind
        self.publisher_id = publisher_id
        self.video = VideoCounts(ts_per_frame=RTP_VIDEO_CLOCK // fps)
        self.audio_frames = 0
        """Decoded audio frames (20 ms each for Opus from aiortc)."""
        self.audio_samples = 0
        self.first_frame_at: float | None = None
        """Event loop time of the first decoded frame."""
        self.ended = False
        """True once the track ended (sender stopped or connection closed)."""
        self._first_index: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()

    @property
    def frames(self) -> int:
        """Decoded frames so far (video or audio, whichever this track is)."""
        return self.video.frames if self.kind == "video" else self.audio_frames

    def start(self) -> None:
        """Start consuming the track in a task owned by this object."""
        if self._task is not None:
            raise RuntimeError("FrameCounter already started")
        self._task = asyncio.create_task(self._run(), name=f"FrameCounter({self.kind})")

    async def stop(self) -> None:
        """Stop consuming; re-raises an unexpected error from the consuming task."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def wait_for_frames(self, count: int, timeout: float) -> None:
        """Wait until ``count`` frames have been decoded; TimeoutError after ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                while self.frames < count:
                    if self.ended:
                        raise RuntimeError(f"{self.kind} track ended after {self.frames} frames")
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{self.kind}: {self.frames} of {count} frames decoded in {timeout} s"
            ) from None

    def reset_window(self) -> None:
        """Start a new measurement window for :meth:`decodable_fraction`."""
        self.video.intact = self.video.corrupt = 0
        self.video.first_ts = self.video.last_ts = None
        self.video.last_intact_at = None
        self._first_index = None

    def decodable_fraction(self, max_delay: float = 0.5) -> float:
        """Intact frames / frames expected in the window so far (0.0 before any intact frame).

        Frames more than ``max_delay`` s overdue since the last intact frame count as lost.
        """
        counts = self.video
        if counts.last_intact_at is None:
            return 0.0
        late = asyncio.get_running_loop().time() - counts.last_intact_at - max_delay
        overdue = max(0, int(late * RTP_VIDEO_CLOCK / counts.ts_per_frame))
        return counts.intact / (counts.expected + overdue)

    async def _run(self) -> None:
        try:
            while True:
                frame = await self.track.recv()
                if self.first_frame_at is None:
                    self.first_frame_at = asyncio.get_running_loop().time()
                if isinstance(frame, av.VideoFrame):
                    self._count_video(frame)
                elif isinstance(frame, av.AudioFrame):
                    self.audio_frames += 1
                    self.audio_samples += frame.samples
                self._progress.set()
        except MediaStreamError:
            self.ended = True
            self._progress.set()

    def _count_video(self, frame: av.VideoFrame) -> None:
        counts = self.video
        counts.frames += 1
        size = (frame.width, frame.height)
        counts.sizes[size] = counts.sizes.get(size, 0) + 1
        if frame.format.name != "yuv420p":
            frame = frame.reformat(format="yuv420p")
        plane = frame.planes[0]
        marker = read_marker(memoryview(plane), plane.line_size, frame.width)
        ts = frame.pts
        if marker is None or ts is None:
            counts.corrupt += 1
            return
        counts.publishers.add(marker.publisher_id)
        if self.publisher_id is not None and marker.publisher_id != self.publisher_id:
            counts.corrupt += 1
            return
        if counts.first_ts is None or self._first_index is None:
            counts.first_ts = ts
            self._first_index = marker.index
        elapsed = (ts - counts.first_ts) // counts.ts_per_frame
        if (self._first_index + elapsed) % marker.frame_count != marker.index:
            counts.corrupt += 1
            return
        counts.intact += 1
        counts.last_ts = ts
        counts.last_intact_at = asyncio.get_running_loop().time()
