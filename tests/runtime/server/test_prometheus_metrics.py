"""Metrics move by exactly what known requests did, under Berth's names and vLLM's."""

from collections.abc import Iterator

import httpx
import pytest
from server_harness import NUM_KV_BLOCKS, RunningServer, running_server, value

from berth.runtime.engine import EngineConfig
from berth.runtime.engine.model_config import ModelConfig
from berth.runtime.server.metrics import MemoryBudget

PROMPT = list(range(3, 43))  # 40 token ids: two full 16-token blocks for the prefix cache


@pytest.fixture
def server(engine_config: EngineConfig) -> Iterator[RunningServer]:
    """A fresh server (fresh registry) per test, with a memory budget from the scheduler."""
    budget = MemoryBudget(request_bytes=3 << 30, limit_bytes=5 << 30)
    with running_server(engine_config, memory=budget) as server:
        yield server


def complete(server: RunningServer, max_tokens: int, **extra: object) -> dict:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **extra}  # fmt: skip
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_request_counters_and_histograms_count_known_requests(server: RunningServer) -> None:
    complete(server, max_tokens=6)
    complete(server, max_tokens=3)
    text = server.metrics()
    for prefix in ("berth_", "vllm:"):
        assert value(text, f"{prefix}prompt_tokens_total") == 2 * len(PROMPT)
        assert value(text, f"{prefix}generation_tokens_total") == 6 + 3
        assert value(text, f"{prefix}request_success_total", finished_reason="length") == 2
        assert value(text, f"{prefix}time_to_first_token_seconds_count") == 2
        assert value(text, f"{prefix}e2e_request_latency_seconds_count") == 2
        # One gap per token after the first: 5 + 2.
        assert value(text, f"{prefix}inter_token_latency_seconds_count") == 7
    # Per request, the gaps add up to the time from the first token to the last.
    itl = value(text, "berth_inter_token_latency_seconds_sum")
    e2e = value(text, "berth_e2e_request_latency_seconds_sum")
    ttft = value(text, "berth_time_to_first_token_seconds_sum")
    assert itl == pytest.approx(e2e - ttft, abs=1e-6)
    assert 0 < ttft < e2e


def test_refused_requests_are_counted_by_reason(server: RunningServer) -> None:
    url = f"{server.base_url}/v1/completions"
    assert httpx.post(url, json={"model": "tiny", "prompt": "x", "top_p": 7}).status_code == 400
    assert httpx.post(url, json={"model": "nope", "prompt": "x"}).status_code == 404
    text = server.metrics()
    assert value(text, "berth_request_failure_total", reason="invalid_value") == 1
    assert value(text, "berth_request_failure_total", reason="model_not_found") == 1
    assert value(text, "berth_request_success_total", finished_reason="length") == 0


def test_engine_gauges_prefix_cache_memory_and_state_are_exported(
    server: RunningServer, engine_config: EngineConfig
) -> None:
    """The engine process's own numbers reach the scrape: each server has a fresh engine, so
    the cumulative counters start at zero and move by exactly what the two requests did."""
    complete(server, max_tokens=2)
    complete(server, max_tokens=2)  # the same prompt: its two full blocks come from the cache
    text = server.metrics()
    queries = value(text, "vllm:prefix_cache_queries_total")
    hits = value(text, "vllm:prefix_cache_hits_total")
    assert queries == 2 * len(PROMPT)
    assert hits == 32
    assert value(text, "berth_prefix_cache_hit_rate") == pytest.approx(hits / queries)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # fmt: skip
        assert value(text, name) == 0, name
    model = ModelConfig.from_dir(engine_config.model)
    # K and V, per layer, per token slot, float32 on the CPU.
    block_bytes = (
        2 * model.num_layers * engine_config.block_size * model.num_kv_heads * model.head_dim * 4
    )
    kv_bytes = NUM_KV_BLOCKS * block_bytes
    assert value(text, "berth_kv_cache_blocks_total") == NUM_KV_BLOCKS
    assert value(text, "berth_kv_cache_blocks_free") == NUM_KV_BLOCKS
    assert value(text, "berth_kv_cache_bytes") == kv_bytes
    assert value(text, "berth_runtime_gpu_memory_resident_bytes") > kv_bytes  # + weights
    assert value(text, "berth_gpu_memory_request_bytes") == 3 << 30
    assert value(text, "berth_gpu_memory_limit_bytes") == 5 << 30
    assert value(text, "berth_standby_state", state="active") == 1
    assert value(text, "berth_standby_state", state="standby") == 0
    assert value(text, "berth_draining") == 0


def test_running_and_waiting_gauges_follow_a_live_stream(server: RunningServer) -> None:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()  # keep it: a dropped iterator closes the connection
        assert next(lines).startswith("data: ")
        text = server.metrics()
        assert value(text, "vllm:num_requests_running") == 1
        assert value(text, "berth_requests_running") == 1
        assert value(text, "vllm:num_requests_waiting") == 0
        assert 0 < value(text, "vllm:kv_cache_usage_perc") < 1
