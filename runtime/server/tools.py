"""OpenAI's tools on the way in: what a request's ``tools`` and ``tool_choice`` ask for, the
JSON schema that forces a call, and the conversation as a chat template takes it.

Tools reach the model through its chat template, as Hugging Face passes them (``tools=``, a
list of ``{"type": "function", "function": {...}}``); assistant messages carry ``tool_calls``
whose ``arguments`` are a dict (the JSON text parsed: Qwen2.5's and Llama 3.1's templates write
them with ``tojson``), and tool messages their ``tool_call_id``. A template that ignores tools
(SmolLM2's, most base chat templates) would drop them without a word, so for it the tools are
described in a system message instead, with the Hermes ``<tool_call>`` format to answer in, and
earlier calls and results are written into the messages' text in that format.

Pure: the one template render (:func:`renders_tools`) is a probe, cached per template.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from berth.runtime.engine.grammar import JSON_WHITESPACE, json_value
from berth.runtime.server.errors import invalid_request
from berth.runtime.server.protocol import ChatCompletionRequest, ChatTool, MessageToolCall
from berth.runtime.server.tool_calls import (
    CallFormat,
    CallReader,
    ForcedReader,
    HermesReader,
    LlamaReader,
    format_calls,
)

if TYPE_CHECKING:
    from berth.runtime.engine.tokenizer import Tokenizer

Mode = Literal["none", "auto", "required", "named"]
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# Keys whose values are data, not schemas: a "$ref" inside them is not a reference.
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})


@dataclass(frozen=True)
class ToolPlan:
    """A request's tools and what it asks of them: ``none`` (no call), ``auto`` (the model
    decides; calls are parsed from its text), ``required`` (at least one call) or ``named``
    (a call of ``name``). Forced calls (the last two) are constrained by a grammar, and so are
    ``auto`` calls of ``strict`` tools or beside a ``response_format`` (:meth:`auto_grammar`)."""

    tools: list[ChatTool]
    mode: Mode
    name: str | None = None
    parallel: bool = True

    @property
    def names(self) -> frozenset[str]:
        return frozenset(tool.function.name for tool in self.tools)

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as a chat template takes them (OpenAI's shape, ``parameters`` filled in:
        some templates read ``parameters.properties`` unconditionally)."""
        tools = []
        for tool in self.tools:
            function = tool.function.model_dump(exclude_none=True)
            function.setdefault("parameters", {"type": "object", "properties": {}})
            tools.append({"type": "function", "function": function})
        return tools

    @property
    def strict(self) -> bool:
        """Some tool asks, with ``strict``, that calls the model chooses to make follow its
        schema too."""
        return any(tool.function.strict for tool in self.tools)

    def forced_schema(self) -> dict[str, Any] | None:
        """The JSON schema a forced call's output follows: a named function's arguments, or
        ``{"name", "arguments"}`` objects of any tool (``anyOf``), in an array of at least one
        unless ``parallel`` is false. None when nothing is forced."""
        if self.mode == "named":
            tool = next(t for t in self.tools if t.function.name == self.name)
            return parameters_schema(tool)
        if self.mode != "required":
            return None
        calls = self._calls_schema("arguments", strict_only=False)
        if self.parallel:
            defs = calls.pop("$defs")
            return {"$defs": defs, "type": "array", "minItems": 1, "items": calls}
        return calls

    def auto_grammar(self, style: CallFormat, answer: dict[str, Any] | None) -> str | None:
        """The llguidance (Lark) grammar of an ``auto`` message, or None where it is free text:

        - with ``answer`` (``response_format``'s schema), the message is that JSON value or
          calls alone, so the format holds and the tools stay callable;
        - else, when some tool is ``strict``, text goes free and calls are constrained once
          begun (a ``<tool_call>`` tag; Llama's JSON object opening the message).

        A call names one of the tools, and a strict tool's arguments follow its schema (the
        others' are any object), in the key the reader and the template family expect."""
        if self.mode != "auto" or (answer is None and not self.strict):
            return None
        key = "parameters" if style == "llama" else "arguments"
        call = json_value(self._calls_schema(key, strict_only=True))
        rules = [
            "%llguidance {}",
            f"WS: /{JSON_WHITESPACE}/",
            f"call_body: {call}",
        ]
        if style == "llama":
            more = '(WS ";" WS call_body)*' if self.parallel else ""
            rules.append(f"calls: WS call_body {more}")
            if answer is None:  # prose may not open with "{": that begins a call
                rules += ["start: (TEXT | calls)?", r"TEXT: /\s*[^{\s](?s:.*)/"]
        else:
            if answer is None:  # prose, then a call whenever the tag is written
                rules += [
                    "start: call* TAIL" if self.parallel else "start: call? TAIL",
                    "TAIL: /(?s:.*)/",
                    'call_head[lazy]: /(?s:.*)/ "<tool_call>"',
                    'call: call_head WS call_body WS "</tool_call>"',
                ]
            else:
                rules.append('call: "<tool_call>" WS call_body WS "</tool_call>" WS')
                rules.append(f"calls: {'call+' if self.parallel else 'call'}")
        if answer is not None:
            rules += ["start: answer | calls", f"answer: {json_value(answer)}"]
        return "\n".join(rules) + "\n"

    def _calls_schema(self, key: str, strict_only: bool) -> dict[str, Any]:
        """``{"name": <a tool>, key: <its arguments>}`` objects as one schema (``anyOf``), each
        tool's schema under ``$defs`` with its references moved there; with ``strict_only``,
        a tool that is not strict takes any object."""
        defs = {}
        calls = []
        for i, tool in enumerate(self.tools):
            ref = f"berth_tool_{i}"
            strict = tool.function.strict or not strict_only
            schema = parameters_schema(tool) if strict else {"type": "object"}
            defs[ref] = _relocated(schema, f"/$defs/{ref}")
            calls.append({
                "type": "object",
                "properties": {"name": {"const": tool.function.name},
                               key: {"$ref": f"#/$defs/{ref}"}},
                "required": ["name", key],
                "additionalProperties": False,
            })  # fmt: skip
        return {"$defs": defs, "anyOf": calls}

    def reader(self, style: CallFormat) -> Callable[[], CallReader] | None:
        """Makes one choice's reader of tool calls (None: its text is all content)."""
        if self.mode == "none":
            return None
        if self.forced:
            return functools.partial(ForcedReader, self.name, self.parallel)
        kind = HermesReader if style == "hermes" else LlamaReader
        return functools.partial(kind, self.names, None if self.parallel else 1)


