"""Settings of the embedded STUN/TURN server: a plain frozen dataclass, no I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

# REALM goes into every 401 challenge, which is answered to unauthenticated
# sources: keep it short so that challenges stay small (no amplification).
MAX_REALM_LENGTH = 32


@dataclass(frozen=True)
class TurnSettings:
    """Everything the TURN server needs; validated on construction (raises ValueError).

    ``secret`` may be empty here (config loaders build the object before a secret is
    generated), but :class:`turn.server.TurnServer` refuses to start without one.
    """

    listen_host: str = "0.0.0.0"
    listen_port: int = 3478
    secret: str = ""  # shared secret of the TURN REST scheme (required to start)
    realm: str = "rallypoint"
    allow_peers: tuple[str, ...] = ()  # CIDRs allowed despite the private/loopback deny rule
    relay_port_min: int = 49152
    relay_port_max: int = 65535
    # Local address relay sockets bind to; "" = listen_host, or the machine's address
    # if that is 0.0.0.0.
    relay_host: str = ""
    # Public address announced in XOR-RELAYED-ADDRESS (1:1 NAT); "" = the bound address.
    external_address: str = ""
    default_lifetime_s: int = 600
    max_lifetime_s: int = 3600
    max_allocations_per_user: int = 10
    # Allocations per client IP address, so that one address (a NAT, or one attacker with
    # many usernames) cannot take every relay; high enough for an office behind one NAT.
    max_allocations_per_address: int = 300
    max_allocations: int = 1000
    max_bps_per_allocation: int = 0  # bytes per second, both directions together; 0 = unlimited
    tcp: bool = True
    tls_cert: str = ""  # TLS listener only when both are set
    tls_key: str = ""
    tls_port: int = 5349
    # Nonces are stateless (HMAC-signed expiry); a request with an older one gets 438.
    nonce_lifetime_s: int = 600
    # Bigger datagrams, TCP frames and relayed payloads are dropped and counted.
    max_packet_size: int = 4096
    max_permissions_per_allocation: int = 256
    max_tcp_connections: int = 1000
    # TCP/TLS connections per client IP address, so that one host cannot hold every one
    # of max_tcp_connections; high enough for an office behind one NAT.
    max_tcp_connections_per_address: int = 300
    # A new TCP/TLS connection is closed unless its first STUN request arrives (and is
    # answered) within this time; it also bounds the TLS handshake.
    tcp_first_request_timeout_s: float = 5.0
    # A TCP/TLS connection that has no allocation is closed after this idle time.
    tcp_idle_timeout_s: float = 60.0
    software: str = ""  # SOFTWARE attribute in authenticated responses; "" = none

    def __post_init__(self) -> None:
        for name in ("listen_port", "tls_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"turn: {name} must be 0-65535, got {port}")
        if not 1 <= self.relay_port_min <= self.relay_port_max <= 65535:
            raise ValueError(
                "turn: relay ports must satisfy 1 <= relay_port_min <= relay_port_max <= 65535, "
                f"got {self.relay_port_min}-{self.relay_port_max}"
            )
        if not 0 < self.default_lifetime_s <= self.max_lifetime_s:
            raise ValueError("turn: need 0 < default_lifetime_s <= max_lifetime_s")
        if not self.realm or len(self.realm.encode()) > MAX_REALM_LENGTH:
            raise ValueError(f"turn: realm must be 1-{MAX_REALM_LENGTH} bytes")
        for cidr in self.allow_peers:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"turn: allow_peers: {exc}") from None
        for name in ("listen_host", "relay_host", "external_address"):
            value = getattr(self, name)
            if value:
                try:
                    if ipaddress.ip_address(value).version != 4:
                        raise ValueError
                except ValueError:
                    message = f"turn: {name} must be an IPv4 address, got {value!r}"
                    raise ValueError(message) from None
        if self.max_packet_size < 548 or self.max_packet_size > 65535:
            raise ValueError("turn: max_packet_size must be 548-65535")
        for name in (
            "max_allocations_per_user",
            "max_allocations_per_address",
            "max_allocations",
            "max_permissions_per_allocation",
            "max_tcp_connections",
            "max_tcp_connections_per_address",
            "nonce_lifetime_s",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"turn: {name} must be >= 1")
        for name in ("tcp_first_request_timeout_s", "tcp_idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"turn: {name} must be > 0")
        if self.max_bps_per_allocation < 0:
            raise ValueError("turn: max_bps_per_allocation must be >= 0")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("turn: tls_cert and tls_key go together")

    @property
    def tls(self) -> bool:
        """Whether a TLS listener runs (both certificate and key configured)."""
        return bool(self.tls_cert and self.tls_key)
