"""From an OpenAI request to the engine's prompts and sampling parameters, refusing what the
engine cannot do with a 400 that says so (rather than silently ignoring a penalty)."""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from berth.runtime.engine import SamplingParams
from berth.runtime.engine.grammar import (
    after_thought,
    choice_grammar,
    choice_lark,
    json_lark,
    json_schema_grammar,
    lark_grammar,
    regex_grammar,
    regex_lark,
)
from berth.runtime.server.errors import APIError, invalid_request
from berth.runtime.server.prompts import TEMPLATE_OWN, TemplateOptions
from berth.runtime.server.protocol import (
    NON_TEXT_INPUTS,
    ChatCompletionRequest,
    CompletionRequest,
)
from berth.runtime.server.reasoning import ReasoningParser
from berth.runtime.server.tool_calls import CallFormat
from berth.runtime.server.tools import (
    ToolPlan,
    parameters_schema,
    template_tool_calls,
    tool_plan,
)

SamplingRequest = CompletionRequest | ChatCompletionRequest


def _unsupported(param: str, what: str) -> APIError:
    return invalid_request(
        f"{param}: {what} is not supported by this server.", param=param, code="unsupported"
    )


def check_supported(request: SamplingRequest) -> ToolPlan | None:
    """Refuse fields that parse but that the engine cannot honour, unless neutral. Returns a
    chat request's tool plan (None: no tools, or a completion), worked out once here."""
    logit_bias(request)  # its keys must be token ids
    if not request.stream and request.stream_options is not None:
        raise invalid_request(
            "stream_options: only allowed when stream is true.", param="stream_options"
        )
    options = request.stream_options
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        raise invalid_request(
            "stream_options.continuous_usage_stats: only allowed together with include_usage.",
            param="stream_options.continuous_usage_stats",
        )
    if request.prompt_logprobs is not None and request.stream:
        raise invalid_request(
            "prompt_logprobs: not available with stream (as in vLLM); ask without streaming.",
            param="prompt_logprobs",
        )
    plan = None
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise _unsupported("suffix", "a suffix (insertion)")
        if request.best_of is not None and request.best_of != (request.n or 1):
            raise _unsupported("best_of", "best_of other than n")
        if request.max_tokens == 0 and not request.echo:
            raise invalid_request(
                "max_tokens: must be at least 1; 0 is only allowed with echo (the answer is "
                "then the prompt alone).",
                param="max_tokens",
            )
    else:
        # Bad schemas are refused before any work.
        constrained = response_format_grammar(request) is not None
        plan = tool_plan(request)
        if plan is not None:
            for i, tool in enumerate(plan.tools):
                schema_grammar(parameters_schema(tool), f"tools.{i}.function.parameters")
            if plan.forced and constrained:
                raise invalid_request(
                    "response_format: cannot be combined with a tool_choice that forces a call "
                    "(the call's arguments follow the function's parameters schema).",
                    param="response_format",
                )
        if request.top_logprobs is not None and not request.logprobs:
            raise invalid_request(
                "top_logprobs: only allowed when logprobs is true.", param="top_logprobs"
            )
    return plan


def truncated(token_ids: list[int], request: SamplingRequest) -> list[int]:
    """The prompt's last ``truncate_prompt_tokens`` tokens (vLLM's left truncation)."""
    keep = request.truncate_prompt_tokens
    return token_ids if keep is None or len(token_ids) <= keep else token_ids[-keep:]


