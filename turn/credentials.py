"""Long-term credentials: coturn's TURN REST scheme, the STUN key, stateless nonces.

TURN REST ("use-auth-secret" in coturn): ``username = "<expiry unix time>:<user id>"`` and
``password = base64(HMAC-SHA1(secret, username))``. The timestamp is the *expiry*.
The long-term credential key is ``MD5(username ":" realm ":" password)`` (RFC 8489
section 9.2.2).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


def rest_password(secret: str, username: str) -> str:
    """The password for ``username``: base64(HMAC-SHA1(secret, username))."""
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def rest_credentials(
    secret: str, user_id: str, ttl_s: int, now: float | None = None
) -> tuple[str, str]:
    """(username, password) in coturn's TURN REST form; username = f"{int(now)+ttl_s}:{user_id}"."""
    if now is None:
        now = time.time()
    username = f"{int(now) + ttl_s}:{user_id}"
    return username, rest_password(secret, username)


def rest_expiry(username: str) -> int | None:
    """The expiry time in a REST username, or None if the username is not in that form.

    Like coturn, the timestamp is everything before the first ':' (or the whole
    username if it has none, as ``turnutils_uclient -W`` sends); the user id may be
    empty or contain further colons.
    """
    stamp = username.partition(":")[0]
    if not stamp.isdigit() or len(stamp) > 12:
        return None
    return int(stamp)


def rest_user(username: str) -> str:
    """The user a REST username belongs to: everything after the first ':'.

    Every credential minted for a user has another expiry, so quotas must count the user,
    not the whole username. A username without ':' (a bare timestamp, as
    ``turnutils_uclient -W`` sends) is its own user.
    """
    stamp, sep, user = username.partition(":")
    return user if sep else stamp


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """The MESSAGE-INTEGRITY key for long-term credentials (RFC 8489 section 9.2.2)."""
    return hashlib.md5(f"{username}:{realm}:{password}".encode()).digest()


class NonceIssuer:
    """Stateless nonces (RFC 8489 section 9.2): hex expiry time + truncated HMAC of it.

    The server keeps no per-client state, so a flood of unauthenticated requests costs
    nothing but the answer, and a nonce cannot be forged or extended by the client.
    """

    def __init__(self, key: bytes, lifetime_s: int) -> None:
        self._key = key
        self._lifetime_s = lifetime_s

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._key, stamp, hashlib.sha256).hexdigest()[:24].encode()

    def issue(self, now: float) -> bytes:
        """A fresh nonce valid for the configured lifetime from ``now`` (unix time)."""
        stamp = b"%08x" % (int(now) + self._lifetime_s)
        return stamp + self._mac(stamp)

    def valid(self, nonce: bytes, now: float) -> bool:
        """Whether ``nonce`` was issued by us and has not expired."""
        if len(nonce) != 32:
            return False
        stamp, mac = nonce[:8], nonce[8:]
        if not hmac.compare_digest(mac, self._mac(stamp)):
            return False
        try:
            return int(stamp, 16) >= now
        except ValueError:
            return False
