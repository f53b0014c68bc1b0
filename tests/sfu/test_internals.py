"""``sfu.rtc.check_internals`` covers exactly the aiortc/aioice internals the SFU uses.

The privates are read from the source with ``ast``: every leading-underscore attribute that
``sfu/rtc.py`` reads, writes or replaces on an object that is not one of its own classes' ``self``
must be in ``PRIVATE_INTERNALS``, and every name there must be used. The other sfu modules must
not touch aiortc/aioice privates at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aioice.ice
import pytest
from aiortc import RTCRtpReceiver

from sfu import rtc
from sfu.rtc import (
    INTERNAL_MEMBERS,
    PRIVATE_INTERNALS,
    SIGNATURES,
    HostCandidatePolicy,
    check_internals,
)

SFU = Path(rtc.__file__).parent


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _own_names(tree: ast.Module) -> set[str]:
    """What the module's own classes define: methods and class attributes, ``__slots__``, and
    attributes their methods assign on ``self``."""
    own: set[str] = set()
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for item in cls.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                own.add(item.name)
            elif isinstance(item, ast.Assign | ast.AnnAssign):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                own.update(t.id for t in targets if isinstance(t, ast.Name))
                if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
                    assert item.value is not None
                    own.update(
                        c.value
                        for c in ast.walk(item.value)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)
                    )
        for n in ast.walk(cls):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name):
                if n.value.id == "self" and isinstance(n.ctx, ast.Store):
                    own.add(n.attr)
    return own


def _self_aliases(tree: ast.Module) -> set[str]:
    """Local names bound to ``self`` (``policy = self``), which closures use instead."""
    return {
        t.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name) and n.value.id == "self"
        for t in n.targets
        if isinstance(t, ast.Name)
    } | {"self"}


def foreign_privates(path: Path) -> set[str]:
    """Leading-underscore attributes a module reads or writes on objects other than its own
    classes' ``self`` (also by ``getattr``/``setattr``/``hasattr``/``delattr`` with a literal)."""
    tree = ast.parse(path.read_text())
    own = _own_names(tree)
    selves = _self_aliases(tree)
    found: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Attribute):
            name, on = n.attr, n.value
        elif (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(n.args) >= 2
            and isinstance(n.args[1], ast.Constant)
            and isinstance(n.args[1].value, str)
        ):
            name, on = n.args[1].value, n.args[0]
        else:
            continue
        if not name.startswith("_") or _dunder(name):
            continue
        if isinstance(on, ast.Name) and on.id in selves and name in own:
            continue  # one of our own attributes
        found.add(name)
    return found


def test_check_internals_covers_exactly_the_privates_rtc_uses() -> None:
    used = foreign_privates(SFU / "rtc.py")
    checked = {name for _, name in PRIVATE_INTERNALS}
    assert sorted(used - checked) == [], "used in sfu/rtc.py but not checked"
    assert sorted(checked - used) == [], "checked but not used in sfu/rtc.py"


def test_internal_members_are_used_and_public_looking() -> None:
    tree = ast.parse((SFU / "rtc.py").read_text())
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for cls, name in INTERNAL_MEMBERS:
        assert name in attrs, f"{cls.__name__}.{name} is checked but not used"
        assert not name.startswith("_"), f"{name} belongs in PRIVATE_INTERNALS"
    for key in SIGNATURES:
        assert key in {*PRIVATE_INTERNALS, *INTERNAL_MEMBERS}


def test_only_rtc_touches_aiortc_privates() -> None:
    for path in sorted(SFU.glob("*.py")):
        if path.name != "rtc.py":
            assert foreign_privates(path) == set(), path.name


def test_the_pinned_versions_have_every_internal() -> None:
    check_internals()


def test_a_missing_private_is_named_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(RTCRtpReceiver, "_send_rtcp_nack")
    with pytest.raises(RuntimeError, match=r"RTCRtpReceiver\._send_rtcp_nack\b") as e:
        check_internals()
    assert "aiortc==1.16.0" in str(e.value)


def test_a_renamed_parameter_of_a_replaced_method_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def renamed(self: RTCRtpReceiver, packet: object, arrival_ms: int) -> None:
        pass  # the shape a rename in aiortc would have

    monkeypatch.setattr(RTCRtpReceiver, "_handle_rtp_packet", renamed)
    with pytest.raises(
        RuntimeError, match=r"RTCRtpReceiver\._handle_rtp_packet\(self, packet, arrival_time_ms\)"
    ):
        check_internals()


def test_host_candidate_policy_refuses_to_install_without_the_method_it_replaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without aioice's ``Connection.get_component_candidates`` the patch would do nothing, and
    the bind address, announced address and port range would be ignored without a word."""
    monkeypatch.delattr(aioice.ice.Connection, "get_component_candidates")
    with pytest.raises(RuntimeError, match=r"Connection\.get_component_candidates"):
        check_internals()
    with pytest.raises(RuntimeError, match=r"Connection\.get_component_candidates"):
        HostCandidatePolicy(bind="127.0.0.1", port_min=42000, port_max=42010).install()
    assert not hasattr(aioice.ice.Connection, "get_component_candidates")  # nothing installed
