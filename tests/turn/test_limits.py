"""Allocation quotas and connection limits against a running server, real sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from nethelpers import machine_ip
from turn_helpers import SECRET, ServerFactory, allocate, self_signed

from signaling.app import turn_settings
from signaling.config import ConfigError, load_config
from turn.cli import build_parser, settings_from_args
from turn.credentials import rest_credentials

UCLIENT = shutil.which("turnutils_uclient")
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait (bounded) until the server's state satisfies ``condition``."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Return once the server has closed the connection (EOF, or a reset after abort)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass


async def binding(stream: Stream) -> stun.Message:
    """A STUN Binding request over a stream and its answer."""
    reader, writer = stream
    request = stun.Message(stun.Method.BINDING, stun.Class.REQUEST)
    writer.write(bytes(request))
    header = await reader.readexactly(20)
    response = stun.parse_message(header + await reader.readexactly(int.from_bytes(header[2:4])))
    assert response.transaction_id == request.transaction_id
    return response


OpenStream = Callable[..., Coroutine[Any, Any, Stream]]


@pytest.fixture
async def open_stream() -> AsyncIterator[OpenStream]:
    """``asyncio.open_connection``, with every connection closed at the end (failures too)."""
    streams: list[Stream] = []

    async def factory(host: str, port: int, **kwargs: Any) -> Stream:
        stream = await asyncio.open_connection(host, port, **kwargs)
        streams.append(stream)
        return stream

    yield factory
    for _, writer in streams:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def succeeded(response: stun.Message) -> bool:
    return response.message_class == stun.Class.RESPONSE


def error_code(response: stun.Message) -> int:
    assert response.message_class == stun.Class.ERROR, response
    code: int = response.attributes["ERROR-CODE"][0]
    return code


async def test_user_quota_spans_the_users_usernames(
    make_server: ServerFactory, udp_client: Any
) -> None:
    # Each welcome mints "<expiry>:<user>" with a new expiry; reconnecting must not reset
    # the user's quota.
    server = await make_server(max_allocations_per_user=3)
    target = ("127.0.0.1", server.udp_address[1])
    for ttl in (600, 601, 602):
        username, password = rest_credentials(SECRET, "alice", ttl)
        assert succeeded(await allocate(await udp_client(), target, username, password))
    username, password = rest_credentials(SECRET, "alice", 603)
    assert error_code(await allocate(await udp_client(), target, username, password)) == 486
    username, password = rest_credentials(SECRET, "bob", 600)
    assert succeeded(await allocate(await udp_client(), target, username, password))
    stats = server.stats
    assert stats["allocations"] == 4
    assert stats["quota_rejections"] == 1


async def test_allocations_per_address_stop_at_the_limit(
    make_server: ServerFactory, udp_client: Any
) -> None:
    # 1,100 users behind one address once took every relay; now one address gets at most
    # max_allocations_per_address, and other addresses are still served.
    server = await make_server(max_allocations_per_address=3, max_allocations_per_user=10)
    target = ("127.0.0.1", server.udp_address[1])
    for i in range(3):
        username, password = rest_credentials(SECRET, f"user{i}", 600)
        assert succeeded(await allocate(await udp_client("127.0.0.1"), target, username, password))
    username, password = rest_credentials(SECRET, "user3", 600)
    assert (
        error_code(await allocate(await udp_client("127.0.0.1"), target, username, password)) == 486
    )
    assert succeeded(await allocate(await udp_client("127.0.0.2"), target, username, password))
    stats = server.stats
    assert stats["allocations"] == 4
    assert stats["address_quota_rejections"] == 1
    assert stats["quota_rejections"] == 0


def test_turn_section_reaches_the_turn_settings(tmp_path: Path) -> None:
    overrides: dict[str, Any] = {
        "server.data_dir": str(tmp_path),
        "turn.max_allocations_per_address": 7,
    }
    settings = turn_settings(load_config(None, env={}, overrides=overrides), "secret")
    assert settings.max_allocations_per_address == 7
    overrides["turn.max_allocations_per_address"] = 0
    with pytest.raises(ConfigError, match="max_allocations_per_address"):
        turn_settings(load_config(None, env={}, overrides=overrides), "secret")


def test_cli_flags_reach_the_settings() -> None:
    args = build_parser().parse_args(["--secret", "s", "--max-allocations-per-address", "7"])
    assert settings_from_args(args).max_allocations_per_address == 7


async def test_idle_tcp_flood_from_one_address_leaves_room_for_others(
    make_server: ServerFactory, open_stream: OpenStream
) -> None:
    # 1,000 idle sockets from one host used to fill max_tcp_connections and lock every new
    # TCP client out until the idle sweep. The deadline is long here: it is the
    # per-address cap alone that keeps room for others.
    assert UCLIENT is not None, "turnutils_uclient missing: apt-get install coturn"
    server = await make_server(
        max_tcp_connections=8, max_tcp_connections_per_address=4, tcp_first_request_timeout_s=30
    )
    port = server.udp_address[1]
    for _ in range(8):
        await open_stream("127.0.0.1", port)  # and stays silent

    def taken_in_or_refused() -> int:
        stats = server.stats
        return sum(
            stats.get(k, 0) for k in ("tcp_connections", "tcp_refused", "tcp_refused_per_address")
        )

    await until(lambda: taken_in_or_refused() == 8)
    # coturn's client, over TCP from another loopback address, allocates and relays.
    process = await asyncio.create_subprocess_exec(
        UCLIENT,
        *("-W", SECRET, "-p", str(port), "-t", "-y", "-c", "-m", "1", "-n", "5", "-z", "5"),
        *("-L", "127.0.0.2", "127.0.0.1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(60):
            stdout, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = stdout.decode(errors="replace")
    totals = re.findall(r"tot_send_msgs=(\d+), tot_recv_msgs=(\d+)", output)
    assert totals and totals[-1] == ("10", "10"), output
    stats = server.stats
    assert stats["tcp_refused_per_address"] == 4
    assert stats["tcp_refused"] == 0
    assert stats["tcp_first_request_timeouts"] == 0  # the idle ones were still held
    assert stats["allocations_created"] >= 2


async def test_tcp_connection_without_a_first_request_is_closed_by_the_deadline(
    make_server: ServerFactory, open_stream: OpenStream
) -> None:
    deadline = 0.5
    server = await make_server(tcp_first_request_timeout_s=deadline)
    assert server.settings.tcp_idle_timeout_s >= 60  # not what closes them here
    port = server.udp_address[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    idle = [await open_stream("127.0.0.1", port) for _ in range(3)]
    talking = await open_stream("127.0.0.1", port)
    assert (await binding(talking)).attributes["XOR-MAPPED-ADDRESS"][0] == "127.0.0.1"
    async with asyncio.timeout(deadline + 2):
        for reader, _ in idle:
            await closed_by_server(reader)
    assert loop.time() - started < deadline + 2
    stats = server.stats
    assert stats["tcp_first_request_timeouts"] == 3
    # The connection that sent a request is past the deadline and still served.
    assert (await binding(talking)).message_class == stun.Class.RESPONSE
    assert server.stats["tcp_connections"] == 1


async def test_tls_handshake_and_first_request_are_bounded_by_the_deadline(
    make_server: ServerFactory, open_stream: OpenStream, tmp_path: Path
) -> None:
    ip = machine_ip()
    cert, key = self_signed(tmp_path, ip)
    deadline = 0.5
    server = await make_server(
        tls_cert=str(cert), tls_key=str(key), tls_port=0, tcp_first_request_timeout_s=deadline
    )
    assert server.tls_address is not None
    port = server.tls_address[1]
    # No handshake at all: asyncio alone would wait 60 s for it.
    silent = await open_stream(ip, port)
    # A handshake, then nothing.
    context = ssl.create_default_context(cafile=str(cert))
    quiet = await open_stream(ip, port, ssl=context)
    async with asyncio.timeout(deadline * 2 + 2):
        await closed_by_server(silent[0])
        await closed_by_server(quiet[0])
    assert server.stats["tcp_first_request_timeouts"] == 1


def test_turn_section_reaches_the_tcp_settings(tmp_path: Path) -> None:
    overrides: dict[str, Any] = {
        "server.data_dir": str(tmp_path),
        "turn.max_tcp_connections_per_address": 9,
        "turn.tcp_first_request_timeout_s": 1.5,
    }
    settings = turn_settings(load_config(None, env={}, overrides=overrides), "secret")
    assert settings.max_tcp_connections_per_address == 9
    assert settings.tcp_first_request_timeout_s == 1.5
    overrides["turn.tcp_first_request_timeout_s"] = 0
    with pytest.raises(ConfigError, match="tcp_first_request_timeout_s"):
        turn_settings(load_config(None, env={}, overrides=overrides), "secret")
    args = build_parser().parse_args(
        [
            "--secret",
            "s",
            "--max-tcp-connections-per-address",
            "9",
            "--tcp-first-request-timeout",
            "2",
        ]
    )
    settings = settings_from_args(args)
    assert settings.max_tcp_connections_per_address == 9
    assert settings.tcp_first_request_timeout_s == 2.0
