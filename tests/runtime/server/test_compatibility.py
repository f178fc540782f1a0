"""What OpenAI and vLLM clients expect beyond the happy path: model retrieval, a model listed
only once loaded, cached prompt tokens, vLLM's per-chunk usage, whole-number floats, and an
``/openapi.json`` that describes the bodies and errors."""

import asyncio
import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from server_harness import RunningServer

from berth.runtime.engine import EngineConfig
from berth.runtime.engine.tokenizer import Tokenizer
from berth.runtime.server.app import create_app
from berth.runtime.server.engine_process import load_engine
from berth.runtime.server.prompts import NothingToContinue, continued
from berth.runtime.server.settings import ServerSettings


@pytest.fixture(scope="module")
def client(served: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.base_url, timeout=60) as client:
        yield client


def test_a_model_is_retrieved_by_id_and_an_unknown_one_is_an_openai_404(
    served: RunningServer,
) -> None:
    sdk = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0)
    model = sdk.models.retrieve("tiny")
    assert (model.id, model.object, model.owned_by) == ("tiny", "model", "berth")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("gpt-4")
    error = caught.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert "'gpt-4' does not exist" in error["message"]


def test_no_model_is_listed_before_it_is_loaded(engine_config: EngineConfig) -> None:
    """The app before its lifespan has started the engine: nothing is loaded yet."""
    settings = ServerSettings(engine=engine_config, served_model_name="tiny")
    app = create_app(settings, functools.partial(load_engine, engine_config))

    async def ask() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            listed = await client.get("/v1/models")
            retrieved = await client.get("/v1/models/tiny")
            unknown = await client.get("/v1/models/other")
            return listed, retrieved, unknown

    listed, retrieved, unknown = asyncio.run(ask())
    assert listed.status_code == 200 and listed.json() == {"object": "list", "data": []}
    assert retrieved.status_code == 503
    assert retrieved.json()["error"]["code"] == "model_loading"
    assert unknown.status_code == 404


def test_a_repeated_prompt_reports_its_prefix_cache_hits_as_cached_tokens(
    client: httpx.Client,
) -> None:
    prompt = "The harbour master logs every berth and every tide, " * 4  # > 2 KV blocks
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = client.post("/v1/completions", json=body).json()["usage"]
    second = client.post("/v1/completions", json=body).json()["usage"]
    assert first["prompt_tokens"] == second["prompt_tokens"] > 32
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    # Whole 16-token blocks of the prompt come from the cache; the last token is recomputed.
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 32 and cached % 16 == 0 and cached < second["prompt_tokens"]


