"""The push webhook: tell the app's backend about calls and messages for offline devices.

When a callee or a direct-message recipient has no device with a live connection, the server
POSTs a small JSON event to ``push.webhook_url``; the app's backend turns it into an APNs/FCM push.
Events carry ids and counts only (message text only with ``push.include_text``), are signed with
HMAC-SHA256 (``X-Rallypoint-Signature: t=<unix seconds>,v1=<hex>`` over ``"<t>." + body``), are
retried with exponential backoff and full jitter on network errors, 408, 429 and 5xx, and are
de-duplicated by event id (the id stays the same across retries, so the receiver can drop repeats
too). The queue is bounded: when the backend is down for long, new events are dropped and counted.
See docs/PUSH.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final, Protocol

import aiohttp
import orjson

from ..config import PushSection
from ..core.metrics import Metric

log = logging.getLogger("rallypoint.push")

SIGNATURE_HEADER: Final = "X-Rallypoint-Signature"
EVENT_ID_HEADER: Final = "X-Rallypoint-Event-Id"
RETRY_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
SEEN_MEMORY: Final = 10000  # event ids remembered for de-duplication
WORKERS: Final = 2


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, *, now: float, tolerance_s: float = 300) -> bool:
    """Check a signature header as a receiver should (docs/PUSH.md has the same recipe)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - ts) > tolerance_s:
        return False
    expected = sign(secret, ts, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def backoff_s(attempt: int, base: float, cap: float) -> float:
    """Full-jitter exponential backoff before retry ``attempt`` (1 = the first retry)."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


class UnreadCounts(Protocol):
    """What the queue needs of the chat store: a recipient's unread count."""

    async def unread(self, conversation: str, identity: str, upto: int | None = None) -> int: ...


class PushCounters:
    __slots__ = ("dropped", "duplicates", "failed", "retries", "sent")

    HELP = {
        "sent": "Push webhook events delivered (2xx).",
        "failed": "Push webhook events given up on.",
        "dropped": "Push webhook events dropped because the queue was full.",
        "retries": "Push webhook deliveries retried.",
        "duplicates": "Push webhook events not queued again (same event id).",
    }

    def __init__(self) -> None:
        self.sent = self.failed = self.dropped = self.retries = self.duplicates = 0

    def metrics(self) -> Iterable[Metric]:
        for name, help_ in self.HELP.items():
            yield Metric(f"push_{name}", "counter", help_, getattr(self, name))


class PushQueue:
    """A bounded queue of webhook events and the workers that deliver them.

    ``start`` and ``stop`` run in the app's ``cleanup_ctx``; the queue owns its HTTP session and
    worker tasks. ``submit`` never blocks.
    """

    def __init__(self, cfg: PushSection, store: UnreadCounts | None = None) -> None:
        self.cfg = cfg
        self.counters = PushCounters()
        self.store = store
        self.queue: asyncio.Queue[tuple[dict[str, Any], str | None]] = asyncio.Queue(cfg.queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._http: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []

    def metrics(self) -> Iterable[Metric]:
        return self.counters.metrics()

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.webhook_url)

    async def start(self) -> None:
        if not self.enabled:
            return
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers={"User-Agent": "rallypoint-push/1"},
        )
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]

    async def stop(self) -> None:
        """Stop the workers (events still queued are dropped) and close the HTTP session."""
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._http is not None:
            await self._http.close()
            self._http = None

    def submit(self, event: dict[str, Any], *, unread: str | None = None) -> bool:
        """Queue ``event`` (it has an ``id``); False if it is a duplicate or the queue is full.

        ``unread`` = a conversation: the worker adds the recipient's unread count in it, as of
        the event's ``seq`` (``unread`` beside ``identity``, or in each of ``recipients``).
        """
        if not self.enabled:
            return False
        eid = event["id"]
        if eid in self._seen:
            self.counters.duplicates += 1
            return False
        try:
            self.queue.put_nowait((event, unread))
        except asyncio.QueueFull:
            self.counters.dropped += 1
            log.warning("push queue full: dropped %s", eid)
            return False
        self._seen[eid] = None
        while len(self._seen) > SEEN_MEMORY:
            self._seen.popitem(last=False)
        return True

    async def _work(self) -> None:
        while True:
            event, unread = await self.queue.get()
            try:
                if unread is not None and self.store is not None:
                    # As of this message: a later one does not change what this push says.
                    count, seq = self.store.unread, event["seq"]
                    if "identity" in event:
                        event["unread"] = await count(unread, event["identity"], seq)
                    for r in event.get("recipients", ()):
                        r["unread"] = await count(unread, r["identity"], seq)
                await self._deliver(event)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not kill the worker
                self.counters.failed += 1
                log.exception("push of %s failed", event.get("id"))

    async def _deliver(self, event: dict[str, Any]) -> None:
        assert self._http is not None
        cfg = self.cfg
        body = orjson.dumps(event)
        for attempt in range(1, cfg.max_attempts + 1):
            if attempt > 1:
                self.counters.retries += 1
                await asyncio.sleep(backoff_s(attempt - 1, cfg.retry_base_s, cfg.retry_max_s))
            ts = int(time.time())
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(cfg.secret, ts, body),
                EVENT_ID_HEADER: event["id"],
            }
            try:
                async with self._http.post(cfg.webhook_url, data=body, headers=headers) as r:
                    status = r.status
                    with contextlib.suppress(aiohttp.ClientError):
                        await r.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                log.info("push %s attempt %d: %s", event["id"], attempt, e.__class__.__name__)
                continue
            if 200 <= status < 300:
                self.counters.sent += 1
                return
            if status not in RETRY_STATUSES:
                log.warning("push %s refused with HTTP %d; not retried", event["id"], status)
                break
            log.info("push %s attempt %d: HTTP %d", event["id"], attempt, status)
        self.counters.failed += 1
