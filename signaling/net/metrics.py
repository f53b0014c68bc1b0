"""``GET /metrics``: Prometheus text through ``prometheus_client``, with one registry per app.

Features count into plain attributes on their hot paths; nothing here runs per message. At
scrape time the collector asks every source for its ``Metric`` values (and, first, the async
sources such as the SFU workers) and turns them into metric families with HELP and TYPE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as PromMetric

from ..core.hub import Hub
from ..core.metrics import Metric, MetricSource
from .http_api import ApiError, authenticate, error_response

PREFIX = "rallypoint_"
AsyncSource = Callable[[], Awaitable[Iterable[Metric]]]


class _Collector:
    """Turns the sources' values into Prometheus metric families (``collect`` is sync)."""

    def __init__(self, sources: Sequence[MetricSource]) -> None:
        self.sources = sources
        self.extra: list[Metric] = []  # from the async sources, fetched before each scrape

    def collect(self) -> Iterator[PromMetric]:
        for m in self._all():
            name = PREFIX + m.name
            if m.kind == "counter":
                yield CounterMetricFamily(name, m.help, value=m.value)
            else:
                yield GaugeMetricFamily(name, m.help, value=m.value)

    def _all(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.metrics()
        yield from self.extra


class Metrics:
    """The app's registry and its ``/metrics`` handler."""

    def __init__(
        self, sources: Sequence[MetricSource], async_sources: Sequence[AsyncSource] = ()
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _Collector(sources)
        self._async_sources = async_sources
        self._lock = asyncio.Lock()  # one scrape at a time: ``extra`` is shared
        self.registry.register(self._collector)

    def handler(
        self, hub: Hub, *, protected: bool
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        """The ``/metrics`` handler; ``protected``: it needs the API credentials (token mode on
        the main listener)."""

        async def metrics(request: web.Request) -> web.Response:
            if protected:
                try:
                    authenticate(hub, request)
                except ApiError as e:
                    return error_response(e)
            return await self.handle(request)

        return metrics

    async def handle(self, request: web.Request) -> web.Response:
        async with self._lock:
            extra: list[Metric] = []
            for fetch in self._async_sources:
                extra.extend(await fetch())
            self._collector.extra = extra
            body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
