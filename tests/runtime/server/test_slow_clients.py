"""Slow and vanishing clients, on raw sockets: a connection that never completes its headers is
closed, a body that stalls gets 408, connections are bounded, and a client that hangs up
mid-upload is counted as a client disconnect, not logged as a server error."""

import contextlib
import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from server_harness import RunningServer, running_server, value

from berth.runtime.engine import EngineConfig

TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def impatient(engine_config: EngineConfig) -> Iterator[RunningServer]:
    with running_server(
        engine_config, header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S
    ) as server:
        yield server


def connect(server: RunningServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data, time.monotonic() - started


def read_response(sock: socket.socket) -> bytes:
    """One whole response with a Content-Length body (its head and body may come apart)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


POST_HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n"
)


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half the headers"])  # fmt: skip
def test_a_connection_without_complete_headers_is_closed_and_counted(
    impatient: RunningServer, sent: bytes
) -> None:
    before = value(impatient.metrics(), "berth_http_header_timeouts_total")
    with connect(impatient) as sock:
        sock.sendall(sent)
        data, took = read_until_closed(sock)
    assert data == b""
    assert TIMEOUT_S * 0.9 < took < TIMEOUT_S + 3
    assert value(impatient.metrics(), "berth_http_header_timeouts_total") == before + 1


def test_an_idle_keep_alive_connection_must_send_its_next_headers_in_time(
    impatient: RunningServer,
) -> None:
    with connect(impatient) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = read_response(sock)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")  # and stall
        data, took = read_until_closed(sock)
    assert data == b"" and took < TIMEOUT_S + 3


def test_a_stalled_body_gets_408_and_the_connection_closes(impatient: RunningServer) -> None:
    before = value(impatient.metrics(), "berth_request_failure_total", reason="body_timeout")
    with connect(impatient) as sock:
        sock.sendall(POST_HEAD + b'{"model": "tiny", "prompt": "')
        data, took = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data
    assert b"connection: close" in head.lower()
    assert b'"code":"body_timeout"' in body
    assert took < TIMEOUT_S + 3
    metrics = impatient.metrics()
    assert value(metrics, "berth_request_failure_total", reason="body_timeout") == before + 1


def test_a_client_that_hangs_up_mid_upload_is_a_client_disconnect_not_an_error(
    impatient: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = impatient.metrics()
    before = value(metrics, "berth_request_failure_total", reason="client_disconnect")
    internal = value(metrics, "berth_request_failure_total", reason="internal_error")
    with caplog.at_level(logging.INFO), connect(impatient) as sock:
        sock.sendall(POST_HEAD + b'{"model": "tiny", "pro')
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while True:
        metrics = impatient.metrics()
        if value(metrics, "berth_request_failure_total", reason="client_disconnect") > before:
            break
        assert time.monotonic() < deadline, "the dropped upload was not counted"
        time.sleep(0.05)
    assert value(metrics, "berth_request_failure_total", reason="client_disconnect") == before + 1
    assert value(metrics, "berth_request_failure_total", reason="internal_error") == internal
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_connections_beyond_the_limit_get_503_and_the_server_recovers(
    engine_config: EngineConfig,
) -> None:
    with running_server(engine_config, max_connections=3) as server, contextlib.ExitStack() as held:
        idle = [held.enter_context(connect(server))]
        time.sleep(0.2)
        assert value(server.metrics(), "berth_http_connections") == 2  # with the scrape's own
        idle += [held.enter_context(connect(server)) for _ in range(2)]
        time.sleep(0.2)
        refused = httpx.get(f"{server.base_url}/v1/models", timeout=10)
        assert refused.status_code == 503
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.base_url}/v1/models", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
