"""CORS for the gateway: the policy of deploy/envoy/envoy.yaml's virtual host, to the letter.

Only the origins named in FABRICA_GRPC_WEB_CORS_ORIGINS may call from another origin (never "*"); the UI the
gateway serves itself is same-origin and needs none. A preflight from an allowed origin is answered here
(204) with the allowed methods, request headers and max age; a preflight from any other origin gets 403 and
no CORS header, so the browser refuses the call. Responses to an allowed origin name it and expose the
gRPC-Web status headers (grpc-status-details-bin carries the error details).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[None]]

#: The same values as envoy.yaml's CorsPolicy (tests/web/test_gateway.py compares them).
ALLOW_METHODS = "GET, PUT, DELETE, POST, OPTIONS"
ALLOW_HEADERS = ("keep-alive,user-agent,cache-control,content-type,content-transfer-encoding,"
                 "x-accept-content-transfer-encoding,x-accept-response-streaming,x-user-agent,x-grpc-web,"
                 "grpc-timeout,authorization,x-fabrica-tenant")
EXPOSE_HEADERS = "grpc-status,grpc-message,grpc-status-details-bin"
MAX_AGE = "1728000"


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class Cors:
    """ASGI middleware applying the policy above to `app`."""

    def __init__(self, app: ASGIApp, origins: Iterable[str]) -> None:
        self.app = app
        self.origins = frozenset(origins)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        origin = _header(scope, b"origin")
        if scope["type"] != "http" or origin is None:
            await self.app(scope, receive, send)
            return
        allowed = origin in self.origins
        if scope["method"] == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            headers = [(b"vary", b"origin")]
            if allowed:
                headers += [
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-allow-methods", ALLOW_METHODS.encode()),
                    (b"access-control-allow-headers", ALLOW_HEADERS.encode()),
                    (b"access-control-max-age", MAX_AGE.encode()),
                ]
            await send({"type": "http.response.start", "status": 204 if allowed else 403, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    *message.get("headers", ()),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"access-control-expose-headers", EXPOSE_HEADERS.encode()),
                    (b"vary", b"origin"),
                ]}
            await send(message)

        await self.app(scope, receive, send_with_cors)
