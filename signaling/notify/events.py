"""The push events: what the server tells the app's backend about devices that are offline.
Pure; the webhook that delivers them is ``signaling.notify.push``. See docs/PUSH.md."""

from __future__ import annotations

import time
from typing import Any, Protocol

from ..chat.store import StoredMessage
from ..core.directory import SessionDirectory


class PushSink(Protocol):
    """Where events go (``PushQueue``)."""

    def submit(self, event: dict[str, Any], *, unread: tuple[str, str, int] | None = None) -> bool:
        """Queue ``event`` (it has an ``id``); ``unread`` = (conversation, identity, seq) asks for
        the recipient's unread count to be added. False if it was not queued."""
        ...


def _ms() -> int:
    return int(time.time() * 1000)


def call_event(
    kind: str,
    *,
    identity: str,
    call: str,
    caller: str,
    video: bool,
    group: bool,
    reason: str = "",
) -> dict[str, Any]:
    """A ``call.incoming`` or ``call.cancelled`` event for ``identity``."""
    suffix = "incoming" if kind == "call_incoming" else "cancelled"
    out: dict[str, Any] = {
        "id": f"call.{call}.{suffix}.{identity}",
        "type": f"call.{suffix}",
        "ts": _ms(),
        "identity": identity,
        "call": {"id": call, "from": caller, "video": video, "group": group},
    }
    if reason:
        out["reason"] = reason
    return out


class MessagePushes:
    """Push a ``message.new`` event for each direct-message recipient with no live device
    (``on_message`` is a chat message hook)."""

    def __init__(self, sessions: SessionDirectory, queue: PushSink, include_text: bool) -> None:
        self.sessions = sessions
        self.queue = queue
        self.include_text = include_text

    def on_message(self, msg: StoredMessage, members: tuple[str, ...]) -> None:
        if msg.kind != "text" or not members:
            return
        queue = self.queue
        for identity in members:
            if identity == msg.sender:
                continue
            if self.sessions.online(identity):
                continue
            event: dict[str, Any] = {
                "id": f"message.{msg.mid}.{identity}",
                "type": "message.new",
                "ts": msg.ts,
                "identity": identity,
                "conversation": msg.conversation,
                "seq": msg.seq,
                "mid": msg.mid,
                "from": msg.sender,
            }
            if self.include_text and msg.text is not None:
                event["text"] = msg.text
            queue.submit(event, unread=(msg.conversation, identity, msg.seq))
