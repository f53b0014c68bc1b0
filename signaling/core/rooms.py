"""Room state: membership, participant flags, moderation and the lock. Pure; no I/O.

A participant is one session (one device) in a room; several devices of one identity are several
participants. Methods return what changed; the server turns that into events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..wire.errors import ProtocolError


@dataclass(slots=True)
class Participant:
    """One session in one room."""

    id: str
    identity: str
    name: str
    joined_at: int  # ms
    moderator: bool = False
    audio_muted: bool = False
    video_muted: bool = False
    node: str = ""  # cluster mode: the node of its session (not sent to clients)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "identity": self.identity,
            "name": self.name,
            "audio_muted": self.audio_muted,
            "video_muted": self.video_muted,
            "moderator": self.moderator,
            "joined_at": self.joined_at,
        }


@dataclass(slots=True)
class Room:
    """A room and the participants in it."""

    name: str
    max_participants: int
    participants: dict[str, Participant] = field(default_factory=dict)
    locked: bool = False
    empty_since: float | None = None  # monotonic seconds; None while occupied

    @property
    def conversation(self) -> str:
        return f"room:{self.name}"

    def join(self, p: Participant, now: float) -> None:
        """Add ``p``; moderators may enter a locked room."""
        if p.id in self.participants:
            self.participants[p.id] = p
            return
        if self.locked and not p.moderator:
            raise ProtocolError("room_locked", f"room {self.name!r} is locked")
        if len(self.participants) >= self.max_participants:
            raise ProtocolError(
                "room_full", f"room {self.name!r} is full ({self.max_participants} participants)"
            )
        self.participants[p.id] = p
        self.empty_since = None

    def add(self, p: Participant) -> None:
        """Add ``p`` without the checks of ``join``: the cluster's shared room (which has
        every node's participants) has made them."""
        self.participants[p.id] = p
        self.empty_since = None

    def leave(self, pid: str, now: float) -> Participant | None:
        """Remove a participant; returns it, or None if it was not here."""
        p = self.participants.pop(pid, None)
        if p is not None and not self.participants:
            self.empty_since = now
        return p

    def others(self, pid: str) -> list[Participant]:
        return [p for p in self.participants.values() if p.id != pid]

    def require(self, pid: str) -> Participant:
        p = self.participants.get(pid)
        if p is None:
            raise ProtocolError("not_in_room", f"you are not in room {self.name!r}")
        return p

    def target(self, pid: str) -> Participant:
        p = self.participants.get(pid)
        if p is None:
            raise ProtocolError("no_such_participant", f"no participant {pid!r} in {self.name!r}")
        return p


class RoomRegistry:
    """All open rooms of this node."""

    def __init__(self, max_participants: int, empty_grace_s: float) -> None:
        self.rooms: dict[str, Room] = {}
        self.max_participants = max_participants
        self.empty_grace_s = empty_grace_s

    def get_or_create(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.max_participants)
        return room

    def get(self, name: str) -> Room | None:
        return self.rooms.get(name)

    def expire(self, now: float) -> list[str]:
        """Close rooms that have been empty for the grace period; returns their names."""
        gone = [
            n
            for n, r in self.rooms.items()
            if r.empty_since is not None and now - r.empty_since >= self.empty_grace_s
        ]
        for n in gone:
            del self.rooms[n]
        return gone
