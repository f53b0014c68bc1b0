"""The chat store's two back ends for the contract suite and the end-to-end tests: SQLite in
a temporary directory, PostgreSQL in a schema of its own (``test_<random>``, dropped after).

PostgreSQL is the one at ``RALLYPOINT_TEST_PG`` (default: 127.0.0.1:5432, database ``test``,
trust auth; ``tests/run`` starts one if nothing answers there)."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from signaling.chat.postgres import PostgresStore
from signaling.chat.sqlite import SqliteStore

PG_URL = os.environ.get("RALLYPOINT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgres")

Store = SqliteStore | PostgresStore


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}search_path={schema}"


@contextlib.asynccontextmanager
async def pg_schema(url: str = PG_URL) -> AsyncIterator[str]:
    """A fresh schema; yields the URL of a connection that uses it."""
    name = "test_" + secrets.token_hex(6)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {name}")
        yield with_schema(url, name)
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await conn.close()


class Backend:
    """Makes stores on one storage (a file, or a schema): a second one reopens the first's."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None = None) -> None:
        self.kind = kind
        self.path = tmp_path / "chat.sqlite3"
        self.url = url

    def new(self) -> Store:
        if self.kind == "sqlite":
            return SqliteStore(self.path)
        assert self.url is not None
        return PostgresStore(self.url)

    @property
    def store_url(self) -> str:
        """The server's ``store.url`` for this storage."""
        return str(self.path) if self.url is None else self.url


@contextlib.asynccontextmanager
async def backend(kind: str, tmp_path: Path) -> AsyncIterator[Backend]:
    if kind == "sqlite":
        yield Backend(kind, tmp_path)
        return
    async with pg_schema() as url:
        yield Backend(kind, tmp_path, url)


async def query(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (plain SQL both back ends take) read straight from ``store``'s
    database, for tests that check what was (not) written."""
    if isinstance(store, SqliteStore):
        db = sqlite3.connect(store.path)
        try:
            return [tuple(r) for r in db.execute(sql).fetchall()]
        finally:
            db.close()
    conn = await asyncpg.connect(store.url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()
