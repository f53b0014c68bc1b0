"""The WebSocket protocol as plain values: message tables, validation, error and close codes.

Every client message is a JSON object with a ``type``; the table ``CLIENT_MESSAGES`` says which
fields each type takes, and drives both validation (``parse_client_message``) and the JSON Schema
in ``docs/protocol.schema.json`` (``json_schema``). Server messages are described the same way in
``SERVER_MESSAGES`` so that the schema and ``docs/PROTOCOL.md`` cover both directions.

Nothing here does I/O. ``encode`` turns a server message into a complete, unmasked WebSocket text
frame (RFC 6455 section 5.2) so a fan-out serializes and frames a message once for all recipients.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

import orjson

PROTOCOL_VERSION: Final = 1


class CloseCode(IntEnum):
    """WebSocket close codes the server uses (RFC 6455 section 7.4 plus the 4000-4999 range)."""

    NORMAL = 1000  # the client said bye
    GOING_AWAY = 1001  # the server is shutting down
    MESSAGE_TOO_BIG = 1009  # a frame beyond the hard frame cap
    AUTH_FAILED = 4001  # hello rejected: bad, expired or missing token, bad version
    HEARTBEAT_TIMEOUT = 4002  # 2.5 heartbeat intervals without a message (two missed pings)
    HELLO_TIMEOUT = 4003  # no valid hello in time
    REPLACED = 4004  # the session was resumed on another connection
    SLOW_CONSUMER = 4008  # the client stopped reading; its outbox is full


#: Stable error codes with the meaning documented in docs/PROTOCOL.md.
ERROR_CODES: Final[dict[str, str]] = {
    "bad_json": "The frame is not valid UTF-8 JSON.",
    "bad_message": "The frame is not a JSON object with a string `type`, or is binary.",
    "unknown_type": "No client message has this `type`.",
    "bad_field": "A field is missing, has the wrong type or value, or is not part of the message.",
    "frame_too_large": "The frame is larger than the frame limit in `welcome.limits`.",
    "hello_required": "The first message must be `hello`.",
    "already_welcomed": "`hello` was already accepted on this connection.",
    "unsupported_version": "The server does not speak this protocol version.",
    "token_required": "The server requires a token and `hello` had none.",
    "token_invalid": "The token's signature, issuer or claims are wrong.",
    "token_expired": "The token has expired.",
    "token_wrong_room": "The token grants nothing for this room.",
    "forbidden": "The token lacks the grant this action needs.",
    "rate_limited": "Too many messages; retry after `retry_after_ms`.",
    "room_full": "The room has reached its participant limit.",
    "room_locked": "A moderator has locked the room.",
    "not_in_room": "The action needs the session to be in the room.",
    "no_such_participant": "No participant with this id is in the room.",
    "bad_conversation": "The conversation does not exist or this identity is not a member of it.",
    "no_such_message": "No message with this sequence number in the conversation.",
    "not_author": "Only the author or a moderator may edit or delete a message.",
    "edit_window_passed": "The time limit for editing or deleting this message has passed.",
    "already_deleted": "The message was deleted.",
    "internal_error": "The server failed; nothing was stored. Retrying is safe.",
    "unknown_identity": "A callee has never connected to this server and was never issued a "
    "token through the HTTP API.",
    "no_such_call": "No call with this id involves you (unknown, forged or forgotten).",
    "call_ended": "The call is over for you (ended, declined, missed or cancelled).",
    "already_answered": "The call was already answered (on this or another device).",
    "in_call": "You are already in another call; hang up first.",
    "not_in_call": "This device is not in the call (or the target device is not).",
}


class ProtocolError(Exception):
    """A request the server refuses; becomes an ``error`` message (and maybe a close)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        close: CloseCode | None = None,
        retry_after_ms: int | None = None,
    ) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.retry_after_ms = retry_after_ms
        self.re: str | None = None  # the request id, when the frame had a usable one


# --- field specifications ----------------------------------------------------------------------

