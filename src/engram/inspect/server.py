"""``engram serve``: a small local web app that shades tokens by Engram gate as you type.

Routes
    GET  /              the page (inline CSS/JS, nothing loaded from elsewhere)
    GET  /api/info      model facts, Engram layers and branches, request limits
    GET  /healthz       {"ok": true}
    POST /api/inspect   {"text": "..."} -> the ``engram inspect --json`` document

Bad requests get a JSON ``{"error": ...}`` with a 4xx status: 400 bad JSON / missing or
mistyped field, 404 unknown route, 405 wrong method, 411 no Content-Length, 413 body or text
too long, 415 not ``application/json``; 503 when ``max_inflight`` requests are being answered
and no slot frees up within ``queue_wait_s`` (callers retry). The status is the error's type's
``http_status`` (:class:`~engram.errors.EngramError`: 400 unless a subclass says otherwise,
e.g. 413 for :class:`~engram.errors.RequestTooLargeError`), never read from the message. The
model runs under one lock: two forward passes at once on 2 cores would only be slower. stdlib
``http.server``
(``ThreadingHTTPServer``) is enough for a local tool; no framework is needed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
import threading
import time
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from tokenizers import Tokenizer

from engram.config import ServeConfigError, ServeLimits
from engram.errors import EngramError
from engram.inspect.heatmap import InspectError, inspect_text, model_info, render_page
from engram.model.lm import EngramLM


class RequestError(EngramError):
    """A request the server refuses for HTTP reasons (route, method, headers, body), with the
    status it answers."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.http_status = int(status)


def read_json_object(handler: BaseHTTPRequestHandler, max_bytes: int, shape: str = "") -> dict[str, Any]:
    """The request body of ``handler`` as a JSON object, refused with a :class:`RequestError`
    (status and one-line reason) before anything is read when its type or length is wrong.
    ``shape`` names the object expected, for the message."""
    ctype = handler.headers.get("Content-Type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type {ctype or '(none)'!r}; send application/json")
    raw_len = handler.headers.get("Content-Length")
    if raw_len is None:
        raise RequestError(HTTPStatus.LENGTH_REQUIRED, "Content-Length is required")
    try:
        length = int(raw_len)
    except ValueError:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {raw_len!r} is not a number") from None
    if length < 0:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {length} is negative")
    if length > max_bytes:  # refuse before reading it
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; the limit is {max_bytes}")
    raw = handler.rfile.read(length)
    if len(raw) != length:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body ended after {len(raw)} of {length} bytes")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not valid UTF-8 JSON: {e}") from None
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"body must be a JSON object{' ' + shape if shape else ''}, got {type(payload).__name__}")
    return payload


class RequestSlots:
    """At most ``limits.max_inflight`` requests at once, each waiting at most ``queue_wait_s``
    for a slot; the base of both servers' services, which hold ``limits`` and call
    ``_open_slots`` from their ``__init__``."""

    limits: ServeLimits

    def _open_slots(self, limits: ServeLimits) -> None:
        self.slots = threading.BoundedSemaphore(limits.max_inflight)
        self.inflight = 0  # requests holding a slot now (for /healthz and tests)
        self._count_lock = threading.Lock()

    def enter(self) -> bool:
        """Take a request slot, waiting at most ``queue_wait_s``; False when none freed up."""
        if not self.slots.acquire(timeout=self.limits.queue_wait_s):
            return False
        with self._count_lock:
            self.inflight += 1
        return True

    def leave(self) -> None:
        with self._count_lock:
            self.inflight -= 1
        self.slots.release()


class InspectService(RequestSlots):
    """The model, its tokenizer, one lock around forward passes and a small result cache."""

    def __init__(self, model: EngramLM, tokenizer: Tokenizer, limits: Optional[ServeLimits] = None):
        if not model.engram_layers:
            raise InspectError("the model has no Engram layers; serve a run trained with an "
                               "engram-* preset")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.limits = limits or ServeLimits()
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self.requests_served = 0
        self._open_slots(self.limits)

    def info(self) -> dict[str, Any]:
        return {"model": model_info(self.model),
                "layers": [{"layer_id": l.layer_id, "num_branches": self.model.cfg.hc_mult}
                           for l in self.model.engram_layers],
                "limits": {"max_chars": self.limits.max_chars,
                           "max_body_bytes": self.limits.max_body_bytes,
                           "max_tokens": self.model.cfg.max_seq_len}}

    def inspect_json(self, text: str) -> bytes:
        if len(text) > self.limits.max_chars:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"text has {len(text)} characters; the limit is {self.limits.max_chars}")
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                self.requests_served += 1
                return hit
            ins = inspect_text(self.model, self.tokenizer, text)  # an EngramError carries its status
            body = json.dumps(ins.to_dict(), ensure_ascii=False).encode("utf-8")
            if self.limits.cache_entries:
                self._cache[text] = body
                while len(self._cache) > self.limits.cache_entries:
                    self._cache.popitem(last=False)
            self.requests_served += 1
            return body


