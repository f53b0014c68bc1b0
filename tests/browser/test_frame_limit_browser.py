"""The web library (`web/rallypoint.js`, as the server serves it) refuses a message over the
server's frame limit before sending it, in Chromium: `request` rejects at once with
`frame_too_large` (the server would not read the frame, and its error could not name the
request: the request would wait out its whole timeout), `send` throws, and the connection goes
on working. The limit is the one `welcome` gave (20,000 bytes here, not the default 64 KiB)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp.test_utils import TestServer
from browser_harness import launch_chromium

from signaling.app import ENDPOINT

SCRIPT = """async () => {
  const {RallypointClient} = await import("/static/rallypoint.js");
  const client = new RallypointClient({identity: "big", name: "Big", requestTimeoutMs: 5000});
  await client.connect();
  await client.request({type: "join", room: "t"});
  const text = "é".repeat(12000);  // 24,000 bytes of UTF-8 in 12,000 characters
  const msg = {type: "send", conversation: "room:t", cid: "c1", text};
  const started = performance.now();
  let refused = null;
  try {
    await client.request(msg);
  } catch (err) {
    refused = {code: err.code, bytes: err.bytes, limit: err.limit, message: err.message};
  }
  const tookMs = performance.now() - started;
  let thrown = null;
  try {
    client.send(msg);
  } catch (err) {
    thrown = err.code;
  }
  const sent = await client.request(
    {type: "send", conversation: "room:t", cid: "c2", text: "fits"});
  return {refused, tookMs, thrown, sent: sent.type, state: client.state,
          limit: client.maxFrameBytes};
}"""


async def test_web_library_refuses_a_frame_over_the_limit_at_once(
    start_server: Callable[..., Awaitable[TestServer]],
) -> None:
    server = await start_server(limits__max_frame_bytes=20_000)
    async with launch_chromium() as browser:
        context = await browser.new_context()
        try:
            page = await context.new_page()
            page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
            await page.goto(f"http://127.0.0.1:{server.port}/")
            result = await page.evaluate(SCRIPT)
        finally:
            await context.close()
    print(result)
    assert result["limit"] == 20_000
    refused = result["refused"]
    assert refused is not None and refused["code"] == "frame_too_large", result
    assert refused["limit"] == 20_000 and refused["bytes"] > 24_000, result
    assert result["tookMs"] < 1000, result
    assert result["thrown"] == "frame_too_large", result
    assert result["sent"] == "sent" and result["state"] == "open", result
    assert server.app[ENDPOINT].frames_too_large == 0  # nothing too large was sent
