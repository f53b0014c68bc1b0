"""The seam between rooms and group-call media: what the hub tells the media side, and what it
needs back. ``signaling.groupcall`` implements it with the SFU; ``NullMedia`` stands in when
nothing does."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .session import Session


class RoomMedia(Protocol):
    """Media of the rooms of one node."""

    def joined(self, session: Session, room: str) -> list[dict[str, Any]]:
        """``session`` joined ``room``; returns the tracks published there now (wire form)."""
        ...

    def tracks_of(self, room: str) -> list[dict[str, Any]]:
        """The tracks published in ``room`` now (wire form)."""
        ...

    def left(self, session: Session, room: str) -> None:
        """``session`` left ``room``."""

    def resumed(self, session: Session) -> None:
        """``session`` resumed on a new connection (send it what it may have missed)."""

    def recording_of(self, room: str) -> dict[str, Any] | None:
        """``room``'s recording now (the `recording` event's fields, `active` true), or None."""
        ...


class NullMedia:
    """No media: rooms without tracks."""

    def joined(self, session: Session, room: str) -> list[dict[str, Any]]:
        return []

    def tracks_of(self, room: str) -> list[dict[str, Any]]:
        return []

    def left(self, session: Session, room: str) -> None:
        pass

    def resumed(self, session: Session) -> None:
        pass

    def recording_of(self, room: str) -> dict[str, Any] | None:
        return None
