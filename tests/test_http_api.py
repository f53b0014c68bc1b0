"""The HTTP API for app backends, against the real server: credentials, every route, bad input,
and the OpenAPI document (validated, and matching the routes the server has)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer
from call_helpers import Phone
from openapi_spec_validator import validate
from stores import BACKENDS

from signaling.app import CALLS
from signaling.core.tokens import create_token


@pytest.fixture(params=BACKENDS)
def server_store(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both chat store back ends."""
    return str(request.param)


Start = Callable[..., Awaitable[TestServer]]
KEY, SECRET = "test-key", "a-test-secret-of-at-least-32-bytes"
SPEC = json.loads((Path(__file__).resolve().parent.parent / "docs" / "openapi.json").read_text())
BASIC = {"Authorization": "Basic " + base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()}
SAMPLE_PARAMS = {
    "{room}": "lobby",
    "{conversation}": quote("dm:a|b", safe=""),
    "{identity}": "a",
    "{group}": "group:abc",
    "{other}": "b",
    "{recording}": "rec_0123456789abcdef",
    "{file}": "manifest.json",
}


def api_jwt(**claims: Any) -> dict[str, str]:
    payload = {"iss": KEY, "exp": int(time.time()) + 60, "api": True, **claims}
    return {"Authorization": "Bearer " + jwt.encode(payload, SECRET, algorithm="HS256")}


def routes() -> list[tuple[str, str]]:
    out = []
    for path, ops in SPEC["paths"].items():
        for method in ops:
            concrete = path
            for k, v in SAMPLE_PARAMS.items():
                concrete = concrete.replace(k, v)
            out.append((method.upper(), concrete))
    return out


class Api:
    def __init__(self, http: aiohttp.ClientSession, server: TestServer) -> None:
        self.http = http
        self.base = f"http://127.0.0.1:{server.port}"

    async def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        kw: dict[str, Any] = {"headers": BASIC if headers is None else headers}
        if raw is not None:
            kw["data"] = raw
        elif body is not None:
            kw["json"] = body
        async with self.http.request(method, self.base + path, **kw) as r:
            assert r.content_type == "application/json", (path, r.status)
            return r.status, await r.json()


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def api(start_server: Start, http: aiohttp.ClientSession) -> tuple[Api, TestServer]:
    server = await start_server(auth__api_key=KEY, auth__api_secret=SECRET)
    return Api(http, server), server


def test_openapi_document_is_valid() -> None:
    validate(SPEC)
    assert {c for c in SPEC["components"]["schemas"]["Error"]["properties"]["code"]["enum"]} >= {
        "unauthorized",
        "api_disabled",
        "bad_field",
    }


async def test_spec_matches_the_server_routes(api: tuple[Api, TestServer]) -> None:
    client, server = api
    served = {
        (r.method, r.resource.canonical)
        for r in server.app.router.routes()
        if r.resource is not None
        and r.resource.canonical.startswith("/api/")
        and r.method != "HEAD"
    }
    documented = {(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops}
    assert served == documented
    status, doc = await client("GET", "/api/openapi.json", headers={})
    assert status == 200 and doc == SPEC


async def test_open_mode_disables_the_api(server: TestServer, http: aiohttp.ClientSession) -> None:
    client = Api(http, server)
    for method, path in routes():
        if path == "/api/openapi.json":
            continue
        status, body = await client(method, path, {})
        assert (status, body["code"]) == (403, "api_disabled"), (method, path)


async def test_no_route_works_without_credentials(api: tuple[Api, TestServer]) -> None:
    client, _ = api
    participant = create_token(KEY, SECRET, "alice", rooms={"*": ["join"]})
    wrong_basic = "Basic " + base64.b64encode(f"{KEY}:not-the-secret".encode()).decode()
    forged = jwt.encode({"iss": KEY, "exp": int(time.time()) + 60, "api": True}, "x" * 32)
    cases = [
        ({}, "unauthorized"),
        ({"Authorization": wrong_basic}, "bad_credentials"),
        ({"Authorization": "Basic !!!"}, "bad_credentials"),
        ({"Authorization": f"Bearer {participant}"}, "bad_credentials"),  # not an API token
        ({"Authorization": f"Bearer {forged}"}, "bad_credentials"),
        (api_jwt(exp=int(time.time()) - 60), "bad_credentials"),
        (api_jwt(iss="other-key"), "bad_credentials"),
    ]
    for method, path in routes():
        if path == "/api/openapi.json":
            continue
        for headers, code in cases:
            status, body = await client(method, path, {}, headers=headers)
            assert (status, body["code"]) == (401, code), (method, path, headers)
    status, body = await client("GET", "/api/rooms", headers=api_jwt())
    assert status == 200 and body == {"rooms": []}


async def test_tokens_make_identities_callable(api: tuple[Api, TestServer], phones: Phone) -> None:
    client, server = api
    status, body = await client(
        "POST", "/api/tokens", {"identity": "bob", "name": "Bob", "rooms": {"lobby": ["join"]}}
    )
    assert status == 201 and body["identity"] == "bob" and body["expires_at"] > time.time()
    bob = await phones(server, "bob", token=body["token"])
    assert bob.welcome["identity"] == "bob" and bob.welcome["name"] == "Bob"
    await bob.close()
    # Carol has a token from the API but never connected: she is known, so a call rings her
    # (a push wakes her phone). Dave is unknown: his call looks the same to alice, but
    # nothing of his rings and nothing is pushed (test_privacy.py).
    status, body = await client("POST", "/api/tokens", {"identity": "carol", "ttl_s": 60})
    assert status == 201
    alice_token = create_token(KEY, SECRET, "alice", rooms={})
    alice = await phones(server, "alice", token=alice_token)
    book = server.app[CALLS].book
    for callee, unseen in (("carol", False), ("dave", True)):
        call = await alice.call(callee)
        assert call.parties == {"alice": "joined", callee: "invited"}
        assert book.calls[call.id].callees[callee].unseen is unseen
        await call.cancel()
        await call.wait_ended()


BAD_TOKEN_REQUESTS: list[tuple[Any, str]] = [
    (b"{not json", "bad_json"),
    (b"[1]", "bad_json"),
    ({}, "bad_field"),
    ({"identity": "has space"}, "bad_field"),
    ({"identity": "a", "extra": 1}, "bad_field"),
    ({"identity": "a", "ttl_s": 0}, "bad_field"),
    ({"identity": "a", "ttl_s": "60"}, "bad_field"),
    ({"identity": "a", "rooms": {"r": ["fly"]}}, "bad_field"),
    ({"identity": "a", "rooms": {"bad room": ["join"]}}, "bad_field"),
    ({"identity": "a", "rooms": {"r": "join"}}, "bad_field"),
    ({"identity": "a", "name": ""}, "bad_field"),
    ({"identity": "a", "name": "   "}, "bad_field"),
]


@pytest.mark.parametrize(("body", "code"), BAD_TOKEN_REQUESTS)
async def test_bad_token_requests(api: tuple[Api, TestServer], body: Any, code: str) -> None:
    client, _ = api
    raw = body if isinstance(body, bytes) else None
    status, reply = await client("POST", "/api/tokens", None if raw else body, raw=raw)
    assert (status, reply["code"]) == (400, code) and reply["message"]


def _request_schema(path: str, method: str = "post") -> Any:
    from jsonschema import Draft202012Validator

    schema = SPEC["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": SPEC["components"]})


