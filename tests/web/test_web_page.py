"""The bundled web page in real headless Chromium against a real server and SFU.

Three people join one room by link (Alice on a laptop-sized window, Bob, and Carol on a
phone-sized one) and stay in the call for the module; the tests run in order on that call:
media, chat, mute/camera/screen share, a network blip, room full, leave, lock and kick. Then
error screens: no camera, server unreachable, token links. Controls are found by their
accessible role and name, so the names are tested too.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
import yarl
from conftest import ARTIFACTS, REPO, PageErrors, WebServer, run_server
from playwright.async_api import Browser, BrowserContext, Page, WebSocketRoute, expect

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOM = "standup"
WAIT_MS = 15_000
# Assertions wait as long as page actions: three browsers sending video can starve a 2-core
# runner for more than Playwright's default 5 s.
expect.set_options(timeout=WAIT_MS)


@dataclass
class Person:
    name: str
    page: Page
    context: BrowserContext


@dataclass
class Call:
    people: dict[str, Person]
    errors: PageErrors

    def __getitem__(self, name: str) -> Page:
        return self.people[name].page


async def open_person(
    browser: Browser,
    server: WebServer,
    errors: PageErrors,
    name: str,
    *,
    room: str = ROOM,
    phone: bool = False,
    query: str = "",
) -> Person:
    size = {"width": 390, "height": 844} if phone else {"width": 1280, "height": 720}
    context = await browser.new_context(viewport=size, has_touch=phone)
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors.watch(page, name)
    await page.goto(f"{server.base}/room/{room}?{query or f'name={name}&autojoin=1'}")
    return Person(name, page, context)


NO_VIDEO = re.compile(r"\bno-video\b")


def tile(page: Page, name: str) -> Any:
    return page.get_by_role("figure", name=name, exact=True)


def mic_off(page: Page, name: str) -> Any:
    """The muted-microphone indicator of ``name``'s tile."""
    return tile(page, name).get_by_role("img", name="Microphone muted")


def notices(page: Page, text: str) -> Any:
    """The pop-up notices (joins, leaves, problems)."""
    return page.locator("#notices").get_by_text(text)


# From now on, keep the text of every notice the page shows in `window.notices_shown` (a
# notice disappears after a few seconds).
RECORD_NOTICES = """() => {
  window.notices_shown = [];
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) window.notices_shown.push(n.textContent);
  }).observe(document.getElementById("notices"), { childList: true });
}"""


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def call(web_browser: Browser, web_server: WebServer) -> AsyncIterator[Call]:
    errors = PageErrors()
    people: dict[str, Person] = {}
    # One after the other, so that Alice is the first joiner (the room's moderator).
    for name, phone in (("Alice", False), ("Bob", False), ("Carol", True)):
        people[name] = await open_person(web_browser, web_server, errors, name, phone=phone)
        await expect(tile(people[name].page, f"{name} (you)")).to_be_visible()
        await expect(people[name].page.get_by_role("button", name="Leave")).to_be_visible()
        # In, with the camera open and published (autojoin opens it after joining).
        await expect(people[name].page.get_by_role("button", name="Stop camera")).to_be_enabled()
        await people[name].page.wait_for_function(
            "window.rallypoint.room.publisher?.connectionState === 'connected'"
        )
    yield Call(people, errors)
    for person in people.values():
        await person.context.close()


