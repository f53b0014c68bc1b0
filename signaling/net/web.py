"""The bundled web page: ``/``, ``/room/{room}`` and ``/static/<file>`` from the ``web``
package (installed beside ``signaling``)."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"

# The page has no build step and no hashed file names: browsers keep each file but ask again
# (If-Modified-Since, answered 304) on every load, so an upgraded server is seen at once.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


async def index(request: web.Request) -> web.FileResponse:
    """``/`` and ``/room/{room}``: the same page; ``web/app.js`` reads the path."""
    return web.FileResponse(WEB_DIR / "index.html", headers=_HEADERS)


async def static_file(request: web.Request) -> web.FileResponse:
    """``/static/<file>``: the page's modules, style sheet and images from ``web/``."""
    name = request.match_info["name"]
    if "\x00" in name:  # an encoded NUL (%00): no such file, and no path to resolve
        raise web.HTTPNotFound()
    path = (WEB_DIR / name).resolve()
    if not path.is_relative_to(WEB_DIR) or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers=_HEADERS)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/room/{room}", index)
    app.router.add_get("/static/{name:.+}", static_file)
