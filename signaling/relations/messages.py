"""The messages of contacts and blocks, and the privacy error codes."""

from __future__ import annotations

from typing import Final

from ..core.privacy import STATUSES
from ..wire.spec import IDENTITY_PATTERN, RE, Field, Messages, event, out, request

#: Relations in one `contacts` page at most (a page is also cut to `limits.max_reply_bytes`).
MAX_PAGE: Final = 500

ERRORS: Final[dict[str, str]] = {
    "blocked": "You block this identity: unblock it before you write to it, call it or ask it "
    "to be a contact. (Only ever about your own blocks: nobody learns that you block them.)",
    "not_contact": "Direct messages on this server are between contacts only "
    "(`privacy.dm_strangers` is off): the same answer whether the identity exists or not.",
    "no_such_request": "No contact request from this identity is waiting for your answer.",
    "too_many_requests": "You have `privacy.max_pending_requests` contact requests waiting for "
    "an answer; take some back (`contact_remove`) first.",
}

_IDENTITY = Field(
    "identity",
    "string",
    "The other identity (not yourself).",
    required=True,
    pattern=IDENTITY_PATTERN,
)

DEFINITIONS: Final[dict[str, dict[str, object]]] = {
    "Relation": {
        "type": "object",
        "required": ["identity", "status", "blocked"],
        "properties": {
            "identity": {"type": "string"},
            "status": {"enum": list(STATUSES)},
            "blocked": {"type": "boolean"},
        },
    },
}

MESSAGES: Final = Messages(
    client=(
        request(
            "contact_request",
            "Ask an identity to be a contact (token claim `contacts`); accepts its request if "
            "it asked first.",
            _IDENTITY,
        ),
        request("contact_accept", "Accept an identity's contact request.", _IDENTITY),
        request(
            "contact_decline",
            "Decline an identity's contact request (it is not told).",
            _IDENTITY,
        ),
        request(
            "contact_remove",
            "End a contact (both ways), or take back your own request.",
            _IDENTITY,
        ),
        request(
            "block",
            "Block an identity: no direct messages, calls, group adds or presence from it.",
            _IDENTITY,
        ),
        request("unblock", "Stop blocking an identity.", _IDENTITY),
        request(
            "contacts",
            "List your contacts, requests and blocks, a page at a time (sorted by identity).",
            Field(
                "after",
                "string",
                "Start after this identity (the last of the previous page).",
                pattern=IDENTITY_PATTERN,
            ),
            Field(
                "limit",
                "integer",
                f"Relations per page, 1-{MAX_PAGE} (default {MAX_PAGE}).",
                minimum=1,
                maximum=MAX_PAGE,
            ),
        ),
    ),
    server=(
        event(
            "relation",
            "Your relation with an identity changed (on another device of yours, by that "
            "identity, or by the app's backend).",
            out("identity", "string", "The other identity."),
            out(
                "status",
                "string",
                "contact | incoming | outgoing | none",
                enum=("contact", "incoming", "outgoing", "none"),
            ),
            out("blocked", "boolean", "You block it."),
        ),
        event(
            "contacts",
            "Answer to `contacts`: a page of everyone you have a relation with, sorted by "
            "identity.",
            out("relations", "array", "Your relations.", ref="Relation"),
            out("more", "boolean", "More follow: ask again with `after` = the last identity."),
            RE,
        ),
    ),
    errors=ERRORS,
    definitions=DEFINITIONS,
)
