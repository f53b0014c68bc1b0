"""The TURN server embedded in `rallypoint serve`: the credentials handed out in
`welcome.ice_servers` work against it, as a real process, with aioice as the client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
from aioice import stun
from aioice.turn import create_turn_endpoint
from nethelpers import free_port, machine_ip
from turn_helpers import Receiver, UdpClient, close

from signaling.config import SECTIONS
from signaling.sdk.wsclient import Client


@pytest.fixture
async def embedded(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """`python -m signaling serve` with TURN on: yields (websocket URL, TURN port)."""
    ip = machine_ip()
    port, turn_port = free_port("127.0.0.1"), free_port(ip)
    env = {
        **os.environ,
        "RALLYPOINT_TURN_PORT": str(turn_port),
        "RALLYPOINT_TURN_LISTEN_HOST": ip,
        "RALLYPOINT_TURN_PUBLIC_HOST": ip,  # what welcome's URLs name (not 127.0.0.1)
        "RALLYPOINT_TURN_RELAY_HOST": ip,
        "RALLYPOINT_TURN_ALLOW_PEERS": f"{ip}/32",
        "RALLYPOINT_TURN_RELAY_PORT_MIN": "40000",
        "RALLYPOINT_TURN_RELAY_PORT_MAX": "44999",
        "RALLYPOINT_TURN_MAX_BPS_PER_ALLOCATION": "1000000",
        "RALLYPOINT_ICE_RELAY_ONLY": "true",
    }
    if "sfu" in SECTIONS:
        env["RALLYPOINT_SFU_ENABLED"] = "false"
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "signaling", "serve", "--port", str(port)]
    command += ["--data-dir", str(tmp_path / "data")]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(log.read_text()) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
        else:
            raise RuntimeError("server did not start: " + log.read_text())
        yield f"ws://127.0.0.1:{port}/ws", turn_port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "TURN server on" in log.read_text()


async def welcome_of(url: str) -> dict[str, Any]:
    client = Client(url)
    try:
        return await client.connect(name="Ann", identity="ann")
    finally:
        await client.close()


def turn_udp_server(ice_servers: list[dict[str, Any]]) -> tuple[tuple[str, int], str, str]:
    """The embedded server's UDP address and credentials from `welcome.ice_servers`."""
    (entry,) = ice_servers
    udp = [u for u in entry["urls"] if u.startswith("turn:") and u.endswith("transport=udp")]
    parsed = urlparse(udp[0].replace("turn:", "turn://", 1))
    assert parsed.hostname is not None and parsed.port is not None
    return (parsed.hostname, parsed.port), entry["username"], entry["credential"]


async def test_welcome_credentials_relay_through_the_embedded_server(
    embedded: tuple[str, int], udp_client: Any
) -> None:
    url, turn_port = embedded
    welcome = await welcome_of(url)
    assert welcome["ice_transport_policy"] == "relay"
    ip = machine_ip()
    address, username, credential = turn_udp_server(welcome["ice_servers"])
    assert address == (ip, turn_port)
    assert username.endswith(":ann")
    urls = welcome["ice_servers"][0]["urls"]
    assert f"stun:{ip}:{turn_port}" in urls and f"turn:{ip}:{turn_port}?transport=tcp" in urls

    # Those exact credentials get a relayed address, and data flows both ways.
    transport, receiver = await create_turn_endpoint(
        Receiver, address, username, credential, transport="udp"
    )
    relayed = transport.get_extra_info("sockname")
    assert relayed[0] == ip and 40000 <= relayed[1] <= 44999
    peer: UdpClient = await udp_client(ip)
    assert peer.transport is not None
    peer_addr = peer.transport.get_extra_info("sockname")
    for i in range(3):
        transport.sendto(b"ping %d" % i, peer_addr)
        assert await asyncio.wait_for(peer.queue.get(), 5) == (b"ping %d" % i, relayed)
        peer.send(b"pong %d" % i, relayed)
        assert await asyncio.wait_for(receiver.queue.get(), 5) == (b"pong %d" % i, peer_addr)
    await close(transport, receiver)

    # A tampered credential (or a username with another expiry) is refused with 401.
    tampered = ("A" if credential[0] != "A" else "B") + credential[1:]
    forged_user = str(int(username.partition(":")[0]) + 3600) + ":ann"
    for user, password in ((username, tampered), (forged_user, credential)):
        with pytest.raises(stun.TransactionFailed) as info:
            await create_turn_endpoint(Receiver, address, user, password, transport="udp")
        assert info.value.response.error_code == 401


async def test_the_embedded_turn_servers_counters_are_in_metrics(
    embedded: tuple[str, int],
) -> None:
    url, _ = embedded
    welcome = await welcome_of(url)
    address, username, credential = turn_udp_server(welcome["ice_servers"])
    transport, receiver = await create_turn_endpoint(
        Receiver, address, username, credential, transport="udp"
    )
    metrics_url = url.replace("ws://", "http://").replace("/ws", "/metrics")
    async with aiohttp.ClientSession() as http:
        async with http.get(metrics_url) as r:
            text = await r.text()
    samples = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert float(samples["rallypoint_turn_allocations"]) == 1
    assert float(samples["rallypoint_turn_allocations_created_total"]) == 1
    assert "rallypoint_turn_quota_rejections_total" in samples
    assert "# TYPE rallypoint_turn_allocations gauge" in text
    await close(transport, receiver)
