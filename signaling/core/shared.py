"""What a cluster shares between its nodes beyond the bus: room membership and presence
(issue 14). ``signaling.cluster.state.ClusterState`` keeps them in Redis; one node needs
none of it (the hub's ``shared`` is None and every path stays in memory).

Each node owns the entries of its own sessions (its participants, its devices' statuses):
it writes them as they change and writes them all again after Redis comes back; the other
nodes remove a dead node's entries once its heartbeat has expired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .rooms import Participant

if TYPE_CHECKING:
    from .session import Session
    from .tokens import Claims


@dataclass(slots=True, frozen=True)
class ResumedSession:
    """A session another node had, taken over to resume it here (``claim_resume``)."""

    sid: str
    claims: Claims
    device: str
    node: str  # the node that had it
    status: str
    watching: frozenset[str]
    #: room -> (its participant, now of this node; whether it was still in the room)
    rooms: Mapping[str, tuple[Participant, bool]]


class SharedState(Protocol):
    """Rooms and presence across the nodes of a cluster."""

    node_id: str

    async def join(
        self, room: str, p: Participant, *, first_moderates: bool, max_participants: int
    ) -> tuple[Participant, bool, list[Participant]]:
        """Add ``p`` to ``room`` on every node, atomically: ``ProtocolError`` ``room_locked``
        or ``room_full`` as ``Room.join`` would; with ``first_moderates`` the first
        participant of an empty room becomes its moderator (one, whatever the races).
        Returns ``p`` as stored (its ``moderator`` may be set), whether the room is locked,
        and the other participants (of every node)."""
        ...

    def leave(self, room: str, pid: str) -> None:
        """Remove participant ``pid`` (of this node) from ``room``, in the background."""

    def update(self, room: str, p: Participant) -> None:
        """Store ``p``'s new flags (of this node), in the background."""

    async def lock(self, room: str, locked: bool) -> None:
        """Lock or unlock ``room`` for every node."""

    async def room(self, room: str) -> tuple[list[Participant], bool]:
        """Every participant of ``room`` (all nodes) and whether it is locked."""
        ...

    async def rooms(self) -> list[tuple[str, int, bool]] | None:
        """Every room with participants on any node: (name, participants, locked); None if
        Redis cannot be reached."""
        ...

    async def participant(self, room: str, pid: str) -> Participant | None:
        """Participant ``pid`` of ``room`` (``node`` says where its session is)."""
        ...

    def presence_set(self, identity: str, session: str, status: str) -> None:
        """This node's session ``session`` of ``identity`` has ``status`` now; when the
        identity's status (the strongest of its devices on every node) changes, every node's
        watchers of it get a `presence` event (topic ``presence:<identity>``)."""

    def presence_remove(self, identity: str, session: str) -> None:
        """The session ended (the identity may go offline)."""

    def connected(self, identity: str, session: str, live: bool) -> None:
        """This node's session ``session`` of ``identity`` has a live connection now
        (``live``), or not (it waits for its resume, or it ended), in the background."""

    def online_elsewhere(
        self, identities: list[str], then: Callable[[frozenset[str]], None]
    ) -> None:
        """Call ``then`` with those of ``identities`` that have a live connection on another
        node, once Redis answered (with none if it cannot be reached: a push too many rather
        than one missed)."""

    async def nodes_of(self, identity: str) -> set[str]:
        """The other nodes where ``identity`` has sessions (none if Redis cannot be reached)."""
        ...

    async def statuses(self, identities: Iterable[str]) -> dict[str, str]:
        """Each identity's status across the cluster (``offline`` if no device anywhere)."""
        ...

    def save_session(self, session: Session, drop_token: str = "") -> None:
        """Keep what another node needs to resume ``session`` (under its resume token; a
        previous token ``drop_token`` no longer resumes), in the background."""

    def drop_session(self, token: str) -> None:
        """The session of ``token`` ended: no node may resume it."""

    async def claim_resume(self, token: str) -> ResumedSession | None:
        """Take the session of resume ``token`` from the node that has it (once), or None."""
        ...
