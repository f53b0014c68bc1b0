"""Fixtures for the TURN tests: started servers (closed afterwards) and raw UDP clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from nethelpers import machine_ip
from turn_helpers import SECRET, ServerFactory, UdpClient

from turn.server import TurnServer
from turn.settings import TurnSettings


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    servers: list[TurnServer] = []

    async def factory(**overrides: Any) -> TurnServer:
        options: dict[str, Any] = {
            "listen_host": "0.0.0.0",
            "listen_port": 0,
            "secret": SECRET,
            "allow_peers": (f"{machine_ip()}/32",),
        }
        options.update(overrides)
        server = TurnServer(TurnSettings(**options))
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.close()


@pytest.fixture
async def udp_client() -> AsyncIterator[Callable[[str], Coroutine[Any, Any, UdpClient]]]:
    transports: list[asyncio.DatagramTransport] = []

    async def factory(host: str = "127.0.0.1") -> UdpClient:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(UdpClient, local_addr=(host, 0))
        transports.append(transport)
        return protocol

    yield factory
    for transport in transports:
        transport.close()
    await asyncio.sleep(0)