ROOM_PATTERN: Final = r"^[A-Za-z0-9_.~-]{1,64}$"
IDENTITY_PATTERN: Final = r"^[A-Za-z0-9_.@+~-]{1,128}$"
_ID_BODY = r"[A-Za-z0-9_.@+~-]{1,128}"
CONVERSATION_PATTERN: Final = rf"^(room:[A-Za-z0-9_.~-]{{1,64}}|dm:{_ID_BODY}\|{_ID_BODY})$"
TOKEN_PATTERN: Final = r"^[\x21-\x7e]{1,64}$"  # client ids, device ids, request ids
PRESENCE_STATUSES: Final = ("online", "away", "busy")
CALL_OUTCOMES: Final = ("completed", "missed", "declined", "busy", "cancelled")
CALL_PARTY_STATUSES: Final = ("invited", "ringing", "joined", "declined", "busy", "missed", "left")


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a message: its JSON type and constraints."""

    name: str
    kind: str  # "string" | "integer" | "boolean" | "object" | "array"
    doc: str
    required: bool = False
    pattern: str | None = None
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] | None = None
    items: str | None = None  # item kind for arrays / value kind for objects
    max_items: int | None = None
    item_pattern: str | None = None
    ref: str | None = None  # for server messages: a named schema definition


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """A message type and its fields."""

    type: str
    doc: str
    fields: tuple[Field, ...] = ()
    by_name: dict[str, Field] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.by_name.update({f.name: f for f in self.fields})


_REQ_ID = Field(
    "id",
    "string",
    "Request id chosen by the client; echoed as `re` in the reply.",
    pattern=TOKEN_PATTERN,
)
_ROOM = Field("room", "string", "Room name.", required=True, pattern=ROOM_PATTERN)
_CONV = Field(
    "conversation",
    "string",
    "Conversation id: `room:<room>` or `dm:<a>|<b>` (sorted).",
    required=True,
    pattern=CONVERSATION_PATTERN,
)
_CID = Field(
    "cid",
    "string",
    "Client-generated message id; a retry with the same cid is stored once.",
    required=True,
    pattern=TOKEN_PATTERN,
)
_PARTICIPANT = Field(
    "participant",
    "string",
    "Participant id (from `participants`).",
    required=True,
    pattern=TOKEN_PATTERN,
)
_TEXT = Field("text", "string", "Message text (at most `limits.max_text_chars`).", required=True)
_SEQ = Field("seq", "integer", "Sequence number in the conversation.", required=True, minimum=0)


MAX_CALLEES: Final = 16
CALL_SIGNAL_KINDS: Final = ("offer", "answer", "candidate", "end_of_candidates")
_CALL = Field(
    "call",
    "string",
    "Call id (from `call_state` or `call_incoming`).",
    required=True,
    pattern=TOKEN_PATTERN,
)


def _spec(type_: str, doc: str, *fields: Field, request: bool = True) -> MessageSpec:
    return MessageSpec(type_, doc, (*fields, _REQ_ID) if request else fields)


CLIENT_MESSAGES: Final[dict[str, MessageSpec]] = {
    s.type: s
    for s in (
        _spec(
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
        _spec(
            "ping",
            "Heartbeat; answered with `pong`.",
            Field("ts", "integer", "Client time, echoed in `pong`."),
        ),
        _spec("bye", "End the session now (no resume); the server closes with 1000."),
        _spec("join", "Join a room; answered with `joined`.", _ROOM),
        _spec("leave", "Leave a room.", _ROOM),
        _spec(
            "update",
            "Change this participant's state in a room; others get `participant_updated`.",
            _ROOM,
            Field("audio_muted", "boolean", "Microphone muted."),
            Field("video_muted", "boolean", "Camera off."),
            Field("name", "string", "New display name.", max_length=64),
        ),
        _spec("kick", "Moderator: remove a participant from the room.", _ROOM, _PARTICIPANT),
        _spec(
            "mute",
            "Moderator: ask a participant to mute.",
            _ROOM,
            _PARTICIPANT,
            Field("kind", "string", "What to mute.", required=True, enum=("audio", "video")),
        ),
        _spec(
            "lock",
            "Moderator: lock or unlock the room to new joiners.",
            _ROOM,
            Field("locked", "boolean", "Lock state.", required=True),
        ),
        _spec(
            "presence",
            "Set this device's presence.",
            Field("status", "string", "Presence status.", required=True, enum=PRESENCE_STATUSES),
        ),
        _spec(
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
        _spec("send", "Send a chat message; answered with `sent`.", _CONV, _CID, _TEXT),
        _spec(
            "edit",
            "Replace the text of an earlier message; answered with `sent`.",
            _CONV,
            _CID,
            Field("ref", "integer", "Sequence of the message to edit.", required=True, minimum=1),
            _TEXT,
        ),
        _spec(
            "delete",
            "Delete an earlier message; answered with `sent`.",
            _CONV,
            _CID,
            Field("ref", "integer", "Sequence of the message to delete.", required=True, minimum=1),
        ),
        _spec("read", "Move this identity's read watermark; others get `receipt`.", _CONV, _SEQ),
        _spec(
            "typing",
            "Typing indicator (ephemeral).",
            _CONV,
            Field("active", "boolean", "Typing now.", required=True),
        ),
        _spec(
            "history",
            "Page through a conversation; answered with `history`.",
            _CONV,
            Field(
                "before",
                "integer",
                "Return messages with seq < before (newest first page).",
                minimum=1,
            ),
            Field("after", "integer", "Return messages with seq > after.", minimum=0),
            Field("limit", "integer", "Page size (default 50).", minimum=1, maximum=200),
        ),
        _spec(
            "sync",
            "Catch up after a reconnect; answered with `synced`.",
            Field(
                "since",
                "object",
                "Last sequence the client has, per conversation.",
                required=True,
                items="integer",
                max_items=500,
            ),
            Field(
                "limit",
                "integer",
                "Page size per conversation (default 100).",
                minimum=1,
                maximum=500,
            ),
        ),
        _spec(
            "conversations", "List this identity's conversations; answered with `conversations`."
        ),
        _spec(
            "call_invite",
            "Call one identity (1:1) or several (group call); answered with `call_state`.",
            Field(
                "to",
                "array",
                "Identities to call: one for a 1:1 call, more for a group call.",
                required=True,
                items="string",
                max_items=MAX_CALLEES,
                item_pattern=IDENTITY_PATTERN,
            ),
            Field("video", "boolean", "A video call (default false: audio only)."),
            Field(
                "room",
                "string",
                "Group call: the room whose conversation gets the call log.",
                pattern=ROOM_PATTERN,
            ),
        ),
        _spec(
            "call_ringing", "Callee: this device is ringing; the caller gets `call_ringing`.", _CALL
        ),
        _spec("call_accept", "Callee: answer on this device; answered with `call_state`.", _CALL),
        _spec("call_decline", "Callee: decline on every device of this identity.", _CALL),
        _spec("call_cancel", "Caller: stop ringing before anyone answered.", _CALL),
        _spec(
            "call_hangup",
            "Leave the call (while ringing: the caller cancels, a callee declines).",
            _CALL,
        ),
        _spec(
            "call_signal",
            "Relay WebRTC negotiation (SDP, ICE candidates, ICE restarts) to a device in the call.",
            _CALL,
            Field(
                "to",
                "string",
                "Session id of the peer device (default in a 1:1 call: the other device).",
                pattern=TOKEN_PATTERN,
            ),
            Field("kind", "string", "What this carries.", required=True, enum=CALL_SIGNAL_KINDS),
            Field("sdp", "string", "SDP of an offer or answer.", max_length=60000),
            Field(
                "candidate",
                "string",
                "ICE candidate (`candidate:...`) for `candidate`.",
                max_length=1024,
            ),
            Field("mid", "string", "The candidate's `sdpMid`.", max_length=64),
            Field("mline", "integer", "The candidate's `sdpMLineIndex`.", minimum=0, maximum=255),
            Field("restart", "boolean", "true on an offer that restarts ICE."),
        ),
    )
}


def _smsg(type_: str, doc: str, *fields: Field) -> MessageSpec:
    return MessageSpec(type_, doc, fields)


def _s(
    name: str,
    kind: str,
    doc: str,
    *,
    required: bool = True,
    ref: str | None = None,
    items: str | None = None,
) -> Field:
    return Field(name, kind, doc, required=required, ref=ref, items=items)


_RE = _s("re", "string", "The `id` of the request this answers.", required=False)
_CALL_ID = _s("call", "string", "Call id.")
_CALL_INFO = (
    _CALL_ID,
    _s("from", "string", "Caller identity."),
    _s("from_name", "string", "Caller display name."),
    _s("video", "boolean", "A video call."),
    _s("group", "boolean", "A group call (more than one callee)."),
    _s("media", "string", "`p2p` (WebRTC between the two devices) or `sfu` (join `room`)."),
    _s("room", "string", "With `sfu`: the media room to `join`.", required=False),
    _s("expires_at", "integer", "Server time when ringing stops, ms.", required=False),
)

SERVER_MESSAGES: Final[dict[str, MessageSpec]] = {
    s.type: s
    for s in (
        _smsg(
            "welcome",
            "Answer to a good `hello`.",
            _s("session", "string", "Session id; also this device's participant id."),
            _s("identity", "string", "Authenticated identity."),
            _s("name", "string", "Display name."),
            _s("device", "string", "Device id."),
            _s("server_time", "integer", "Server time, ms since the Unix epoch."),
            _s("heartbeat_ms", "integer", "Send `ping` at this interval."),
            _s("resume", "string", "Resume token for the next reconnect."),
            _s("resume_grace_ms", "integer", "How long the session waits for a reconnect."),
            _s("resumed", "boolean", "true if this connection took over an earlier session."),
            _s(
                "epoch", "string", "Id of the message store; a change means local caches are stale."
            ),
            _s("open_mode", "boolean", "true if the server accepts anyone without a token."),
            _s("ice_servers", "array", "RTCIceServer objects for WebRTC.", ref="IceServer"),
            _s(
                "ice_transport_policy",
                "string",
                "`all`, or `relay` when the operator wants clients to use TURN relays only.",
            ),
            _s("limits", "object", "Limits of this server.", ref="Limits"),
            _s("rooms", "array", "Rooms this session is in (after a resume).", items="string"),
            _RE,
        ),
        _smsg(
            "pong",
            "Answer to `ping`.",
            _s("ts", "integer", "`ping.ts`.", required=False),
            _s("server_time", "integer", "Server time, ms."),
            _RE,
        ),
        _smsg("ok", "A request succeeded and has no other answer.", _RE),
        _smsg(
            "error",
            "A request failed or a frame was refused.",
            _s("code", "string", "Stable error code."),
            _s("message", "string", "Human-readable explanation."),
            _s("retry_after_ms", "integer", "With `rate_limited`: when to retry.", required=False),
            _RE,
        ),
        _smsg(
            "joined",
            "Answer to `join`: the room as it is now.",
            _s("room", "string", "Room name."),
            _s("self", "object", "This participant.", ref="Participant"),
            _s("participants", "array", "Everyone else in the room.", ref="Participant"),
            _s("locked", "boolean", "Room lock state."),
            _s("conversation", "string", "The room's chat conversation id."),
            _s("last_seq", "integer", "Last sequence number in the room's chat."),
            _s(
                "tracks",
                "array",
                "Tracks published in the room now (see `track_published`).",
                ref="Track",
            ),
            _RE,
        ),
        _smsg(
            "room_state",
            "The room as it is now, sent after a resume.",
            _s("room", "string", "Room name."),
            _s("participants", "array", "Everyone in the room.", ref="Participant"),
            _s("locked", "boolean", "Room lock state."),
        ),
        _smsg(
            "participant_joined",
            "Someone joined a room you are in.",
            _s("room", "string", "Room name."),
            _s("participant", "object", "Who.", ref="Participant"),
        ),
        _smsg(
            "participant_left",
            "Someone left a room you are in.",
            _s("room", "string", "Room name."),
            _s("participant", "string", "Participant id."),
            _s("identity", "string", "Identity."),
            _s("reason", "string", "left | kicked | disconnected"),
        ),
        _smsg(
            "participant_updated",
            "A participant's state changed.",
            _s("room", "string", "Room name."),
            _s("participant", "object", "New state.", ref="Participant"),
        ),
        _smsg(
            "room_updated",
            "A room's settings changed.",
            _s("room", "string", "Room name."),
            _s("locked", "boolean", "Lock state."),
            _s("by", "string", "Participant id of the moderator."),
        ),
        _smsg(
            "kicked",
            "A moderator removed you from a room.",
            _s("room", "string", "Room."),
            _s("by", "string", "Participant id of the moderator."),
        ),
        _smsg(
            "mute_requested",
            "A moderator asks you to mute.",
            _s("room", "string", "Room."),
            _s("kind", "string", "audio | video"),
            _s("by", "string", "Participant id of the moderator."),
        ),
        _smsg(
            "presence",
            "An identity's presence changed.",
            _s("identity", "string", "Identity."),
            _s("status", "string", "online | away | busy | offline"),
        ),
        _smsg(
            "presence_state",
            "Answer to `watch`: current presence of each identity.",
            _s("presence", "array", "Objects with identity and status.", ref="Presence"),
            _RE,
        ),
        _smsg(
            "message",
            "A chat event in a conversation (also used inside history pages).",
            _s("conversation", "string", "Conversation id."),
            _s("seq", "integer", "Sequence number, gap-free per conversation."),
            _s("mid", "integer", "Server message id."),
            _s("cid", "string", "Client message id."),
            _s("from", "string", "Sender identity (set by the server)."),
            _s("name", "string", "Sender display name."),
            _s("kind", "string", "text | edit | delete | system | call"),
            _s("text", "string", "Text (absent for delete).", required=False),
            _s("ref", "integer", "For edit and delete: the seq of the original.", required=False),
            _s("ts", "integer", "Server time the message was stored, ms."),
            _s(
                "call",
                "object",
                "For kind `call`: the call's outcome.",
                required=False,
                ref="CallLog",
            ),
        ),
        _smsg(
            "sent",
            "Acknowledgement of `send`, `edit` or `delete`: stored durably.",
            _s("conversation", "string", "Conversation id."),
            _s("cid", "string", "Client message id."),
            _s("mid", "integer", "Server message id."),
            _s("seq", "integer", "Sequence number."),
            _s("ts", "integer", "Server time, ms."),
            _s("duplicate", "boolean", "true if this cid had been stored before."),
            _RE,
        ),
        _smsg(
            "receipt",
            "An identity read a conversation up to `seq`.",
            _s("conversation", "string", "Conversation id."),
            _s("identity", "string", "Reader."),
            _s("seq", "integer", "Read up to."),
        ),
        _smsg(
            "typing",
            "Someone is typing (or stopped).",
            _s("conversation", "string", "Conversation id."),
            _s("identity", "string", "Who."),
            _s("name", "string", "Display name."),
            _s("active", "boolean", "Typing now."),
        ),
        _smsg(
            "history",
            "Answer to `history`.",
            _s("conversation", "string", "Conversation."),
            _s("messages", "array", "Messages in ascending seq.", ref="message"),
            _s("more", "boolean", "More messages exist in the paging direction."),
            _s("last_seq", "integer", "Last sequence in the conversation."),
            _RE,
        ),
        _smsg(
            "synced",
            "Answer to `sync`.",
            _s("conversations", "array", "One page per conversation.", ref="SyncPage"),
            _s("epoch", "string", "Store epoch."),
            _RE,
        ),
        _smsg(
            "call_state",
            "Answer to `call_invite` and `call_accept`, and sent on resume for each live call: "
            "the call as this device sees it.",
            *_CALL_INFO,
            _s("state", "string", "ringing | active | ended"),
            _s("role", "string", "caller | callee"),
            _s("parties", "array", "Caller and callees with their status.", ref="CallParty"),
            _s("started_at", "integer", "Server time of the invite, ms."),
            _s("answered_at", "integer", "Server time of the first answer, ms.", required=False),
            _s("outcome", "string", "When ended: the outcome (see `call_ended`).", required=False),
            _s("ice_servers", "array", "Fresh STUN/TURN servers for this call.", ref="IceServer"),
            _RE,
        ),
        _smsg(
            "call_incoming",
            "A call rings this device (sent to every device of each callee).",
            *_CALL_INFO,
            _s("from_device", "string", "Session id of the caller's device."),
            _s("to", "array", "Identities called.", items="string"),
            _s("ice_servers", "array", "Fresh STUN/TURN servers for this call.", ref="IceServer"),
        ),
        _smsg(
            "call_ringing",
            "A callee's device is ringing.",
            _CALL_ID,
            _s("identity", "string", "The callee."),
            _s("device", "string", "Session id of the ringing device."),
        ),
        _smsg(
            "call_accepted",
            "A callee answered; in a 1:1 P2P call, start WebRTC negotiation with `device`.",
            _CALL_ID,
            _s("identity", "string", "The callee."),
            _s("device", "string", "Session id of the device that answered."),
        ),
        _smsg(
            "call_answered_elsewhere",
            "Another device of your identity answered: stop ringing. Last event of the call here.",
            _CALL_ID,
            _s("device", "string", "Session id of the device that answered."),
        ),
        _smsg(
            "call_declined",
            "A callee declined.",
            _CALL_ID,
            _s("identity", "string", "The callee."),
        ),
        _smsg(
            "call_busy",
            "A callee is in another call.",
            _CALL_ID,
            _s("identity", "string", "The callee."),
        ),
        _smsg(
            "call_missed",
            "A callee did not answer within the ring timeout.",
            _CALL_ID,
            _s("identity", "string", "The callee."),
        ),
        _smsg(
            "call_left",
            "A party hung up; the call goes on for the others (group calls).",
            _CALL_ID,
            _s("identity", "string", "Who left."),
        ),
        _smsg(
            "call_ended",
            "The call is over for this device. Last event of the call here.",
            _CALL_ID,
            _s("outcome", "string", "completed | missed | declined | busy | cancelled"),
            _s("duration_ms", "integer", "Time since the first answer (0 if never answered)."),
        ),
        _smsg(
            "call_signal",
            "WebRTC negotiation relayed from another device in the call.",
            _CALL_ID,
            _s("from", "string", "Session id of the sending device."),
            _s("identity", "string", "Identity of the sender."),
            _s("kind", "string", "offer | answer | candidate | end_of_candidates"),
            _s("sdp", "string", "SDP (offer, answer).", required=False),
            _s("candidate", "string", "ICE candidate.", required=False),
            _s("mid", "string", "The candidate's sdpMid.", required=False),
            _s("mline", "integer", "The candidate's sdpMLineIndex.", required=False),
            _s("restart", "boolean", "true on an ICE-restart offer.", required=False),
        ),
        _smsg(
            "conversations",
            "Answer to `conversations`.",
            _s(
                "items",
                "array",
                "Conversations with last and read sequence.",
                ref="ConversationInfo",
            ),
            _RE,
        ),
    )
}


# --- parsing ------------------------------------------------------------------------------------

_JSON_TYPES: Final[dict[str, type | tuple[type, ...]]] = {
    "string": str,
    "integer": int,
    "boolean": bool,
    "object": dict,
    "array": list,
}
_COMPILED: dict[str, re.Pattern[str]] = {}


def compiled(p: str) -> re.Pattern[str]:
    c = _COMPILED.get(p)
    if c is None:
        c = _COMPILED[p] = re.compile(p)
    return c


def _is_kind(value: Any, kind: str) -> bool:
    return type(value) is _JSON_TYPES[kind]


def _check_value(f: Field, value: Any, where: str) -> None:
    kind = f.kind
    # bool is an int in Python; JSON keeps them apart.
    if kind == "integer":
        if type(value) is not int:
            raise ProtocolError("bad_field", f"`{where}` must be an integer")
        if f.minimum is not None and value < f.minimum:
            raise ProtocolError("bad_field", f"`{where}` must be >= {f.minimum}")
        if f.maximum is not None and value > f.maximum:
            raise ProtocolError("bad_field", f"`{where}` must be <= {f.maximum}")
        if value > 2**53:
            raise ProtocolError("bad_field", f"`{where}` is too large")
        return
    if not _is_kind(value, kind):
        raise ProtocolError(
            "bad_field", f"`{where}` must be a{'n' if kind[0] in 'aeiou' else ''} {kind}"
        )
    if kind == "string":
        if f.pattern is not None and compiled(f.pattern).match(value) is None:
            raise ProtocolError("bad_field", f"`{where}` has a bad format")
        if f.enum is not None and value not in f.enum:
            raise ProtocolError("bad_field", f"`{where}` must be one of {', '.join(f.enum)}")
        if f.max_length is not None and len(value) > f.max_length:
            raise ProtocolError("bad_field", f"`{where}` is longer than {f.max_length}")
    elif kind == "array":
        if f.max_items is not None and len(value) > f.max_items:
            raise ProtocolError("bad_field", f"`{where}` has more than {f.max_items} items")
        item = Field(f.name, f.items or "string", "", pattern=f.item_pattern)
        for v in value:
            _check_value(item, v, f"{where}[]")
    elif kind == "object":
        if f.max_items is not None and len(value) > f.max_items:
            raise ProtocolError("bad_field", f"`{where}` has more than {f.max_items} entries")
        if f.items is None:  # free-form object: the handler checks what it uses
            return
        item = Field(f.name, f.items or "string", "", minimum=0)
        for k, v in value.items():
            if f.name == "since" and compiled(CONVERSATION_PATTERN).match(k) is None:
                raise ProtocolError("bad_field", f"`{where}` has a bad conversation id")
            _check_value(item, v, f"{where}.{k}")


def _fast_check(f: Field) -> Callable[[Any], bool]:
    """A check that says True quickly for a valid value of ``f``; on False the full
    ``_check_value`` decides (and words the error)."""
    kind = f.kind
    if kind == "string":
        match = compiled(f.pattern).match if f.pattern is not None else None
        longest = f.max_length if f.max_length is not None else 1 << 62
        enum = f.enum
        if enum is not None:
            return lambda v: (
                type(v) is str
                and v in enum
                and len(v) <= longest
                and (match is None or match(v) is not None)
            )
        if match is None:
            return lambda v: type(v) is str and len(v) <= longest
        return lambda v: type(v) is str and len(v) <= longest and match(v) is not None
    if kind == "boolean":
        return lambda v: type(v) is bool
    if kind == "integer":
        low = f.minimum if f.minimum is not None else -(2**53)
        high = min(f.maximum, 2**53) if f.maximum is not None else 2**53
        return lambda v: type(v) is int and low <= v <= high
    return lambda v: False  # arrays and objects: always the full check


_CHECKS: dict[str, dict[str, Callable[[Any], bool]]] = {}


def _checks(spec: MessageSpec) -> dict[str, Callable[[Any], bool]]:
    checks = _CHECKS[spec.type] = {f.name: _fast_check(f) for f in spec.fields}
    return checks


def parse_client_message(data: bytes | str) -> dict[str, Any]:
    """Decode and validate one client frame; raise ``ProtocolError`` on any problem.

    Unknown fields are refused rather than ignored: a client cannot set fields the server owns
    (such as ``from``), and typos surface at once.
    """
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_json", "the frame is not valid JSON") from None
    if type(msg) is not dict:
        raise ProtocolError("bad_message", "a message must be a JSON object")
    type_ = msg.get("type")
    if type(type_) is not str:
        raise ProtocolError("bad_message", "a message needs a string `type`")
    spec = CLIENT_MESSAGES.get(type_)
    if spec is None:
        raise ProtocolError("unknown_type", f"unknown message type {type_[:40]!r}")
    checks = _CHECKS.get(type_)
    if checks is None:
        checks = _checks(spec)
    try:
        for key, value in msg.items():
            if key == "type":
                continue
            check = checks.get(key)
            if check is None:
                raise ProtocolError("bad_field", f"`{key[:40]}` is not a field of `{type_}`")
            if not check(value):
                _check_value(spec.by_name[key], value, key)
        for f in spec.fields:
            if f.required and f.name not in msg:
                raise ProtocolError("bad_field", f"`{type_}` needs `{f.name}`")
    except ProtocolError as e:
        rid = msg.get("id")
        if type(rid) is str and compiled(TOKEN_PATTERN).match(rid):
            e.re = rid
        raise
    return msg


# --- encoding -----------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """Wrap ``payload`` in an unmasked, final WebSocket text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def encode(msg: dict[str, Any]) -> bytes:
    """Serialize a server message into a ready-to-write WebSocket frame."""
    return frame(orjson.dumps(msg))


