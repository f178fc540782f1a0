"""A huge prompt never stalls the server: it is bounded by bytes before tokenizing, and what is
tokenized is tokenized off the event loop, so liveness answers within a second meanwhile."""

import threading
import time

import httpx
from server_harness import running_server

from berth.runtime.engine import EngineConfig

HUGE = "ships and berths harbour " * (7_000_000 // 25)  # 7 MB, under the 8 MiB body limit


def health_latencies(base_url: str, stop: threading.Event) -> list[float]:
    """Poll /health until ``stop``; the seconds each answer took."""
    latencies: list[float] = []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        while not stop.is_set():
            started = time.monotonic()
            assert client.get("/health").status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
    return latencies


def test_a_prompt_over_the_byte_limit_is_refused_before_tokenizing(
    engine_config: EngineConfig,
) -> None:
    with running_server(engine_config) as server:
        started = time.monotonic()
        body = {"model": "tiny", "prompt": HUGE, "max_tokens": 1}
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 413
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("prompt_too_large", "prompt")
        assert (
            "at most 65536 bytes" in error["message"] and "--max-prompt-bytes" in error["message"]
        )
        # Tokenizing it took 7-12 s on this machine; refusing it takes a JSON parse.
        assert time.monotonic() - started < 3


def test_liveness_answers_within_a_second_while_a_huge_prompt_is_tokenized(
    engine_config: EngineConfig,
) -> None:
    """With the byte bound lifted, the 7 MB prompt is tokenized (for seconds): meanwhile the
    event loop keeps serving /health."""
    with running_server(engine_config, max_prompt_bytes=8 << 20) as server:
        stop = threading.Event()
        latencies: list[float] = []
        poller = threading.Thread(
            target=lambda: latencies.extend(health_latencies(server.base_url, stop))
        )
        poller.start()
        try:
            started = time.monotonic()
            body = {"model": "tiny", "prompt": HUGE, "max_tokens": 1}
            response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
            took = time.monotonic() - started
        finally:
            stop.set()
            poller.join(30)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert took > 1.0, "the prompt should have taken a while to tokenize"
        assert len(latencies) >= 3
        assert max(latencies) < 1.0, (
            f"/health took {max(latencies):.2f} s (tokenizing {took:.1f} s)"
        )
