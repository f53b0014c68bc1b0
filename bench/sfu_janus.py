"""Janus VideoRoom as the baseline of ``bench/sfu.py``: its configuration and HTTP API.

The configuration follows /work/shared/notes/webrtc-facts.md section 8: a copy of /etc/janus
with no STUN server, mDNS candidates ignored, ICE limited to this machine's own address, IPv6
off, only the VideoRoom plugin and the HTTP transport loaded, the HTTP API on 127.0.0.1,
``event_loops`` = number of cores (Janus's fastest setting here) and a room whose bitrate cap
is far above the test stream. The API is Janus's plain HTTP one: requests are POSTed, plugin
events (answers, offers) come back through a long poll on the session.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOM = 1234
LIB = "/usr/lib/x86_64-linux-gnu/janus"


def version() -> str:
    out = subprocess.run(["janus", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"\(([\d.]+)\)", out)
    return f"Janus {m.group(1) if m else out.strip()}"


def _folders(etc: Path) -> dict[str, str]:
    """The plugin/transport/... folders the packaged janus.jcfg names (architecture-specific)."""
    text = (etc / "janus.jcfg").read_text()
    out = {}
    for key in ("plugins", "transports", "events", "loggers"):
        m = re.search(rf'^\s*{key}_folder\s*=\s*"([^"]+)"', text, re.M)
        out[key] = m.group(1) if m else f"{LIB}/{key}"
    return out


def _others(folder: str, keep: str) -> str:
    """Every module of ``folder`` but ``keep``, as Janus's comma-separated ``disable`` list."""
    names = sorted(p.name for p in Path(folder).glob("*.so")) if Path(folder).is_dir() else []
    return ",".join(n for n in names if n != keep)


def write_config(folder: Path, port: int, host_ip: str, loops: int) -> None:
    """Copy /etc/janus into ``folder`` and replace the three files that matter."""
    etc = Path("/etc/janus")
    shutil.copytree(etc, folder, dirs_exist_ok=True)
    dirs = _folders(etc)
    (folder / "janus.jcfg").write_text(
        f"""general: {{
    configs_folder = "{folder}"
    plugins_folder = "{dirs["plugins"]}"
    transports_folder = "{dirs["transports"]}"
    events_folder = "{dirs["events"]}"
    loggers_folder = "{dirs["loggers"]}"
    debug_level = 3
    admin_secret = "bench-admin-{os.getpid()}"
    session_timeout = 120
    event_loops = {loops}
}}
certificates: {{
}}
media: {{
    ipv6 = false
    rtp_port_range = "20000-40000"
}}
nat: {{
    nice_debug = false
    ignore_mdns = true
    ice_enforce_list = "{host_ip}"
}}
plugins: {{
    disable = "{_others(dirs["plugins"], "libjanus_videoroom.so")}"
}}
transports: {{
    disable = "{_others(dirs["transports"], "libjanus_http.so")}"
}}
loggers: {{
    disable = "{_others(dirs["loggers"], "")}"
}}
events: {{
    broadcast = false
    disable = "{_others(dirs["events"], "")}"
}}
"""
    )
    (folder / "janus.transport.http.jcfg").write_text(
        f"""general: {{
    json = "plain"
    base_path = "/janus"
    http = true
    port = {port}
    ip = "127.0.0.1"
    https = false
}}
admin: {{
    admin_http = false
    admin_https = false
}}
cors: {{
}}
certificates: {{
}}
"""
    )
    # fir_freq = 0: no periodic keyframe requests (Rallypoint sends none either); the cap
    # (REMB to the publisher) is far above the ~0.9 Mbps stream.
    (folder / "janus.plugin.videoroom.jcfg").write_text(
        f"""general: {{
}}
room-{ROOM}: {{
    description = "bench"
    publishers = 20
    bitrate = 10000000
    fir_freq = 0
    audiocodec = "opus"
    videocodec = "vp8"
    record = false
}}
"""
    )


def start(folder: Path) -> subprocess.Popen[bytes]:
    with open(folder / "janus.log", "wb") as log:
        return subprocess.Popen(
            ["janus", "-F", str(folder), "-C", str(folder / "janus.jcfg")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )


async def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"janus exited with {proc.returncode}")
            try:
                async with http.get(f"{base}/info") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("janus did not answer /janus/info")


class JanusError(Exception):
    pass


class Session:
    """One Janus session over HTTP, with a long poll that routes events to handles."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession()
        self.id: int | None = None
        self._tx = itertools.count(1)
        self._events: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._poller: asyncio.Task[None] | None = None

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "transaction": f"t{next(self._tx)}"}
        async with self.http.post(self.base + path, json=body) as r:
            reply: dict[str, Any] = await r.json(content_type=None)
        if reply.get("janus") == "error":
            raise JanusError(str(reply.get("error")))
        return reply

    async def create(self) -> None:
        self.id = (await self._post("", {"janus": "create"}))["data"]["id"]
        self._poller = asyncio.ensure_future(self._poll())

    async def _poll(self) -> None:
        while True:
            try:
                async with self.http.get(f"{self.base}/{self.id}?maxev=50") as r:
                    data = await r.json(content_type=None)
            except (aiohttp.ClientError, ValueError):
                await asyncio.sleep(0.1)
                continue
            for ev in data if isinstance(data, list) else [data]:
                sender = ev.get("sender")
                if sender is not None:
                    self._events.setdefault(sender, asyncio.Queue()).put_nowait(ev)

    async def attach(self) -> int:
        reply = await self._post(
            f"/{self.id}", {"janus": "attach", "plugin": "janus.plugin.videoroom"}
        )
        handle: int = reply["data"]["id"]
        self._events.setdefault(handle, asyncio.Queue())
        return handle

    async def message(
        self, handle: int, body: dict[str, Any], jsep: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        msg: dict[str, Any] = {"janus": "message", "body": body}
        if jsep is not None:
            msg["jsep"] = jsep
        return await self._post(f"/{self.id}/{handle}", msg)

    async def event(
        self, handle: int, match: Callable[[dict[str, Any]], bool], timeout_s: float = 20
    ) -> dict[str, Any]:
        """The next event of ``handle`` that ``match`` accepts (others are dropped)."""
        queue = self._events.setdefault(handle, asyncio.Queue())
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise JanusError(f"no expected event on handle {handle}")
            ev = await asyncio.wait_for(queue.get(), left)
            data = ev.get("plugindata", {}).get("data", {})
            if "error" in data:
                raise JanusError(f"videoroom: {data['error']}")
            if match(ev):
                return ev

    async def destroy(self) -> None:
        if self.id is not None:
            try:
                await self._post(f"/{self.id}", {"janus": "destroy"})
            except (aiohttp.ClientError, JanusError):
                pass
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.http.close()


def has_jsep(ev: dict[str, Any]) -> bool:
    return "jsep" in ev


def joined(ev: dict[str, Any]) -> bool:
    return ev.get("plugindata", {}).get("data", {}).get("videoroom") == "joined"
