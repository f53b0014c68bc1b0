"""Group conversations: members, roles and the rules for changing them. Pure; no I/O.

A group is a conversation ``group:<id>`` with members, each an ``owner`` (one), an ``admin`` or
a ``member``. Every change (created, renamed, added, removed, left, role, deleted) is an event in
the conversation's own sequence (a ``system`` message whose ``group`` field says what changed),
so every device learns it through ``seq``, ``history`` and ``sync`` like any message. The store's
writer applies ``plan`` inside the transaction that appends the event, so a refused change
writes nothing and two changes can never interleave.

Who may do what:

| change | owner | admin | member | the app's backend |
|---|---|---|---|---|
| rename | yes | yes | no | yes |
| add members | yes | yes | no | yes |
| remove a member | yes | yes (not an owner or admin) | no | yes |
| leave | only when alone (hand over first) | yes | yes | - |
| set a role (admin, member) | yes | no | no | yes |
| hand over ownership (role owner) | yes | no | no | yes |
| delete the group | yes | no | no | yes |
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Any, Final

from ..wire.errors import ProtocolError

ROLES: Final = ("owner", "admin", "member")
ACTIONS: Final = ("created", "renamed", "added", "removed", "left", "role", "deleted")
#: The actor of changes the app's backend makes through the HTTP API (not a valid identity).
API_ACTOR: Final = "system:api"
MAX_NAME: Final = 64


def group_id(creator: str, cid: str) -> str:
    """The id of the group ``creator`` creates with client id ``cid``: the same for a retry,
    so creating is idempotent like sending (ids are names, not secrets: access is membership)."""
    digest = hashlib.sha256(f"{creator}\0{cid}".encode()).digest()[:15]
    return "group:" + base64.urlsafe_b64encode(digest).decode()


@dataclass(slots=True)
class GroupState:
    """A group as it is now (current members only)."""

    conversation: str
    name: str
    created_by: str
    members: dict[str, str] = field(default_factory=dict)  # identity -> role
    deleted: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "conversation": self.conversation,
            "name": self.name,
            "created_by": self.created_by,
            "members": [{"identity": i, "role": r} for i, r in sorted(self.members.items())],
        }

    def owner(self) -> str | None:
        return next((i for i, r in self.members.items() if r == "owner"), None)


@dataclass(slots=True)
class GroupChange:
    """A change asked for by ``actor`` (an identity, or ``API_ACTOR``)."""

    conversation: str
    action: str
    actor: str
    actor_name: str
    cid: str
    identities: tuple[str, ...] = ()
    role: str | None = None
    name: str | None = None


@dataclass(slots=True)
class ChangeGroup:
    """A group change as the store's writer gets it (``GroupChange`` and the size limit);
    its result is ``codec.group_value``."""

    conversation: str
    action: str
    actor: str
    actor_name: str
    cid: str
    identities: list[str]
    role: str | None
    name: str | None
    max_members: int

    def change(self) -> GroupChange:
        """The change for ``plan``."""
        return GroupChange(
            self.conversation,
            self.action,
            self.actor,
            self.actor_name,
            self.cid,
            tuple(self.identities),
            self.role,
            self.name,
        )


@dataclass(slots=True)
class Plan:
    """What a change does: the new state, the event's payload and text, who joins (their
    window opens at the event) and who goes (their window closes at it)."""

    state: GroupState
    event: dict[str, Any]
    text: str
    joined: dict[str, str]  # identity -> role
    gone: tuple[str, ...]
    roles: dict[str, str]  # identity -> new role (role changes of current members)


def _refuse(code: str, message: str) -> ProtocolError:
    return ProtocolError(code, message)


def _names(identities: tuple[str, ...]) -> str:
    more = f" and {len(identities) - 10} more" if len(identities) > 10 else ""
    return ", ".join(identities[:10]) + more


def plan(state: GroupState | None, change: GroupChange, max_members: int) -> Plan:
    """Check ``change`` against ``state`` and the rules; what it does, or ``ProtocolError``."""
    actor, action = change.actor, change.action
    api = actor == API_ACTOR
    if action == "created":
        if state is not None:
            raise _refuse("bad_field", "this group id is taken")
        name = (change.name or "").strip()
        if not 0 < len(name) <= MAX_NAME:
            raise _refuse("bad_field", f"a group name has 1-{MAX_NAME} characters")
        if api and not change.identities:
            raise _refuse("bad_field", "name the owner: the first identity")
        owner = change.identities[0] if api else actor
        named = change.identities[1:] if api else change.identities
        others = tuple(dict.fromkeys(i for i in named if i != owner))
        if 1 + len(others) > max_members:
            raise _refuse("group_full", f"a group has at most {max_members} members")
        new = GroupState(change.conversation, name, actor, {owner: "owner"})
        new.members.update({i: "member" for i in others})
        joined = dict(new.members)
        event = {"action": "created", "by": actor, "name": name, "identities": [owner, *others]}
        text = f"{change.actor_name} created the group {name!r}"
        return Plan(new, event, text, joined, (), {})
    if state is None or state.deleted:
        raise _refuse("bad_conversation", f"no group {change.conversation!r} of yours")
    role = "owner" if api else state.members.get(actor)
    if role is None:
        raise _refuse("bad_conversation", f"no group {change.conversation!r} of yours")
    new = GroupState(state.conversation, state.name, state.created_by, dict(state.members))
    by = change.actor_name
    if action == "renamed":
        name = (change.name or "").strip()
        if role == "member":
            raise _refuse("forbidden", "only the owner or an admin may rename the group")
        if not 0 < len(name) <= MAX_NAME:
            raise _refuse("bad_field", f"a group name has 1-{MAX_NAME} characters")
        new.name = name
        event = {"action": "renamed", "by": actor, "name": name}
        return Plan(new, event, f"{by} renamed the group {name!r}", {}, (), {})
    if action == "added":
        if role == "member":
            raise _refuse("forbidden", "only the owner or an admin may add members")
        adding = tuple(dict.fromkeys(i for i in change.identities if i not in new.members))
        if not adding:
            raise _refuse("bad_field", "nobody named could be added (members already)")
        if len(new.members) + len(adding) > max_members:
            raise _refuse("group_full", f"a group has at most {max_members} members")
        new.members.update({i: "member" for i in adding})
        event = {"action": "added", "by": actor, "identities": list(adding)}
        joined = {i: "member" for i in adding}
        return Plan(new, event, f"{by} added {_names(adding)}", joined, (), {})
    if action == "removed":
        targets = tuple(dict.fromkeys(change.identities))
        if role == "member":
            raise _refuse("forbidden", "only the owner or an admin may remove members")
        for t in targets:
            their = new.members.get(t)
            if their is None:
                raise _refuse("bad_field", f"{t!r} is not a member")
            if t == actor:
                raise _refuse("bad_field", "to leave the group, send group_leave")
            if their == "owner" or (their == "admin" and role != "owner"):
                raise _refuse("forbidden", f"you may not remove {t!r}")
        for t in targets:
            del new.members[t]
        event = {"action": "removed", "by": actor, "identities": list(targets)}
        return Plan(new, event, f"{by} removed {_names(targets)}", {}, targets, {})
    if action == "left":
        if api:
            raise _refuse("bad_field", "the backend removes members; it does not leave")
        if role == "owner" and len(new.members) > 1:
            raise _refuse("forbidden", "hand the group over to another member before leaving")
        del new.members[actor]
        if not new.members:  # the last one out
            new.deleted = True
        event = {"action": "left", "by": actor, "identities": [actor]}
        return Plan(new, event, f"{by} left", {}, (actor,), {})
    if action == "role":
        (target,) = change.identities[:1] or ("",)
        want = change.role
        if role != "owner":
            raise _refuse("forbidden", "only the owner may change roles")
        if want not in ROLES:
            raise _refuse("bad_field", "the role is owner, admin or member")
        if target not in new.members:
            raise _refuse("bad_field", f"{target!r} is not a member")
        if new.members[target] == want:
            raise _refuse("bad_field", f"{target!r} is {want} already")
        if target == (actor if not api else state.owner()) and want != "owner":
            raise _refuse(
                "bad_field", "the owner hands the group over by making another member owner"
            )
        roles: dict[str, str] = {target: want}
        if want == "owner":
            old = state.owner()
            if old is not None and old != target:
                roles[old] = "admin"  # the owner hands over and stays an admin
        new.members.update(roles)
        event = {"action": "role", "by": actor, "identities": [target], "role": want}
        return Plan(new, event, f"{by} made {target} {want}", {}, (), roles)
    if action == "deleted":
        if role != "owner":
            raise _refuse("forbidden", "only the owner may delete the group")
        gone = tuple(new.members)
        new.members.clear()
        new.deleted = True
        event = {"action": "deleted", "by": actor}
        return Plan(new, event, f"{by} deleted the group", {}, gone, {})
    raise _refuse("bad_field", f"unknown group change {action!r}")