def stream_events(client: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    return [json.loads(line[6:]) for line in lines]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_puts_the_usage_so_far_in_every_chunk(
    client: httpx.Client, path: str
) -> None:
    body: dict[str, Any] = {
        "model": "tiny", "max_tokens": 6, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }  # fmt: skip
    if path == "/v1/completions":
        body["prompt"] = "Tide tables"
    else:
        body["messages"] = [{"role": "user", "content": "Tide tables"}]
    events = stream_events(client, path, body)
    usages = [event["usage"] for event in events]
    assert all(usage is not None for usage in usages)
    completion = [usage["completion_tokens"] for usage in usages]
    assert completion == sorted(completion) and completion[-1] == 6
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    assert events[-1]["choices"] == []  # the closing usage chunk still comes


def test_whole_number_floats_are_accepted_where_integers_are_expected(
    client: httpx.Client,
) -> None:
    body = {"model": "tiny", "prompt": "x", "max_tokens": 16.0, "n": 2.0, "ignore_eos": True}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 32


def test_min_tokens_keeps_stop_tokens_from_ending_the_output_early(client: httpx.Client) -> None:
    """Nearly every id is a stop id: the output ends at once, unless min_tokens holds the stop
    ids back, and then it is made of the few ids left."""
    allowed = range(300, 310)
    stop_ids = [t for t in range(512) if t not in allowed]
    body = {"model": "tiny", "prompt": "x", "max_tokens": 6, "temperature": 0,
            "stop_token_ids": stop_ids}  # fmt: skip
    stopped = client.post("/v1/completions", json=body).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 1
    held = client.post("/v1/completions", json={**body, "min_tokens": 4}).json()
    assert held["usage"]["completion_tokens"] >= 4
    too_many = client.post("/v1/completions", json={**body, "min_tokens": 7})
    assert too_many.status_code == 400 and "min_tokens" in too_many.json()["error"]["message"]


def test_logit_bias_and_penalties_reach_the_sampler(client: httpx.Client) -> None:
    """OpenAI's sampling adjustments take effect: +100 on one id and -100 on another makes the
    greedy output that id alone; +100 on both with a frequency penalty spreads it over both."""
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0,
            "logprobs": 0}  # fmt: skip

    def tokens(**fields: Any) -> list[str]:
        response = client.post("/v1/completions", json={**body, **fields})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["logprobs"]["tokens"]

    only_300 = tokens(logit_bias={"300": 100, "301": -100})
    only_301 = tokens(logit_bias={"300": -100, "301": 100})
    assert len(set(only_300)) == len(set(only_301)) == 1 and only_300 != only_301
    spread = tokens(logit_bias={"300": 100, "301": 100}, frequency_penalty=2, presence_penalty=1)
    assert set(spread) == {only_300[0], only_301[0]}
    assert spread != tokens()  # the plain greedy output is something else
    # vLLM's repetition penalty, after the bias (vLLM's order): +100 on both gives the better
    # one alone; the penalty divides its logit once it is output, so the other comes next
    both = tokens(logit_bias={"300": 100, "301": 100})
    assert len(set(both)) == 1
    repeated = tokens(logit_bias={"300": 100, "301": 100}, repetition_penalty=1.5)
    assert repeated[0] == both[0] and repeated[1] != both[0] and set(repeated) == set(spread)


