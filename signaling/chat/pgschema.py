"""The PostgreSQL store's schema and its versioned migrations.

The tables mirror the SQLite store's (``signaling.chat.schema``) as they are after all its
migrations, with PostgreSQL types: a message's ``mid`` comes from a sequence (``BIGSERIAL``),
flags are booleans. ``schema_migrations`` lists the versions applied; ``migrate`` applies the
missing ones under an advisory lock, so servers that start together against one database
migrate it once. Everything lives in the connection's ``search_path`` schema (``public``
unless the URL says otherwise).
"""

from __future__ import annotations

import secrets
from typing import Final

import asyncpg

MIGRATIONS: Final[list[str]] = [
    # 1: the SQLite store's schema as of its migration 5.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        last_seq BIGINT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    CREATE TABLE messages (
        mid BIGSERIAL PRIMARY KEY,
        conversation TEXT NOT NULL,
        seq BIGINT NOT NULL,
        sender TEXT NOT NULL,
        name TEXT NOT NULL,
        cid TEXT NOT NULL,
        kind TEXT NOT NULL,
        text TEXT,
        ref BIGINT,
        ts BIGINT NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT false,
        meta TEXT,
        hidden_from TEXT
    );
    CREATE UNIQUE INDEX messages_seq ON messages (conversation, seq);
    CREATE UNIQUE INDEX messages_cid ON messages (conversation, sender, cid);
    CREATE INDEX messages_edits ON messages (conversation, ref) WHERE kind = 'edit';
    CREATE TABLE members (
        identity TEXT NOT NULL,
        conversation TEXT NOT NULL,
        PRIMARY KEY (identity, conversation)
    );
    CREATE TABLE read_marks (
        conversation TEXT NOT NULL,
        identity TEXT NOT NULL,
        seq BIGINT NOT NULL,
        PRIMARY KEY (conversation, identity)
    );
    CREATE TABLE identities (
        identity TEXT PRIMARY KEY,
        created_at BIGINT NOT NULL
    );
    CREATE TABLE devices (
        identity TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        PRIMARY KEY (identity, device)
    );
    CREATE TABLE groups (
        conversation TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE group_members (
        conversation TEXT NOT NULL,
        identity TEXT NOT NULL,
        joined_seq BIGINT NOT NULL,
        left_seq BIGINT,
        role TEXT NOT NULL,
        PRIMARY KEY (conversation, identity, joined_seq)
    );
    CREATE INDEX group_members_identity ON group_members (identity, conversation);
    CREATE TABLE conversation_settings (
        identity TEXT NOT NULL,
        conversation TEXT NOT NULL,
        muted BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (identity, conversation)
    );
    CREATE TABLE contacts (
        identity TEXT NOT NULL,
        contact TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (identity, contact)
    );
    CREATE TABLE contact_requests (
        requester TEXT NOT NULL,
        target TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        dismissed BOOLEAN NOT NULL DEFAULT false,
        PRIMARY KEY (requester, target)
    );
    CREATE INDEX contact_requests_target ON contact_requests (target, requester);
    CREATE TABLE blocks (
        identity TEXT NOT NULL,
        blocked TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (identity, blocked)
    );
    """,
]

# Any fixed number: held for the migration's transaction by every server starting at once.
MIGRATION_LOCK: Final = 0x7261_6C6C


async def migrate(conn: asyncpg.Connection) -> tuple[int, str]:
    """Apply the migrations ``schema_migrations`` does not list; returns the version and the
    store's epoch. Raises ``RuntimeError`` for a schema newer than this server."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        version = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        if version > len(MIGRATIONS):
            raise RuntimeError(
                f"the store has schema version {version}, newer than this server knows "
                f"({len(MIGRATIONS)}); upgrade rallypoint"
            )
        for i in range(version, len(MIGRATIONS)):
            await conn.execute(MIGRATIONS[i])
            if i == 0:
                await conn.execute("INSERT INTO meta VALUES ('epoch', $1)", secrets.token_hex(8))
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", i + 1)
        epoch = await conn.fetchval("SELECT value FROM meta WHERE key='epoch'")
    return len(MIGRATIONS), str(epoch)
