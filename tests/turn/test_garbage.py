"""Garbage, truncated and oversized input (generated with hypothesis): dropped, counted,
never a crash, never a big answer."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any

from aioice import stun
from aioice.turn import create_turn_endpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nethelpers import machine_ip
from test_aioice import Receiver, close
from turn_helpers import ServerFactory, credentials

from turn.core import UNAUTHENTICATED_RESPONSE_MAX, TurnCore
from turn.settings import TurnSettings

COOKIE = struct.pack("!I", stun.COOKIE)


@st.composite
def stun_like(draw: st.DrawFn) -> bytes:
    """Well-framed STUN headers with random types and random attribute soup."""
    attributes = draw(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        0x0006,
                        0x0008,
                        0x000C,
                        0x000D,
                        0x0012,
                        0x0013,
                        0x0014,
                        0x0015,
                        0x0016,
                        0x0017,
                        0x0018,
                        0x0019,
                        0x001A,
                        0x0020,
                        0x0022,
                        0x8028,
                        0x3333,
                    ]
                )
                | st.integers(0, 0xFFFF),
                st.binary(max_size=40),
            ),
            max_size=8,
        )
    )
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) & 3) for t, v in attributes
    )
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]  # truncate inside an attribute
    message_type = draw(st.integers(0, 0x3FFF))
    length = len(body) if draw(st.booleans()) else draw(st.integers(0, 0xFFFF))
    return (
        struct.pack("!HH", message_type, length)
        + COOKIE
        + draw(st.binary(min_size=12, max_size=12))
        + body
    )


@st.composite
def channel_like(draw: st.DrawFn) -> bytes:
    number = draw(st.integers(0x4000, 0x7FFF))
    payload = draw(st.binary(max_size=64))
    length = draw(st.integers(0, 0xFFFF))
    return struct.pack("!HH", number, length) + payload


garbage = st.one_of(
    st.binary(max_size=200),
    st.binary(min_size=4097, max_size=6000),  # oversized
    stun_like(),
    channel_like(),
)


class NoRelays:
    def open_relay(self, *args: Any, **kwargs: Any) -> Any:
        raise OSError("no relays in this test")


class Endpoint:
    stream = False

    def sendto(self, data: Any, addr: Any) -> None:
        raise AssertionError("nothing may be relayed")


CORE = TurnCore(TurnSettings(secret="s"), NoRelays())


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage)
def test_core_survives_garbage(data: bytes) -> None:
    before = CORE.stats
    response = CORE.from_client(
        ("203.0.113.1", 1), ("203.0.113.1", 1), Endpoint(), memoryview(data), len(data)
    )
    after = CORE.stats
    assert response is None or len(response) <= UNAUTHENTICATED_RESPONSE_MAX
    assert after["allocations"] == 0
    if response is None:
        # Every silently dropped input is counted somewhere.
        assert sum(after.values()) > sum(before.values())


def _collect(count: int) -> list[bytes]:
    out: list[bytes] = []

    @settings(max_examples=count, deadline=None, database=None)
    @given(garbage)
    def gather(data: bytes) -> None:
        out.append(data)

    gather()
    return out


async def test_server_keeps_serving_through_a_garbage_flood(
    make_server: ServerFactory, udp_client: Any
) -> None:
    server = await make_server()
    datagrams = _collect(1500)
    ip = machine_ip()
    target = (ip, server.udp_address[1])
    attacker = await udp_client(ip)
    for i, data in enumerate(datagrams):
        attacker.send(data, target)
        if i % 100 == 99:
            await asyncio.sleep(0.01)  # stay within socket buffers; bounded in count
    # Binding is still answered, and its answer is the barrier: the server reads one socket in
    # order and answers at once, so every answer to the flood comes before it.
    binding = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    answers = []
    response = None
    async with asyncio.timeout(10):
        while response is None:
            attacker.send(bytes(binding), target)  # again after 1 s: a datagram may be lost
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    while response is None:
                        data, _ = await attacker.queue.get()
                        if data[8:20] == binding.transaction_id:
                            response = stun.parse_message(data)
                        else:
                            answers.append(data)
    assert response.attributes["XOR-MAPPED-ADDRESS"][0] == ip
    # No amplification: whatever was answered is small (and STUN-like garbage is answered).
    assert answers and all(len(a) <= UNAUTHENTICATED_RESPONSE_MAX for a in answers)
    stats = server.stats
    assert stats["dropped_garbage"] + stats["dropped_oversized"] >= len(datagrams) // 2
    assert stats["allocations"] == 0
    # A real client still gets a working allocation.
    username, password = credentials()
    transport, receiver = await create_turn_endpoint(Receiver, target, username, password)
    peer = await udp_client(ip)
    assert peer.transport is not None
    transport.sendto(b"still here", peer.transport.get_extra_info("sockname"))
    data, _ = await asyncio.wait_for(peer.queue.get(), 5)
    assert data == b"still here"
    await close(transport, receiver)


async def test_tcp_garbage_closes_only_that_connection(make_server: ServerFactory) -> None:
    server = await make_server()
    port = server.udp_address[1]
    reader, writer = await asyncio.open_connection(machine_ip(), port)
    writer.write(b"\xff" * 64)
    assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed by the server
    writer.close()
    await writer.wait_closed()
    # A frame announcing more than max_packet_size is refused before it is buffered.
    reader, writer = await asyncio.open_connection(machine_ip(), port)
    writer.write(struct.pack("!HH", 0x4000, 60000))
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
    await writer.wait_closed()
    stats = server.stats
    assert stats["dropped_garbage"] >= 1 and stats["dropped_oversized"] >= 1
    # A well-behaved TCP client is still served.
    username, password = credentials()
    transport, receiver = await create_turn_endpoint(
        Receiver, (machine_ip(), port), username, password, transport="tcp"
    )
    assert transport.get_extra_info("sockname")[0] == machine_ip()
    await close(transport, receiver)
