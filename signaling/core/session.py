"""Sessions: one authenticated device, with or without a live connection.

A ``Session`` outlives its connection by the resume grace period, so a client that reconnects
keeps its rooms. The connection itself (a WebSocket and its outbox) belongs to the network edge
(``signaling.net.connection``); the core sees it through ``Link``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .rooms import Participant
    from .tokens import Claims


class Link(Protocol):
    """What the core needs of a client connection: its outbox, closing it, and the order of
    replies while chat writes of the connection are in the store."""

    session: Session | None
    #: While chat writes of this connection are in the store: the replies to later requests,
    #: sent once the latest of them is done (None: no write is pending).
    tail: list[bytes] | None

    def write(self, frame: bytes) -> None:
        """Queue a complete frame (never blocks; a full outbox cuts the client off). The core's
        frames are JSON text frames (``framing.encode``); a connection that speaks another
        encoding converts them."""

    def write_message(self, msg: dict[str, Any]) -> None:
        """Encode ``msg`` for this connection alone and ``write`` it."""

    def send(self, msg: dict[str, Any]) -> None:
        """Send a reply, after the replies to this connection's chat writes in flight."""

    def settle(self, after: list[bytes]) -> None:
        """A chat write is answered: send the replies that waited for it."""

    def abandon(self, code: int, reason: str) -> None:
        """Close without waiting on the client."""

    async def close(self, code: int, reason: str) -> None:
        """Close politely (close handshake)."""


class Session:
    """One authenticated device, with or without a live connection."""

    __slots__ = (
        "claims",
        "conn",
        "device",
        "expiry",
        "host",
        "id",
        "identity",
        "name",
        "resume_token",
        "rooms",
        "status",
        "unseen",
        "watching",
    )

    def __init__(self, sid: str, claims: Claims, device: str, resume_token: str) -> None:
        self.id = sid
        self.claims = claims
        self.identity = claims.identity
        self.name = claims.name
        self.device = device
        self.resume_token = resume_token
        self.conn: Link | None = None
        self.rooms: dict[str, Participant] = {}
        self.status = "online"
        self.watching: frozenset[str] = frozenset()  # identities it asked to watch
        # Those of them it may not see (``privacy.may_watch``): offline to it, whatever they do.
        self.unseen: frozenset[str] = frozenset()
        self.expiry: asyncio.TimerHandle | None = None
        self.host = ""  # host the client connected to (for TURN URLs handed out later)

    def deliver(self, frame: bytes) -> None:
        """Bus sink: write to the live connection; frames for a suspended session are dropped
        (a resumed client gets room snapshots and catches up on chat with `sync`)."""
        c = self.conn
        if c is not None:
            c.write(frame)

    def send(self, msg: dict[str, Any]) -> None:
        c = self.conn
        if c is not None:
            c.write_message(msg)

    def send_frame(self, frame: bytes) -> None:
        """Send an already encoded reply."""
        c = self.conn
        if c is not None:
            c.write(frame)

    def reply(self, msg: dict[str, Any], req: dict[str, Any]) -> None:
        """Send ``msg`` as the answer to request ``req`` (with ``re`` if it had an ``id``)."""
        if "id" in req:
            msg["re"] = req["id"]
        self.send(msg)

    def ok(self, req: dict[str, Any]) -> None:
        """Answer request ``req`` with ``ok`` (nothing if it had no ``id``)."""
        if "id" in req:
            self.send({"type": "ok", "re": req["id"]})
