"""The push events: what the server tells the app's backend about devices that are offline.
Pure; the webhook that delivers them is ``signaling.notify.push``. See docs/PUSH.md."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol

from ..chat.store import StoredMessage
from ..core.directory import SessionDirectory


class PushSink(Protocol):
    """Where events go (``PushQueue``)."""

    def submit(self, event: dict[str, Any], *, unread: str | None = None) -> bool:
        """Queue ``event`` (it has an ``id``); ``unread`` = a conversation asks for the
        recipients' unread counts in it to be added. False if it was not queued."""
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


#: Recipients in one `message.batch` event (a large group's message is several events).
BATCH: Final = 100
PUSHED_KINDS: Final = frozenset({"text", "call"})


def mentions(text: str | None, identities: Iterable[str]) -> set[str]:
    """The ``identities`` named as ``@identity`` in ``text`` (a whole name: ``@bob`` does
    not mention ``bob`` in ``@bobby``; a full stop after it ends the sentence, not the name)."""
    if not text or "@" not in text:
        return set()
    named: set[str] = set()
    for m in _MENTION.finditer(text):
        name = m.group(1)
        named.add(name)
        named.add(name.rstrip("."))
    return named.intersection(identities)


_MENTION: Final = re.compile(r"@([A-Za-z0-9_.@+~-]+)")


class Elsewhere(Protocol):
    """Cluster mode: which identities have a live connection on another node (the
    ``online_elsewhere`` of ``signaling.core.shared.SharedState``)."""

    def __call__(self, identities: list[str], then: Callable[[frozenset[str]], None]) -> None: ...


class MessagePushes:
    """Push `message.new` to a direct-message recipient with no live device, and
    `message.batch` events (up to ``BATCH`` identities each) to a group's members with none:
    one per identity, never per device; members who muted the group get nothing unless the
    message mentions them (``@identity``). ``on_message`` is a chat message hook.

    In cluster mode (``elsewhere``) a recipient with no live device here may have one on
    another node: those are asked of ``elsewhere`` and pushed once it has answered."""

    def __init__(
        self,
        sessions: SessionDirectory,
        queue: PushSink,
        include_text: bool,
        muted: Mapping[str, set[str]],
        elsewhere: Elsewhere | None = None,
    ) -> None:
        self.sessions = sessions
        self.queue = queue
        self.include_text = include_text
        self.muted = muted
        self.elsewhere = elsewhere

    def on_message(self, msg: StoredMessage, members: tuple[str, ...]) -> None:
        if msg.kind != "text" or not members:
            return
        online = self.sessions.online
        muted = self.muted.get(msg.conversation, ())
        group = msg.conversation[0] == "g"
        named = mentions(msg.text, members) if group else set()
        away: list[str] = []
        for identity in members:
            if identity == msg.sender or online(identity):
                continue
            if identity in muted and identity not in named:
                continue
            away.append(identity)
        if not away:
            return
        if self.elsewhere is None:
            self._push(msg, away, named)
            return

        def then(there: frozenset[str]) -> None:
            self._push(msg, [i for i in away if i not in there], named)

        self.elsewhere(away, then)

    def _push(self, msg: StoredMessage, away: list[str], named: set[str]) -> None:
        if not away:
            return
        if msg.conversation[0] == "g":
            self._group(msg, away, named)
            return
        for identity in away:
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
            self.queue.submit(event, unread=msg.conversation)

    def _group(self, msg: StoredMessage, identities: list[str], named: set[str]) -> None:
        away: list[dict[str, Any]] = []
        for identity in identities:
            r: dict[str, Any] = {"identity": identity}
            if identity in named:
                r["mention"] = True
            away.append(r)
        for n, i in enumerate(range(0, len(away), BATCH)):
            event: dict[str, Any] = {
                "id": f"message.{msg.mid}.batch{n}",
                "type": "message.batch",
                "ts": msg.ts,
                "recipients": away[i : i + BATCH],
                "conversation": msg.conversation,
                "seq": msg.seq,
                "mid": msg.mid,
                "from": msg.sender,
            }
            if self.include_text and msg.text is not None:
                event["text"] = msg.text
            self.queue.submit(event, unread=msg.conversation)
