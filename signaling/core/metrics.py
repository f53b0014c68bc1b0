"""Counters and gauges as plain values. Features count into plain attributes on their hot
paths; at scrape time they describe what they have as ``Metric`` values, which the network
edge turns into Prometheus text (``signaling.net.metrics``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, NamedTuple, Protocol


class Metric(NamedTuple):
    """One sample. ``name`` has no ``rallypoint_`` prefix and, for counters, no ``_total``."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    value: float


class MetricSource(Protocol):
    def metrics(self) -> Iterable[Metric]: ...


class HubCounters:
    """What the hub and the WebSocket edge count (incremented on the per-message paths)."""

    __slots__ = (
        "errors_sent",
        "flooding",
        "heartbeat_timeouts",
        "internal_errors",
        "messages_stored",
        "rate_limited",
        "resumes",
        "slow_consumers",
    )

    HELP = {
        "messages_stored": "Chat messages stored (duplicates not counted).",
        "errors_sent": "`error` messages sent to clients.",
        "rate_limited": "Frames refused by the per-connection rate limit.",
        "flooding": "Connections closed with 4029 for sending far above their rate.",
        "slow_consumers": "Connections closed with 4008 because their outbox was full.",
        "heartbeat_timeouts": "Connections closed with 4002 after missing heartbeats.",
        "resumes": "Sessions resumed on a new connection.",
        "internal_errors": "Requests that failed with a server bug (logged with a traceback).",
    }

    def __init__(self) -> None:
        self.messages_stored = 0
        self.errors_sent = 0
        self.rate_limited = 0
        self.flooding = 0
        self.slow_consumers = 0
        self.heartbeat_timeouts = 0
        self.resumes = 0
        self.internal_errors = 0

    def metrics(self) -> Iterable[Metric]:
        for name, help_ in self.HELP.items():
            yield Metric(name, "counter", help_, getattr(self, name))
