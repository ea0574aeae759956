"""``GET /``: the chat page, and its assets (vendored in ``service/web``: no build step, no CDN).

Open with keys set (they hold no data: the page asks for a key when the API answers 401). A
strict Content-Security-Policy: the page runs only its own scripts and talks only to its own
origin.
"""

from __future__ import annotations

from importlib.resources import files

from quart import Blueprint, Response
from quart_schema import hide

from .errors import json_error

__all__ = ["ASSETS_PREFIX", "blueprint"]

blueprint = Blueprint("web", __name__)

ASSETS_PREFIX = "/assets/"
_WEB = files("service") / "web"
_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8"}
_ASSETS = frozenset({"chat.js", "markdown.js", "chat.css"})
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _serve(name: str) -> Response:
    resp = Response(_WEB.joinpath(name).read_bytes(), content_type=_TYPES[name.rpartition(".")[2]])
    resp.headers["Content-Security-Policy"] = _CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@blueprint.get("/")
@hide
async def chat_page() -> Response:
    return _serve("index.html")


@blueprint.get(f"{ASSETS_PREFIX}<name>")
@hide
async def asset(name: str) -> Response:
    if name not in _ASSETS:  # only these files, never a path
        return json_error(404, "not_found", "no such asset")
    return _serve(name)
