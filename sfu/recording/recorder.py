"""A room's recording: taps on its tracks (event loop side) and a writer thread (disk side).

The forwarding path only appends ``(seq, ts, marker, payload, arrival)`` to a track's
``TrackTap`` (and sender reports to its ``reports``). The room's 250 ms tick calls
``RoomRecorder.flush``, which hands every tap's list over to the recording's writer thread in
one batch. The thread assembles frames (``assembler``), maps them to the common clock
(``clock``), muxes them (``writer``) and keeps ``manifest.json`` (``manifest``), so forwarding
never waits on the disk. The thread talks back only through ``loop.call_soon_threadsafe``:
keyframe requests, and the end of a recording it stopped by itself (size limit, full disk,
error).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import av

from ..h264 import sps_size as h264_size
from ..vp8 import frame_size as vp8_size
from .assembler import FrameAssembler, Packet
from .clock import PublisherClock, TrackClock
from .depacketize import opus_lost, opus_samples
from .manifest import Manifest
from .tap import Report, TrackTap
from .writer import SegmentFile, extension

log = logging.getLogger("rallypoint.sfu.recording")

VIDEO_RATE: Final = 90000
AUDIO_RATE: Final = 48000
#: Space kept aside in the recording's directory while it runs (a file of zeros), freed when it
#: ends: on a full disk the files still get their trailers and the manifest its last write.
RESERVE_BYTES: Final = 64 * 1024
RESERVE_NAME: Final = ".reserve"
#: Below this much free space the recording stops (disk_full) before a write can fail, so its
#: files end with their trailers (index, duration).
MIN_FREE_BYTES: Final = 1024 * 1024
#: Lost Opus packets in a row replaced by concealment packets (10 min at 20 ms); a longer gap
#: (the publisher stopped sending) stays a gap.
MAX_CONCEALED: Final = 30_000


@dataclass(frozen=True, slots=True)
class TrackSpec:
    """A recorded track, as the manifest names it."""

    track: str
    participant: str
    identity: str
    name: str
    kind: str  # audio | video
    source: str
    codec: str  # vp8 | h264 | opus


class _Segment:
    """One segment being written (thread side)."""

    def __init__(self, spec: TrackSpec, assembler: FrameAssembler, clock: TrackClock) -> None:
        self.spec = spec
        self.assembler = assembler
        self.clock = clock
        self.audio = spec.kind == "audio"
        self.rate = AUDIO_RATE if self.audio else VIDEO_RATE
        self.last_packet = b""  # the last Opus packet written
        self.file: SegmentFile | None = None
        self.entry: dict[str, Any] | None = None  # its manifest entry, once it has a file
        self.first_ts = 0
        self.last_pts = -1
        self.step = 960 if spec.kind == "audio" else 3000  # last frame's duration (ticks)
        self.frames = 0
        self.bytes = 0


class RecordingThread:
    """The writer thread of one recording: commands in through a queue, files out."""

    def __init__(
        self,
        manifest: Manifest,
        max_bytes: int,
        loop: asyncio.AbstractEventLoop,
        request_keyframe: Callable[[str], None],
        finished: Callable[[str], None],
        started: Callable[[], None],
        min_free: int = MIN_FREE_BYTES,
    ) -> None:
        self.manifest = manifest
        self.min_free = min_free
        self.started = started
        self.max_bytes = max_bytes
        self.loop = loop
        self.request_keyframe = request_keyframe
        self.finished = finished
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.segments: dict[int, _Segment] = {}
        self.publishers: dict[str, PublisherClock] = {}
        self.bytes = 0
        self.thread = threading.Thread(target=self._run, name=f"record-{manifest.id}", daemon=True)

    # -- called from the loop ------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def put(self, *command: Any) -> None:
        self.queue.put(command)

    # -- the thread ----------------------------------------------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody to tell
            pass

    def _run(self) -> None:
        reason = "error"
        failed = True  # a write failed: the files may lack their ends
        try:
            os.makedirs(self.manifest.directory, exist_ok=True)
            with open(self._reserve, "wb") as f:
                f.write(bytes(RESERVE_BYTES))
            self.manifest.write()
            self._call(self.started)
            reason = self._loop()
            failed = False
        except (OSError, av.FFmpegError) as e:
            log.warning("recording %s: %s", self.manifest.id, e)
            reason = "disk_full" if getattr(e, "errno", None) == errno.ENOSPC else "error"
        except Exception:
            log.exception("recording %s failed", self.manifest.id)
            reason = "error"
        self._finish(reason, failed=failed)
        self._call(self.finished, reason)

    @property
    def _reserve(self) -> str:
        return os.path.join(self.manifest.directory, RESERVE_NAME)

    def _loop(self) -> str:
        """Carry out commands until a stop (its reason) or a limit."""
        while True:
            command = self.queue.get()
            op = command[0]
            if op == "open":
                _, key, spec = command
                self._open(key, spec)
            elif op == "batch":
                if reason := self._batch(command[1], final=False):
                    return reason
            elif op == "close":
                _, key, packets, reports = command
                if reason := self._batch([(key, packets, reports)], final=True):
                    return reason
                seg = self.segments.pop(key, None)
                if seg is not None:
                    self._close(seg)
                    self._write_manifest()
            elif op == "stop":
                return str(command[1])

    def _open(self, key: int, spec: TrackSpec) -> None:
        publisher = self.publishers.get(spec.participant)
        if publisher is None:
            publisher = self.publishers[spec.participant] = PublisherClock()
        rate = AUDIO_RATE if spec.kind == "audio" else VIDEO_RATE
        track = spec.track

        def keyframe() -> None:
            self._call(self.request_keyframe, track)

        self.segments[key] = _Segment(
            spec, FrameAssembler(spec.codec, keyframe), TrackClock(rate, publisher)
        )

    def _batch(
        self, items: list[tuple[int, list[Packet], list[Report]]], final: bool
    ) -> str | None:
        """Feed packets and reports; write the frames they complete. A reason to stop: the
        size limit, or a disk about to be full."""
        st = os.statvfs(self.manifest.directory)
        if st.f_bavail * st.f_frsize < self.min_free:
            return "disk_full"
        now = time.time()
        started = False
        for key, packets, reports in items:
            seg = self.segments.get(key)
            if seg is None:
                continue
            for ntp, rtp_ts, arrival in reports:
                seg.clock.sender_report(ntp, rtp_ts, arrival)
            push = seg.assembler.push
            for p in packets:
                push(p)
            for frame in seg.assembler.pop(now, final=final):
                if seg.file is None:
                    started |= self._start(seg, frame.data)
                    seg.first_ts = frame.ts
                    seg.clock.anchor(frame.ts, frame.arrival)
                    if seg.file is None:
                        continue
                pts = frame.ts - seg.first_ts
                if pts <= seg.last_pts:
                    continue  # not after the last frame: a container would refuse it
                if seg.audio:
                    if seg.last_pts >= 0:
                        self._conceal(seg, pts)
                    seg.step = opus_samples(frame.data)
                    seg.last_packet = frame.data
                elif seg.last_pts >= 0:
                    seg.step = pts - seg.last_pts
                seg.file.write(frame.data, pts, frame.keyframe, seg.step)
                seg.last_pts = pts
                seg.frames += 1
                seg.bytes += len(frame.data)
                self.bytes += len(frame.data)
                if self.bytes >= self.max_bytes:
                    return "size_limit"
        if started:
            self._write_manifest()
        return None

    def _conceal(self, seg: _Segment, pts: int) -> None:
        """Fill a gap in Opus timestamps (packets lost: audio is not repaired) with packets a
        decoder conceals, so the Ogg stream stays continuous: players that ignore the gap
        would otherwise play everything after it early."""
        assert seg.file is not None
        filler = opus_lost(seg.last_packet)
        size = opus_samples(filler)
        at = seg.last_pts + seg.step
        count = (pts - at) // size
        if count <= 0 or count > MAX_CONCEALED:
            return
        for _ in range(count):
            seg.file.write(filler, at, True, size)
            at += size
            seg.frames += 1
        seg.last_pts = at - size
        seg.step = size

    def _start(self, seg: _Segment, data: bytes) -> bool:
        """Create the segment's file for its first frame (a keyframe for video)."""
        spec = seg.spec
        width = height = 0
        if spec.codec == "vp8":
            width, height = vp8_size(data) or (0, 0)
        elif spec.codec == "h264":
            sps = seg.assembler.h264_sps
            if sps is not None:
                width, height = h264_size(sps)
        if spec.kind == "video" and not (width and height):
            return False  # no picture size yet: wait for the next keyframe
        track, number, segment = self.manifest.add_segment(
            spec.track,
            participant=spec.participant,
            identity=spec.identity,
            name=spec.name,
            kind=spec.kind,
            source=spec.source,
            codec=spec.codec,
        )
        filename = f"t{number}-s{segment}.{extension(spec.codec)}"
        seg.entry = track["segments"][-1]
        seg.entry["file"] = filename
        seg.file = SegmentFile(
            os.path.join(self.manifest.directory, filename), spec.codec, width, height
        )
        return True

    def _update(self, seg: _Segment) -> None:
        """Bring the segment's manifest entry up to date."""
        entry = seg.entry
        if entry is None:
            return
        server = seg.clock.to_server(seg.first_ts)
        if server is not None:
            entry["start"] = round(server - self.manifest.started_at / 1000, 3)
        if seg.frames:
            entry["duration"] = round((seg.last_pts + seg.step) / seg.rate, 3)
        entry["frames"] = seg.frames
        entry["bytes"] = seg.bytes

    def _write_manifest(self) -> None:
        for seg in self.segments.values():
            self._update(seg)
        self.manifest.write()

    def _close(self, seg: _Segment) -> None:
        """Close the segment's file; it is complete if that worked (trailer written)."""
        if seg.file is None or seg.entry is None:
            return
        clean = True
        try:
            seg.file.close()
        except (OSError, av.FFmpegError) as e:
            log.warning("recording %s: closing %s: %s", self.manifest.id, seg.file.path, e)
            clean = False
        try:
            seg.bytes = os.path.getsize(seg.file.path)
        except OSError:
            pass
        self._update(seg)
        seg.entry["complete"] = clean

    def _finish(self, reason: str, failed: bool) -> None:
        """Close every file (keeping what was written playable) and write the last manifest.

        After a failed write the space kept aside is freed and the manifest written first (the
        segments not complete), as closing the files may take that space again."""
        try:
            os.unlink(self._reserve)
        except OSError:
            pass
        self.manifest.end(reason)
        if failed:
            try:
                self._write_manifest()
            except OSError as e:
                log.warning("recording %s: the final manifest: %s", self.manifest.id, e)
        for seg in self.segments.values():
            self._close(seg)
        self.segments.clear()
        try:
            self.manifest.write()
        except OSError as e:
            log.warning("recording %s: the final manifest: %s", self.manifest.id, e)


