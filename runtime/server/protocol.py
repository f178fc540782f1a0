"""OpenAI's request and response shapes for completions, chat completions and models.

Requests are strict (``extra="forbid"``, no type coercion), because OpenAI rejects unknown
arguments and wrong types with a 400; a client that misspells ``max_tokens`` should learn so
instead of silently getting the default. Fields OpenAI accepts but this server cannot honour
(a suffix, best_of other than n, ...) are declared, so that they parse, and refused by
:mod:`berth.runtime.server.sampling` with a 400 when set to anything but their neutral value.

Tool calling (function calling) is served: ``tools``, ``tool_choice`` (``none``, ``auto``,
``required`` or a named function) and ``parallel_tool_calls`` on the request, assistant
messages with ``tool_calls`` and ``tool`` messages in the conversation, ``message.tool_calls``
and ``delta.tool_calls`` in the answer (:mod:`.tools` on the way in, :mod:`.tool_calls` on the
way out). Until then tools were refused with a 400.
vLLM's extra sampling fields (``top_k``, ``min_p``, ``min_tokens``, ``ignore_eos``,
``stop_token_ids``, ``stream_options.continuous_usage_stats``, ``prompt_logprobs``) are accepted
too, since clients pass them through ``extra_body``.

Prompt log-probabilities: a completion with ``echo`` and ``logprobs`` covers the prompt's tokens
too, as OpenAI's legacy API did (what lm-evaluation-harness scores with, ``max_tokens`` 0 or
1); vLLM's ``prompt_logprobs`` answers in its own shape.

JSON has one number type, and many clients write ``16.0`` for 16: integer fields accept a float
with no fractional part (as JSON Schema's ``integer`` does) and refuse ``16.5`` naming the field.
Token ids in prompts stay strict ints: a Python check per element of a million-token prompt
would hold the event loop.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError


def _whole_number(value: object) -> object:
    """``16.0`` -> 16; ``16.5`` -> an error naming the value; anything else unchanged."""
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise PydanticCustomError(
            "int_from_float", "Input should be a whole number, got {value}", {"value": value}
        )
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]

# Sampling fields shared by both routes, with OpenAI's bounds (vLLM's for its extras).
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[WholeNumber, Field(ge=-1)]  # -1 and 0 both mean "off"
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0)]
MaxTokens = Annotated[WholeNumber, Field(ge=1)]
MinTokens = Annotated[WholeNumber, Field(ge=0)]
Choices = Annotated[WholeNumber, Field(ge=1, le=64)]
TopLogprobs = Annotated[WholeNumber, Field(ge=0, le=20)]  # the engine's MAX_LOGPROBS
TokenId = Annotated[int, Field(ge=0)]
Seed = Annotated[WholeNumber, Field(ge=-(2**63), lt=2**63)]  # a 64-bit generator seed
Stop = str | list[str]


class _Request(BaseModel):
    """Base of every request body: unknown fields, coerced types and (since the JSON parser
    takes ``NaN`` and ``Infinity``) non-finite numbers are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Request):
    include_usage: bool | None = None
    # vLLM's: every chunk carries the usage so far (needs include_usage, as in vLLM).
    continuous_usage_stats: bool | None = None


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs``: one constraint on the output, given by one field."""

    model_config = ConfigDict(populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(
        default=None, alias="json", description="A JSON Schema (object or its JSON text)."
    )
    regex: str | None = Field(default=None, description="A regular expression (Rust syntax).")
    choice: list[str] | None = Field(default=None, description="Exactly one of these strings.")
    grammar: str | None = Field(default=None, description="A Lark grammar (llguidance's).")
    json_object: bool | None = Field(default=None, description="true: any JSON object.")


class _SamplingRequest(_Request):
    """Fields that map onto the engine's sampling parameters, common to both routes."""

    model: str
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    n: Choices | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    truncate_prompt_tokens: Annotated[WholeNumber, Field(ge=1)] | None = Field(
        default=None,
        description="vLLM's: only the last N tokens of the prompt (a chat's, as rendered) are "
        "used; the usage counts those.",
    )
    include_stop_str_in_output: bool | None = Field(
        default=None,
        description="vLLM's: the text ends after the stop string that ended it (default: "
        "before it).",
    )
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    min_tokens: MinTokens | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = Field(
        default=None,
        description="vLLM's and transformers': each token id the prompt or the output holds "
        "has its logit divided by this where positive and multiplied where negative (1: off; "
        "above 1 discourages repeats).",
    )
    logit_bias: dict[str, float] | None = None
    structured_outputs: StructuredOutputs | None = Field(
        default=None,
        description="vLLM's: the output follows a JSON Schema, a regular expression, one of a "
        "list of strings, a Lark grammar or any JSON object (one of them).",
    )
    # vLLM's older names of structured_outputs' fields
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None
    prompt_logprobs: TopLogprobs | None = Field(
        default=None,
        description="vLLM's: the log-probability of every prompt token (the first has none) "
        "and of the N most likely tokens at its position, as a prompt_logprobs list (on each "
        "choice of a completion, on a chat completion itself). Not with stream.",
    )


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: Annotated[WholeNumber, Field(ge=0)] | None = Field(
        default=16,
        description="New tokens at most; 0 only with echo: the answer is the prompt alone "
        "(with its log-probabilities when logprobs is set), finish_reason length.",
    )
    logprobs: TopLogprobs | None = Field(
        default=None,
        description="The log-probability of each token and of the N most likely at its "
        "position; with echo, of the prompt's tokens too (the first prompt token has none).",
    )
    echo: bool | None = None
    best_of: Choices | None = None
    suffix: str | None = None


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImageContentPart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Request):
    data: str
    format: str


