"""A thinking model's thought, told apart from its answer (vLLM's ``--reasoning-parser``).

Qwen3, QwQ and DeepSeek-R1 write their reasoning between ``<think>`` and ``</think>`` before the
answer. With a parser, a chat answer carries the thought as ``reasoning_content`` (vLLM's field,
streamed as ``delta.reasoning_content``) and the rest as ``content``, which is what tool calls
are read from. ``qwen3``: a thought opens only where the output starts with ``<think>`` (with
``enable_thinking`` off, Qwen3's template writes an empty thought into the prompt, and the
output is all answer). ``deepseek_r1``: the template opened the thought, so the output starts
inside it (a ``<think>`` the model repeats is dropped). A thought never closed (the output was
cut) is all reasoning, streamed or not.
"""

from __future__ import annotations

from typing import Literal

START, END = "<think>", "</think>"

ReasoningParser = Literal["qwen3", "deepseek_r1"]
REASONING_PARSERS: tuple[ReasoningParser, ...] = ("qwen3", "deepseek_r1")


def _held(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThoughtSplitter:
    """Feeds on a choice's text as it comes; each call returns what is now known to be
    (reasoning, answer), holding back only what could still be a marker."""

    def __init__(self, parser: ReasoningParser) -> None:
        # "opening": the start may be "<think>"; "thought": inside; "answer": after it
        self.state = "thought" if parser == "deepseek_r1" else "opening"
        self.repeated_start = parser == "deepseek_r1"  # drop a "<think>" it writes anyway
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        reasoning, answer = [], []
        while self.pending:
            if self.state == "opening" or self.repeated_start:
                stripped = self.pending.lstrip()
                if stripped.startswith(START):
                    self.pending = stripped[len(START) :]
                    self.state = "thought"
                elif START.startswith(stripped):  # all of it may still become "<think>"
                    break
                elif self.state == "opening":
                    self.state = "answer"
                self.repeated_start = False
            elif self.state == "thought":
                at = self.pending.find(END)
                if at < 0:
                    keep = _held(self.pending, END)
                    reasoning.append(self.pending[: len(self.pending) - keep])
                    self.pending = self.pending[len(self.pending) - keep :]
                    break
                reasoning.append(self.pending[:at])
                self.pending = self.pending[at + len(END) :]
                self.state = "answer"
            else:
                answer.append(self.pending)
                self.pending = ""
        return "".join(reasoning), "".join(answer)

    def finish(self) -> tuple[str, str]:
        """The end of the output: what was held back goes where it stands."""
        rest, self.pending = self.pending, ""
        if self.state == "thought":
            return rest, ""
        return "", rest
