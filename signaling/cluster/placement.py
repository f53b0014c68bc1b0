"""Where a room's group-call media lives in a cluster (issue 14): the choice, and the frames
that carry media requests, replies and events between nodes. Pure: no I/O.

A room's media lives in one SFU worker of one node, chosen by load among the live nodes that
run an SFU when the room first needs media (``choose``); every node then sends that room's
media requests to that node (``signaling.groupcall.relay``), and the room's node sends the
events meant for a participant on another node back to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

#: A relayed request's reply code when the room is not (or no longer) placed on the node
#: that got it: the asking node places the room again and sends the request once more.
MOVED: Final = "moved"


def choose(asking: str, loads: Mapping[str, int]) -> str | None:
    """The node to place a new media room on: the one with the fewest media rooms among
    ``loads`` (the live nodes that run an SFU, and how many rooms each hosts); on a tie the
    node that asks (its participant's media stays near its signaling), then the smallest
    name (every node picks the same). None when no node can host media."""
    if not loads:
        return None
    least = min(loads.values())
    if loads.get(asking) == least:
        return asking
    return min(n for n, load in loads.items() if load == least)


def request_frame(rid: int, origin: str, req: Mapping[str, Any]) -> bytes:
    """A media request for the room's node: answered on ``medianode:<origin>``."""
    return orjson.dumps({"k": "req", "id": rid, "from": origin, "req": req})


def reply_frame(
    rid: int, result: Mapping[str, Any] | None, code: str = "", message: str = ""
) -> bytes:
    """The reply to request ``rid``: its result, or (``result`` None) an error."""
    if result is not None:
        return orjson.dumps({"k": "rep", "id": rid, "ok": True, "result": result})
    return orjson.dumps({"k": "rep", "id": rid, "ok": False, "code": code, "message": message})


def event_frame(ev: Mapping[str, Any], origin: str) -> bytes:
    """A worker's event (or ``room_lost``) of a room hosted on ``origin``, for the
    participants of another node (which drops it unless it places the room there)."""
    return orjson.dumps({"k": "ev", "ev": ev, "from": origin})


def unplaced_frame(room: str, origin: str) -> bytes:
    """``origin`` hosted ``room``'s media until the cluster forgot it (it was taken for
    dead): a node that still sends the room's requests there treats it as dead for that room."""
    return orjson.dumps({"k": "unplaced", "room": room, "from": origin})
