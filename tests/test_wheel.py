"""What a user gets from a plain `pip install .` (not `-e`): the files the server reads at run
time are package data, so the OpenAPI document and the web page are served from an installed
wheel, started far from the source tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from nethelpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_installed_wheel_serves_the_openapi_document_and_the_page(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        timeout=240,
    )
    (wheel,) = dist.glob("rallypoint-*.whl")
    # A fresh environment with the wheel installed and this environment's dependencies
    # visible (a .pth line), but not the source tree (its editable hook is not processed).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # The new environment's own pip (pip run from this environment with --prefix would first
    # uninstall this environment's rallypoint).
    subprocess.run(
        [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        timeout=120,
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(py), "-c", "import signaling; print(signaling.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not the checkout

    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(py), "-m", "signaling", "serve", "--port", str(port), "--data-dir", "data"],
            cwd=work,
            env={**env, "RALLYPOINT_TURN_ENABLED": "false", "RALLYPOINT_SFU_ENABLED": "false"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        status, body = _get(base + "/api/openapi.json")  # open mode: the document is public
        assert status == 200, body
        assert json.loads(body) == json.loads((ROOT / "docs" / "openapi.json").read_text())
        status, body = _get(base + "/")
        assert status == 200 and b"<html" in body.lower()
        status, _ = _get(base + "/static/rallypoint.js")
        assert status == 200
        status, body = _get(base + "/api/rooms")  # the routes themselves: disabled
        assert status == 403 and json.loads(body)["code"] == "api_disabled"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in log.read_text()
