"""The SQLite store's schema and how to open it (shared by the server's reader and the writer
process)."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

MIGRATIONS: list[str] = [
    # 1: conversations, messages, direct-conversation members, read marks, store metadata.
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        last_seq INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE messages (
        mid INTEGER PRIMARY KEY,
        conversation TEXT NOT NULL,
        seq INTEGER NOT NULL,
        sender TEXT NOT NULL,
        name TEXT NOT NULL,
        cid TEXT NOT NULL,
        kind TEXT NOT NULL,
        text TEXT,
        ref INTEGER,
        ts INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
    );
    CREATE UNIQUE INDEX messages_seq ON messages (conversation, seq);
    CREATE UNIQUE INDEX messages_cid ON messages (conversation, sender, cid);
    CREATE TABLE members (
        identity TEXT NOT NULL,
        conversation TEXT NOT NULL,
        PRIMARY KEY (identity, conversation)
    ) WITHOUT ROWID;
    CREATE TABLE read_marks (
        conversation TEXT NOT NULL,
        identity TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (conversation, identity)
    ) WITHOUT ROWID;
    """,
    # 2: identities and their devices (last-seen), structured message metadata (call logs).
    """
    CREATE TABLE identities (
        identity TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE devices (
        identity TEXT NOT NULL,
        device TEXT NOT NULL,
        name TEXT NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (identity, device)
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN meta TEXT;
    """,
    # 3: a message's edits by (conversation, ref): a delete blanks them, and without this
    # index that read the whole conversation (~130 ms in a room of 500k messages, with every
    # chat write of the server waiting). Plain messages have no entry (partial index).
    """
    CREATE INDEX messages_edits ON messages (conversation, ref) WHERE kind = 'edit';
    """,
    # 4: groups and their members' windows (a member sees seq joined_seq..left_seq; a member
    # removed and added again has one row per window), per-identity conversation settings
    # (mute), and the time of a conversation's last message (the conversation list's order).
    # ``members`` now also lists the rooms an identity chatted in.
    """
    CREATE TABLE groups (
        conversation TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        created_by TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        deleted INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE group_members (
        conversation TEXT NOT NULL,
        identity TEXT NOT NULL,
        joined_seq INTEGER NOT NULL,
        left_seq INTEGER,
        role TEXT NOT NULL,
        PRIMARY KEY (conversation, identity, joined_seq)
    ) WITHOUT ROWID;
    CREATE INDEX group_members_identity ON group_members (identity, conversation);
    CREATE TABLE conversation_settings (
        identity TEXT NOT NULL,
        conversation TEXT NOT NULL,
        muted INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (identity, conversation)
    ) WITHOUT ROWID;
    ALTER TABLE conversations ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
    UPDATE conversations SET updated_at = COALESCE(
        (SELECT MAX(ts) FROM messages WHERE messages.conversation = conversations.id), created_at);
    """,
    # 5: contacts (a pair is stored both ways), contact requests (``dismissed``: the target
    # declined; the requester is not told), blocks, and the identity a message is withheld from
    # (a direct message from someone it blocks: stored for its sender alone).
    """
    CREATE TABLE contacts (
        identity TEXT NOT NULL,
        contact TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (identity, contact)
    ) WITHOUT ROWID;
    CREATE TABLE contact_requests (
        requester TEXT NOT NULL,
        target TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        dismissed INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (requester, target)
    ) WITHOUT ROWID;
    CREATE INDEX contact_requests_target ON contact_requests (target, requester);
    CREATE TABLE blocks (
        identity TEXT NOT NULL,
        blocked TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (identity, blocked)
    ) WITHOUT ROWID;
    ALTER TABLE messages ADD COLUMN hidden_from TEXT;
    """,
]


def connect(path: Path | str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout=5000")
    return db


def migrate(db: sqlite3.Connection) -> int:
    """Apply pending migrations (``PRAGMA user_version`` counts them); returns the version."""
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"the store has schema version {version}, newer than this server knows "
            f"({len(MIGRATIONS)}); upgrade rallypoint"
        )
    for i in range(version, len(MIGRATIONS)):
        db.execute("BEGIN IMMEDIATE")
        for stmt in MIGRATIONS[i].split(";"):
            if stmt.strip():
                db.execute(stmt)
        if i == 0:
            db.execute("INSERT INTO meta VALUES ('epoch', ?)", (secrets.token_hex(8),))
        db.execute(f"PRAGMA user_version={i + 1}")
        db.execute("COMMIT")
    return len(MIGRATIONS)
