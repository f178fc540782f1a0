"""Prompt log-probabilities over HTTP: lm-evaluation-harness's ``echo`` + ``logprobs`` requests
(``max_tokens`` 0 or 1) and vLLM's ``prompt_logprobs``, checked against the engine's values."""

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from server_harness import RunningServer

from berth.runtime.engine import Engine, EngineConfig, SamplingParams, TokenLogprob

PROMPT = "The ships sail into the berth, héllo"


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def engine(engine_config: EngineConfig) -> Engine:
    return Engine(engine_config)


def _engine_prompt_logprobs(engine: Engine, prompt: str | list[int]) -> list[TokenLogprob | None]:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    entries = engine.generate([prompt], params)[0].prompt_logprobs
    assert entries is not None
    return entries


def _complete(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, **fields}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_lm_eval_loglikelihood_requests(client: httpx.Client, engine: Engine) -> None:
    """``echo``, ``logprobs: 1``, ``max_tokens`` 0: the prompt alone with every token's entry;
    ``max_tokens`` 1 adds the one greedy token after the same prompt entries (lm-eval reads
    ``token_logprobs[ctxlen:-1]``)."""
    want = _engine_prompt_logprobs(engine, PROMPT)
    bare = _complete(client, echo=True, logprobs=1, max_tokens=0)
    choice = bare["choices"][0]
    assert choice["text"] == PROMPT
    assert choice["finish_reason"] == "length"
    assert bare["usage"]["completion_tokens"] == 0
    assert bare["usage"]["prompt_tokens"] == len(want)
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(want)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for entry, got, top in zip(
        want[1:], logprobs["token_logprobs"][1:], logprobs["top_logprobs"][1:], strict=True
    ):
        assert entry is not None
        assert got == pytest.approx(entry.logprob, abs=1e-5)
        assert list(top.values()) == pytest.approx([entry.top[0][1]], abs=1e-5)
    # Each token's text sits at its offset in the returned text.
    text = choice["text"]
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"], strict=True):
        assert text[offset : offset + len(token)] == token
    assert "".join(logprobs["tokens"]) == text
    assert "prompt_logprobs" not in choice  # vLLM's field only when asked for

    one = _complete(client, echo=True, logprobs=1, max_tokens=1)
    choice = one["choices"][0]
    assert one["usage"]["completion_tokens"] == 1
    extended = choice["logprobs"]
    assert extended["token_logprobs"][: len(want)] == logprobs["token_logprobs"]
    assert extended["text_offset"][: len(want)] == logprobs["text_offset"]
    assert len(extended["tokens"]) == len(want) + 1
    assert choice["text"] == PROMPT + extended["tokens"][-1]
    assert extended["text_offset"][-1] == len(PROMPT)
    plain = _complete(client, logprobs=1, max_tokens=1)["choices"][0]
    assert plain["logprobs"]["token_logprobs"] == extended["token_logprobs"][-1:]


def test_echo_with_logprobs_from_token_ids_streams_what_it_collects(
    client: httpx.Client,
) -> None:
    """Streamed, the echoed prompt and its entries go out in the choice's first chunk; the
    chunks together are the collected answer."""
    fields = {"prompt": [5, 6, 7, 8, 9, 10], "echo": True, "logprobs": 2, "max_tokens": 4,
              "ignore_eos": True}  # fmt: skip
    collected = _complete(client, **fields)["choices"][0]
    body = {"model": "tiny", "temperature": 0, "stream": True, **fields}
    text, tokens, values, offsets = "", [], [], []
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            if choice["logprobs"] is not None:
                tokens += choice["logprobs"]["tokens"]
                values += choice["logprobs"]["token_logprobs"]
                offsets += choice["logprobs"]["text_offset"]
    assert text == collected["text"]
    assert tokens == collected["logprobs"]["tokens"]
    assert values == collected["logprobs"]["token_logprobs"]
    assert offsets == collected["logprobs"]["text_offset"]
    assert values[0] is None and len(values) == 6 + 4


def _check_vllm_shape(
    scored: list[dict[str, dict[str, Any]] | None], want: list[TokenLogprob | None], top: int
) -> None:
    assert len(scored) == len(want)
    assert scored[0] is None
    for position, entry in zip(scored[1:], want[1:], strict=True):
        assert position is not None and entry is not None
        own = position[str(entry.token_id)]
        assert set(own) == {"logprob", "rank", "decoded_token"}
        assert own["logprob"] == pytest.approx(entry.logprob, abs=1e-5)
        assert own["rank"] == entry.rank
        ranks = {v["rank"] for k, v in position.items() if k != str(entry.token_id)}
        assert ranks <= set(range(1, top + 1))
        best = position[str(entry.top[0][0])]
        assert best["rank"] == 1 and best["logprob"] == pytest.approx(entry.top[0][1], abs=1e-5)
        assert len(position) in (top, top + 1)


def test_vllm_prompt_logprobs_on_completions_and_chat(client: httpx.Client, engine: Engine) -> None:
    completion = _complete(client, prompt_logprobs=2, max_tokens=2, n=2)
    want = _engine_prompt_logprobs(engine, PROMPT)
    for choice in completion["choices"]:
        assert choice["logprobs"] is None  # the legacy object only with logprobs
        _check_vllm_shape(choice["prompt_logprobs"], want, 2)

    messages = [{"role": "user", "content": "hello"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 2, "prompt_logprobs": 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    chat = response.json()
    ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
    assert chat["usage"]["prompt_tokens"] == len(ids)
    want = _engine_prompt_logprobs(engine, ids)
    _check_vllm_shape(chat["prompt_logprobs"], want, 1)
    assert "prompt_logprobs" not in chat["choices"][0]
    plain = client.post("/v1/chat/completions", json={**body, "prompt_logprobs": None}).json()
    assert "prompt_logprobs" not in plain


def test_openapi_describes_prompt_logprobs_and_echo_only_answers(client: httpx.Client) -> None:
    components = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("CompletionRequest", "ChatCompletionRequest"):
        field = components[model]["properties"]["prompt_logprobs"]
        assert "every prompt token" in field["description"]
    completion = components["CompletionRequest"]["properties"]
    assert "0 only with echo" in completion["max_tokens"]["description"]
    assert "with echo, of the prompt's tokens too" in completion["logprobs"]["description"]
    assert "prompt_logprobs" in components["CompletionChoice"]["properties"]
    assert components["PromptLogprob"]["required"] == ["logprob"]