def check_prompt(token_ids: list[int], max_model_len: int, param: str) -> None:
    """The prompt must be non-empty and leave room for one new token (token ids outside the
    model's vocabulary are refused by ``Engine.add_request``, which knows the vocabulary)."""
    if not token_ids:
        raise invalid_request(f"{param}: the prompt is empty.", param=param, code="empty_prompt")
    if len(token_ids) >= max_model_len:
        raise invalid_request(
            f"{param}: the prompt has {len(token_ids)} tokens, but this model's context length "
            f"is {max_model_len} tokens, which must also hold at least one new token. "
            "Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )


def resolve_max_tokens(
    requested: int | None, param: str, prompt_len: int, max_model_len: int
) -> int:
    """``requested`` if prompt plus completion fit the context; None means all the room left."""
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise invalid_request(
            f"{param}: {requested} new tokens plus the {prompt_len}-token prompt exceed this "
            f"model's context length of {max_model_len} tokens; ask for at most {room}.",
            param=param,
            code="context_length_exceeded",
        )
    return requested


def logit_bias(request: SamplingRequest) -> dict[int, float]:
    """OpenAI's ``logit_bias``, whose keys are token ids written as strings, keyed by id; ids
    past the vocabulary are refused by ``Engine.add_request``, which knows it."""
    bias = {}
    for key, value in (request.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()):  # "²".isdigit() too, but not int("²")
            raise invalid_request(
                f"logit_bias: keys must be token ids (non-negative integers), got {key!r}.",
                param="logit_bias",
            )
        if not -100.0 <= value <= 100.0:
            raise invalid_request(
                f"logit_bias: values must be in [-100, 100], got {value} for token {key}.",
                param=f"logit_bias.{key}",
            )
        bias[int(key)] = value
    return bias


def sampling_params(
    request: SamplingRequest,
    max_tokens: int,
    logprobs: int | None,
    choice: int,
    grammar: str | None,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The engine's parameters for choice number ``choice`` of ``request``; ``grammar`` is
    ``request_grammar``'s, worked out once for all choices.

    With a seed and n > 1, choice i uses seed + i: n identical samples would be useless.
    """
    stop = request.stop
    seed = None if request.seed is None else request.seed + choice
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0),
        min_p=request.min_p or 0.0,
        seed=seed,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        include_stop_str_in_output=bool(request.include_stop_str_in_output),
        stop_token_ids=list(request.stop_token_ids or []),
        ignore_eos=bool(request.ignore_eos),
        min_tokens=request.min_tokens or 0,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=1.0
        if request.repetition_penalty is None
        else request.repetition_penalty,
        logit_bias=logit_bias(request),
        grammar=grammar,
    )
    return params


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """``schema`` as an llguidance grammar, or a 400 naming ``param`` with what is wrong."""
    with _named(param):
        return json_schema_grammar(schema)


def request_grammar(
    request: SamplingRequest,
    plan: ToolPlan | None,
    style: CallFormat | None = None,
    thinking: ReasoningParser | None = None,
) -> str | None:
    """The grammar the output follows: vLLM's ``structured_outputs`` (alone: beside
    ``response_format`` or tools it is a 400); else a forced tool call's; else, for ``auto``
    tools that are strict or beside a ``response_format``, calls (in ``style``) constrained as
    ``ToolPlan.auto_grammar`` says; else ``response_format``'s. ``plan`` is
    ``check_supported``'s. With a reasoning parser (``thinking``), the constraint holds after
    the model's thought, which stays free (vLLM's structured outputs with reasoning); a
    grammar the request gives in Lark is taken as it is, and must allow the thought itself."""
    answer = response_format_schema(request)
    structured = structured_constraint(request)
    if structured is not None:
        kind, param, value = structured
        other = "response_format" if answer is not None else "tools" if plan is not None else None
        if other is not None:
            raise invalid_request(
                f"{param}: cannot be combined with {other} (each constrains the whole output).",
                param=param,
            )
        with _named(param):
            if thinking is None or kind == "grammar":
                return _compiled(kind, value)
            return _thought_first(_lark_of(kind, value), thinking)
    lark: str | None = None
    param = "tools"
    if plan is not None:
        schema = plan.forced_schema()
        if schema is not None:
            if thinking is None:
                return schema_grammar(schema, param)
            lark = json_lark(schema)
        else:
            lark = plan.auto_grammar(style or "hermes", None if answer is None else answer[0])
    if lark is None and answer is not None:
        if thinking is None:
            return schema_grammar(*answer)
        lark, param = json_lark(answer[0]), answer[1]
    if lark is None:
        return None
    with _named(param):
        return lark_grammar(lark) if thinking is None else _thought_first(lark, thinking)


def _thought_first(answer: str, thinking: ReasoningParser) -> str:
    return after_thought(answer, opens_inside=thinking == "deepseek_r1")


@contextmanager
def _named(param: str) -> Iterator[None]:
    """A grammar that does not compile is a 400 naming ``param``."""
    try:
        yield
    except ValueError as error:  # json.JSONDecodeError is one
        raise invalid_request(f"{param}: {error}", param=param) from error


def structured_constraint(request: SamplingRequest) -> tuple[str, str, Any] | None:
    """vLLM's ``structured_outputs`` (or its older ``guided_*`` fields): the one constraint
    given, as (kind, the field it came from, its value); None: none. More than one is a 400
    naming the second."""
    given: list[tuple[str, str, Any]] = []  # (kind, param, value)
    spec = request.structured_outputs
    if spec is not None:
        for kind, value in (
            ("json", spec.json_schema), ("regex", spec.regex), ("choice", spec.choice),
            ("grammar", spec.grammar), ("json_object", spec.json_object or None),
        ):  # fmt: skip
            if value is not None:
                given.append((kind, f"structured_outputs.{kind}", value))
    for kind, value in (
        ("json", request.guided_json), ("regex", request.guided_regex),
        ("choice", request.guided_choice), ("grammar", request.guided_grammar),
    ):  # fmt: skip
        if value is not None:
            given.append((kind, f"guided_{kind}", value))
    if len(given) > 1:
        names = ", ".join(param for _, param, _ in given)
        raise invalid_request(
            f"{given[1][1]}: one structured output constraint per request; got {names}.",
            param=given[1][1],
        )
    return given[0] if given else None


def _schema_of(kind: str, value: Any) -> dict[str, Any]:
    if kind == "json_object":
        return {"type": "object"}
    schema = json.loads(value) if isinstance(value, str) else value
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object (or its JSON text)")
    return schema


def _choices(value: list[str]) -> tuple[str, ...]:
    if not value or not all(value):
        raise ValueError("must list at least one choice, none of them empty")
    return tuple(value)


def _compiled(kind: str, value: Any) -> str:
    """A structured output constraint as an llguidance grammar (``ValueError``: it does not
    compile)."""
    if kind in ("json", "json_object"):
        return json_schema_grammar(_schema_of(kind, value))
    if kind == "regex":
        return regex_grammar(value)
    if kind == "choice":
        return choice_grammar(_choices(value))
    return lark_grammar(value)


def _lark_of(kind: str, value: Any) -> str:
    """The same constraint as a Lark text whose ``start`` is the whole answer (not for a Lark
    grammar the request gives: its rules may name ``start``)."""
    if kind in ("json", "json_object"):
        return json_lark(_schema_of(kind, value))
    if kind == "regex":
        return regex_lark(value)
    return choice_lark(_choices(value))


def response_format_grammar(request: SamplingRequest) -> str | None:
    """OpenAI's ``response_format`` as an llguidance grammar (None: free text)."""
    answer = response_format_schema(request)
    return None if answer is None else schema_grammar(*answer)


