"""Real Chromium (Debian's /usr/bin/chromium) driven by Playwright: the browser test harness.

* ``launch_chromium(video_file=...)``: a browser whose camera plays a Y4M file (camera
  files are a command-line flag, so they need their own browser process).
* ``open_page(browser)``: a page on a secure origin (``http://localhost``, served by
  Playwright's router, no server), where ``getUserMedia`` is allowed.

Never run ``playwright install``: it downloads a browser, and there is no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    # Host candidates with real addresses instead of mDNS names (nothing resolves them here).
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)
PAGE_ORIGIN = "http://localhost"
BLANK_PAGE = "<!doctype html><html><head><title>rallypoint test</title></head><body></body></html>"


@contextlib.asynccontextmanager
async def launch_chromium(
    *, video_file: Path | None = None, extra_args: Sequence[str] = ()
) -> AsyncIterator[Browser]:
    """Launch headless Chromium; ``video_file`` (Y4M, C420) replaces the fake camera."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} missing: apt-get install chromium (see tests/apt-packages.txt)")
    args = [*CHROMIUM_ARGS, *extra_args]
    if video_file is not None:
        args.append(f"--use-file-for-fake-video-capture={video_file}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=args, timeout=20_000
        )
        try:
            yield browser
        finally:
            await browser.close()


async def wait_for(
    pred: Callable[[], Awaitable[bool]],
    timeout: float,
    what: str,
    seen: object = None,
    step: float = 0.25,
) -> None:
    """Poll ``pred`` every ``step`` s (bounded by ``timeout``); ``seen`` (a list the predicate
    fills, say) is shown on failure."""
    try:
        async with asyncio.timeout(timeout):
            while not await pred():
                await asyncio.sleep(step)
    except TimeoutError:
        suffix = "" if seen is None else f" (last seen: {seen})"
        raise AssertionError(f"timed out waiting for {what}{suffix}") from None


async def open_page(browser: Browser, html: str = BLANK_PAGE, path: str = "/") -> Page:
    """A new page (own context) showing ``html`` at ``http://localhost{path}``.

    Console errors and page errors are forwarded to the test output.
    """
    context = await browser.new_context()

    async def serve(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=html)

    await context.route(f"{PAGE_ORIGIN}/**", serve)
    page = await context.new_page()
    page.set_default_timeout(10_000)
    page.on("pageerror", lambda error: print(f"page error: {error}"))
    page.on("console", lambda msg: print(f"console {msg.type}: {msg.text}"))
    await page.goto(f"{PAGE_ORIGIN}{path}")
    return page


#: A minimal in-page client of the SFU (the protocol as PROTOCOL.md gives it, no library):
#: `rq(msg)` sends a request and resolves with its reply, subscriber offers are answered, and
#: `connect(url, name, room)` joins, `decoded()` counts the decoded video; a test adds its own
#: `start` (what it publishes).
SFU_CLIENT_JS = """
let ws, room, n = 0, answered = 0, pub, sub, errors = [];
const pending = {};
function rq(msg) {
  const id = "r" + (++n); msg.id = id; ws.send(JSON.stringify(msg));
  return new Promise((res, rej) => { pending[id] = {res, rej}; });
}
async function onOffer(m) {
  if (!sub) {
    sub = new RTCPeerConnection({bundlePolicy: "max-bundle"});
    sub.onicecandidate = (e) => {
      rq({type: "ice", room, target: "subscriber",
          ...(e.candidate ? {candidate: e.candidate.toJSON()} : {})})
        .catch((err) => errors.push(err));
    };
  }
  if (m.offer <= answered) return;
  answered = m.offer;
  await sub.setRemoteDescription({type: "offer", sdp: m.sdp});
  await sub.setLocalDescription(await sub.createAnswer());
  await rq({type: "subscribe_answer", room, sdp: sub.localDescription.sdp});
}
// Connect, say hello and join room `r`; subscriber offers are answered as they come.
async function connect(url, name, r) {
  room = r;
  ws = new WebSocket(url);
  await new Promise((ok) => { ws.onopen = ok; });
  ws.onmessage = (e) => {
    const m = JSON.parse(e.data);
    if (m.re && pending[m.re]) {
      const p = pending[m.re]; delete pending[m.re];
      m.type === "error" ? p.rej(m) : p.res(m);
    } else if (m.type === "subscribe_offer") {
      onOffer(m).catch((err) => errors.push(String(err)));
    }
  };
  await rq({type: "hello", v: 1, name, identity: name});
  await rq({type: "join", room});
}
// Video frames decoded so far, and the widest of them, over the subscriber connection.
async function decoded() {
  if (!sub) return {frames: 0, width: 0};
  let frames = 0, width = 0;
  (await sub.getStats()).forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") {
      frames += s.framesDecoded || 0; width = Math.max(width, s.frameWidth || 0);
    }
  });
  return {frames, width};
}
"""
