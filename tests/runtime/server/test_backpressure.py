"""A full waiting queue answers 429 with Retry-After; a request past its deadline is aborted."""

import contextlib
import threading
import time

import httpx
import openai
import pytest
from server_harness import MAX_NUM_SEQS, running_server, value, wait_idle

from berth.runtime.engine import EngineConfig


def body(max_tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": "tiny", "prompt": "Once upon a tide", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}  # fmt: skip


def fill_running_batch(client: httpx.Client, running: contextlib.ExitStack) -> None:
    """Open MAX_NUM_SEQS long streams, each past its first token (a stream's headers come with
    it), so the running batch is full; ``running`` closes them."""
    for _ in range(MAX_NUM_SEQS):
        response = running.enter_context(
            client.stream("POST", "/v1/completions", json=body(450, stream=True))
        )
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        running.callback(lambda lines=lines: lines.close())


def test_full_waiting_queue_answers_429_with_retry_after(engine_config: EngineConfig) -> None:
    with (
        running_server(engine_config, max_waiting_requests=1, retry_after_s=3) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
    ):
        queued: list[httpx.Response] = []
        with contextlib.ExitStack() as running:
            fill_running_batch(client, running)
            # One more waits in the engine's queue until a running one leaves.
            waiter = threading.Thread(
                target=lambda: queued.append(client.post("/v1/completions", json=body(3)))
            )
            waiter.start()
            deadline = time.monotonic() + 20
            while value(server.metrics(), "vllm:num_requests_waiting") != 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)

            refused = client.post("/v1/completions", json=body(3))
            assert refused.status_code == 429
            assert refused.headers["Retry-After"] == "3"
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
            sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                sdk.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1
                )
        # The running streams were dropped: the queued request runs and succeeds.
        waiter.join(30)
        assert [r.status_code for r in queued] == [200]
        text = wait_idle(server)
        assert value(text, "berth_request_failure_total", reason="queue_full") == 2
        assert client.post("/v1/completions", json=body(2)).status_code == 200


def test_request_past_its_deadline_gets_408_and_frees_its_blocks(
    engine_config: EngineConfig,
) -> None:
    with running_server(engine_config, request_timeout_s=0.3) as server:
        started = time.monotonic()
        response = httpx.post(f"{server.base_url}/v1/completions", json=body(450), timeout=60)
        assert response.status_code == 408
        assert time.monotonic() - started < 5
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("timeout_error", "request_timeout")
        text = wait_idle(server)
        assert value(text, "berth_request_failure_total", reason="timeout") == 1
        assert value(text, "berth_generation_tokens_total") < 450


def test_streamed_request_past_its_deadline_ends_with_an_error(engine_config: EngineConfig) -> None:
    with running_server(engine_config, request_timeout_s=0.3) as server:
        sdk = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)
        # Before the first token the timeout is a 408; after it, an error event ends the
        # stream. Either way the client learns of it as an error naming the timeout.
        with pytest.raises(openai.APIError, match="timeout"):
            for _ in sdk.completions.create(
                model="tiny", prompt="Once", max_tokens=450, stream=True,
                extra_body={"ignore_eos": True},
            ):  # fmt: skip
                pass
        text = wait_idle(server)
        assert value(text, "berth_request_failure_total", reason="timeout") == 1


def test_no_waiting_room_refuses_beyond_the_running_batch(engine_config: EngineConfig) -> None:
    with (
        running_server(engine_config, max_waiting_requests=0) as server,
        httpx.Client(base_url=server.base_url, timeout=60) as client,
        contextlib.ExitStack() as running,
    ):
        fill_running_batch(client, running)
        assert client.post("/v1/completions", json=body(2)).status_code == 429
