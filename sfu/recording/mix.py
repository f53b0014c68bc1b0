"""The mixed file of a recording: ``python -P -m sfu.recording.mix <recording directory>``.

A background job, never run on a media worker: it lowers its own priority, reads the
recording's ``manifest.json``, marks ``mixed`` as pending, decodes every segment, places it
on the recording's clock and writes ``mixed.webm`` (VP8 grid of the participants' videos at
:data:`FPS` fps plus their Opus audio, summed) or, for an audio-only recording,
``mixed.ogg``. Then it marks ``mixed`` as done or failed. See docs/RECORDING.md.

It streams through the timeline: at most two decoded frames per video segment being shown
and one decoded audio frame per audio segment being heard are held, plus one picture and
one tick of audio. A segment whose file is missing or fails to decode is skipped (from the
point where it failed) and named in ``mixed.error``; the mix fails only if nothing at all
could be decoded, or past its CPU budget.

Exit codes: 0 done (``mixed.error`` may list skipped segments), 1 failed (the manifest says
why), 2 not started (no usable manifest, the recording still running, another mix of it
running; the manifest is left alone). Each failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import signal
import sys
import time
from collections.abc import Generator
from fractions import Fraction
from pathlib import Path
from types import FrameType
from typing import Any

import av
import av.error
import numpy as np
from av.video.reformatter import VideoReformatter

from sfu.recording.mixplan import (
    SAMPLE_RATE,
    Cell,
    Limiter,
    ManifestError,
    Plan,
    Plane,
    Samples,
    Segment,
    draw_label,
    fit,
    plan,
)

WIDTH, HEIGHT = 1280, 720
FPS = 15
"""Output frame rate. 15, not 30: every camera is shrunk to a quarter of the picture or less,
where a meeting's motion looks the same at 15 fps, and it halves the job's encoding CPU (the
bulk of its cost) and the file's size."""
AUDIO_TICK = 0.1
"""Seconds of audio mixed per step of an audio-only recording."""
VIDEO_BIT_RATE = 1_500_000
AUDIO_BIT_RATE = 64_000
BLACK = (16, 128, 128)
CPU_SECONDS_BASE = 60.0
CPU_SECONDS_PER_SECOND = 1.0
CPU_SECONDS_PER_VIDEO_SECOND = 0.5
"""Default CPU budget: base, plus per second of timeline 1 s and 0.5 s per participant with
video: over ten times the measured cost (docs/RECORDING.md), to catch a job that runs away,
not a slow machine."""

MAX_BAD_RUN = 100
"""Packets in a row that fail to decode before the rest of a segment is given up."""
SHORT_BY = 1.0
"""Seconds a complete segment's frames may end before its declared end without a note."""

_DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError)


class MixFailed(Exception):
    """The mix cannot be made; the message goes into ``mixed.error``."""


class _CpuLimit(Exception):
    pass


class _Stopped(Exception):
    pass


# --- decoding -------------------------------------------------------------------------


