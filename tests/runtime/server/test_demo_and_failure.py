"""The demo runs end to end; an engine that breaks, or whose process dies, fails its requests
and the probes, never hangs."""

import functools
import json
import os
import signal
import threading
import time
from typing import Any

import httpx
from server_harness import running_server, value

from berth.runtime.engine import EngineConfig, RequestOutput
from berth.runtime.server.demo import run_demo
from berth.runtime.server.engine_process import ServableEngine, load_engine


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

    def __init__(self, engine: ServableEngine, good_steps: int) -> None:
        self._engine = engine
        self._good_steps = good_steps

    def step(self) -> list[RequestOutput]:
        if self._good_steps == 0:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        self._good_steps -= 1
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def breaking_engine(config: EngineConfig, good_steps: int) -> BreakingEngine:
    """The engine factory of the failure test; it runs in the engine process."""
    return BreakingEngine(load_engine(config), good_steps)


def test_engine_failure_fails_requests_with_500_and_fails_the_probes(
    engine_config: EngineConfig,
) -> None:
    factory = functools.partial(breaking_engine, engine_config, good_steps=2)
    with running_server(engine_config, factory) as server:
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


def test_engine_process_killed_mid_request_fails_it_with_500_and_fails_the_probes(
    engine_config: EngineConfig,
) -> None:
    with running_server(engine_config, engine_exit_code=-signal.SIGKILL) as server:
        process = server.model_server.loop.process
        assert process is not None and process.pid is not None
        url = f"{server.base_url}/v1/completions"
        body = {"model": "tiny", "prompt": "x", "max_tokens": 450, "ignore_eos": True}
        with httpx.stream("POST", url, json={**body, "stream": True}, timeout=30) as streamed:
            lines = streamed.iter_lines()
            assert next(lines).startswith("data: ")
            collected: list[httpx.Response] = []
            waiter = threading.Thread(target=lambda: collected.append(httpx.post(url, json=body)))
            waiter.start()
            deadline = time.monotonic() + 20
            while value(server.metrics(), "berth_requests_running") != 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(process.pid, signal.SIGKILL)
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            waiter.join(30)
        # The stream had begun: it ends with an error event (then [DONE]), not a hang.
        assert events[-1]["error"]["code"] == "engine_error"
        assert [r.status_code for r in collected] == [500]
        assert "exited unexpectedly" in collected[0].json()["error"]["message"]
        assert httpx.get(f"{server.base_url}/health").status_code == 503
        assert httpx.get(f"{server.base_url}/ready").status_code == 503
        assert httpx.post(url, json=body).json()["error"]["code"] == "engine_failed"
        assert value(server.metrics(), "berth_request_failure_total", reason="engine_error") == 2
