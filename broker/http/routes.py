"""Which handler answers which method and path; 404 and 405 for the rest.

A route is a path pattern (segments, ``{topic}`` standing for one
percent-decoded segment) and a handler per method. HEAD is answered by the
GET handler, without the body; OPTIONS by the server itself (:mod:`.cors`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from . import api, dashboard, groups, metrics, sse
from .messages import HttpError, Request, Response, StreamResponse

if TYPE_CHECKING:
    from .server import HttpServer

Handler = Callable[[Request, Mapping[str, str]], Awaitable[Response | StreamResponse]]


@attrs.frozen
class Route:
    pattern: tuple[str, ...]
    methods: Mapping[str, Handler]

    def match(self, segments: tuple[str, ...]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.pattern, segments):
            if want.startswith("{") and want.endswith("}"):
                if not got:
                    return None
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


def _route(path: str, **methods: Handler) -> Route:
    return Route(tuple(path.split("/")[1:]), methods)


def build_routes(http: HttpServer) -> list[Route]:
    def bind(
        handler: Callable[[HttpServer, Request, Mapping[str, str]], Awaitable[Response | StreamResponse]],
    ) -> Handler:
        async def bound(request: Request, params: Mapping[str, str]) -> Response | StreamResponse:
            return await handler(http, request, params)

        return bound

    return [
        _route("/", GET=bind(dashboard.page)),
        _route("/healthz", GET=bind(api.healthz)),
        _route("/readyz", GET=bind(api.readyz)),
        _route("/metrics", GET=bind(metrics.handle)),
        _route("/v1/broker", GET=bind(api.broker_info)),
        _route("/v1/topics", GET=bind(api.list_topics)),
        _route(
            "/v1/topics/{topic}",
            GET=bind(api.topic_detail),
            DELETE=bind(api.delete_topic),
            PATCH=bind(api.set_topic),
            PUT=bind(api.create_topic),
        ),
        _route(
            "/v1/topics/{topic}/messages",
            GET=bind(api.fetch_messages),
            POST=bind(api.publish_messages),
            DELETE=bind(api.purge_messages),
        ),
        _route("/v1/topics/{topic}/events", GET=bind(sse.events)),
        _route("/v1/events", GET=bind(sse.pattern_events)),
        _route("/v1/groups", GET=bind(groups.list_groups)),
        _route("/v1/groups/{group}", GET=bind(groups.group_detail)),
    ]


def allowed_methods(route: Route) -> list[str]:
    """The methods ``route`` answers: its own, HEAD with GET, OPTIONS (:mod:`.cors`)."""
    return sorted({*route.methods, *(["HEAD"] if "GET" in route.methods else []), "OPTIONS"})


def find(routes: list[Route], request: Request) -> tuple[Route, dict[str, str]]:
    """The route for ``request``'s path and its parameters; 404 for none."""
    for route in routes:
        params = route.match(request.segments)
        if params is not None:
            return route, params
    raise HttpError(404, f"no such path: {request.path}")


async def dispatch(routes: list[Route], request: Request) -> Response | StreamResponse:
    for route in routes:
        params = route.match(request.segments)
        if params is None:
            continue
        method = "GET" if request.method == "HEAD" else request.method
        handler = route.methods.get(method)
        if handler is None:
            allowed = allowed_methods(route)
            raise HttpError(
                405,
                f"{request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}",
                headers={"allow": ", ".join(allowed)},
            )
        return await handler(request, params)
    raise HttpError(404, f"no such path: {request.path}")
