"""The bundled page does not bring back the track of a publisher who left while its answer to
an offer naming that track was on the way (issue 15's `no_such_track`, the page's side; the
Python side is ``tests/sfu/test_departed_tracks.py``).

The viewer is the bundled page (`/room/<room>?autojoin=1`) in Chromium; Alice and Bob publish
a tone each from aiortc (``media.session.SfuSession``). The page's WebSocket goes through a
Playwright relay that can hold the page's `subscribe_answer` frames: when Bob publishes, the
page answers the offer naming Alice's and Bob's tracks, and that answer is held while Bob
leaves again and the page receives `track_unpublished` for his track. Released, the answer is
applied, the SFU follows with the offer where Bob's section is inactive, and the page's
`Room.tracks` and `Room.remote` must name Alice's track and not Bob's. Before the fix,
`_reconcileRemote` added Bob's track (new in the held offer) to `Room.tracks` and
`Room.remote` when the answer was accepted; the next offer took it out of `remote` only, and no
second `track_unpublished` ever came for `tracks`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestServer
from browser_harness import launch_chromium, wait_for
from playwright.async_api import Page, WebSocketRoute

from media.session import SfuSession
from media.tracks import ToneTrack
from signaling.sdk.wsclient import Client

ROOM = "late-answer"

#: The page's room state: track ids in `tracks` and in `remote`, and its subscriber's state.
STATE = """() => {
  const room = window.rallypoint.room;
  return {
    tracks: room ? [...room.tracks.keys()] : [],
    remote: room ? [...room.remote.keys()] : [],
    signaling: room?.subscriber?.signalingState ?? null,
  };
}"""


class Relay:
    """Passes the page's WebSocket frames both ways, except the page's `subscribe_answer`
    frames while ``hold`` is set (kept in ``held`` until ``release``)."""

    def __init__(self) -> None:
        self.hold = False
        self.held: list[str | bytes] = []
        self.offers: list[int] = []  # subscribe_offer numbers the page was sent
        self.answers = 0  # subscribe_answer frames passed to the server
        self.answered = 0  # their `ok`s passed to the page
        self.unpublished: list[str] = []  # track_unpublished the page was sent
        self._answer_ids: set[str] = set()
        self._upstream: WebSocketRoute | None = None

    def route(self, ws: WebSocketRoute) -> None:
        upstream = self._upstream = ws.connect_to_server()

        def up(m: str | bytes) -> None:
            msg = json.loads(m)
            if msg.get("type") == "subscribe_answer":
                if self.hold:
                    self.held.append(m)
                    return
                self._passed_answer(msg)
            upstream.send(m)

        def down(m: str | bytes) -> None:
            msg = json.loads(m)
            if msg.get("type") == "subscribe_offer":
                self.offers.append(msg["offer"])
            elif msg.get("type") == "track_unpublished":
                self.unpublished.append(msg["track"])
            elif msg.get("re") in self._answer_ids:
                self.answered += 1
            ws.send(m)

        ws.on_message(up)
        upstream.on_message(down)

    def _passed_answer(self, msg: dict[str, Any]) -> None:
        self.answers += 1
        self._answer_ids.add(msg["id"])

    def release(self) -> None:
        self.hold = False
        assert self._upstream is not None
        for m in self.held:
            self._passed_answer(json.loads(m))
            self._upstream.send(m)
        self.held.clear()


async def state(page: Page) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(STATE)
    return result


async def test_page_does_not_bring_back_a_track_unpublished_before_its_answer(
    start_server: Callable[..., Awaitable[TestServer]],
    clients: Callable[..., Awaitable[Client]],
) -> None:
    server = await start_server(sfu__enabled=True, sfu__workers=1)
    origin = f"http://127.0.0.1:{server.port}"
    sessions: list[SfuSession] = []

    async def publisher(name: str) -> tuple[Client, str]:
        c = await clients(server, name=name, identity=name.lower())
        await c.request({"type": "join", "room": ROOM})
        media = SfuSession(c, ROOM, decode=False)
        sessions.append(media)
        await media.publish([(ToneTrack(), "microphone")])
        return c, str(c.welcome["session"])

    relay = Relay()
    async with launch_chromium() as browser:
        context = await browser.new_context()
        try:
            await context.route_web_socket("**/ws", relay.route)
            page = await context.new_page()
            page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
            page.on("pageerror", lambda e: print(f"page error: {e}"))
            alice, alice_id = await publisher("Alice")
            await page.goto(f"{origin}/room/{ROOM}?name=Viewer&autojoin=1")
            seen: list[object] = []

            def tracks_of(s: dict[str, Any], key: str, pid: str) -> list[str]:
                return [t for t in s[key] if t.startswith(f"{pid}:")]

            async def receiving(pid: str) -> bool:
                s = await state(page)
                seen[:] = [s]
                return bool(tracks_of(s, "remote", pid)) and s["signaling"] == "stable"

            await wait_for(lambda: receiving(alice_id), 30, "the page to receive Alice", seen)
            [alice_track] = tracks_of(await state(page), "tracks", alice_id)

            # Bob publishes: the page's answer to the offer naming Alice and Bob is held.
            relay.hold = True
            offers_before = len(relay.offers)
            bob, bob_id = await publisher("Bob")

            async def held() -> bool:
                return bool(relay.held)

            await wait_for(held, 20, "the page's answer to the offer with Bob's track")
            assert len(relay.offers) == offers_before + 1, relay.offers

            # Bob leaves while that answer is on the way; the page hears of it.
            await bob.request({"type": "leave", "room": ROOM})

            async def page_heard() -> bool:
                s = await state(page)
                seen[:] = [s, relay.unpublished]
                return any(t.startswith(f"{bob_id}:") for t in relay.unpublished) and not (
                    tracks_of(s, "tracks", bob_id)
                )

            await wait_for(page_heard, 20, "track_unpublished at the page", seen)

            # The answer goes; the SFU's next offer takes Bob's section out.
            relay.release()

            async def settled() -> bool:
                s = await state(page)
                seen[:] = [s, relay.offers, relay.answers, relay.answered]
                return (
                    len(relay.offers) >= offers_before + 2
                    and relay.answered == relay.answers == len(relay.offers)
                    and s["signaling"] == "stable"
                    and alice_track in s["remote"]
                    and not tracks_of(s, "remote", bob_id)
                )

            await wait_for(settled, 30, "the page to settle on Alice's track alone", seen)
            s = await state(page)
            assert not tracks_of(s, "tracks", bob_id), s
            # (`tracks` also has the page's own camera and microphone, `autojoin`.)
            assert tracks_of(s, "tracks", alice_id) == [alice_track], s
            assert s["remote"] == [alice_track], s
            await alice.request({"type": "ping"})
        finally:
            await context.close()
            for media in sessions:
                await media.close()
