"""The chat store's two back ends for the contract suite and the end-to-end tests: SQLite in
a temporary directory, PostgreSQL in a schema of its own (``test_<random>``, dropped after).

PostgreSQL is the one at ``RALLYPOINT_TEST_PG`` (default: 127.0.0.1:5432, database ``test``,
trust auth; ``tests/run`` starts one if nothing answers there)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from signaling.chat.postgres import PostgresStore
from signaling.chat.sqlite import SqliteStore
from signaling.chat.store import NewMessage

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
        if conn.is_closed():  # PostgreSQL was restarted meanwhile (a drill)
            conn = await asyncpg.connect(url)
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


def _bin(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(f"{name} not found: install postgresql (tests/apt-packages.txt)")
    return found


class PrivatePostgres:
    """A PostgreSQL of this test's own, as the postgres user when run as root (PostgreSQL
    refuses to run as root)."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="rallypoint-pg-")
        self.data = os.path.join(self.dir, "data")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.user: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.user = ["runuser", "-u", "postgres", "--"]
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.user, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run(_bin("initdb"), "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.dir, "log")
        self._run(_bin("pg_ctl"), "-D", self.data, "-o", opts, "-l", log, "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        self._run(_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop("fast")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.dir, ignore_errors=True)


def msg(
    conv: str,
    cid: str,
    sender: str = "alice",
    text: str | None = "hi",
    kind: str = "text",
    ref: int | None = None,
    moderator: bool = False,
    window_ms: int = 60_000,
    members: tuple[str, ...] = (),
) -> NewMessage:
    """A message to append, as the chat handlers make one."""
    return NewMessage(
        conv, cid, sender, sender.title(), kind, text, ref, members, moderator, window_ms
    )
