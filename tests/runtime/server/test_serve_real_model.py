"""``berth serve --model smollm2`` serves the real model by name: imported on demand (from the
cache after the first time), listed under its name, answering a chat question correctly; and
it calls a function it is told to call with the arguments the question gives, and one it
chooses to call beside a JSON response format."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jsonschema_rs
from server_harness import running_server

from berth.runtime.engine import EngineConfig
from berth.runtime.engine.gguf_import import import_model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_serve_by_name_imports_smollm2_and_answers_paris(tmp_path: Path) -> None:
    import_model("smollm2", say=lambda _: None)  # a cold import is not what this test times
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "berth", "serve", "--model", "smollm2", "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "2",
             "--max-model-len", "512", "--num-kv-blocks", "64", "--no-access-log"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while True:
                assert process.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                        break
                assert time.monotonic() < deadline, "berth serve did not become ready"
                time.sleep(0.2)
            models = httpx.get(f"{base_url}/v1/models", timeout=10).json()
            assert [m["id"] for m in models["data"]] == ["smollm2"]
            question = {"role": "user", "content": "What is the capital of France?"}
            body = {"model": "smollm2", "messages": [question], "max_tokens": 24}
            reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert "Paris" in choice["message"]["content"]
            assert choice["finish_reason"] == "stop"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            assert "already imported at" in log_path.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_smollm2_calls_the_function_it_is_told_to_with_the_city_asked_about() -> None:
    """SmolLM2's template ignores tools, so they reach it in the system message; the forced
    call's grammar keeps the arguments valid, and the model fills in what the question says."""
    model = import_model("smollm2", say=lambda _: None)
    parameters = {"type": "object", "additionalProperties": False, "required": ["city"],
                  "properties": {"city": {"type": "string", "description": "The city's name"}}}  # fmt: skip
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters,
                                             "description": "Get the current weather in a city."}}  # fmt: skip
    engine = EngineConfig(model=str(model), device="cpu", dtype="float32", max_num_seqs=2,
                          max_model_len=1024, num_kv_blocks=64)  # fmt: skip
    question = [{"role": "user", "content": "What's the weather in Paris?"}]
    with running_server(engine, served_model_name="smollm2") as server:
        body = {"model": "smollm2", "messages": question, "tools": [tool], "max_tokens": 60,
                "temperature": 0.0}  # fmt: skip
        named = {**body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        for forced in (named, {**body, "tool_choice": "required"}):
            reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=forced, timeout=120)
            assert reply.status_code == 200, reply.text
            choice = reply.json()["choices"][0]
            assert choice["finish_reason"] == "tool_calls", choice
            for call in choice["message"]["tool_calls"]:
                assert call["function"]["name"] == "get_weather"
                arguments = json.loads(call["function"]["arguments"])
                assert jsonschema_rs.validator_for(parameters).is_valid(arguments)
                assert arguments["city"] == "Paris"  # what SmolLM2 writes greedily
        # Unforced (auto), a strict tool beside a JSON response format: SmolLM2 chooses to
        # call, and the call is valid (the grammar offers the format's JSON or calls).
        strict = {**tool, "function": {**tool["function"], "strict": True}}
        chosen = {**body, "tools": [strict], "response_format": {"type": "json_object"},
                  "parallel_tool_calls": False}  # fmt: skip
        reply = httpx.post(f"{server.base_url}/v1/chat/completions", json=chosen, timeout=120)
        choice = reply.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