def test_include_stop_str_in_output_keeps_the_stop_string(client: httpx.Client) -> None:
    """vLLM's include_stop_str_in_output, streamed or not: the text ends after the stop
    string instead of before it."""
    body = {"model": "tiny", "prompt": "The harbour master", "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = full[3:5]
    want = full[: full.index(stop) + len(stop)]
    for stream in (False, True):
        fields = {**body, "stop": [stop], "include_stop_str_in_output": True, "stream": stream}
        if not stream:
            choice = client.post("/v1/completions", json=fields).json()["choices"][0]
            text = choice["text"]
        else:
            text = ""
            with client.stream("POST", "/v1/completions", json=fields) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                        text += choices[0]["text"]
        assert text == want, stream


def test_tokenize_and_detokenize_as_vllm_serves_them(
    client: httpx.Client, tiny_model: Path
) -> None:
    """vLLM's /tokenize: a prompt's ids (with or without the BOS), its tokens' spellings, and a
    chat's ids as the chat route renders them (the same count as its usage, template fields
    included); /detokenize reads ids back as the text."""
    tokenizer = Tokenizer(str(tiny_model))
    prompt = "Pilots board at the fairway buoy."

    def tokenize(**fields: Any) -> dict[str, Any]:
        response = client.post("/tokenize", json={"model": "tiny", **fields})
        assert response.status_code == 200, response.text
        return dict(response.json())

    whole = tokenize(prompt=prompt, return_token_strs=True)
    assert whole["tokens"] == tokenizer.encode(prompt) and whole["count"] == len(whole["tokens"])
    assert whole["max_model_len"] == 512
    assert whole["token_strs"] == [tokenizer.hf.id_to_token(i) for i in whole["tokens"]]
    bare = tokenize(prompt=prompt, add_special_tokens=False)
    assert bare["tokens"] == tokenizer.encode(prompt, add_special_tokens=False) != whole["tokens"]
    assert "token_strs" not in bare
    text = client.post("/detokenize", json={"model": "tiny", "tokens": bare["tokens"]}).json()
    assert text == {"prompt": prompt}
    messages = [{"role": "user", "content": prompt}]
    for fields in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
        chat = tokenize(messages=messages, **fields)
        body = {"model": "tiny", "messages": messages, "max_tokens": 1, **fields}
        usage = client.post("/v1/chat/completions", json=body).json()["usage"]
        assert chat["count"] == usage["prompt_tokens"], fields
    assert tokenize(messages=messages)["tokens"] == tokenizer.encode(
        tokenizer.apply_chat_template(messages)
    )


def test_truncate_prompt_tokens_keeps_the_prompts_end(
    client: httpx.Client, tiny_model: Path
) -> None:
    """vLLM's truncate_prompt_tokens: a completion's prompt and a chat's rendered prompt keep
    their last N tokens (usage counts those; echo shows them); greedy, the answer is the one
    the shortened prompt gets on its own."""
    tokenizer = Tokenizer(str(tiny_model))
    prompt = "Pilots board at the fairway buoy; tugs push the hull against the fenders."
    ids = tokenizer.encode(prompt)
    body = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    cut = client.post("/v1/completions", json={**body, "prompt": prompt,
                                                "truncate_prompt_tokens": 6, "echo": True}).json()  # fmt: skip
    alone = client.post("/v1/completions", json={**body, "prompt": ids[-6:]}).json()
    assert cut["usage"]["prompt_tokens"] == 6
    echoed = tokenizer.decode(ids[-6:])
    assert cut["choices"][0]["text"] == echoed + alone["choices"][0]["text"]
    messages = [{"role": "user", "content": prompt}]
    chat = client.post("/v1/chat/completions", json={**body, "messages": messages,
                                                      "truncate_prompt_tokens": 9}).json()  # fmt: skip
    assert chat["usage"]["prompt_tokens"] == 9
    short = client.post("/v1/completions", json={**body, "prompt": prompt,
                                                  "truncate_prompt_tokens": 500}).json()  # fmt: skip
    assert short["usage"]["prompt_tokens"] == len(ids)  # shorter than N: as it is


def test_vllms_chat_rendering_fields_shape_the_prompt(
    client: httpx.Client, tiny_model: Path
) -> None:
    """vLLM's chat fields: chat_template_kwargs reach the template (the test model's
    Qwen3-style enable_thinking switch opens the reply with an empty thought),
    add_generation_prompt false leaves the assistant's turn unopened, and
    continue_final_message ends the prompt inside the last message, without the template's
    end of turn. Each prompt has the tokenizer's count for the text vLLM would render."""
    tokenizer = Tokenizer(str(tiny_model))
    render, user = tokenizer.apply_chat_template, [{"role": "user", "content": "Name a port."}]
    begun = [*user, {"role": "assistant", "content": "The harbour of"}]

    def prompt_tokens(messages: list[dict[str, str]], **fields: Any) -> int:
        body = {"model": "tiny", "messages": messages, "max_tokens": 1, **fields}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return int(response.json()["usage"]["prompt_tokens"])

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    assert prompt_tokens(user) == count(render(user))
    thinking_off = render(user, enable_thinking=False)
    assert thinking_off.endswith("<think>\n\n</think>\n\n")
    assert prompt_tokens(user, chat_template_kwargs={"enable_thinking": False}) == count(
        thinking_off
    )
    unopened = render(user, add_generation_prompt=False)
    assert prompt_tokens(user, add_generation_prompt=False) == count(unopened) < count(render(user))
    closed = render(begun, add_generation_prompt=False)
    left_open = closed[: closed.rindex("The harbour of") + len("The harbour of")]
    assert prompt_tokens(begun, continue_final_message=True) == count(left_open) < count(closed)


def test_continued_cuts_after_the_final_messages_last_occurrence() -> None:
    prompt = "<u>go on</u><a>go on</a>"
    assert continued(prompt, "go on") == "<u>go on</u><a>go on"
    assert continued("<a>trimmed</a>", "  trimmed ") == "<a>trimmed"  # templates that trim
    with pytest.raises(NothingToContinue):
        continued("<a>rewritten</a>", "written by hand")


def test_response_format_json_schema_and_json_object_give_json_streamed_or_not(
    client: httpx.Client,
) -> None:
    """OpenAI's structured output: the content parses and follows the schema, in one body and
    streamed chunk by chunk, and finishes with "stop" once the JSON is complete."""
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "tag"],
              "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["quay", "berth"]}}}  # fmt: skip
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Answer in JSON."}],
            "max_tokens": 120, "temperature": 1.0, "seed": 3, "n": 2,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "answer", "schema": schema}}}  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "stop"
        answer = json.loads(choice["message"]["content"])
        assert set(answer) == {"ok", "tag"} and answer["tag"] in ("quay", "berth")
    text = ""
    with client.stream("POST", "/v1/chat/completions", json={**body, "n": 1, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
    assert set(json.loads(text)) == {"ok", "tag"}
    as_object = {**body, "n": 1, "response_format": {"type": "json_object"},
                 "messages": [{"role": "user", "content": "{}"}], "max_tokens": 400}  # fmt: skip
    obj = client.post("/v1/chat/completions", json=as_object).json()["choices"][0]
    if obj["finish_reason"] == "stop":  # a random model may fill a free-form object to length
        assert isinstance(json.loads(obj["message"]["content"]), dict)
    else:
        assert obj["message"]["content"].lstrip().startswith("{")


def test_vllms_structured_outputs_constrain_completions_and_chats(client: httpx.Client) -> None:
    """vLLM's structured_outputs, and its older guided_* names: a choice, a regular
    expression, a Lark grammar and a JSON schema, on both routes, sampled, streamed or not:
    every output is one the constraint accepts, and ends with "stop"."""
    schema = {"type": "object", "additionalProperties": False, "required": ["tag"],
              "properties": {"tag": {"enum": ["quay", "berth"]}}}  # fmt: skip
    constraints: list[tuple[dict[str, Any], Any]] = [
        ({"structured_outputs": {"choice": ["quay", "berth", "dry dock"]}},
         lambda t: t in ("quay", "berth", "dry dock")),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}},
         lambda t: re.fullmatch("[0-9]{3}-[a-z]{2}", t)),
        ({"guided_regex": "(port|quay) [A-Z]{2}"}, lambda t: re.fullmatch("(port|quay) [A-Z]{2}", t)),
        ({"structured_outputs": {"grammar": 'start: "berth " NUM\nNUM: /[1-9][0-9]?/'}},
         lambda t: re.fullmatch("berth [1-9][0-9]?", t)),
        ({"structured_outputs": {"json": schema}}, lambda t: json.loads(t)["tag"] in ("quay", "berth")),
        ({"guided_json": json.dumps(schema)}, lambda t: json.loads(t)["tag"] in ("quay", "berth")),
    ]  # fmt: skip
    for fields, accepts in constraints:
        for path, base in (
            ("/v1/completions", {"prompt": "Where?"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Where?"}]}),
        ):
            body = {"model": "tiny", "max_tokens": 60, "temperature": 1.0, "seed": 5, "n": 2,
                    **base, **fields}  # fmt: skip
            response = client.post(path, json=body)
            assert response.status_code == 200, (fields, response.text)
            for choice in response.json()["choices"]:
                text = choice.get("text", choice.get("message", {}).get("content"))
                assert choice["finish_reason"] == "stop" and accepts(text), (fields, path, text)
            text = ""
            with client.stream("POST", path, json={**body, "n": 1, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and (choices := json.loads(line[6:])["choices"]):
                        piece = choices[0].get("text", choices[0].get("delta", {}).get("content"))
                        text += piece or ""
            assert accepts(text), (fields, path, "streamed", text)


def test_openapi_describes_the_request_bodies_and_the_error_responses(
    client: httpx.Client,
) -> None:
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"),
                        ("/v1/chat/completions", "ChatCompletionRequest")):  # fmt: skip
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert components[model]["additionalProperties"] is False
        responses = operation["responses"]
        assert {"200", "400", "404", "408", "413", "429", "503"} <= set(responses)
        assert "text/event-stream" in responses["200"]["content"]
        error = responses["400"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "404" in schema["paths"]["/v1/models/{model}"]["get"]["responses"]
    assert components["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["type"] == (
        "integer"
    )
