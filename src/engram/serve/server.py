"""``engram serve --patches DIR``: the tenant server's JSON API over ``ThreadingHTTPServer``.

Routes
    GET  /healthz       {"ok", "requests_served", "inflight", "patch_cache": {entries, bytes, ...}}
    GET  /v1/patches    the patch ids this request's key may use
    POST /v1/logits     {"prompt": "..." | "ids": [...], "patches": ["id", ...]}
                        -> {"tokens", "logits" (last position), "top", "digest" (sha256 of every
                        position's float32 logits), "patches": [{"id", "patch_id", "name"}]}
    POST /v1/generate   the same input plus "max_new_tokens", "temperature" (default 0: greedy),
                        "top_k", "top_p", "seed" -> {"ids", "completion", "patches"}

The key goes in ``Authorization: Bearer KEY`` (or ``X-API-Key``) when the server has a keys
file. Errors are ``{"error", "status"}`` with the error type's status: 400 bad body, 401 / 403
keys, 404 unknown patch or route, 409 a patch or stack made for another table, 413 too long,
503 busy or a patch file caught mid-write (retry), 507 a patch larger than the cache. The body
limits, request slots and socket timeout are ``engram serve``'s (``ServeLimits``).
"""

from __future__ import annotations

from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional

from engram.errors import EngramError
from engram.inspect.server import EngramServer, JsonHandler, RequestError, bind_server, read_json_object
from engram.serve.service import TenantService

ROUTES = {"/v1/logits": "logits", "/v1/generate": "generate"}


def _handler_class(service: TenantService, quiet: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(JsonHandler):
        server_version = "engram-serve-patches/1"
        timeout = service.limits.socket_timeout_s
        quiet_log = quiet
        json_ascii = False

        def _key(self) -> Optional[str]:
            auth = self.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                return auth[7:].strip()
            return self.headers.get("X-API-Key")

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path == "/healthz":
                    self._json(200, service.health())
                elif path == "/v1/patches":
                    self._json(200, service.patch_list(self._key()))
                elif path in ROUTES:
                    raise RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"use POST {path} with a JSON body")
                else:
                    raise RequestError(HTTPStatus.NOT_FOUND, f"no route {path!r}; routes: GET /healthz, "
                                       f"GET /v1/patches, POST /v1/logits, POST /v1/generate")
            except EngramError as e:
                self._error(e)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                what = ROUTES.get(path)
                if what is None:
                    raise RequestError(HTTPStatus.NOT_FOUND, f"no POST route {path!r}; use POST /v1/logits "
                                       f"or POST /v1/generate")
                if not service.enter():
                    raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                                       f"more than {service.limits.max_inflight} requests in flight; retry")
                try:
                    payload = self._read_json()
                    answer = getattr(service, what)(self._key(), payload)
                finally:
                    service.leave()
                self._json(200, answer)
            except EngramError as e:
                self._error(e)

        def do_PUT(self) -> None:
            self._error(RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported"))

        do_DELETE = do_PATCH = do_PUT

        def _read_json(self) -> dict[str, Any]:
            return read_json_object(self, service.limits.max_body_bytes)

    return Handler


def make_patch_server(service: TenantService, host: str = "127.0.0.1", port: int = 0,
                      quiet: bool = False) -> EngramServer:
    """A bound tenant server (``port=0`` picks a free port: ``server.server_address[1]``)."""
    return bind_server(_handler_class(service, quiet), host, port)
