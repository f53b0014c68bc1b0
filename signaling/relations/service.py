"""Contacts and blocks: the thin edge around the rules of ``signaling.core.privacy``.

``Relations`` handles the client messages (``contact_request``, ``contact_accept``,
``contact_decline``, ``contact_remove``, ``block``, ``unblock``, ``contacts``) and the HTTP
API's changes. The store's writer applies each change to the pair in one transaction
(``privacy.plan``); what follows happens here, with no await before the events:

- the block cache (``Hub.blocks``) takes a block or unblock at once;
- each side whose view changed hears it (`relation`), on every device but the one that made
  the change; a side whose view did not change hears nothing, which is how a block, a
  declined request or an identity that does not exist stay unseen;
- the two identities' live watches of each other follow (``Hub.recheck_watches``) before the
  change is answered.

See docs/PROTOCOL.md, "Contacts and privacy".
"""

from __future__ import annotations

from typing import Any, Protocol

from ..core.feature import Feature
from ..core.hub import Hub, ms
from ..core.privacy import Pair, Relation, view, watches_change
from ..core.session import Session
from ..wire.errors import ProtocolError
from ..wire.framing import encode
from .messages import MAX_PAGE, MESSAGES

#: Bytes of a `contacts` reply besides its relations; of a relation besides its identity.
REPLY_ENVELOPE = 128
RELATION_BYTES = 64


class RelationStore(Protocol):
    """What relations need of the store (``SqliteStore``)."""

    async def change_relation(
        self, action: str, actor: str, other: str, now_ms: int, max_pending: int
    ) -> tuple[Pair, Pair]:
        """Apply ``action`` by ``actor`` toward ``other`` (``privacy.plan``) in one
        transaction; the pair (``actor`` as ``a``) before and after. Raises the plan's
        ``ProtocolError`` (nothing written), or ``store_full``."""
        ...

    async def relations_of(self, identity: str) -> list[Relation]:
        """How ``identity`` sees everyone it has a relation with, sorted by identity."""
        ...


class _Message(Protocol):
    kind: str


class Relations:
    """Contacts and blocks of one hub, kept in ``store``."""

    def __init__(self, hub: Hub, store: RelationStore) -> None:
        self.hub = hub
        self.store = store
        self.max_pending = hub.cfg.privacy.max_pending_requests
        self.max_reply_bytes = hub.cfg.limits.max_reply_bytes

    def feature(self) -> Feature:
        return Feature(
            "relations",
            MESSAGES,
            {
                "contact_request": self.on_contact_request,
                "contact_accept": self.on_contact_accept,
                "contact_decline": self.on_contact_decline,
                "contact_remove": self.on_contact_remove,
                "block": self.on_block,
                "unblock": self.on_unblock,
                "contacts": self.on_contacts,
            },
        )

    # -- changes ---------------------------------------------------------------------------------

    async def change(
        self, action: str, actor: str, other: str, by: Session | None = None
    ) -> Relation:
        """``actor`` does ``action`` toward ``other`` (``by`` is the device that asked; None
        for the app's backend); returns how ``actor`` sees ``other`` now."""
        if actor == other:
            raise ProtocolError("bad_field", "`identity` must be someone else")
        hub = self.hub
        before, after = await self.store.change_relation(
            action, actor, other, ms(), self.max_pending
        )
        if before.a.blocks != after.a.blocks:
            hub.blocks.set(actor, other, after.a.blocks)
        for me, them, old, new in (
            (actor, other, before, after),
            (other, actor, before.swapped(), after.swapped()),
        ):
            now = view(new, them)
            if view(old, them) == now:
                continue
            frame = encode({"type": "relation", **now.to_wire()})
            for s in hub.sessions_of(me):
                if s is not by:
                    s.deliver(frame)
        if watches_change(before, after):
            await hub.recheck_watches(actor, other)
        return view(after, other)

    async def relations_of(self, identity: str) -> list[Relation]:
        return await self.store.relations_of(identity)

    def message_stored(self, msg: _Message, members: tuple[str, ...]) -> None:
        """Chat hook: a text both members of a direct conversation receive may make them
        partners who both wrote, which lets them watch each other."""
        if len(members) == 2 and msg.kind == "text":
            self.hub.recheck_soon(*members)

    # -- handlers --------------------------------------------------------------------------------

    @staticmethod
    def _manages_contacts(s: Session) -> None:
        if not s.claims.contacts:
            raise ProtocolError(
                "forbidden", "the token does not let you manage contacts (claim `contacts`)"
            )

    async def _user_change(
        self, action: str, s: Session, m: dict[str, Any], *, contacts: bool = True
    ) -> None:
        if contacts:
            self._manages_contacts(s)
        await self.change(action, s.identity, m["identity"], s)
        s.ok(m)

    async def on_contact_request(self, s: Session, m: dict[str, Any]) -> None:
        await self._user_change("request", s, m)

    async def on_contact_accept(self, s: Session, m: dict[str, Any]) -> None:
        await self._user_change("accept", s, m)

    async def on_contact_decline(self, s: Session, m: dict[str, Any]) -> None:
        await self._user_change("decline", s, m)

    async def on_contact_remove(self, s: Session, m: dict[str, Any]) -> None:
        await self._user_change("remove", s, m)

    async def on_block(self, s: Session, m: dict[str, Any]) -> None:
        await self._user_change("block", s, m, contacts=False)

    async def on_unblock(self, s: Session, m: dict[str, Any]) -> None:
        await self._user_change("unblock", s, m, contacts=False)

    async def on_contacts(self, s: Session, m: dict[str, Any]) -> None:
        """A page of the relations, cut by count and by bytes (no reply is larger than
        ``limits.max_reply_bytes``, whoever has how many contacts)."""
        after: str | None = m.get("after")
        limit: int = m.get("limit", MAX_PAGE)
        budget = self.max_reply_bytes - REPLY_ENVELOPE
        page: list[dict[str, Any]] = []
        more = False
        for r in await self.store.relations_of(s.identity):
            if after is not None and r.identity <= after:
                continue
            size = RELATION_BYTES + len(r.identity)  # identities are ASCII: bytes = chars
            if len(page) == limit or (size > budget and page):
                more = True
                break
            budget -= size
            page.append(r.to_wire())
        s.reply({"type": "contacts", "relations": page, "more": more}, m)