class JsonHandler(BaseHTTPRequestHandler):
    """What both servers' request handlers share: JSON and byte responses with the same safety
    headers, errors answered with their type's status, and a log that ``quiet_log`` silences."""

    quiet_log = False
    json_ascii = True  # json.dumps(ensure_ascii=...) of the responses

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if not self.quiet_log:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=self.json_ascii).encode("utf-8"),
                   "application/json; charset=utf-8")

    def _error(self, err: EngramError) -> None:
        """Answer ``err`` with its type's status (never chosen by the message's wording)."""
        self.close_connection = True  # the body may not have been read: do not reuse
        self._json(err.http_status, {"error": str(err), "status": err.http_status})


def bind_server(handler: type[BaseHTTPRequestHandler], host: str, port: int) -> "EngramServer":
    """An :class:`EngramServer` bound to host:port (``port=0`` picks a free port)."""
    if not 0 <= port <= 65535:
        raise ServeConfigError(f"port={port} must be in 0..65535 (0 picks a free port)")
    return EngramServer((host, port), handler)


def _handler_class(service: InspectService, quiet: bool) -> type[BaseHTTPRequestHandler]:
    page = render_page(None, live=True).encode("utf-8")

    class Handler(JsonHandler):
        server_version = "engram-serve/1"
        timeout = service.limits.socket_timeout_s  # applied to the socket by StreamRequestHandler
        quiet_log = quiet

        # -- routing
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/":
                self._send(200, page, "text/html; charset=utf-8")
            elif path == "/api/info":
                self._json(200, service.info())
            elif path == "/healthz":
                self._json(200, {"ok": True, "requests_served": service.requests_served,
                                 "inflight": service.inflight})
            elif path == "/api/inspect":
                self._error(RequestError(HTTPStatus.METHOD_NOT_ALLOWED,
                                         "use POST /api/inspect with a JSON body {\"text\": ...}"))
            else:
                self._error(RequestError(HTTPStatus.NOT_FOUND, f"no route {path!r}; routes: GET /, "
                                         f"GET /api/info, GET /healthz, POST /api/inspect"))

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                if path != "/api/inspect":
                    raise RequestError(HTTPStatus.NOT_FOUND if path not in ("/", "/api/info", "/healthz")
                                       else HTTPStatus.METHOD_NOT_ALLOWED,
                                       f"no POST route {path!r}; use POST /api/inspect")
                if not service.enter():
                    raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                                       f"more than {service.limits.max_inflight} requests in flight; retry")
                try:
                    text = self._read_text()
                    body = service.inspect_json(text)
                finally:
                    service.leave()
                self._send(200, body, "application/json; charset=utf-8")
            except EngramError as e:  # RequestError or bad input found while inspecting
                self._error(e)

        def do_PUT(self) -> None:
            self._error(RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported"))

        do_DELETE = do_PATCH = do_PUT

        def _read_text(self) -> str:
            payload = read_json_object(self, service.limits.max_body_bytes, '{"text": ...}')
            if "text" not in payload:
                raise RequestError(HTTPStatus.BAD_REQUEST, "missing field 'text'")
            text = payload["text"]
            if not isinstance(text, str):
                raise RequestError(HTTPStatus.BAD_REQUEST,
                                   f"field 'text' must be a string, got {type(text).__name__}")
            if not text:
                raise RequestError(HTTPStatus.BAD_REQUEST, "field 'text' is empty; send some text")
            return text

    return Handler


class EngramServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never blocks shutdown
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client went away or stalled: nothing to answer, nothing to log
        super().handle_error(request, client_address)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(service: InspectService, host: str = "127.0.0.1", port: int = 0,
                quiet: bool = False) -> EngramServer:
    """A bound server (``port=0`` picks a free port: ``server.server_address[1]``)."""
    return bind_server(_handler_class(service, quiet), host, port)


def serve_in_thread(server: EngramServer) -> threading.Thread:
    """Run ``server`` in a daemon thread (for tests and notebooks); stop with server.shutdown()."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="engram-serve", daemon=True)
    thread.start()
    return thread


def wait_until_up(host: str, port: int, timeout_s: float = 5.0) -> None:
    """Block until something accepts connections on host:port (OSError after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
