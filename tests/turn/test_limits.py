"""Allocation quotas and connection limits against a running server, real sockets on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from turn_helpers import SECRET, ServerFactory, allocate

from signaling.app import turn_settings
from signaling.config import ConfigError, load_config
from turn.cli import build_parser, settings_from_args
from turn.credentials import rest_credentials


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
