"""Types shared by the call tests (the ``phones`` fixture lives in conftest.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from signaling.sdk import RallypointClient

Phone = Callable[..., Awaitable[RallypointClient]]
