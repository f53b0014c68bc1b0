"""The messages of sessions, rooms and presence, and their error codes."""

from __future__ import annotations

from typing import Final

from ..wire.spec import (
    IDENTITY_PATTERN,
    RE,
    ROOM_PATTERN,
    TOKEN_PATTERN,
    Field,
    Messages,
    event,
    out,
    request,
)

PRESENCE_STATUSES: Final = ("online", "away", "busy")

ERRORS: Final[dict[str, str]] = {
    "hello_required": "The first message must be `hello`.",
    "already_welcomed": "`hello` was already accepted on this connection.",
    "unsupported_version": "The server does not speak this protocol version.",
    "token_required": "The server requires a token and `hello` had none.",
    "token_invalid": "The token's signature, issuer or claims are wrong.",
    "token_expired": "The token has expired.",
    "token_wrong_room": "The token grants nothing for this room.",
    "forbidden": "The token lacks the grant this action needs.",
    "room_full": "The room has reached its participant limit.",
    "room_locked": "A moderator has locked the room.",
    "not_in_room": "The action needs the session to be in the room.",
    "no_such_participant": "No participant with this id is in the room.",
}

_ROOM = Field("room", "string", "Room name.", required=True, pattern=ROOM_PATTERN)
_PARTICIPANT = Field(
    "participant",
    "string",
    "Participant id (from `participants`).",
    required=True,
    pattern=TOKEN_PATTERN,
)

DEFINITIONS: Final[dict[str, dict[str, object]]] = {
    "Participant": {
        "type": "object",
        "required": [
            "id",
            "identity",
            "name",
            "audio_muted",
            "video_muted",
            "moderator",
            "joined_at",
        ],
        "properties": {
            "id": {"type": "string"},
            "identity": {"type": "string"},
            "name": {"type": "string"},
            "audio_muted": {"type": "boolean"},
            "video_muted": {"type": "boolean"},
            "moderator": {"type": "boolean"},
            "joined_at": {"type": "integer"},
        },
    },
    "IceServer": {
        "type": "object",
        "required": ["urls"],
        "properties": {
            "urls": {"type": "array", "items": {"type": "string"}},
            "username": {"type": "string"},
            "credential": {"type": "string"},
        },
    },
    "Limits": {
        "type": "object",
        "required": [
            "max_frame_bytes",
            "hard_frame_bytes",
            "max_text_chars",
            "rate_per_s",
            "burst",
            "edit_window_s",
        ],
        "properties": {
            "max_frame_bytes": {"type": "integer"},
            "hard_frame_bytes": {"type": "integer"},
            "max_text_chars": {"type": "integer"},
            "rate_per_s": {"type": "number"},
            "burst": {"type": "integer"},
            "edit_window_s": {"type": "integer"},
        },
    },
    "Presence": {
        "type": "object",
        "required": ["identity", "status"],
        "properties": {
            "identity": {"type": "string"},
            "status": {"enum": [*PRESENCE_STATUSES, "offline"]},
        },
    },
}

