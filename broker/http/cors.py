"""Cross-origin requests (CORS): which pages on other origins may call the
JSON API and open event streams (``HttpSettings.cors_origins``, ``pybroker
serve --http-cors-origin``; none by default).

- A request whose ``Origin`` is allowed gets ``Access-Control-Allow-Origin``
  on its answer, errors included (so a page can read why it failed): ``*``
  when ``*`` is configured, else its own origin with ``Vary: Origin`` and
  ``Access-Control-Allow-Credentials: true`` (pages of a listed origin may
  send the browser's credentials). Other origins get no CORS headers, so
  browsers keep the answer from the page; the request is served as for
  any client (CORS protects browsers' users, it is no access control).
- ``OPTIONS`` on any route is answered here, before authentication (a
  preflight carries no credentials): 204 with ``Allow``; for a preflight
  (``Origin`` and ``Access-Control-Request-Method``) from an allowed origin
  also the allowed methods, the headers it asked for, and a max age; from
  any other origin 403 ``origin_not_allowed``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from .messages import HttpError, Request, Response

#: Seconds a browser may cache a preflight's answer.
MAX_AGE = 600


def merge_vary(headers: Mapping[str, str], value: str) -> dict[str, str]:
    """``headers`` with ``value`` added to its Vary header."""
    out = dict(headers)
    current = out.get("vary")
    out["vary"] = value if not current else f"{current}, {value}"
    return out


class Cors:
    def __init__(self, origins: Collection[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.lower() for o in origins if o != "*")
        self.enabled = bool(origins)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any or origin.strip().lower() in self.origins)

    def headers(self, request: Request, base: Mapping[str, str]) -> Mapping[str, str]:
        """``base`` plus the CORS headers the answer to ``request`` needs."""
        if not self.enabled or request.method == "OPTIONS":
            return base
        origin = request.header("origin")
        out = dict(base)
        if not self.any:
            # The answer depends on Origin: caches must keep them apart.
            out = merge_vary(out, "origin")
        if not self.allows(origin):
            return out
        assert origin is not None
        if self.any:
            out["access-control-allow-origin"] = "*"
        else:
            out["access-control-allow-origin"] = origin.strip()
            out["access-control-allow-credentials"] = "true"
        return out

    def options(self, request: Request, allowed: list[str]) -> Response:
        """The answer to ``OPTIONS`` on a route allowing ``allowed``."""
        headers = {"allow": ", ".join(allowed)}
        origin = request.header("origin")
        wanted = request.header("access-control-request-method")
        if origin is None or wanted is None:
            return Response(204, headers=headers)  # not a preflight
        if not self.allows(origin):
            raise HttpError(
                403,
                f"origin {origin!r} may not call this API (pybroker serve --http-cors-origin ORIGIN allows one)",
                code="origin_not_allowed",
                headers=headers,
            )
        headers["access-control-allow-methods"] = ", ".join(allowed)
        asked = request.header("access-control-request-headers")
        if asked:
            # Whatever it asks for (Authorization, Content-Type,
            # Last-Event-ID, X-Pybroker-Header-*): the origin is trusted.
            headers["access-control-allow-headers"] = asked
        headers["access-control-max-age"] = str(MAX_AGE)
        if self.any:
            headers["access-control-allow-origin"] = "*"
        else:
            headers["access-control-allow-origin"] = origin.strip()
            headers["access-control-allow-credentials"] = "true"
            headers = merge_vary(headers, "origin")
        return Response(204, headers=headers)