class AudioContentPart(_Request):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileContentPart(_Request):
    type: Literal["file"]
    file: dict[str, Any]


# OpenAI's content parts, told apart by ``type``. Only text reaches a text model: the others
# parse, so that the refusal can say "image inputs are not supported" instead of a union error.
ContentPart = Annotated[
    TextContentPart | ImageContentPart | AudioContentPart | FileContentPart,
    Field(discriminator="type"),
]
NON_TEXT_INPUTS = {"image_url": "image", "input_audio": "audio", "file": "file"}


# A function's name as OpenAI allows it: it is written into prompts and grammars verbatim.
FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDefinition(_Request):
    """A function the model may call. ``parameters`` is the JSON Schema of its arguments (an
    object); left out, the function takes none. Calls that ``tool_choice`` forces always
    follow the schema; with ``strict``, so do the calls the model chooses to make under
    ``auto`` (constrained from the moment one begins; ``ToolPlan.auto_grammar``)."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    """A tool the model may call; OpenAI's only kind is a function."""

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    """``tool_choice`` forcing a call of one function, named among ``tools``."""

    type: Literal["function"]
    function: ToolChoiceFunction


class CalledFunction(_Request):
    """A call the assistant made: ``arguments`` is the JSON text of its arguments object."""

    name: str
    arguments: str


class MessageToolCall(_Request):
    """One entry of an assistant message's ``tool_calls``, sent back in a later request."""

    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Request):
    """One message of a conversation; content parts other than text are refused. An assistant
    message may carry the ``tool_calls`` it made (its content then may be null); a ``tool``
    message answers one of them, named by ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text, with content parts joined the way OpenAI concatenates them."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextContentPart))


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    response_format: dict[str, Any] | None = None
    tools: list[ChatTool] | None = Field(
        default=None,
        description="Functions the model may call; they reach the model through its chat "
        "template (or, when the template ignores tools, a system message describing them).",
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="none: no call; auto (the default with tools): the model may call, and "
        "its calls are parsed from its text (valid under the schema once begun, for strict "
        "tools; beside a response_format, the message is the format's JSON or calls); "
        "required or a named function: the output is constrained to a call, valid under the "
        "function's parameters schema.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None,
        description="false: at most one call per choice (default true).",
    )
    add_generation_prompt: bool | None = Field(
        default=None,
        description="vLLM's: open the assistant's turn after the messages (the default, unless "
        "continue_final_message); false renders the messages alone.",
    )
    continue_final_message: bool | None = Field(
        default=None,
        description="vLLM's: the output continues the last message (an assistant's reply "
        "begun by the caller) instead of starting a new turn: the prompt ends with that "
        "message's text, before the template closes it.",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None,
        description="vLLM's: more variables for the chat template, e.g. "
        '{"enable_thinking": false} for Qwen3; the names the server sets itself (messages, '
        "tools, add_generation_prompt, bos_token, eos_token, raise_exception, strftime_now) "
        "are refused.",
    )
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class TokenizeRequest(_Request):
    """vLLM's ``POST /tokenize``: a ``prompt``, or chat ``messages`` as the chat route renders
    them (with its rendering fields)."""

    model: str | None = None
    prompt: str | None = None
    add_special_tokens: bool | None = Field(
        default=None, description="With prompt: the tokenizer's BOS and the like (default true)."
    )
    messages: list[ChatMessage] | None = None
    tools: list[ChatTool] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = Field(
        default=None, description="Also each token as the tokenizer's vocabulary spells it."
    )


class DetokenizeRequest(_Request):
    """vLLM's ``POST /detokenize``."""

    model: str | None = None
    tokens: list[TokenId]


# Responses. Plain models: the server builds them, so no strictness is needed.


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens served from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs: parallel lists, one entry per token of the returned text
    (with echo the prompt's first, whose first token has null log-probabilities);
    ``text_offset`` is each token's character offset in it."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's entry for one token id at one prompt position."""

    logprob: float
    rank: int | None = None  # 1: the most likely token at the position
    decoded_token: str | None = None


def _is_none(value: object) -> bool:
    return value is None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, exclude_if=_is_none)


class DetokenizeResponse(BaseModel):
    prompt: str


# vLLM's prompt_logprobs: per prompt position, None for the first, else the prompt token's and
# the N most likely tokens' entries, keyed by token id.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text of the arguments object, as the model wrote it


class ToolCall(BaseModel):
    id: str  # call_<hex>: a tool message answers the call by this id
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    """The answer: text, or calls (``content`` null when the model wrote nothing else)."""

    role: Literal["assistant"] = "assistant"
    # vLLM's, with --reasoning-parser: the model's thought (its <think> ... </think>)
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)
    content: str | None
    tool_calls: list[ToolCall] | None = Field(default=None, exclude_if=_is_none)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = Field(default=None, exclude_if=_is_none)


class FunctionCallDelta(BaseModel):
    name: str | None = Field(default=None, exclude_if=_is_none)
    arguments: str | None = Field(default=None, exclude_if=_is_none)


class ToolCallDelta(BaseModel):
    """A piece of call ``index``: its first carries the id, type and name, later ones more
    of the arguments' text (concatenated, they are the call's ``arguments``)."""

    index: int
    id: str | None = Field(default=None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    """A chunk's increment; absent fields are left out (the final delta is ``{}``)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    reasoning_content: str | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_is_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "berth"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail
