"""What a feature hands the composition root (``signaling.app``): its protocol messages and
the handlers of its client messages."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wire.spec import Messages
from .session import Session

#: A handler takes the session and a validated message; it either finishes before it returns
#: (None) or returns what to await. Errors are ``ProtocolError``s, answered by the caller.
Handler = Callable[[Session, dict[str, Any]], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature's part of the server."""

    name: str
    messages: Messages
    handlers: Mapping[str, Handler]
    #: Handlers that never await (they return None): the WebSocket endpoint may run them as
    #: soon as a frame is parsed, inside the protocol's ``data_received`` (chat writes).
    inline: frozenset[str] = field(default_factory=frozenset)
