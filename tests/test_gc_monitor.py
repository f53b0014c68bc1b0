"""GcMonitor: frozen after connection ramps both ways, reclaims frozen cycles when cheap."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from signaling.core.gc import GcMonitor


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def gcm() -> Iterator[GcMonitor]:
    m = GcMonitor()
    m.install()
    yield m
    m.uninstall()


def test_freezes_after_200_connections_opened_or_closed(gcm: GcMonitor) -> None:
    keep = [Node() for _ in range(1000)]
    before = gc.get_freeze_count()
    gcm.maybe_freeze(150)  # fewer than 200 since the last freeze: nothing
    assert gc.get_freeze_count() == before
    gcm.maybe_freeze(200)
    frozen_up = gc.get_freeze_count()
    assert frozen_up >= before + len(keep)
    keep += [Node() for _ in range(1000)]
    gcm.maybe_freeze(50)  # 150 closed: nothing
    assert gc.get_freeze_count() == frozen_up
    gcm.maybe_freeze(0)  # 200 closed: the survivors of a mass disconnect are frozen too
    assert gc.get_freeze_count() >= frozen_up + 1000


def make_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_reclaims_frozen_cycles_only_when_few_are_live(gcm: GcMonitor) -> None:
    gcm.RECLAIM_GROWTH = 10
    refs = [make_cycle() for _ in range(100)]
    gcm.maybe_freeze(200)  # frozen while alive (still referenced only by their own cycle)
    gc.collect()
    assert all(r() is not None for r in refs), "frozen cycles are not collected"
    gcm.maybe_reclaim(GcMonitor.RECLAIM_BELOW)  # too many connections and sessions: later
    assert all(r() is not None for r in refs)
    gcm.maybe_reclaim(GcMonitor.RECLAIM_BELOW - 1)
    assert all(r() is None for r in refs)
    assert gcm.reclaimed >= 200
    # Whatever is still alive is frozen again.
    assert gc.get_freeze_count() > 0
    reclaimed = gcm.reclaimed
    gcm.maybe_reclaim(0)  # no growth since: no second full collection
    assert gcm.reclaimed == reclaimed


async def test_freezes_periodically_while_installed_in_a_loop() -> None:
    m = GcMonitor()
    m.FREEZE_EVERY_S = 0.01
    m.install()
    try:
        before = gc.get_freeze_count()
        keep = [Node() for _ in range(1000)]  # young survivors
        await asyncio.sleep(0.1)
        assert gc.get_freeze_count() >= before + len(keep)
    finally:
        m.uninstall()
    assert m._ticker is None
