"""The HTTP API for app backends: tokens, rooms, kicks, conversation history, system messages,
devices, contacts and blocks, recordings.

Every route under ``/api/`` needs the API credentials, either

- ``Authorization: Basic base64(api_key:api_secret)``, or
- ``Authorization: Bearer <JWT>``: HS256 signed with the API secret, ``iss`` = the API key,
  ``exp`` set, and the claim ``"api": true`` (participant tokens never carry it, so a token handed
  to a client cannot call the API).

A request with no ``Authorization`` header, or with a scheme other than these two, gets 401
``unauthorized``; credentials that are given but wrong (malformed, wrong key or secret, a bearer
token that is not valid or lacks the claim) get 401 ``bad_credentials``. In open mode (no API
secret) the API is disabled: every route answers 403 ``api_disabled``, except the OpenAPI
document itself. Errors are JSON ``{"code": ..., "message": ...}`` with the stable codes in
``API_ERRORS``; a write while the chat store's disk is full gets 503 ``store_full`` with
``Retry-After`` (nothing was stored; retry, with the same ``cid`` for a message). The OpenAPI
document (``openapi.json`` beside this module, package data; linked from ``docs/openapi.json``)
is served without credentials, in every mode, at ``/api/openapi.json``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import jwt
import orjson
from aiohttp import web

from ..chat.groups import API_ACTOR, ROLES, GroupState, group_id
from ..chat.handlers import Chat
from ..chat.store import ChatStore, NewMessage
from ..core.directory import DeviceDirectory
from ..core.hub import Hub
from ..core.rooms import Participant
from ..core.tokens import create_token
from ..groupcall.router import GroupCall
from ..recording.library import RecordingError, RecordingLibrary
from ..recording.service import BY_API, Recordings
from ..relations.service import Relations
from ..wire.errors import ProtocolError
from ..wire.spec import (
    CONVERSATION_PATTERN,
    GROUP_PATTERN,
    IDENTITY_PATTERN,
    ROOM_PATTERN,
    TOKEN_PATTERN,
    compiled,
)

log = logging.getLogger("rallypoint.api")

OPENAPI: Final = resources.files(__package__) / "openapi.json"
SYSTEM_SENDER: Final = "system:api"  # not a valid identity, so nobody can pose as it
#: The longest `ttl_s` when auth.max_token_lifetime_s is 0 (no maximum).
MAX_TOKEN_TTL_S: Final = 365 * 86400
#: `kicked.by` when the app's backend removed a participant (never a participant id).
KICKED_BY_API: Final = "api"

#: Stable error codes of the HTTP API and their HTTP status.
API_ERRORS: Final[dict[str, int]] = {
    "unauthorized": 401,
    "bad_credentials": 401,
    "api_disabled": 403,
    "bad_json": 400,
    "bad_field": 400,
    "not_found": 404,
    "method_not_allowed": 405,
    "payload_too_large": 413,
    "no_such_room": 404,
    "no_such_participant": 404,
    "no_such_identity": 404,
    "no_such_group": 404,
    "forbidden": 403,
    "group_full": 409,
    "no_such_recording": 404,
    "no_such_file": 404,
    "recording_active": 409,
    "range_not_satisfiable": 416,
    "internal_error": 500,
    "store_full": 503,
    "store_unavailable": 503,
    "recording_unavailable": 503,
    "already_recording": 409,
    "not_recording": 409,
    "recording_storage_full": 507,
    "media_unavailable": 503,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Api:
    """What the API's routes use."""

    hub: Hub
    chat: Chat
    store: ChatStore
    devices: DeviceDirectory
    relations: Relations
    library: RecordingLibrary
    recordings: Recordings
    media: GroupCall


API: web.AppKey[Api] = web.AppKey("api", Api)