class Recordable(Protocol):
    """What the recorder needs of a published track (``sfu.forward.UpTrack``)."""

    id: str
    publisher: str
    kind: str
    source: str
    codec: str
    tap: TrackTap | None

    def want_keyframe(self, now: float) -> bool: ...


#: Batches (the room's 250 ms ticks: 30 s) the writer thread may be behind before the
#: recording stops taking packets: a disk slower than the media must not grow memory without end.
MAX_BACKLOG = 120


class RoomRecorder:
    """One recording of one room (event loop side): taps, batches, start and stop."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        max_bytes: int,
        loop: asyncio.AbstractEventLoop,
        stopped_by_itself: Callable[[str], None],
        min_free: int = MIN_FREE_BYTES,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self.manifest = manifest
        self.id = manifest.id
        self.audio_only = bool(manifest.doc["audio_only"])
        identities = manifest.doc["identities"]
        self.identities: frozenset[str] | None = (
            frozenset(identities) if identities is not None else None
        )
        self.stopped_by_itself = stopped_by_itself
        self.tracks: dict[str, Recordable] = {}  # track id -> the UpTrack tapped
        self.done: asyncio.Future[str] = loop.create_future()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.stopping = False
        self.max_backlog = max_backlog
        self.overrun = False  # the writer fell too far behind: the recording ends (error)
        self._keys = 0
        self._thread = RecordingThread(
            manifest, max_bytes, loop, self._keyframe, self._finished, self._started, min_free
        )
        self._thread.start()

    async def wait_ready(self) -> bool:
        """Wait until the directory and the first manifest are written; False if that failed
        (the recording is over then)."""
        either: list[asyncio.Future[Any]] = [self.ready, self.done]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        return self.ready.done()

    def _started(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    @property
    def active(self) -> bool:
        return not (self.stopping or self.done.done())

    def wants(self, kind: str, identity: str) -> bool:
        """Whether a track of this kind, published by this identity, is recorded."""
        if self.audio_only and kind != "audio":
            return False
        return self.identities is None or identity in self.identities

    def attach(self, up: Recordable, identity: str, name: str) -> None:
        """Start a segment of ``up`` (a ``sfu.forward.UpTrack``): tap its packets."""
        if not self.active or up.tap is not None:
            return
        self._keys += 1
        spec = TrackSpec(up.id, up.publisher, identity, name, up.kind, up.source, up.codec)
        self._thread.put("open", self._keys, spec)
        up.tap = TrackTap(self._keys)
        self.tracks[up.id] = up
        if up.kind == "video":
            up.want_keyframe(time.monotonic())

    def detach(self, up: Recordable) -> None:
        """End ``up``'s segment (unpublished, or its publisher left)."""
        tap: TrackTap | None = up.tap
        if tap is None:
            return
        up.tap = None
        if self.tracks.get(up.id) is up:
            del self.tracks[up.id]
        if self.active:
            self._thread.put("close", tap.key, tap.packets, tap.reports)

    def flush(self) -> None:
        """Hand every tap's packets to the writer thread (the room's tick)."""
        if not self.active:
            return
        if self._thread.queue.qsize() >= self.max_backlog:
            self._overrun()
            return
        batch = []
        for up in self.tracks.values():
            tap = up.tap
            if tap is not None and (tap.packets or tap.reports):
                batch.append((tap.key, tap.packets, tap.reports))
                tap.packets = []
                tap.reports = []
        if batch:
            self._thread.put("batch", batch)

    async def stop(self, reason: str = "stopped") -> str:
        """End the recording; returns once the final manifest is written. Its reason: this
        one, or the one the thread stopped with by itself before."""
        if self.active:
            self.flush()
            for up in list(self.tracks.values()):
                self.detach(up)
            self.stopping = True
            self._thread.put("stop", reason)
        return await asyncio.shield(self.done)

    def _overrun(self) -> None:
        """The writer thread is ``max_backlog`` batches behind (the disk cannot keep up): stop
        taking packets, so memory stays bounded; what is queued is still written, then the
        recording ends by itself with ``error``."""
        log.warning("recording %s: the writer is too far behind; stopping", self.id)
        self.overrun = True
        for up in list(self.tracks.values()):
            self.detach(up)
        self.stopping = True
        self._thread.put("stop", "error")

    def _untap(self) -> None:
        for up in self.tracks.values():
            up.tap = None
        self.tracks.clear()

    def _keyframe(self, track: str) -> None:
        up = self.tracks.get(track)
        if up is not None:
            up.want_keyframe(time.monotonic())

    def _finished(self, reason: str) -> None:
        """The thread ended (on the loop)."""
        self._untap()
        by_itself = not self.stopping or self.overrun
        self.stopping = True
        if not self.done.done():
            self.done.set_result(reason)
        if by_itself and self.ready.done():
            self.stopped_by_itself(reason)
