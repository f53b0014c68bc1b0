"""The messages of calls (1:1 and group calls that ring devices) and their error codes."""

from __future__ import annotations

from typing import Final

from ..wire.spec import (
    GROUP_PATTERN,
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

MAX_CALLEES: Final = 16
CALL_SIGNAL_KINDS: Final = ("offer", "answer", "candidate", "end_of_candidates")
CALL_PARTY_STATUSES: Final = ("invited", "ringing", "joined", "declined", "busy", "missed", "left")

ERRORS: Final[dict[str, str]] = {
    "no_such_call": "No call with this id involves you (unknown, forged or forgotten).",
    "call_ended": "The call is over for you (ended, declined, missed or cancelled).",
    "already_answered": "The call was already answered (on this or another device).",
    "in_call": "You are already in another call; hang up first.",
    "not_in_call": "This device is not in the call (or the target device is not).",
}

_CALL = Field(
    "call",
    "string",
    "Call id (from `call_state` or `call_incoming`).",
    required=True,
    pattern=TOKEN_PATTERN,
)
_CALL_ID = out("call", "string", "Call id.")
_CALL_INFO = (
    _CALL_ID,
    out("from", "string", "Caller identity."),
    out("from_name", "string", "Caller display name."),
    out("video", "boolean", "A video call."),
    out("group", "boolean", "A group call (more than one callee)."),
    out("media", "string", "`p2p` (WebRTC between the two devices) or `sfu` (join `room`)."),
    out("room", "string", "With `sfu`: the media room to `join`.", required=False),
    out(
        "conversation",
        "string",
        "A call started from a group: the group's conversation id.",
        required=False,
    ),
    out("expires_at", "integer", "Server time when ringing stops, ms.", required=False),
)

DEFINITIONS: Final[dict[str, dict[str, object]]] = {
    "CallParty": {
        "type": "object",
        "required": ["identity", "status"],
        "properties": {
            "identity": {"type": "string"},
            "status": {"enum": list(CALL_PARTY_STATUSES)},
            "device": {"type": "string", "description": "Session id of its device in the call."},
        },
    },
}

MESSAGES: Final = Messages(
    client=(
        request(
            "call_invite",
            "Call one identity (1:1), several (group call) or a group's members; answered with "
            "`call_state`.",
            Field(
                "to",
                "array",
                "Identities to call: one for a 1:1 call, more for a group call (give `to` or "
                "`group`).",
                items="string",
                max_items=MAX_CALLEES,
                min_items=1,
                item_pattern=IDENTITY_PATTERN,
            ),
            Field(
                "group",
                "string",
                "Call a group you are a member of: rings its other members (at most "
                "`calls.max_group_callees`); the call log goes into the group.",
                pattern=GROUP_PATTERN,
            ),
            Field("video", "boolean", "A video call (default false: audio only)."),
            Field(
                "room",
                "string",
                "Group call: the room whose conversation gets the call log.",
                pattern=ROOM_PATTERN,
            ),
        ),
        request(
            "call_ringing", "Callee: this device is ringing; the caller gets `call_ringing`.", _CALL
        ),
        request("call_accept", "Callee: answer on this device; answered with `call_state`.", _CALL),
        request("call_decline", "Callee: decline on every device of this identity.", _CALL),
        request("call_cancel", "Caller: stop ringing before anyone answered.", _CALL),
        request(
            "call_hangup",
            "Leave the call (while ringing: the caller cancels, a callee declines).",
            _CALL,
        ),
        request(
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
    ),
    server=(
        event(
            "call_state",
            "Answer to `call_invite` and `call_accept`, and sent on resume for each live call: "
            "the call as this device sees it.",
            *_CALL_INFO,
            out("state", "string", "ringing | active | ended"),
            out("role", "string", "caller | callee"),
            out("parties", "array", "Caller and callees with their status.", ref="CallParty"),
            out("started_at", "integer", "Server time of the invite, ms."),
            out("answered_at", "integer", "Server time of the first answer, ms.", required=False),
            out("outcome", "string", "When ended: the outcome (see `call_ended`).", required=False),
            out("ice_servers", "array", "Fresh STUN/TURN servers for this call.", ref="IceServer"),
            RE,
        ),
        event(
            "call_incoming",
            "A call rings this device (sent to every device of each callee).",
            *_CALL_INFO,
            out("from_device", "string", "Session id of the caller's device."),
            out("to", "array", "Identities called.", items="string"),
            out("ice_servers", "array", "Fresh STUN/TURN servers for this call.", ref="IceServer"),
        ),
        event(
            "call_ringing",
            "A callee's device is ringing.",
            _CALL_ID,
            out("identity", "string", "The callee."),
            out("device", "string", "Session id of the ringing device."),
        ),
        event(
            "call_accepted",
            "A callee answered; in a 1:1 P2P call, start WebRTC negotiation with `device`.",
            _CALL_ID,
            out("identity", "string", "The callee."),
            out("device", "string", "Session id of the device that answered."),
        ),
        event(
            "call_answered_elsewhere",
            "Another device of your identity answered: stop ringing. Last event of the call here.",
            _CALL_ID,
            out("device", "string", "Session id of the device that answered."),
        ),
        event(
            "call_declined",
            "A callee declined.",
            _CALL_ID,
            out("identity", "string", "The callee."),
        ),
        event(
            "call_busy",
            "A callee is in another call.",
            _CALL_ID,
            out("identity", "string", "The callee."),
        ),
        event(
            "call_missed",
            "A callee did not answer within the ring timeout.",
            _CALL_ID,
            out("identity", "string", "The callee."),
        ),
        event(
            "call_left",
            "A party hung up; the call goes on for the others (group calls).",
            _CALL_ID,
            out("identity", "string", "Who left."),
        ),
        event(
            "call_ended",
            "The call is over for this device. Last event of the call here.",
            _CALL_ID,
            out("outcome", "string", "completed | missed | declined | busy | cancelled"),
            out("duration_ms", "integer", "Time since the first answer (0 if never answered)."),
        ),
        event(
            "call_signal",
            "WebRTC negotiation relayed from another device in the call.",
            _CALL_ID,
            out("from", "string", "Session id of the sending device."),
            out("identity", "string", "Identity of the sender."),
            out("kind", "string", "offer | answer | candidate | end_of_candidates"),
            out("sdp", "string", "SDP (offer, answer).", required=False),
            out("candidate", "string", "ICE candidate.", required=False),
            out("mid", "string", "The candidate's sdpMid.", required=False),
            out("mline", "integer", "The candidate's sdpMLineIndex.", required=False),
            out("restart", "boolean", "true on an ICE-restart offer.", required=False),
        ),
    ),
    errors=ERRORS,
    definitions=DEFINITIONS,
)
