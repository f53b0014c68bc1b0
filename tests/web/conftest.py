"""Fixtures for the web page tests: a real `rallypoint serve` process and real Chromium pages.

The browser comes from the shared harness (``tests/browser/browser_harness.py``: Debian's
Chromium with fake camera, microphone and screen). One server and one browser serve a whole
test module (module-scoped event loop: ``pytestmark = pytest.mark.asyncio(loop_scope="module")``).
Every page records its console errors and uncaught exceptions; tests assert there are none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "browser"))
from browser_harness import launch_chromium

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
# Remote audio plays without a click (a person clicks "Turn on sound" instead).
BROWSER_ARGS = ("--autoplay-policy=no-user-gesture-required",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class WebServer:
    """A `rallypoint serve` process on loopback."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def run_server(data_dir: Path, env: Mapping[str, str]) -> AsyncIterator[WebServer]:
    """Start the server (TURN off, one SFU worker) and wait until it answers /healthz.

    Its log is kept as ``test-artifacts/web-<data dir name>-server.log``.
    """
    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(ARTIFACTS.mkdir, exist_ok=True)
    port = free_port()
    log = ARTIFACTS / f"web-{data_dir.name}-server.log"
    full_env = {
        **os.environ,
        "RALLYPOINT_TURN_ENABLED": "false",
        "RALLYPOINT_SFU_WORKERS": "1",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "signaling", "serve", "--host", "127.0.0.1"),
                *("--port", str(port), "--data-dir", str(data_dir)),
            ],
            cwd=REPO,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = WebServer(port, process, log)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(150):  # 15 s
                if process.poll() is not None:
                    pytest.fail(f"the server exited:\n{log.read_text()[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{server.base}/healthz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        yield server
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), 10)
        except TimeoutError:
            process.kill()
            await asyncio.to_thread(process.wait)


@dataclass
class PageErrors:
    """Console errors and uncaught exceptions of the pages a test opened."""

    errors: list[str] = field(default_factory=list)
    # Errors the browser itself prints for a test that breaks the network on purpose.
    allowed: list[str] = field(default_factory=list)

    def watch(self, page: Page, who: str) -> None:
        page.on(
            "console",
            lambda msg: (
                self.errors.append(f"{who}: console.error: {msg.text}")
                if msg.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda err: self.errors.append(f"{who}: uncaught: {err}"))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web_server(data_dir: Path) -> AsyncIterator[WebServer]:
    """Open mode; rooms hold at most 3 participants (so a fourth page sees `room_full`)."""
    async with run_server(
        data_dir / "server", {"RALLYPOINT_ROOMS_MAX_PARTICIPANTS": "3"}
    ) as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def web_browser() -> AsyncIterator[Browser]:
    async with launch_chromium(extra_args=BROWSER_ARGS) as browser:
        yield browser


@pytest.fixture
def page_errors() -> Iterator[PageErrors]:
    """Pages opened during a test report their errors here; none may be left at the end."""
    errors = PageErrors()
    yield errors
    assert errors.unexpected() == [], "errors in the pages"