class ApiError(Exception):
    """An API refusal; becomes a JSON error response."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = API_ERRORS[code]


def error_response(e: ApiError) -> web.Response:
    """The JSON answer to a refused request."""
    headers = {"WWW-Authenticate": 'Basic realm="rallypoint"'} if e.status == 401 else None
    return _error(e.code, e.message, headers)


def _error(code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(
        {"code": code, "message": message}, status=API_ERRORS[code], headers=headers
    )


def authenticate(hub: Hub, request: web.Request) -> None:
    """Check the request's API credentials; raise ``ApiError`` (``api_disabled`` in open mode)."""
    auth = hub.cfg.auth
    if hub.cfg.open_mode:
        raise ApiError(
            "api_disabled",
            "the HTTP API is disabled in open mode; set auth.api_key and auth.api_secret",
        )
    header = request.headers.get("Authorization", "")
    scheme, _, cred = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            key, sep, secret = base64.b64decode(cred.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ApiError("bad_credentials", "malformed Basic credentials") from None
        ok_key = hmac.compare_digest(key.encode(), auth.api_key.encode())
        ok_secret = hmac.compare_digest(secret.encode(), auth.api_secret.encode())
        if not (sep and ok_key and ok_secret):
            raise ApiError("bad_credentials", "wrong API key or secret")
        return
    if scheme == "bearer":
        try:
            claims = jwt.decode(
                cred.strip(),
                auth.api_secret,
                algorithms=["HS256"],
                issuer=auth.api_key,
                leeway=5,
                options={"require": ["exp", "iss"]},
            )
        except jwt.PyJWTError as e:
            raise ApiError("bad_credentials", f"the bearer token is not valid ({e})") from None
        if claims.get("api") is not True:
            raise ApiError("bad_credentials", 'the bearer token lacks the claim "api": true')
        return
    raise ApiError("unauthorized", "send Authorization: Basic <key:secret> or Bearer <API JWT>")


@web.middleware
async def api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Credentials and JSON errors for everything under /api/ (but the OpenAPI document)."""
    path = request.path
    if not path.startswith("/api/") and path != "/api":
        return await handler(request)
    try:
        if path != "/api/openapi.json":
            authenticate(request.app[API].hub, request)
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPRequestEntityTooLarge:
        return _error("payload_too_large", "the request body is too large")
    except web.HTTPMethodNotAllowed:
        return _error("method_not_allowed", f"{request.method} is not allowed on {path}")
    except web.HTTPNotFound:
        return _error("not_found", f"no API route {path}")
    except web.HTTPException as e:  # pragma: no cover - other framework refusals
        return web.json_response(
            {"code": "bad_field", "message": e.reason}, status=e.status if e.status < 500 else 400
        )
    except RecordingError as e:
        return _error(e.code, e.message)
    except ProtocolError as e:
        if e.code not in ("store_full", "store_unavailable"):  # the store's other refusals
            return _failed(request)  # are failures here
        # Retryable: nothing was stored (or it will be stored once on a retry with the same
        # cid), and the store checks for space, or reconnects, this often.
        retry_s = -(-(e.retry_after_ms or 1000) // 1000)
        return _error(e.code, e.message, {"Retry-After": str(retry_s)})
    except Exception:
        return _failed(request)


def _failed(request: web.Request) -> web.Response:
    """A bug or a failure while handling ``request`` (call from an ``except`` block)."""
    request.app[API].hub.counters.internal_errors += 1
    log.exception("API handler failed")
    return _error("internal_error", "the server failed to handle this request")


# --- input --------------------------------------------------------------------------------------


async def _json_body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError("bad_json", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError("bad_json", "the body must be a JSON object")
    for key, value in body.items():
        kind = fields.get(key)
        if kind is None:
            raise ApiError("bad_field", f"unknown field `{str(key)[:40]}`")
        if type(value) is not kind:
            raise ApiError(
                "bad_field", f"`{key}` must be a{'n' if kind is int else ''} {_TYPE_NAMES[kind]}"
            )
    return body


_TYPE_NAMES: Final = {
    str: "string",
    int: "integer",
    bool: "boolean",
    dict: "object",
    list: "array",
}


def _match(pattern: str, value: str, what: str) -> str:
    if compiled(pattern).match(value) is None:
        raise ApiError("bad_field", f"`{what}` has a bad format")
    return value


def _int_param(request: web.Request, name: str, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        v = int(raw)
    except ValueError:
        raise ApiError("bad_field", f"`{name}` must be an integer") from None
    if not lo <= v <= hi:
        raise ApiError("bad_field", f"`{name}` must be between {lo} and {hi}")
    return v


def _conversation(value: str) -> tuple[str, tuple[str, ...]]:
    """A conversation id and, for a direct one, its two members."""
    _match(CONVERSATION_PATTERN, value, "conversation")
    kind, _, rest = value.partition(":")
    if kind == "dm":
        a, _, b = rest.partition("|")
        if a >= b:
            raise ApiError("bad_field", "direct conversations are dm:<a>|<b> with a < b")
        return value, (a, b)
    return value, ()


# --- routes -------------------------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


async def create_token_route(request: web.Request) -> web.Response:
    api = request.app[API]
    hub = api.hub
    body = await _json_body(
        request,
        {
            "identity": str,
            "name": str,
            "rooms": dict,
            "ttl_s": int,
            "dm": bool,
            "groups": bool,
            "contacts": bool,
        },
    )
    if "identity" not in body:
        raise ApiError("bad_field", "`identity` is required")
    identity = _match(IDENTITY_PATTERN, body["identity"], "identity")
    name = body.get("name")
    if name is not None and not 0 < len(name.strip()) <= 64:
        raise ApiError("bad_field", "`name` must have 1-64 characters")
    ttl = body.get("ttl_s", hub.cfg.auth.token_ttl_s)
    longest = hub.cfg.auth.max_token_lifetime_s or MAX_TOKEN_TTL_S
    if not 0 < ttl <= longest:
        raise ApiError("bad_field", f"`ttl_s` must be between 1 and {longest}")
    rooms: dict[str, Any] = body.get("rooms", {})
    for room, grants in rooms.items():
        if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
            raise ApiError("bad_field", f"`rooms.{room[:40]}` must be a list of grants")
    now = time.time()
    try:
        token = create_token(
            hub.cfg.auth.api_key,
            hub.cfg.auth.api_secret,
            identity,
            rooms=rooms,
            name=name.strip() if name else None,
            ttl_s=ttl,
            dm=body.get("dm", True),
            groups=body.get("groups", False),
            contacts=body.get("contacts", False),
            now=now,
        )
    except ValueError as e:
        raise ApiError("bad_field", str(e)) from None
    await api.devices.register_identity(identity, int(now * 1000))
    return web.json_response(
        {"token": token, "identity": identity, "expires_at": int(now) + ttl}, status=201
    )


async def list_rooms(request: web.Request) -> web.Response:
    hub = request.app[API].hub
    if hub.shared is not None:  # cluster mode: the rooms of every node
        found = await hub.shared.rooms()
        if found is None:  # retryable, with Retry-After, as the store's own outages
            raise ProtocolError(
                "store_unavailable", "the cluster's Redis cannot be reached", retry_after_ms=1000
            )
        rooms = [
            {"name": name, "participants": n, "locked": locked} for name, n, locked in sorted(found)
        ]
        return web.json_response({"rooms": rooms})
    rooms = [
        {"name": r.name, "participants": len(r.participants), "locked": r.locked}
        for r in sorted(hub.rooms.rooms.values(), key=lambda r: r.name)
    ]
    return web.json_response({"rooms": rooms})


async def _participants(request: web.Request) -> tuple[str, list[Participant]]:
    """The room of the request and its participants (of every node in cluster mode)."""
    hub = request.app[API].hub
    name = _match(ROOM_PATTERN, request.match_info["room"], "room")
    if hub.shared is not None:
        participants, _ = await hub.shared.room(name)
    else:
        room = hub.rooms.get(name)
        participants = [] if room is None else list(room.participants.values())
    if not participants:
        raise ApiError("no_such_room", f"no open room {name!r}")
    return name, participants


async def list_participants(request: web.Request) -> web.Response:
    name, participants = await _participants(request)
    return web.json_response({"room": name, "participants": [p.to_wire() for p in participants]})


async def kick(request: web.Request) -> web.Response:
    hub = request.app[API].hub
    name, participants = await _participants(request)
    body = await _json_body(request, {"participant": str, "identity": str})
    if len(body) != 1:
        raise ApiError("bad_field", "give exactly one of `participant` or `identity`")
    if "participant" in body:
        _match(TOKEN_PATTERN, body["participant"], "participant")
        targets = [p for p in participants if p.id == body["participant"]]
    else:
        _match(IDENTITY_PATTERN, body["identity"], "identity")
        targets = [p for p in participants if p.identity == body["identity"]]
    if not targets:
        raise ApiError("no_such_participant", "nobody in the room matches")
    kicked = []
    for p in targets:
        victim = hub.sessions.get(p.id)
        if victim is not None:
            if name in victim.rooms:
                hub.kick(victim, name, KICKED_BY_API)
        elif p.node:  # cluster mode: its node kicks it
            req = {"op": "kick", "room": name, "participant": p.id, "by": KICKED_BY_API}
            hub.bus.publish(f"node:{p.node}", orjson.dumps(req))
        else:  # pragma: no cover - participants are live sessions
            continue
        kicked.append(p.id)
    return web.json_response({"room": name, "kicked": kicked})


async def _recording_call(coro: Awaitable[Any]) -> Any:
    """Run a recording start or stop; its refusals become the API's."""
    try:
        return await coro
    except ProtocolError as e:
        if e.code in API_ERRORS:
            raise ApiError(e.code, e.message) from None
        if e.code == "sfu_unavailable":
            raise ApiError("recording_unavailable", e.message) from None
        raise


async def start_recording(request: web.Request) -> web.Response:
    recordings = request.app[API].recordings
    room = _match(ROOM_PATTERN, request.match_info["room"], "room")
    body = await _json_body(request, {"audio_only": bool, "identities": list})
    identities = body.get("identities")
    if identities is not None:
        if len(identities) > 256 or not all(isinstance(i, str) for i in identities):
            raise ApiError("bad_field", "`identities` is an array of at most 256 identities")
        for i in identities:
            _match(IDENTITY_PATTERN, i, "identities")
    a = await _recording_call(
        recordings.start(room, BY_API, body.get("audio_only", False), identities)
    )
    return web.json_response({"room": room, **a.to_wire()}, status=201)


async def get_room_recording(request: web.Request) -> web.Response:
    recordings = request.app[API].recordings
    room = _match(ROOM_PATTERN, request.match_info["room"], "room")
    r = recordings.recording_of(room)
    if r is None:
        raise ApiError("not_recording", f"room {room!r} is not being recorded")
    return web.json_response({"room": room, **r})


async def room_media(request: web.Request) -> web.Response:
    """What the SFU forwards in the room, per subscriber and track, and its simulcast layers'
    picture sizes (the room worker's ``room_stats``)."""
    media = request.app[API].media
    room = _match(ROOM_PATTERN, request.match_info["room"], "room")
    try:
        stats = await media.room_stats(room)
    except ProtocolError as e:
        if e.code == "not_in_room":
            raise ApiError("no_such_room", f"no media in room {room!r}") from None
        if e.code == "sfu_unavailable":
            raise ApiError("media_unavailable", e.message) from None
        raise
    return web.json_response({"room": room, **stats})


async def stop_recording(request: web.Request) -> web.Response:
    recordings = request.app[API].recordings
    room = _match(ROOM_PATTERN, request.match_info["room"], "room")
    a = await _recording_call(recordings.stop(room, BY_API))
    return web.json_response(
        {"room": room, **a.to_wire(), "active": False, "reason": "stopped", "stopped_by": BY_API}
    )


async def history(request: web.Request) -> web.Response:
    api = request.app[API]
    hub = api.hub
    conv, _ = _conversation(request.match_info["conversation"])
    before = _int_param(request, "before", 1, 2**53)
    after = _int_param(request, "after", 0, 2**53)
    limit = _int_param(request, "limit", 1, 200) or hub.cfg.chat.history_page_default
    if before is not None and after is not None:
        raise ApiError("bad_field", "give `before` or `after`, not both")
    viewer = request.query.get("viewer")
    if viewer is not None:
        _match(IDENTITY_PATTERN, viewer, "viewer")
    page = await api.store.page(conv, before=before, after=after, limit=limit, viewer=viewer)
    return web.json_response(
        {
            "conversation": conv,
            "messages": [m.to_wire() for m in page.messages],
            "more": page.more,
            "last_seq": page.last_seq,
        },
        dumps=lambda o: orjson.dumps(o).decode(),
    )


async def post_message(request: web.Request) -> web.Response:
    api = request.app[API]
    hub = api.hub
    conv, members = _conversation(request.match_info["conversation"])
    if conv[0] == "g" and conv not in api.chat.groups:
        raise ApiError("no_such_group", f"no group {conv!r}")
    body = await _json_body(request, {"text": str, "cid": str, "name": str})
    text = body.get("text")
    limit = hub.cfg.limits.max_text_chars
    if text is None or not 0 < len(text) <= limit:
        raise ApiError("bad_field", f"`text` is required and must have 1-{limit} characters")
    cid = _match(TOKEN_PATTERN, body.get("cid") or secrets.token_hex(8), "cid")
    name = body.get("name", "System").strip()
    if not 0 < len(name) <= 64:
        raise ApiError("bad_field", "`name` must have 1-64 characters")
    try:
        stored, dup = await api.chat.post(
            conv, members, NewMessage(conv, cid, SYSTEM_SENDER, name, "system", text, None, members)
        )
    except ProtocolError as e:
        if e.code != "bad_conversation":
            raise
        raise ApiError("no_such_group", e.message) from None
    ack = {k: v for k, v in stored.ack(dup).items() if k != "type"}
    return web.json_response(ack, status=200 if dup else 201)


async def devices(request: web.Request) -> web.Response:
    api = request.app[API]
    identity = _match(IDENTITY_PATTERN, request.match_info["identity"], "identity")
    known = await api.devices.known_identities([identity])
    if not known:
        raise ApiError("no_such_identity", f"{identity!r} has never connected")
    online = {s.device for s in api.hub.sessions_of(identity) if s.conn is not None}
    return web.json_response(
        {
            "identity": identity,
            "devices": [
                {
                    "device": d.device,
                    "name": d.name,
                    "first_seen": d.first_seen,
                    "last_seen": d.last_seen,
                    "online": d.device in online,
                }
                for d in await api.devices.devices_of(identity)
            ],
        }
    )


def _pair(request: web.Request) -> tuple[str, str]:
    identity = _match(IDENTITY_PATTERN, request.match_info["identity"], "identity")
    other = _match(IDENTITY_PATTERN, request.match_info["other"], "other")
    if identity == other:
        raise ApiError("bad_field", "an identity has no relation with itself")
    return identity, other


async def relations(request: web.Request) -> web.Response:
    api = request.app[API]
    identity = _match(IDENTITY_PATTERN, request.match_info["identity"], "identity")
    found = await api.relations.relations_of(identity)
    return web.json_response({"identity": identity, "relations": [r.to_wire() for r in found]})


def _relation_route(action: str) -> Handler:
    async def route(request: web.Request) -> web.Response:
        identity, other = _pair(request)
        relation = await request.app[API].relations.change(action, identity, other)
        return web.json_response({"identity": identity, "relation": relation.to_wire()})

    return route


# --- groups -------------------------------------------------------------------------------------

#: What a refused group change is on the API (``signaling.chat.groups.plan``'s codes).
_GROUP_REFUSALS: Final = {
    "bad_field": "bad_field",
    "forbidden": "forbidden",
    "group_full": "group_full",
    "bad_conversation": "no_such_group",
}


def _identities(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise ApiError("bad_field", f"`{key}` must be a list of identities")
    if len(value) > 1000:
        raise ApiError("bad_field", f"`{key}` has at most 1000 identities")
    for i in value:
        _match(IDENTITY_PATTERN, i, key)
    return value


def _cid(request: web.Request, body: dict[str, Any] | None = None) -> str:
    cid = (body or {}).get("cid") or request.query.get("cid") or secrets.token_hex(8)
    return _match(TOKEN_PATTERN, cid, "cid")


def _group_json(g: GroupState, status: int = 200, **extra: Any) -> web.Response:
    return web.json_response(
        {**g.to_wire(), **extra}, status=status, dumps=lambda o: orjson.dumps(o).decode()
    )


async def _change(
    request: web.Request,
    conv: str,
    action: str,
    cid: str,
    identities: list[str] | tuple[str, ...] = (),
    **kw: str | None,
) -> web.Response:
    api = request.app[API]
    try:
        result = await api.chat.change_group(
            conv, action, API_ACTOR, "System", cid, identities, **kw
        )
    except ProtocolError as e:
        code = _GROUP_REFUSALS.get(e.code)
        if code is None:
            raise
        raise ApiError(code, e.message) from None
    created = action == "created" and not result.duplicate
    return _group_json(
        result.state,
        201 if created else 200,
        seq=result.event.seq,
        duplicate=result.duplicate,
    )


def _group(request: web.Request) -> str:
    return _match(GROUP_PATTERN, request.match_info["group"], "group")


async def create_group(request: web.Request) -> web.Response:
    body = await _json_body(request, {"name": str, "owner": str, "members": list, "cid": str})
    if "owner" not in body or "name" not in body:
        raise ApiError("bad_field", "`name` and `owner` are required")
    owner = _match(IDENTITY_PATTERN, body["owner"], "owner")
    members = _identities(body, "members") if "members" in body else []
    cid = _cid(request, body)
    return await _change(
        request, group_id(API_ACTOR, cid), "created", cid, [owner, *members], name=body["name"]
    )


async def get_group(request: web.Request) -> web.Response:
    conv = _group(request)
    g = request.app[API].chat.groups.get(conv)
    if g is None:
        raise ApiError("no_such_group", f"no group {conv!r}")
    return _group_json(g)


async def rename_group(request: web.Request) -> web.Response:
    conv = _group(request)
    body = await _json_body(request, {"name": str, "cid": str})
    if "name" not in body:
        raise ApiError("bad_field", "`name` is required")
    return await _change(request, conv, "renamed", _cid(request, body), name=body["name"])


async def delete_group(request: web.Request) -> web.Response:
    return await _change(request, _group(request), "deleted", _cid(request))


async def add_members(request: web.Request) -> web.Response:
    conv = _group(request)
    body = await _json_body(request, {"identities": list, "cid": str})
    ids = _identities(body, "identities")
    return await _change(request, conv, "added", _cid(request, body), ids)


async def remove_member(request: web.Request) -> web.Response:
    conv = _group(request)
    identity = _match(IDENTITY_PATTERN, request.match_info["identity"], "identity")
    return await _change(request, conv, "removed", _cid(request), (identity,))


async def set_role(request: web.Request) -> web.Response:
    conv = _group(request)
    identity = _match(IDENTITY_PATTERN, request.match_info["identity"], "identity")
    body = await _json_body(request, {"role": str, "cid": str})
    if body.get("role") not in ROLES:
        raise ApiError("bad_field", "`role` is owner, admin or member")
    return await _change(request, conv, "role", _cid(request, body), (identity,), role=body["role"])


# --- recordings ---------------------------------------------------------------------------------


async def list_recordings(request: web.Request) -> web.Response:
    room = request.query.get("room")
    if room is not None:
        _match(ROOM_PATTERN, room, "room")
    limit = _int_param(request, "limit", 1, 200) or 50
    found, cursor = await request.app[API].library.list_page(
        room=room, limit=limit, cursor=request.query.get("cursor")
    )
    return web.json_response({"recordings": found, "next_cursor": cursor})


async def get_recording(request: web.Request) -> web.Response:
    manifest = await request.app[API].library.get(request.match_info["recording"])
    return web.json_response(manifest.raw, dumps=lambda o: orjson.dumps(o).decode())


class _RecordingFileResponse(web.FileResponse):
    """``FileResponse`` (ranges, conditional requests, sendfile) for exactly the file it was
    given: never a compressed sibling (``name.webm.gz`` for ``Accept-Encoding: gzip``), which
    no manifest lists, and never through a symlink."""

    def _get_file_path_stat_encoding(
        self, accept_encoding: str
    ) -> tuple[Path | None, os.stat_result, str | None]:
        st = self._path.lstat()
        return (self._path if stat.S_ISREG(st.st_mode) else None), st, None


# The method overridden above is aiohttp's (3.14, pinned): fail at start-up, not silently.
if not callable(getattr(web.FileResponse, "_get_file_path_stat_encoding", None)):
    raise RuntimeError("aiohttp's FileResponse changed: review _RecordingFileResponse")


def _unsatisfiable(request: web.Request, size: int) -> bool:
    """Whether ``FileResponse`` would answer 416 to this Range (aiohttp's rules: a malformed
    range, or one that starts at or after the end), so that we answer it in JSON instead."""
    if "Range" not in request.headers or request.if_range is not None:
        return False  # no range, or If-Range: FileResponse decides (200 when it changed)
    try:
        rng = request.http_range
    except ValueError:
        return True
    start = rng.start
    if start is None:
        return False
    if start < 0 and rng.stop is None:  # the last -start bytes
        start = max(0, size + start)
    return start >= size


async def recording_file(request: web.Request) -> web.StreamResponse:
    f = await request.app[API].library.file(
        request.match_info["recording"], request.match_info["file"]
    )
    if _unsatisfiable(request, f.size):
        return _error(
            "range_not_satisfiable",
            f"the range is not within the file's {f.size} bytes",
            {"Content-Range": f"bytes */{f.size}"},
        )
    return _RecordingFileResponse(
        f.path,
        headers={
            "Content-Type": f.content_type,
            "Content-Disposition": f'attachment; filename="{request.match_info["recording"]}'
            f'-{f.name}"',
            "Cache-Control": "private, no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def delete_recording(request: web.Request) -> web.Response:
    rec_id = request.match_info["recording"]
    await request.app[API].library.delete(rec_id)
    return web.json_response({"id": rec_id, "deleted": True})


ROUTES: Final = (
    ("GET", "/api/openapi.json", openapi),
    ("POST", "/api/tokens", create_token_route),
    ("GET", "/api/rooms", list_rooms),
    ("GET", "/api/rooms/{room}/participants", list_participants),
    ("POST", "/api/rooms/{room}/kick", kick),
    ("POST", "/api/rooms/{room}/recording", start_recording),
    ("GET", "/api/rooms/{room}/recording", get_room_recording),
    ("DELETE", "/api/rooms/{room}/recording", stop_recording),
    ("GET", "/api/rooms/{room}/media", room_media),
    ("GET", "/api/conversations/{conversation}/messages", history),
    ("POST", "/api/conversations/{conversation}/messages", post_message),
    ("GET", "/api/identities/{identity}/devices", devices),
    ("GET", "/api/identities/{identity}/relations", relations),
    ("PUT", "/api/identities/{identity}/contacts/{other}", _relation_route("link")),
    ("DELETE", "/api/identities/{identity}/contacts/{other}", _relation_route("unlink")),
    ("PUT", "/api/identities/{identity}/blocks/{other}", _relation_route("block")),
    ("DELETE", "/api/identities/{identity}/blocks/{other}", _relation_route("unblock")),
    ("POST", "/api/groups", create_group),
    ("GET", "/api/groups/{group}", get_group),
    ("PATCH", "/api/groups/{group}", rename_group),
    ("DELETE", "/api/groups/{group}", delete_group),
    ("POST", "/api/groups/{group}/members", add_members),
    ("DELETE", "/api/groups/{group}/members/{identity}", remove_member),
    ("PATCH", "/api/groups/{group}/members/{identity}", set_role),
    ("GET", "/api/recordings", list_recordings),
    ("GET", "/api/recordings/{recording}", get_recording),
    ("DELETE", "/api/recordings/{recording}", delete_recording),
    ("GET", "/api/recordings/{recording}/files/{file}", recording_file),
)


def setup(app: web.Application, api: Api) -> None:
    """Add the API routes and middleware to ``app``."""
    app[API] = api
    app.middlewares.append(api_middleware)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
