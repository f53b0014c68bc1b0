"""Contacts, contact requests and blocks between identities, and who may see or reach whom.
Pure; no I/O.

Everything between two identities is one ``Pair``: whether they are contacts, and for each
side whether it asked the other to be a contact, dismissed the other's request, and blocks the
other. The store's writer applies ``plan`` to a pair inside the transaction that writes it, so
two changes to one pair never interleave. Each identity sees the pair through ``view``, and a
view never depends on what the *other* side did in private: that it dismissed a request or
blocks you. So nobody can learn from an answer, an event or their contact list that someone
blocked them, declined them, or does not exist:

- a request to someone who blocks you, declines it, or does not exist stays ``outgoing`` for
  you, like a request nobody has answered yet;
- a blocked identity's direct messages are stored for it alone (``hidden_from``), its calls
  ring nobody, and its ``watch`` of you sees you offline: exactly what someone offline who never
  reads, never answers and never comes online looks like.

Who may do what (docs/PROTOCOL.md, "Contacts and privacy"):

- ``watch`` (presence): yourself always; else nobody the target blocks, and with the
  ``private`` rule only a contact, a member of a group with it, or the partner of a direct
  conversation in which both have written (``open``: anyone else);
- a direct message: refused (``blocked``) to someone you block; with ``dm_strangers`` off,
  refused (``not_contact``) to anyone not a contact, whether or not it exists; to someone who
  blocks you, stored for you alone;
- a call: refused (``blocked``) to someone you block; a callee that is unknown, blocks you, or
  (``call_strangers`` off) is not a contact is invited but never rung, so the call goes
  unanswered;
- adding you to a group: not by someone you block (``Blocks.blocked``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from ..wire.errors import ProtocolError

#: How an identity sees another: a contact, a request waiting for its answer (``incoming``) or
#: for the other's (``outgoing``), or nothing.
STATUSES: Final = ("contact", "incoming", "outgoing", "none")
#: Changes an identity makes itself (``block`` and ``unblock`` also through the HTTP API).
USER_ACTIONS: Final = ("request", "accept", "decline", "remove", "block", "unblock")
#: Changes the app's backend makes: contacts at once (no request), and blocks.
API_ACTIONS: Final = ("link", "unlink", "block", "unblock")
ACTIONS: Final = (*USER_ACTIONS, "link", "unlink")
PRESENCE_RULES: Final = ("private", "open")


@dataclass(frozen=True, slots=True)
class Side:
    """What one identity of a pair did toward the other."""

    requested: bool = False  # asked the other to be a contact; no answer yet
    dismissed: bool = False  # declined the other's request (the other is not told)
    blocks: bool = False  # blocks the other


@dataclass(frozen=True, slots=True)
class Pair:
    """Everything between two identities: ``a`` (the one a change is made for) and ``b``.

    Invariants (``plan`` keeps them): contacts have no requests between them; a side has
    dismissed only a request that exists; a side that blocks the other has no request to it.
    """

    contact: bool = False
    a: Side = Side()
    b: Side = Side()

    def swapped(self) -> Pair:
        """The same pair seen from ``b``."""
        return Pair(self.contact, self.b, self.a)

    def to_list(self) -> list[bool]:
        """The pair as seven booleans (the store writer's answer)."""
        a, b = self.a, self.b
        return [
            self.contact,
            a.requested,
            a.dismissed,
            a.blocks,
            b.requested,
            b.dismissed,
            b.blocks,
        ]

    @classmethod
    def from_list(cls, v: list[Any]) -> Pair:
        return cls(bool(v[0]), Side(*map(bool, v[1:4])), Side(*map(bool, v[4:7])))


@dataclass(frozen=True, slots=True)
class Relation:
    """How one identity sees another: its entry in `contacts` and its `relation` events."""

    identity: str  # the other identity
    status: str  # one of STATUSES
    blocked: bool  # you block it

    def to_wire(self) -> dict[str, Any]:
        return {"identity": self.identity, "status": self.status, "blocked": self.blocked}

    @property
    def listed(self) -> bool:
        """Whether it belongs in the `contacts` list (anything but nothing at all)."""
        return self.status != "none" or self.blocked


def view(pair: Pair, other: str) -> Relation:
    """``pair`` as its ``a`` sees it. Depends on nothing ``b`` did in private (dismissing
    ``a``'s request, blocking ``a``): that is what keeps a block or a refusal unseen."""
    a, b = pair.a, pair.b
    if pair.contact:
        status = "contact"
    elif a.requested:
        status = "outgoing"
    elif b.requested and not a.dismissed and not a.blocks:
        status = "incoming"
    else:
        status = "none"
    return Relation(other, status, a.blocks)


def contacts_list(
    contacts: set[str], asked: set[str], incoming: dict[str, bool], blocks: set[str]
) -> list[Relation]:
    """An identity's `contacts` list, sorted, from its rows: its contacts, the targets of its
    requests, the requesters of requests to it (identity -> dismissed) and whom it blocks.
    Only what this side sees: the other's blocks and dismissals stay out of it."""
    out = []
    for other in sorted(contacts | asked | incoming.keys() | blocks):
        pair = Pair(
            other in contacts,
            Side(other in asked, incoming.get(other, False), other in blocks),
            Side(requested=other in incoming),
        )
        rel = view(pair, other)
        if rel.listed:
            out.append(rel)
    return out


def plan(action: str, pair: Pair, *, outgoing: int = 0, max_pending: int = 0) -> Pair:
    """``pair`` after ``a`` does ``action`` (or the backend does it for ``a``); raises
    ``ProtocolError`` for a change that cannot be made, before anything is written.

    ``outgoing`` is how many requests ``a`` has waiting (for ``request``), at most
    ``max_pending``. Doing again what is already done changes nothing and is no error, so a
    retry is safe.
    """
    a, b = pair.a, pair.b
    if action == "request":
        if a.blocks:
            raise ProtocolError("blocked", "you block this identity: unblock it first")
        if pair.contact or a.requested:
            return pair
        if b.requested:  # both asked: that is an answer
            return Pair(True, replace(a, dismissed=False), replace(b, requested=False))
        if outgoing >= max_pending:
            raise ProtocolError(
                "too_many_requests",
                f"you have {outgoing} contact requests waiting for an answer; cancel some "
                "(contact_remove) first",
            )
        return replace(pair, a=replace(a, requested=True))
    if action == "accept":
        if pair.contact:
            return pair
        if not b.requested or a.dismissed or a.blocks:
            raise ProtocolError("no_such_request", "no contact request of this identity waits")
        return Pair(True, replace(a, dismissed=False), replace(b, requested=False))
    if action == "decline":
        if b.requested and a.dismissed:
            return pair
        if not b.requested or a.blocks:
            raise ProtocolError("no_such_request", "no contact request of this identity waits")
        return replace(pair, a=replace(a, dismissed=True))
    if action == "remove":  # the contact, and a's own request; b is told as when cancelled
        return Pair(False, replace(a, requested=False), replace(b, dismissed=False))
    if action == "block":
        return Pair(
            pair.contact, replace(a, requested=False, blocks=True), replace(b, dismissed=False)
        )
    if action == "unblock":
        return replace(pair, a=replace(a, blocks=False))
    if action == "link":
        return Pair(True, Side(blocks=a.blocks), Side(blocks=b.blocks))
    if action == "unlink":
        return Pair(False, Side(blocks=a.blocks), Side(blocks=b.blocks))
    raise ValueError(f"unknown relation change {action!r}")


def watches_change(before: Pair, after: Pair) -> bool:
    """Whether a change can turn a `watch` between the two on or off."""
    return (
        before.contact != after.contact
        or before.a.blocks != after.a.blocks
        or before.b.blocks != after.b.blocks
    )


def may_watch(rule: str, *, own: bool, blocked: bool, related: bool) -> bool:
    """Whether a watcher sees an identity's presence: always its own; never when the
    identity blocks it; else anyone (``open``) or the related (``private``: a contact, a
    member of a group with it, a direct-conversation partner with whom both have written)."""
    if own:
        return True
    if blocked:
        return False
    return rule == "open" or related


def callee_unreachable(
    *, unknown: bool, blocked: bool, contact: bool, call_strangers: bool
) -> bool:
    """Whether a callee is invited without ringing (the call goes unanswered, as for one that
    is offline): unknown here, it blocks the caller, or a stranger where calls are for
    contacts."""
    return unknown or blocked or (not call_strangers and not contact)


class RelationIndex(Protocol):
    """What the hub needs of the store about relations (``SqliteStore``)."""

    async def all_blocks(self) -> list[tuple[str, str]]:
        """Every (blocker, blocked) pair."""
        ...

    async def related(self, identity: str, others: list[str]) -> set[str]:
        """Those of ``others`` that are ``identity``'s contacts, share a group with it, or
        have written in a direct conversation in which it has written too."""
        ...

    async def contacts_among(self, identity: str, others: list[str]) -> set[str]:
        """Those of ``others`` that are ``identity``'s contacts."""
        ...


class Blocks:
    """Every block on the server, in memory: read on each direct message and typing
    indicator, and when someone is added to a group (blocks are few; the store has them all,
    and ``signaling.relations`` changes both)."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._pairs: set[tuple[str, str]] = set(pairs)

    def load(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = set(pairs)

    def blocked(self, blocker: str, blocked: str) -> bool:
        """Whether ``blocker`` blocks ``blocked``."""
        pairs = self._pairs
        return bool(pairs) and (blocker, blocked) in pairs

    def set(self, blocker: str, blocked: str, on: bool) -> None:
        if on:
            self._pairs.add((blocker, blocked))
        else:
            self._pairs.discard((blocker, blocked))

    def __len__(self) -> int:
        return len(self._pairs)