@pytest.mark.parametrize(
    ("path", "body"),
    [
        *(("/api/tokens", b) for b, _ in BAD_TOKEN_REQUESTS if isinstance(b, dict)),
        ("/api/rooms/{room}/kick", {"participant": "a b"}),
        ("/api/rooms/{room}/kick", {"identity": "no way"}),
        ("/api/conversations/{conversation}/messages", {"text": "x", "cid": "a b"}),
    ],
)
async def test_request_schemas_refuse_what_the_server_refuses(
    api: tuple[Api, TestServer], phones: Phone, path: str, body: dict[str, Any]
) -> None:
    """docs/openapi.json's request bodies describe what the server takes: a body the server
    refuses with 400 is invalid for its schema too (a room name, a `cid` and kick's ids had no
    pattern, and a blank token `name` passed)."""
    client, server = api
    url = path.replace("{room}", "lobby").replace("{conversation}", quote("room:lobby", safe=""))
    if "kick" in path:  # someone in the room, so that the body is what is refused
        token = create_token(KEY, SECRET, "alice", rooms={"lobby": ["join"]})
        await (await phones(server, "alice", token=token)).join("lobby")
    status, reply = await client("POST", url, body)
    assert (status, reply["code"]) == (400, "bad_field"), reply
    assert not _request_schema(path).is_valid(body)


async def test_rooms_participants_and_kick(api: tuple[Api, TestServer], phones: Phone) -> None:
    client, server = api
    grants = {"lobby": ["join", "chat"]}
    alice = await phones(server, "alice", token=create_token(KEY, SECRET, "alice", rooms=grants))
    bob = await phones(server, "bob", token=create_token(KEY, SECRET, "bob", rooms=grants))
    await alice.join("lobby")
    await bob.join("lobby")
    status, body = await client("GET", "/api/rooms")
    assert status == 200 and body == {
        "rooms": [{"name": "lobby", "participants": 2, "locked": False}]
    }
    status, body = await client("GET", "/api/rooms/lobby/participants")
    assert sorted(p["identity"] for p in body["participants"]) == ["alice", "bob"]
    status, body = await client("GET", "/api/rooms/nowhere/participants")
    assert (status, body["code"]) == (404, "no_such_room")
    status, body = await client("POST", "/api/rooms/lobby/kick", {"identity": "nobody"})
    assert (status, body["code"]) == (404, "no_such_participant")
    status, body = await client(
        "POST", "/api/rooms/lobby/kick", {"identity": "a", "participant": "b"}
    )
    assert (status, body["code"]) == (400, "bad_field")
    status, body = await client("POST", "/api/rooms/lobby/kick", {"identity": "bob"})
    assert status == 200 and body["kicked"] == [bob.session]
    kicked = await bob.next_event("kicked")
    assert kicked["room"] == "lobby" and kicked["by"] == "api"
    left = await alice.next_event("participant_left")
    assert left["identity"] == "bob" and left["reason"] == "kicked"


