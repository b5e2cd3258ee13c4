"""The consumer groups over HTTP: ``GET /v1/groups`` and ``/v1/groups/{name}``.

The same documents as the protocol's GROUPS list and inspect (protocol.md,
"GROUPS_REPLY"), under the same permission rules: a user sees the groups
whose pattern they may subscribe to; admins see every group.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pybroker.protocol import GroupsAction

from ..core import Refused
from .access import principal, refused
from .messages import Request, Response, json_response
from .validate import check_query

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .server import HttpServer


async def list_groups(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    """Every group the user may see, sorted by name, a page at a time
    (``?after=NAME`` continues a listing that answered with ``next``)."""
    check_query(request, ("after",))
    try:
        document = http.broker.groups_request(principal(request), GroupsAction.LIST, request.query.get("after", ""))
    except Refused as refusal:
        raise refused(refusal) from None
    body: dict[str, Any] = json.loads(document)
    return json_response(body)


async def group_detail(http: HttpServer, request: Request, params: Mapping[str, str]) -> Response:
    check_query(request, ())
    try:
        document = http.broker.groups_request(principal(request), GroupsAction.INSPECT, params["group"])
    except Refused as refusal:
        raise refused(refusal) from None
    body: dict[str, Any] = json.loads(document)
    return json_response(body)
