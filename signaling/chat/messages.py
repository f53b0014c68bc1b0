"""The messages of chat (room chat and direct messages) and their error codes."""

from __future__ import annotations

from typing import Final

from ..wire.spec import (
    CONVERSATION_PATTERN,
    RE,
    TOKEN_PATTERN,
    Field,
    Messages,
    event,
    out,
    request,
)

#: How a call ended, as stored in its call-log message (``message.call.outcome``).
CALL_OUTCOMES: Final = ("completed", "missed", "declined", "busy", "cancelled")

ERRORS: Final[dict[str, str]] = {
    "bad_conversation": "The conversation id names no conversation of yours: a direct "
    "conversation is `dm:<a>|<b>` with two different identities, sorted, one of them yours "
    "(so there is no conversation with yourself).",
    "no_such_message": "No message with this sequence number in the conversation.",
    "not_author": "Only the author or a moderator may edit or delete a message.",
    "edit_window_passed": "The time limit for editing or deleting this message has passed.",
    "already_deleted": "The message was deleted.",
    "store_full": "The server's disk is full: the write (`send`, `edit`, `delete`, `read`) was "
    "not stored. Retryable: retry after `retry_after_ms` (a `send` with the same `cid`).",
}

_CONV = Field(
    "conversation",
    "string",
    "Conversation id: `room:<room>`, `dm:<a>|<b>` (sorted) or `group:<id>`.",
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
_TEXT = Field("text", "string", "Message text (at most `limits.max_text_chars`).", required=True)
_SEQ = Field("seq", "integer", "Sequence number in the conversation.", required=True, minimum=0)

DEFINITIONS: Final[dict[str, dict[str, object]]] = {
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

MESSAGES: Final = Messages(
    client=(
        request("send", "Send a chat message; answered with `sent`.", _CONV, _CID, _TEXT),
        request(
            "edit",
            "Replace the text of an earlier message; answered with `sent`.",
            _CONV,
            _CID,
            Field("ref", "integer", "Sequence of the message to edit.", required=True, minimum=1),
            _TEXT,
        ),
        request(
            "delete",
            "Delete an earlier message; answered with `sent`.",
            _CONV,
            _CID,
            Field("ref", "integer", "Sequence of the message to delete.", required=True, minimum=1),
        ),
        request("read", "Move this identity's read watermark; others get `receipt`.", _CONV, _SEQ),
        request(
            "typing",
            "Typing indicator (ephemeral).",
            _CONV,
            Field("active", "boolean", "Typing now.", required=True),
        ),
        request(
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
        request(
            "sync",
            "Catch up after a reconnect; answered with `synced`.",
            Field(
                "since",
                "object",
                "Last sequence the client has, per conversation.",
                required=True,
                items="integer",
                max_items=500,
                key_pattern=CONVERSATION_PATTERN,
            ),
            Field(
                "limit",
                "integer",
                "Page size per conversation (default 100).",
                minimum=1,
                maximum=500,
            ),
        ),
        request(
            "conversations", "List this identity's conversations; answered with `conversations`."
        ),
    ),
    server=(
        event(
            "message",
            "A chat event in a conversation (also used inside history pages).",
            out("conversation", "string", "Conversation id."),
            out("seq", "integer", "Sequence number, gap-free per conversation."),
            out("mid", "integer", "Server message id."),
            out("cid", "string", "Client message id."),
            out("from", "string", "Sender identity (set by the server)."),
            out("name", "string", "Sender display name."),
            out("kind", "string", "text | edit | delete | system | call"),
            out("text", "string", "Text (absent for delete).", required=False),
            out("ref", "integer", "For edit and delete: the seq of the original.", required=False),
            out("ts", "integer", "Server time the message was stored, ms."),
            out(
                "call",
                "object",
                "For kind `call`: the call's outcome.",
                required=False,
                ref="CallLog",
            ),
        ),
        event(
            "sent",
            "Acknowledgement of `send`, `edit` or `delete`: stored durably.",
            out("conversation", "string", "Conversation id."),
            out("cid", "string", "Client message id."),
            out("mid", "integer", "Server message id."),
            out("seq", "integer", "Sequence number."),
            out("ts", "integer", "Server time, ms."),
            out("duplicate", "boolean", "true if this cid had been stored before."),
            RE,
        ),
        event(
            "receipt",
            "An identity read a conversation up to `seq`.",
            out("conversation", "string", "Conversation id."),
            out("identity", "string", "Reader."),
            out("seq", "integer", "Read up to."),
        ),
        event(
            "typing",
            "Someone is typing (or stopped).",
            out("conversation", "string", "Conversation id."),
            out("identity", "string", "Who."),
            out("name", "string", "Display name."),
            out("active", "boolean", "Typing now."),
        ),
        event(
            "history",
            "Answer to `history`.",
            out("conversation", "string", "Conversation."),
            out("messages", "array", "Messages in ascending seq.", ref="message"),
            out("more", "boolean", "More messages exist in the paging direction."),
            out("last_seq", "integer", "Last sequence in the conversation."),
            RE,
        ),
        event(
            "synced",
            "Answer to `sync`.",
            out("conversations", "array", "One page per conversation.", ref="SyncPage"),
            out(
                "more",
                "boolean",
                "true when conversations asked for were left out (size budget): sync them again.",
                required=False,
            ),
            out("epoch", "string", "Store epoch."),
            RE,
        ),
        event(
            "conversations",
            "Answer to `conversations`.",
            out(
                "items",
                "array",
                "Conversations with last and read sequence.",
                ref="ConversationInfo",
            ),
            RE,
        ),
    ),
    errors=ERRORS,
    definitions=DEFINITIONS,
)
