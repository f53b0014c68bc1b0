"""Chromium forced to relay: its media reaches the SFU only through the embedded TURN server,
with the credentials `welcome` hands out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from browser_harness import launch_chromium
from nethelpers import free_port, machine_ip
from test_sfu_browser import SCRIPT

from signaling.app import make_app
from signaling.config import load_config

RELAY_SCRIPT = (
    SCRIPT.replace(
        'new RTCPeerConnection({bundlePolicy: "max-bundle"})',
        'new RTCPeerConnection({bundlePolicy: "max-bundle", iceServers: welcome.ice_servers, '
        "iceTransportPolicy: welcome.ice_transport_policy})",
    ).replace(
        'await rq({type: "hello", v: 1, name, identity: name});',
        'welcome = await rq({type: "hello", v: 1, name, identity: name});',
    )
    + """
let welcome;
async function selectedTypes(pc) {
  const stats = await pc.getStats(); const types = [];
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      const pair = stats.get(s.selectedCandidatePairId);
      types.push(stats.get(pair.localCandidateId).candidateType);
    }
  });
  return types;
}
"""
)


async def test_chromium_forced_to_relay_through_embedded_turn(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    ip = machine_ip()
    cfg = load_config(
        None,
        env={},
        overrides={
            "server.data_dir": str(tmp_path / "data"),
            "sfu.workers": 1,
            "turn.port": free_port("0.0.0.0"),
            "turn.listen_host": "0.0.0.0",
            "turn.public_host": ip,  # the address browsers use to reach the TURN server
            "turn.allow_peers": [f"{ip}/32"],  # the SFU's media sockets live on this address
            "ice.relay_only": True,
        },
    )
    app: web.Application = make_app(cfg)
    server = await aiohttp_server(app, host="127.0.0.1")
    origin = f"http://127.0.0.1:{server.port}"
    async with launch_chromium() as browser:
        pages = []
        for name in ("rae", "sol"):
            page = await (await browser.new_context()).new_page()
            page.on("console", lambda m: print(f"console {m.type}: {m.text}"))
            await page.goto(f"{origin}/")
            await page.add_script_tag(content=RELAY_SCRIPT)
            await page.evaluate(
                "([u, n, r]) => start(u, n, r)",
                [f"ws://127.0.0.1:{server.port}/ws", name, "relayed"],
            )
            pages.append(page)
        async with asyncio.timeout(40):
            while min([(await p.evaluate("decoded()"))["frames"] for p in pages]) <= 30:
                await asyncio.sleep(0.5)
        for p in pages:
            assert await p.evaluate("welcome.ice_transport_policy") == "relay"
            assert await p.evaluate("errors.length") == 0
            for pc in ("pub", "sub"):
                assert await p.evaluate(f"selectedTypes({pc})") == ["relay"]