def parameters_schema(tool: ChatTool) -> dict[str, Any]:
    """The schema of a function's arguments; a function without ``parameters`` takes none."""
    parameters = tool.function.parameters
    return dict(NO_PARAMETERS) if parameters is None else parameters


def _relocated(schema: Any, base: str) -> Any:
    """``schema`` with its local references (``#``, ``#/$defs/x``) pointing below ``base``,
    so that it can sit inside another schema at that JSON pointer."""
    if isinstance(schema, list):
        return [_relocated(item, base) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = "#" + base + value[1:]
        elif key in _DATA_KEYS:
            out[key] = value
        else:
            out[key] = _relocated(value, base)
    return out


def tool_plan(request: ChatCompletionRequest) -> ToolPlan | None:
    """What the request asks of its tools (None: no tools), or a 400 naming the field: a
    call forced without tools, two tools of one name, a named function not among them.
    ``"none"`` or ``"auto"`` without tools asks nothing and is accepted, as vLLM does (clients
    such as agent frameworks send it with every request)."""
    tools = request.tools or []
    choice = request.tool_choice
    if not tools:
        if choice is not None and choice not in ("none", "auto"):
            raise invalid_request(
                "tool_choice: a call can only be forced when tools are given; send tools or "
                "leave tool_choice out.",
                param="tool_choice",
            )
        return None
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            param = f"tools.{i}.function.name"
            raise invalid_request(
                f"{param}: two tools are named {tool.function.name!r}; names must be unique.",
                param=param,
            )
        seen.add(tool.function.name)
    parallel = request.parallel_tool_calls is not False
    if choice is None or isinstance(choice, str):
        return ToolPlan(tools, choice or "auto", parallel=parallel)
    name = choice.function.name
    if name not in seen:
        raise invalid_request(
            f"tool_choice.function.name: {name!r} is not among the tools "
            f"({', '.join(sorted(seen))}).",
            param="tool_choice.function.name",
        )
    return ToolPlan(tools, "named", name, parallel)


def template_tool_calls(calls: list[MessageToolCall]) -> list[dict[str, Any]]:
    """An assistant message's calls as templates read them: ``arguments`` as a dict when its
    text is a JSON object (Hugging Face's convention), else as sent (a cut-off call)."""
    out = []
    for call in calls:
        try:
            arguments: Any = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments
        if not isinstance(arguments, dict):
            arguments = call.function.arguments
        function = {"name": call.function.name, "arguments": arguments}
        out.append({"id": call.id, "type": "function", "function": function})
    return out


_PROBE = "berth_probe_function"


@functools.lru_cache(maxsize=16)
def _template_renders_tools(tokenizer: Tokenizer) -> bool:
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "a probe",
                                               "parameters": {"type": "object",
                                                              "properties": {}}}}]  # fmt: skip
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tools=probe)
    except Exception:  # a template that cannot render the probe cannot render tools either
        return False
    return _PROBE in text


