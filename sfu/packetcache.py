"""A bounded cache of recent packets per track, for answering NACKs. Pure; no I/O."""

from __future__ import annotations

from typing import NamedTuple


class Cached(NamedTuple):
    seq: int
    ts: int
    marker: bool
    payload: bytes


class PacketCache:
    """The last ``size`` packets of one track, by sequence number (a ring; size a power of 2)."""

    __slots__ = ("_mask", "_slots", "newest")

    def __init__(self, size: int = 1024) -> None:
        assert size & (size - 1) == 0, "size must be a power of two"
        self._slots: list[Cached | None] = [None] * size
        self._mask = size - 1
        self.newest = -1  # the highest sequence number added (RFC 3550 wrap-around), -1: none

    def add(self, seq: int, ts: int, marker: bool, payload: bytes) -> None:
        self._slots[seq & self._mask] = Cached(seq, ts, marker, payload)
        if 0 < (seq - self.newest) & 0xFFFF < 0x8000 or self.newest < 0:
            self.newest = seq

    def get(self, seq: int) -> Cached | None:
        c = self._slots[seq & self._mask]
        return c if c is not None and c.seq == seq else None
