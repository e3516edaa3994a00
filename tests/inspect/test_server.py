"""`engram serve` on loopback: correct answers, clear 4xx errors, survives concurrent and bad clients."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from engram.data.tokenizer import load_tokenizer
from engram.errors import EngramError, NotFoundError, RequestTooLargeError
from engram.inspect import server as server_module
from engram.inspect.heatmap import InspectError, TextTooLongError, inspect_text
from engram.inspect.server import (
    InspectService,
    ServeConfigError,
    ServeLimits,
    is_loopback,
    make_server,
    serve_in_thread,
)
from engram.model.checkpoint import load_model

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def loaded(inspect_run):
    run, _ = inspect_run
    model, _ = load_model(run)
    return model, load_tokenizer(run)


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    service = InspectService(model, tok, ServeLimits(max_chars=300, max_body_bytes=4096,
                                                     max_inflight=8, socket_timeout_s=1.0))
    srv = make_server(service, HOST, 0, quiet=True)
    thread = serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _request(srv, method: str, path: str, body=None, ctype: str = "application/json",
             headers=None) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection(HOST, srv.server_address[1], timeout=10)
    try:
        hdrs = dict(headers or {})
        if body is not None:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            if ctype:
                hdrs["Content-Type"] = ctype
            conn.request(method, path, body=raw, headers=hdrs)
        else:
            conn.request(method, path, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read().decode()
        is_json = resp.getheader("Content-Type", "").startswith("application/json")
        return resp.status, json.loads(data) if is_json else data
    finally:
        conn.close()


def test_answers_match_inspect(server, loaded) -> None:
    model, tok = loaded
    status, data = _request(server, "POST", "/api/inspect", {"text": "the Prince of Wales"})
    assert status == 200
    assert data == json.loads(json.dumps(inspect_text(model, tok, "the Prince of Wales").to_dict()))
    status, info = _request(server, "GET", "/api/info")
    assert status == 200 and [l["layer_id"] for l in info["layers"]] == [0, 1]
    assert info["limits"]["max_chars"] == 300
    status, page = _request(server, "GET", "/")
    assert status == 200 and "<textarea" in page and '"live": true' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert _request(server, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("body, ctype, status, message", [
    (b"{not json", "application/json", 400, "not valid UTF-8 JSON"),
    (b"\xff\xfe", "application/json", 400, "not valid UTF-8 JSON"),
    ({"txt": "a"}, "application/json", 400, "missing field 'text'"),
    ({"text": 3}, "application/json", 400, "must be a string"),
    ({"text": ""}, "application/json", 400, "is empty"),
    (["text"], "application/json", 400, "JSON object"),
    ({"text": "a"}, "text/plain", 415, "send application/json"),
    ({"text": "a"}, None, 415, "send application/json"),
    ({"text": "x" * 301}, "application/json", 413, "the limit is 300"),
    ({"text": "x!" * 100}, "application/json", 413, "max_seq_len"),  # < 300 chars, > 64 tokens
    ({"text": "a" * 5000}, "application/json", 413, "limit is 4096"),  # body over max_body_bytes
])
def test_bad_requests_get_clear_4xx(server, body, ctype, status, message) -> None:
    got, data = _request(server, "POST", "/api/inspect", body, ctype)
    assert got == status and message in data["error"] and data["status"] == status


@pytest.mark.parametrize("error, status", [
    (EngramError("bad value; fix it"), 400),
    (InspectError("the text mentions max_seq_len but is fine"), 400),  # the wording does not matter
    (NotFoundError("no such thing"), 404),
    (RequestTooLargeError("too big"), 413),
    (TextTooLongError("too many tokens"), 413),
])
def test_status_is_chosen_by_error_type(loaded, monkeypatch, error, status) -> None:
    model, tok = loaded

    def refuse(*_args):
        raise error

    monkeypatch.setattr(server_module, "inspect_text", refuse)
    srv = make_server(InspectService(model, tok, ServeLimits(cache_entries=0)), HOST, 0, quiet=True)
    thread = serve_in_thread(srv)
    try:
        got, data = _request(srv, "POST", "/api/inspect", {"text": "the king"})
        assert (got, data) == (status, {"error": str(error), "status": status})
        assert _request(srv, "GET", "/healthz")[0] == 200  # still up
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def test_every_error_class_of_the_package_is_an_engram_error() -> None:
    """So a server, or the command line, can answer any of them by type."""
    import importlib
    import inspect
    import pkgutil

    import engram

    classes = []
    for info in pkgutil.walk_packages(engram.__path__, "engram."):
        if info.name == "engram.__main__":  # running it parses sys.argv
            continue
        module = importlib.import_module(info.name)
        classes += [obj for obj in vars(module).values() if inspect.isclass(obj)
                    and issubclass(obj, BaseException) and obj.__module__ == module.__name__]
    assert len(classes) > 20
    assert [c.__qualname__ for c in classes if not issubclass(c, EngramError)] == []


def test_too_long_sequences_are_request_too_large_errors(loaded) -> None:
    model, tok = loaded
    with pytest.raises(RequestTooLargeError, match="exceeds max_seq_len=64") as e:
        model(torch.zeros(1, 65, dtype=torch.long))
    assert e.value.http_status == 413 and isinstance(e.value, ValueError)  # callers catching ValueError still do


def test_routes_and_methods(server) -> None:
    assert _request(server, "GET", "/nope")[0] == 404
    assert _request(server, "POST", "/nope", {"text": "a"})[0] == 404
    assert _request(server, "GET", "/api/inspect")[0] == 405
    assert _request(server, "POST", "/api/info", {"text": "a"})[0] == 405
    assert _request(server, "DELETE", "/api/inspect")[0] == 405


def test_missing_length_and_stalled_body(server) -> None:
    port = server.server_address[1]
    with socket.create_connection((HOST, port), timeout=5) as s:  # no Content-Length
        s.sendall(b"POST /api/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n")
        assert b" 411 " in s.recv(4096).split(b"\r\n", 1)[0]
    stalled = socket.create_connection((HOST, port), timeout=5)  # promises 100 bytes, sends 2
    stalled.sendall(b"POST /api/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 100\r\n\r\n{\"")
    assert _request(server, "POST", "/api/inspect", {"text": "the queen"})[0] == 200  # not blocked
    t0 = time.monotonic()
    stalled.settimeout(5)
    data = stalled.recv(4096)  # the server gives up after socket_timeout_s and closes
    assert time.monotonic() - t0 < 4 and (data == b"" or b" 400 " in data)
    stalled.close()


def test_concurrent_requests_all_answered_correctly(server, loaded) -> None:
    model, tok = loaded
    texts = [f"the king of france {i} rode to the tower" for i in range(8)]
    expected = {t: inspect_text(model, tok, t).to_dict()["layers"][1]["gates"] for t in texts}
    bad = [({"txt": 1}, "application/json", 400), (b"{", "application/json", 400),
           ({"text": "y" * 400}, "application/json", 413), ({"text": "a"}, "text/html", 415)]
    jobs = [("good", t) for t in texts for _ in range(3)] + [("bad", b) for b in bad for _ in range(2)]

    def go(job):
        kind, item = job
        if kind == "good":
            status, data = _request(server, "POST", "/api/inspect", {"text": item})
            return status == 200 and data["layers"][1]["gates"] == expected[item]
        body, ctype, want = item
        return _request(server, "POST", "/api/inspect", body, ctype)[0] == want

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(go, jobs))
    assert all(results) and len(results) == 32
    assert _request(server, "GET", "/healthz")[0] == 200  # still up


def test_inflight_limit_answers_503(loaded) -> None:
    model, tok = loaded
    service = InspectService(model, tok, ServeLimits(max_inflight=1, queue_wait_s=0.05, cache_entries=0))
    srv = make_server(service, HOST, 0, quiet=True)
    thread = serve_in_thread(srv)
    try:
        service._lock.acquire()  # hold the model: the first request waits inside its slot
        first: dict = {}
        t = threading.Thread(target=lambda: first.update(r=_request(srv, "POST", "/api/inspect",
                                                                    {"text": "the king"})))
        t.start()
        deadline = time.monotonic() + 5
        while service.inflight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service.inflight == 1
        status, data = _request(srv, "POST", "/api/inspect", {"text": "the queen"})
        assert status == 503 and "retry" in data["error"]
        service._lock.release()
        t.join(timeout=10)
        assert first["r"][0] == 200
        assert _request(srv, "POST", "/api/inspect", {"text": "the queen"})[0] == 200
    finally:
        if service._lock.locked():
            service._lock.release()
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def test_settings_are_validated() -> None:
    with pytest.raises(ServeConfigError, match="max_chars=0"):
        ServeLimits(max_chars=0)
    with pytest.raises(ServeConfigError, match="queue_wait_s"):
        ServeLimits(queue_wait_s=-1)
    with pytest.raises(ServeConfigError, match="socket_timeout_s"):
        ServeLimits(socket_timeout_s=0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
