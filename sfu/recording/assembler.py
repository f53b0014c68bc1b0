"""Frames out of one track's RTP packets, for recording. Pure: no I/O, no clock of its own.

Packets come in arrival order (late, repaired and duplicate ones included) and are put back in
sequence order in a reorder window keyed by the extended sequence number (RFC 3550 appendix
A.1: the 16-bit number unwrapped against the highest seen). Frames leave in order:

- a video frame is the packets of one RTP timestamp, complete when every sequence number from
  its first packet to the one with the marker bit is there (a change of timestamp ends it too);
- an audio packet is a frame.

A missing packet is waited for until ``deadline`` seconds after the first packet behind it
arrived (the publisher's receiver NACKs it, and aiortc's repair arrives through the same
path); then it counts as lost. Video starts at a keyframe and, after a loss, waits for the
next one: frames in between would not decode. While it waits it asks for one through
``request_keyframe``, at most once per ``keyframe_interval`` seconds. Audio just skips.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..rtp import h264_keyframe, vp8_keyframe
from .depacketize import NAL_SPS, NAL_STAP_A, DepacketizeError, H264Depacketizer, vp8_frame

#: One packet as the forwarding path hands it over: seq, timestamp, marker, payload, arrival.
Packet = tuple[int, int, bool, bytes, float]

DEADLINE_S: Final = 0.4  # how long a missing packet is waited for (NACK + RTX repair)
KEYFRAME_INTERVAL_S: Final = 1.0  # at most one keyframe request per track in this time
MAX_BUFFERED: Final = 4096  # packets held back at most; beyond, the oldest gap counts as lost


@dataclass(slots=True)
class Frame:
    """One codec frame, ready for the container."""

    ts: int  # extended RTP timestamp (unwrapped: keeps growing past 2**32)
    data: bytes
    keyframe: bool
    arrival: float  # server time its first packet arrived (s)
    packets: int


@dataclass(slots=True)
class AssemblerStats:
    frames: int = 0
    lost_packets: int = 0  # declared lost after the deadline
    dropped_frames: int = 0  # complete but dropped while waiting for a keyframe, or undecodable
    duplicates: int = 0
    keyframe_requests: int = 0


def unwrap(value: int, reference: int, bits: int) -> int:
    """``value`` (``bits`` wide) as the extended number nearest to ``reference``."""
    mod = 1 << bits
    half = mod >> 1
    delta = (value - reference) & (mod - 1)
    if delta >= half:
        delta -= mod
    return reference + delta


class FrameAssembler:
    """Reorders one track's packets and cuts them into frames (see the module docstring)."""

    def __init__(
        self,
        codec: str,
        request_keyframe: Callable[[], None],
        *,
        deadline: float = DEADLINE_S,
        keyframe_interval: float = KEYFRAME_INTERVAL_S,
    ) -> None:
        if codec not in ("vp8", "h264", "opus"):
            raise ValueError(f"codec {codec!r} cannot be recorded")
        self.codec = codec
        self.video = codec != "opus"
        self.request_keyframe = request_keyframe
        self.deadline = deadline
        self.keyframe_interval = keyframe_interval
        self.stats = AssemblerStats()
        self.waiting = self.video  # for a keyframe
        self._h264 = H264Depacketizer()
        self._buf: dict[int, Packet] = {}  # extended seq -> packet
        self._highest: int | None = None  # highest extended seq seen
        self._next: int | None = None  # extended seq of the next frame's first packet
        self._prev_ts: int | None = None  # timestamp of the packet at _next - 1, if consumed
        self._last_ts: int | None = None  # extended timestamp of the last frame out
        self._last_request = -1e18

    @property
    def h264_sps(self) -> bytes | None:
        """The last H.264 sequence parameter set seen (None for other codecs, or none yet)."""
        return self._h264.sps

    # -- input ---------------------------------------------------------------------------------

    def push(self, packet: Packet) -> None:
        """Take one packet (any order; duplicates and packets too late are dropped)."""
        seq = packet[0]
        if self._highest is None:
            ext = seq + (1 << 16)  # room below for packets that arrive before the first
            self._highest = ext
        else:
            ext = unwrap(seq, self._highest, 16)
            if ext > self._highest:
                self._highest = ext
        if (self._next is not None and ext < self._next) or ext in self._buf:
            self.stats.duplicates += 1
            return
        self._buf[ext] = packet

    # -- output --------------------------------------------------------------------------------

    def pop(self, now: float, *, final: bool = False) -> list[Frame]:
        """The frames complete by ``now``, in order. ``final``: nothing more will arrive, so
        missing packets are lost now (the rest of the buffer is emptied)."""
        out: list[Frame] = []
        buf = self._buf
        if self.waiting and self.video:
            self._ask(now)
        if not buf:
            return out
        if self._next is None:
            self._next = min(buf)
        deadline = now - self.deadline
        while buf:
            nxt = self._next
            assert nxt is not None
            first = buf.get(nxt)
            if first is None:
                # A gap at the head: wait for it until the packet behind it is old enough.
                if (
                    len(buf) < MAX_BUFFERED
                    and not final
                    and min(p[4] for p in buf.values()) > deadline
                ):
                    break
                self._lose(min(buf), now)
                continue
            if not self.video:
                del buf[nxt]
                self._next = nxt + 1
                self._prev_ts = first[1]
                out.append(self._frame(first[1], first[3], True, first[4], 1))
                continue
            if self.waiting and not self._starts_keyframe(first):
                del buf[nxt]
                self._next = nxt + 1
                self._prev_ts = first[1]
                self.stats.dropped_frames += first[2]  # count whole frames skipped
                continue
            # Collect the frame that starts at nxt.
            ts = first[1]
            end = nxt
            complete = False
            while True:
                p = buf.get(end)
                if p is None:
                    break
                if p[1] != ts:  # the timestamp changed without a marker: the frame ended
                    end -= 1
                    complete = True
                    break
                if p[2]:
                    complete = True
                    break
                end += 1
            if not complete:
                if (
                    not final
                    and len(buf) < MAX_BUFFERED
                    and min(p[4] for e, p in buf.items() if e > end or e == nxt) > deadline
                ):
                    break  # ``end`` is missing: wait while the packets around it are young
                # Lost inside the frame: drop what we have of it and wait for a keyframe.
                for e in range(nxt, end):
                    del buf[e]
                self._next = end
                self._prev_ts = ts
                self._lose(end + 1, now)
                continue
            payloads = [buf.pop(e)[3] for e in range(nxt, end + 1)]
            self._next = end + 1
            self._prev_ts = ts
            try:
                if self.codec == "vp8":
                    data, key = vp8_frame(payloads)
                else:
                    data, key = self._h264.frame(payloads)
            except DepacketizeError:
                self.stats.dropped_frames += 1
                self._wait(now)
                continue
            if self.waiting:
                if not key:
                    self.stats.dropped_frames += 1
                    continue
                self.waiting = False
            out.append(self._frame(ts, data, key, first[4], len(payloads)))
        return out

    # -- internals -----------------------------------------------------------------------------

    def _frame(self, ts: int, data: bytes, key: bool, arrival: float, packets: int) -> Frame:
        ext = ts if self._last_ts is None else unwrap(ts, self._last_ts, 32)
        self._last_ts = ext
        self.stats.frames += 1
        return Frame(ext, data, key, arrival, packets)

    def _starts_keyframe(self, p: Packet) -> bool:
        """Whether packet ``p`` is the first packet of a keyframe."""
        payload = p[3]
        if self.codec == "vp8":
            return vp8_keyframe(payload)  # S = 1, partition 0, P = 0: only a frame's first
        if not payload:
            return False
        kind = payload[0] & 0x1F
        if kind == NAL_SPS or (kind == NAL_STAP_A and len(payload) > 3 and payload[3] & 0x1F == 7):
            return True  # parameter sets lead a keyframe
        # An IDR slice is a frame's first packet only if the packet before it ended a frame.
        return h264_keyframe(payload) and self._prev_ts is not None and self._prev_ts != p[1]

    def _lose(self, upto: int, now: float) -> None:
        """Sequence numbers from ``_next`` to ``upto`` (exclusive) are lost."""
        assert self._next is not None
        self.stats.lost_packets += max(0, upto - self._next)
        self._next = upto
        self._prev_ts = None
        if self.video:
            self._wait(now)

    def _wait(self, now: float) -> None:
        if not self.waiting:
            self.waiting = True
            self._last_request = -1e18  # ask at once
        self._ask(now)

    def _ask(self, now: float) -> None:
        if now - self._last_request >= self.keyframe_interval:
            self._last_request = now
            self.stats.keyframe_requests += 1
            self.request_keyframe()