def renders_tools(tokenizer: Tokenizer) -> bool:
    """Whether the model's chat template writes the tools it is given into the prompt (once
    per tokenizer: a probe tool's name must appear in a rendered one-message chat)."""
    return _template_renders_tools(tokenizer)


def call_format(template: str | None, renders: bool) -> CallFormat:
    """The format the model writes calls in: Llama 3.1/3.2's bare JSON when its template asks
    for ``"parameters"`` objects and knows the ipython role or ``<|python_tag|>``; otherwise
    Hermes ``<tool_call>`` tags (Hermes, Qwen, and the system message written for templates
    that ignore tools). Other families (Mistral's ``[TOOL_CALLS]``, ...) are not parsed."""
    text = template or ""
    llama = '"parameters"' in text and ("<|python_tag|>" in text or "ipython" in text)
    return "llama" if renders and llama and "<tool_call>" not in text else "hermes"


TOOLS_SYSTEM_PROMPT = """# Tools

You can call functions to help with the user's request. Their signatures are given as JSON \
within <tools></tools> tags:
<tools>
{tools}
</tools>

To call a function, write a JSON object with its name and arguments within \
<tool_call></tool_call> tags, one per call:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-object>}}
</tool_call>"""


def described_in_system(messages: list[dict[str, Any]], plan: ToolPlan) -> list[dict[str, Any]]:
    """The conversation for a template that ignores tools: the tools described in the system
    message (added after a system message's text, or as a first one), earlier calls written
    as ``<tool_call>`` text and tool results as ``<tool_response>`` user turns (consecutive
    results in one turn, so that roles still alternate)."""
    tools = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in plan.template_tools())
    block = TOOLS_SYSTEM_PROMPT.format(tools=tools)
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response})
            continue
        entry = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        if message.get("tool_calls"):
            calls = [(c["function"]["name"], c["function"]["arguments"])
                     for c in message["tool_calls"]]  # fmt: skip
            written = format_calls(calls, "hermes")
            entry["content"] = f"{content}\n{written}" if content else written
        out.append(entry)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def prompt_bytes(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """The UTF-8 bytes of a conversation's text and tools (what ``--max-prompt-bytes`` bounds)."""
    size = sum(len(m["content"].encode()) for m in messages)
    calls = [m["tool_calls"] for m in messages if m.get("tool_calls")]
    extra = [tools] if tools else []
    return size + sum(len(json.dumps(x, ensure_ascii=False).encode()) for x in calls + extra)