def error_message(err: ProtocolError, re_: Any = None) -> dict[str, Any]:
    """The ``error`` message for ``err``, answering request ``re_`` (or ``err.re``) if known."""
    out: dict[str, Any] = {"type": "error", "code": err.code, "message": err.message}
    if err.retry_after_ms is not None:
        out["retry_after_ms"] = err.retry_after_ms
    if re_ is None:
        re_ = err.re
    if re_ is not None:
        out["re"] = re_
    return out


# --- JSON Schema --------------------------------------------------------------------------------

_DEFINITIONS: Final[dict[str, Any]] = {
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
        "properties": {
            "max_frame_bytes": {"type": "integer"},
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
    "SyncPage": {
        "type": "object",
        "required": ["conversation", "messages", "more", "last_seq", "reads"],
        "properties": {
            "conversation": {"type": "string"},
            "messages": {"type": "array", "items": {"$ref": "#/$defs/server/message"}},
            "more": {"type": "boolean"},
            "last_seq": {"type": "integer"},
            "reads": {
                "type": "object",
                "description": "Read watermark of each identity that has read something.",
                "additionalProperties": {"type": "integer"},
            },
        },
    },
    "CallParty": {
        "type": "object",
        "required": ["identity", "status"],
        "properties": {
            "identity": {"type": "string"},
            "status": {"enum": list(CALL_PARTY_STATUSES)},
            "device": {"type": "string", "description": "Session id of its device in the call."},
        },
    },
    "CallLog": {
        "type": "object",
        "required": ["id", "outcome", "duration_ms", "caller", "video", "group"],
        "properties": {
            "id": {"type": "string"},
            "outcome": {"enum": list(CALL_OUTCOMES)},
            "duration_ms": {"type": "integer", "minimum": 0},
            "caller": {"type": "string"},
            "callee": {"type": "string", "description": "1:1 log entries: the callee."},
            "video": {"type": "boolean"},
            "group": {"type": "boolean"},
        },
    },
    "ConversationInfo": {
        "type": "object",
        "required": ["conversation", "last_seq", "read_seq"],
        "properties": {
            "conversation": {"type": "string"},
            "last_seq": {"type": "integer"},
            "read_seq": {"type": "integer"},
        },
    },
}


#: Named schema definitions; feature modules (e.g. signaling.media) add theirs.
SCHEMA_DEFINITIONS = _DEFINITIONS


def _field_schema(f: Field, server: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"description": f.doc}
    if f.ref is not None:
        target = f"#/$defs/server/{f.ref}" if f.ref in SERVER_MESSAGES else f"#/$defs/{f.ref}"
        if f.kind == "array":
            s.update(type="array", items={"$ref": target})
        else:
            s["$ref"] = target
        return s
    s["type"] = f.kind
    if f.pattern:
        s["pattern"] = f.pattern
    if f.max_length is not None:
        s["maxLength"] = f.max_length
    if f.minimum is not None:
        s["minimum"] = f.minimum
    if f.maximum is not None:
        s["maximum"] = f.maximum
    if f.enum is not None:
        s["enum"] = list(f.enum)
    if f.kind == "array" and f.items:
        item: dict[str, Any] = {"type": f.items}
        if f.item_pattern:
            item["pattern"] = f.item_pattern
        s["items"] = item
        if f.max_items is not None:
            s["maxItems"] = f.max_items
    if f.kind == "object" and f.items:
        s["additionalProperties"] = {"type": f.items, "minimum": 0}
        s["propertyNames"] = {"pattern": CONVERSATION_PATTERN}
        if f.max_items is not None:
            s["maxProperties"] = f.max_items
    return s


def _message_schema(spec: MessageSpec, server: bool) -> dict[str, Any]:
    props: dict[str, Any] = {"type": {"const": spec.type}}
    for f in spec.fields:
        props[f.name] = _field_schema(f, server)
    return {
        "description": spec.doc,
        "type": "object",
        "required": ["type", *(f.name for f in spec.fields if f.required)],
        "properties": props,
        "additionalProperties": server,
    }


def json_schema() -> dict[str, Any]:
    """The machine-readable description of the protocol (``docs/protocol.schema.json``)."""
    client = {t: _message_schema(s, False) for t, s in CLIENT_MESSAGES.items()}
    server = {t: _message_schema(s, True) for t, s in SERVER_MESSAGES.items()}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://rallypoint.invalid/protocol.schema.json",
        "title": f"Rallypoint WebSocket protocol v{PROTOCOL_VERSION}",
        "description": "A frame from the client validates against `#/$defs/clientMessage`, a "
        "frame from the server against `#/$defs/serverMessage`. See docs/PROTOCOL.md.",
        "$defs": {
            **_DEFINITIONS,
            "client": client,
            "server": server,
            "clientMessage": {"oneOf": [{"$ref": f"#/$defs/client/{t}"} for t in client]},
            "serverMessage": {"oneOf": [{"$ref": f"#/$defs/server/{t}"} for t in server]},
            "error_codes": {"enum": list(ERROR_CODES)},
            "close_codes": {"enum": [int(c) for c in CloseCode]},
        },
        "anyOf": [{"$ref": "#/$defs/clientMessage"}, {"$ref": "#/$defs/serverMessage"}],
    }


if __name__ == "__main__":  # pragma: no cover - `python -m signaling.protocol > docs/...`
    import sys

    # Feature modules add their messages to the tables of the imported module (this file runs
    # as __main__, a second copy): import the app, then generate from that module.
    import signaling.server  # noqa: F401
    from signaling.protocol import json_schema as _schema

    sys.stdout.write(orjson.dumps(_schema(), option=orjson.OPT_INDENT_2).decode() + "\n")
