"""Events are paced to a rate, oldest first, and the oldest are dropped past the backlog."""

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from berth.operator.events import EventPacer
from berth.operator.kube import KubeClient

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "ns", "uid": "u"}}


class Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[tuple[float, str]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.seen.append((time.monotonic(), body["message"]))
        self.send_response(201)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[KubeClient]:
    Recorder.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = KubeClient(f"http://127.0.0.1:{server.server_port}", False, None, None)
    yield client
    client.close()
    server.shutdown()


def wait_for(count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(Recorder.seen) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_burst_goes_out_at_once_and_the_rest_at_the_rate(api: KubeClient) -> None:
    pacer = EventPacer(api, qps=20.0, burst=5)
    started = time.monotonic()
    for i in range(15):
        pacer.post(POD, "Normal", "Scheduled", f"event {i}")
    wait_for(15)
    pacer.close()
    assert [message for _, message in Recorder.seen] == [f"event {i}" for i in range(15)]
    elapsed = Recorder.seen[-1][0] - started
    assert 0.4 <= elapsed < 2.0  # 10 events past the burst at 20/s: 0.5 s


def test_past_the_backlog_the_oldest_are_dropped(api: KubeClient) -> None:
    pacer = EventPacer(api, qps=2.0, burst=1, backlog=3)
    for i in range(10):
        pacer.post(POD, "Normal", "Scheduled", f"event {i}")
    assert pacer.dropped >= 6
    wait_for(4, timeout=5.0)
    pacer.close()
    messages = [message for _, message in Recorder.seen]
    assert messages[-3:] == ["event 7", "event 8", "event 9"]