class _Decoded:
    """A segment's decoded frames in order, as (seconds on the recording's clock, frame).

    Opened on first use; a missing or undecodable file, or an error part way, ends it and
    leaves a note. Frames past the segment's cap are dropped (a corrupt timestamp cannot
    stretch the timeline).
    """

    def __init__(self, directory: Path, segment: Segment, notes: list[str]) -> None:
        self.segment = segment
        self._path = directory / segment.file
        self._notes = notes
        self._frames: Generator[tuple[float, Any]] | None = None
        self.decoded = 0
        self.bad = 0
        """Packets that did not decode."""
        self.last = segment.start
        self.ended = False

    def next(self) -> tuple[float, Any] | None:
        if self.ended:
            return None
        if self._frames is None:
            self._frames = self._decode()
        try:
            item = next(self._frames)
        except StopIteration:
            item = None
            seg = self.segment
            if self.bad:
                self._notes.append(f"{seg.file}: {self.bad} damaged frames left out")
            if seg.complete and self.decoded and self.last < seg.end - SHORT_BY:
                done, declared = self.last - seg.start, seg.duration
                self._notes.append(f"{seg.file}: ends at {done:.1f} s of {declared:.1f} s")
        except _DECODE_ERRORS as e:
            self._note(e)
            item = None
        if item is None:
            self.ended = True
            self._frames = None
            return None
        self.decoded += 1
        self.last = item[0]
        return item

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None
        self.ended = True

    def _note(self, e: Exception) -> None:
        what = _reason(e)
        name = self.segment.file
        if self.decoded == 0:
            self._notes.append(f"{name}: skipped ({what})")
        else:
            cut = self.last - self.segment.start
            self._notes.append(f"{name}: cut at {cut:.1f} s ({what})")

    def _decode(self) -> Generator[tuple[float, Any]]:
        seg = self.segment
        with av.open(str(self._path), "r") as container:
            streams = container.streams.video if seg.kind == "video" else container.streams.audio
            if not streams:
                raise ValueError(f"no {seg.kind} stream")
            stream: Any = streams[0]
            stream.codec_context.thread_count = 1
            # The file's time 0 is its first packet (the manifest's `start`), even if that
            # packet does not decode.
            origin: float | None = None
            if stream.start_time is not None:
                origin = float(stream.start_time * stream.time_base)
            bad_run = 0
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    # One damaged frame costs that frame (and what refers to it until the
                    # next keyframe), not the rest of the segment; a long run of them ends it.
                    self.bad += 1
                    bad_run += 1
                    if bad_run > MAX_BAD_RUN:
                        raise
                    continue
                bad_run = 0
                for frame in frames:
                    t = frame.time
                    if t is None:
                        continue
                    if origin is None:
                        origin = t
                    at = seg.start + (t - origin)
                    if at > seg.cap:
                        return
                    yield at, frame


def _reason(e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return "file missing"
    if isinstance(e, av.error.FFmpegError):
        return e.strerror or type(e).__name__
    return str(e) or type(e).__name__


class VideoSource:
    """One video segment seen at successive times: the latest frame not after ``t``."""

    def __init__(self, decoded: _Decoded) -> None:
        self.decoded = decoded
        self.current: tuple[float, Any] | None = None
        self.pending: tuple[float, Any] | None = None
        self._interval = 1 / 30

    def at(self, t: float) -> Any:
        """The frame to show at ``t`` (None when the segment is not on then)."""
        seg = self.decoded.segment
        if t < seg.start:
            return None
        while True:
            if self.pending is None and not self.decoded.ended:
                self.pending = self.decoded.next()
            if self.pending is None or self.pending[0] > t:
                break
            if self.current is not None:
                self._interval = min(0.5, max(1 / 60, self.pending[0] - self.current[0]))
            self.current, self.pending = self.pending, None
        if self.current is None:
            return None
        if self.pending is None and t >= self.end:
            self.current = None  # over: let the frame go
            return None
        return self.current[1]

    @property
    def end(self) -> float:
        """Until when the segment shows: its declared end, or once its frames ran out, one
        frame after the last (a file cut short shows black, not a frozen picture)."""
        if not self.decoded.ended:
            return self.decoded.segment.end
        return self.current[0] + self._interval if self.current else 0.0

    def finished(self, t: float) -> bool:
        return self.decoded.ended and self.pending is None and t >= self.end


class AudioSource:
    """One audio segment as mono float samples at their place on the recording's clock."""

    def __init__(self, decoded: _Decoded) -> None:
        self.decoded = decoded
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        self._chunk: tuple[int, Samples] | None = None
        self._cursor: int | None = None

    def add_into(self, mix: Samples, start: int) -> None:
        """Add what this segment holds for samples ``start .. start + len(mix)``."""
        end = start + len(mix)
        while True:
            if self._chunk is None:
                self._chunk = self._next()
                if self._chunk is None:
                    return
            pos, samples = self._chunk
            if pos >= end:
                return
            lo, hi = max(pos, start), min(pos + len(samples), end)
            if hi > lo:
                mix[lo - start : hi - start] += samples[lo - pos : hi - pos]
            if pos + len(samples) > end:
                return
            self._chunk = None

    def finished(self) -> bool:
        return self.decoded.ended and self._chunk is None

    def _next(self) -> tuple[int, Samples] | None:
        while True:
            item = self.decoded.next()
            if item is None:
                return None
            at, frame = item
            out = self._resampler.resample(frame)
            if not out:
                continue
            samples = np.concatenate([f.to_ndarray().reshape(-1) for f in out]).astype(
                np.float32, copy=False
            )
            # Samples follow each other unless the timestamps jump (a gap in the packets,
            # e.g. discontinuous transmission): then they go where the timestamp says.
            pos = round(at * SAMPLE_RATE)
            if self._cursor is not None and abs(pos - self._cursor) <= SAMPLE_RATE // 50:
                pos = self._cursor
            self._cursor = pos + len(samples)
            return pos, samples


# --- the picture -----------------------------------------------------------------------


class Canvas:
    """The output picture (yuv420p planes), redrawn cell by cell when a cell changes."""

    def __init__(self, cells: tuple[Cell, ...]) -> None:
        self.buffer = np.empty(WIDTH * HEIGHT * 3 // 2, dtype=np.uint8)
        n = WIDTH * HEIGHT
        self.y = self.buffer[:n].reshape(HEIGHT, WIDTH)
        self.u = self.buffer[n : n + n // 4].reshape(HEIGHT // 2, WIDTH // 2)
        self.v = self.buffer[n + n // 4 :].reshape(HEIGHT // 2, WIDTH // 2)
        self.y[:], self.u[:], self.v[:] = BLACK
        self._shown: dict[str, object] = {}
        # One scaler per cell: it keeps its swscale context while the size stays the same.
        self._scalers: dict[str, VideoReformatter] = {}
        self._sizes: dict[str, tuple[int, int] | None] = {}
        for cell in cells:
            if not cell.video:
                draw_label(*self._planes(cell), cell.identity or cell.participant, cell.name)

    def _planes(self, cell: Cell) -> tuple[Plane, Plane, Plane]:
        r = cell.rect
        x, y, w, h = r.x // 2, r.y // 2, r.w // 2, r.h // 2
        return (
            self.y[r.y : r.y + r.h, r.x : r.x + r.w],
            self.u[y : y + h, x : x + w],
            self.v[y : y + h, x : x + w],
        )

    def show(self, cell: Cell, frame: Any) -> None:
        """Put ``frame`` (or black, for None) in ``cell``, unless it is there already."""
        if self._shown.get(cell.participant) is frame:
            return
        self._shown[cell.participant] = frame
        py, pu, pv = self._planes(cell)
        size = fit(frame.width, frame.height, cell.rect.w, cell.rect.h) if frame else None
        if size is None or self._sizes.get(cell.participant) != size:
            py[:], pu[:], pv[:] = BLACK  # the bars around a picture of another shape
            self._sizes[cell.participant] = size
        if frame is None or size is None:
            return
        w, h = size
        scaler = self._scalers.setdefault(cell.participant, VideoReformatter())
        scaled = scaler.reformat(frame, width=w, height=h, format="yuv420p", interpolation="AREA")
        flat = scaled.to_ndarray().reshape(-1)
        ox, oy = ((cell.rect.w - w) // 2) & ~1, ((cell.rect.h - h) // 2) & ~1
        n, c = w * h, (w // 2) * (h // 2)
        py[oy : oy + h, ox : ox + w] = flat[:n].reshape(h, w)
        cx, cy = ox // 2, oy // 2
        pu[cy : cy + h // 2, cx : cx + w // 2] = flat[n : n + c].reshape(h // 2, w // 2)
        pv[cy : cy + h // 2, cx : cx + w // 2] = flat[n + c : n + 2 * c].reshape(h // 2, w // 2)

    def frame(self) -> av.VideoFrame:
        return av.VideoFrame.from_ndarray(self.buffer.reshape(HEIGHT * 3 // 2, WIDTH), "yuv420p")


# --- the job ---------------------------------------------------------------------------


def mix(directory: Path, p: Plan, output: Path, cpu_seconds: float) -> list[str]:
    """Write the mixed file of ``p`` to ``output``; the notes on skipped segments.

    Raises :class:`MixFailed` when nothing could be decoded or the CPU budget ran out.
    """
    if not p.segments:
        raise MixFailed("the recording holds no segments")
    notes: list[str] = []
    deadline = time.process_time() + cpu_seconds
    videos = {
        c.participant: [VideoSource(_Decoded(directory, s, notes)) for s in c.video]
        for c in p.cells
    }
    audios = [AudioSource(_Decoded(directory, s, notes)) for s in p.audio]
    sources = [v.decoded for vs in videos.values() for v in vs] + [a.decoded for a in audios]
    try:
        _write(p, output, videos, audios, deadline, cpu_seconds)
    finally:
        for d in sources:
            d.close()
    if not any(d.decoded for d in sources):
        raise MixFailed("no segment could be decoded" + (": " + "; ".join(notes) if notes else ""))
    return notes


def _write(
    p: Plan,
    output: Path,
    videos: dict[str, list[VideoSource]],
    audios: list[AudioSource],
    deadline: float,
    cpu_seconds: float,
) -> None:
    cells = p.cells
    step = AUDIO_TICK if p.audio_only else 1 / FPS
    with av.open(str(output), "w", format="ogg" if p.audio_only else "webm") as out:
        a_out = out.add_stream("libopus", rate=SAMPLE_RATE, layout="mono")
        a_out.bit_rate = AUDIO_BIT_RATE
        canvas: Canvas | None = None
        if not p.audio_only:
            v_out = out.add_stream("libvpx", rate=FPS)
            v_out.width, v_out.height, v_out.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            v_out.bit_rate = VIDEO_BIT_RATE
            v_out.thread_count = 1
            # The encoder is most of the job's cost. "good" at cpu-used 5 costs 58% of
            # "realtime" at 8 for about the same PSNR on a grid (measured: RECORDING.md).
            v_out.options = {"deadline": "good", "cpu-used": "5"}
            canvas = Canvas(cells)
        limiter = Limiter()
        tick = 0
        while True:
            if time.process_time() > deadline:
                raise MixFailed(f"gave up after {cpu_seconds:.0f} s of CPU")
            t0, t1 = tick * step, (tick + 1) * step
            # Audio for [t0, t1): every segment heard then, summed, then limited.
            a0, a1 = round(t0 * SAMPLE_RATE), round(t1 * SAMPLE_RATE)
            block = np.zeros(a1 - a0, dtype=np.float32)
            for source in audios:
                if not source.finished() and source.decoded.segment.start < t1:
                    source.add_into(block, a0)
            frame = av.AudioFrame.from_ndarray(
                limiter.process(block).reshape(1, -1), format="flt", layout="mono"
            )
            frame.sample_rate = SAMPLE_RATE
            frame.pts, frame.time_base = a0, Fraction(1, SAMPLE_RATE)
            out.mux(a_out.encode(frame))
            if canvas is not None:
                for cell in cells:
                    if cell.video:  # a cell without any video keeps its label
                        canvas.show(cell, _pick(videos[cell.participant], t0))
                picture = canvas.frame()
                picture.pts, picture.time_base = tick, Fraction(1, FPS)
                out.mux(v_out.encode(picture))
            tick += 1
            if t1 >= p.duration and _all_finished(videos, audios, t1):
                break
        out.mux(a_out.encode(None))
        if canvas is not None:
            out.mux(v_out.encode(None))


def _pick(sources: list[VideoSource], t: float) -> Any:
    """The frame a participant shows at ``t``: the screen if they share one, else the camera,
    the later segment winning; every source moves on to ``t`` either way."""
    shown, rank = None, -1
    for source in sources:
        frame = source.at(t)
        if frame is None:
            continue
        r = 1 if source.decoded.segment.source == "screen" else 0
        if r >= rank:
            shown, rank = frame, r
    return shown


def _all_finished(
    videos: dict[str, list[VideoSource]], audios: list[AudioSource], t: float
) -> bool:
    return all(v.finished(t) for vs in videos.values() for v in vs) and all(
        a.finished() for a in audios
    )


# --- the manifest and the command --------------------------------------------------------


def _read_manifest(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "manifest.json").read_bytes())
    except FileNotFoundError:
        raise ManifestError(f"no manifest.json in {directory}") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"manifest.json unreadable: {e}") from None
    if not isinstance(data, dict):
        raise ManifestError("manifest.json is not a JSON object")
    return data


def set_mixed(directory: Path, file: str, status: str, error: str | None) -> None:
    """Rewrite the manifest's ``mixed`` (and nothing else) atomically: temp file + replace."""
    manifest = _read_manifest(directory)
    manifest["mixed"] = {"file": file, "status": status, "error": error}
    temp = directory / f".manifest.json.mix-{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, directory / "manifest.json")


def _on_cpu_limit(signum: int, frame: FrameType | None) -> None:
    raise _CpuLimit


def _on_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def run(directory: Path, cpu_seconds: float | None = None) -> int:
    """The job: returns the exit code (see the module docstring)."""
    try:
        p = plan(_read_manifest(directory), WIDTH, HEIGHT)
    except ManifestError as e:
        print(f"mix: {directory.name}: {e}", file=sys.stderr)
        return 2
    budget = cpu_seconds
    if budget is None:
        videos = sum(1 for c in p.cells if c.video)
        per_second = CPU_SECONDS_PER_SECOND + CPU_SECONDS_PER_VIDEO_SECOND * videos
        budget = CPU_SECONDS_BASE + per_second * p.duration
    # The kernel's limit backs the loop's own check up, for a decoder stuck in one call:
    # SIGXCPU (-> failed) a little later, SIGKILL later still (the manifest stays pending).
    soft = int(budget) + 10
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or hard > soft + 10:
        hard = soft + 10
    resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))  # never above a limit set
    signal.signal(signal.SIGXCPU, _on_cpu_limit)
    # Stopped (e.g. the server shutting down): say so in the manifest, so that it does not
    # stay pending and a later run may start again.
    signal.signal(signal.SIGTERM, _on_stop)
    signal.signal(signal.SIGINT, _on_stop)

    name = "mixed.ogg" if p.audio_only else "mixed.webm"
    # One job per recording: a lock on the directory itself (no lock file to list or clean
    # up), held until this process exits.
    lock = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"mix: {directory.name}: another mix of this recording is running", file=sys.stderr
            )
            return 2
        set_mixed(directory, name, "pending", None)
        partial = directory / f".{name}.part"
        try:
            notes = mix(directory, p, partial, budget)
        except (MixFailed, _CpuLimit, _Stopped, *_DECODE_ERRORS) as e:
            if isinstance(e, _CpuLimit):
                error = f"gave up after {budget:.0f} s of CPU"
            elif isinstance(e, _Stopped):
                error = "stopped by a signal"
            elif isinstance(e, MixFailed):
                error = str(e)
            else:
                error = f"writing {name}: {_reason(e)}"
            with contextlib.suppress(OSError):
                partial.unlink()
            set_mixed(directory, name, "failed", error[:500])
            print(f"mix: {directory.name}: {error}", file=sys.stderr)
            return 1
        except Exception as e:  # a bug: fail the mix in the manifest, then the traceback
            with contextlib.suppress(OSError):
                partial.unlink()
            set_mixed(directory, name, "failed", f"internal error ({type(e).__name__})")
            raise
        os.replace(partial, directory / name)
        set_mixed(directory, name, "done", "; ".join(notes)[:500] if notes else None)
        if notes:
            print(f"mix: {directory.name}: done, but {'; '.join(notes)}", file=sys.stderr)
        return 0
    finally:
        os.close(lock)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sfu.recording.mix", description="Write a recording's mixed file."
    )
    parser.add_argument("directory", type=Path, help="the recording's directory")
    parser.add_argument(
        "--cpu-seconds",
        type=float,
        default=None,
        help="give up after this much CPU time (default: 60, plus 1 and 0.5 per participant"
        " with video for each second of recording)",
    )
    args = parser.parse_args(argv)
    os.nice(19)  # a background job: the media workers and signaling come first
    try:
        return run(args.directory, args.cpu_seconds)
    except (_Stopped, _CpuLimit, OSError, ManifestError) as e:
        # Outside the mix itself: a signal between two steps, or the manifest not writable
        # (or changed under it).
        what = str(e) if isinstance(e, ManifestError) else "stopped"
        what = _reason(e) if isinstance(e, OSError) else what
        print(f"mix: {args.directory.name}: {what}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