MESSAGES: Final = Messages(
    client=(
        request(
            "hello",
            "First message on a connection: authenticate, or resume a session.",
            Field("v", "integer", "Protocol version (1).", required=True, minimum=1),
            Field(
                "token", "string", "JWT access token (required unless open mode).", max_length=8192
            ),
            Field(
                "name",
                "string",
                "Display name (open mode only; in token mode the token's name is used).",
                max_length=64,
            ),
            Field(
                "identity",
                "string",
                "Identity to use in open mode (default: generated).",
                pattern=IDENTITY_PATTERN,
            ),
            Field(
                "device",
                "string",
                "Stable id of this device (default: generated).",
                pattern=TOKEN_PATTERN,
            ),
            Field(
                "resume", "string", "Resume token from a previous `welcome`.", pattern=TOKEN_PATTERN
            ),
        ),
        request(
            "ping",
            "Heartbeat; answered with `pong`.",
            Field("ts", "integer", "Client time, echoed in `pong`."),
        ),
        request("bye", "End the session now (no resume); the server closes with 1000."),
        request("join", "Join a room; answered with `joined`.", _ROOM),
        request("leave", "Leave a room.", _ROOM),
        request(
            "update",
            "Change this participant's state in a room; others get `participant_updated`.",
            _ROOM,
            Field("audio_muted", "boolean", "Microphone muted."),
            Field("video_muted", "boolean", "Camera off."),
            Field("name", "string", "New display name.", max_length=64),
        ),
        request("kick", "Moderator: remove a participant from the room.", _ROOM, _PARTICIPANT),
        request(
            "mute",
            "Moderator: ask a participant to mute.",
            _ROOM,
            _PARTICIPANT,
            Field("kind", "string", "What to mute.", required=True, enum=("audio", "video")),
        ),
        request(
            "lock",
            "Moderator: lock or unlock the room to new joiners.",
            _ROOM,
            Field("locked", "boolean", "Lock state.", required=True),
        ),
        request(
            "presence",
            "Set this device's presence.",
            Field("status", "string", "Presence status.", required=True, enum=PRESENCE_STATUSES),
        ),
        request(
            "watch",
            "Follow the presence of these identities (replaces the previous list).",
            Field(
                "identities",
                "array",
                "Identities to follow.",
                required=True,
                items="string",
                max_items=200,
                item_pattern=IDENTITY_PATTERN,
            ),
        ),
    ),
    server=(
        event(
            "welcome",
            "Answer to a good `hello`.",
            out("session", "string", "Session id; also this device's participant id."),
            out("identity", "string", "Authenticated identity."),
            out("name", "string", "Display name."),
            out("device", "string", "Device id."),
            out("server_time", "integer", "Server time, ms since the Unix epoch."),
            out("heartbeat_ms", "integer", "Send `ping` at this interval."),
            out("resume", "string", "Resume token for the next reconnect."),
            out("resume_grace_ms", "integer", "How long the session waits for a reconnect."),
            out("resumed", "boolean", "true if this connection took over an earlier session."),
            out(
                "epoch", "string", "Id of the message store; a change means local caches are stale."
            ),
            out("open_mode", "boolean", "true if the server accepts anyone without a token."),
            out("ice_servers", "array", "RTCIceServer objects for WebRTC.", ref="IceServer"),
            out(
                "ice_transport_policy",
                "string",
                "`all`, or `relay` when the operator wants clients to use TURN relays only.",
            ),
            out("limits", "object", "Limits of this server.", ref="Limits"),
            out("rooms", "array", "Rooms this session is in (after a resume).", items="string"),
            RE,
        ),
        event(
            "pong",
            "Answer to `ping`.",
            out("ts", "integer", "`ping.ts`.", required=False),
            out("server_time", "integer", "Server time, ms."),
            RE,
        ),
        event(
            "joined",
            "Answer to `join`: the room as it is now.",
            out("room", "string", "Room name."),
            out("self", "object", "This participant.", ref="Participant"),
            out("participants", "array", "Everyone else in the room.", ref="Participant"),
            out("locked", "boolean", "Room lock state."),
            out("conversation", "string", "The room's chat conversation id."),
            out("last_seq", "integer", "Last sequence number in the room's chat."),
            out(
                "tracks",
                "array",
                "Tracks published in the room now (see `track_published`).",
                ref="Track",
            ),
            out(
                "recording",
                "object",
                "Present while the room is being recorded: the fields of the `recording` "
                "event that started it (`active`, `recording`, `by`, `audio_only`, "
                "`identities`, `started_at`).",
                required=False,
            ),
            RE,
        ),
        event(
            "room_state",
            "The room as it is now, sent after a resume.",
            out("room", "string", "Room name."),
            out("participants", "array", "Everyone in the room.", ref="Participant"),
            out("locked", "boolean", "Room lock state."),
            out(
                "recording",
                "object",
                "Present while the room is being recorded (as in `joined`).",
                required=False,
            ),
        ),
        event(
            "participant_joined",
            "Someone joined a room you are in.",
            out("room", "string", "Room name."),
            out("participant", "object", "Who.", ref="Participant"),
        ),
        event(
            "participant_left",
            "Someone left a room you are in.",
            out("room", "string", "Room name."),
            out("participant", "string", "Participant id."),
            out("identity", "string", "Identity."),
            out("reason", "string", "left | kicked | disconnected"),
        ),
        event(
            "participant_updated",
            "A participant's state changed.",
            out("room", "string", "Room name."),
            out("participant", "object", "New state.", ref="Participant"),
        ),
        event(
            "room_updated",
            "A room's settings changed.",
            out("room", "string", "Room name."),
            out("locked", "boolean", "Lock state."),
            out("by", "string", "Participant id of the moderator."),
        ),
        event(
            "kicked",
            "A moderator removed you from a room.",
            out("room", "string", "Room."),
            out("by", "string", "Participant id of the moderator."),
        ),
        event(
            "mute_requested",
            "A moderator asks you to mute.",
            out("room", "string", "Room."),
            out("kind", "string", "audio | video"),
            out("by", "string", "Participant id of the moderator."),
        ),
        event(
            "presence",
            "An identity's presence changed.",
            out("identity", "string", "Identity."),
            out("status", "string", "online | away | busy | offline"),
        ),
        event(
            "presence_state",
            "Answer to `watch`: current presence of each identity.",
            out("presence", "array", "Objects with identity and status.", ref="Presence"),
            RE,
        ),
    ),
    errors=ERRORS,
    definitions=DEFINITIONS,
)
