"""Allocation quotas and connection limits against a running server, real sockets on loopback."""

from __future__ import annotations

from typing import Any

from aioice import stun
from turn_helpers import SECRET, ServerFactory, allocate

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
