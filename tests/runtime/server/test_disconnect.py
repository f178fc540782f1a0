"""A client that leaves mid-request aborts it: its KV blocks go back to the pool at once."""

import httpx
import pytest
from server_harness import RunningServer, value, wait_idle

MAX_TOKENS = 450  # far more than a test waits for: the request cannot finish on its own


def long_request(stream: bool) -> dict[str, object]:
    return {"model": "tiny", "prompt": "Tell a long story", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "stream": stream}  # fmt: skip


def test_dropped_stream_frees_its_blocks(served: RunningServer) -> None:
    before = value(served.metrics(), "berth_request_failure_total", reason="client_disconnect")
    url = f"{served.base_url}/v1/completions"
    with httpx.stream("POST", url, json=long_request(True), timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        busy = served.metrics()
        assert value(busy, "berth_requests_running") == 1
        assert value(busy, "berth_kv_cache_blocks_free") < value(
            busy, "berth_kv_cache_blocks_total"
        )
    # Leaving the block closed the connection mid-stream.
    text = wait_idle(served)
    assert value(text, "berth_request_failure_total", reason="client_disconnect") == before + 1
    assert value(text, "berth_request_success_total", finished_reason="length") == 0


def test_client_that_gives_up_on_a_collected_response_aborts_its_request(
    served: RunningServer,
) -> None:
    before = value(served.metrics(), "berth_request_failure_total", reason="client_disconnect")
    tokens_before = value(served.metrics(), "berth_generation_tokens_total")
    url = f"{served.base_url}/v1/completions"
    # 450 tokens take the tiny model about a second at best; the client hangs up after 0.3 s.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=long_request(False), timeout=httpx.Timeout(60, read=0.3))
    text = wait_idle(served)
    assert value(text, "berth_request_failure_total", reason="client_disconnect") == before + 1
    assert value(text, "berth_generation_tokens_total") - tokens_before < MAX_TOKENS
