"""The messages of chat (room chat, direct messages and groups) and their error codes."""

from __future__ import annotations

from typing import Final

from ..wire.spec import (
    CONVERSATION_PATTERN,
    GROUP_PATTERN,
    IDENTITY_PATTERN,
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
    "group_full": "The group would have more members than the server allows "
    "(`chat.max_group_members`).",
    "store_full": "The server's disk is full: the write (`send`, `edit`, `delete`, `read`) was "
    "not stored. Retryable: retry after `retry_after_ms` (a `send` with the same `cid`).",
    "store_unavailable": "The chat store (PostgreSQL) cannot be reached, or the connection "
    "failed during the write: nothing is acknowledged that was not committed. Retryable: retry "
    "after `retry_after_ms` with the same `cid` (stored once, whether or not the first attempt "
    "was).",
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
_GROUP = Field(
    "conversation",
    "string",
    "The group's conversation id (`group:<id>`).",
    required=True,
    pattern=GROUP_PATTERN,
)
_CHANGE_CID = Field(
    "cid",
    "string",
    "Client-generated id of this change; a retry with the same cid changes nothing and gets "
    "the same answer (`duplicate`).",
    required=True,
    pattern=TOKEN_PATTERN,
)
_GROUP_NAME = Field("name", "string", "The group's name, 1-64 characters.", required=True)


def _identities(doc: str) -> Field:
    return Field(
        "identities",
        "array",
        doc,
        required=True,
        items="string",
        max_items=1000,
        item_pattern=IDENTITY_PATTERN,
    )


_TEXT = Field(
    "text",
    "string",
    "Message text (1 to `limits.max_text_chars` characters).",
    required=True,
    min_length=1,
)
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
        "required": [
            "conversation",
            "kind",
            "last_seq",
            "read_seq",
            "unread",
            "muted",
            "updated_at",
        ],
        "properties": {
            "conversation": {"type": "string"},
            "kind": {"enum": ["dm", "group", "room"]},
            "last_seq": {
                "type": "integer",
                "description": "The last sequence this identity sees (a former group member: "
                "the event that took it out).",
            },
            "read_seq": {"type": "integer", "description": "This identity's read watermark."},
            "unread": {
                "type": "integer",
                "description": "Messages of others (texts and call logs, not deleted) after "
                "the read watermark.",
            },
            "muted": {"type": "boolean"},
            "updated_at": {"type": "integer", "description": "Time of `last_seq`, ms."},
            "name": {"type": "string", "description": "Groups: the group's name."},
            "role": {
                "enum": ["owner", "admin", "member"],
                "description": "Groups: this identity's role; absent once it left the group.",
            },
            "last_message": {
                "$ref": "#/$defs/server/message",
                "description": "The newest text, call log or group change not deleted, as last "
                "edited. Absent when there is none.",
            },
        },
    },
    "GroupMember": {
        "type": "object",
        "required": ["identity", "role"],
        "properties": {
            "identity": {"type": "string"},
            "role": {"enum": ["owner", "admin", "member"]},
        },
    },
    "GroupEvent": {
        "type": "object",
        "required": ["action", "by"],
        "properties": {
            "action": {
                "enum": ["created", "renamed", "added", "removed", "left", "role", "deleted"]
            },
            "by": {
                "type": "string",
                "description": "Who made the change: an identity, or `system:api` (the app's "
                "backend).",
            },
            "identities": {
                "type": "array",
                "items": {"type": "string"},
                "description": "created: every member, the owner first; added, removed, "
                "left, role: whom it is about.",
            },
            "name": {"type": "string", "description": "created, renamed: the name."},
            "role": {"enum": ["owner", "admin", "member"], "description": "role: the new role."},
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
            "conversations",
            "List this identity's conversations, newest first; answered with `conversations`.",
            Field("limit", "integer", "Page size (default 50).", minimum=1, maximum=200),
            Field(
                "cursor",
                "string",
                "Where the page starts: `cursor` of the previous answer.",
                max_length=300,
            ),
        ),
        request(
            "conversation_mute",
            "Mute or unmute a conversation for this identity (no pushes but mentions); "
            "answered with `ok`, and the identity's other devices get `conversation_muted`.",
            _CONV,
            Field("muted", "boolean", "Muted.", required=True),
        ),
        request(
            "group_create",
            "Create a group with this identity as its owner (needs the token's `groups` "
            "claim); answered with `group`. The group's id is derived from the identity and "
            "`cid`, so a retry creates nothing new.",
            _CHANGE_CID,
            _GROUP_NAME,
            _identities("The other members (may be empty)."),
        ),
        request(
            "group_rename",
            "Rename a group (owner, admin); answered with `group`.",
            _GROUP,
            _CHANGE_CID,
            _GROUP_NAME,
        ),
        request(
            "group_add",
            "Add members (owner, admin); answered with `group`.",
            _GROUP,
            _CHANGE_CID,
            _identities("Who to add."),
        ),
        request(
            "group_remove",
            "Remove members (owner: anyone; admin: members); answered with `group`.",
            _GROUP,
            _CHANGE_CID,
            _identities("Who to remove."),
        ),
        request(
            "group_leave",
            "Leave a group (an owner hands it over first, unless alone in it); answered with "
            "`group`.",
            _GROUP,
            _CHANGE_CID,
        ),
        request(
            "group_role",
            "Set a member's role (owner only); role `owner` hands the group over and makes "
            "the old owner an admin. Answered with `group`.",
            _GROUP,
            _CHANGE_CID,
            Field(
                "identity",
                "string",
                "The member.",
                required=True,
                pattern=IDENTITY_PATTERN,
            ),
            Field(
                "role",
                "string",
                "The new role.",
                required=True,
                enum=("owner", "admin", "member"),
            ),
        ),
        request(
            "group_delete",
            "Delete a group (owner only): every member is taken out; answered with `group`.",
            _GROUP,
            _CHANGE_CID,
        ),
        request(
            "group_info",
            "A group's name and members (members only); answered with `group`.",
            _GROUP,
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
            out(
                "group",
                "object",
                "For a group change (kind `system` in a group): what changed.",
                required=False,
                ref="GroupEvent",
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
            out(
                "unread",
                "integer",
                "Only to the reader's own devices: its unread count in the conversation now.",
                required=False,
            ),
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
                "Conversations, newest first.",
                ref="ConversationInfo",
            ),
            out("more", "boolean", "More conversations follow: ask again with `cursor`."),
            out(
                "cursor",
                "string",
                "With `more`: the `cursor` of the next page.",
                required=False,
            ),
            RE,
        ),
        event(
            "conversation_muted",
            "To the identity's other devices: a conversation was muted or unmuted.",
            out("conversation", "string", "Conversation id."),
            out("muted", "boolean", "Muted."),
        ),
        event(
            "group",
            "Answer to a group request: the group as it is now.",
            out("conversation", "string", "The group's conversation id."),
            out("name", "string", "Its name."),
            out("created_by", "string", "Who created it (an identity, or `system:api`)."),
            out(
                "members",
                "array",
                "Current members (none once deleted, and none in the answer to a former "
                "member's retry: it gets the name as of its change, nothing later).",
                ref="GroupMember",
            ),
            out(
                "message",
                "object",
                "For a change: its event, as stored (the `message` every member's devices "
                "get, this one's included).",
                required=False,
                ref="message",
            ),
            out(
                "duplicate",
                "boolean",
                "For a change: true if this `cid` was done before (nothing changed now).",
                required=False,
            ),
            RE,
        ),
    ),
    errors=ERRORS,
    definitions=DEFINITIONS,
)
