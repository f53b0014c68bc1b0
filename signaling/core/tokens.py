"""Access tokens: JWT (HS256) with an identity, a display name, an expiry and grants per room.

Claims (see docs/PROTOCOL.md, "Tokens"):

- ``iss``: the API key that signed the token; ``sub``: the identity; ``name``: display name;
- ``exp`` / ``iat``: expiry and issue time (Unix seconds);
- ``rooms``: ``{room name or "*": [grant, ...]}`` with grants from ``GRANTS``;
- ``dm``: whether the identity may use direct messages (default true);
- ``groups``: whether the identity may create groups (default false: the app's backend
  decides who may; in open mode everyone may).
- ``contacts``: whether the identity may manage its contacts itself (request, accept, decline,
  remove; default false: the app's backend keeps them through the HTTP API).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt

from ..wire.errors import ProtocolError
from ..wire.spec import IDENTITY_PATTERN, ROOM_PATTERN, compiled

GRANTS: Final = ("join", "publish", "subscribe", "chat", "moderate")
DEFAULT_GRANTS: Final = ("join", "publish", "subscribe", "chat")
LEEWAY_S: Final = 5  # clock skew tolerated on exp/iat
MAX_TIME: Final = 2**53  # time claims beyond this are not plausible seconds (nor exact JSON)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token (or open mode) allows."""

    identity: str
    name: str
    rooms: Mapping[str, frozenset[str]] = field(default_factory=dict)
    dm: bool = True
    expires_at: float | None = None
    groups: bool = False  # may create groups
    contacts: bool = False  # may manage its own contacts (request, accept, decline, remove)

    def grants_for(self, room: str) -> frozenset[str] | None:
        """Grants in ``room``, or None when the token names neither the room nor ``*``."""
        g = self.rooms.get(room)
        if g is None:
            g = self.rooms.get("*")
        return g

    def can(self, room: str, grant: str) -> bool:
        g = self.grants_for(room)
        return g is not None and grant in g


def open_claims(identity: str, name: str) -> Claims:
    """Claims of a participant in open mode: every grant but moderate, in every room, groups,
    and its own contacts (there is no backend to keep them: the HTTP API is off in open mode)."""
    return Claims(identity, name, {"*": frozenset(DEFAULT_GRANTS)}, groups=True, contacts=True)


def create_token(
    api_key: str,
    api_secret: str,
    identity: str,
    *,
    rooms: Mapping[str, Iterable[str]],
    name: str | None = None,
    ttl_s: int = 3600,
    dm: bool = True,
    groups: bool = False,
    contacts: bool = False,
    now: float | None = None,
) -> str:
    """Sign a token. ``rooms`` maps room names (or ``*``) to grants; ``contacts`` lets the
    identity manage its own contacts."""
    if compiled(IDENTITY_PATTERN).match(identity) is None:
        raise ValueError(f"bad identity {identity!r}")
    norm: dict[str, list[str]] = {}
    for room, grants in rooms.items():
        if room != "*" and compiled(ROOM_PATTERN).match(room) is None:
            raise ValueError(f"bad room name {room!r}")
        gl = sorted(set(grants))
        bad = [g for g in gl if g not in GRANTS]
        if bad:
            raise ValueError(f"unknown grant(s) {', '.join(bad)}; known: {', '.join(GRANTS)}")
        norm[room] = gl
    t = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": api_key,
        "sub": identity,
        "name": name or identity,
        "iat": t,
        "exp": t + ttl_s,
        "rooms": norm,
        "dm": dm,
    }
    if groups:
        payload["groups"] = True
    if contacts:
        payload["contacts"] = True
    return jwt.encode(payload, api_secret, algorithm="HS256")


def verify_token(
    token: str,
    api_key: str,
    api_secret: str,
    now: float | None = None,
    *,
    max_lifetime_s: int = 0,
) -> Claims:
    """Check a token's signature, issuer, expiry and claims; raise ``ProtocolError``.

    ``token_expired`` for an expired but otherwise genuine token, ``token_invalid`` for anything
    forged or malformed, including time claims that are not integers (a numeric string, a
    float, a boolean) or out of range, and, with ``max_lifetime_s``, a token whose expiry lies
    further ahead than that. (``token_wrong_room`` is decided at ``join``.)
    """
    try:
        # Time claims are checked here, strictly: PyJWT accepts numeric strings for them and
        # an integer too large for a float made the conversion below raise.
        payload = jwt.decode(
            token,
            api_secret,
            algorithms=["HS256"],
            issuer=api_key,
            options={
                "require": ["exp", "sub", "iss"],
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.PyJWTError as e:
        raise ProtocolError("token_invalid", f"the token is not valid ({e})") from None
    t = time.time() if now is None else now
    for claim in ("exp", "iat", "nbf"):
        v = payload.get(claim)
        if v is None and claim != "exp":
            continue
        if type(v) is not int or not 0 <= v <= MAX_TIME:
            raise ProtocolError(
                "token_invalid", f"the token's `{claim}` must be an integer number of seconds"
            )
    exp: int = payload["exp"]
    if exp + LEEWAY_S < t:
        raise ProtocolError("token_expired", "the token has expired")
    for claim in ("nbf", "iat"):  # neither may lie in the future
        v = payload.get(claim)
        if v is not None and v - LEEWAY_S > t:
            raise ProtocolError("token_invalid", f"the token's `{claim}` is in the future")
    if max_lifetime_s and exp - t > max_lifetime_s + LEEWAY_S:
        raise ProtocolError(
            "token_invalid",
            f"the token lives longer than this server allows ({max_lifetime_s} s)",
        )
    sub = payload.get("sub")
    if not isinstance(sub, str) or compiled(IDENTITY_PATTERN).match(sub) is None:
        raise ProtocolError("token_invalid", "the token's `sub` is not a valid identity")
    name = payload.get("name", sub)
    if not isinstance(name, str) or not 0 < len(name) <= 64:
        raise ProtocolError("token_invalid", "the token's `name` must be 1-64 characters")
    raw_rooms = payload.get("rooms", {})
    if not isinstance(raw_rooms, dict):
        raise ProtocolError("token_invalid", "the token's `rooms` must be an object")
    rooms: dict[str, frozenset[str]] = {}
    for room, grants in raw_rooms.items():
        if not isinstance(grants, list) or not all(g in GRANTS for g in grants):
            raise ProtocolError("token_invalid", f"the token's grants for {room!r} are invalid")
        rooms[room] = frozenset(grants)
    dm = payload.get("dm", True)
    if not isinstance(dm, bool):
        raise ProtocolError("token_invalid", "the token's `dm` must be a boolean")
    groups = payload.get("groups", False)
    if not isinstance(groups, bool):
        raise ProtocolError("token_invalid", "the token's `groups` must be a boolean")
    contacts = payload.get("contacts", False)
    if not isinstance(contacts, bool):
        raise ProtocolError("token_invalid", "the token's `contacts` must be a boolean")
    return Claims(sub, name, rooms, dm, float(payload["exp"]), groups, contacts)
