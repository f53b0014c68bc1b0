"""Who is who: the device directory (every identity and device ever seen, kept durably) and the
session directory (the devices connected now).

Both are seams: the embedded server keeps devices in its SQLite store and sessions in the hub;
a cluster keeps them in PostgreSQL and Redis behind the same protocols.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .session import Session


@dataclass(slots=True, frozen=True)
class DeviceInfo:
    """A device an identity has connected from, with its first and last-seen times (ms)."""

    identity: str
    device: str
    name: str
    first_seen: int
    last_seen: int


class DeviceDirectory(Protocol):
    """Durable record of identities and their devices."""

    async def touch_device(self, identity: str, device: str, name: str, now_ms: int) -> None:
        """Record that ``identity`` is connected from ``device`` now (creates the identity)."""

    async def register_identity(self, identity: str, now_ms: int) -> None:
        """Make ``identity`` known before it ever connects (tokens issued by the HTTP API)."""

    async def known_identities(self, identities: list[str]) -> set[str]:
        """The subset of ``identities`` this directory has seen (a device or a registration)."""
        ...

    async def devices_of(self, identity: str) -> list[DeviceInfo]:
        """Every device of ``identity``, most recently seen first."""
        ...


class SessionDirectory(Protocol):
    """The sessions (devices) of an identity that this server knows now."""

    def sessions_of(self, identity: str) -> Sequence[Session]:
        """Every session of ``identity``, connected or waiting for a resume."""
        ...

    def online(self, identity: str) -> bool:
        """Whether ``identity`` has a device with a live connection."""
        ...
