"""What the forwarding path fills for a recorded track. Pure; imported by ``sfu.forward``."""

from __future__ import annotations

from .assembler import Packet

#: A sender report as the tap keeps it: NTP timestamp, RTP timestamp, server arrival time.
Report = tuple[int, int, float]


class TrackTap:
    """One recorded track's packets and sender reports since the last hand-over (a list
    append per packet on the forwarding path; the room's tick takes the lists)."""

    __slots__ = ("key", "packets", "reports")

    def __init__(self, key: int) -> None:
        self.key = key  # the segment this tap feeds
        self.packets: list[Packet] = []
        self.reports: list[Report] = []
