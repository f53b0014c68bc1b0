"""What a simulcast subscriber sees, for tests and ``bench/sfu_switch.py``: decoded frames
(sizes, pauses, pauses at layer switches, unreadable pictures, decoder errors) and the RTP
packets its receiver gets (sequence numbers after NACK repair, VP8 picture ids).

``log_packets`` wraps one client receiver's packet handler (an observer: the receiver goes on
as before; the same aiortc private ``media.tracks`` and ``media.loss`` rely on)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from media.marker import read_marker
from sfu.vp8 import VP8Error, parse


@dataclass
class Switch:
    """A change of decoded picture size: from, to, and the pause between the last frame of
    the old size and the first of the new one (seconds)."""

    old: int
    new: int
    pause: float
    at: float  # time.monotonic() of the first frame of the new size


@dataclass
class Frames:
    """Decoded frames of one subscriber's video track."""

    width: int = 0
    count: int = 0
    unreadable: int = 0  # frames whose test marker does not read back (garbage)
    unreadable_at: list[tuple[int, int]] = field(default_factory=list)  # (frame number, width)
    switches: list[Switch] = field(default_factory=list)
    last_at: float | None = None
    longest_gap: float = 0.0
    widths_since: list[int] = field(default_factory=list)  # widths since mark()
    arrivals: dict[int, float] | None = None  # RTP timestamp -> first packet's arrival
    latency: float = 0.0  # from the frame's first packet's arrival to its decoding (latest)
    lag: float = 0.0  # how far decoding runs behind the stream's own clock now (seconds)
    _origin: float | None = None  # arrival minus media time of the first frame

    def mark(self) -> None:
        """Start measuring ``longest_gap`` and ``widths_since`` from now."""
        self.longest_gap = 0.0
        self.widths_since = []

    async def consume(self, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if self.last_at is not None:
                    gap = now - self.last_at
                    self.longest_gap = max(self.longest_gap, gap)
                    if frame.width != self.width:
                        self.switches.append(Switch(self.width, frame.width, gap, now))
                self.last_at = now
                if frame.pts is not None and frame.time_base is not None:
                    # The frame's media time: the gaps and lateness the subscriber sees.
                    offset = now - float(frame.pts * frame.time_base)
                    if self._origin is None:
                        self._origin = offset
                    self.lag = offset - self._origin
                if self.arrivals is not None and frame.pts is not None:
                    arrived = self.arrivals.get(frame.pts)
                    if arrived is not None:
                        self.latency = now - arrived
                self.count += 1
                self.width = frame.width
                self.widths_since.append(frame.width)
                if frame.format.name != "yuv420p":
                    frame = frame.reformat(format="yuv420p")
                plane = frame.planes[0]
                if read_marker(memoryview(plane), plane.line_size, frame.width) is None:
                    self.unreadable += 1
                    self.unreadable_at.append((self.count, frame.width))


class DecodeErrors(logging.Handler):
    """Counts aiortc's "failed to decode" warnings (the receiver logs and skips the frame)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.at: list[float] = []  # time.monotonic() of each

    @property
    def count(self) -> int:
        return len(self.at)

    def emit(self, record: logging.LogRecord) -> None:
        if "failed to decode" in record.getMessage():
            self.at.append(time.monotonic())

    def __enter__(self) -> DecodeErrors:
        logging.getLogger("aiortc.rtcrtpreceiver").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("aiortc.rtcrtpreceiver").removeHandler(self)


@dataclass
class PacketLog:
    """The video packets a subscriber's receiver got (RTX unwrapped), by extended sequence
    number: each one's VP8 picture id (15-bit space, ``None`` if absent)."""

    pids: dict[int, int | None] = field(default_factory=dict)
    arrivals: dict[int, float] = field(default_factory=dict)  # RTP timestamp -> first arrival
    _last: int | None = None

    def add(self, seq: int, pid: int | None) -> None:
        last = self._last
        if last is None:
            ext = seq
        else:
            delta = (seq - last) & 0xFFFF
            ext = last + (delta - 0x10000 if delta >= 0x8000 else delta)
        if last is None or ext > last:
            self._last = ext
        self.pids[ext] = pid

    def check(self) -> tuple[int, list[str]]:
        """(sequence numbers missing, picture id breaks): consecutive packets keep the picture
        id or step it by one; across ``n`` missing packets it may step by at most ``n + 1``."""
        seqs = sorted(self.pids)
        missing = 0
        breaks: list[str] = []
        for a, b in itertools.pairwise(seqs):
            gap = b - a - 1
            missing += gap
            pa, pb = self.pids[a], self.pids[b]
            if pa is None or pb is None:
                breaks.append(f"no picture id at {a} or {b}")
                continue
            step = (pb - pa) & 0x7FFF
            if step > gap + 1:
                breaks.append(f"picture id {pa} -> {pb} at seq {a} -> {b}")
        return missing, breaks


def _rtx_types(pc: RTCPeerConnection) -> dict[int, int]:
    """RTX payload type -> the payload type it repairs, from the remote description."""
    assert pc.remoteDescription is not None
    out: dict[int, int] = {}
    for media in SessionDescription.parse(pc.remoteDescription.sdp).media:
        for codec in media.rtp.codecs:
            apt = codec.parameters.get("apt")
            if codec.mimeType.lower().endswith("/rtx") and codec.payloadType is not None:
                out[codec.payloadType] = int(str(apt))
    return out


def log_packets(pc: RTCPeerConnection, receiver: RTCRtpReceiver) -> PacketLog:
    """Record what ``receiver`` gets from now on (wraps its packet handler, this instance
    only; a test-side observer: the receiver goes on as before)."""
    log = PacketLog()
    rtx: dict[int, int] = {}
    original = receiver._handle_rtp_packet

    async def handle(packet: Any, arrival_time_ms: int) -> None:
        if not rtx:  # the remote description is complete once packets flow
            rtx.update(_rtx_types(pc))
        payload, seq = packet.payload, packet.sequence_number
        if packet.payload_type in rtx and len(payload) >= 2:
            seq, payload = (payload[0] << 8) | payload[1], payload[2:]
        if payload:
            try:
                desc = parse(payload)
            except VP8Error:
                desc = None
            log.add(seq, None if desc is None else desc.picture_id)
            log.arrivals.setdefault(packet.timestamp, time.monotonic())
        await original(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]
    return log


@dataclass
class Watched:
    """A subscriber's video: decoded frames and received packets."""

    frames: Frames = field(default_factory=Frames)
    packets: PacketLog | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def watch(watched: Watched, pc_of: Any) -> Any:
    """An ``on_track`` callback for ``SfuSession`` filling ``watched``; ``pc_of()`` gives the
    session's subscriber connection."""

    def on_track(_tid: str, track: Any) -> None:
        if track.kind != "video":
            return
        pc: RTCPeerConnection = pc_of()
        receiver = next(t.receiver for t in pc.getTransceivers() if t.receiver.track is track)
        watched.packets = log_packets(pc, receiver)
        watched.frames.arrivals = watched.packets.arrivals
        watched.tasks.append(asyncio.ensure_future(watched.frames.consume(track)))

    return on_track
