"""``GET /``: the dashboard, one static HTML page with its script inline.

No build step and no external assets: ``static/dashboard.html`` polls
``/v1/broker`` and ``/v1/topics`` once a second and draws message rates on
a ``<canvas>``. Read once, on first request.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

from .messages import Request, Response
from .validate import check_query

if TYPE_CHECKING:
    from .server import HttpServer

CONTENT_TYPE = "text/html; charset=utf-8"


@cache
def html() -> bytes:
    return resources.files("pybroker.server.http").joinpath("static").joinpath("dashboard.html").read_bytes()


async def page(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    check_query(request, ())
    return Response(
        200,
        html(),
        CONTENT_TYPE,
        {
            "content-security-policy": "default-src 'self'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; img-src data:",
            "x-content-type-options": "nosniff",
        },
    )
