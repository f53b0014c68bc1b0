"""aioice's TURN client (an independent implementation) against our server."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from aioice.turn import TurnTransport, create_turn_endpoint
from nethelpers import machine_ip
from turn_helpers import (
    SECRET,
    Receiver,
    ServerFactory,
    UdpClient,
    close,
    credentials,
    self_signed,
)


async def relay_round_trip(
    server_addr: tuple[str, int], peer: UdpClient, transport_name: str, **kwargs: Any
) -> tuple[TurnTransport, Receiver]:
    username, password = credentials()
    transport, receiver = await create_turn_endpoint(
        Receiver, server_addr, username, password, transport=transport_name, **kwargs
    )
    relayed = transport.get_extra_info("sockname")
    assert relayed[0] == machine_ip()
    assert peer.transport is not None
    peer_addr = peer.transport.get_extra_info("sockname")
    for i in range(5):
        transport.sendto(b"ping %d" % i, peer_addr)
        data, addr = await asyncio.wait_for(peer.queue.get(), 5)
        assert (data, addr) == (b"ping %d" % i, relayed)
        peer.send(b"pong %d" % i, relayed)
        data, addr = await asyncio.wait_for(receiver.queue.get(), 5)
        assert (data, addr) == (b"pong %d" % i, peer_addr)
    return transport, receiver


@pytest.mark.parametrize("transport_name", ["udp", "tcp"])
async def test_aioice_gets_a_relay_and_exchanges_data(
    make_server: ServerFactory, udp_client: Any, transport_name: str
) -> None:
    server = await make_server()
    peer = await udp_client(machine_ip())
    addr = (machine_ip(), server.udp_address[1])
    transport, receiver = await relay_round_trip(addr, peer, transport_name)
    stats = server.stats
    assert stats["allocations"] == 1
    assert stats["relayed_to_peer"] >= 5 and stats["relayed_to_client"] >= 5
    await close(transport, receiver)
    # aioice deletes its allocation with Refresh LIFETIME=0 (RFC 8656 section 7.3).
    for _ in range(50):
        if server.stats["allocations"] == 0:
            break
        await asyncio.sleep(0.05)
    assert server.stats["allocations"] == 0


async def test_aioice_over_tls(make_server: ServerFactory, udp_client: Any, tmp_path: Path) -> None:
    ip = machine_ip()
    cert, key = self_signed(tmp_path, ip)
    server = await make_server(tls_cert=str(cert), tls_key=str(key), tls_port=0)
    assert server.tls_address is not None
    context = ssl.create_default_context(cafile=str(cert))
    peer = await udp_client(ip)
    addr = (ip, server.tls_address[1])
    transport, receiver = await relay_round_trip(addr, peer, "tcp", ssl=context)
    await close(transport, receiver)


async def test_peer_in_a_denied_range_is_refused(
    make_server: ServerFactory, udp_client: Any
) -> None:
    server = await make_server()
    username, password = credentials()
    transport, receiver = await create_turn_endpoint(
        Receiver, (machine_ip(), server.udp_address[1]), username, password
    )
    # Loopback is denied by default; only the machine's own address is allowed here.
    transport.sendto(b"x", ("127.0.0.1", 9))
    exc = await asyncio.wait_for(receiver.errors.get(), 5)
    assert isinstance(exc, stun.TransactionFailed)
    assert exc.response.error_code == 403
    assert server.stats["peers_denied"] == 1
    assert server.stats["relayed_to_peer"] == 0
    # The server keeps serving the same allocation.
    peer = await udp_client(machine_ip())
    assert peer.transport is not None
    transport.sendto(b"ok", peer.transport.get_extra_info("sockname"))
    data, _ = await asyncio.wait_for(peer.queue.get(), 5)
    assert data == b"ok"
    await close(transport, receiver)


@pytest.mark.parametrize(
    ("case", "code"),
    [("wrong", 401), ("expired", 401), ("missing", 401), ("other-secret", 401)],
)
async def test_bad_credentials_are_refused(
    make_server: ServerFactory, case: str, code: int
) -> None:
    server = await make_server()
    username: str | None
    password: str | None
    username, password = credentials()
    if case == "wrong":
        password = "not-the-password"
    elif case == "expired":
        username, password = credentials(ttl=-10)
    elif case == "missing":
        username = password = None
    else:
        username, password = credentials(secret=SECRET + "x")
    with pytest.raises(stun.TransactionFailed) as info:
        await create_turn_endpoint(
            Receiver, (machine_ip(), server.udp_address[1]), username, password
        )
    assert info.value.response.error_code == code
    stats = server.stats
    assert stats["allocations"] == 0
    if case == "missing":
        assert stats["auth_challenges"] == 1 and stats["auth_failures"] == 0
    else:
        assert stats["auth_failures"] == 1
