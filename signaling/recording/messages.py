"""The messages of recording group calls and their error codes."""

from __future__ import annotations

from typing import Final

from ..wire.spec import IDENTITY_PATTERN, ROOM_PATTERN, Field, Messages, event, out, request

_ROOM = Field("room", "string", "Room name.", required=True, pattern=ROOM_PATTERN)

_CLIENT = (
    request(
        "recording_start",
        "Moderator: start recording the room's media (each published track to its own file, "
        "no re-encoding). Answered with `ok`; everyone in the room gets `recording`.",
        _ROOM,
        Field("audio_only", "boolean", "Record audio tracks only (default false)."),
        Field(
            "identities",
            "array",
            "Record only the tracks of these identities (those who consented); default: "
            "everyone who publishes.",
            items="string",
            max_items=256,
            item_pattern=IDENTITY_PATTERN,
        ),
    ),
    request(
        "recording_stop",
        "Moderator: stop the room's recording. Answered with `ok`; everyone in the room gets "
        "`recording` with `active: false`.",
        _ROOM,
    ),
)

_SERVER = (
    event(
        "recording",
        "The room's recording started or ended; sent to everyone in the room. Someone who "
        "joins while it runs finds it in `joined.recording`.",
        out("room", "string", "Room name."),
        out("active", "boolean", "true: the room is being recorded from now on."),
        out("recording", "string", "Recording id."),
        out(
            "by",
            "object",
            "Who started it: `{identity, name}` of the moderator, or `{api: true}` when the "
            "app's backend did.",
        ),
        out("audio_only", "boolean", "Only audio is recorded."),
        out(
            "identities",
            "array",
            "Only these identities are recorded (absent: everyone who publishes).",
            required=False,
        ),
        out("started_at", "integer", "When it started (ms since the Unix epoch)."),
        out(
            "reason",
            "string",
            "When `active` is false: why it ended.",
            required=False,
            enum=("stopped", "room_closed", "disk_full", "size_limit", "error"),
        ),
        out(
            "stopped_by",
            "object",
            "When `reason` is `stopped`: who stopped it, in the form of `by`.",
            required=False,
        ),
    ),
)

ERRORS: Final[dict[str, str]] = {
    "recording_unavailable": "Recording is disabled on this server, or media is not available.",
    "already_recording": "The room is being recorded already.",
    "not_recording": "The room is not being recorded.",
    "no_such_room": "Nobody is in the room, or its media has not started: nothing to record.",
    "recording_storage_full": (
        "The recordings' storage is full (recording.max_total_bytes); nothing was started."
    ),
}

MESSAGES: Final = Messages(client=_CLIENT, server=_SERVER, errors=ERRORS)
