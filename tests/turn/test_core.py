"""The pure core with list-backed fakes at the I/O seam (no sockets, fake clocks)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from aioice import stun
from turn_helpers import REALM, SECRET, signed

from turn import wire
from turn.allocation import Allocation, Reservation
from turn.core import UNAUTHENTICATED_RESPONSE_MAX, TurnCore
from turn.credentials import rest_credentials, rest_password
from turn.settings import TurnSettings

CLIENT = ("203.0.113.7", 40000)
PEER = ("198.51.100.20", 5000)  # documentation range: denied unless allowed
PUBLIC_PEER = ("8.8.8.8", 3478)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeRelay:
    def __init__(self, port: int) -> None:
        self.address = ("192.0.2.1", port)
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.closed = False
        self.sendto = self._sendto

    def _sendto(self, data: Any, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(data), addr))

    def close(self) -> None:
        self.closed = True


class FakeHeld:
    def __init__(self, port: int) -> None:
        self.port = port
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeRelays:
    def __init__(self) -> None:
        self.relays: list[FakeRelay] = []
        self.next_port = 50000
        self.fail = False

    def open_relay(
        self,
        allocation: Allocation,
        *,
        even_port: bool = False,
        reserve_next: bool = False,
        dont_fragment: bool = False,
        reservation: Reservation | None = None,
    ) -> tuple[FakeRelay, FakeHeld | None]:
        if self.fail:
            raise OSError("no port")
        if isinstance(reservation, FakeHeld):
            relay = FakeRelay(reservation.port)
            self.relays.append(relay)
            return relay, None
        relay = FakeRelay(self.next_port)
        self.next_port += 2
        self.relays.append(relay)
        held = FakeHeld(relay.address[1] + 1) if reserve_next else None
        return relay, held


class FakeEndpoint:
    def __init__(self, stream: bool = False) -> None:
        self.stream = stream
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.sendto = self._sendto

    def _sendto(self, data: Any, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(data), addr))


class Harness:
    def __init__(self, **overrides: Any) -> None:
        options: dict[str, Any] = {"secret": SECRET, "allow_peers": ("198.51.100.0/24",)}
        options.update(overrides)
        self.settings = TurnSettings(**options)
        self.clock = Clock(1000.0)
        self.wall = Clock(1_700_000_000.0)
        self.relays = FakeRelays()
        self.core = TurnCore(self.settings, self.relays, self.clock, self.wall, b"k" * 32)
        self.endpoint = FakeEndpoint()
        self.username, self.password = rest_credentials(SECRET, "alice", 3600, self.wall.now)
        self.nonce = b""

    def raw(
        self,
        data: bytes,
        key: Any = CLIENT,
        endpoint: FakeEndpoint | None = None,
        address: tuple[str, int] = CLIENT,
    ) -> bytes | None:
        mv = memoryview(data)
        return self.core.from_client(key, address, endpoint or self.endpoint, mv, len(data))

    def fetch_nonce(self) -> None:
        if not self.nonce:
            challenge = self.send(stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST))
            assert challenge is not None and challenge.error_code == 401
            self.nonce = challenge.attributes["NONCE"]

    def send(self, message: stun.Message, **kwargs: Any) -> stun.Message | None:
        response = self.raw(bytes(message), **kwargs)
        return None if response is None else stun.parse_message(response)

    def request(
        self,
        method: stun.Method,
        attributes: dict[str, Any] | None = None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> stun.Message:
        self.fetch_nonce()
        message = signed(
            method,
            attributes or {},
            username or self.username,
            password or self.password,
            self.nonce,
        )
        response = self.send(message, **kwargs)
        assert response is not None
        return response

    def allocate(self, **attributes: Any) -> stun.Message:
        attrs = {"REQUESTED-TRANSPORT": 0x11000000, **attributes}
        response = self.request(stun.Method.ALLOCATE, attrs)
        assert response.message_class == stun.Class.RESPONSE, response
        return response

    @property
    def alloc(self) -> Allocation:
        return self.core.allocations[CLIENT]


def error(response: stun.Message) -> tuple[int, str]:
    assert response.message_class == stun.Class.ERROR, response
    code, reason = response.attributes["ERROR-CODE"]
    return code, reason


def test_binding_needs_no_credentials() -> None:
    h = Harness()
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    response = h.send(request)
    assert response is not None and response.message_class == stun.Class.RESPONSE
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT


def test_allocate_without_credentials_gets_401_with_realm_and_nonce() -> None:
    h = Harness()
    request = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
    request.attributes["REQUESTED-TRANSPORT"] = 0x11000000
    response = h.send(request)
    assert response is not None
    assert error(response)[0] == 401
    assert response.attributes["REALM"] == REALM
    assert len(response.attributes["NONCE"]) == 32
    assert "MESSAGE-INTEGRITY" not in response.attributes
    assert h.core.stats["auth_challenges"] == 1
    assert not h.core.allocations


def test_allocate_success_is_signed_and_complete() -> None:
    h = Harness()
    response = h.allocate(LIFETIME=1200)
    assert response.attributes["XOR-RELAYED-ADDRESS"] == ("192.0.2.1", 50000)
    assert response.attributes["XOR-MAPPED-ADDRESS"] == CLIENT
    assert response.attributes["LIFETIME"] == 1200
    key = wire.stun.message_integrity  # noqa: F841 - the check below uses the real key
    from turn.credentials import long_term_key

    assert response.check_message_integrity(long_term_key(h.username, REALM, h.password))
    assert h.core.stats["allocations"] == 1


@pytest.mark.parametrize(
    ("requested", "granted"), [(None, 600), (60, 600), (1800, 1800), (99999, 3600)]
)
def test_allocation_lifetime_rules(requested: int | None, granted: int) -> None:
    h = Harness()
    attrs = {} if requested is None else {"LIFETIME": requested}
    assert h.allocate(**attrs).attributes["LIFETIME"] == granted


def test_wrong_password_gets_401_and_counts() -> None:
    h = Harness()
    response = h.request(
        stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, password="wrong"
    )
    code, reason = error(response)
    assert code == 401 and "integrity" in reason
    assert "NONCE" in response.attributes and "REALM" in response.attributes
    assert h.core.stats["auth_failures"] == 1
    assert not h.core.allocations


def test_expired_credentials_get_401() -> None:
    h = Harness()
    username, password = rest_credentials(SECRET, "bob", 10, h.wall.now - 60)
    response = h.request(
        stun.Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        username=username,
        password=password,
    )
    code, reason = error(response)
    assert code == 401 and "expired" in reason


def test_username_not_in_rest_form_gets_401() -> None:
    h = Harness()
    response = h.request(
        stun.Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        username="alice",
        password="whatever",
    )
    assert error(response)[0] == 401


def test_stale_nonce_gets_438_with_a_fresh_nonce() -> None:
    h = Harness()
    h.allocate()
    old = h.nonce
    h.wall.now += h.settings.nonce_lifetime_s + 1
    response = h.request(stun.Method.REFRESH, {"LIFETIME": 600})
    assert error(response)[0] == 438
    assert response.attributes["NONCE"] != old
    assert h.core.stats["stale_nonces"] == 1
    h.nonce = response.attributes["NONCE"]
    assert h.request(stun.Method.REFRESH, {}).message_class == stun.Class.RESPONSE


def test_forged_nonce_gets_438() -> None:
    h = Harness()
    h.nonce = b"f" * 32
    response = h.request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000})
    assert error(response)[0] == 438


def test_missing_username_gets_400() -> None:
    h = Harness()
    message = stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST)
    message.add_message_integrity(b"x" * 16)
    response = h.send(message)
    assert response is not None and error(response)[0] == 400


def test_allocate_errors() -> None:
    h = Harness()
    assert error(h.request(stun.Method.ALLOCATE, {}))[0] == 400
    response = h.request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x06000000})
    assert error(response)[0] == 442
    h.allocate()
    response = h.request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000})
    assert error(response)[0] == 437


def test_retransmitted_allocate_gets_the_same_response() -> None:
    h = Harness()
    h.fetch_nonce()
    message = signed(
        stun.Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        h.username,
        h.password,
        h.nonce,
    )
    first = h.raw(bytes(message))
    second = h.raw(bytes(message))
    assert first is not None and first == second
    assert len(h.relays.relays) == 1


def test_ipv6_relay_request_gets_440() -> None:
    h = Harness()
    h.fetch_nonce()
    # Re-encode with the extra attribute kept: build the signed message by hand.
    from turn.credentials import long_term_key

    tid = b"6" * 12
    attrs = [
        wire.pack("REQUESTED-TRANSPORT", 0x11000000, tid),
        (wire.ATTR_REQUESTED_ADDRESS_FAMILY, b"\x02\x00\x00\x00"),
        wire.pack("USERNAME", h.username, tid),
        wire.pack("REALM", REALM, tid),
        wire.pack("NONCE", h.nonce, tid),
    ]
    key = long_term_key(h.username, REALM, h.password)
    raw = wire.build_message(0x0003, tid, attrs, key)
    response = h.raw(raw)
    assert response is not None
    assert error(stun.parse_message(response))[0] == 440


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    h = Harness()
    h.fetch_nonce()
    from turn.credentials import long_term_key

    tid = b"t" * 12
    attrs = [
        wire.pack("REQUESTED-TRANSPORT", 0x11000000, tid),
        (0x0030, b"\x00\x00\x00\x00"),
        wire.pack("USERNAME", h.username, tid),
        wire.pack("REALM", REALM, tid),
        wire.pack("NONCE", h.nonce, tid),
    ]
    raw = wire.build_message(0x0003, tid, attrs, long_term_key(h.username, REALM, h.password))
    response = h.raw(raw)
    assert response is not None
    assert response[:2] == b"\x01\x13"
    assert error(stun.parse_message(response))[0] == 420
    assert b"\x00\x0a\x00\x02\x00\x30" in response  # UNKNOWN-ATTRIBUTES lists 0x0030


def test_quota_per_user_486_and_total_capacity_508() -> None:
    h = Harness(max_allocations_per_user=1, max_allocations=2)
    h.allocate()
    other = ("203.0.113.8", 1)
    response = h.request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, key=other)
    assert error(response)[0] == 486
    bob, bob_password = rest_credentials(SECRET, "bob", 600, h.wall.now)
    ok = h.request(
        stun.Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        username=bob,
        password=bob_password,
        key=other,
    )
    assert ok.message_class == stun.Class.RESPONSE
    carol, carol_password = rest_credentials(SECRET, "carol", 600, h.wall.now)
    full = h.request(
        stun.Method.ALLOCATE,
        {"REQUESTED-TRANSPORT": 0x11000000},
        username=carol,
        password=carol_password,
        key=("203.0.113.9", 1),
    )
    assert error(full)[0] == 508
    assert h.core.stats["quota_rejections"] == 1
    assert h.core.stats["capacity_rejections"] == 1


def allocate_as(h: Harness, username: str, password: str, key: Any) -> stun.Message:
    attrs = {"REQUESTED-TRANSPORT": 0x11000000}
    return h.request(stun.Method.ALLOCATE, attrs, username=username, password=password, key=key)


def test_quota_counts_the_user_not_each_username() -> None:
    # Every welcome mints a username with a new expiry: they all belong to one user.
    h = Harness(max_allocations_per_user=2)
    for i, ttl in enumerate((600, 601)):
        username, password = rest_credentials(SECRET, "alice", ttl, h.wall.now)
        response = allocate_as(h, username, password, ("203.0.113.1", i))
        assert response.message_class == stun.Class.RESPONSE
    username, password = rest_credentials(SECRET, "alice", 602, h.wall.now)
    assert error(allocate_as(h, username, password, ("203.0.113.1", 9)))[0] == 486
    assert h.core.stats["quota_rejections"] == 1
    bob, bob_password = rest_credentials(SECRET, "bob", 600, h.wall.now)
    response = allocate_as(h, bob, bob_password, ("203.0.113.2", 1))
    assert response.message_class == stun.Class.RESPONSE
    # Deleting one of alice's allocations gives her the slot back.
    h.core.client_gone(("203.0.113.1", 0))
    response = allocate_as(h, username, password, ("203.0.113.1", 9))
    assert response.message_class == stun.Class.RESPONSE


def test_a_username_without_colon_is_its_own_user() -> None:
    # turnutils_uclient -W sends a bare timestamp; "1700003600" and "1700003601" differ.
    h = Harness(max_allocations_per_user=1)
    for i, stamp in enumerate(("1700003600", "1700003601")):
        password = rest_password(SECRET, stamp)
        response = allocate_as(h, stamp, password, ("203.0.113.1", i))
        assert response.message_class == stun.Class.RESPONSE
    password = rest_password(SECRET, "1700003600")
    assert error(allocate_as(h, "1700003600", password, ("203.0.113.1", 9)))[0] == 486


def test_allocations_per_address_486_and_the_slot_comes_back() -> None:
    h = Harness(max_allocations_per_address=2)
    nat = ("203.0.113.50", 0)
    for port in (1, 2):
        username, password = rest_credentials(SECRET, f"user{port}", 600, h.wall.now)
        attrs = {"REQUESTED-TRANSPORT": 0x11000000}
        response = h.request(
            stun.Method.ALLOCATE,
            attrs,
            username,
            password,
            key=(nat[0], port),
            address=(nat[0], port),
        )
        assert response.message_class == stun.Class.RESPONSE
    username, password = rest_credentials(SECRET, "user3", 600, h.wall.now)
    attrs = {"REQUESTED-TRANSPORT": 0x11000000}
    third = (nat[0], 3)
    response = h.request(stun.Method.ALLOCATE, attrs, username, password, key=third, address=third)
    assert error(response) == (486, "Allocation Quota Reached: too many from this address")
    assert h.core.stats["address_quota_rejections"] == 1
    other = ("203.0.113.51", 3)
    response = h.request(stun.Method.ALLOCATE, attrs, username, password, key=other, address=other)
    assert response.message_class == stun.Class.RESPONSE
    h.core.client_gone((nat[0], 1))
    response = h.request(stun.Method.ALLOCATE, attrs, username, password, key=third, address=third)
    assert response.message_class == stun.Class.RESPONSE


def test_no_relay_port_gets_508() -> None:
    h = Harness()
    h.relays.fail = True
    response = h.request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000})
    assert error(response)[0] == 508


def test_even_port_reservation_and_token() -> None:
    h = Harness()
    tid = b"r" * 12
    h.fetch_nonce()
    from turn.credentials import long_term_key

    key = long_term_key(h.username, REALM, h.password)
    auth = [
        wire.pack("USERNAME", h.username, tid),
        wire.pack("REALM", REALM, tid),
        wire.pack("NONCE", h.nonce, tid),
    ]
    first = [
        wire.pack("REQUESTED-TRANSPORT", 0x11000000, tid),
        (wire.ATTR_EVEN_PORT, b"\x80"),
        *auth,
    ]
    response = h.raw(wire.build_message(0x0003, tid, first, key))
    assert response is not None
    token = dict(wire.scan_attributes(response))[wire.ATTR_RESERVATION_TOKEN]
    assert len(token) == 8
    tid2 = b"s" * 12
    second = [
        wire.pack("REQUESTED-TRANSPORT", 0x11000000, tid2),
        (wire.ATTR_RESERVATION_TOKEN, token),
        *[(t, v) for t, v in auth],
    ]
    other = ("203.0.113.8", 2)
    response2 = h.raw(wire.build_message(0x0003, tid2, second, key), key=other)
    assert response2 is not None
    parsed = stun.parse_message(response2)
    assert parsed.attributes["XOR-RELAYED-ADDRESS"][1] == 50001
    # The token is single-use.
    response3 = h.raw(wire.build_message(0x0003, tid2, second, key), key=("203.0.113.8", 3))
    assert response3 is not None and error(stun.parse_message(response3))[0] == 508


def test_refresh_extends_and_zero_deletes() -> None:
    h = Harness()
    h.allocate()
    relay = h.relays.relays[0]
    response = h.request(stun.Method.REFRESH, {"LIFETIME": 3000})
    assert response.attributes["LIFETIME"] == 3000
    assert h.alloc.expires == h.clock.now + 3000
    response = h.request(stun.Method.REFRESH, {"LIFETIME": 0})
    assert response.attributes["LIFETIME"] == 0
    assert not h.core.allocations and relay.closed
    assert error(h.request(stun.Method.REFRESH, {"LIFETIME": 0}))[0] == 437


def test_other_username_on_the_allocation_gets_441() -> None:
    h = Harness()
    h.allocate()
    bob, bob_password = rest_credentials(SECRET, "bob", 600, h.wall.now)
    response = h.request(stun.Method.REFRESH, {}, username=bob, password=bob_password)
    assert error(response)[0] == 441


def test_allocation_expires() -> None:
    h = Harness()
    h.allocate()
    relay = h.relays.relays[0]
    h.clock.now += 599
    h.core.expire()
    assert h.core.allocations
    h.clock.now += 2
    h.core.expire()
    assert not h.core.allocations and relay.closed


def test_create_permission_denied_and_allowed_ranges() -> None:
    h = Harness(allow_peers=())
    h.allocate()
    for ip in ("127.0.0.1", "10.1.2.3", "192.168.1.1", "169.254.1.1", "224.0.0.1", "0.0.0.0"):
        response = h.request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": (ip, 1)})
        code, reason = error(response)
        assert code == 403 and ip in reason
    assert h.core.stats["peers_denied"] == 6
    ok = h.request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PUBLIC_PEER})
    assert ok.message_class == stun.Class.RESPONSE
    assert h.alloc.permitted(PUBLIC_PEER[0], h.clock.now)


def test_requests_without_allocation_get_437() -> None:
    h = Harness()
    response = h.request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PUBLIC_PEER})
    assert error(response)[0] == 437


def test_ipv6_peer_gets_443() -> None:
    h = Harness()
    h.allocate()
    response = h.request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": ("2001:db8::1", 9)})
    assert error(response)[0] == 443


def test_channel_bind_rules() -> None:
    h = Harness()
    h.allocate()
    bind = stun.Method.CHANNEL_BIND
    assert error(h.request(bind, {"XOR-PEER-ADDRESS": PEER}))[0] == 400
    assert error(h.request(bind, {"CHANNEL-NUMBER": 0x3FFF, "XOR-PEER-ADDRESS": PEER}))[0] == 400
    assert h.request(bind, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": PEER}).message_class == (
        stun.Class.RESPONSE
    )
    # Refreshing the same binding is fine; rebinding either side is not.
    assert h.request(bind, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": PEER}).message_class == (
        stun.Class.RESPONSE
    )
    other_peer = (PEER[0], PEER[1] + 1)
    assert (
        error(h.request(bind, {"CHANNEL-NUMBER": 0x4000, "XOR-PEER-ADDRESS": other_peer}))[0] == 400
    )
    assert error(h.request(bind, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER}))[0] == 400
    denied = {"CHANNEL-NUMBER": 0x4002, "XOR-PEER-ADDRESS": ("127.0.0.1", 5)}
    assert error(h.request(bind, denied))[0] == 403
    # ChannelBind installs the permission (RFC 8656 section 11.2).
    assert h.alloc.permitted(PEER[0], h.clock.now)


def _channel_data(number: int, payload: bytes) -> bytes:
    return struct.pack("!HH", number, len(payload)) + payload


def _from_peer(h: Harness, payload: bytes, peer: tuple[str, int] = PEER) -> None:
    start = wire.PEER_DATA_OFFSET
    h.core.buffer[start : start + len(payload)] = payload
    h.core.from_peer(h.alloc, len(payload), peer)


def test_channel_data_both_ways() -> None:
    h = Harness()
    h.allocate()
    relay = h.relays.relays[0]
    h.request(stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER})
    assert h.raw(_channel_data(0x4001, b"hello")) is None
    assert relay.sent == [(b"hello", PEER)]
    # UDP ChannelData may be padded; the padding is not relayed.
    h.raw(_channel_data(0x4001, b"abc") + b"\x00")
    assert relay.sent[-1] == (b"abc", PEER)
    h.endpoint.sent.clear()
    _from_peer(h, b"world")
    assert h.endpoint.sent == [(_channel_data(0x4001, b"world"), CLIENT)]
    stats = h.core.stats
    assert stats["relayed_to_peer"] == 2 and stats["relayed_to_client"] == 1
    # An unbound channel, and a length beyond the datagram, are dropped.
    h.raw(_channel_data(0x4002, b"x"))
    h.raw(_channel_data(0x4001, b"xyz")[:-1])
    assert len(relay.sent) == 2


def test_channel_data_is_padded_on_streams() -> None:
    h = Harness()
    stream = FakeEndpoint(stream=True)
    h.fetch_nonce()
    h.request(stun.Method.ALLOCATE, {"REQUESTED-TRANSPORT": 0x11000000}, endpoint=stream)
    h.request(
        stun.Method.CHANNEL_BIND,
        {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER},
        endpoint=stream,
    )
    stream.sent.clear()
    _from_peer(h, b"12345")
    assert stream.sent[0][0] == _channel_data(0x4001, b"12345") + b"\x00\x00\x00"


def test_send_and_data_indications_need_a_permission() -> None:
    h = Harness()
    h.allocate()
    relay = h.relays.relays[0]
    send = stun.Message(stun.Method.SEND, stun.Class.INDICATION)
    send.attributes["XOR-PEER-ADDRESS"] = PEER
    send.attributes["DATA"] = b"payload"
    assert h.raw(bytes(send)) is None
    _from_peer(h, b"nope")
    assert relay.sent == [] and h.endpoint.sent == []
    assert h.core.stats["dropped_no_permission"] == 2
    h.request(stun.Method.CREATE_PERMISSION, {"XOR-PEER-ADDRESS": PEER})
    h.endpoint.sent.clear()
    h.raw(bytes(send))
    assert relay.sent == [(b"payload", PEER)]
    # Any port of a permitted IP may send back (permissions are per IP).
    _from_peer(h, b"back!", (PEER[0], 9999))
    data, addr = h.endpoint.sent[0]
    assert addr == CLIENT
    indication = stun.parse_message(data)
    assert indication.message_method == stun.Method.DATA
    assert indication.message_class == stun.Class.INDICATION
    assert indication.attributes["XOR-PEER-ADDRESS"] == (PEER[0], 9999)
    assert indication.attributes["DATA"] == b"back!"
    # Permissions last 300 s (RFC 8656 section 9).
    h.clock.now += 301
    h.raw(bytes(send))
    assert len(relay.sent) == 1


def test_bandwidth_limit_drops_excess() -> None:
    h = Harness(max_bps_per_allocation=1000)
    h.allocate()
    relay = h.relays.relays[0]
    h.request(stun.Method.CHANNEL_BIND, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": PEER})
    for _ in range(5):
        h.raw(_channel_data(0x4001, b"x" * 400))
    assert len(relay.sent) == 2
    assert h.core.stats["dropped_rate_limited"] == 3
    h.clock.now += 1.0
    h.raw(_channel_data(0x4001, b"x" * 400))
    assert len(relay.sent) == 3


def test_oversized_and_truncated_input_is_dropped() -> None:
    h = Harness()
    assert h.raw(b"\x00\x01" + b"\x00" * 5000) is None
    assert h.core.stats["dropped_oversized"] == 1
    binding = bytes(stun.Message(stun.Method.BINDING, stun.Class.REQUEST))
    assert h.raw(binding[:-1]) is None
    assert h.raw(b"\x00") is None
    assert h.core.stats["dropped_garbage"] == 2


def test_unauthenticated_answers_stay_small() -> None:
    h = Harness(realm="r" * 32)
    for method in stun.Method:
        request = stun.Message(method, stun.Class.REQUEST)
        response = h.raw(bytes(request))
        assert response is not None
        assert len(response) <= UNAUTHENTICATED_RESPONSE_MAX


def test_connection_close_deletes_its_allocation() -> None:
    h = Harness()
    h.allocate()
    relay = h.relays.relays[0]
    h.core.client_gone(CLIENT)
    assert not h.core.allocations and relay.closed
    assert h.core.stats["allocations_deleted"] == 1


def test_data_between_two_allocations_is_handed_over_in_process() -> None:
    """A peer that is another allocation's relay gets the data without a socket round
    trip, with the receiver's permission, channel and counters applied as usual."""
    h = Harness(allow_peers=("198.51.100.0/24", "192.0.2.0/24"))
    other_key, other = ("other-client",), FakeEndpoint()
    h.allocate()
    attrs = {"REQUESTED-TRANSPORT": 0x11000000}
    assert h.request(stun.Method.ALLOCATE, attrs, key=other_key, endpoint=other).attributes
    relay_a, relay_b = h.relays.relays
    bind = stun.Method.CHANNEL_BIND
    h.request(bind, {"CHANNEL-NUMBER": 0x4001, "XOR-PEER-ADDRESS": relay_b.address})
    # B has no permission for A's relay yet: dropped on B's side, and nothing hits a socket.
    h.raw(_channel_data(0x4001, b"early"))
    assert relay_a.sent == [] and other.sent == []
    assert h.core.stats["dropped_no_permission"] == 1
    h.request(
        bind,
        {"CHANNEL-NUMBER": 0x4002, "XOR-PEER-ADDRESS": relay_a.address},
        key=other_key,
        endpoint=other,
    )
    other.sent.clear()
    h.raw(_channel_data(0x4001, b"hello B"))
    assert other.sent == [(_channel_data(0x4002, b"hello B"), CLIENT)]
    # B answers with a Send indication: A's channel to B's relay turns it into ChannelData.
    send = stun.Message(stun.Method.SEND, stun.Class.INDICATION)
    send.attributes["XOR-PEER-ADDRESS"] = relay_a.address
    send.attributes["DATA"] = b"hello A"
    h.endpoint.sent.clear()
    assert h.raw(bytes(send), key=other_key, endpoint=other) is None
    assert h.endpoint.sent == [(_channel_data(0x4001, b"hello A"), CLIENT)]
    assert relay_a.sent == [] and relay_b.sent == []
    stats = h.core.stats
    assert stats["relayed_locally"] == 3
    assert stats["relayed_to_peer"] == 3 and stats["relayed_to_client"] == 2
    # Once B's allocation is gone, A's data goes out of its relay socket as usual.
    h.request(stun.Method.REFRESH, {"LIFETIME": 0}, key=other_key, endpoint=other)
    h.raw(_channel_data(0x4001, b"to the socket"))
    assert relay_a.sent == [(b"to the socket", relay_b.address)]
