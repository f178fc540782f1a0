"""The thought splitter against the rule it implements, one piece at a time or all at once;
the grammars that let a thought come before a constrained answer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from berth.runtime.engine.grammar import after_thought, choice_lark, json_lark, regex_lark
from berth.runtime.engine.tokenizer import Tokenizer
from berth.runtime.server.reasoning import END, START, ReasoningParser, ThoughtSplitter


def rule(text: str, parser: ReasoningParser) -> tuple[str, str]:
    """vLLM's parsers, as Berth reads them: qwen3 opens a thought only where the output starts
    with <think>; deepseek_r1 starts inside one (dropping a repeated <think>); a thought runs
    to the first </think>, or to the end when none comes."""
    rest = text.lstrip()
    if rest.startswith(START):
        text = rest[len(START) :]
    elif parser == "qwen3":
        return "", text
    thought, closed, answer = text.partition(END)
    return thought, answer if closed else ""


def split(pieces: list[str], parser: ReasoningParser) -> tuple[str, str]:
    splitter = ThoughtSplitter(parser)
    thought, answer = "", ""
    for piece in pieces:
        t, a = splitter.feed(piece)
        assert not (t and answer), "a thought after the answer began"
        thought, answer = thought + t, answer + a
    t, a = splitter.finish()
    return thought + t, answer + a


PARTS = st.sampled_from([START, END, "<", "</", "<th", "</thi", "think>", " ", "\n", "a", "b c",
                         "<tool_call>", ">"])  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    words=st.lists(PARTS, max_size=12),
    cuts=st.lists(st.integers(0, 60), max_size=6),
    parser=st.sampled_from(["qwen3", "deepseek_r1"]),
)
def test_any_chunking_splits_as_the_rule_does(
    words: list[str], cuts: list[int], parser: ReasoningParser
) -> None:
    text = "".join(words)
    at = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *at], [*at, len(text)], strict=True)]
    assert split(pieces, parser) == rule(text, parser) == split([text], parser)


def test_the_usual_shapes() -> None:
    qwen = "<think>\nThe user greets.\n</think>\n\nHello!"
    assert split([qwen], "qwen3") == ("\nThe user greets.\n", "\n\nHello!")
    assert split(["Hello!"], "qwen3") == ("", "Hello!")
    assert split(["I think </think> is a tag"], "qwen3") == ("", "I think </think> is a tag")
    r1 = "Okay, the user greets.\n</think>\n\nHello!"
    assert split([r1], "deepseek_r1") == ("Okay, the user greets.\n", "\n\nHello!")
    assert split(["<think>cut short"], "deepseek_r1") == ("cut short", "")
    # markers split across pieces are held back, never shown half
    splitter = ThoughtSplitter("qwen3")
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("ink>plan</th") == ("plan", "")
    assert splitter.feed("ink>go") == ("", "go")


@pytest.fixture(scope="module")
def accepts(tiny_model: Path) -> Callable[[str, str], bool]:
    """Whether a compiled grammar accepts a whole text, through the tiny model's tokenizer."""
    from llguidance import LLMatcher, LLTokenizer

    tokenizer = Tokenizer(tiny_model)
    index = LLTokenizer(tokenizer.hf.to_str())

    def check(grammar: str, text: str) -> bool:
        matcher = LLMatcher(index, grammar, log_level=0)
        ids = tokenizer.hf.encode(text, add_special_tokens=False).ids
        return bool(matcher.consume_tokens(ids) and matcher.is_accepting())

    return check


SCHEMA = {"type": "object", "properties": {"tag": {"enum": ["quay", "berth"]}},
          "required": ["tag"], "additionalProperties": False}  # fmt: skip


def test_a_thought_comes_before_the_constrained_answer(accepts: Callable[[str, str], bool]) -> None:
    """With a reasoning parser the answer's constraint holds after the thought, which is free
    up to the first </think>: qwen3's thought is optional and opens only at the start,
    deepseek_r1's output starts inside it."""
    for answer, good, bad in (
        (json_lark(SCHEMA), '{"tag": "quay"}', '{"tag": "dock"}'),
        (regex_lark("[0-9]{3}/[a-z]{2}"), "123/ab", "12/ab"),
        (choice_lark(("yes", "no")), "no", "maybe"),
    ):
        qwen3 = after_thought(answer, opens_inside=False)
        assert accepts(qwen3, good) and accepts(qwen3, f"<think>\nPlan: {bad}?\n</think>\n\n{good}")
        assert not accepts(qwen3, f"<think>plan</think>{bad}") and not accepts(qwen3, bad)
        assert not accepts(qwen3, f"plan</think>{good}")  # no thought without its opening
        assert not accepts(qwen3, f"<think>a</think>b</think>{good}")  # the first one ends it
        r1 = after_thought(answer, opens_inside=True)
        assert accepts(r1, f"plan</think>\n{good}") and accepts(r1, f"<think>plan</think>{good}")
        assert not accepts(r1, good) and not accepts(r1, f"plan</think>{bad}")


def test_a_regex_keeps_its_slashes_in_lark(accepts: Callable[[str, str], bool]) -> None:
    for pattern in ("a/b", "a\\/b", "(x|y)//z"):
        grammar = after_thought(regex_lark(pattern), opens_inside=False)
        text = "a/b" if pattern.startswith("a") else "y//z"
        assert accepts(grammar, text) and accepts(grammar, f"<think>t</think>{text}"), pattern


def test_berth_serve_takes_the_parser_by_flag_or_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--reasoning-parser`` (or BERTH_REASONING_PARSER, what a pod's env can set) reaches the
    server's settings; an unknown parser stops the start naming the choices."""
    from click.testing import CliRunner

    from berth.runtime.server import lifecycle
    from berth.runtime.server.cli import serve

    seen: list[object] = []
    monkeypatch.setattr(lifecycle, "serve", lambda settings: seen.append(settings) or 0)
    for args, env in ((["--reasoning-parser", "qwen3"], {}),
                      ([], {"BERTH_REASONING_PARSER": "deepseek_r1"}), ([], {})):  # fmt: skip
        result = CliRunner().invoke(serve, ["--model", "tiny", "--device", "cpu", *args], env=env)
        assert result.exit_code == 0, result.output
    assert [getattr(s, "reasoning_parser", "?") for s in seen] == ["qwen3", "deepseek_r1", None]
    bad = CliRunner().invoke(serve, ["--model", "tiny", "--reasoning-parser", "o1"])
    assert bad.exit_code == 2 and "qwen3" in bad.output and "deepseek_r1" in bad.output
