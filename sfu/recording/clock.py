"""The recording's common clock: each track's RTP timestamps on the server's wall clock. Pure.

A publisher's sender reports (RFC 3550 section 6.4.1) pair its NTP wall clock with each track's
RTP timestamps, so its audio and video share one time line. What is left is the offset between
the publisher's NTP clock and the server's clock: arrival time minus NTP time of each report is
that offset plus the network delay (and the time since the packet the report was stamped at),
so the smallest value over recent reports is the best estimate (``PublisherClock``). Audio and
video of one publisher use the same offset: their relative alignment is the sender's.

Before a track's first sender report its timestamps are mapped through the arrival time of its
first frame instead.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from ..rtp import NTP_EPOCH_OFFSET
from .assembler import unwrap

RECENT_REPORTS: Final = 16  # sender reports the offset is taken over (~16 s at aiortc's rate)


def ntp_to_unix(ntp: int) -> float:
    """A 64-bit NTP timestamp (seconds since 1900 in 32.32 fixed point) as Unix seconds."""
    return ntp / (1 << 32) - NTP_EPOCH_OFFSET


class PublisherClock:
    """The offset from one publisher's NTP clock to the server's clock (shared by its tracks)."""

    __slots__ = ("_offsets",)

    def __init__(self) -> None:
        self._offsets: deque[float] = deque(maxlen=RECENT_REPORTS)

    def add(self, ntp_time: float, arrival: float) -> None:
        self._offsets.append(arrival - ntp_time)

    @property
    def offset(self) -> float | None:
        """Server time minus publisher time (s), None before any sender report."""
        return min(self._offsets) if self._offsets else None


class TrackClock:
    """Maps one track's extended RTP timestamps to server time (s since the Unix epoch)."""

    __slots__ = ("_anchor", "_sr", "publisher", "rate")

    def __init__(self, rate: int, publisher: PublisherClock) -> None:
        self.rate = rate
        self.publisher = publisher
        self._sr: tuple[float, int] | None = None  # (NTP time as Unix s, RTP timestamp)
        self._anchor: tuple[int, float] | None = None  # (extended ts, arrival) of a first frame

    def sender_report(self, ntp: int, rtp_ts: int, arrival: float) -> None:
        t = ntp_to_unix(ntp)
        self._sr = (t, rtp_ts)
        self.publisher.add(t, arrival)

    def anchor(self, ext_ts: int, arrival: float) -> None:
        """The fallback before sender reports: frame ``ext_ts`` arrived at ``arrival``."""
        if self._anchor is None:
            self._anchor = (ext_ts, arrival)

    @property
    def synced(self) -> bool:
        """Whether the mapping comes from sender reports (not arrival times)."""
        return self._sr is not None and self.publisher.offset is not None

    def to_server(self, ext_ts: int) -> float | None:
        """Server time of RTP timestamp ``ext_ts``; None if nothing is known yet."""
        offset = self.publisher.offset
        if self._sr is not None and offset is not None:
            ntp_time, sr_ts = self._sr
            return ntp_time + (ext_ts - unwrap(sr_ts, ext_ts, 32)) / self.rate + offset
        if self._anchor is not None:
            ts, arrival = self._anchor
            return arrival + (ext_ts - ts) / self.rate
        return None