def response_format_schema(request: SamplingRequest) -> tuple[dict[str, Any], str] | None:
    """OpenAI's ``response_format`` as (JSON schema, the field it came from); None: free text.
    ``json_object`` is any JSON object; ``json_schema`` follows ``json_schema.schema`` (any
    object without one). A malformed format is a 400 naming the field."""
    if not isinstance(request, ChatCompletionRequest) or not request.response_format:
        return None
    fmt = request.response_format
    kind = fmt.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return {"type": "object"}, "response_format"
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise invalid_request(
                "response_format.json_schema: an object with a name (and a schema) is required.",
                param="response_format.json_schema",
            )
        schema = spec.get("schema", {"type": "object"})
        param = "response_format.json_schema.schema"
        if not isinstance(schema, dict):
            raise invalid_request(f"{param}: must be a JSON Schema object.", param=param)
        return schema, param
    raise invalid_request(
        f"response_format.type: one of text, json_object, json_schema; got {kind!r}.",
        param="response_format.type",
    )


def validate_params(params: SamplingParams, max_model_len: int) -> None:
    """The engine's own checks, as a 400 (its messages name the parameter)."""
    try:
        params.validate(max_model_len)
    except ValueError as exc:
        raise invalid_request(str(exc)) from exc


def template_options(
    request: ChatCompletionRequest, messages: list[dict[str, Any]]
) -> TemplateOptions:
    """vLLM's rendering fields, checked: a variable the server sets itself, both ways of
    ending the prompt at once, or nothing to continue are 400s naming the field."""
    kwargs = dict(request.chat_template_kwargs or {})
    for name in sorted(TEMPLATE_OWN & kwargs.keys()):
        param = f"chat_template_kwargs.{name}"
        raise invalid_request(
            f"{param}: the server sets this template variable itself (from the request's "
            "messages, tools and add_generation_prompt, the model's tokenizer, and Hugging "
            "Face's template helpers).",
            param=param,
        )
    continue_final = bool(request.continue_final_message)
    if continue_final and request.add_generation_prompt:
        raise invalid_request(
            "continue_final_message: cannot be combined with add_generation_prompt true (one "
            "continues the last message, the other opens a new turn after it).",
            param="continue_final_message",
        )
    if continue_final and not (messages[-1].get("content") or "").strip():
        raise invalid_request(
            "continue_final_message: the last message has no text to continue.",
            param="continue_final_message",
        )
    add = (
        not continue_final
        if request.add_generation_prompt is None
        else request.add_generation_prompt
    )
    return TemplateOptions(add, continue_final, kwargs)


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation as the chat template expects it: role and plain-text content, an
    assistant's calls and the call a tool message answers (see :mod:`.tools`)."""
    if not request.messages:
        raise invalid_request(
            "messages: at least one message is required.", param="messages", code="empty_messages"
        )
    rendered: list[dict[str, Any]] = []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type in NON_TEXT_INPUTS:
                    param = f"messages.{i}.content.{j}"
                    raise invalid_request(
                        f"{param}: {NON_TEXT_INPUTS[part.type]} inputs are not supported by "
                        "this model; send text content parts only.",
                        param=param,
                        code="unsupported_content",
                    )
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            if message.role != "assistant":
                param = f"messages.{i}.tool_calls"
                raise invalid_request(
                    f"{param}: only assistant messages carry tool calls.", param=param
                )
            entry["tool_calls"] = template_tool_calls(message.tool_calls)
        if message.role == "tool":
            if message.tool_call_id is None:
                param = f"messages.{i}.tool_call_id"
                raise invalid_request(
                    f"{param}: a tool message must name the call it answers (the id of an "
                    "assistant message's tool call).",
                    param=param,
                )
            entry["tool_call_id"] = message.tool_call_id
        rendered.append(entry)
    return rendered
