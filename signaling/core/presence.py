"""Presence per identity across devices. Pure; no I/O.

Each device (session) has a status; the identity's status is the strongest of its devices:
``busy`` (in a call or do-not-disturb on any device) beats ``online``, which beats ``away``; with no
device left the identity is ``offline``.
"""

from __future__ import annotations

from typing import Final

RANK: Final = {"offline": 0, "away": 1, "online": 2, "busy": 3}


class PresenceBook:
    """Device statuses and the aggregate per identity."""

    def __init__(self) -> None:
        self._devices: dict[str, dict[str, str]] = {}

    def status(self, identity: str) -> str:
        devices = self._devices.get(identity)
        if not devices:
            return "offline"
        return max(devices.values(), key=RANK.__getitem__)

    def set(self, identity: str, session: str, status: str) -> str | None:
        """Set one device's status; returns the identity's new status if it changed."""
        before = self.status(identity)
        self._devices.setdefault(identity, {})[session] = status
        after = self.status(identity)
        return after if after != before else None

    def remove(self, identity: str, session: str) -> str | None:
        """Forget a device; returns the identity's new status if it changed."""
        devices = self._devices.get(identity)
        if devices is None or session not in devices:
            return None
        before = self.status(identity)
        del devices[session]
        if not devices:
            del self._devices[identity]
        after = self.status(identity)
        return after if after != before else None
