"""Turning a request's prompts into token ids without stalling the server.

Tokenizing is the one per-request cost that grows with the input: a 7 MB prompt (under the
8 MiB body limit) took 7-10 s, on the event loop, and every other request and probe waited.
So, in this order, and before any tokenizing:

1. the number of sequences (prompts times ``n``) is checked against what the server can run;
2. the prompt text is bounded by bytes (``--max-prompt-bytes``; by default
   :data:`BYTES_PER_TOKEN` bytes per token of the context, which no real text of a fitting
   prompt reaches), a 413 naming the limit;
3. the text is tokenized (and a chat rendered) in a small thread pool, through the tokenizer's
   batch call, which releases the GIL, so the event loop keeps serving meanwhile.
"""

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from berth.runtime.server.errors import APIError, invalid_request

if TYPE_CHECKING:
    from berth.runtime.engine.tokenizer import Tokenizer

# Real text averages 3-5 bytes per token (code with deep indentation up to ~8); a prompt of more
# than 16 bytes per token of the context would not fit it once tokenized.
BYTES_PER_TOKEN = 16
MIN_PROMPT_BYTES = 64 << 10  # a small context still takes a page of text


def prompt_byte_limit(configured: int | None, max_model_len: int) -> int:
    """The server's bound on a request's prompt text, in UTF-8 bytes."""
    if configured is not None:
        return configured
    return max(MIN_PROMPT_BYTES, BYTES_PER_TOKEN * max_model_len)


def check_prompt_bytes(size: int, limit: int, param: str) -> None:
    """413 when the prompt text of one request is longer than ``limit`` bytes."""
    if size > limit:
        raise APIError(
            413,
            f"{param}: the prompt is {size} bytes of text; this server takes at most {limit} "
            "bytes of prompt per request (--max-prompt-bytes), far more than fits the model's "
            "context. Shorten the prompt.",
            param=param,
            code="prompt_too_large",
        )


def check_sequence_count(prompts: int, n: int, capacity: int) -> None:
    """400 when ``prompts`` times ``n`` sequences exceed what the server runs at once, naming
    the field to change (checked before any prompt is tokenized)."""
    count = prompts * n
    if count <= capacity:
        return
    if n == 1 or prompts > capacity:
        raise invalid_request(
            f"prompt: the request sends {prompts} prompts; this server runs at most {capacity} "
            f"sequences at once. Send at most {capacity // n} prompts per request.",
            param="prompt",
            code="too_many_prompts",
        )
    raise invalid_request(
        f"n: {prompts} prompt(s) times n={n} ask for {count} sequences; this server runs at most "
        f"{capacity} at once. Lower n to at most {capacity // prompts}.",
        param="n",
        code="too_many_sequences",
    )


# The variables the server sets itself when it renders a chat template, and Hugging Face's
# helper functions that templates call.
TEMPLATE_OWN = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
     "strftime_now"}
)  # fmt: skip


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat is rendered beyond its messages and tools (vLLM's chat request fields)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # more template variables


class NothingToContinue(ValueError):
    """The rendered prompt does not show the final message's text (``continued``)."""


def continued(prompt: str, final: str) -> str:
    """``prompt`` cut right after the final message's text, so that the model goes on with it
    rather than after the template has closed it (vLLM's rule: the text's last occurrence,
    or its stripped form's, for templates that trim)."""
    for text in (final, final.strip()):
        at = prompt.rfind(text) if text else -1
        if at >= 0:
            return prompt[: at + len(text)]
    raise NothingToContinue(
        "the final message's text does not appear in the prompt the chat template renders, "
        "so it cannot be continued"
    )


class PromptEncoder:
    """Tokenizes (and renders chats) in its own threads, never on the event loop."""

    def __init__(self, tokenizer: "Tokenizer", max_workers: int = 2) -> None:
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="berth-tokenize")

    async def encode(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        loop = asyncio.get_running_loop()
        encode = functools.partial(self.tokenizer.encode_batch, texts, add_special_tokens)
        return await loop.run_in_executor(self._pool, encode)

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        options: TemplateOptions | None = None,
    ) -> list[int]:
        """The chat template rendered (with ``tools`` when given, and ``options``), then
        tokenized (the template's errors pass through; ``NothingToContinue`` for a final
        message the rendered prompt does not show)."""
        loop = asyncio.get_running_loop()
        options = options or TemplateOptions()
        extra: dict[str, Any] = {**options.kwargs, **({} if tools is None else {"tools": tools})}
        render = functools.partial(
            self.tokenizer.apply_chat_template, messages, options.add_generation_prompt, **extra
        )
        prompt = await loop.run_in_executor(self._pool, render)
        if options.continue_final_message:
            prompt = continued(prompt, messages[-1]["content"])
        return (await self.encode([prompt]))[0]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
