"""The thought splitter against the rule it implements, one piece at a time or all at once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

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
