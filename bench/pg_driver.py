"""Which PostgreSQL driver for the chat store: asyncpg or psycopg 3 (async, pipeline mode).

The pattern measured is the store's append: in one transaction, take the conversation's row
lock and its next sequence (``UPDATE conversations ... RETURNING last_seq``), then insert the
message (``INSERT ... ON CONFLICT DO NOTHING RETURNING mid``), then commit. ``single``: one
message per transaction, one writer at a time (the ack latency of a lone message);
``batched``: ``--batch`` messages per transaction (group commit, as the SQLite writer does),
with each driver's way of cutting round trips (asyncpg: one array statement for the batch;
psycopg: pipeline mode, the same statements, one round trip). Both drivers run in the same
process, in alternating rounds, against a schema of their own in ``--url``.

    .venv/bin/python bench/pg_driver.py --url postgresql://postgres@127.0.0.1/test

Prints a table and one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any

import asyncpg
import psycopg

SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, last_seq BIGINT NOT NULL);
CREATE TABLE messages (
    mid BIGSERIAL PRIMARY KEY, conversation TEXT NOT NULL, seq BIGINT NOT NULL,
    sender TEXT NOT NULL, cid TEXT NOT NULL, text TEXT, ts BIGINT NOT NULL);
CREATE UNIQUE INDEX messages_seq ON messages (conversation, seq);
CREATE UNIQUE INDEX messages_cid ON messages (conversation, sender, cid);
"""
NEXT = "UPDATE conversations SET last_seq = last_seq + $1 WHERE id = $2 RETURNING last_seq"
INSERT = (
    "INSERT INTO messages (conversation, seq, sender, cid, text, ts) "
    "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING RETURNING mid"
)
INSERT_MANY = (
    "INSERT INTO messages (conversation, seq, sender, cid, text, ts) "
    "SELECT $1, s, $2, c, $3, $4 FROM unnest($5::bigint[], $6::text[]) AS u(s, c) "
    "ON CONFLICT DO NOTHING RETURNING mid"
)
TEXT = "x" * 100


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000


async def run_asyncpg(url: str, schema: str, n: int, batch: int) -> dict[str, Any]:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        lat: list[float] = []
        t0 = time.perf_counter()
        i = 0
        while i < n:
            t = time.perf_counter()
            async with conn.transaction():
                last = await conn.fetchval(NEXT, batch, "c1")
                if batch == 1:
                    await conn.fetchval(INSERT, "c1", last, "s", f"a{i}", TEXT, 0)
                else:
                    seqs = list(range(last - batch + 1, last + 1))
                    cids = [f"a{i + k}" for k in range(batch)]
                    await conn.fetch(INSERT_MANY, "c1", "s", TEXT, 0, seqs, cids)
            lat.append(time.perf_counter() - t)
            i += batch
        dt = time.perf_counter() - t0
    finally:
        await conn.close()
    return {"msgs_per_s": n / dt, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


async def run_psycopg(url: str, schema: str, n: int, batch: int) -> dict[str, Any]:
    conn = await psycopg.AsyncConnection.connect(url, options=f"-c search_path={schema}")
    nxt = NEXT.replace("$1", "%s").replace("$2", "%s")
    ins = INSERT
    for k in range(6, 0, -1):
        ins = ins.replace(f"${k}", "%s")
    try:
        lat: list[float] = []
        t0 = time.perf_counter()
        i = 0
        while i < n:
            t = time.perf_counter()
            async with conn.transaction():
                if batch == 1:
                    cur = await conn.execute(nxt, (1, "c1"))
                    (last,) = await cur.fetchone()  # type: ignore[misc]
                    await conn.execute(ins, ("c1", last, "s", f"p{i}", TEXT, 0))
                else:
                    cur = await conn.execute(nxt, (batch, "c1"))
                    (last,) = await cur.fetchone()  # type: ignore[misc]
                    async with conn.pipeline():
                        for k in range(batch):
                            seq = last - batch + 1 + k
                            await conn.execute(ins, ("c1", seq, "s", f"p{i + k}", TEXT, 0))
            lat.append(time.perf_counter() - t)
            i += batch
        dt = time.perf_counter() - t0
    finally:
        await conn.close()
    return {"msgs_per_s": n / dt, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    admin = await asyncpg.connect(a.url)
    schema = "bench_" + secrets.token_hex(4)
    await admin.execute(f"CREATE SCHEMA {schema}; SET search_path={schema}; {SCHEMA}")
    await admin.execute(f"INSERT INTO {schema}.conversations VALUES ('c1', 0)")
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        for r in range(a.rounds):
            for mode, batch in (("single", 1), ("batched", a.batch)):
                for name, fn in (("asyncpg", run_asyncpg), ("psycopg", run_psycopg)):
                    await admin.execute(f"TRUNCATE {schema}.messages")
                    res = await fn(a.url, schema, a.messages, batch)
                    results.setdefault(f"{name} {mode}", []).append(res)
                    print(f"round {r} {name} {mode}: {res}", flush=True)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
    summary = {
        k: {m: sorted(x[m] for x in v)[len(v) // 2] for m in v[0]} for k, v in results.items()
    }
    print(f"{'variant':20} {'msgs/s':>10} {'p50 ms':>8} {'p99 ms':>8}   (median of rounds)")
    for k, v in summary.items():
        print(f"{k:20} {v['msgs_per_s']:10.0f} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f}")
    for mode in ("single", "batched"):
        ratio = summary[f"asyncpg {mode}"]["msgs_per_s"] / summary[f"psycopg {mode}"]["msgs_per_s"]
        summary[f"asyncpg_over_psycopg_{mode}"] = {"ratio": ratio}
        print(f"asyncpg / psycopg, {mode}: {ratio:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
