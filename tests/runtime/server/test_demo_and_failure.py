"""The demo runs end to end; an engine that breaks fails its requests and the probes, never hangs."""

from typing import Any

import httpx
from server_harness import running_server, value

from berth.runtime.engine import Engine, RequestOutput
from berth.runtime.server.demo import run_demo


def test_demo_prints_the_answer_and_the_metric_line_that_counted_it() -> None:
    lines: list[str] = []
    answer = run_demo(say=lines.append)
    assert answer
    assert any(line.startswith("tiny (random weights") for line in lines)
    assert any('vllm:request_success_total{finished_reason="length",model_name="tiny"} 1.0' in line
               for line in lines)  # fmt: skip
    assert "berth_generation_tokens_total" in "\n".join(lines)
    assert lines[-1] == "server drained and exited with status 0"


class BreakingEngine:
    """The real engine, except that its step raises after ``good_steps`` steps (a GPU fault)."""

    def __init__(self, engine: Engine, good_steps: int) -> None:
        self._engine = engine
        self._good_steps = good_steps

    def step(self) -> list[RequestOutput]:
        if self._good_steps == 0:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self._good_steps -= 1
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_engine_failure_fails_requests_with_500_and_fails_the_probes(engine: Engine) -> None:
    with running_server(engine, driven=BreakingEngine(engine, good_steps=2)) as server:
        url = f"{server.base_url}/v1/completions"
        body = {"model": "tiny", "prompt": "x", "max_tokens": 20, "ignore_eos": True}
        failed = httpx.post(url, json=body, timeout=30)
        assert failed.status_code == 500
        assert failed.json()["error"]["code"] == "engine_error"
        assert httpx.get(f"{server.base_url}/health").status_code == 503
        assert httpx.get(f"{server.base_url}/ready").status_code == 503
        again = httpx.post(url, json=body, timeout=30)
        assert again.status_code == 503
        assert again.json()["error"]["code"] == "engine_failed"
        text = server.metrics()
        assert value(text, "berth_request_failure_total", reason="engine_error") == 1
        assert value(text, "berth_request_failure_total", reason="engine_failed") == 1
