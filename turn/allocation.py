"""Allocation state (RFC 8656 sections 6, 9 and 12): pure data, no I/O, no clock.

An allocation belongs to one client 5-tuple. It owns one relay (a UDP socket behind the
:class:`Relay` protocol), IP permissions that expire after 300 s and channel bindings
that expire after 600 s. Times are ``time.monotonic()``-style seconds given by callers.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Final, Protocol

PERMISSION_LIFETIME_S: Final = 300.0  # RFC 8656 section 9
CHANNEL_LIFETIME_S: Final = 600.0  # RFC 8656 section 12

Address = tuple[str, int]
SendTo = Callable[[Any, Address], Any]


class Relay(Protocol):
    """A relayed transport address: the I/O layer's UDP socket for one allocation."""

    @property
    def address(self) -> Address:
        """The address announced in XOR-RELAYED-ADDRESS."""
        ...

    @property
    def sendto(self) -> SendTo:
        """Send a datagram to a peer (raises OSError on failure; callers drop the packet)."""
        ...

    def close(self) -> None:
        """Release the socket; idempotent."""
        ...


class Reservation(Protocol):
    """A relay port held for a later Allocate with RESERVATION-TOKEN (RFC 8656 14.9)."""

    def close(self) -> None:
        """Release the port; idempotent."""
        ...


class RelayFactory(Protocol):
    """Opens relays; implemented by the I/O layer, faked in unit tests."""

    def open_relay(
        self,
        allocation: Allocation,
        *,
        even_port: bool = False,
        reserve_next: bool = False,
        dont_fragment: bool = False,
        reservation: Reservation | None = None,
    ) -> tuple[Relay, Reservation | None]:
        """Bind a relay for ``allocation``; raises OSError if no port is free.

        ``even_port`` asks for an even port, ``reserve_next`` also holds the next port
        and returns it as a Reservation (EVEN-PORT with the R bit, RFC 8656 section
        14.6); ``reservation`` uses a port held earlier.
        """
        ...


class ClientEndpoint(Protocol):
    """Where the server sends to a client: the UDP listener socket or a TCP connection."""

    @property
    def stream(self) -> bool:
        """True for TCP/TLS: ChannelData must then be padded to 4 bytes (RFC 8656 12.5)."""
        ...

    @property
    def sendto(self) -> SendTo:
        """Send bytes to the client address (the address is ignored on a stream)."""
        ...


def _closed_sendto(data: Any, addr: Address) -> Any:
    raise OSError("relay closed")


class Channel:
    """A channel binding: number <-> peer transport address (RFC 8656 section 12)."""

    __slots__ = ("expires", "number", "peer")

    def __init__(self, number: int, peer: Address, expires: float) -> None:
        self.number = number
        self.peer = peer
        self.expires = expires


class RateLimiter:
    """Token bucket in bytes per second with one second of burst."""

    __slots__ = ("_last", "_rate", "_tokens")

    def __init__(self, bytes_per_second: int, now: float) -> None:
        self._rate = float(bytes_per_second)
        self._tokens = float(bytes_per_second)
        self._last = now

    def take(self, size: int, now: float) -> bool:
        """Spend ``size`` bytes if available; False means drop the packet."""
        tokens = min(self._rate, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if tokens < size:
            self._tokens = tokens
            return False
        self._tokens = tokens - size
        return True


class Allocation:
    """One TURN allocation and its permissions and channels."""

    __slots__ = (
        "channels",
        "client_address",
        "client_key",
        "client_sendto",
        "expires",
        "limiter",
        "peer_channels",
        "permissions",
        "relay",
        "relay_sendto",
        "response",
        "stream",
        "transaction_id",
        "username",
    )

    def __init__(
        self,
        client_key: Hashable,
        client_address: Address,
        endpoint: ClientEndpoint,
        username: str,
        transaction_id: bytes,
        expires: float,
    ) -> None:
        self.client_key = client_key
        self.client_address = client_address
        self.client_sendto = endpoint.sendto
        self.stream = endpoint.stream
        self.username = username
        self.transaction_id = transaction_id  # of the Allocate request, for retransmits
        self.response = b""  # the success response, resent to a retransmitted Allocate
        self.expires = expires
        self.relay: Relay | None = None
        self.relay_sendto: SendTo = _closed_sendto
        self.permissions: dict[str, float] = {}  # peer IP -> expiry (RFC 8656 section 9)
        self.channels: dict[int, Channel] = {}  # channel number -> binding
        self.peer_channels: dict[Address, Channel] = {}  # peer -> binding (same objects)
        self.limiter: RateLimiter | None = None

    def attach(self, relay: Relay) -> None:
        """Attach the relay opened for this allocation."""
        self.relay = relay
        self.relay_sendto = relay.sendto

    def permit(self, ip: str, now: float) -> None:
        """Install or refresh a permission for ``ip`` (RFC 8656 section 9)."""
        self.permissions[ip] = now + PERMISSION_LIFETIME_S

    def permitted(self, ip: str, now: float) -> bool:
        """Whether a live permission exists for ``ip``."""
        return self.permissions.get(ip, 0.0) >= now

    def bind(self, number: int, peer: Address, now: float) -> None:
        """Bind or refresh a channel; the caller checked the binding is consistent."""
        channel = self.channels.get(number)
        if channel is None:
            channel = Channel(number, peer, now + CHANNEL_LIFETIME_S)
            self.channels[number] = channel
            self.peer_channels[peer] = channel
        else:
            channel.expires = now + CHANNEL_LIFETIME_S

    def expire(self, now: float) -> None:
        """Forget permissions and channels that have expired."""
        for ip in [ip for ip, t in self.permissions.items() if t < now]:
            del self.permissions[ip]
        for number in [n for n, c in self.channels.items() if c.expires < now]:
            channel = self.channels.pop(number)
            del self.peer_channels[channel.peer]

    def close(self) -> None:
        """Release the relay."""
        if self.relay is not None:
            self.relay.close()
            self.relay = None
            self.relay_sendto = _closed_sendto
