"""The web client's chat send while the server's store refuses writes, in real Chromium: a
server on a private PostgreSQL that is stopped; ``Room.sendMessage`` gets ``store_unavailable``
(with ``retry_after_ms``), retries under the same ``cid`` and succeeds once PostgreSQL is
back; the message is stored once. The page's WebSocket goes through a transparent Playwright
relay that records the frames both ways (what the client sent, what the server answered)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import PageErrors, run_server
from playwright.async_api import Browser, WebSocketRoute
from stores import PrivatePostgres

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def until(cond: Any, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)


async def test_a_send_refused_by_the_store_is_retried_under_its_cid_until_it_is_back(
    web_browser: Browser, data_dir: Path, page_errors: PageErrors
) -> None:
    pg = PrivatePostgres()
    await asyncio.to_thread(pg.init)
    await asyncio.to_thread(pg.start)
    env = {"RALLYPOINT_STORE_URL": pg.url, "RALLYPOINT_SFU_ENABLED": "false"}
    try:
        async with run_server(data_dir / "pg-retry", env) as server:
            context = await web_browser.new_context()
            try:
                page = await context.new_page()
                page_errors.watch(page, "Ida")
                sent: list[dict[str, Any]] = []  # client -> server
                answers: list[dict[str, Any]] = []  # server -> client

                def relay(ws: WebSocketRoute) -> None:
                    upstream = ws.connect_to_server()

                    def up(m: str | bytes) -> None:
                        sent.append(json.loads(m))
                        upstream.send(m)

                    def down(m: str | bytes) -> None:
                        answers.append(json.loads(m))
                        ws.send(m)

                    ws.on_message(up)
                    upstream.on_message(down)

                await page.route_web_socket("**/ws", relay)
                await page.goto(server.base + "/")
                await page.evaluate(
                    """async () => {
                  const {RallypointClient, Room} = await import("/static/rallypoint.js");
                  const client = new RallypointClient({identity: "ida", name: "Ida"});
                  await client.connect();
                  const room = new Room(client, "ops");
                  await room.join();
                  await room.sendMessage("before");
                  globalThis.t = {client, room};
                }"""
                )
                await asyncio.to_thread(pg.stop)
                await page.evaluate(
                    """() => {
                  t.sending = t.room.sendMessage("during");
                  t.sending.catch(() => {});
                }"""
                )

                def sends() -> list[dict[str, Any]]:
                    return [m for m in sent if m["type"] == "send" and m["text"] == "during"]

                def refused() -> list[dict[str, Any]]:
                    ids = {m["id"] for m in sends()}
                    return [a for a in answers if a.get("re") in ids and a["type"] == "error"]

                await until(lambda: len(refused()) >= 1)  # the first attempt was refused
                assert {(a["code"], a["retry_after_ms"]) for a in refused()} == {
                    ("store_unavailable", 1000)
                }
                await asyncio.to_thread(pg.start)
                message = await page.evaluate(
                    """async () => {
                  const m = await t.sending;
                  const h = await t.client.request({type: "history", conversation: "room:ops"});
                  return {seq: m.seq, cid: m.cid, failed: m.failed, pending: m.pending,
                          stored: h.messages.map((s) => [s.seq, s.cid, s.text])};
                }"""
                )
                assert len(sends()) >= 2 and len({m["cid"] for m in sends()}) == 1
                cid = sends()[0]["cid"]
                assert (message["seq"], message["cid"]) == (2, cid)
                assert (message["failed"], message["pending"]) == (False, False)
                stored = message["stored"]  # [seq, cid, text]: "during" once, under its cid
                assert [(s[0], s[2]) for s in stored] == [(1, "before"), (2, "during")]
                assert stored[1][1] == cid
                await page.evaluate("() => t.client.close()")
            finally:
                await context.close()
    finally:
        await asyncio.to_thread(pg.remove)
