"""The status page: `/ui/` (the project list) and `/ui/projects/N` (a project), one static HTML file.

static/status.html is vanilla JS with no build step and nothing from the internet; it polls the JSON routes
of routes/projects.py, which scripts can use too. Every value is inserted as text, never as HTML, and a
Content-Security-Policy that allows only the page's own script and style (by hash) stops any injected
markup from running. The page sits behind the app's basic auth like every route but /health and /webhook.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, RedirectResponse

PAGE = "status.html"

router = APIRouter()


@functools.cache
def _page() -> tuple[str, dict[str, str]]:
    """The page and its headers: its inline script and style are allowed by hash only."""
    html = resources.files("asvp_backend.server").joinpath("static", PAGE).read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    headers = {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    return html, headers


@router.get("/ui", include_in_schema=False)
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/", response_class=HTMLResponse, include_in_schema=False)
@router.get("/ui/projects/{project}", response_class=HTMLResponse, include_in_schema=False)
def page() -> HTMLResponse:
    html, headers = _page()
    return HTMLResponse(html, headers=headers)
