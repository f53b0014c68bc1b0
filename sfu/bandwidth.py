"""Combining subscribers' bandwidth estimates for a publisher. Pure; no I/O.

Each subscriber reports a REMB estimate for each video track it receives. The publisher is asked
for the minimum over the subscribers that can take video at all; a subscriber whose estimate is
below ``min_video_bps`` loses that video (audio goes on) until its estimate recovers past
``resume_bps``, so one weak link does not drag everybody's video down to nothing.
"""

from __future__ import annotations


class BandwidthAllocator:
    """Estimates per subscriber for one published video track."""

    def __init__(self, min_video_bps: int = 120_000, resume_bps: int = 200_000) -> None:
        self.min_video_bps = min_video_bps
        self.resume_bps = resume_bps
        self.estimates: dict[str, int] = {}
        self.starved: set[str] = set()

    def report(self, subscriber: str, bps: int) -> bool | None:
        """Record an estimate; returns True if the subscriber just lost video, False if it just
        got it back, None if nothing changed."""
        self.estimates[subscriber] = bps
        if subscriber in self.starved:
            if bps >= self.resume_bps:
                self.starved.discard(subscriber)
                return False
        elif bps < self.min_video_bps:
            self.starved.add(subscriber)
            return True
        return None

    def remove(self, subscriber: str) -> None:
        self.estimates.pop(subscriber, None)
        self.starved.discard(subscriber)

    def target(self) -> int | None:
        """The bitrate to ask of the publisher, or None with no usable estimate."""
        usable = [b for s, b in self.estimates.items() if s not in self.starved]
        return min(usable) if usable else None
