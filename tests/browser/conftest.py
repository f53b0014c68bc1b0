"""Fixtures for browser tests (helpers in ``browser_harness``).

The ``browser`` fixture runs on a module-scoped event loop so that one browser serves a
whole test module; a module using it needs
``pytestmark = pytest.mark.asyncio(loop_scope="module")``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from browser_harness import launch_chromium
from playwright.async_api import Browser


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium with fake camera/microphone, one per test module."""
    async with launch_chromium() as launched:
        yield launched