async def test_history_and_system_messages(api: tuple[Api, TestServer], phones: Phone) -> None:
    client, server = api
    alice = await phones(server, "alice", token=create_token(KEY, SECRET, "alice", rooms={}))
    bob = await phones(server, "bob", token=create_token(KEY, SECRET, "bob", rooms={}))
    for i in range(3):
        await alice.send("dm:alice|bob", f"m{i}")
    conv = quote("dm:alice|bob", safe="")
    status, page = await client("GET", f"/api/conversations/{conv}/messages?after=1&limit=1")
    assert status == 200 and [m["text"] for m in page["messages"]] == ["m1"]
    assert page["more"] is True and page["last_seq"] == 3
    status, body = await client(
        "POST", f"/api/conversations/{conv}/messages", {"text": "Welcome!", "cid": "w1"}
    )
    assert status == 201 and body["seq"] == 4 and body["duplicate"] is False
    for p in (alice, bob):
        m = await p.next_message("dm:alice|bob", where=lambda m: m["kind"] == "system")
        assert m["text"] == "Welcome!" and m["from"] == "system:api" and m["name"] == "System"
    status, body = await client(
        "POST", f"/api/conversations/{conv}/messages", {"text": "Welcome!", "cid": "w1"}
    )
    assert status == 200 and body["duplicate"] is True and body["seq"] == 4
    bad = [
        ("GET", f"/api/conversations/{quote('dm:bob|alice', safe='')}/messages", None),
        ("GET", "/api/conversations/nope/messages", None),
        ("GET", f"/api/conversations/{conv}/messages?before=2&after=1", None),
        ("GET", f"/api/conversations/{conv}/messages?limit=0", None),
        ("GET", f"/api/conversations/{conv}/messages?limit=x", None),
        ("POST", f"/api/conversations/{conv}/messages", {"text": ""}),
        ("POST", f"/api/conversations/{conv}/messages", {"text": "x", "cid": "has space"}),
        ("POST", f"/api/conversations/{conv}/messages", {"text": "x", "from": "alice"}),
    ]
    for method, path, body in bad:
        status, reply = await client(method, path, body)
        assert (status, reply["code"]) == (400, "bad_field"), (method, path, body)
    status, page = await client("GET", f"/api/conversations/{conv}/messages")
    assert page["last_seq"] == 4  # nothing refused was stored


async def test_devices_and_last_seen(api: tuple[Api, TestServer], phones: Phone) -> None:
    client, server = api

    async def devices_once(ready: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The device list as soon as ``ready(devices by name)`` holds for it (the store's writer
        thread records a device just after its session starts or ends, so the identity may be
        unknown for a moment); fails after 5 s."""
        body: Any = None
        try:
            async with asyncio.timeout(5):
                while True:
                    status, body = await client("GET", "/api/identities/alice/devices")
                    # 404 until the writer has recorded alice's first device.
                    assert status == 200 or (status, body["code"]) == (404, "no_such_identity")
                    if status == 200 and ready({d["device"]: d for d in body["devices"]}):
                        return list(body["devices"])
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"the device list never got there: {body}") from None

    token = create_token(KEY, SECRET, "alice", rooms={})
    before = int(time.time() * 1000)
    phone = await phones(server, "alice", token=token, device="phone")
    tablet = await phones(server, "alice", token=token, device="tablet")
    listed = await devices_once(lambda d: set(d) == {"phone", "tablet"})
    first_seen = next(d["first_seen"] for d in listed if d["device"] == "tablet")
    # A session that ends on a later millisecond than it started (timestamps are in ms).
    async with asyncio.timeout(1):
        while int(time.time() * 1000) <= first_seen:
            await asyncio.sleep(0.001)
    await tablet.close()
    listed = await devices_once(lambda d: d["tablet"]["last_seen"] != first_seen)
    devices = {d["device"]: d for d in listed}
    assert set(devices) == {"phone", "tablet"}
    assert devices["phone"]["online"] is True and devices["tablet"]["online"] is False
    assert devices["tablet"]["last_seen"] > devices["tablet"]["first_seen"] == first_seen >= before
    assert listed[0]["device"] == "tablet"  # seen last (its session just ended)
    status, body = await client("GET", "/api/identities/nobody/devices")
    assert (status, body["code"]) == (404, "no_such_identity")
    await phone.close()


async def test_unknown_routes_and_methods_answer_json(api: tuple[Api, TestServer]) -> None:
    client, _ = api
    status, body = await client("GET", "/api/nothing-here")
    assert (status, body["code"]) == (404, "not_found")
    status, body = await client("DELETE", "/api/rooms")
    assert (status, body["code"]) == (405, "method_not_allowed")
    status, body = await client("POST", "/api/tokens", raw=b"x" * 70_000)
    assert (status, body["code"]) == (413, "payload_too_large")
