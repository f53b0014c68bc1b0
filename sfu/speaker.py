"""Active speaker detection from RFC 6464 audio levels. Pure; the caller passes the time.

Levels are in -dBov (0 loudest, 127 silence). Each participant's level is averaged over a short
window; the loudest participant above a threshold is the active speaker, and a change needs the
new speaker to be louder for ``hold_s`` so that a cough does not switch the highlight.
"""

from __future__ import annotations


class SpeakerDetector:
    """Tracks levels per participant and reports changes of the speaker order."""

    def __init__(
        self, threshold_dbov: int = 50, window_s: float = 0.3, hold_s: float = 0.4
    ) -> None:
        self.threshold = threshold_dbov
        self.window_s = window_s
        self.hold_s = hold_s
        self._sum: dict[str, int] = {}
        self._n: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self.current: list[str] = []

    def add(self, participant: str, level: int) -> None:
        """One packet's level (called per audio packet: kept to two dict updates)."""
        self._sum[participant] = self._sum.get(participant, 0) + level
        self._n[participant] = self._n.get(participant, 0) + 1

    def remove(self, participant: str) -> None:
        self._sum.pop(participant, None)
        self._n.pop(participant, None)
        self._since.pop(participant, None)
        if participant in self.current:
            self.current = [p for p in self.current if p != participant]

    def tick(self, now: float) -> list[str] | None:
        """Close the window; returns the new order of speakers (loudest first) if it changed."""
        loud = sorted(
            (self._sum[p] / self._n[p], p)
            for p in self._n
            if self._n[p] and self._sum[p] / self._n[p] <= self.threshold
        )
        self._sum.clear()
        self._n.clear()
        speaking = [p for _, p in loud]
        for p in speaking:
            self._since.setdefault(p, now)
        for p in list(self._since):
            if p not in speaking:
                del self._since[p]
        # A participant counts once it has spoken for hold_s; silence drops it at once.
        order = [p for p in speaking if now - self._since[p] >= self.hold_s]
        if order != self.current:
            self.current = order
            return order
        return None
