"""A stand-in for Prometheus' query API that a test drives: ``/api/v1/query`` answers as
Prometheus does for a range selector, with the in-flight requests the test sets per pod, observed
at ``clock()``; ``down`` answers 503 as a restarting Prometheus does. The real Prometheus is
tested against the same parser in tests/operator/test_autoscale_sources.py."""

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


class DrivenPrometheus:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.in_flight: dict[str, float] = {}
        self.down = False
        self.queries: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path != "/api/v1/query" or owner.down:
                    self.send_error(503 if owner.down else 404)
                    return
                owner.queries.append(parse_qs(url.query)["query"][0])
                body = json.dumps(owner.answer()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self) -> dict[str, Any]:
        now = self.clock()
        result = []
        for pod, value in dict(self.in_flight).items():
            for name, v in (("berth_requests_running", value), ("berth_requests_waiting", 0.0)):
                metric = {"__name__": name, "namespace": "ns", "pod": pod, "model": "m"}
                result.append({"metric": metric, "values": [[now, str(v)]]})
        return {"status": "success", "data": {"resultType": "matrix", "result": result}}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