@pytest.fixture(autouse=True)
def no_errors_in_the_call(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "call" in request.fixturenames:
        call: Call = request.getfixturevalue("call")
        assert call.errors.unexpected() == [], "errors in the call's pages"
        call.errors.errors.clear()


# -- media helpers ------------------------------------------------------------------------------

VIDEO_STATE = """v => ({width: v.videoWidth, time: v.currentTime,
    frames: v.getVideoPlaybackQuality().totalVideoFrames, paused: v.paused})"""

MEDIA_STATE = """async () => {
  const r = window.rallypoint.room;
  const inbound = [];
  for (const s of (await r.subscriber.getStats()).values()) {
    if (s.type === "inbound-rtp") inbound.push({mid: s.mid, kind: s.kind,
      decoded: s.framesDecoded, keyframes: s.keyFramesDecoded, pli: s.pliCount, nack: s.nackCount,
      lost: s.packetsLost, received: s.packetsReceived, dropped: s.framesDropped,
      freezes: s.freezeCount, w: s.frameWidth});
  }
  return {inbound, remote: [...r.remote.values()].map(x => [x.info.id, x.info.kind,
            x.transceiver.mid, x.track.readyState, x.track.muted]),
          tiles: [...document.querySelectorAll("figure")].map(f => [f.getAttribute("aria-label"),
            f.className, String(f.querySelector("video").srcObject?.getTracks().map(t => t.id))]),
          sub: r.subscriber?.connectionState, pub: r.publisher?.connectionState};
}"""

AUDIO_STATS = """async () => {
  const room = window.rallypoint.room;
  const out = {};
  if (!room.subscriber) return out;
  const byMid = new Map([...room.remote.values()].map(r => [r.transceiver.mid, r.info]));
  for (const r of (await room.subscriber.getStats()).values()) {
    if (r.type !== "inbound-rtp" || r.kind !== "audio") continue;
    const info = byMid.get(r.mid);
    if (!info) continue;
    const name = room.participant(info.participant)?.name;
    out[name] = {packets: r.packetsReceived || 0, samples: r.totalSamplesReceived || 0};
  }
  return out;
}"""


async def video_state(page: Page, name: str) -> dict[str, Any]:
    state: dict[str, Any] = await tile(page, name).locator("video").evaluate(VIDEO_STATE)
    return state


async def wait_video_playing(page: Page, name: str, timeout: float = 15) -> dict[str, Any]:
    """The tile's <video> shows frames (width > 0) and keeps advancing."""
    deadline = time.monotonic() + timeout
    first = await video_state(page, name)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await video_state(page, name)
        if (
            now["width"] > 0
            and now["frames"] > first["frames"]
            and now["time"] > first["time"]
            and not now["paused"]
        ):
            return now
        if now["width"] == 0:
            first = now
    state = await video_state(page, name)
    media = await page.evaluate(MEDIA_STATE)
    raise AssertionError(f"{name}'s video does not play: {state}; media: {media}")


async def wait_audio_flowing(page: Page, names: list[str], timeout: float = 15) -> None:
    """Inbound RTP audio from each of ``names`` grows (packets and decoded samples)."""
    deadline = time.monotonic() + timeout
    first = await page.evaluate(AUDIO_STATS)
    now: dict[str, Any] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await page.evaluate(AUDIO_STATS)
        if all(
            n in now
            and n in first
            and now[n]["packets"] > first[n]["packets"]
            and now[n]["samples"] > first[n]["samples"]
            for n in names
        ):
            return
        first = {**now, **{n: first[n] for n in first if n in now}}
    raise AssertionError(f"audio does not arrive from {names}: {now}")


# -- the call ---------------------------------------------------------------------------------


async def test_three_people_see_and_hear_each_other(call: Call) -> None:
    names = list(call.people)
    for me in names:
        page = call[me]
        others = [n for n in names if n != me]
        # Two remote tiles (plus our own preview), each labelled with the display name.
        await expect(page.locator("figure.tile:not(.local)")).to_have_count(2)
        for other in others:
            await expect(tile(page, other)).to_be_visible()
            await wait_video_playing(page, other)
            # Connection quality is measured (from getStats) once media flows.
            quality = tile(page, other).get_by_role("img", name=re.compile(r"^Connection "))
            await expect(quality).not_to_have_attribute("aria-label", "Connection quality unknown")
        await wait_audio_flowing(page, others)
        await expect(page.locator("#people > li")).to_have_count(3)
        # The camera (the fake one: 640x480) goes out as two simulcast layers, and the others'
        # video above came through the SFU's layer switching.
        rids = await page.evaluate(
            "window.rallypoint.room.local.get('camera').transceiver.sender.getParameters()"
            ".encodings.map((e) => e.rid)"
        )
        assert rids == ["h", "f"]
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "three-person-call.png"
    await call["Alice"].screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    await call["Carol"].screenshot(path=str(ARTIFACTS / "three-person-call-phone.png"))


async def messages(page: Page) -> list[str]:
    return await page.locator("#messages .text").all_inner_texts()


async def send(page: Page, text: str) -> None:
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_role("button", name="Send", exact=True).click()


async def test_chat_in_order_with_typing_unread_and_history(call: Call) -> None:
    alice, bob, carol = call["Alice"], call["Bob"], call["Carol"]
    # Carol is on a phone: the chat panel starts closed.
    await expect(carol.get_by_role("button", name="Open chat")).to_be_visible()

    await alice.get_by_label("Message", exact=True).fill("typing...")
    await expect(bob.locator("#typing")).to_have_text("Alice is typing…")
    texts = ["first from Alice", "second from Alice", "third from Alice"]
    for text in texts:
        await send(alice, text)
    await expect(bob.locator("#messages .text")).to_have_count(3)
    await send(bob, "then Bob")
    expected = [*texts, "then Bob"]
    await expect(bob.locator("#typing")).to_have_text("")
    for page in (alice, bob):
        await expect(page.locator("#messages .text")).to_have_text(expected)
    # Closed chat: an unread count, cleared when the chat is opened.
    await expect(carol.get_by_role("button", name="Open chat (4 unread)")).to_be_visible()
    await carol.get_by_role("button", name="Open chat (4 unread)").click()
    await expect(carol.locator("#messages .text")).to_have_text(expected)
    await carol.get_by_role("button", name="Close chat").click()
    await expect(carol.get_by_role("button", name="Open chat")).to_be_visible()
    # Authors: our own messages say "You".
    await expect(alice.locator("#messages li.mine")).to_have_count(3)

    # A reload rejoins by the same link and shows the history.
    await carol.reload()
    await expect(tile(carol, "Carol (you)")).to_be_visible()
    await carol.get_by_role("button", name="Open chat").click()
    await expect(carol.locator("#messages .text")).to_have_text(expected)
    for page in (alice, bob):
        await wait_video_playing(page, "Carol")
    await wait_video_playing(carol, "Alice")
    await wait_video_playing(carol, "Bob")
    await carol.get_by_role("button", name="Close chat").click()


async def test_mute_camera_and_screen_share(call: Call) -> None:
    alice, bob, carol = call["Alice"], call["Bob"], call["Carol"]
    for page in (bob, carol):
        await expect(mic_off(page, "Alice")).to_be_hidden()

    await alice.get_by_role("button", name="Mute microphone").click()
    await expect(alice.get_by_role("button", name="Unmute microphone")).to_be_visible()
    for page in (bob, carol):
        await expect(mic_off(page, "Alice")).to_be_visible()
    assert await alice.evaluate("!window.rallypoint.local.microphone.enabled")
    await alice.get_by_role("button", name="Unmute microphone").click()
    await expect(alice.get_by_role("button", name="Mute microphone")).to_be_visible()
    for page in (bob, carol):
        await expect(mic_off(page, "Alice")).to_be_hidden()

    # Camera off: the others see Alice's initial instead of video; on again: video plays.
    await alice.get_by_role("button", name="Stop camera").click()
    await expect(alice.get_by_role("button", name="Start camera")).to_be_visible()
    for page in (bob, carol):
        await expect(tile(page, "Alice")).to_have_class(NO_VIDEO)
    assert await alice.evaluate("window.rallypoint.local.camera === null")
    await alice.get_by_role("button", name="Start camera").click()
    await expect(alice.get_by_role("button", name="Stop camera")).to_be_visible()
    for page in (bob, carol):
        await expect(tile(page, "Alice")).not_to_have_class(NO_VIDEO)
        await wait_video_playing(page, "Alice")

    # Screen share: an extra tile for everyone, gone when sharing stops.
    await bob.get_by_role("button", name="Share screen").click()
    await expect(bob.get_by_role("button", name="Stop sharing")).to_be_visible()
    for page in (alice, carol):
        await expect(tile(page, "Bob (screen)")).to_be_visible()
        await wait_video_playing(page, "Bob (screen)")
        await expect(page.locator("figure.tile:not(.local)")).to_have_count(3)
    await bob.get_by_role("button", name="Stop sharing").click()
    await expect(bob.get_by_role("button", name="Share screen")).to_be_visible()
    for page in (alice, carol):
        await expect(tile(page, "Bob (screen)")).to_have_count(0)
        await expect(page.locator("figure.tile:not(.local)")).to_have_count(2)


async def test_network_blip_reconnects_and_resumes(call: Call) -> None:
    bob = call.people["Bob"]
    others = (call["Alice"], call["Carol"])
    for page in others:
        await page.evaluate(RECORD_NOTICES)
    session = await bob.page.evaluate("window.rallypoint.client.session")
    await bob.context.set_offline(True)
    await expect(bob.page.get_by_role("status").filter(has_text="Reconnecting")).to_be_visible()
    await asyncio.sleep(1)
    await bob.context.set_offline(False)
    await expect(bob.page.get_by_role("status").filter(has_text="Reconnected")).to_be_visible()
    # The same session: nobody saw Bob leave, and his tile never went away.
    assert await bob.page.evaluate("window.rallypoint.client.session") == session
    assert await bob.page.evaluate("window.rallypoint.client.welcome.resumed")
    # Chat works again, both ways. Bob's message is also the barrier for the others: the server
    # sent it after anything it told them about Bob's blip, and a page handles its messages in
    # order, so once they show it, they have shown any notice about Bob.
    await send(bob.page, "back after the blip")
    for page in others:
        await expect(page.locator("#messages .text").last).to_have_text("back after the blip")
    for page in others:
        shown = await page.evaluate("window.notices_shown")
        assert [n for n in shown if n.startswith("Bob")] == [], "they saw Bob leave or join"
        await wait_video_playing(page, "Bob")
    await send(call["Alice"], "welcome back")
    await expect(bob.page.locator("#messages .text").last).to_have_text("welcome back")
    await wait_video_playing(bob.page, "Alice")


async def test_fourth_person_gets_room_full(
    call: Call, web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    dave = await open_person(web_browser, web_server, page_errors, "Dave")
    await expect(dave.page.get_by_role("heading", name="This room is full")).to_be_visible()
    await expect(dave.page.get_by_role("alert")).to_contain_text("Try again later")
    await dave.context.close()


async def test_leaving_removes_the_tile(call: Call) -> None:
    carol = call["Carol"]
    await carol.get_by_role("button", name="Leave").click()
    await expect(carol.get_by_role("heading", name="You left the call")).to_be_visible()
    started = time.monotonic()
    for page in (call["Alice"], call["Bob"]):
        await expect(tile(page, "Carol")).to_have_count(0, timeout=5000)
        await expect(notices(page, "Carol left").last).to_be_visible()
    assert time.monotonic() - started < 5


async def test_recording_is_shown_to_everyone(call: Call) -> None:
    alice, bob, carol = call["Alice"], call["Bob"], call["Carol"]  # Carol has left the call
    await expect(bob.get_by_role("button", name="Record", exact=True)).to_be_hidden()
    await alice.get_by_role("button", name="Record", exact=True).click()
    for page in (alice, bob):
        indicator = page.locator("#recording-indicator")
        await expect(indicator).to_have_text("Recording (started by Alice)")
    await expect(notices(bob, "Alice started recording this call")).to_be_visible()
    # Someone who joins while it runs is shown it at once.
    await carol.get_by_role("link", name="Join again").click()
    await carol.get_by_role("button", name="Join call").click()
    await expect(tile(carol, "Carol (you)")).to_be_visible()
    indicator = carol.locator("#recording-indicator")
    await expect(indicator).to_have_text("Recording (started by Alice)")
    await alice.get_by_role("button", name="Stop recording").click()
    for page in (alice, bob, carol):
        await expect(page.locator("#recording-indicator")).to_be_hidden()
    await expect(notices(bob, "Recording stopped")).to_be_visible()
    await expect(alice.get_by_role("button", name="Record", exact=True)).to_be_visible()
    await carol.get_by_role("button", name="Leave").click()
    await expect(carol.get_by_role("heading", name="You left the call")).to_be_visible()


async def test_lock_and_remove(
    call: Call, web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    alice, bob = call["Alice"], call["Bob"]
    # Alice joined first: she moderates. Bob does not see moderator controls.
    await expect(bob.get_by_role("button", name="Lock room")).to_be_hidden()
    await alice.get_by_role("button", name="Lock room").click()
    await expect(alice.get_by_role("button", name="Unlock room")).to_be_visible()
    await expect(notices(bob, "The room is now locked")).to_be_visible()
    erin = await open_person(web_browser, web_server, page_errors, "Erin")
    await expect(erin.page.get_by_role("heading", name="This room is locked")).to_be_visible()
    await erin.context.close()
    await alice.get_by_role("button", name="Unlock room").click()
    await expect(alice.get_by_role("button", name="Lock room")).to_be_visible()

    await alice.get_by_role("button", name="Remove Bob").click()
    await expect(bob.get_by_role("heading", name="You were removed from the call")).to_be_visible()
    await expect(tile(alice, "Bob")).to_have_count(0)
    await expect(notices(alice, "Bob was removed")).to_be_visible()


# -- joining fast ---------------------------------------------------------------------------------

# When the camera was asked for, and when a remote tile's <video> had its first frame.
MEDIA_ORDER = """window.__order = {};
const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
navigator.mediaDevices.getUserMedia = (c) => {
  window.__order.camera ??= performance.now();
  return gum(c);
};
document.addEventListener("loadeddata", (ev) => {
  if (ev.target.localName === "video" && !ev.target.closest("figure.local")) {
    window.__order.remoteVideo ??= performance.now();
  }
}, true);"""


async def test_autojoin_opens_the_camera_once_the_others_video_shows(
    web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    people = []
    for name in ("Gina", "Hank"):
        context = await web_browser.new_context()
        await context.add_init_script(MEDIA_ORDER)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        page_errors.watch(page, name)
        await page.goto(f"{web_server.base}/room/fast?name={name}&autojoin=1")
        await expect(tile(page, f"{name} (you)")).not_to_have_class(NO_VIDEO)
        people.append((name, page, context))
    (_, gina, _), (_, hank, _) = people
    await wait_video_playing(gina, "Hank")
    gina_order = await gina.evaluate("window.__order")
    hank_order = await hank.evaluate("window.__order")
    # Alone in the room, Gina opened her camera at once (before anyone's video existed).
    assert gina_order["camera"] < gina_order["remoteVideo"], gina_order
    # Hank saw Gina's video first, then opened his camera, which Gina now receives.
    assert hank_order["remoteVideo"] <= hank_order["camera"], hank_order
    for _, _, context in people:
        await context.close()


# -- errors in plain words ----------------------------------------------------------------------

DENY_MEDIA = """navigator.mediaDevices.getUserMedia = () =>
  Promise.reject(new DOMException("Permission denied", "NotAllowedError"));"""


async def test_camera_denied_joins_without_media(
    web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    context = await web_browser.new_context()
    await context.add_init_script(DENY_MEDIA)
    page = await context.new_page()
    page_errors.watch(page, "Frank")
    # The join screen: no preview, the reason, and joining still works.
    await page.goto(f"{web_server.base}/room/quiet?name=Frank")
    await expect(page.get_by_role("heading", name="Join quiet")).to_be_visible()
    await expect(page.get_by_role("status")).to_contain_text("Camera and microphone are blocked")
    await expect(page.locator("#lobby").get_by_label("Your name")).to_have_value("Frank")
    await page.get_by_role("button", name="Join call").click()
    await expect(tile(page, "Frank (you)")).to_be_visible()
    await expect(mic_off(page, "Frank (you)")).to_be_visible()
    await expect(notices(page, "Camera and microphone are blocked")).to_be_visible()
    await send(page, "I can still chat")
    await expect(page.locator("#messages li").last).not_to_contain_text("Sending")
    await context.close()


async def test_server_unreachable_then_joins(
    web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    context = await web_browser.new_context()
    page = await context.new_page()
    page_errors.watch(page, "Gus")
    refused = 0
    server_up = False

    async def route(ws: WebSocketRoute) -> None:
        # While "down", every WebSocket to the server fails as if nothing answered.
        nonlocal refused
        if server_up:
            ws.connect_to_server()
        else:
            refused += 1
            await ws.close(code=1011, reason="unreachable")

    await page.route_web_socket("**/ws", route)
    await page.goto(f"{web_server.base}/room/lonely?name=Gus&autojoin=1")
    await expect(page.locator("#connection-status")).to_contain_text("Cannot reach the server")
    assert refused >= 1
    server_up = True
    await expect(tile(page, "Gus (you)")).to_be_visible()
    await expect(page.locator("#connection-status")).not_to_contain_text("Cannot reach")
    await context.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def token_server(data_dir: Path) -> AsyncIterator[WebServer]:
    env = {
        "RALLYPOINT_AUTH_API_KEY": "web-test",
        "RALLYPOINT_AUTH_API_SECRET": "s" * 40,
        "RALLYPOINT_SFU_ENABLED": "false",
    }
    async with run_server(data_dir / "tokens", env) as server:
        yield server


def token(exp_in_s: int, name: str = "Hana") -> str:
    now = int(time.time())
    claims = {
        "iss": "web-test",
        "sub": name.lower(),
        "name": name,
        "iat": now - 120,
        "exp": now + exp_in_s,
        "rooms": {"team": ["join", "chat", "publish", "subscribe"]},
    }
    return jwt.encode(claims, "s" * 40, algorithm="HS256")


async def test_token_links(
    web_browser: Browser, token_server: WebServer, page_errors: PageErrors
) -> None:
    context = await web_browser.new_context()
    page = await context.new_page()
    page_errors.watch(page, "Hana")
    await page.goto(f"{token_server.base}/room/team?token={token(-60)}&autojoin=1")
    await expect(page.get_by_role("heading", name="Your link has expired")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("Ask for a new invitation link")

    # A good link: the name comes from the token; this server has media off, chat works.
    await page.goto(f"{token_server.base}/room/team?token={token(600)}")
    await expect(page.locator("#lobby").get_by_label("Your name")).to_be_hidden()
    await page.get_by_role("button", name="Join call").click()
    await expect(tile(page, "Hana (you)")).to_be_visible()
    await expect(notices(page, "Audio and video are not available")).to_be_visible()
    await send(page, "hello with a token")
    await expect(page.locator("#messages li").last).not_to_contain_text("Sending")

    await page.goto(f"{token_server.base}/room/elsewhere?token={token(600)}&autojoin=1")
    await expect(page.get_by_role("heading", name="This link is for another room")).to_be_visible()
    await context.close()


async def test_start_page_leads_to_the_join_screen(
    web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    context = await web_browser.new_context()
    page = await context.new_page()
    page_errors.watch(page, "Ida")
    await page.goto(web_server.base + "/")
    await page.get_by_label("Room").fill("book-club")
    await page.locator("#home").get_by_label("Your name").fill("Ida")
    await page.get_by_role("button", name="Continue").click()
    await expect(page).to_have_url(f"{web_server.base}/room/book-club")
    await expect(page.get_by_role("heading", name="Join book-club")).to_be_visible()
    await expect(page.locator("#lobby").get_by_label("Your name")).to_have_value("Ida")
    await expect(page.get_by_label("Camera", exact=True)).not_to_have_value("")
    await expect(page.get_by_label("Microphone", exact=True)).not_to_have_value("")
    await page.goto(web_server.base + "/room/not%20a%20room")
    await expect(page.get_by_role("alert")).to_contain_text("is not a valid room name")
    await context.close()


async def test_readme_shows_a_screenshot() -> None:
    """docs/screenshot.png (a copy of test-artifacts/three-person-call.png) is in the README."""
    shot = REPO / "docs" / "screenshot.png"
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert "(docs/screenshot.png)" in (REPO / "README.md").read_text()


# -- the files and the library ------------------------------------------------------------------

CLIENT_JS = REPO / "web" / "rallypoint.js"


async def test_routes_serve_the_page_and_its_files(web_server: WebServer) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/room/standup"):
            async with http.get(web_server.base + path) as r:
                assert r.status == 200 and r.content_type == "text/html"
                assert '<script type="module" src="/static/app.js">' in await r.text()
                assert r.headers["Cache-Control"] == "no-cache"
        async with http.get(web_server.base + "/static/rallypoint.js") as r:
            assert r.status == 200 and "javascript" in r.content_type
            assert r.headers["Cache-Control"] == "no-cache" and r.headers["Last-Modified"]
            last_modified = r.headers["Last-Modified"]
        async with http.get(
            web_server.base + "/static/rallypoint.js", headers={"If-Modified-Since": last_modified}
        ) as r:
            assert r.status == 304
        for path in ("/static/../pyproject.toml", "/static/%2e%2e/pyproject.toml", "/static/x.js"):
            async with http.get(yarl.URL(web_server.base + path, encoded=True)) as r:
                assert r.status == 404, path


async def test_client_library_is_ui_free_and_speaks_the_documented_protocol() -> None:
    from signaling.app import protocol

    proto = protocol()
    CLIENT_MESSAGES, SERVER_MESSAGES = proto.client, proto.server
    source = CLIENT_JS.read_text()
    assert not re.search(r"\b(document|window)\.", source), "rallypoint.js must not use the DOM"
    sent = set(re.findall(r'\btype: "([a-z_]+)"', source)) - {"offer", "answer", "rollback"}
    assert sent and sent <= set(CLIENT_MESSAGES), sent - set(CLIENT_MESSAGES)
    handled = set(re.findall(r'\bon\(\s*"([a-z_]+)"', source)) - {"message", "welcome"}
    assert handled and handled <= set(SERVER_MESSAGES), handled - set(SERVER_MESSAGES)


async def test_chat_log_folds_edits_and_deletes(
    web_browser: Browser, web_server: WebServer, page_errors: PageErrors
) -> None:
    context = await web_browser.new_context()
    page = await context.new_page()
    page_errors.watch(page, "module")
    await page.goto(web_server.base + "/")
    folded = await page.evaluate(
        """async () => {
      const {ChatLog} = await import("/static/rallypoint.js");
      const log = new ChatLog("room:x");
      const ev = (seq, kind, extra) => ({seq, kind, cid: "c" + seq, from: "a", name: "A",
                                          ts: seq, ...extra});
      log.apply(ev(2, "text", {text: "two"}));
      log.apply(ev(1, "text", {text: "one"}));
      log.apply(ev(3, "edit", {ref: 1, text: "one!"}));
      log.apply(ev(4, "delete", {ref: 2}));
      log.apply(ev(3, "edit", {ref: 1, text: "duplicate"}));
      return {last: log.lastSeq, messages: log.messages().map(m => [m.seq, m.text ?? null,
              m.edited, m.deleted])};
    }"""
    )
    assert folded == {
        "last": 4,
        "messages": [[1, "one!", True, False], [2, None, False, True]],
    }
    await context.close()
