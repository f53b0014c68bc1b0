"""Which peer addresses relays may reach (safe by default).

Loopback, private, link-local, shared (CGNAT), reserved, documentation and multicast
addresses are refused unless an operator allows a range, so the server cannot be used
to reach internal networks (RFC 8656 section 21.1.2 and 17, "Permissions").
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache


class PeerPolicy:
    """Decides whether an IPv4 peer address may get a permission."""

    def __init__(self, allow: tuple[str, ...] = ()) -> None:
        self._allow = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in allow)
        self.allowed = lru_cache(maxsize=4096)(self._allowed)

    def _allowed(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if any(address in network for network in self._allow):
            return True
        # is_global is False for private, loopback, link-local, shared, reserved and
        # documentation ranges; multicast and broadcast need their own test.
        return address.is_global and not address.is_multicast and ip != "255.255.255.255"
