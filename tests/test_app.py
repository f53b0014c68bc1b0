"""The composition root: features merge into one protocol, the handled client messages are
exactly the documented ones, every error code the server can send is documented, and /metrics
keeps its names with HELP and TYPE lines."""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from nethelpers import free_port
from prometheus_client.parser import text_string_to_metric_families

from signaling.app import ENDPOINT, MESSAGES, handlers_of, make_app, protocol
from signaling.config import load_config
from signaling.core.feature import Feature
from signaling.core.messages import MESSAGES as CORE
from signaling.sdk.wsclient import Client
from signaling.wire.protocol import Protocol

ROOT = Path(__file__).resolve().parent.parent


def _app_features(tmp_path: Path) -> list[Feature]:
    cfg = load_config(None, env={}, overrides={"server.data_dir": str(tmp_path)})
    handlers = make_app(cfg)[ENDPOINT].handlers
    proto = protocol()
    by_part = []
    for part in MESSAGES:
        types = {s.type for s in part.client}
        by_part.append(Feature("x", part, {t: h for t, h in handlers.items() if t in types}))
    assert set(proto.client) == set(handlers)
    return by_part


def test_start_up_refuses_a_documented_message_without_handler(tmp_path: Path) -> None:
    features = _app_features(tmp_path)
    handlers_of(protocol(), features)  # the real composition passes
    core = features[0]
    missing = dataclasses.replace(
        core, handlers={k: v for k, v in core.handlers.items() if k != "ping"}
    )
    with pytest.raises(RuntimeError, match="without a handler: \\['ping'\\]"):
        handlers_of(protocol(), [missing, *features[1:]])
    extra = dataclasses.replace(core, handlers={**core.handlers, "teleport": core.handlers["ping"]})
    with pytest.raises(RuntimeError, match="undocumented messages: \\['teleport'\\]"):
        handlers_of(protocol(), [extra, *features[1:]])


def test_two_features_cannot_define_the_same_message() -> None:
    with pytest.raises(ValueError, match="client message 'hello'"):
        Protocol([CORE, CORE])


_RAISERS = {"ProtocolError", "MediaError", "SfuError"}


def _raised_codes() -> dict[str, list[str]]:
    """Every literal error code passed to ProtocolError, MediaError or SfuError in the server
    (signaling/ and sfu/), with where."""
    found: dict[str, list[str]] = {}
    for path in [*(ROOT / "signaling").rglob("*.py"), *(ROOT / "sfu").rglob("*.py")]:
        if "sdk" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            first = node.args[0]
            if (
                name in _RAISERS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                found.setdefault(first.value, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_error_code_the_server_raises_is_documented() -> None:
    raised = _raised_codes()
    assert len(raised) > 30  # the scan sees the server's errors
    undocumented = {code: where for code, where in raised.items() if code not in protocol().errors}
    assert not undocumented


# The names /metrics had before it went through prometheus_client (a single node, SFU off).
KEPT_NAMES = {
    "rallypoint_connections",
    "rallypoint_sessions",
    "rallypoint_rooms",
    "rallypoint_gc_max_pause_seconds",
    "rallypoint_gc_pauses_over_50ms_total",
    "rallypoint_gc_collections_total",
    "rallypoint_gc_reclaimed_objects_total",
    "rallypoint_messages_stored_total",
    "rallypoint_errors_sent_total",
    "rallypoint_rate_limited_total",
    "rallypoint_slow_consumers_total",
    "rallypoint_heartbeat_timeouts_total",
    "rallypoint_resumes_total",
    "rallypoint_internal_errors_total",
    "rallypoint_calls_started_total",
    "rallypoint_call_logs_stored_total",
    "rallypoint_push_sent_total",
    "rallypoint_push_failed_total",
    "rallypoint_push_dropped_total",
    "rallypoint_push_retries_total",
    "rallypoint_push_duplicates_total",
    "rallypoint_store_commits_total",
    "rallypoint_store_writes_total",
    "rallypoint_store_writer_restarts_total",
}


async def test_metrics_keep_their_names_with_help_and_type(
    server: TestServer, clients: Callable[..., Awaitable[Client]]
) -> None:
    c = await clients(server, name="A", identity="a")
    await c.request({"type": "join", "room": "m"})
    await c.send_chat("room:m", "one")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge"), family.name
        for s in family.samples:
            samples[s.name] = s.value
    assert KEPT_NAMES <= set(samples), KEPT_NAMES - set(samples)
    assert samples["rallypoint_connections"] == 1
    assert samples["rallypoint_messages_stored_total"] == 1
    lines = text.splitlines()
    for name in ("rallypoint_messages_stored", "rallypoint_connections"):
        assert any(line.startswith(f"# HELP {name}") for line in lines), name
        assert any(line.startswith(f"# TYPE {name}") for line in lines), name


KEY, SECRET = "metrics-key", "a-metrics-secret-of-at-least-32-bytes"


async def test_metrics_need_the_api_credentials_in_token_mode(
    start_server: Callable[..., Awaitable[TestServer]],
) -> None:
    """/metrics was public in token mode (counters, rooms, sessions for anyone to read)."""
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)
    url = f"http://127.0.0.1:{server.port}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 401 and (await r.json())["code"] == "unauthorized"
        wrong = {"Authorization": aiohttp.encode_basic_auth(KEY, "wrong")}
        async with http.get(url, headers=wrong) as r:
            assert r.status == 401 and (await r.json())["code"] == "bad_credentials"
        right = {"Authorization": aiohttp.encode_basic_auth(KEY, SECRET)}
        async with http.get(url, headers=right) as r:
            assert r.status == 200 and "rallypoint_connections" in await r.text()


async def test_metrics_on_a_listener_of_their_own(
    start_server: Callable[..., Awaitable[TestServer]],
) -> None:
    port = free_port()
    server = await start_server(
        auth__api_key=KEY, auth__api_secret=SECRET, server__metrics_listen=f"127.0.0.1:{port}"
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            assert r.status == 404  # not on the main listener at all
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and "rallypoint_connections" in await r.text()
