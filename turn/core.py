"""The TURN server's pure core: request handling, authentication and relaying.

No asyncio and no sockets here. The I/O layer (:mod:`turn.server`) feeds received bytes
in and provides the :class:`~turn.allocation.Relay`, :class:`~turn.allocation.RelayFactory`
and :class:`~turn.allocation.ClientEndpoint` seams; unit tests use list-backed fakes.

Control messages return their response as bytes (or None to stay silent). Relayed data
is sent straight through the seams: the hot paths (:meth:`TurnCore.from_client` for
ChannelData and Send indications, :meth:`TurnCore.from_peer`) do a few dict lookups and
one ``sendto`` per packet, with no logging and no parsing beyond the fixed headers.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Hashable
from typing import Final

from aioice import stun

from . import wire
from .allocation import (
    Address,
    Allocation,
    ClientEndpoint,
    RateLimiter,
    RelayFactory,
    Reservation,
)
from .credentials import NonceIssuer, long_term_key, rest_expiry, rest_password, rest_user
from .peerpolicy import PeerPolicy
from .settings import TurnSettings

# Methods (RFC 8489 section 18.2, RFC 8656 section 18).
BINDING: Final = 0x001
ALLOCATE: Final = 0x003
REFRESH: Final = 0x004
CREATE_PERMISSION: Final = 0x008
CHANNEL_BIND: Final = 0x009
_REQUEST_METHODS: Final = frozenset({BINDING, ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND})

_SUCCESS: Final = 0x0100
_ERROR: Final = 0x0110

UDP_PROTOCOL: Final = 17  # REQUESTED-TRANSPORT value (RFC 8656 section 14.7)
IPV4_FAMILY: Final = 0x01  # REQUESTED-ADDRESS-FAMILY value (RFC 8656 section 14.8)

# Anything answered to a source that has not authenticated stays this small, so the
# server cannot be used to amplify traffic towards a spoofed address.
UNAUTHENTICATED_RESPONSE_MAX: Final = 128

# A port held by EVEN-PORT's R bit waits this long for its RESERVATION-TOKEN (RFC 8656
# section 7.2 suggests about 30 seconds).
RESERVATION_LIFETIME_S: Final = 30.0

_HH = struct.Struct("!HH")
_CACHE_MAX = 4096

Clock = Callable[[], float]


class RequestError(Exception):
    """A request rejected with a STUN error code (RFC 8489 section 14.8)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class TurnCore:
    """Allocation table and request handling; see the module docstring."""

    def __init__(
        self,
        settings: TurnSettings,
        relays: RelayFactory,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        nonce_key: bytes | None = None,
    ) -> None:
        self.settings = settings
        self._relays = relays
        self._clock = clock
        self._wall_clock = wall_clock
        self._nonces = NonceIssuer(nonce_key or os.urandom(32), settings.nonce_lifetime_s)
        self._policy = PeerPolicy(settings.allow_peers)
        self._max_packet = settings.max_packet_size
        self.allocations: dict[Hashable, Allocation] = {}
        # Allocations per user (the REST username's user part, see `rest_user`).
        self._per_user: dict[str, int] = {}
        self._per_address: dict[str, int] = {}  # allocations per client IP address
        self._reservations: dict[bytes, tuple[Reservation, float]] = {}
        # Scratch buffer for data from peers: the I/O layer receives into `peer_view`
        # and the core writes the ChannelData or Data indication header in front.
        self.buffer = bytearray(wire.PEER_DATA_OFFSET + 65536 + 4)
        self._mv = memoryview(self.buffer)
        self.peer_view = self._mv[wire.PEER_DATA_OFFSET : wire.PEER_DATA_OFFSET + 65536]
        # Announced relay address -> allocation, for relaying between two allocations of
        # this server without a socket round trip (see `_to_peer`).
        self._local_relays: dict[Address, Allocation] = {}
        self._xor_peers: dict[Address, bytes] = {}  # peer -> XOR-PEER-ADDRESS value
        self._peers: dict[bytes, Address] = {}  # the inverse, for Send indications
        self._tid_prefix = os.urandom(4)
        self._tid_counter = int.from_bytes(os.urandom(4), "big")
        # Counters (see `stats`).
        self.requests = 0
        self.keepalives = 0
        self.suppressed_responses = 0
        self.allocations_created = 0
        self.allocations_deleted = 0
        self.relayed_to_peer = 0
        self.relayed_to_client = 0
        self.relayed_bytes = 0
        self.relayed_locally = 0
        self.dropped_garbage = 0
        self.dropped_oversized = 0
        self.dropped_no_allocation = 0
        self.dropped_no_permission = 0
        self.dropped_rate_limited = 0
        self.dropped_send_failed = 0
        self.auth_challenges = 0
        self.auth_failures = 0
        self.stale_nonces = 0
        self.peers_denied = 0
        self.quota_rejections = 0
        self.address_quota_rejections = 0
        self.capacity_rejections = 0

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start; ``allocations`` is the current number."""
        return {
            "allocations": len(self.allocations),
            "allocations_created": self.allocations_created,
            "allocations_deleted": self.allocations_deleted,
            "requests": self.requests,
            "keepalives": self.keepalives,
            "suppressed_responses": self.suppressed_responses,
            "relayed_packets": self.relayed_to_peer + self.relayed_to_client,
            "relayed_to_peer": self.relayed_to_peer,
            "relayed_to_client": self.relayed_to_client,
            "relayed_bytes": self.relayed_bytes,
            "relayed_locally": self.relayed_locally,
            "dropped_garbage": self.dropped_garbage,
            "dropped_oversized": self.dropped_oversized,
            "dropped_no_allocation": self.dropped_no_allocation,
            "dropped_no_permission": self.dropped_no_permission,
            "dropped_rate_limited": self.dropped_rate_limited,
            "dropped_send_failed": self.dropped_send_failed,
            "auth_challenges": self.auth_challenges,
            "auth_failures": self.auth_failures,
            "stale_nonces": self.stale_nonces,
            "peers_denied": self.peers_denied,
            "quota_rejections": self.quota_rejections,
            "address_quota_rejections": self.address_quota_rejections,
            "capacity_rejections": self.capacity_rejections,
        }

    # ------------------------------------------------------------------ hot paths

    def from_client(
        self,
        key: Hashable,
        address: Address,
        endpoint: ClientEndpoint,
        mv: memoryview,
        n: int,
    ) -> bytes | None:
        """Handle one datagram or TCP frame ``mv[:n]`` from a client.

        ``key`` identifies the client 5-tuple (the source address for UDP, the
        connection for TCP). Returns a response to send back, or None.
        """
        if n > self._max_packet:
            self.dropped_oversized += 1
            return None
        if n < 4:
            self.dropped_garbage += 1
            return None
        first = mv[0]
        if first & 0xC0 == 0x40:
            # ChannelData (RFC 8656 section 12.4), inlined: this runs once per packet.
            alloc = self.allocations.get(key)
            if alloc is None:
                self.dropped_no_allocation += 1
                return None
            number, length = _HH.unpack_from(mv)
            # UDP may carry up to 3 bytes of padding after the data (RFC 8656 12.5).
            if length + 4 > n:
                self.dropped_garbage += 1
                return None
            channel = alloc.channels.get(number)
            now = self._clock()
            # A live channel implies its permission: aioice refreshes channels only
            # every 500 s, past the 300 s permission lifetime (see docs/TURN.md).
            if channel is None or channel.expires < now:
                self.dropped_no_permission += 1
                return None
            if alloc.limiter is not None and not alloc.limiter.take(length, now):
                self.dropped_rate_limited += 1
                return None
            self._to_peer(alloc, mv, 4, length, channel.peer)
            return None
        if first == 0 and mv[1] == 0x16:  # Send indication (RFC 8656 section 10.2)
            self._send_indication(key, mv, n)
            return None
        return self.handle_stun(bytes(mv[:n]), key, address, endpoint)

    def _to_peer(
        self, alloc: Allocation, mv: memoryview, start: int, length: int, peer: Address
    ) -> None:
        """Relay ``mv[start:start+length]`` from ``alloc``'s relay to ``peer``."""
        local = self._local_relays.get(peer)
        if local is not None and local is not alloc:
            # The peer is another allocation's relay on this server (both clients use
            # this server, e.g. with relay-only ICE): hand the data over in-process, as
            # if it had crossed the two relay sockets. The receiving side applies its
            # own permission, channel and rate checks in from_peer.
            relay = alloc.relay
            if relay is None:
                self.dropped_send_failed += 1
                return
            self.relayed_to_peer += 1
            self.relayed_locally += 1
            self.relayed_bytes += length
            offset = wire.PEER_DATA_OFFSET
            self.buffer[offset : offset + length] = mv[start : start + length]
            self.from_peer(local, length, relay.address)
            return
        try:
            alloc.relay_sendto(mv[start : start + length], peer)
        except OSError:
            self.dropped_send_failed += 1
            return
        self.relayed_to_peer += 1
        self.relayed_bytes += length

    def _send_indication(self, key: Hashable, mv: memoryview, n: int) -> None:
        alloc = self.allocations.get(key)
        if alloc is None:
            self.dropped_no_allocation += 1
            return
        found = wire.parse_send_indication(mv, n)
        if found is None:
            # Malformed or missing XOR-PEER-ADDRESS / DATA: discard (RFC 8656 10.2).
            self.dropped_garbage += 1
            return
        xor_peer, start, length = found
        peer = self._peers.get(xor_peer)
        if peer is None:
            peer = wire.peer_from_xor_value(xor_peer)
            if peer is None:
                self.dropped_garbage += 1
                return
            if len(self._peers) >= _CACHE_MAX:
                self._peers.clear()
            self._peers[xor_peer] = peer
        now = self._clock()
        # No permission for the peer's IP: discard silently (RFC 8656 section 10.2).
        if alloc.permissions.get(peer[0], 0.0) < now:
            self.dropped_no_permission += 1
            return
        if alloc.limiter is not None and not alloc.limiter.take(length, now):
            self.dropped_rate_limited += 1
            return
        self._to_peer(alloc, mv, start, length, peer)

    def from_peer(self, alloc: Allocation, n: int, peer: Address) -> None:
        """Relay ``n`` bytes a peer sent to ``alloc``'s relay, received into `peer_view`.

        With a channel bound to the peer this becomes ChannelData, else a Data
        indication if the peer's IP has a permission, else it is dropped (RFC 8656
        section 11.3).
        """
        if n > self._max_packet:
            self.dropped_oversized += 1
            return
        now = self._clock()
        channel = alloc.peer_channels.get(peer)
        if channel is not None and channel.expires >= now:
            if alloc.limiter is not None and not alloc.limiter.take(n, now):
                self.dropped_rate_limited += 1
                return
            _HH.pack_into(self.buffer, wire.CHANNEL_HEADER_OFFSET, channel.number, n)
            end = wire.PEER_DATA_OFFSET + n
            if alloc.stream:
                # Over TCP, ChannelData is padded to 4 bytes (RFC 8656 section 12.5).
                pad = -n & 3
                if pad:
                    self.buffer[end : end + pad] = wire.PAD[n & 3]
                    end += pad
            data = self._mv[wire.CHANNEL_HEADER_OFFSET : end]
        elif alloc.permissions.get(peer[0], 0.0) >= now:
            if alloc.limiter is not None and not alloc.limiter.take(n, now):
                self.dropped_rate_limited += 1
                return
            xor_peer = self._xor_peers.get(peer)
            if xor_peer is None:
                if len(self._xor_peers) >= _CACHE_MAX:
                    self._xor_peers.clear()
                xor_peer = self._xor_peers[peer] = wire.xor_peer_value(peer)
            self._tid_counter += 1
            tid = self._tid_prefix + (self._tid_counter & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big")
            end = wire.pack_data_indication(self.buffer, tid, xor_peer, n)
            data = self._mv[:end]
        else:
            self.dropped_no_permission += 1
            return
        try:
            alloc.client_sendto(data, alloc.client_address)
        except OSError:
            self.dropped_send_failed += 1
            return
        self.relayed_to_client += 1
        self.relayed_bytes += n

    # ------------------------------------------------------------------ requests

    def handle_stun(
        self, data: bytes, key: Hashable, address: Address, endpoint: ClientEndpoint
    ) -> bytes | None:
        """Handle a STUN message other than a Send indication; return the response."""
        header = wire.parse_header(data)
        if header is None:
            self.dropped_garbage += 1
            return None
        if header.message_class != 0:
            # Indications other than Send need no answer (a Binding indication is a
            # keepalive); a server never expects responses (RFC 8489 section 6.3).
            if header.message_type == wire.BINDING_INDICATION:
                self.keepalives += 1
            else:
                self.dropped_garbage += 1
            return None
        self.requests += 1
        method = header.method
        tid = header.transaction_id
        if method not in _REQUEST_METHODS:
            return self._small(self._error(method, tid, 400, "Bad Request: unknown method"))
        try:
            msg = stun.parse_message(data)
            attrs = wire.scan_attributes(data)
        except Exception:  # aioice raises ValueError or struct.error on garbage
            self.dropped_garbage += 1
            return None
        fingerprint = "FINGERPRINT" in msg.attributes
        if method == BINDING:
            # RFC 8489 section 6.3.1: no authentication for Binding.
            attr = wire.pack("XOR-MAPPED-ADDRESS", address, tid)
            return self._small(
                wire.build_message(BINDING | _SUCCESS, tid, [attr], fingerprint=fingerprint)
            )
        auth = self._authenticate(msg, method, tid, fingerprint)
        if isinstance(auth, bytes):
            return self._small(auth)
        username, integrity_key = auth
        try:
            unknown = [t for t, _ in attrs if t < 0x8000 and t not in wire.UNDERSTOOD_REQUIRED]
            if unknown:
                # RFC 8489 section 6.3.1: 420 listing the unknown attributes.
                value = b"".join(t.to_bytes(2, "big") for t in unknown)
                return self._error(
                    method,
                    tid,
                    420,
                    "Unknown Attribute",
                    integrity_key,
                    fingerprint,
                    [(wire.ATTR_UNKNOWN_ATTRIBUTES, value)],
                )
            if method == ALLOCATE:
                return self._allocate(
                    msg, attrs, key, address, endpoint, username, integrity_key, fingerprint
                )
            alloc = self.allocations.get(key)
            if alloc is None:
                raise RequestError(437, "Allocation Mismatch: no allocation for this 5-tuple")
            if alloc.username != username:
                # RFC 8656 section 5: later requests must use the allocation's username.
                raise RequestError(441, "Wrong Credentials: not the allocation's username")
            if method == REFRESH:
                result = self._refresh(msg, attrs, alloc)
            elif method == CREATE_PERMISSION:
                result = self._create_permission(msg, attrs, alloc)
            else:
                result = self._channel_bind(msg, attrs, alloc)
        except RequestError as exc:
            return self._error(method, tid, exc.code, exc.reason, integrity_key, fingerprint)
        return self._success(method, tid, result, integrity_key, fingerprint)

    def _small(self, response: bytes) -> bytes | None:
        # Never send a big answer to a source that may be spoofed.
        if len(response) <= UNAUTHENTICATED_RESPONSE_MAX:
            return response
        self.suppressed_responses += 1
        return None

    def _error(
        self,
        method: int,
        tid: bytes,
        code: int,
        reason: str,
        key: bytes | None = None,
        fingerprint: bool = False,
        extra: list[tuple[int, bytes]] | None = None,
    ) -> bytes:
        attrs = [wire.pack("ERROR-CODE", (code, reason), tid), *(extra or ())]
        return wire.build_message(method | _ERROR, tid, attrs, key, fingerprint)

    def _success(
        self,
        method: int,
        tid: bytes,
        attrs: list[tuple[int, bytes]],
        key: bytes,
        fingerprint: bool,
    ) -> bytes:
        if self.settings.software:
            attrs.append(wire.pack("SOFTWARE", self.settings.software, tid))
        return wire.build_message(method | _SUCCESS, tid, attrs, key, fingerprint)

    def _challenge(
        self, method: int, tid: bytes, code: int, reason: str, fingerprint: bool
    ) -> bytes:
        # 401 and 438 carry REALM and a fresh NONCE, unsigned (RFC 8489 section 9.2.4).
        nonce = self._nonces.issue(self._wall_clock())
        extra = [
            wire.pack("REALM", self.settings.realm, tid),
            wire.pack("NONCE", nonce, tid),
        ]
        return self._error(method, tid, code, reason, None, fingerprint, extra)

    def _authenticate(
        self, msg: stun.Message, method: int, tid: bytes, fingerprint: bool
    ) -> tuple[str, bytes] | bytes:
        """Long-term credentials, RFC 8489 section 9.2.4, in the RFC's order."""
        attributes = msg.attributes
        if "MESSAGE-INTEGRITY" not in attributes:
            self.auth_challenges += 1
            return self._challenge(method, tid, 401, "Unauthorized", fingerprint)
        username = attributes.get("USERNAME")
        realm = attributes.get("REALM")
        nonce = attributes.get("NONCE")
        if username is None or realm is None or nonce is None:
            self.auth_failures += 1
            return self._error(method, tid, 400, "Bad Request: missing USERNAME, REALM or NONCE")
        now = self._wall_clock()
        expiry = rest_expiry(username)
        if expiry is None or realm != self.settings.realm:
            self.auth_failures += 1
            return self._challenge(method, tid, 401, "Unauthorized: unknown user", fingerprint)
        if expiry < now:
            self.auth_failures += 1
            return self._challenge(
                method, tid, 401, "Unauthorized: credentials expired", fingerprint
            )
        password = rest_password(self.settings.secret, username)
        key = long_term_key(username, realm, password)
        if not msg.check_message_integrity(key):
            self.auth_failures += 1
            return self._challenge(
                method, tid, 401, "Unauthorized: integrity check failed", fingerprint
            )
        if not self._nonces.valid(nonce, now):
            self.stale_nonces += 1
            return self._challenge(method, tid, 438, "Stale Nonce", fingerprint)
        return username, key

    def _lifetime(self, msg: stun.Message) -> int:
        # RFC 8656 section 7.2: a requested lifetime above the default is honoured up to
        # the maximum; anything else gets the default.
        requested = msg.attributes.get("LIFETIME")
        default = self.settings.default_lifetime_s
        if requested is not None and requested > default:
            return int(min(requested, self.settings.max_lifetime_s))
        return default

    def _allocate(
        self,
        msg: stun.Message,
        attrs: list[tuple[int, bytes]],
        key: Hashable,
        address: Address,
        endpoint: ClientEndpoint,
        username: str,
        integrity_key: bytes,
        fingerprint: bool,
    ) -> bytes:
        """RFC 8656 section 7.2."""
        tid = msg.transaction_id
        existing = self.allocations.get(key)
        if existing is not None:
            if existing.transaction_id == tid and existing.username == username:
                return existing.response  # a retransmitted Allocate
            raise RequestError(437, "Allocation Mismatch: 5-tuple already allocated")
        transport = msg.attributes.get("REQUESTED-TRANSPORT")
        if transport is None:
            raise RequestError(400, "Bad Request: missing REQUESTED-TRANSPORT")
        if transport >> 24 != UDP_PROTOCOL:
            raise RequestError(442, "Unsupported Transport Protocol: only UDP relays")
        raw = dict(attrs[::-1])  # first occurrence wins
        token = raw.get(wire.ATTR_RESERVATION_TOKEN)
        even_port = raw.get(wire.ATTR_EVEN_PORT)
        if token is not None and even_port is not None:
            raise RequestError(400, "Bad Request: RESERVATION-TOKEN with EVEN-PORT")
        family = raw.get(wire.ATTR_REQUESTED_ADDRESS_FAMILY)
        if family is not None and (len(family) < 1 or family[0] != IPV4_FAMILY):
            raise RequestError(440, "Address Family not Supported: IPv4 relays only")
        user = rest_user(username)
        if self._per_user.get(user, 0) >= self.settings.max_allocations_per_user:
            self.quota_rejections += 1
            raise RequestError(486, "Allocation Quota Reached")
        ip = address[0]
        if self._per_address.get(ip, 0) >= self.settings.max_allocations_per_address:
            # RFC 8656 section 7.2 leaves the quota to the server but says it SHOULD be
            # keyed on the username, not the transport address: that is the user quota
            # above. This one only stops a single address (with any number of users)
            # from taking every relay, so it is far higher, and it answers the same 486.
            self.address_quota_rejections += 1
            raise RequestError(486, "Allocation Quota Reached: too many from this address")
        if len(self.allocations) >= self.settings.max_allocations:
            self.capacity_rejections += 1
            raise RequestError(508, "Insufficient Capacity: too many allocations")
        now = self._clock()
        reservation = None
        if token is not None:
            held = self._reservations.pop(token, None)
            if held is None or held[1] < now:
                if held is not None:
                    held[0].close()
                self.capacity_rejections += 1
                raise RequestError(508, "Insufficient Capacity: unknown reservation token")
            reservation = held[0]
        # EVEN-PORT's R bit (the first bit of its value) asks to hold the next port.
        reserve_next = even_port is not None and len(even_port) > 0 and bool(even_port[0] & 0x80)
        lifetime = self._lifetime(msg)
        alloc = Allocation(key, address, endpoint, username, tid, now + lifetime)
        try:
            relay, reserved = self._relays.open_relay(
                alloc,
                even_port=even_port is not None,
                reserve_next=reserve_next,
                dont_fragment=wire.ATTR_DONT_FRAGMENT in raw,
                reservation=reservation,
            )
        except OSError:
            self.capacity_rejections += 1
            raise RequestError(508, "Insufficient Capacity: no relay port free") from None
        extra = []
        if reserved is not None:
            new_token = os.urandom(8)
            self._reservations[new_token] = (reserved, now + RESERVATION_LIFETIME_S)
            extra.append((wire.ATTR_RESERVATION_TOKEN, new_token))
        alloc.attach(relay)
        if self.settings.max_bps_per_allocation:
            alloc.limiter = RateLimiter(self.settings.max_bps_per_allocation, now)
        self.allocations[key] = alloc
        self._local_relays[relay.address] = alloc
        self._per_user[user] = self._per_user.get(user, 0) + 1
        self._per_address[ip] = self._per_address.get(ip, 0) + 1
        self.allocations_created += 1
        alloc.response = self._success(
            ALLOCATE,
            tid,
            [
                wire.pack("XOR-RELAYED-ADDRESS", relay.address, tid),
                wire.pack("LIFETIME", lifetime, tid),
                wire.pack("XOR-MAPPED-ADDRESS", address, tid),
                *extra,
            ],
            integrity_key,
            fingerprint,
        )
        return alloc.response

    def _refresh(
        self, msg: stun.Message, attrs: list[tuple[int, bytes]], alloc: Allocation
    ) -> list[tuple[int, bytes]]:
        """RFC 8656 section 7.3; LIFETIME 0 deletes the allocation."""
        family = dict(attrs).get(wire.ATTR_REQUESTED_ADDRESS_FAMILY)
        if family is not None and (len(family) < 1 or family[0] != IPV4_FAMILY):
            raise RequestError(443, "Peer Address Family Mismatch")
        tid = msg.transaction_id
        if msg.attributes.get("LIFETIME") == 0:
            self._delete(alloc)
            return [wire.pack("LIFETIME", 0, tid)]
        lifetime = self._lifetime(msg)
        alloc.expires = self._clock() + lifetime
        return [wire.pack("LIFETIME", lifetime, tid)]

    def _peers_of(self, msg: stun.Message, attrs: list[tuple[int, bytes]]) -> list[Address]:
        peers = []
        for attr_type, value in attrs:
            if attr_type == wire.ATTR_XOR_PEER_ADDRESS:
                try:
                    peers.append(wire.decode_xor_address(value, msg.transaction_id))
                except ValueError:
                    raise RequestError(400, "Bad Request: malformed XOR-PEER-ADDRESS") from None
        if not peers:
            raise RequestError(400, "Bad Request: missing XOR-PEER-ADDRESS")
        for ip, _ in peers:
            if ":" in ip:
                raise RequestError(443, "Peer Address Family Mismatch: IPv4 relays only")
        for ip, _ in peers:
            if not self._policy.allowed(ip):
                # RFC 8656 section 9.2 lets the server refuse a peer by policy.
                self.peers_denied += 1
                raise RequestError(403, f"Forbidden: peer address {ip} is not allowed")
        return peers

    def _create_permission(
        self, msg: stun.Message, attrs: list[tuple[int, bytes]], alloc: Allocation
    ) -> list[tuple[int, bytes]]:
        """RFC 8656 section 9.2: all peers or none."""
        ips = {ip for ip, _ in self._peers_of(msg, attrs)}
        new = ips - alloc.permissions.keys()
        if len(alloc.permissions) + len(new) > self.settings.max_permissions_per_allocation:
            self.capacity_rejections += 1
            raise RequestError(508, "Insufficient Capacity: too many permissions")
        now = self._clock()
        for ip in ips:
            alloc.permit(ip, now)
        return []

    def _channel_bind(
        self, msg: stun.Message, attrs: list[tuple[int, bytes]], alloc: Allocation
    ) -> list[tuple[int, bytes]]:
        """RFC 8656 section 11.2; also installs or refreshes the peer's permission."""
        number = msg.attributes.get("CHANNEL-NUMBER")
        if number is None:
            raise RequestError(400, "Bad Request: missing CHANNEL-NUMBER")
        if not wire.CHANNEL_MIN <= number <= wire.CHANNEL_MAX:
            raise RequestError(400, "Bad Request: channel number not in 0x4000-0x7FFE")
        peers = self._peers_of(msg, attrs)
        if len(peers) != 1:
            raise RequestError(400, "Bad Request: one XOR-PEER-ADDRESS expected")
        peer = peers[0]
        bound = alloc.channels.get(number)
        if bound is not None and bound.peer != peer:
            raise RequestError(400, "Bad Request: channel bound to another peer")
        other = alloc.peer_channels.get(peer)
        if other is not None and other.number != number:
            raise RequestError(400, "Bad Request: peer bound to another channel")
        if (
            peer[0] not in alloc.permissions
            and len(alloc.permissions) >= self.settings.max_permissions_per_allocation
        ):
            self.capacity_rejections += 1
            raise RequestError(508, "Insufficient Capacity: too many permissions")
        now = self._clock()
        alloc.bind(number, peer, now)
        alloc.permit(peer[0], now)
        return []

    # ------------------------------------------------------------------ lifecycle

    def _delete(self, alloc: Allocation) -> None:
        relay = alloc.relay
        if relay is not None and self._local_relays.get(relay.address) is alloc:
            del self._local_relays[relay.address]
        if self.allocations.get(alloc.client_key) is alloc:
            del self.allocations[alloc.client_key]
            user = rest_user(alloc.username)
            left = self._per_user.get(user, 1) - 1
            if left:
                self._per_user[user] = left
            else:
                self._per_user.pop(user, None)
            ip = alloc.client_address[0]
            left = self._per_address.get(ip, 1) - 1
            if left:
                self._per_address[ip] = left
            else:
                self._per_address.pop(ip, None)
            self.allocations_deleted += 1
        alloc.close()

    def expire(self) -> None:
        """Delete expired allocations and forget expired permissions and channels."""
        now = self._clock()
        for alloc in [a for a in self.allocations.values() if a.expires < now]:
            self._delete(alloc)
        for alloc in self.allocations.values():
            alloc.expire(now)
        for token in [t for t, (_, expires) in self._reservations.items() if expires < now]:
            self._reservations.pop(token)[0].close()

    def client_gone(self, key: Hashable) -> None:
        """The client's connection closed (TCP/TLS): its allocation goes too (RFC 8656 §6)."""
        alloc = self.allocations.get(key)
        if alloc is not None:
            self._delete(alloc)

    def close(self) -> None:
        """Delete every allocation, closing all relays."""
        for alloc in list(self.allocations.values()):
            self._delete(alloc)
        for reservation, _ in self._reservations.values():
            reservation.close()
        self._reservations.clear()
